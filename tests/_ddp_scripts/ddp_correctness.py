"""EnsembleClassifier + SWA (with BatchNorm update) + temperature scaling under real DDP (2 CPU processes).

Usage: python ddp_correctness.py OUT_DIR. Every rank writes ``OUT_DIR/rank<r>.pt`` (its averaged
weights, final weights, temperature, logged metrics, predictions) and both write the final
checkpoint ``OUT_DIR/final.ckpt`` together (rank 0 saves it); the test restores it in one process.
"""

from __future__ import annotations

import sys

import lightning as L
import torch
from common import SmallDigits, floats, trainer
from torch import nn

from lightning_ensembles import EnsembleClassifier
from lightning_ensembles.callbacks.calibration_metrics import CalibrationMetrics
from lightning_ensembles.callbacks.temperature_scaling import TemperatureScaling
from lightning_ensembles.callbacks.weight_averaging import MemberWeightAveraging


def backbone() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 10))


def build() -> EnsembleClassifier:
    L.seed_everything(0, verbose=False)
    return EnsembleClassifier(backbone=backbone(), num_members=3, lr=1e-2)


def calibration_metrics() -> CalibrationMetrics:
    from lightning_ensembles.callbacks.calibration_metrics import (
        MEMBER_METRICS,
        PROB_METRICS,
    )

    return CalibrationMetrics(metrics=list(PROB_METRICS + MEMBER_METRICS))  # all of them, ACE and AURC too


def main(out: str) -> None:
    dm = SmallDigits(replicated_train=False)
    model = build()
    swa = MemberWeightAveraging("swa", attribute="ensemble", start_epoch=1)
    ts = TemperatureScaling()
    t = trainer(devices=2, strategy="ddp", max_epochs=3, callbacks=[swa, ts, calibration_metrics()])
    t.fit(model, dm)
    t.save_checkpoint(f"{out}/final.ckpt")  # collective: every rank calls it, rank 0 writes
    validated = floats(t.validate(model, dm, verbose=False)[0])  # refits T on the gathered final predictions
    tested = floats(t.test(model, dm, verbose=False)[0])
    model.eval()
    with torch.no_grad():
        x = dm.test.tensors[0]
        probs = model(x).softmax(-1).mean(0)
    torch.save(
        {
            "average": {k: v.clone() for k, v in swa.averager.state_dict()["average"].items()},
            "n_averaged": swa.averager.n_averaged,
            "weights": {k: v.clone() for k, v in model.state_dict().items()},
            "temperature": ts.temperature,
            "val": validated,
            "test": tested,
            "probs": probs,
        },
        f"{out}/rank{t.global_rank}.pt",
    )


if __name__ == "__main__":
    main(sys.argv[1])
