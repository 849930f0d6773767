"""Trustworthy state (issue 15): loading never runs code, every state survives a safe round trip,
resumed runs equal uninterrupted ones, single-member and degenerate runs behave."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _trainer import cli_fit_args
from conftest import quiet_trainer
from lightning.pytorch.callbacks import Callback
from torch import nn

from lightning_ensembles import EnsembleClassifier, EnsembleRegressor, register_backbone, resolve_backbone
from lightning_ensembles.averaging import load_ingredient, uniform_soup
from lightning_ensembles.data import DigitsDataModule, ToyRegressionDataModule
from lightning_ensembles.losses import JensenShannon
from lightning_ensembles.losses.base import regularizer_from_config

SCRIPTS = Path(__file__).parent / "_trust_scripts"
CONFIG = Path(__file__).parents[1] / "examples" / "configs" / "digits_deep.yaml"
MLP_KW = {"in_features": 64, "out_features": 10, "hidden": [16]}


def _crafted_checkpoint(tmp_path: Path, marker: Path | None, backbone: str = "os.system") -> Path:
    """A real checkpoint whose hyper-parameters name a function (by default `os.system`) as the backbone."""
    model = EnsembleClassifier(backbone="mlp", num_members=2, backbone_kwargs=MLP_KW)
    trainer = quiet_trainer(max_epochs=1, limit_train_batches=1, limit_val_batches=1)
    trainer.fit(model, DigitsDataModule(batch_size=32))
    path = tmp_path / "crafted.ckpt"
    trainer.save_checkpoint(path)
    ckpt = torch.load(path, weights_only=True)
    ckpt["hyper_parameters"]["backbone"] = backbone
    ckpt["hyper_parameters"]["backbone_kwargs"] = {"command": f"touch {marker}"} if marker else {}
    torch.save(ckpt, path)
    return path


@pytest.mark.parametrize("weights_only", [True, None])
def test_a_checkpoint_naming_a_function_does_not_run_it(tmp_path, weights_only):
    marker = tmp_path / "pwned"
    path = _crafted_checkpoint(tmp_path, marker)
    with pytest.raises(ValueError, match=r"'os\.system' is not an allowed backbone.*register_backbone"):
        EnsembleClassifier.load_from_checkpoint(path, weights_only=weights_only)
    assert not marker.exists()


def test_cli_test_with_a_crafted_checkpoint_does_not_run_it(tmp_path):
    from lightning_ensembles.cli import run_cli

    # `os.abort` takes no argument: had the CLI called it, the test process would be gone.
    path = _crafted_checkpoint(tmp_path, None, backbone="os.abort")
    ckpt = torch.load(path, weights_only=True)  # as the CLI writes its checkpoints
    ckpt["hyper_parameters"].update(
        _class_path="lightning_ensembles.EnsembleClassifier", _instantiator="lightning.pytorch.cli.instantiate_module"
    )
    torch.save(ckpt, path)
    with pytest.raises(ValueError, match=r"'os\.abort' is not an allowed backbone"):
        run_cli(["test", "--config", str(CONFIG), f"--trainer.default_root_dir={tmp_path}", f"--ckpt_path={path}"])


class UserNet(nn.Sequential):
    def __init__(self, width: int = 4) -> None:
        super().__init__(nn.Flatten(), nn.Linear(64, width))


def test_only_allowlisted_or_registered_names_build():
    path = f"{UserNet.__module__}.UserNet"
    with pytest.raises(ValueError, match="register_backbone"):
        resolve_backbone(path, {"width": 3})
    # A function of a trusted package is refused too: only nn.Module classes are built from there.
    with pytest.raises(ValueError, match="not an allowed backbone"):
        resolve_backbone("lightning_ensembles.backbones.resolve_backbone", {"backbone": "mlp"})
    register_backbone(UserNet, name="user_net")
    try:
        assert resolve_backbone(path, {"width": 3})[1].out_features == 3
        assert resolve_backbone("user_net", {"width": 5})[1].out_features == 5
    finally:
        from lightning_ensembles import backbones

        backbones._REGISTERED.pop(path), backbones._REGISTERED.pop("user_net")
    assert type(resolve_backbone("torchvision.models.resnet18", {"num_classes": 3})).__name__ == "ResNet"
    assert resolve_backbone("torch.nn.Linear", {"in_features": 2, "out_features": 1}).out_features == 1


class _NotATensor:
    pass


def test_soup_ingredients_load_as_weights_only(tmp_path):
    good, bad = tmp_path / "good.pt", tmp_path / "bad.pt"
    torch.save({"w": torch.ones(2)}, good)
    torch.save({"w": torch.ones(2), "obj": _NotATensor()}, bad)
    assert torch.equal(uniform_soup([good, {"w": torch.zeros(2)}])["w"], torch.full((2,), 0.5))
    with pytest.raises(Exception, match="[Ww]eights only load failed"):
        load_ingredient(bad)


def test_regularizers_are_stored_as_plain_data_and_rebuilt(tmp_path):
    model = EnsembleClassifier(
        backbone="mlp", num_members=2, backbone_kwargs=MLP_KW, regularizers=[JensenShannon(weight=0.1, pairwise=True)]
    )
    assert model.hparams.regularizers == [
        {
            "class_path": "lightning_ensembles.losses.diversity.JensenShannon",
            "init_args": {"weight": 0.1, "pairwise": True, "name": "neg_jensen_shannon"},
        }
    ]
    trainer = quiet_trainer(max_epochs=1, limit_train_batches=2, limit_val_batches=1, limit_test_batches=1)
    trainer.fit(model, DigitsDataModule(batch_size=32))
    path = tmp_path / "m.ckpt"
    trainer.save_checkpoint(path)
    again = EnsembleClassifier.load_from_checkpoint(path, weights_only=True)
    (reg,) = again.regularizers
    assert isinstance(reg, JensenShannon) and reg.weight == 0.1 and reg.pairwise
    resumed = quiet_trainer(max_epochs=2, limit_train_batches=2, limit_val_batches=1, limit_test_batches=1)
    resumed.fit(again, DigitsDataModule(batch_size=32), ckpt_path=path, weights_only=True)
    assert resumed.current_epoch == 2
    resumed.test(again, DigitsDataModule(batch_size=32), ckpt_path=str(path), weights_only=True)
    with pytest.raises(ValueError, match="already imported"):
        regularizer_from_config({"class_path": "os.system", "init_args": {"command": "true"}})


@pytest.mark.slow
@pytest.mark.parametrize("data", ["digits", "mnist1d", "toy"])
def test_a_killed_run_resumes_bit_identical(tmp_path, data):
    script = SCRIPTS / "resume.py"
    full, part = tmp_path / "full", tmp_path / "part"
    full.mkdir(), part.mkdir()

    def run(out: Path, *args: str) -> int:
        return subprocess.run(
            [sys.executable, str(script), data, str(out), *args], capture_output=True, timeout=600
        ).returncode

    assert run(full, "full") == 0
    assert run(part, "kill", "1") == -9  # SIGKILL mid-epoch, after the epoch-0 checkpoint
    assert (part / "last.ckpt").exists() and not (part / "result.pt").exists()
    assert run(part, "resume") == 0
    a, b = torch.load(full / "result.pt", weights_only=True), torch.load(part / "result.pt", weights_only=True)
    assert a["metrics"] == b["metrics"]
    for k in a["state"]:
        assert torch.equal(a["state"][k], b["state"][k]), k


def test_datamodule_order_depends_on_seed_and_epoch_only():
    dm = DigitsDataModule(batch_size=1797, shuffle_seed=7)
    loader = dm.train_dataloader()
    torch.manual_seed(1)
    first = next(iter(loader))[1]
    torch.manual_seed(2)  # the global RNG does not change the order
    assert torch.equal(next(iter(loader))[1], first)
    loader.sampler.set_epoch(1)
    assert not torch.equal(next(iter(loader))[1], first)
    assert dm.state_dict() == {"shuffle_seed": 7}
    other = DigitsDataModule()
    other.load_state_dict(dm.state_dict())
    assert other.shuffle_seed == 7


@pytest.mark.slow
def test_every_stateful_module_and_callback_reloads_in_a_fresh_process(tmp_path):
    script = SCRIPTS / "state_roundtrip.py"
    save = subprocess.run(
        [sys.executable, str(script), "save", str(tmp_path)], capture_output=True, text=True, timeout=900
    )
    assert save.returncode == 0, save.stderr[-3000:]
    load = subprocess.run(
        [sys.executable, str(script), "load", str(tmp_path)], capture_output=True, text=True, timeout=900
    )
    assert load.returncode == 0, load.stderr[-3000:]
    for case in (
        "deep",
        "packed",
        "batch",
        "lora",
        "symmetry",
        "swa",
        "ema",
        "swag",
        "snapshot",
        "temperature",
        "conformal",
        "dca",
    ):
        assert f"ok {case}" in load.stdout


def test_one_member_end_to_end_in_the_cli(tmp_path, capsys):
    from lightning_ensembles.cli import run_cli

    cli = run_cli(
        cli_fit_args(
            CONFIG,
            tmp_path,
            "--model.init_args.num_members=1",
            test_batches=None,
        )
    )
    out = capsys.readouterr().out
    assert "member 0" in out and "member mean" in out
    assert "test/member_acc/0" in cli.trainer.callback_metrics  # after fit the CLI tests: test/ keys
    assert "test/member_acc" not in cli.trainer.callback_metrics


@pytest.mark.parametrize("members", [1, 2])
def test_point_regressor_logs_variance_metrics_only_when_a_variance_exists(members):
    model = EnsembleRegressor(
        backbone="mlp",
        num_members=members,
        loss="mse",
        backbone_kwargs={"in_features": 1, "out_features": 1, "hidden": [8]},
    )
    trainer = quiet_trainer(max_epochs=1, limit_train_batches=2, limit_val_batches=1)
    trainer.fit(model, ToyRegressionDataModule(num_train=64))
    logged = set(trainer.callback_metrics)
    assert "val/rmse" in logged
    assert ("val/nll" in logged) == (members > 1) and ("val/coverage90" in logged) == (members > 1)


class _PoisonMember(Callback):
    """Sets one weight of member 1 to NaN before the third training step."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == 2:
            with torch.no_grad():
                next(iter(pl_module.ensemble.stacked_parameters().values()))[1].view(-1)[0] = math.nan


def test_a_nonfinite_loss_stops_training_and_names_the_member_and_step():
    model = EnsembleClassifier(backbone="mlp", num_members=3, backbone_kwargs=MLP_KW)
    trainer = quiet_trainer(max_epochs=1, limit_train_batches=5, limit_val_batches=0, callbacks=[_PoisonMember()])
    with pytest.raises(FloatingPointError, match=r"global step 2 .*member\(s\) \[1\]"):
        trainer.fit(model, DigitsDataModule(batch_size=32))
