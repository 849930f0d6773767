"""The Ensembling plug-in callback on a plain user LightningModule, and EnsembleRegressor, under DDP.

Usage: python ddp_plugin_regressor.py OUT_DIR. Trains both on 2 processes, saves a checkpoint of
each (``plugin.ckpt``, ``regressor.ckpt``) and, per rank, the metrics of a DDP ``validate`` run.
"""

from __future__ import annotations

import sys
from pathlib import Path

import lightning as L
import torch
from common import SmallDigits, floats, trainer
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).parents[1]))  # tests/, for the user_project package
from user_project.classifier import LitClassifier

from lightning_ensembles import EnsembleRegressor
from lightning_ensembles.callbacks import Ensembling


class Regression(L.LightningDataModule):
    """y = sin(3x) + noise, 256 / 128 samples (even: DDP never pads)."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        x = torch.rand(384, 1, generator=g) * 4 - 2
        y = torch.sin(3 * x[:, 0]) + 0.1 * torch.randn(384, generator=g)
        self.train, self.val = TensorDataset(x[:256], y[:256]), TensorDataset(x[256:], y[256:])

    def train_dataloader(self):
        return DataLoader(self.train, batch_size=32, shuffle=True)

    def val_dataloader(self):
        return DataLoader(self.val, batch_size=32)


def regressor() -> EnsembleRegressor:
    L.seed_everything(0, verbose=False)
    return EnsembleRegressor(
        backbone="mlp", num_members=3, lr=1e-2, backbone_kwargs={"in_features": 1, "out_features": 2, "hidden": (32,)}
    )


def plugin_model() -> LitClassifier:
    L.seed_everything(0, verbose=False)
    return LitClassifier(hidden=32)


def main(out: str) -> None:
    result = {}
    dm = SmallDigits(replicated_train=False)
    model = plugin_model()
    t = trainer(devices=2, strategy="ddp", callbacks=[Ensembling(num_members=3)])
    t.fit(model, dm)
    t.save_checkpoint(f"{out}/plugin.ckpt")
    result["plugin_val"] = floats(t.validate(model, dm, verbose=False)[0])

    reg_dm = Regression()
    model = regressor()
    t = trainer(devices=2, strategy="ddp")
    t.fit(model, reg_dm)
    t.save_checkpoint(f"{out}/regressor.ckpt")
    result["regressor_val"] = floats(t.validate(model, reg_dm, verbose=False)[0])
    torch.save(result, f"{out}/rank{t.global_rank}.pt")


if __name__ == "__main__":
    main(sys.argv[1])
