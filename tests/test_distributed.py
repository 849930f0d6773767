"""Real DDP on CPU (gloo, 2 processes) against one process: metrics, averaging, temperature, checkpoints,
member-parallel training and FSDP2 sharding.

Every distributed run is a script under ``tests/_ddp_scripts`` launched with ``subprocess.run`` and a
hard timeout, so a hung process group can never block the suite; Lightning's DDP launcher re-runs
the script for rank 1. The single-process references run in the script's launching process or here.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPTS = Path(__file__).parent / "_ddp_scripts"
TIMEOUT = 240  # generous for a loaded 2-core machine; each run takes ~20 s when the machine is quiet

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable")


def run_script(name: str, out: Path, *args: str) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "WORLD_SIZE", "NODE_RANK", "MASTER_PORT")}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parents[1]), env.get("PYTHONPATH", "")])
    proc = subprocess.run(
        [sys.executable, str(SCRIPTS / name), str(out), *args],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        cwd=SCRIPTS,
        env=env,
        check=False,
    )
    assert proc.returncode == 0, f"{name} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"


def load(path: Path) -> dict:
    return torch.load(path, weights_only=False)


def assert_metrics_close(got: dict, want: dict, atol: float = 1e-5) -> None:
    assert set(got) == set(want), set(got) ^ set(want)
    bad = {k: (got[k], want[k]) for k in want if abs(got[k] - want[k]) > atol}
    assert not bad, bad


# --------------------------------------------------------------------------- DDP correctness
@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    run_script("ddp_correctness.py", out)
    return out, load(out / "rank0.pt"), load(out / "rank1.pt")


def test_ddp_averaged_weights_identical_on_both_ranks(ddp_run):
    _, r0, r1 = ddp_run
    assert r0["n_averaged"] == r1["n_averaged"] == 2  # epochs 1 and 2 of 3
    assert r0["average"] and r0["average"].keys() == r1["average"].keys()
    for k in r0["average"]:
        assert torch.equal(r0["average"][k], r1["average"][k]), k
    # Final weights include the BatchNorm statistics recomputed after averaging: equal on both ranks.
    for k in r0["weights"]:
        assert torch.allclose(r0["weights"][k].float(), r1["weights"][k].float(), atol=1e-6), k


def _restore_single(out: Path):
    sys.path.insert(0, str(SCRIPTS))
    try:
        from common import SmallDigits, trainer
        from ddp_correctness import backbone, calibration_metrics
    finally:
        sys.path.remove(str(SCRIPTS))
    from lightning_ensembles import EnsembleClassifier

    model = EnsembleClassifier.load_from_checkpoint(out / "final.ckpt", backbone=backbone(), map_location="cpu")
    return model, SmallDigits(replicated_train=False), lambda: trainer(callbacks=[calibration_metrics()])


def test_ddp_checkpoint_restores_in_one_process_with_same_metrics_and_predictions(ddp_run):
    out, r0, r1 = ddp_run
    model, dm, trainer = _restore_single(out)
    t = trainer()
    val = {k: float(v) for k, v in t.validate(model, dm, verbose=False)[0].items()}
    test = {k: float(v) for k, v in t.test(model, dm, verbose=False)[0].items()}
    # Metrics logged under DDP (each rank saw half the data, torchmetrics synced) equal one process:
    # the module's metrics and every CalibrationMetrics metric.
    assert any("/calibration/" in k for k in test)
    assert_metrics_close({k: v for k, v in r0["test"].items() if "/ts/" not in k}, test)
    assert_metrics_close({k: v for k, v in r0["val"].items() if "/ts/" not in k}, val)
    model.eval()
    with torch.no_grad():
        probs = model(dm.test.tensors[0]).softmax(-1).mean(0)
    torch.testing.assert_close(probs, r0["probs"], atol=1e-6, rtol=0)
    torch.testing.assert_close(r1["probs"], r0["probs"], atol=1e-6, rtol=0)


def test_ddp_temperature_fitted_on_all_ranks_data(ddp_run):
    from lightning_ensembles.calibration.temperature import fit_temperature

    out, r0, r1 = ddp_run
    assert r0["temperature"] == r1["temperature"]
    model, dm, _ = _restore_single(out)
    model.eval()
    x, y = dm.val.tensors
    with torch.no_grad():
        logits = model(x)
    want = fit_temperature(logits, y, "member_logits")
    assert abs(r0["temperature"] - want) < 1e-3, (r0["temperature"], want)
    # ... and differs from what half of the validation set would give.
    half = fit_temperature(logits[:, ::2], y[::2], "member_logits")
    assert abs(half - want) > 10 * abs(r0["temperature"] - want)


# --------------------------------------------------------------------------- member-parallel
@pytest.fixture(scope="module")
def member_parallel_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("member_parallel")
    run_script("member_parallel.py", out)
    return out, load(out / "single.pt"), load(out / "rank0.pt"), load(out / "rank1.pt")


def test_member_parallel_equals_single_process(member_parallel_run):
    _, single, *ranks = member_parallel_run
    for r in ranks:
        assert r["params"].keys() == single["params"].keys()
        for k in single["params"]:
            torch.testing.assert_close(r["params"][k], single["params"][k], atol=1e-5, rtol=0)
        assert_metrics_close(r["val"], single["val"])  # gathered member outputs during fit
        assert_metrics_close(r["test"], single["test"])
        for k in single["swa_params"]:  # SWA averages and BatchNorm statistics recomputed afterwards
            torch.testing.assert_close(r["swa_params"][k], single["swa_params"][k], atol=1e-5, rtol=0)
        for k in single["params"]:  # resumed from the epoch-0 checkpoint: same as never stopping
            torch.testing.assert_close(r["resumed_params"][k], single["params"][k], atol=1e-5, rtol=0)
    assert single["val"]["val/acc"] > 0.5  # the members really trained


def test_member_parallel_never_reduces_gradients(member_parallel_run):
    _, _, *ranks = member_parallel_run
    for r in ranks:
        assert r["wrapped"] == "EnsembleClassifier"  # no DistributedDataParallel wrapper
        assert r["val_replicas"] == 2  # validation data split across ranks, training data not
        assert r["calls"]["reducing"] == 0  # no all_reduce / reduce_scatter during training batches
        assert r["calls"]["all_gather"] > 0  # member outputs were gathered
        assert r["checked"] > 0 and r["mismatch"] == 0  # p.grad is exactly what local autograd produced


def test_member_parallel_checkpoint_holds_full_ensemble(member_parallel_run):
    out, single, _, _ = member_parallel_run
    ckpt = torch.load(out / "last.ckpt", weights_only=False)
    from lightning_ensembles import EnsembleClassifier

    model = EnsembleClassifier(
        backbone="mlp", num_members=4, backbone_kwargs={"in_features": 64, "out_features": 10, "hidden": (32,)}
    )
    model.load_state_dict(ckpt["state_dict"])  # same keys and shapes as a one-process module
    for k, v in model.ensemble.stacked_parameters().items():
        torch.testing.assert_close(v, single["params"][k], atol=1e-5, rtol=0)
    exp_avg = ckpt["optimizer_states"][0]["state"][0]["exp_avg"]
    assert exp_avg.shape[0] == 4  # optimiser state of all members, not one rank's half


# --------------------------------------------------------------------------- FSDP
@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp")
    run_script("fsdp.py", out)
    return load(out / "rank0.pt"), load(out / "rank1.pt")


def test_fsdp2_sharded_training_equals_ddp(fsdp_run):
    for r in fsdp_run:
        # FSDP2 shards the member axis: each of the 2 ranks stores 2 of the 4 members.
        assert all(shape[0] == 2 for shape in r["fsdp"]["local_shapes"].values())
        for k, want in r["ddp"]["params"].items():
            assert want.shape[0] == 4
            torch.testing.assert_close(r["fsdp"]["params"][k], want, atol=1e-5, rtol=0)
        assert_metrics_close(r["fsdp"]["val"], r["ddp"]["val"])
    assert fsdp_run[0]["ddp"]["val"]["val/acc"] > 0.2  # trained, not at chance


@pytest.mark.skipif(not torch.cuda.is_available(), reason="Lightning's strategy='fsdp' needs a GPU")
def test_fsdp_strategy_on_gpus(tmp_path):
    run_script("fsdp.py", tmp_path, "gpu")
    r = load(tmp_path / "gpu_rank0.pt")
    if r["fsdp"]["devices"] == 1:  # same batches as the one-GPU reference: same training
        for k, want in r["single"]["params"].items():
            torch.testing.assert_close(r["fsdp"]["params"][k], want, atol=1e-4, rtol=0)
    assert r["fsdp"]["val"]["val/acc"] > 0.2


# --------------------------------------------------------------------------- plug-in callback, regressor
@pytest.fixture(scope="module")
def plugin_regressor_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("plugin_regressor")
    run_script("ddp_plugin_regressor.py", out)
    return out, load(out / "rank0.pt"), load(out / "rank1.pt")


def _script_module(name: str):
    sys.path.insert(0, str(SCRIPTS))
    try:
        return __import__(name)
    finally:
        sys.path.remove(str(SCRIPTS))


def test_ensembling_callback_checkpoint_from_ddp_validates_the_same_in_one_process(plugin_regressor_run):
    out, r0, r1 = plugin_regressor_run
    script = _script_module("ddp_plugin_regressor")
    from lightning_ensembles.callbacks import Ensembling

    assert r0["plugin_val"]["val_acc"] == r1["plugin_val"]["val_acc"]
    t = script.trainer(callbacks=[Ensembling(num_members=3)])
    single = t.validate(script.plugin_model(), script.SmallDigits(), ckpt_path=out / "plugin.ckpt", verbose=False)[0]
    # val_acc is a torchmetrics metric (synchronised); the user's val_loss is logged without
    # sync_dist, so under DDP it is rank 0's half only and is not compared.
    assert abs(single["val_acc"] - r0["plugin_val"]["val_acc"]) < 1e-6
    assert single["val_acc"] > 0.2  # trained past chance (0.1) in 8 DDP steps


def test_regressor_checkpoint_from_ddp_validates_the_same_in_one_process(plugin_regressor_run):
    out, r0, r1 = plugin_regressor_run
    script = _script_module("ddp_plugin_regressor")
    from lightning_ensembles import EnsembleRegressor

    model = EnsembleRegressor.load_from_checkpoint(out / "regressor.ckpt", map_location="cpu")
    single = {k: float(v) for k, v in script.trainer().validate(model, script.Regression(), verbose=False)[0].items()}
    assert_metrics_close(r0["regressor_val"], single)
    assert_metrics_close(r1["regressor_val"], single)
