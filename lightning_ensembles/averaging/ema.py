"""Exponential moving average of weights (Polyak averaging with a constant decay)."""

from __future__ import annotations

from torch import Tensor
from torch.optim.swa_utils import get_ema_multi_avg_fn

from .base import WeightAverager

__all__ = ["EMA"]


class EMA(WeightAverager):
    """``w_ema <- decay * w_ema + (1 - decay) * w``, initialised to the first snapshot.

    Matches ``torch.optim.swa_utils.AveragedModel(multi_avg_fn=get_ema_multi_avg_fn(decay))``.
    Floating-point buffers (BatchNorm statistics) are averaged too by default, as is usual for EMA.

    Args:
        decay: weight of the running average at each update, in ``[0, 1)``.
        average_buffers: also average floating-point buffers (BatchNorm statistics).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> net, ema = nn.Linear(1, 1, bias=False), EMA(decay=0.5)
        >>> for w in (1.0, 3.0):
        ...     _ = net.weight.data.fill_(w)
        ...     ema.update(net)
        >>> ema.average["weight"].item()
        2.0
    """

    def __init__(self, decay: float = 0.999, average_buffers: bool = True) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"`decay` must be in [0, 1), got {decay}; typical values are 0.99-0.9999.")
        super().__init__(average_buffers=average_buffers)
        self.decay = decay
        self._update_fn = get_ema_multi_avg_fn(decay)

    def _combine(self, averaged: list[Tensor], current: list[Tensor]) -> None:
        self._update_fn(averaged, current, self.n_averaged)
