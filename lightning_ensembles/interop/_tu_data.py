"""A torch-uncertainty data module on scikit-learn's digits, in memory (no download)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch.utils.data import DataLoader, TensorDataset

from ..data.digits import DigitsDataModule
from ._tu import tu

__all__ = ["DigitsTUDataModule"]

_TUDataModule: Any = tu("torch_uncertainty.datamodules.abstract").TUDataModule


class DigitsTUDataModule(_TUDataModule):
    """scikit-learn's 8x8 digits as a torch-uncertainty ``TUDataModule`` (every one it ships downloads data).

    Same seeded split as :class:`~lightning_ensembles.data.DigitsDataModule`. With ``eval_ood=True``
    the ``ood_classes`` are held out of train/val/test and ``test_dataloader`` returns
    ``[test, ood]``, the order torch-uncertainty's routines (``eval_ood=True``) and
    :class:`~lightning_ensembles.EnsembleClassifier` (OOD at dataloader 1) both read.
    ``postprocess_dataloader`` (what ``ClassificationRoutine`` fits its post-processing on) is the
    validation set.

    Args:
        root: the ``TUDataModule``'s data folder (the digits themselves ship with scikit-learn).
        batch_size: training batch size.
        eval_batch_size: validation/test batch size (``None``: ``batch_size``).
        eval_ood: hold out ``ood_classes`` and serve them as the OOD test set.
        ood_classes: the held-out classes.
        split: train/val/test fractions.
        seed: seed of the split.
        num_workers: dataloader worker processes.
        postprocess_set: the split torch-uncertainty fits post-processing on (``"val"``).

    Example:
        >>> dm = DigitsTUDataModule(batch_size=32, eval_ood=True)
        >>> dm.setup("fit"); dm.setup("test")
        >>> x, y = next(iter(dm.train_dataloader()))
        >>> tuple(x.shape), len(dm.test_dataloader()), int(y.max()) <= 7
        ((32, 1, 8, 8), 2, True)
    """

    training_task = "classification"
    num_classes = 10
    num_channels = 1
    input_shape = (1, 8, 8)

    def __init__(
        self,
        root: str | Path = "./data",
        batch_size: int = 64,
        eval_batch_size: int | None = None,
        eval_ood: bool = False,
        ood_classes: Sequence[int] = (8, 9),
        split: Sequence[float] = (0.6, 0.2, 0.2),
        seed: int = 0,
        num_workers: int = 0,
        postprocess_set: str = "val",
    ) -> None:
        super().__init__(
            root=root,
            batch_size=batch_size,
            eval_batch_size=eval_batch_size,
            val_split=split[1],
            num_workers=num_workers,
            pin_memory=False,
            persistent_workers=False,
            postprocess_set=postprocess_set,
        )
        self.eval_ood = eval_ood
        self.ood_classes = tuple(ood_classes) if eval_ood else ()
        if eval_ood and not self.ood_classes:
            raise ValueError("eval_ood=True needs held-out `ood_classes`, e.g. (8, 9).")
        self._digits = DigitsDataModule(split=split, seed=seed, ood_classes=self.ood_classes)
        self._splits: dict | None = None

    def setup(self, stage: str | None = None) -> None:
        if self._splits is None:
            self._splits = self._digits.build()
        self.train, self.val, self.test = (TensorDataset(*self._splits[k]) for k in ("train", "val", "test"))
        if self.eval_ood:
            self.ood = TensorDataset(*self._splits["ood"])

    def test_dataloader(self) -> list[DataLoader]:
        loaders = [self._data_loader(self.get_test_set(), training=False)]
        if self.eval_ood:
            loaders.append(self._data_loader(self.get_ood_set(), training=False))
        return loaders
