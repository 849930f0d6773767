"""Re-initialise every parameter of a built model, including tensors no layer owns."""

from __future__ import annotations

import inspect

import torch
from torch import nn

__all__ = ["reinitialize"]


def _is_constant(t: torch.Tensor) -> bool:
    flat = t.detach().flatten()
    return bool((flat == flat[0]).all()) if flat.numel() else True


def _call_model_initialiser(model: nn.Module) -> bool:
    """Call the model's own whole-model initialiser if it has one (timm's convention)."""
    init_weights = getattr(model, "init_weights", None)
    if callable(init_weights):
        params = [
            p for p in inspect.signature(init_weights).parameters.values() if p.default is inspect.Parameter.empty
        ]
        if not params:
            init_weights()
            return True
    per_module = getattr(model, "_init_weights", None)
    if callable(per_module):
        required = [
            p for p in inspect.signature(per_module).parameters.values() if p.default is inspect.Parameter.empty
        ]
        if len(required) == 1:
            model.apply(per_module)
            return True
    return False


@torch.no_grad()
def reinitialize(model: nn.Module) -> list[str]:
    """Re-draw every random parameter of ``model`` in place; return the names re-drawn by moment matching.

    Order: every submodule's ``reset_parameters()`` (PyTorch layers), then the model's own
    initialiser where it has one (``init_weights()``, as timm models do, or a per-module
    ``_init_weights``), which overrides the layer defaults. Any parameter that is still bit-for-bit
    unchanged and is not constant (for example a ``cls_token`` or ``pos_embed`` of a model without an
    initialiser method) is re-drawn from a normal distribution with the tensor's own mean and standard
    deviation; those names are returned so the caller can report them. Constant tensors (LayerNorm
    weights, zero biases) stay as they are. BatchNorm running statistics are reset by the layers.
    """
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    for module in model.modules():
        reset = getattr(module, "reset_parameters", None)
        if callable(reset):
            reset()
    _call_model_initialiser(model)
    redrawn = []
    for name, p in model.named_parameters():
        old = before[name]
        if p.numel() > 1 and torch.equal(p, old) and not _is_constant(old):
            std = old.float().std().item()
            p.normal_(old.float().mean().item(), std if std > 0 else 1.0)
            redrawn.append(name)
    return redrawn
