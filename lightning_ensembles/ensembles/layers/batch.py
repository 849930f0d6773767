"""BatchEnsemble layers on member-major batches ``(M * B, ...)``: rank-1 wrappers, per-member BatchNorm and heads.

Built by :class:`~lightning_ensembles.ensembles.batch.BatchEnsemble`'s converter; usable on their own.
"""

from __future__ import annotations

import copy
from typing import Any, cast

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd, _ConvTransposeNd

from ..surgery import ConversionError, set_unregistered

__all__ = ["BatchEnsembleLayer", "PerMemberBatchNorm", "PerMemberLinear"]

_RANK1 = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


def _member_view(x: Tensor, num_members: int, path: str) -> Tensor:
    if x.shape[0] % num_members:
        raise ValueError(
            f"BatchEnsemble layer {path!r} got a batch of {x.shape[0]} rows, not a multiple of num_members="
            f"{num_members}. Call the BatchEnsemble itself (it repeats the batch per member), not its inner model."
        )
    return x.unflatten(0, (num_members, -1))


def _hidden_template(module: nn.Module) -> nn.Module:
    # A data-free copy of the original layer, used to rebuild a plain layer in member(); kept out of
    # the module tree (meta tensors are not parameters of the ensemble).
    return copy.deepcopy(module).to("meta")


def _materialised(template: nn.Module, device: torch.device | str, weight: Tensor, bias: Tensor | None) -> nn.Module:
    """A real copy of the meta ``template`` on ``device`` holding ``weight`` (and ``bias`` if not ``None``)."""
    layer = copy.deepcopy(template).to_empty(device=device)
    with torch.no_grad():
        cast(Tensor, layer.weight).copy_(weight)
        if bias is not None:
            cast(Tensor, layer.bias).copy_(bias)
    return layer


class BatchEnsembleLayer(nn.Module):
    """Rank-1 BatchEnsemble wrapper of a ``Linear`` / ``Conv*`` / ``ConvTranspose*`` layer.

    Input and output are member-major ``(M * B, ...)``. ``layer`` keeps its weight (shared);
    ``r`` ``(M, C_in)``, ``s`` ``(M, C_out)`` and ``bias`` ``(M, C_out)`` (if the layer had a bias) are per member.

    Args:
        layer: the layer to wrap (taken over: its bias moves into the per-member ``bias``).
        num_members: M.
        path: the layer's path in the converted model, named by errors.

    Example:
        >>> import torch
        >>> be = BatchEnsembleLayer(nn.Linear(64, 128), num_members=4)
        >>> sum(p.numel() for p in be.parameters())
        9472
        >>> be(torch.randn(4 * 3, 64)).shape
        torch.Size([12, 128])
    """

    layer: nn.Linear | _ConvNd
    r: nn.Parameter
    s: nn.Parameter
    bias: nn.Parameter | None
    _template: nn.Module  # the original layer on the meta device (outside the module tree)

    def __init__(self, layer: nn.Module, num_members: int, path: str = "") -> None:
        super().__init__()
        if not isinstance(layer, _RANK1):
            raise ConversionError(
                path, f"BatchEnsembleLayer supports {[c.__name__ for c in _RANK1]}, got {type(layer).__name__}."
            )
        self.num_members = num_members
        self.path = path
        self.linear = isinstance(layer, nn.Linear)
        self.transposed = isinstance(layer, _ConvTransposeNd)
        if isinstance(layer, nn.Linear):
            c_in, c_out = layer.in_features, layer.out_features
        else:
            c_in, c_out = layer.in_channels, layer.out_channels
        self.layer = layer
        bias = layer.bias
        # The per-member bias replaces the layer's own, which is removed so it is not counted twice.
        layer.register_parameter("bias", None)
        self.r = nn.Parameter(torch.ones(num_members, c_in, device=layer.weight.device, dtype=layer.weight.dtype))
        self.s = nn.Parameter(torch.ones(num_members, c_out, device=layer.weight.device, dtype=layer.weight.dtype))
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone().expand(num_members, -1).contiguous())
        template = _hidden_template(layer)
        if bias is not None:
            template.register_parameter("bias", nn.Parameter(torch.empty_like(bias, device="meta")))
        set_unregistered(self, "_template", template)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "weight":
                raise AttributeError(
                    f"{self.path!r} was converted to a BatchEnsembleLayer, which has no single `weight`: code that reads "
                    "`.weight` directly (e.g. F.linear(h, layer.weight)) bypasses the per-member factors. Call the layer, "
                    f"or pass exclude=[{self.path!r}] to keep it a plain layer shared by all members."
                ) from None
            raise

    def _shape(self, v: Tensor, ndim: int) -> Tensor:
        # (M, C) -> broadcastable against (M, B, ...): channels last for Linear, at axis 2 for convs.
        if self.linear:
            return v.view(v.shape[0], *([1] * (ndim - 2)), v.shape[1])
        return v.view(v.shape[0], 1, v.shape[1], *([1] * (ndim - 3)))

    def forward(self, x: Tensor) -> Tensor:
        xm = _member_view(x, self.num_members, self.path)
        y = self.layer((xm * self._shape(self.r, xm.dim())).flatten(0, 1))
        ym = y.unflatten(0, (self.num_members, -1))
        ym = ym * self._shape(self.s, ym.dim())
        if self.bias is not None:
            ym = ym + self._shape(self.bias, ym.dim())
        return ym.flatten(0, 1)

    @torch.no_grad()
    def fused_weight(self, index: int) -> Tensor:
        """The plain layer weight of member ``index``: ``diag(s_i) W diag(r_i)`` in the layer's layout."""
        w, r, s = self.layer.weight, self.r[index], self.s[index]
        if isinstance(self.layer, nn.Linear):
            return s[:, None] * w * r[None, :]
        g = self.layer.groups
        rest = [1] * (w.dim() - 2)
        if not self.transposed:  # weight (C_out, C_in / g, k...): output o reads input channels of its group
            out_pg, in_pg = w.shape[0] // g, w.shape[1]
            idx = (torch.arange(w.shape[0], device=w.device) // out_pg)[:, None] * in_pg + torch.arange(
                in_pg, device=w.device
            )
            return w * s.view(-1, 1, *rest) * r[idx].view(*idx.shape, *rest)
        in_pg, out_pg = w.shape[0] // g, w.shape[1]  # weight (C_in, C_out / g, k...)
        idx = (torch.arange(w.shape[0], device=w.device) // in_pg)[:, None] * out_pg + torch.arange(
            out_pg, device=w.device
        )
        return w * r.view(-1, 1, *rest) * s[idx].view(*idx.shape, *rest)

    def member_layer(self, index: int) -> nn.Module:
        """A plain layer (the original class) computing member ``index``."""
        bias = None if self.bias is None else self.bias[index]
        return _materialised(self._template, self.layer.weight.device, self.fused_weight(index), bias)


