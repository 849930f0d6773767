"""BatchEnsemble (Wen et al., 2020) and TabM (Gorishniy et al., 2025) for any backbone.

Every ``Linear`` / ``Conv*`` / ``ConvTranspose*`` keeps its (possibly pretrained) weight ``W`` shared by
all members and gains per-member rank-1 factors and a per-member bias:
``y_i = ((x * r_i) W^T) * s_i + b_i``. Member ``i`` is therefore the plain layer with weight
``diag(s_i) W diag(r_i)`` and bias ``b_i``, which is what :meth:`BatchEnsemble.member` exports.

Inside the converted network the batch holds all members back to back (member-major,
``(M * B, ...)``); each rank-1 layer views it as ``(M, B, ...)``. BatchNorm layers become per-member
BatchNorms (statistics and affine per member) so that, in training, a member's batch statistics
never include another member's activations. Layers that act per example (LayerNorm, GroupNorm,
attention) are shared like ``W``. ``nn.MultiheadAttention`` is left shared and unconverted (it
reads its ``out_proj`` weight directly, so the projection cannot be wrapped).
"""

from __future__ import annotations

import copy
import fnmatch
import warnings
from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from .base import Ensemble
from .dataflow import trace_layers
from .registry import register_method
from .surgery import ConversionError, convert, replace_modules
from .verify import VerificationReport, make_probe, verify_ensemble

__all__ = ["BatchEnsemble", "TabM", "BatchEnsembleLayer", "PerMemberBatchNorm", "PerMemberLinear"]

_RANK1 = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_INITS = ("normal", "random_sign", "tabm", "ones")


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


class BatchEnsembleLayer(nn.Module):
    """Rank-1 BatchEnsemble wrapper of a ``Linear`` / ``Conv*`` / ``ConvTranspose*`` layer.

    Input and output are member-major ``(M * B, ...)``. ``layer`` keeps its weight (shared);
    ``r`` ``(M, C_in)``, ``s`` ``(M, C_out)`` and ``bias`` ``(M, C_out)`` (if the layer had a bias) are per member.

    Example:
        >>> import torch
        >>> be = BatchEnsembleLayer(nn.Linear(64, 128), num_members=4)
        >>> sum(p.numel() for p in be.parameters())
        9472
        >>> be(torch.randn(4 * 3, 64)).shape
        torch.Size([12, 128])
    """

    def __init__(self, layer: nn.Module, num_members: int, path: str = "") -> None:
        super().__init__()
        if not isinstance(layer, _RANK1):
            raise ConversionError(
                path, f"BatchEnsembleLayer supports {[c.__name__ for c in _RANK1]}, got {type(layer).__name__}."
            )
        self.num_members = num_members
        self.path = path
        self.linear = isinstance(layer, nn.Linear)
        self.transposed = isinstance(layer, nn.modules.conv._ConvTransposeNd)
        c_in = layer.in_features if self.linear else layer.in_channels
        c_out = layer.out_features if self.linear else layer.out_channels
        self.layer = layer
        bias = layer.bias
        # The per-member bias replaces the layer's own, which is removed so it is not counted twice.
        layer.bias = None
        self.r = nn.Parameter(torch.ones(num_members, c_in, device=layer.weight.device, dtype=layer.weight.dtype))
        self.s = nn.Parameter(torch.ones(num_members, c_out, device=layer.weight.device, dtype=layer.weight.dtype))
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone().expand(num_members, -1).contiguous())
        self.__dict__["_template"] = _hidden_template(layer)
        self.__dict__["_template"].bias = None if bias is None else nn.Parameter(torch.empty_like(bias, device="meta"))

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
        if self.linear:
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
        layer = copy.deepcopy(self._template).to_empty(device=self.layer.weight.device)
        with torch.no_grad():
            layer.weight.copy_(self.fused_weight(index))
            if self.bias is not None:
                layer.bias.copy_(self.bias[index])
        return layer


