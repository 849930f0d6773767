"""Proper scoring rules of a predictive distribution: negative log-likelihood and Brier score."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from .._checks import as_float, check_probs_targets
from ._running import PerSampleMean

#: Probabilities are clamped here before the log so that a confident mistake costs ~27.6 nats, not inf.
LOG_EPS = 1e-12


class _MeanOverSamples(PerSampleMean):
    higher_is_better = False

    def __init__(self, num_classes: int | None = None, validate_args: bool = True, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.num_classes = num_classes
        self.validate_args = validate_args

    def _per_sample(self, probs: Tensor, target: Tensor) -> Tensor:
        raise NotImplementedError

    def update(self, probs: Tensor, target: Tensor) -> None:
        if self.validate_args:
            check_probs_targets(probs, target, self.num_classes)
        self._add(self._per_sample(as_float(probs), target))


class NegativeLogLikelihood(_MeanOverSamples):
    r"""Mean negative log-likelihood ``-mean_n log p_n[y_n]`` of ``(B, C)`` probabilities.

    Probabilities are clamped at ``1e-12`` before the log (torch-uncertainty's ``CategoricalNLL``
    does not clamp and returns ``inf`` for a zero probability on the true class).

    Args:
        num_classes: C, checked against the last axis of ``probs`` when given (default: any).
        validate_args: check that ``probs`` are probabilities and ``target`` class indices (two passes over
            the inputs); ``False`` skips the checks.
        **kwargs: passed to ``torchmetrics.Metric`` (e.g. ``sync_on_compute``).

    Example:
        >>> import torch
        >>> m = NegativeLogLikelihood()
        >>> m.update(torch.tensor([[.7, .3], [.4, .6]]), torch.tensor([0, 1]))
        >>> round(float(m.compute()), 4)
        0.4338
    """

    def _per_sample(self, probs: Tensor, target: Tensor) -> Tensor:
        return -probs.gather(-1, target[:, None]).squeeze(-1).double().clamp_min(LOG_EPS).log()


class BrierScore(_MeanOverSamples):
    r"""Multiclass Brier score ``mean_n sum_k (p_nk - 1[y_n = k])^2`` (no 1/2, not divided by C).

    Same definition as torch-uncertainty's ``BrierScore`` with ``top_class=False``. Ranges from 0 (certain
    and right) to 2 (certain and wrong).

    Args:
        num_classes: the number of classes C, or ``None`` to take it from each batch.
        validate_args: ``False`` skips the input checks of ``update``.
        **kwargs: torchmetrics ``Metric`` options.

    Example:
        >>> import torch
        >>> brier = BrierScore(num_classes=2)
        >>> brier.update(torch.tensor([[.8, .2], [.3, .7]]), torch.tensor([0, 1]))
        >>> round(float(brier.compute()), 4)
        0.13
    """

    def _per_sample(self, probs: Tensor, target: Tensor) -> Tensor:
        # sum_k p_k^2 - 2 p_y + 1 avoids materialising a one-hot matrix.
        return (probs.double() ** 2).sum(-1) - 2 * probs.gather(-1, target[:, None]).squeeze(-1).double() + 1