class PerMemberBatchNorm(nn.Module):
    """BatchNorm with statistics and affine parameters per member, on member-major ``(M * B, C, ...)``.

    Built from an existing ``BatchNorm1d/2d/3d`` (its affine and running statistics are copied to every
    member). timm's ``BatchNormAct2d`` keeps its activation and drop, applied after the normalisation.

    Example:
        >>> import torch
        >>> bn = PerMemberBatchNorm(nn.BatchNorm2d(3), num_members=2)
        >>> bn(torch.randn(2 * 4, 3, 5, 5)).shape
        torch.Size([8, 3, 5, 5])

    Args:
        bn: the BatchNorm whose affine parameters and statistics every member starts from.
        num_members: M.
        path: the layer's path in the converted model, named by errors.
    """

    weight: nn.Parameter | None
    bias: nn.Parameter | None
    running_mean: Tensor | None
    running_var: Tensor | None
    num_batches_tracked: Tensor | None
    _template: nn.Module  # the original BatchNorm on the meta device (outside the module tree)

    def __init__(self, bn: _BatchNorm, num_members: int, path: str = "") -> None:
        super().__init__()
        self.num_members, self.path = num_members, path
        self.eps, self.momentum = bn.eps, bn.momentum
        self.track_running_stats = bn.track_running_stats
        dev = bn.weight.device if bn.weight is not None else None

        def per_member(t: Tensor | None, fill: float) -> Tensor:
            base = t.detach() if t is not None else torch.full((bn.num_features,), fill, device=dev)
            return base.clone().expand(num_members, -1).contiguous()

        if bn.affine:
            self.weight = nn.Parameter(per_member(bn.weight, 1.0))
            self.bias = nn.Parameter(per_member(bn.bias, 0.0))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        if bn.track_running_stats:
            self.register_buffer("running_mean", per_member(bn.running_mean, 0.0))
            self.register_buffer("running_var", per_member(bn.running_var, 1.0))
            self.register_buffer("num_batches_tracked", cast(Tensor, bn.num_batches_tracked).detach().clone())
        else:
            self.running_mean = self.running_var = self.num_batches_tracked = None
        # timm BatchNormAct2d = BatchNorm + drop + act; keep those (they act per element).
        self.post = nn.Sequential(*[m for n in ("drop", "act") if isinstance(m := getattr(bn, n, None), nn.Module)])
        set_unregistered(self, "_template", _hidden_template(bn))

    def forward(self, x: Tensor) -> Tensor:
        xm = _member_view(x, self.num_members, self.path)  # (M, B, C, *S)
        shape = (self.num_members, 1, xm.shape[2]) + (1,) * (xm.dim() - 3)
        dims = [1] + list(range(3, xm.dim()))
        stats = self._running_stats()
        if self.training or stats is None:
            var, mean = torch.var_mean(xm, dim=dims, unbiased=False)
            if self.training and stats is not None:
                running_mean, running_var, tracked = stats
                with torch.no_grad():
                    tracked.add_(1)
                    mom = 1.0 / float(tracked) if self.momentum is None else self.momentum
                    n = xm[0].numel() / xm.shape[2]
                    running_mean.lerp_(mean.detach(), mom)
                    running_var.lerp_(var.detach() * n / max(n - 1, 1), mom)  # unbiased, as BatchNorm
        else:
            mean, var = stats[0], stats[1]
        y = (xm - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.weight is not None and self.bias is not None:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return self.post(y.flatten(0, 1))

    def _running_stats(self) -> tuple[Tensor, Tensor, Tensor] | None:
        """``(running_mean, running_var, num_batches_tracked)``, or ``None`` without ``track_running_stats``."""
        if not self.track_running_stats:
            return None
        return cast(Tensor, self.running_mean), cast(Tensor, self.running_var), cast(Tensor, self.num_batches_tracked)

    def member_layer(self, index: int) -> nn.Module:
        """The original BatchNorm class holding member ``index``'s affine and statistics."""
        device = self.weight.device if self.weight is not None else None
        bn = cast(_BatchNorm, copy.deepcopy(self._template).to_empty(device=device or "cpu"))
        stats = self._running_stats()
        with torch.no_grad():
            if self.weight is not None and self.bias is not None:
                bn.weight.copy_(self.weight[index])
                bn.bias.copy_(self.bias[index])
            if stats is not None:
                cast(Tensor, bn.running_mean).copy_(stats[0][index])
                cast(Tensor, bn.running_var).copy_(stats[1][index])
                cast(Tensor, bn.num_batches_tracked).copy_(stats[2])
        return bn


class PerMemberLinear(nn.Module):
    """M independent ``Linear`` layers on member-major input (TabM's independent heads).

    Example:
        >>> import torch
        >>> head = PerMemberLinear(nn.Linear(8, 3), num_members=4)
        >>> head(torch.randn(4 * 2, 8)).shape
        torch.Size([8, 3])

    Args:
        layer: the ``nn.Linear`` every member's head starts from (its weights are copied to each).
        num_members: M.
        path: the layer's path in the converted model, named by errors.
    """

    weight: nn.Parameter
    bias: nn.Parameter | None
    _template: nn.Module  # the original Linear on the meta device (outside the module tree)

    def __init__(self, layer: nn.Linear, num_members: int, path: str = "") -> None:
        super().__init__()
        self.num_members, self.path = num_members, path
        self.weight = nn.Parameter(layer.weight.detach().clone().expand(num_members, -1, -1).contiguous())
        self.bias = (
            None
            if layer.bias is None
            else nn.Parameter(layer.bias.detach().clone().expand(num_members, -1).contiguous())
        )
        set_unregistered(self, "_template", _hidden_template(layer))

    def forward(self, x: Tensor) -> Tensor:
        xm = _member_view(x, self.num_members, self.path)
        flat = xm.reshape(self.num_members, -1, xm.shape[-1])
        y = torch.bmm(flat, self.weight.transpose(1, 2))
        if self.bias is not None:
            y = y + self.bias[:, None, :]
        return y.reshape(*xm.shape[:-1], -1).flatten(0, 1)

    def member_layer(self, index: int) -> nn.Module:
        """A plain ``nn.Linear`` equal to member ``index``'s head."""
        bias = None if self.bias is None else self.bias[index]
        return _materialised(self._template, self.weight.device, self.weight[index], bias)
