"""Metrics of prediction sets (e.g. conformal sets): empirical coverage and mean set size."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric

from .._checks import check_targets
from ._empty import NaNWhenEmpty, no_samples


def _check_sets(sets: Tensor) -> None:
    if not isinstance(sets, Tensor) or sets.dim() != 2 or sets.dtype != torch.bool:
        raise ValueError("`sets` must be a boolean (B, C) tensor: sets[b, k] is True when class k is in set b.")


class _SetMetric(NaNWhenEmpty, Metric):
    is_differentiable = False
    full_state_update = False

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("total", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def compute(self) -> Tensor:
        if not bool(self.count > 0):
            return no_samples(self, self.count.device)
        return (self.total / self.count).float()


class SetCoverage(_SetMetric):
    """Fraction of samples whose prediction set contains the true class.

    Example:
        >>> import torch
        >>> m = SetCoverage()
        >>> m.update(torch.tensor([[True, False], [True, True]]), torch.tensor([1, 1]))
        >>> float(m.compute())
        0.5
    """

    higher_is_better = None

    def update(self, sets: Tensor, target: Tensor) -> None:
        _check_sets(sets)
        check_targets(target, sets.shape[0], sets.shape[1])
        self.total += sets.gather(1, target[:, None]).sum()
        self.count += target.numel()


class SetSize(_SetMetric):
    """Mean number of classes per prediction set (``target`` accepted and ignored, for a uniform call).

    Example:
        >>> import torch
        >>> m = SetSize()
        >>> m.update(torch.tensor([[True, False], [True, True]]))
        >>> float(m.compute())
        1.5
    """

    higher_is_better = False

    def update(self, sets: Tensor, target: Tensor | None = None) -> None:
        _check_sets(sets)
        self.total += sets.sum()
        self.count += sets.shape[0]
