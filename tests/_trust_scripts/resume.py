"""Train on a shipped datamodule, optionally SIGKILL mid-epoch, optionally resume from last.ckpt.

python resume.py DATA DIR full            # uninterrupted run, writes DIR/result.pt
python resume.py DATA DIR kill EPOCH      # killed at batch 2 of EPOCH (after last.ckpt of EPOCH - 1)
python resume.py DATA DIR resume          # fresh process: fit(ckpt_path=DIR/last.ckpt), writes DIR/result.pt
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _trainer import quiet_trainer  # noqa: E402

from lightning_ensembles import EnsembleClassifier, EnsembleRegressor
from lightning_ensembles.data import DigitsDataModule, MNIST1DDataModule, ToyRegressionDataModule

MAX_EPOCHS = 3


def build(data: str):
    # Dropout makes the global RNG matter too, not only the data order.
    if data == "digits":
        kw = {"in_features": 64, "out_features": 10, "hidden": [32], "dropout": 0.2}
        return EnsembleClassifier(backbone="mlp", num_members=2, backbone_kwargs=kw), DigitsDataModule(batch_size=64)
    if data == "mnist1d":
        kw = {"in_features": 40, "out_features": 10, "hidden": [32], "dropout": 0.2}
        return (
            EnsembleClassifier(backbone="mlp", num_members=2, backbone_kwargs=kw),
            MNIST1DDataModule(batch_size=64, num_samples=1200),
        )
    kw = {"in_features": 1, "out_features": 2, "hidden": [32], "dropout": 0.2}
    return EnsembleRegressor(backbone="mlp", num_members=2, backbone_kwargs=kw), ToyRegressionDataModule(num_train=256)


class KillAt(Callback):
    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.current_epoch == self.epoch and batch_idx == 2:
            os.kill(os.getpid(), signal.SIGKILL)


def main(data: str, out: Path, mode: str, *rest: str) -> None:
    torch.set_num_threads(1)
    L.seed_everything(0)
    module, dm = build(data)
    callbacks = [ModelCheckpoint(dirpath=out, save_last=True)]
    if mode == "kill":
        callbacks.append(KillAt(int(rest[0])))
    trainer = quiet_trainer(max_epochs=MAX_EPOCHS, enable_checkpointing=True, deterministic=True, callbacks=callbacks)
    ckpt = str(out / "last.ckpt") if mode == "resume" else None
    trainer.fit(module, dm, ckpt_path=ckpt, weights_only=True)
    metrics = trainer.test(module, dm, verbose=False)[0]
    torch.save({"state": module.state_dict(), "metrics": metrics}, out / "result.pt")


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]), *sys.argv[3:])
