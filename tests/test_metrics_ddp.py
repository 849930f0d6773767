"""Metrics split across two processes (real DDP on CPU, gloo) equal the one-process values.

Also the two "no data" cases of a distributed run: one process without samples (its empty list
states once made gloo abort) gives the value of the other's samples, and a metric without samples
anywhere is NaN with one warning, from rank 0 only.

The test runs this file as a script in a subprocess (Lightning's DDP launcher re-executes the
script for rank 1), so pytest itself never forks or hangs; the script has a hard time limit.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch

N, M, C, BATCH = 300, 3, 5, 25


def fixed_predictions():
    g = torch.Generator().manual_seed(11)
    member_logits = torch.randn(M, N, C, generator=g) * 2
    target = torch.where(
        torch.rand(N, generator=g) < 0.6, member_logits.mean(0).argmax(-1), torch.randint(0, C, (N,), generator=g)
    )
    mean = torch.randn(M, N, 1, generator=g)
    var = torch.rand(M, N, 1, generator=g) + 0.2
    y_reg = torch.randn(N, generator=g)
    is_ood = (torch.rand(N, generator=g) < 0.3).long()
    return member_logits, target, mean, var, y_reg, is_ood


def build_metrics():
    from lightning_ensembles.metrics import (
        AURC,
        FPR95,
        OODAUROC,
        AdaptiveCalibrationError,
        ClassificationMetrics,
        ClasswiseCalibrationError,
        QuantileCalibrationError,
        RegressionMetrics,
    )

    return {
        "cls": ClassificationMetrics(C),
        "reg": RegressionMetrics(),
        "ace": AdaptiveCalibrationError(C, n_bins=10),
        "classwise": ClasswiseCalibrationError(C),
        "aurc": AURC(),
        "fpr95": FPR95(),
        "auroc": OODAUROC(),
        "qce": QuantileCalibrationError(),
    }


def update_metrics(metrics, idx, data):
    member_logits, target, mean, var, y_reg, is_ood = (t.to(idx.device) for t in data)
    logits, y = member_logits[:, idx], target[idx]
    probs = logits.softmax(-1).mean(0)
    metrics["cls"].update(logits, y)
    metrics["reg"].update(mean[:, idx], var[:, idx], y_reg[idx])
    for name in ("ace", "classwise", "aurc"):
        metrics[name].update(probs, y)
    entropy = torch.special.entr(probs).sum(-1)
    metrics["fpr95"].update(entropy, is_ood[idx])
    metrics["auroc"].update(entropy, is_ood[idx])
    mix_mean, mix_var = mean[:, idx].mean(0), var[:, idx].mean(0) + mean[:, idx].var(0, unbiased=False)
    metrics["qce"].update(mix_mean[:, 0], mix_var[:, 0], y_reg[idx])


def flat(metrics):
    out = {}
    for name, metric in metrics.items():
        value = metric.compute()
        if isinstance(value, dict):
            out.update({f"{name}/{k}": float(v) for k, v in value.items()})
        else:
            out[name] = float(value)
    return out


def run_ddp(out_path: str) -> None:
    import lightning as L
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_ensembles.callbacks import CalibrationMetrics, TemperatureScaling

    data = fixed_predictions()

    class Replay(L.LightningModule):
        """Replays fixed predictions for the sample indices in the batch."""

        def __init__(self):
            super().__init__()
            self.metrics = torch.nn.ModuleDict(build_metrics())
            self.dummy = torch.nn.Parameter(torch.zeros(()))

        def _step(self, batch):
            (idx,) = batch
            update_metrics(self.metrics, idx, data)
            return {"member_logits": data[0][:, idx] + 0 * self.dummy, "target": data[1][idx]}

        def validation_step(self, batch, batch_idx):
            return self._step(batch)

        def test_step(self, batch, batch_idx):
            return self._step(batch)

        def on_test_epoch_end(self):
            self.results = flat(self.metrics)
            self.no_data = no_data_checks(self.global_rank, data)

    loader = DataLoader(TensorDataset(torch.arange(N)), batch_size=BATCH)
    ts = TemperatureScaling()
    cal = CalibrationMetrics(metrics=["ece", "ace", "classwise_ece", "nll", "brier", "aurc", "mutual_information"])
    trainer = L.Trainer(
        accelerator="cpu",
        strategy="ddp",
        devices=2,
        callbacks=[ts, cal],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    model = Replay()
    trainer.validate(model, loader, verbose=False)
    for m in model.metrics.values():
        m.reset()
    trainer.test(model, loader, verbose=False)
    with open(f"{out_path}.rank{trainer.global_rank}", "w") as f:
        json.dump(model.no_data, f)
    if trainer.global_rank == 0:
        payload = {
            "metrics": model.results,
            "callback": cal.last_results["test"],
            "temperature": ts.temperature,
            "world_size": trainer.world_size,
        }
        with open(out_path, "w") as f:
            json.dump(payload, f)


def no_data_checks(rank, data):
    """Run on every rank: metrics that only rank 0 feeds, and metrics that nobody feeds."""
    import warnings

    from lightning_ensembles.metrics import AURC, ExpectedCalibrationError

    only_rank0 = build_metrics()
    if rank == 0:
        update_metrics(only_rank0, torch.arange(N), data)
    values = flat(only_rank0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        empty = {"aurc": float(AURC().compute()), "ece": float(ExpectedCalibrationError().compute())}
    messages = [str(w.message) for w in caught if "no samples" in str(w.message) or "``compute``" in str(w.message)]
    return {"only_rank0": values, "empty": empty, "warnings": messages}


def test_metrics_split_across_two_processes_equal_one_pass(tmp_path):
    out = tmp_path / "ddp.json"
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")]), OMP_NUM_THREADS="1"
    )
    try:
        proc = subprocess.run(
            [sys.executable, __file__, str(out)], env=env, capture_output=True, text=True, timeout=120
        )
    except subprocess.TimeoutExpired:
        pytest.fail("the DDP script did not finish in 120 s")
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(out.read_text())
    assert got["world_size"] == 2

    # One process, one pass over the same predictions.
    metrics = build_metrics()
    update_metrics(metrics, torch.arange(N), fixed_predictions())
    expected = flat(metrics)
    assert set(got["metrics"]) == set(expected)
    for key, value in expected.items():
        assert got["metrics"][key] == pytest.approx(value, abs=1e-6), key

    # The callback's metrics and the temperature (fitted on both ranks' validation predictions).
    from lightning_ensembles.calibration import fit_temperature

    member_logits, target = fixed_predictions()[:2]
    assert got["temperature"] == pytest.approx(fit_temperature(member_logits, target, "member_logits"), rel=1e-4)
    assert got["callback"]["ece"] == pytest.approx(expected["cls/ece"], abs=1e-6)
    assert got["callback"]["aurc"] == pytest.approx(expected["aurc"], abs=1e-6)
    assert got["callback"]["mutual_information"] == pytest.approx(expected["cls/mutual_information"], abs=1e-6)

    # One rank without samples: both ranks get the values of rank 0's samples (all N of them).
    for rank in (0, 1):
        no_data = json.loads((tmp_path / f"ddp.json.rank{rank}").read_text())
        assert set(no_data["only_rank0"]) == set(expected)
        for key, value in expected.items():
            assert no_data["only_rank0"][key] == pytest.approx(value, abs=1e-6), (rank, key)
        # No samples on any rank: NaN everywhere, and one warning per metric from rank 0 only.
        assert all(math.isnan(v) for v in no_data["empty"].values())
        if rank == 0:
            assert len(no_data["warnings"]) == 2 and all("no samples were passed" in w for w in no_data["warnings"])
        else:
            assert no_data["warnings"] == []


if __name__ == "__main__":
    torch.set_num_threads(1)
    run_ddp(sys.argv[1])
