"""Shared plumbing for the offline datamodules: tensors in, seeded split, plain DataLoaders out."""

from __future__ import annotations

import torch
from lightning import LightningDataModule
from torch import Tensor
from torch.utils.data import DataLoader, RandomSampler, TensorDataset


def seeded_split(n: int, fractions: tuple[float, float, float], seed: int) -> tuple[Tensor, Tensor, Tensor]:
    """Indices of a fixed train/val/test split of ``n`` items (same for every process and run)."""
    if len(fractions) != 3 or any(f < 0 for f in fractions) or abs(sum(fractions) - 1) > 1e-6:
        raise ValueError(f"`split` must be three non-negative fractions summing to 1, got {fractions}.")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_train = int(round(fractions[0] * n))
    n_val = int(round(fractions[1] * n))
    return perm[:n_train], perm[n_train : n_train + n_val], perm[n_train + n_val :]


class EpochSeededSampler(RandomSampler):
    """A random permutation per epoch drawn from ``(seed, epoch)`` alone, not from the global RNG.

    Lightning calls ``set_epoch`` before every training epoch and does not restore the global RNG on
    resume; a sampler that draws from the global RNG would replay epoch 0's order after a resume.
    This one gives epoch ``e`` the same order in an interrupted-and-resumed run as in an uninterrupted
    one. It is a ``RandomSampler``, so under DDP Lightning swaps in its own ``DistributedSampler``
    (also seeded by seed and epoch).

    Args:
        data_source: the dataset to sample.
        seed: with the epoch (``set_epoch``), the only source of the order.

    Example:
        >>> s = EpochSeededSampler(range(5), seed=3)
        >>> s.set_epoch(1); a = list(s); s.set_epoch(1); a == list(s)
        True
    """

    def __init__(self, data_source, seed: int) -> None:
        super().__init__(data_source)
        self.seed = int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        yield from torch.randperm(len(self.data_source), generator=g).tolist()


class TensorDataModule(LightningDataModule):
    """A datamodule over in-memory tensors; subclasses implement ``build() -> dict of split tensors``.

    The training order is a function of ``shuffle_seed`` and the epoch (:class:`EpochSeededSampler`),
    so a run resumed from a checkpoint sees the same batches as one that never stopped. ``None`` takes
    ``torch.initial_seed()`` (the seed of ``seed_everything``); the seed in use is saved in checkpoints.

    Args:
        batch_size: batch size of every dataloader.
        num_workers: dataloader worker processes.
        shuffle_seed: seed of the training order (``None``: ``torch.initial_seed()``).
    """

    def __init__(self, batch_size: int = 64, num_workers: int = 0, shuffle_seed: int | None = None) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"`batch_size` must be >= 1, got {batch_size}.")
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.shuffle_seed = shuffle_seed
        self.splits: dict[str, TensorDataset] = {}

    def _shuffle_seed(self) -> int:
        if self.shuffle_seed is None:
            self.shuffle_seed = int(torch.initial_seed()) % (2**31)
        return self.shuffle_seed

    def state_dict(self) -> dict[str, int]:
        # Saved in every checkpoint by Lightning and restored before the dataloaders are built.
        return {"shuffle_seed": self._shuffle_seed()}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        if "shuffle_seed" in state_dict:
            self.shuffle_seed = int(state_dict["shuffle_seed"])

    def build(self) -> dict[str, tuple[Tensor, Tensor]]:  # pragma: no cover - abstract
        raise NotImplementedError

    def setup(self, stage: str | None = None) -> None:
        if not self.splits:
            self.splits = {k: TensorDataset(*v) for k, v in self.build().items()}

    def _loader(self, split: str, shuffle: bool = False) -> DataLoader:
        self.setup()
        data = self.splits[split]
        sampler = EpochSeededSampler(data, self._shuffle_seed()) if shuffle else None
        # Its own generator: a DataLoader draws a base seed from the global RNG at every `iter()`, which
        # would make the global RNG (dropout masks) depend on when Lightning builds iterators on resume.
        generator = torch.Generator().manual_seed(self._shuffle_seed())
        return DataLoader(
            data, batch_size=self.batch_size, sampler=sampler, num_workers=self.num_workers, generator=generator
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")

    def predict_dataloader(self) -> DataLoader:
        return self._loader("test")
