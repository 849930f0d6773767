"""Recompute BatchNorm statistics after averaging, per member of any ensemble."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = ["update_bn", "has_batchnorm"]


def has_batchnorm(model: nn.Module) -> bool:
    """Whether ``model`` (including DeepEnsemble members) has BatchNorm layers with running statistics."""
    return any(isinstance(m, _BatchNorm) and m.track_running_stats for m in model.modules())


@torch.no_grad()
def update_bn(loader: Iterable[Any], model: nn.Module, device: torch.device | str | None = None) -> None:
    """Recompute BatchNorm running statistics with one pass over ``loader``, per member.

    Same result as ``torch.optim.swa_utils.update_bn`` (equal-weight average of the batch
    statistics), also for DeepEnsemble members run under ``vmap``: each member's statistics come
    from its own activations. Instead of ``momentum=None`` (which
    reads ``num_batches_tracked`` as a Python number and so cannot run under ``vmap``) the momentum
    of batch ``t`` is set to ``1 / (t + 1)``, which gives the same cumulative mean.

    Each batch is a tensor, or a tuple/list whose first element is the input.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
        >>> update_bn([torch.randn(8, 3) + 5.0], net)
        >>> net[1].num_batches_tracked.item()
        1
    """
    layers = [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]
    if not layers:
        return
    for bn in layers:
        bn.reset_running_stats()
    momenta = {bn: bn.momentum for bn in layers}
    was_training = model.training
    model.train()
    try:
        for t, batch in enumerate(loader):
            x = batch[0] if isinstance(batch, (list, tuple)) else batch
            if device is not None:
                x = x.to(device)
            for bn in layers:
                bn.momentum = 1.0 / (t + 1)
            model(x)
    finally:
        for bn, mom in momenta.items():
            bn.momentum = mom
        model.train(was_training)
