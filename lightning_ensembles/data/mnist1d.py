"""MNIST-1D from the ``mnist1d`` package's procedural generator (never its download path)."""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

import torch

from ._tensor_dm import TensorDataModule, seeded_split


@lru_cache(maxsize=4)
def generate_mnist1d(num_samples: int = 5000, seed: int = 42) -> tuple[torch.Tensor, torch.Tensor]:
    """Generate MNIST-1D procedurally: ``(N, 1, 40)`` float signals and ``(N,)`` labels."""
    from .._optional import require

    data = require("mnist1d.data", "data", "MNIST1DDataModule")
    get_dataset_args, make_dataset = data.get_dataset_args, data.make_dataset
    args = get_dataset_args()
    args.num_samples = num_samples
    args.seed = seed
    d = make_dataset(args)
    x = torch.cat([torch.tensor(d["x"]), torch.tensor(d["x_test"])]).float().unsqueeze(1)
    y = torch.cat([torch.tensor(d["y"]), torch.tensor(d["y_test"])]).long()
    return x, y


class MNIST1DDataModule(TensorDataModule):
    """MNIST-1D (Greydanus, 2020), generated on the fly: 10 classes of 40-sample 1-D signals.

    Example:
        >>> dm = MNIST1DDataModule(num_samples=500, batch_size=16)
        >>> dm.setup()
        >>> tuple(next(iter(dm.train_dataloader()))[0].shape)
        (16, 1, 40)
    """

    num_classes = 10

    def __init__(
        self,
        batch_size: int = 64,
        num_samples: int = 5000,
        split: Sequence[float] = (0.7, 0.1, 0.2),
        seed: int = 0,
        generator_seed: int = 42,
        num_workers: int = 0,
        shuffle_seed: int | None = None,
    ) -> None:
        super().__init__(batch_size, num_workers, shuffle_seed)
        self.save_hyperparameters()
        self.num_samples = num_samples
        self.split = tuple(split)
        self.seed = seed
        self.generator_seed = generator_seed

    def build(self):
        x, y = generate_mnist1d(self.num_samples, self.generator_seed)
        tr, va, te = seeded_split(len(y), self.split, self.seed)
        return {"train": (x[tr], y[tr]), "val": (x[va], y[va]), "test": (x[te], y[te])}
