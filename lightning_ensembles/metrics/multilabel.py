"""Multilabel (sigmoid) outputs: member logits ``(M, B, L)``, one independent binary label per column.

The ensemble prediction is the mean of member **sigmoid** probabilities per label
(:func:`aggregate_sigmoid`), the multilabel counterpart of averaging softmax probabilities.
Targets are ``(B, L)`` 0/1. Metrics keep per-label sums only (constant memory, DDP-synced):

- :class:`MultilabelCalibrationError`: per label, equal-width bins on ``p_l`` compare the mean ``p_l``
  with the frequency of ``y_l = 1`` (the binary ECE of each label); ``reduction="mean"`` averages the
  labels, ``"none"`` returns all ``L``;
- :class:`MultilabelMetrics`: label accuracy (Hamming), exact-match accuracy, binary NLL and Brier
  (both summed over labels, averaged over samples), per-label ECE (mean and per label).
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn
from torchmetrics import Metric

from .._checks import check_finite
from ._empty import NaNWhenEmpty, no_samples
from ._running import add_sums
from .calibration import _ColumnwiseCalibration

__all__ = ["MultilabelCalibrationError", "MultilabelMetrics", "aggregate_sigmoid"]

#: Probabilities are clamped here before the log (a confident mistake costs ~27.6 nats, not inf).
LOG_EPS = 1e-12


def aggregate_sigmoid(member_logits: Tensor) -> Tensor:
    """Mean member sigmoid probability per label: ``(M, B, L) -> (B, L)``.

    Example:
        >>> import torch
        >>> aggregate_sigmoid(torch.tensor([[[0.0, 100.0]], [[0.0, -100.0]]]))
        tensor([[0.5000, 0.5000]])
    """
    if not isinstance(member_logits, Tensor) or member_logits.dim() < 3:
        raise ValueError(
            "multilabel member outputs must be (M, B, L) with the member axis first; got "
            f"{tuple(member_logits.shape) if isinstance(member_logits, Tensor) else type(member_logits).__name__}."
        )
    return member_logits.sigmoid().mean(0)


def _check(probs: Tensor, target: Tensor, num_labels: int) -> Tensor:
    if probs.dim() != 2 or probs.shape[-1] != num_labels:
        raise ValueError(f"multilabel probabilities must be (B, {num_labels}), got {tuple(probs.shape)}.")
    if target.shape != probs.shape:
        raise ValueError(
            f"multilabel targets must be (B, L) 0/1 of shape {tuple(probs.shape)}, got {tuple(target.shape)}."
        )
    check_finite(probs, "probs")
    if probs.numel() and (float(probs.min()) < 0 or float(probs.max()) > 1):
        raise ValueError(
            "multilabel probabilities must lie in [0, 1]: pass `logits.sigmoid()` (or member logits to "
            "MultilabelMetrics.update)."
        )
    if target.numel() and not bool(((target == 0) | (target == 1)).all()):
        raise ValueError("multilabel targets must be 0/1 per label.")
    return target.double()


class MultilabelCalibrationError(_ColumnwiseCalibration):
    """Per-label binary ECE of multilabel probabilities ``(B, L)`` against 0/1 targets ``(B, L)``.

    Args:
        num_labels: the number of labels L (columns of ``probs`` and ``target``).
        n_bins: equal-width bins per label on [0, 1].
        reduction: ``"mean"`` (default) averages the per-label errors, ``"none"`` returns all ``L``.
        **kwargs: passed to ``torchmetrics.Metric`` (e.g. ``sync_on_compute``).

    Example:
        >>> import torch
        >>> m = MultilabelCalibrationError(num_labels=2, n_bins=10, reduction="none")
        >>> m.update(torch.tensor([[0.9, 0.2], [0.9, 0.2]]), torch.tensor([[1, 0], [0, 0]]))
        >>> [round(v, 3) for v in m.compute().tolist()]  # label 0: |0.5 - 0.9|, label 1: |0 - 0.2|
        [0.4, 0.2]
    """

    _plot_labels = ("predicted probability p_l (every label l)", "frequency of y_l = 1", "label-wise ")

    def __init__(self, num_labels: int, n_bins: int = 15, reduction: str = "mean", **kwargs: Any) -> None:
        if num_labels < 1 or n_bins < 1:
            raise ValueError(f"`num_labels` and `n_bins` must be >= 1, got {num_labels} and {n_bins}.")
        super().__init__(num_labels, n_bins, "l1", reduction, **kwargs)
        self.num_labels = num_labels

    def update(self, probs: Tensor, target: Tensor) -> None:
        y = _check(probs, target, self.num_labels)
        self._add_bins(probs.detach().double(), y)


class _LabelSums(NaNWhenEmpty, Metric):
    is_differentiable = False
    full_state_update = False

    label_correct: Tensor
    exact: Tensor
    nll: Tensor
    brier: Tensor
    count: Tensor

    def __init__(self, num_labels: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.num_labels = num_labels
        add_sums(self, "label_correct", "exact", "nll", "brier", "count")

    def update(self, probs: Tensor, target: Tensor) -> None:
        y = _check(probs, target, self.num_labels)
        p = probs.detach().double()
        correct = (p >= 0.5).double() == y
        self.label_correct += correct.double().mean(-1).sum()
        self.exact += correct.all(-1).double().sum()
        nll = -(y * p.clamp_min(LOG_EPS).log() + (1 - y) * (1 - p).clamp_min(LOG_EPS).log())
        self.nll += nll.sum()
        self.brier += ((p - y) ** 2).sum()
        self.count += p.shape[0]

    def compute(self) -> dict[str, Tensor]:
        if not bool(self.count > 0):
            nan = no_samples(self, self.count.device)
            return {k: nan for k in ("label_acc", "exact_match", "nll", "brier")}
        n = self.count
        return {
            "label_acc": (self.label_correct / n).float(),
            "exact_match": (self.exact / n).float(),
            "nll": (self.nll / n).float(),
            "brier": (self.brier / n).float(),
        }


class MultilabelMetrics(nn.Module):
    """Label accuracy, exact match, binary NLL / Brier (summed over labels) and per-label ECE of multilabel outputs.

    ``update(member_logits (M, B, L), target (B, L))`` scores the ensemble (mean member sigmoid);
    ``update_probs(probs (B, L), target)`` scores given probabilities. ``compute()`` returns
    ``{"label_acc", "exact_match", "nll", "brier", "ece", "ece/<l>"...}``.

    Args:
        num_labels: the number of labels L (last axis of the outputs and targets).
        n_bins: the number of equal-width bins of each label's ECE.

    Example:
        >>> import torch
        >>> m = MultilabelMetrics(num_labels=2)
        >>> m.update(torch.tensor([[[4.0, -4.0]], [[2.0, -2.0]]]), torch.tensor([[1, 0]]))
        >>> out = m.compute()
        >>> float(out["exact_match"]), round(float(out["nll"]), 4)  # -2 log(mean(sigmoid(4), sigmoid(2)))
        (1.0, 0.1421)
    """

    def __init__(self, num_labels: int, n_bins: int = 15) -> None:
        super().__init__()
        self.sums = _LabelSums(num_labels)
        self.ece = MultilabelCalibrationError(num_labels, n_bins, reduction="none")

    def update(self, member_logits: Tensor, target: Tensor) -> None:
        check_finite(member_logits, "member_logits")
        self.update_probs(aggregate_sigmoid(member_logits.detach().float()), target)

    def update_probs(self, probs: Tensor, target: Tensor) -> None:
        self.sums.update(probs, target)
        self.ece.update(probs, target)

    def compute(self) -> dict[str, Tensor]:
        out = dict(self.sums.compute())
        per_label = self.ece.compute()
        out["ece"] = per_label.mean()
        out.update({f"ece/{i}": v for i, v in enumerate(per_label.reshape(-1))} if per_label.dim() else {})
        return out

    def reset(self) -> None:
        self.sums.reset()
        self.ece.reset()
