"""scikit-learn's bundled 8x8 handwritten digits (no download)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ._tensor_dm import TensorDataModule, seeded_split


def load_digits_tensors() -> tuple[torch.Tensor, torch.Tensor]:
    """All 1,797 digits as ``(N, 1, 8, 8)`` floats in [0, 1] and ``(N,)`` int64 labels."""
    from .._optional import require

    d = require("sklearn.datasets", "data", "DigitsDataModule").load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    return x, torch.tensor(d.target, dtype=torch.long)


class DigitsDataModule(TensorDataModule):
    """Digits as 1x8x8 images with a fixed seeded train/val/test split.

    ``ood_classes`` removes those classes from train/val/test and serves them as a second test
    dataloader (out-of-distribution set), so ``trainer.test`` reports OOD detection too.

    Args:
        batch_size: batch size of every dataloader.
        split: train/val/test fractions.
        seed: seed of the split.
        ood_classes: classes held out and served as a second (OOD) test dataloader.
        num_workers: dataloader worker processes.
        shuffle_seed: seed of the training order (``None``: ``torch.initial_seed()``).

    Example:
        >>> dm = DigitsDataModule(batch_size=32)
        >>> dm.setup()
        >>> x, y = next(iter(dm.train_dataloader()))
        >>> tuple(x.shape), len(dm.splits["train"]) + len(dm.splits["val"]) + len(dm.splits["test"])
        ((32, 1, 8, 8), 1797)
    """

    num_classes = 10

    def __init__(
        self,
        batch_size: int = 64,
        split: Sequence[float] = (0.6, 0.2, 0.2),
        seed: int = 0,
        ood_classes: Sequence[int] = (),
        num_workers: int = 0,
        shuffle_seed: int | None = None,
    ) -> None:
        super().__init__(batch_size, num_workers, shuffle_seed)
        self.save_hyperparameters()
        self.split = tuple(split)
        self.seed = seed
        self.ood_classes = tuple(ood_classes)
        if any(not 0 <= c < 10 for c in self.ood_classes):
            raise ValueError(f"`ood_classes` must be digits 0-9, got {self.ood_classes}.")

    def build(self):
        x, y = load_digits_tensors()
        tr, va, te = seeded_split(len(y), self.split, self.seed)
        out = {"train": (x[tr], y[tr]), "val": (x[va], y[va]), "test": (x[te], y[te])}
        if self.ood_classes:
            # OOD test set: the held-out classes from the test split only; drop them everywhere else.
            is_ood = torch.isin(y, torch.tensor(self.ood_classes))
            held_out = torch.tensor(self.ood_classes)
            out = {k: (xs[~torch.isin(ys, held_out)], ys[~torch.isin(ys, held_out)]) for k, (xs, ys) in out.items()}
            te_ood = te[is_ood[te]]
            out["ood"] = (x[te_ood], y[te_ood])
        return out

    def test_dataloader(self):
        if self.ood_classes:
            return [self._loader("test"), self._loader("ood")]
        return self._loader("test")
