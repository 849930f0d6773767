"""W-Asymmetric networks (Lim et al., 2024), as studied for deep ensembles and MoE in "The Empirical Impact
of Reducing Symmetries on the Performance of Deep Ensembles and MoE".

In every converted ``Linear``/``Conv`` a fixed random subset of ``num_fixed`` weights per output unit
(per row of the weight viewed as ``(C_out, fan_in)``) is frozen at non-zero values drawn from
``N(0, scale^2)``. Two hidden units then differ in which inputs they cannot adapt, so permuting them no
longer leaves the function unchanged: the permutation symmetry of the hidden units is broken. The
other weights are trained as usual (and keep the backbone's values on conversion).

The fixed entries are buffers (``fixed_mask``, ``fixed_values``); the layer computes with
``where(fixed_mask, fixed_values, weight)``, so the trainable tensor keeps its name and shape and its
fixed entries get no gradient. Following the authors' code, members of an ensemble share the masks and
values by default (``shared_masks=True``); their free weights are initialised independently.
"""

from __future__ import annotations

import copy
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.conv import _ConvNd

from .deep import DeepEnsemble
from .registry import register_method
from .surgery import ConversionError, match_paths, replace_modules

__all__ = ["WAsymmetricLayer", "w_asymmetric", "asymmetric_ensemble"]

_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


class WAsymmetricLayer(nn.Module):
    """A ``Linear``/``Conv`` whose ``num_fixed`` weights per output unit are frozen at random non-zero values.

    Example:
        >>> import torch
        >>> layer = WAsymmetricLayer(nn.Linear(16, 4), num_fixed=3, generator=torch.Generator().manual_seed(0))
        >>> layer.fixed_mask.sum(1).tolist()
        [3, 3, 3, 3]
        >>> layer(torch.randn(2, 16)).shape
        torch.Size([2, 4])

    Args:
        layer: the ``nn.Linear`` or ``nn.Conv1d/2d/3d`` to convert (taken over; its weights are kept).
        num_fixed: weights per output unit frozen (below the fan-in).
        scale: standard deviation of the fixed values.
        generator: random source of the fixed positions and values (a fresh seed by default).
        path: the layer's path in the model, named by errors.
    """

    fixed_mask: Tensor  # registered buffer, the weight's shape
    fixed_values: Tensor  # registered buffer, the weight's shape

    def __init__(
        self,
        layer: nn.Module,
        num_fixed: int,
        scale: float = 1.0,
        generator: torch.Generator | None = None,
        path: str = "",
    ) -> None:
        super().__init__()
        if not isinstance(layer, _LAYERS) or isinstance(layer, nn.modules.conv._ConvTransposeNd):
            raise ConversionError(
                path, f"W-Asymmetric converts nn.Linear and nn.Conv1d/2d/3d, got {type(layer).__name__}."
            )
        w = layer.weight
        rows, fan_in = w.shape[0], w[0].numel()
        if num_fixed >= fan_in:
            raise ConversionError(
                path,
                f"fan-in {fan_in} leaves no trainable weight with num_fixed={num_fixed} per "
                "unit; lower num_fixed or leave this layer out with `layers=[...]`.",
            )
        gen = generator or torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, ())))
        cols = torch.stack([torch.randperm(fan_in, generator=gen)[:num_fixed] for _ in range(rows)])
        mask = torch.zeros(rows, fan_in, dtype=torch.bool).scatter_(1, cols, True)
        values = torch.randn(rows, fan_in, generator=gen) * scale * mask
        self.layer = layer
        self.register_buffer("fixed_mask", mask.view_as(w).to(w.device))
        self.register_buffer("fixed_values", values.view_as(w).to(device=w.device, dtype=w.dtype))

    def effective_weight(self) -> Tensor:
        """The weight the layer computes with: fixed entries from ``fixed_values``, the rest trained."""
        return torch.where(self.fixed_mask, self.fixed_values.to(self.layer.weight.dtype), self.layer.weight)

    def forward(self, x: Tensor) -> Tensor:
        w = self.effective_weight()
        if isinstance(self.layer, nn.Linear):
            return F.linear(x, w, self.layer.bias)
        assert isinstance(self.layer, _ConvNd)
        return self.layer._conv_forward(x, w, self.layer.bias)


