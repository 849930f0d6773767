"""Dense (segmentation-style) outputs: member logits ``(M, B, C, *spatial)``, e.g. ``(M, B, C, H, W)``.

The class axis of dense outputs is axis 1 of a sample batch (``(B, C, H, W)``, the torchvision /
segmentation convention), axis 2 of member outputs. The ensemble prediction is, per pixel, the mean of
member softmax probabilities over the class axis (:func:`aggregate_dense_probs`), as for classification.

:class:`DenseMetrics` scores every pixel as a sample with constant memory (ECE bins, NLL/Brier sums,
a ``C x C`` confusion matrix for mIoU), whatever the image size or the number of images; pixels whose
target equals ``ignore_index`` are left out. Pixel-wise ECE/NLL/Brier are the classification metrics of
:mod:`lightning_ensembles.metrics` on the ``(B * H * W, C)`` pixels.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torchmetrics import Metric

from .._checks import check_finite
from ._empty import NaNWhenEmpty, no_samples
from ._running import add_sums
from .calibration import ExpectedCalibrationError
from .presets import TopLabelAccuracy
from .scoring import BrierScore, NegativeLogLikelihood

__all__ = ["DenseMeanIoU", "DenseMetrics", "aggregate_dense_probs", "dense_member_probs", "pixels"]


def _check_dense_members(logits: Tensor) -> None:
    if not isinstance(logits, Tensor) or logits.dim() < 4:
        shape = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
        raise ValueError(
            f"dense member outputs must be (M, B, C, *spatial), e.g. (M, B, C, H, W); got {shape}. A single model's "
            "(B, C, H, W) outputs: pass `outputs.unsqueeze(0)`."
        )


def dense_member_probs(member_logits: Tensor) -> Tensor:
    """Member probabilities: softmax over the class axis (2) of ``(M, B, C, *spatial)`` logits."""
    _check_dense_members(member_logits)
    return member_logits.softmax(dim=2)


def aggregate_dense_probs(member_logits: Tensor) -> Tensor:
    """Ensemble prediction of dense outputs: mean member softmax per pixel, ``(M, B, C, *S) -> (B, C, *S)``.

    Example:
        >>> import torch
        >>> aggregate_dense_probs(torch.zeros(3, 2, 4, 5, 5)).shape
        torch.Size([2, 4, 5, 5])
    """
    return dense_member_probs(member_logits).mean(0)


def pixels(probs: Tensor, target: Tensor, ignore_index: int | None = None) -> tuple[Tensor, Tensor]:
    """``(B, C, *S)`` probabilities and ``(B, *S)`` targets as ``(N, C)`` rows and ``(N,)`` targets (ignored pixels out)."""
    if probs.dim() < 3:
        raise ValueError(f"dense probabilities must be (B, C, *spatial), got {tuple(probs.shape)}.")
    if target.shape != probs.shape[:1] + probs.shape[2:]:
        raise ValueError(
            f"dense targets must be (B, *spatial) = {tuple(probs.shape[:1] + probs.shape[2:])} class indices for "
            f"probabilities {tuple(probs.shape)}; got {tuple(target.shape)}."
        )
    rows = probs.movedim(1, -1).reshape(-1, probs.shape[1])
    flat = target.reshape(-1)
    if ignore_index is not None:
        keep = flat != ignore_index
        rows, flat = rows[keep], flat[keep]
    return rows, flat


class DenseMeanIoU(NaNWhenEmpty, Metric):
    """Mean intersection over union across classes, from a ``C x C`` confusion matrix (constant memory).

    ``IoU_c = TP_c / (TP_c + FP_c + FN_c)``; classes absent from both predictions and targets are left
    out of the mean. ``update(preds_or_probs, target)``: class indices ``(B, *S)`` or probabilities
    ``(B, C, *S)`` (argmax taken), targets ``(B, *S)``.

    Args:
        num_classes: the number of classes C; targets must lie in ``[0, C)``.
        ignore_index: a target value whose pixels are left out (e.g. 255 for unlabelled pixels).
        **kwargs: passed to ``torchmetrics.Metric`` (e.g. ``sync_on_compute``).

    Example:
        >>> import torch
        >>> m = DenseMeanIoU(num_classes=2)
        >>> m.update(torch.tensor([[0, 0, 1, 1]]), torch.tensor([[0, 1, 1, 1]]))
        >>> round(float(m.compute()), 4)  # class 0: 1/2, class 1: 2/3
        0.5833
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    confusion: Tensor

    def __init__(self, num_classes: int, ignore_index: int | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if num_classes < 1:
            raise ValueError(f"`num_classes` must be >= 1, got {num_classes}.")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        add_sums(self, "confusion", shape=(num_classes, num_classes))

    def update(self, preds: Tensor, target: Tensor) -> None:
        if preds.is_floating_point():
            preds = preds.argmax(1)
        if preds.shape != target.shape:
            raise ValueError(
                f"predictions {tuple(preds.shape)} and targets {tuple(target.shape)} must have the same shape."
            )
        p, t = preds.reshape(-1), target.reshape(-1)
        if self.ignore_index is not None:
            keep = t != self.ignore_index
            p, t = p[keep], t[keep]
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= self.num_classes):
            raise ValueError(
                f"targets must lie in [0, {self.num_classes - 1}] (or equal ignore_index={self.ignore_index}); got "
                f"values in [{int(t.min())}, {int(t.max())}]."
            )
        idx = t * self.num_classes + p
        self.confusion += torch.bincount(idx, minlength=self.num_classes**2).reshape(self.num_classes, -1).double()

    def per_class(self) -> Tensor:
        """IoU of every class ``(C,)``; NaN for classes absent from predictions and targets."""
        tp = self.confusion.diagonal()
        union = self.confusion.sum(0) + self.confusion.sum(1) - tp
        return torch.where(union > 0, tp / union.clamp_min(1), torch.full_like(tp, float("nan")))

    def compute(self) -> Tensor:
        if not bool(self.confusion.sum() > 0):
            return no_samples(self, self.confusion.device)
        return self.per_class().nanmean().float()


