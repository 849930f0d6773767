"""Multiply-accumulates counted from a real forward pass with ``torch.utils.flop_counter.FlopCounterMode``.

Nothing here estimates: the counter records every matmul, convolution and attention op that actually
runs (FLOPs), and MACs are FLOPs / 2. Element-wise ops (activations, norms, softmax, bias adds) are
not counted by PyTorch's counter, the usual convention for MAC tables.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

__all__ = ["MacCounter", "count_macs", "macs_per_sample"]


class MacCounter:
    """Context manager that counts the MACs of everything run inside it.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> with MacCounter() as c:
        ...     _ = nn.Linear(4, 3)(torch.randn(2, 4))
        >>> c.macs  # 2 samples x 4 x 3
        24
    """

    def __init__(self) -> None:
        self._mode = FlopCounterMode(display=False)
        self.macs = 0

    def __enter__(self) -> MacCounter:
        self._mode.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._mode.__exit__(*exc)
        self.macs = int(self._mode.get_total_flops()) // 2


def count_macs(fn: nn.Module | Callable[..., Any], *inputs: Any, **kwargs: Any) -> int:
    """MACs of one call ``fn(*inputs, **kwargs)`` (no gradient), counted with ``FlopCounterMode``.

    Example:
        >>> import torch
        >>> from lightning_ensembles import MLP
        >>> count_macs(MLP(4, 2, hidden=(8,)), torch.randn(5, 4))  # 5 x (4*8 + 8*2)
        240
    """
    with torch.no_grad(), MacCounter() as counter:
        fn(*inputs, **kwargs)
    return counter.macs


def macs_per_sample(fn: nn.Module | Callable[..., Any], example: Tensor) -> float:
    """MACs per sample of ``fn`` on the batch ``example`` ``(B, ...)``: ``count_macs / B``."""
    if not isinstance(example, Tensor) or example.dim() == 0 or example.shape[0] == 0:
        raise ValueError("`example` must be a non-empty batch tensor (B, ...) to count MACs per sample.")
    return count_macs(fn, example) / example.shape[0]