def w_asymmetric(
    backbone: nn.Module,
    num_fixed: int = 6,
    scale: float = 1.0,
    layers: list[str] | None = None,
    seed: int | None = None,
) -> nn.Module:
    """A W-Asymmetric copy of ``backbone``: every ``Linear``/``Conv`` (or those ``layers`` patterns select) converted.

    ``num_fixed`` weights per output unit are frozen at ``N(0, scale^2)`` values (the authors' MLP code fixes 6
    per unit with scale 1). The free weights keep the backbone's values. A layer whose fan-in is not above
    ``num_fixed`` is refused with a :class:`ConversionError` naming it.

    Example:
        >>> from lightning_ensembles.backbones import MLP
        >>> net = w_asymmetric(MLP(16, 3, hidden=(32,)), num_fixed=4, seed=0)
        >>> type(net.net[1]).__name__, int(net.net[3].fixed_mask.sum())
        ('WAsymmetricLayer', 12)
    """
    if not isinstance(num_fixed, int) or num_fixed < 1:
        raise ValueError(f"`num_fixed` must be an integer >= 1, got {num_fixed!r}.")
    if not scale > 0:
        raise ValueError(f"`scale` must be > 0 (fixed weights must be non-zero), got {scale!r}.")
    names = [p for p, m in backbone.named_modules() if isinstance(m, _LAYERS)]
    if layers is None:
        targets = names
    else:
        targets = match_paths(names, layers, "layers", what="Linear/Conv layer")
    if not targets:
        raise ConversionError("", "the backbone has no nn.Linear or nn.Conv layer to make W-Asymmetric.")
    gen = torch.Generator().manual_seed(seed if seed is not None else int(torch.randint(0, 2**31 - 1, ())))
    model = copy.deepcopy(backbone)
    replace_modules(model, lambda p, m: p in targets, lambda p, m: WAsymmetricLayer(m, num_fixed, scale, gen, p))
    return model


@register_method("asymmetric")
def asymmetric_ensemble(
    backbone: nn.Module | str,
    num_members: int = 4,
    num_fixed: int = 6,
    scale: float = 1.0,
    layers: list[str] | None = None,
    shared_masks: bool = True,
    init: Literal["reinit", "copy"] = "reinit",
    seed: int | None = None,
    storage: Literal["auto", "stacked", "per_member"] = "auto",
    backbone_kwargs: dict[str, Any] | None = None,
) -> DeepEnsemble:
    """A :class:`DeepEnsemble` of W-Asymmetric members (see :func:`w_asymmetric`).

    ``shared_masks=True`` (the authors' setting) gives every member the same fixed entries; ``False``
    draws them per member (member ``i`` from ``seed + i``). ``init`` as for :class:`DeepEnsemble`:
    ``"reinit"`` draws every member's free weights anew. ``backbone`` may be a name, built with ``backbone_kwargs``.

    Example:
        >>> import torch
        >>> from lightning_ensembles.backbones import MLP
        >>> ens = asymmetric_ensemble(MLP(16, 3, hidden=(32,)), num_members=3, num_fixed=4, seed=0)
        >>> ens(torch.randn(5, 16)).shape
        torch.Size([3, 5, 3])
    """
    backbone = DeepEnsemble.build_backbone(backbone, backbone_kwargs)
    seed = seed if seed is not None else int(torch.randint(0, 2**31 - 1, ()))
    ens = DeepEnsemble(
        w_asymmetric(backbone, num_fixed, scale, layers, seed), num_members=num_members, init=init, storage=storage
    )
    if not shared_masks:
        stacked = ens.stacked_buffers()
        with torch.no_grad():
            for i in range(1, num_members):
                member = w_asymmetric(backbone, num_fixed, scale, layers, seed + i)
                for name, buf in member.named_buffers():
                    if name.endswith(("fixed_mask", "fixed_values")):
                        stacked[name][i].copy_(buf)
    return ens
