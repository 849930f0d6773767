"""A torchmetrics ``Metric`` fed in batches, as the metric test files feed theirs."""

from __future__ import annotations

import numpy as np


def run(metric, *args, batches=1) -> float:
    """Update ``metric`` with ``args`` cut into ``batches`` contiguous batches along the sample axis (axis 1 of 3-D
    member tensors, axis 0 otherwise), then return ``float(metric.compute())``."""
    n = args[0].shape[-2] if args[0].dim() == 3 else args[0].shape[0]
    bounds = np.linspace(0, n, batches + 1).astype(int)
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        metric.update(*[a[:, lo:hi] if a.dim() == 3 else a[lo:hi] for a in args])
    return float(metric.compute())
