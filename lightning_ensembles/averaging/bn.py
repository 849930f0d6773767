"""Recompute BatchNorm statistics after averaging, per member of any ensemble."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = ["update_bn", "has_batchnorm"]


def _hidden_batchnorms(model: nn.Module) -> list[tuple[_BatchNorm, list[Tensor]]]:
    """BatchNorm layers of DeepEnsemble templates, with their stacked (per-member) buffers.

    A DeepEnsemble runs its members through a data-less template that is not part of the module
    tree, so ``torch.optim.swa_utils.update_bn`` does not see its BatchNorm layers. Its running
    statistics live in stacked buffers ``(M, C)``: resetting those resets every member at once.
    """
    from ..ensembles.deep import DeepEnsemble

    found = []
    for ens in (m for m in model.modules() if isinstance(m, DeepEnsemble)):
        stacked = ens.stacked_buffers()
        for prefix, bn in ens.template.named_modules():
            if isinstance(bn, _BatchNorm) and bn.track_running_stats:
                dot = f"{prefix}." if prefix else ""
                bufs = [
                    stacked[dot + k]
                    for k in ("running_mean", "running_var", "num_batches_tracked")
                    if dot + k in stacked
                ]
                found.append((bn, bufs))
    return found


def has_batchnorm(model: nn.Module) -> bool:
    """Whether ``model`` (including DeepEnsemble members) has BatchNorm layers with running statistics."""
    plain = any(isinstance(m, _BatchNorm) and m.track_running_stats for m in model.modules())
    return plain or bool(_hidden_batchnorms(model))


@torch.no_grad()
def update_bn(loader: Iterable[Any], model: nn.Module, device: torch.device | str | None = None) -> None:
    """Recompute BatchNorm running statistics with one pass over ``loader``, per member.

    Same result as ``torch.optim.swa_utils.update_bn`` (equal-weight average of the batch
    statistics), also for DeepEnsemble members, whose BatchNorm layers run on stacked buffers:
    each member's statistics come from its own activations. Instead of ``momentum=None`` (which
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
    plain = [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]
    hidden = _hidden_batchnorms(model)
    if not plain and not hidden:
        return
    for bn in plain:
        bn.reset_running_stats()
    for _, bufs in hidden:
        for b in bufs:
            if b.is_floating_point():
                b.fill_(1.0 if b is bufs[1] else 0.0)  # running_mean = 0, running_var = 1
            else:
                b.zero_()
    layers = plain + [bn for bn, _ in hidden]
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
