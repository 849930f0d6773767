"""Metrics of prediction sets (e.g. conformal sets): empirical coverage and mean set size."""

from __future__ import annotations

import torch
from torch import Tensor

from .._checks import check_targets
from ._running import PerSampleMean


def _check_sets(sets: Tensor) -> None:
    if not isinstance(sets, Tensor) or sets.dim() != 2 or sets.dtype != torch.bool:
        raise ValueError("`sets` must be a boolean (B, C) tensor: sets[b, k] is True when class k is in set b.")


class SetCoverage(PerSampleMean):
    """Fraction of samples whose prediction set contains the true class.

    ``update(sets, target)``: ``sets`` a boolean ``(B, C)`` tensor, ``sets[b, k]`` True when class ``k`` is
    in set ``b``; ``target`` ``(B,)`` class indices.

    Args:
        **kwargs: torchmetrics ``Metric`` options (e.g. ``sync_on_compute``).

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
        self._add(sets.gather(1, target[:, None]))


class SetSize(PerSampleMean):
    """Mean number of classes per prediction set (``target`` accepted and ignored, for a uniform call).

    Args:
        **kwargs: options of ``torchmetrics.Metric``.

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
        self._add(sets.sum(-1))
