"""Stochastic Weight Averaging (Izmailov et al., 2018): the equal-weight mean of weight snapshots."""

from __future__ import annotations

from torch import Tensor
from torch.optim.swa_utils import get_swa_multi_avg_fn

from .base import WeightAverager

__all__ = ["SWA"]

_swa_update = get_swa_multi_avg_fn()


class SWA(WeightAverager):
    """Equal-weight running mean of every snapshot passed to :meth:`update`.

    Uses ``torch.optim.swa_utils``' update ``w <- w + (w_new - w) / (n + 1)``; the first snapshot is
    copied, so snapshots 1, 2, 3 average to exactly 2 (not 1.75 or 2.33 as in two peer libraries).
    BatchNorm statistics are not averaged by default: recompute them with
    :func:`~lightning_ensembles.averaging.update_bn`.

    Args:
        average_buffers: also average floating-point buffers (BatchNorm statistics); off by default.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> net, swa = nn.Linear(1, 1, bias=False), SWA()
        >>> for w in (1.0, 2.0, 3.0):
        ...     _ = net.weight.data.fill_(w)
        ...     swa.update(net)
        >>> swa.average["weight"].item()
        2.0
    """

    def _combine(self, averaged: list[Tensor], current: list[Tensor]) -> None:
        _swa_update(averaged, current, self.n_averaged)
