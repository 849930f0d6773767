"""Metrics kept as float64 running sums (constant memory, summed over processes): a mean is the ratio of two sums."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric

from ._empty import NaNWhenEmpty, no_samples


def add_sums(metric: Metric, *names: str, shape: tuple[int, ...] = ()) -> None:
    """Register float64 zero states ``names`` of ``shape`` on ``metric``, summed over processes."""
    for name in names:
        metric.add_state(name, torch.zeros(shape, dtype=torch.float64), dist_reduce_fx="sum")


def ratio_or_nan(metric: Metric, total: Tensor, count: Tensor) -> Tensor:
    """``total / count`` in float32, or NaN after a :class:`NoSamplesWarning` while ``count`` is 0."""
    if not bool(count > 0):
        return no_samples(metric, count.device)
    return (total / count).float()


class PerSampleMean(NaNWhenEmpty, Metric):
    """Mean of a per-sample (or per-element) value: subclasses pass each batch's values to :meth:`_add`."""

    is_differentiable = False
    full_state_update = False

    total: Tensor
    count: Tensor

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        add_sums(self, "total", "count")

    def _add(self, values: Tensor) -> None:
        """Accumulate ``values``: one entry per sample (float64 sum, exact for counts)."""
        self.total += values.double().sum()
        self.count += values.numel()

    def compute(self) -> Tensor:
        return ratio_or_nan(self, self.total, self.count)