class _PixelAccuracy(TopLabelAccuracy):
    """Top-1 accuracy of the pixels :func:`pixels` returns (their targets are checked by :class:`DenseMeanIoU`)."""

    def update(self, rows: Tensor, target: Tensor) -> None:
        self._add(rows.argmax(-1) == target)


class DenseMetrics(nn.Module):
    """Pixel accuracy, mIoU, pixel-wise NLL / Brier / ECE of dense member logits ``(M, B, C, *S)``.

    ``update(member_logits, target (B, *S))`` (or ``update_probs(probs (B, C, *S), target)``);
    ``compute()`` returns ``{"pixel_acc", "miou", "nll", "brier", "ece"}`` of the ensemble prediction.
    Memory does not grow with the number of pixels.

    Args:
        num_classes: the number of classes C (axis 2 of member logits, axis 1 of probabilities).
        ignore_index: a target value whose pixels are left out of every metric.
        n_bins: the number of equal-width bins of the pixel-wise ECE.

    Example:
        >>> import torch
        >>> g = torch.Generator().manual_seed(0)
        >>> target = torch.randint(0, 3, (2, 8, 8), generator=g)
        >>> logits = 5 * torch.nn.functional.one_hot(target, 3).movedim(-1, 1).float()  # confident and right
        >>> m = DenseMetrics(num_classes=3)
        >>> m.update(logits.expand(4, -1, -1, -1, -1), target)
        >>> {k: round(float(v), 3) for k, v in m.compute().items()}
        {'pixel_acc': 1.0, 'miou': 1.0, 'nll': 0.013, 'brier': 0.0, 'ece': 0.013}
    """

    def __init__(self, num_classes: int, ignore_index: int | None = None, n_bins: int = 15) -> None:
        super().__init__()
        self.ignore_index = ignore_index
        self.miou = DenseMeanIoU(num_classes, ignore_index)
        self.nll = NegativeLogLikelihood(num_classes, validate_args=False)
        self.brier = BrierScore(num_classes, validate_args=False)
        self.ece = ExpectedCalibrationError(num_classes, n_bins=n_bins, validate_args=False)
        self.pixel_acc = _PixelAccuracy()

    def update(self, member_logits: Tensor, target: Tensor) -> None:
        check_finite(member_logits, "member_logits")
        self.update_probs(aggregate_dense_probs(member_logits.detach().float()), target)

    def update_probs(self, probs: Tensor, target: Tensor) -> None:
        rows, flat = pixels(probs.detach(), target, self.ignore_index)
        self.miou.update(probs.argmax(1), target)
        for metric in (self.pixel_acc, self.nll, self.brier, self.ece):
            metric.update(rows, flat)

    def compute(self) -> dict[str, Tensor]:
        return {
            "pixel_acc": self.pixel_acc.compute(),
            "miou": self.miou.compute(),
            "nll": self.nll.compute(),
            "brier": self.brier.compute(),
            "ece": self.ece.compute(),
        }

    def reset(self) -> None:
        for m in (self.pixel_acc, self.miou, self.nll, self.brier, self.ece):
            m.reset()
