"""Proper scoring rules of a predictive distribution: negative log-likelihood and Brier score."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric

from .._checks import as_float, check_num_classes, check_probs, check_targets
from ._empty import NaNWhenEmpty, no_samples

#: Probabilities are clamped here before the log so that a confident mistake costs ~27.6 nats, not inf.
LOG_EPS = 1e-12


class _MeanOverSamples(NaNWhenEmpty, Metric):
    is_differentiable = False
    higher_is_better = False
    full_state_update = False

    def __init__(self, num_classes: int | None = None, validate_args: bool = True, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.num_classes = num_classes
        self.validate_args = validate_args
        self.add_state("total", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def _per_sample(self, probs: Tensor, target: Tensor) -> Tensor:
        raise NotImplementedError

    def update(self, probs: Tensor, target: Tensor) -> None:
        if self.validate_args:
            check_probs(probs)
            c = check_num_classes(probs, self.num_classes)
            check_targets(target, probs.shape[0], c)
        self.total += self._per_sample(as_float(probs), target).double().sum()
        self.count += probs.shape[0]

    def compute(self) -> Tensor:
        if not bool(self.count > 0):
            return no_samples(self, self.count.device)
        return (self.total / self.count).float()


class NegativeLogLikelihood(_MeanOverSamples):
    r"""Mean negative log-likelihood ``-mean_n log p_n[y_n]`` of ``(B, C)`` probabilities.

    Probabilities are clamped at ``1e-12`` before the log (torch-uncertainty's ``CategoricalNLL``
    does not clamp and returns ``inf`` for a zero probability on the true class).

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

    Same definition as torch-uncertainty's ``BrierScore`` with ``top_class=False``.

    Example:
        >>> import torch
        >>> m = BrierScore()
        >>> m.update(torch.tensor([[.8, .2], [.3, .7]]), torch.tensor([0, 1]))
        >>> round(float(m.compute()), 4)
        0.13
    """

    def _per_sample(self, probs: Tensor, target: Tensor) -> Tensor:
        # sum_k p_k^2 - 2 p_y + 1 avoids materialising a one-hot matrix.
        return (probs.double() ** 2).sum(-1) - 2 * probs.gather(-1, target[:, None]).squeeze(-1).double() + 1
