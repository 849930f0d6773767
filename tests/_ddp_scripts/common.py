"""Shared pieces of the DDP test scripts: small digits data, quiet trainers, result files."""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _trainer import quiet_trainer  # noqa: E402

warnings.filterwarnings("ignore")
torch.set_num_threads(1)  # two processes share two cores

N_TRAIN, N_VAL, N_TEST, BATCH = 256, 128, 128, 32  # even sizes: DDP never pads evaluation data


def is_launcher() -> bool:
    """True in the process started by the test (rank 0 before Lightning launches rank 1)."""
    return "LOCAL_RANK" not in os.environ


class SmallDigits(L.LightningDataModule):
    """Flattened digits with fixed splits; the train loader's order is a seeded sampler of its own.

    The explicit ``DistributedSampler(num_replicas=1, rank=0, seed=0)`` gives the same order in one
    process and in member-parallel runs (Lightning leaves an existing DistributedSampler in place).
    With ``replicated_train=False`` the train loader is plain (shuffle=False), so DDP splits it.
    """

    def __init__(self, replicated_train: bool = True) -> None:
        super().__init__()
        from lightning_ensembles.data import load_digits_tensors

        x, y = load_digits_tensors()
        x = x.reshape(len(x), -1)  # already scaled to [0, 1]
        perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
        x, y = x[perm], y[perm]
        a, b, c = N_TRAIN, N_TRAIN + N_VAL, N_TRAIN + N_VAL + N_TEST
        self.train = TensorDataset(x[:a], y[:a])
        self.val = TensorDataset(x[a:b], y[a:b])
        self.test = TensorDataset(x[b:c], y[b:c])
        self.replicated_train = replicated_train

    def train_dataloader(self) -> DataLoader:
        if self.replicated_train:
            sampler = DistributedSampler(self.train, num_replicas=1, rank=0, shuffle=True, seed=0)
            return DataLoader(self.train, batch_size=BATCH, sampler=sampler)
        return DataLoader(self.train, batch_size=BATCH, shuffle=False)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val, batch_size=BATCH)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self.test, batch_size=BATCH)


def trainer(**kwargs) -> L.Trainer:
    return quiet_trainer(**{"max_epochs": 2, "num_sanity_val_steps": 0, **kwargs})


def floats(metrics: dict) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items()}