class PerMemberBatchNorm(nn.Module):
    """BatchNorm with statistics and affine parameters per member, on member-major ``(M * B, C, ...)``.

    Built from an existing ``BatchNorm1d/2d/3d`` (its affine and running statistics are copied to every
    member). timm's ``BatchNormAct2d`` keeps its activation and drop, applied after the normalisation.

    Example:
        >>> import torch
        >>> bn = PerMemberBatchNorm(nn.BatchNorm2d(3), num_members=2)
        >>> bn(torch.randn(2 * 4, 3, 5, 5)).shape
        torch.Size([8, 3, 5, 5])
    """

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
            self.register_buffer("num_batches_tracked", bn.num_batches_tracked.detach().clone())
        else:
            self.running_mean = self.running_var = self.num_batches_tracked = None
        # timm BatchNormAct2d = BatchNorm + drop + act; keep those (they act per element).
        self.post = nn.Sequential(*[m for n in ("drop", "act") if isinstance(m := getattr(bn, n, None), nn.Module)])
        self.__dict__["_template"] = _hidden_template(bn)

    def forward(self, x: Tensor) -> Tensor:
        xm = _member_view(x, self.num_members, self.path)  # (M, B, C, *S)
        shape = (self.num_members, 1, xm.shape[2]) + (1,) * (xm.dim() - 3)
        dims = [1] + list(range(3, xm.dim()))
        if self.training or not self.track_running_stats:
            var, mean = torch.var_mean(xm, dim=dims, unbiased=False)
            if self.training and self.track_running_stats:
                with torch.no_grad():
                    self.num_batches_tracked.add_(1)
                    mom = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
                    n = xm[0].numel() / xm.shape[2]
                    self.running_mean.lerp_(mean.detach(), mom)
                    self.running_var.lerp_(var.detach() * n / max(n - 1, 1), mom)  # unbiased, as BatchNorm
        else:
            mean, var = self.running_mean, self.running_var
        y = (xm - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.weight is not None:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return self.post(y.flatten(0, 1))

    def member_layer(self, index: int) -> nn.Module:
        """The original BatchNorm class holding member ``index``'s affine and statistics."""
        device = self.weight.device if self.weight is not None else None
        bn = copy.deepcopy(self._template).to_empty(device=device or "cpu")
        with torch.no_grad():
            if self.weight is not None:
                bn.weight.copy_(self.weight[index])
                bn.bias.copy_(self.bias[index])
            if self.track_running_stats:
                bn.running_mean.copy_(self.running_mean[index])
                bn.running_var.copy_(self.running_var[index])
                bn.num_batches_tracked.copy_(self.num_batches_tracked)
        return bn


class PerMemberLinear(nn.Module):
    """M independent ``Linear`` layers on member-major input (TabM's independent heads).

    Example:
        >>> import torch
        >>> head = PerMemberLinear(nn.Linear(8, 3), num_members=4)
        >>> head(torch.randn(4 * 2, 8)).shape
        torch.Size([8, 3])
    """

    def __init__(self, layer: nn.Linear, num_members: int, path: str = "") -> None:
        super().__init__()
        self.num_members, self.path = num_members, path
        self.weight = nn.Parameter(layer.weight.detach().clone().expand(num_members, -1, -1).contiguous())
        self.bias = (
            None
            if layer.bias is None
            else nn.Parameter(layer.bias.detach().clone().expand(num_members, -1).contiguous())
        )
        self.__dict__["_template"] = _hidden_template(layer)

    def forward(self, x: Tensor) -> Tensor:
        xm = _member_view(x, self.num_members, self.path)
        flat = xm.reshape(self.num_members, -1, xm.shape[-1])
        y = torch.bmm(flat, self.weight.transpose(1, 2))
        if self.bias is not None:
            y = y + self.bias[:, None, :]
        return y.reshape(*xm.shape[:-1], -1).flatten(0, 1)

    def member_layer(self, index: int) -> nn.Module:
        """A plain ``nn.Linear`` equal to member ``index``'s head."""
        layer = copy.deepcopy(self._template).to_empty(device=self.weight.device)
        with torch.no_grad():
            layer.weight.copy_(self.weight[index])
            if self.bias is not None:
                layer.bias.copy_(self.bias[index])
        return layer


_MEMBER_LAYERS = (BatchEnsembleLayer, PerMemberBatchNorm, PerMemberLinear)
_ADVICE = (
    "Exclude it (exclude=[path] keeps a layer plain and shared by all members), or convert it by hand so "
    "that it acts on each member's rows (the batch holds the members back to back, (M * B, ...))."
)


@register_method("batch")
class BatchEnsemble(Ensemble):
    """BatchEnsemble of any backbone: shared weights, per-member rank-1 factors, biases and BatchNorms.

    Args:
        backbone: any ``nn.Module`` (nested modules and timm models work); its weights are kept, so a
            pretrained backbone stays pretrained. The caller's module is not modified (a copy is converted).
        num_members: M.
        init: how ``r`` and ``s`` start: ``"normal"``: N(1, ``init_std``) (uncertainty-baselines /
            torch-uncertainty); ``"random_sign"``: random +-1 (the BatchEnsemble paper);
            ``"tabm"``: the first converted layer's ``r`` random +-1, every other factor 1 (TabM);
            ``"ones"``: all 1, so every member starts exactly as the backbone (members then differ
            only through their data or dropout). Per-member biases always start equal to the layer's bias.
        init_std: standard deviation for ``init="normal"``.
        batch_mode: ``"repeat"`` (default): every member sees the whole batch and ``forward`` returns
            ``(M, B, ...)``; ``"split"``: in training, member i sees the i-th of M equal chunks of the batch
            and ``forward`` returns ``(M, B // M, ...)`` (use :meth:`member_targets` on the targets).
            Evaluation always repeats.
        independent_head: give the output ``Linear`` (found from the data flow of a probe forward,
            :mod:`~lightning_ensembles.ensembles.dataflow`) fully independent per-member weights instead of
            rank-1 factors (TabM's heads).
        exclude: ``fnmatch`` patterns of layer paths kept as plain layers shared by all members. Layers
            whose forward never runs on the probe (their weight is read directly by other code, e.g.
            ``F.linear(h, self.fc.weight)``) are kept shared automatically, with a warning, and so are
            layers whose input does not depend on the batch (a relative-position MLP on a coordinate
            table); all are listed in ``shared_layers``.
        verify: after conversion, check on a probe that ``member(i)`` reproduces output ``i`` and that
            members are independent (:mod:`~lightning_ensembles.ensembles.verify`), raising
            ``ConversionError`` otherwise; ``False`` skips it (``verification.ran`` is then ``False``).
        example_input, input_shape: the probe batch, or one example's shape; inferred by default.

    ``converted`` lists the converted module paths. ``fast_parameters()`` returns the rank-1 factors
    (uncertainty-baselines trains them at half the learning rate).

    Example:
        >>> import torch
        >>> from lightning_ensembles.backbones import MLP
        >>> ens = BatchEnsemble(MLP(4, 3, hidden=(8,)), num_members=4)
        >>> ens.converted
        ['net.1', 'net.3']
        >>> ens(torch.randn(5, 4)).shape
        torch.Size([4, 5, 3])
        >>> torch.allclose(ens.member(2)(torch.ones(1, 4)), ens(torch.ones(1, 4))[2], atol=1e-6)
        True
    """

    def __init__(
        self,
        backbone: nn.Module,
        num_members: int = 4,
        init: Literal["normal", "random_sign", "tabm", "ones"] = "normal",
        init_std: float = 0.5,
        batch_mode: Literal["repeat", "split"] = "repeat",
        independent_head: bool = False,
        exclude: Sequence[str] | None = None,
        verify: bool = True,
        example_input: Tensor | None = None,
        input_shape: Sequence[int] | None = None,
    ) -> None:
        super().__init__(num_members)
        if not isinstance(backbone, nn.Module):
            raise ValueError(f"`backbone` must be an nn.Module, got {type(backbone).__name__}.")
        if init not in _INITS:
            raise ValueError(f"`init` must be one of {_INITS}, got {init!r}.")
        if batch_mode not in ("repeat", "split"):
            raise ValueError(f"`batch_mode` must be 'repeat' or 'split', got {batch_mode!r}.")
        if not (isinstance(init_std, (int, float)) and init_std >= 0):
            raise ValueError(f"`init_std` must be a number >= 0, got {init_std!r}.")
        self.init, self.init_std, self.batch_mode = init, float(init_std), batch_mode
        self.independent_head = independent_head
        m = num_members

        if not any(isinstance(mod, _RANK1) for mod in backbone.modules()):
            raise ValueError("`backbone` has no Linear or Conv layer to convert; BatchEnsemble needs at least one.")
        try:
            probe = make_probe(backbone, example_input, input_shape)
        except ValueError:
            if verify:
                raise
            probe = None  # only verification and the data-flow head need it
        flow = trace_layers(backbone, probe, _RANK1) if probe is not None else None
        patterns = list(exclude or [])
        rank1 = [p for p, mod in backbone.named_modules() if isinstance(mod, _RANK1) and _not_mha_child(backbone, p)]
        never_called = [p for p in rank1 if flow is not None and p not in flow.called]
        if never_called:
            warnings.warn(
                f"BatchEnsemble keeps {never_called[:5]} as plain layers shared by all members: their forward "
                "never runs on the probe (their weight is read directly, or they are unused).",
                stacklevel=2,
            )
        # Layers that never see the batch (a relative-position MLP on a coordinate table) stay shared, like W.
        never_called += [p for p in (flow.constant if flow else []) if p in rank1]
        self.shared_layers = [
            p for p in rank1 if p in never_called or any(fnmatch.fnmatchcase(p, pat) for pat in patterns)
        ]
        linears = [p for p in rank1 if isinstance(backbone.get_submodule(p), nn.Linear) and p not in self.shared_layers]
        head = None
        if independent_head:
            data_heads = [p for p in (flow.last if flow else []) if p in linears]
            head = data_heads[0] if len(data_heads) == 1 else (linears[-1] if linears and flow is None else None)
            if head is None:
                raise ValueError(
                    "`independent_head=True` needs a backbone with one nn.Linear output layer "
                    f"(the data flow gives {flow.last if flow else []})."
                )

        def select(path: str, mod: nn.Module) -> bool:
            if isinstance(mod, nn.MultiheadAttention) or path in self.shared_layers:
                return False
            if isinstance(mod, _BatchNorm):
                if type(mod).forward is not _BatchNorm.forward and type(mod).__name__ != "BatchNormAct2d":
                    raise ConversionError(
                        path,
                        f"{type(mod).__name__} overrides BatchNorm.forward; per-member "
                        "statistics cannot be guaranteed. Replace it by a standard BatchNorm.",
                    )
                return True
            return isinstance(mod, _RANK1)

        def build(path: str, mod: nn.Module) -> nn.Module:
            if isinstance(mod, _BatchNorm):
                return PerMemberBatchNorm(mod, m, path)
            if path == head:
                return PerMemberLinear(mod, m, path)
            return BatchEnsembleLayer(mod, m, path)

        self.model, self.converted = convert(
            backbone, lambda p, mod: _not_mha_child(backbone, p) and select(p, mod), build
        )
        if not any(isinstance(mod, (BatchEnsembleLayer, PerMemberLinear)) for mod in self.model.modules()):
            raise ValueError("`backbone` has no Linear or Conv layer to convert; BatchEnsemble needs at least one.")
        self.reset_fast_weights()
        self.train(backbone.training)  # keep the backbone's train/eval mode
        if verify:
            # split mode gives each member its own rows in training: a probe of M * B rows
            rows = probe.repeat(m, *([1] * (probe.dim() - 1))) if batch_mode == "split" else probe
            self.verification = verify_ensemble(self, rows, advice=_ADVICE)
        else:
            self.verification = VerificationReport(ran=False)

    _inner_prefix = "model."

    def member_parameter_axes(self) -> dict[str, int]:
        """Own (per-member) parameters: name in ``named_parameters()`` -> 0 (the member axis)."""
        return {f"model.{n}": 0 for n in self.stacked_parameters()}

    @torch.no_grad()
    def reset_fast_weights(self) -> None:
        """(Re-)draw ``r`` and ``s`` according to ``init``."""
        layers = [mod for mod in self.model.modules() if isinstance(mod, BatchEnsembleLayer)]
        for k, layer in enumerate(layers):
            for name in ("r", "s"):
                p = getattr(layer, name)
                if self.init == "normal":
                    p.normal_(1.0, self.init_std)
                elif self.init == "random_sign" or (self.init == "tabm" and k == 0 and name == "r"):
                    p.copy_(torch.randint(0, 2, p.shape, device=p.device).to(p.dtype) * 2 - 1)
                else:
                    p.fill_(1.0)

    def fast_parameters(self) -> list[nn.Parameter]:
        """The per-member rank-1 factors ``r`` and ``s`` of every layer (for a separate optimizer group)."""
        return [p for mod in self.model.modules() if isinstance(mod, BatchEnsembleLayer) for p in (mod.r, mod.s)]

    def forward(self, x: Tensor) -> Tensor:
        """Member outputs ``(M, B, ...)`` (``(M, B // M, ...)`` for ``batch_mode="split"`` in training)."""
        if self.training and self.batch_mode == "split":
            if x.shape[0] % self.num_members:
                raise ValueError(
                    f"batch_mode='split' needs a batch size divisible by num_members={self.num_members}, got "
                    f"{x.shape[0]}. Change the batch size or use batch_mode='repeat'."
                )
            return self.model(x).unflatten(0, (self.num_members, -1))
        xs = x.unsqueeze(0).expand(self.num_members, *x.shape).flatten(0, 1)
        return self.model(xs).unflatten(0, (self.num_members, -1))

    def stacked_parameters(self) -> dict[str, Tensor]:
        """The member-specific parameters, member axis first: ``{name: (M, ...)}``.

        Rank-1 factors ``r``, ``s`` and biases of every converted layer, per-member BatchNorm affine
        parameters and per-member heads. The shared weights ``W`` are left out: identical in every
        member, they cancel in any distance between members' full parameter vectors, so weight-space
        repulsion over these tensors equals repulsion over the members' whole weights.
        """
        out = {}
        for prefix, module in self.model.named_modules():
            if isinstance(module, (BatchEnsembleLayer, PerMemberBatchNorm, PerMemberLinear)):
                for name, p in module.named_parameters(recurse=False):
                    out[f"{prefix}.{name}" if prefix else name] = p
        return out

    def member_targets(self, target: Tensor) -> Tensor:
        """Targets matching :meth:`forward`'s member outputs: ``(M, B, ...)`` repeated, or split in training."""
        if self.training and self.batch_mode == "split":
            return target.unflatten(0, (self.num_members, -1))
        return target.unsqueeze(0).expand(self.num_members, *target.shape)

    def member(self, index: int) -> nn.Module:
        """A standalone copy of the backbone with member ``index``'s fused weights (plain layers)."""
        index = self._check_index(index)
        model = copy.deepcopy(self.model)
        replace_modules(model, lambda p, mod: isinstance(mod, _MEMBER_LAYERS), lambda p, mod: mod.member_layer(index))
        model.train(self.training)
        return model

    def extra_repr(self) -> str:
        return f"num_members={self.num_members}, init={self.init!r}, batch_mode={self.batch_mode!r}, converted={len(self.converted)} layers"


def _inside_mha(model: nn.Module, path: str) -> bool:
    parts = path.split(".")
    return any(
        isinstance(model.get_submodule(".".join(parts[:k])), nn.MultiheadAttention) for k in range(1, len(parts))
    )


def _not_mha_child(model: nn.Module, path: str) -> bool:
    return not path or not _inside_mha(model, path)


class TabM(BatchEnsemble):
    """TabM preset: an MLP for tabular data with BatchEnsemble layers and M independent heads.

    Every hidden ``Linear`` is rank-1 (only the first layer's ``r`` starts random, +-1; all else 1),
    the output layer is independent per member, dropout after each block. Defaults follow the paper
    (32 members, 3 blocks of 512, dropout 0.1; train with AdamW lr 2e-3, weight decay 3e-4).

    Example:
        >>> import torch
        >>> tabm = TabM(in_features=6, out_features=2, num_members=8, hidden_features=16, num_blocks=2)
        >>> tabm(torch.randn(5, 6)).shape
        torch.Size([8, 5, 2])
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        num_members: int = 32,
        hidden_features: int = 512,
        num_blocks: int = 3,
        dropout: float = 0.1,
        batch_mode: Literal["repeat", "split"] = "repeat",
    ) -> None:
        from ..backbones import MLP

        if num_blocks < 1:
            raise ValueError(f"`num_blocks` must be >= 1, got {num_blocks}.")
        mlp = MLP(in_features, out_features, hidden=(hidden_features,) * num_blocks, dropout=dropout)
        super().__init__(mlp, num_members=num_members, init="tabm", batch_mode=batch_mode, independent_head=True)


@register_method("tabm")
def tabm(
    backbone: nn.Module, num_members: int = 32, batch_mode: Literal["repeat", "split"] = "repeat"
) -> BatchEnsemble:
    """TabM-style conversion of a given MLP backbone (TabM init, independent heads)."""
    return BatchEnsemble(backbone, num_members, init="tabm", batch_mode=batch_mode, independent_head=True)
