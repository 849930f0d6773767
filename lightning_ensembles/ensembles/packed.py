"""Packed-Ensembles (Laurent et al., ICLR 2023) by conversion of any backbone.

Every tensor inside the converted network carries the M members side by side on its channel axis:
a width ``C`` of the backbone becomes ``M * w(C)`` with ``w(C) = ceil(alpha * C / M)`` channels per
member, member ``i`` owning the contiguous block ``[i * w(C), (i + 1) * w(C))``. Layers are replaced by
block-diagonal (grouped) versions so no member reads another's channels:

* the **first** ``Linear``/``Conv`` (first in registration order, or ``first_layer``) is dense from the
  shared input to ``M * w(C_out)`` channels;
* hidden ``Linear``/``Conv``/``ConvTranspose`` get ``M * gamma * groups`` groups (depthwise convs stay
  per channel); the **last** one (``last_layer``) gives ``M * C_out`` outputs, returned as ``(M, B, ...)``;
* ``BatchNorm*`` (per channel, hence per member), ``GroupNorm`` (``M * G`` groups), ``LayerNorm`` and
  timm ``LayerNorm2d`` (normalised within each member's block), ``nn.MultiheadAttention`` and timm's
  ``Attention`` (attention within each member) are converted; tensors owned by no layer (``cls_token``,
  ``pos_embed``, layer scales) are packed along their channel axis (the last axis longer than 1).

Design decisions (torch-uncertainty's packed layers are not reused: they cannot be built from
existing weights, rearrange to ``(M * B, ...)`` instead of the member-first contract, and silently
reduce ``gamma``):

* non-divisible widths: each member gets ``ceil(alpha * C / M)`` channels (padding to a multiple of M);
* ``gamma`` is applied exactly, or a ``ConversionError`` names the layer whose per-member width it does
  not divide. ``min_channels_per_group > 0`` applies torch-uncertainty's rule instead (lower gamma while a
  group would have fewer channels), recorded in ``gamma_reductions`` and warned about;
* initialisation: with ``alpha == M`` and ``gamma == 1`` each member has exactly the backbone's
  shapes; ``init="copy"`` starts every member from the backbone's weights (pretrained weights survive),
  ``init="reinit"`` re-initialises M copies with the model's own initialiser. For other ``alpha`` or
  ``gamma`` members are narrower or sparser than the backbone, so ``Linear``/``Conv`` weights are drawn by
  PyTorch's default initialiser for the packed shape, norm layers start at weight 1 / bias 0 / fresh
  statistics, and free tensors are the backbone's values tiled or truncated to the member width.
"""

from __future__ import annotations

import contextlib
import copy
import fnmatch
import inspect
import math
import os
import warnings
from collections.abc import Sequence
from typing import Any, Callable, Literal, cast

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd
from torch.overrides import TorchFunctionMode

from .._checks import check_choice, check_positive_int
from .base import Ensemble
from .dataflow import clear_caches, trace_layers
from .layers.packed import GroupedLinear, PackedAttention, PackedLayerNorm, PackedMultiheadAttention
from .registry import register_method
from .reinit import reinitialize
from .surgery import ConversionError, leaf_parameter_owners, set_submodule, set_unregistered
from .verify import VerificationReport, call_site, make_probe, run_named, verify_ensemble

_CONVERT_ADVICE = (
    "If this module reads a converted layer's weight directly (e.g. F.linear(h, self.fc.weight)) or "
    "assumes the backbone's channel count, convert it by hand or keep it out of the backbone."
)

__all__ = [
    "PackedEnsemble",
    "ChannelOpsModule",
    "GroupedLinear",
    "PackedLayerNorm",
    "PackedMultiheadAttention",
    "PackedAttention",
]

# Leaf modules owning parameters that are packed along their last axis like free tensors.
_FREE_PARAM_LEAVES = {"LayerScale", "LayerScale2d"}
# Known modules that mix channels across members; refused with the reason.
_REFUSED = {
    "MixerBlock": "its token-mixing MLP is a Linear over the token axis whose weights are shared by all channels",
    "ChannelShuffle": "it permutes channels across groups, so members would read each other's channels",
}


def _is_layernorm2d(module: nn.Module) -> bool:
    return any(c.__name__ in ("LayerNorm2d", "LayerNormAct2d") for c in type(module).__mro__)


def _splits_heads(module: nn.Module) -> bool:
    """An attention module whose forward splits heads with ``self.num_heads`` (read from its source)."""
    if not isinstance(getattr(module, "num_heads", None), int) or isinstance(module, nn.MultiheadAttention):
        return False
    try:
        return "self.num_heads" in inspect.getsource(type(module).forward)
    except (OSError, TypeError):
        return False


def _is_timm_attention(module: nn.Module) -> bool:
    # timm's own ``Attention`` (exactly its forward): other classes named "Attention" compute differently.
    try:
        from timm.layers import Attention
    except ImportError:  # timm is optional
        return False
    return isinstance(module, Attention) and type(module).forward is Attention.forward


# ---------------------------------------------------------------------------------------------------------
# Channel operations of the backbone's own code (torch.cat, split, chunk, narrow, slicing) on packed tensors.
#
# Packed tensors hold member i's channels in the i-th contiguous block of the member axis. Code written for
# the backbone concatenates, splits and slices that axis with the backbone's widths. A ``TorchFunctionMode``
# rewrites those calls per member: ``torch.cat`` concatenates member by member (so each member's blocks stay
# contiguous), ``split``/``chunk``/``narrow``/slices split or slice each member's block with the widths
# scaled to the member width. Which call sites touch the member axis is learnt once, at conversion, by
# running the backbone and the packed model side by side on the probe: a call whose tensor differs from the
# backbone's on the operated axis operates on the member axis. Sites never seen on the probe run unchanged
# (and are therefore not covered by the verification either).
_INTERCEPT = {
    "cat": "cat",
    "concat": "cat",
    "concatenate": "cat",
    "split": "split",
    "chunk": "chunk",
    "narrow": "narrow",
    "__getitem__": "getitem",
}


def _parse(kind: str, args: tuple, kwargs: dict) -> tuple[Any, Any, int]:
    """(tensor or tensors, argument, dim) of an intercepted call."""
    if kind == "cat":
        tensors = args[0] if args else kwargs["tensors"]
        dim = args[1] if len(args) > 1 else kwargs.get("dim", kwargs.get("axis", 0))
        return list(tensors), None, dim
    if kind in ("split", "chunk"):
        x = args[0] if args else kwargs.get("tensor", kwargs.get("input", kwargs.get("self")))
        arg = (
            args[1]
            if len(args) > 1
            else kwargs.get("split_size_or_sections", kwargs.get("split_size", kwargs.get("chunks")))
        )
        dim = args[2] if len(args) > 2 else kwargs.get("dim", 0)
        return x, arg, dim
    if kind == "narrow":
        x = args[0] if args else kwargs["input"]
        rest = list(args[1:]) + [kwargs[k] for k in ("dim", "start", "length") if k in kwargs]
        return x, (rest[1], rest[2]), rest[0]
    return args[0], args[1], -1  # getitem: the dim is found from the index


def _basic_index(idx: Any, ndim: int) -> list | None:
    """Index as one entry per dim (slices, ints, integer tensors), or None if it uses anything else."""
    idx = list(idx) if isinstance(idx, tuple) else [idx]
    if any(
        not (isinstance(i, (slice, int)) or i is Ellipsis or (isinstance(i, Tensor) and not i.dtype == torch.bool))
        or isinstance(i, bool)
        for i in idx
    ):
        return None
    if any(
        isinstance(i, slice) and not all(v is None or isinstance(v, int) for v in (i.start, i.stop, i.step))
        for i in idx
    ):
        return None
    if Ellipsis in idx:
        k = idx.index(Ellipsis)
        idx = idx[:k] + [slice(None)] * (ndim - len(idx) + 1) + idx[k + 1 :]
    return idx + [slice(None)] * (ndim - len(idx))


def _scale(v: int, c: int, w: int, where: str) -> int:
    if (v * w) % c:
        raise ConversionError(
            where,
            f"a channel offset/size {v} of the backbone's {c} channels does not scale to a "
            f"whole number of the member's {w} channels; choose alpha so that alpha * C / M == C "
            "(alpha == num_members) or convert this operation by hand.",
        )
    return v * w // c


class _ChannelOps(TorchFunctionMode):
    """Record (backbone), learn (packed model on the probe) or apply (runtime) per-member channel operations."""

    def __init__(
        self, num_members: int, rules: dict | None = None, reference: list | None = None, record: bool = False
    ) -> None:
        super().__init__()
        self.m, self.rules = num_members, rules if rules is not None else {}
        self.reference, self.record = reference, record
        self.log: list = []

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        kwargs = kwargs or {}
        kind = _INTERCEPT.get(getattr(func, "__name__", ""))
        if kind is None or (kind == "getitem" and not isinstance(args[0], Tensor)):
            return func(*args, **kwargs)
        fname, line, internal = call_site()
        if internal:
            return func(*args, **kwargs)
        key = (fname, line, kind)
        where = f"{kind} at {os.path.basename(fname)}:{line}"
        if self.record:
            x, _, _ = _parse(kind, args, kwargs)
            self.log.append((key, [tuple(t.shape) for t in x] if kind == "cat" else tuple(x.shape)))
            return func(*args, **kwargs)
        if self.reference is not None:
            self._learn(self.reference, key, where, kind, args, kwargs)
        rule = self.rules.get(key)
        if rule is None:
            return func(*args, **kwargs)
        return self._apply(rule, where, kind, func, args, kwargs)

    # ---------------------------------------------------------------- learning on the probe
    def _learn(self, reference: list, key: tuple, where: str, kind: str, args: tuple, kwargs: dict) -> None:
        k = len(self.log)
        if k >= len(reference) or reference[k][0] != key:
            raise ConversionError(
                where,
                "the packed model's channel operations do not follow the backbone's (the "
                "control flow depends on the channel widths); convert this model by hand.",
            )
        ref = reference[k][1]
        self.log.append(key)
        x, arg, dim = _parse(kind, args, kwargs)
        rule: tuple[Any, ...]
        if kind == "cat":
            d = dim % x[0].dim()
            member = [t.shape[d] != r[d] for t, r in zip(x, ref)]
            if not any(member):
                rule = ("plain",)
            elif not all(member):
                raise ConversionError(
                    where,
                    "torch.cat joins packed (per-member) channels with unpacked ones; the "
                    "unpacked tensor would have to be copied into each member. Convert by hand.",
                )
            else:
                if any(t.shape[d] % self.m for t in x):
                    raise ConversionError(
                        where, f"torch.cat on a packed axis whose size is not a multiple of M={self.m}."
                    )
                rule = ("cat", d)
        else:
            if x.dim() != len(ref):
                raise ConversionError(
                    where, f"tensor has {x.dim()} dims in the packed model, {len(ref)} in the backbone."
                )
            diff = [i for i in range(x.dim()) if x.shape[i] != ref[i]]
            if kind == "getitem":
                idx = _basic_index(arg, x.dim())
                touched = [i for i in diff if idx is None or not (isinstance(idx[i], slice) and idx[i] == slice(None))]
                if not touched:
                    rule = ("plain",)
                elif (
                    idx is None
                    or len(diff) != 1
                    or not isinstance(idx[diff[0]], slice)
                    or any(isinstance(i, Tensor) for i in idx)
                ):
                    raise ConversionError(
                        where,
                        f"indexing {arg!r} selects along the packed channel axis in a way that "
                        "cannot be applied per member (only plain slices can). Convert by hand.",
                    )
                else:
                    rule = ("getitem", diff[0], {x.shape[diff[0]] // self.m: ref[diff[0]]})
            else:
                d = dim % x.dim()
                if d not in diff:
                    rule = ("plain",)
                elif x.shape[d] % self.m:
                    raise ConversionError(where, f"packed axis of size {x.shape[d]} is not a multiple of M={self.m}.")
                else:
                    rule = (kind, d, {x.shape[d] // self.m: ref[d]})
        old = self.rules.get(key)
        if old is not None and old[:2] != rule[:2]:
            raise ConversionError(
                where,
                "this call site operates on the packed channel axis in one call and on another "
                "axis in another; it cannot be rewritten per member. Convert by hand.",
            )
        if old is not None and len(rule) > 2:
            rule[2].update(old[2])
        self.rules[key] = rule
        if rule[0] != "plain":
            self._apply(rule, where, kind, None, args, kwargs, dry=True)

    # ---------------------------------------------------------------- per-member rewrite
    def _apply(
        self, rule: tuple, where: str, kind: str, func: Any, args: tuple, kwargs: dict, dry: bool = False
    ) -> Any:
        if rule[0] == "plain":
            return func(*args, **kwargs)
        m, d = self.m, rule[1]
        x, arg, dim = _parse(kind, args, kwargs)
        if kind == "cat":
            if m == 1:
                return None if dry else torch.cat(x, d)
            return None if dry else torch.cat([t.unflatten(d, (m, -1)) for t in x], d + 1).flatten(d, d + 1)
        w = x.shape[d] // m
        c = rule[2].get(w)
        if c is None or x.shape[d] % m:
            raise ConversionError(
                where,
                f"packed channel axis of size {x.shape[d]} was not seen at conversion for this "
                f"call site (seen member widths: {sorted(rule[2])}).",
            )
        xm = x.unflatten(d, (m, w))
        if kind == "split":
            sizes = [arg] * (c // arg) + ([c % arg] if c % arg else []) if isinstance(arg, int) else list(arg)
            per = [_scale(s, c, w, where) for s in sizes]
            return None if dry else tuple(p.flatten(d, d + 1) for p in xm.split(per, d + 1))
        if kind == "chunk":
            if c % arg or w % arg:
                raise ConversionError(
                    where, f"chunk({arg}) of {c} backbone / {w} member channels is uneven; convert by hand."
                )
            return None if dry else tuple(p.flatten(d, d + 1) for p in xm.chunk(arg, d + 1))
        if kind == "narrow":
            start, length = (_scale(v % c if i == 0 else v, c, w, where) for i, v in enumerate(arg))
            return None if dry else xm.narrow(d + 1, start, length).flatten(d, d + 1)
        idx = cast(list, _basic_index(arg, x.dim()))  # a basic index: the rule was learnt on one
        a, b, step = idx[d].indices(c)
        if step != 1:
            raise ConversionError(where, "a strided slice of the packed channel axis cannot be applied per member.")
        member_slice = slice(_scale(a, c, w, where), _scale(max(b, a), c, w, where))
        new = idx[:d] + [slice(None), member_slice] + idx[d + 1 :]
        d_out = d - sum(isinstance(i, int) for i in idx[:d])
        return None if dry else xm[tuple(new)].flatten(d_out, d_out + 1)

    def needs_member_wrapper(self) -> bool:
        """Whether a 1-member model needs the rewrite too (some member width differs from the backbone's)."""
        return any(r[0] not in ("plain", "cat") and any(w != c for w, c in r[2].items()) for r in self.rules.values())


class ChannelOpsModule(nn.Module):
    """A packed network whose forward runs under the per-member channel rewrite (a member of a packed
    backbone that splits or slices channels with the backbone's widths).

    Args:
        module: the packed network.
        rules: the channel-operation rewrites learnt at conversion (kept out of the module tree).
        num_members: M of ``module``.
    """

    _rules: dict

    def __init__(self, module: nn.Module, rules: dict, num_members: int = 1) -> None:
        super().__init__()
        self.module = module
        self.num_members = num_members
        set_unregistered(self, "_rules", rules)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        with _ChannelOps(self.num_members, self._rules):
            return self.module(*args, **kwargs)


class _Packer:
    """Builds the packed copy of a backbone for ``num_members`` members of per-member width ``width(C)``."""

    def __init__(
        self,
        num_members: int,
        width: Callable[[int], int],
        gamma: int,
        min_channels_per_group: int,
        first: Sequence[str],
        last: Sequence[str],
        no_gamma_layers: list[str] | None = None,
    ) -> None:
        self.m, self.width, self.gamma, self.min_cpg = num_members, width, gamma, min_channels_per_group
        self.no_gamma = list(no_gamma_layers or [])
        self.first, self.last = set(first), set(last)
        self.member_axes: dict[str, int | None] = {}  # tensor name -> axis holding the M blocks
        self.parts: dict[str, int] = {}  # fused q/k/v projections of attention modules -> number of parts
        self.gamma_reductions: dict[str, int] = {}
        self.converted: list[str] = []

    def packed(self, c: int) -> int:
        return self.m * self.width(c)

    def _gamma(self, path: str, w_in: int, w_out: int, groups: int) -> int:
        g = 1 if any(fnmatch.fnmatchcase(path, pat) for pat in self.no_gamma) else self.gamma
        if self.min_cpg > 0:  # torch-uncertainty's rule, made visible
            while g > 1 and (w_in % (g * groups) or w_out % (g * groups) or w_in // (g * groups) < self.min_cpg):
                g -= 1
            if g != self.gamma and not any(fnmatch.fnmatchcase(path, pat) for pat in self.no_gamma):
                self.gamma_reductions[path] = g
        for w, what in ((w_in, "input"), (w_out, "output")):
            if w % (g * groups):
                raise ConversionError(
                    path,
                    f"per-member {what} width {w} is not divisible by gamma * groups = "
                    f"{g} * {groups}. Choose gamma/alpha so that it divides, or set "
                    "min_channels_per_group > 0 to lower gamma where needed.",
                )
        return g

    # -------------------------------------------------------------- layers
    def linear(self, path: str, lin: nn.Linear) -> tuple[nn.Module, dict[str, int | None]]:
        first, last = path in self.first, path in self.last
        out_p = self.m * lin.out_features if last else self.packed(lin.out_features)
        if first:
            new = copy.deepcopy(lin)
            new.in_features, new.out_features = lin.in_features, out_p
            new.weight = nn.Parameter(torch.empty(out_p, lin.in_features))
            new.bias = nn.Parameter(torch.empty(out_p)) if lin.bias is not None else None
            new.reset_parameters()
            return new, {"weight": 0, "bias": 0}
        in_p = self.packed(lin.in_features)
        g = self._gamma(path, in_p // self.m, out_p // self.m, 1)
        grouped = GroupedLinear(in_p, out_p, self.m * g, bias=lin.bias is not None)
        if self.parts.get(path, 1) > 1 and self.m > 1:
            grouped.output_parts = (self.m, self.parts[path])
        return grouped, {"weight": 0, "bias": 0}

    def conv(self, path: str, conv: _ConvNd) -> tuple[nn.Module, dict[str, int | None]]:
        first, last = path in self.first, path in self.last
        transposed = conv.transposed
        out_p = self.m * conv.out_channels if last else self.packed(conv.out_channels)
        if first:
            if conv.groups != 1:
                raise ConversionError(path, "the first layer reads the shared input and must have groups=1.")
            in_p, groups = conv.in_channels, 1
        else:
            in_p = self.packed(conv.in_channels)
            if conv.groups == conv.in_channels and conv.groups > 1 and not last:  # depthwise stays per channel
                if out_p % in_p:
                    raise ConversionError(
                        path,
                        f"depthwise conv: packed output width {out_p} is not a multiple of the "
                        f"packed input width {in_p}; use alpha with alpha * C / M an integer.",
                    )
                groups = in_p
            else:
                groups = self.m * self._gamma(path, in_p // self.m, out_p // self.m, conv.groups) * conv.groups
        new = copy.deepcopy(conv)
        new.in_channels, new.out_channels, new.groups = in_p, out_p, groups
        shape = (in_p, out_p // groups) if transposed else (out_p, in_p // groups)
        new.weight = nn.Parameter(torch.empty(*shape, *conv.weight.shape[2:]))
        new.bias = nn.Parameter(torch.empty(out_p)) if conv.bias is not None else None
        new.reset_parameters()
        return new, {"weight": 1 if (transposed and first) else 0, "bias": 0}

    def norm(self, path: str, mod: nn.Module) -> tuple[nn.Module, dict[str, int | None]]:
        if isinstance(mod, _BatchNorm):
            c = self.packed(mod.num_features)
            new = copy.deepcopy(mod)
            new.num_features = c
            if mod.affine:
                new.weight, new.bias = nn.Parameter(torch.ones(c)), nn.Parameter(torch.zeros(c))
            if mod.track_running_stats:
                new.running_mean, new.running_var = torch.zeros(c), torch.ones(c)
                new.num_batches_tracked = torch.tensor(0, dtype=torch.long)
            return new, {"weight": 0, "bias": 0, "running_mean": 0, "running_var": 0, "num_batches_tracked": None}
        if isinstance(mod, nn.GroupNorm):
            w = self.width(mod.num_channels)
            if w % mod.num_groups:
                raise ConversionError(
                    path, f"GroupNorm: per-member width {w} is not divisible by num_groups={mod.num_groups}."
                )
            gn = copy.deepcopy(mod)
            gn.num_groups, gn.num_channels = self.m * mod.num_groups, self.m * w
            if mod.affine:
                gn.weight, gn.bias = nn.Parameter(torch.ones(self.m * w)), nn.Parameter(torch.zeros(self.m * w))
            return gn, {"weight": 0, "bias": 0}
        # LayerNorm (channel-last) or timm LayerNorm2d (channel-first)
        mod = cast(nn.LayerNorm, mod)
        if len(mod.normalized_shape) != 1:
            raise ConversionError(
                path,
                f"LayerNorm over {tuple(mod.normalized_shape)} spans more than the channel "
                "axis; only 1-D normalized_shape can be packed.",
            )
        if (
            type(mod).forward is not nn.LayerNorm.forward
            and not _is_layernorm2d(mod)
            and type(mod).__name__ != "LayerNorm"
        ):
            raise ConversionError(path, f"{type(mod).__name__} overrides LayerNorm.forward; cannot pack it safely.")
        ln = PackedLayerNorm(
            self.packed(mod.normalized_shape[0]),
            self.m,
            mod.eps,
            mod.weight is not None,
            mod.bias is not None,
            channel_dim=1 if _is_layernorm2d(mod) else -1,
        )
        return ln, {"weight": 0, "bias": 0}

    def mha(self, path: str, mod: nn.MultiheadAttention) -> tuple[nn.Module, dict[str, int | None]]:
        if not mod._qkv_same_embed_dim or mod.bias_k is not None or mod.add_zero_attn:
            raise ConversionError(
                path,
                "MultiheadAttention with kdim/vdim != embed_dim, bias_k/v or add_zero_attn "
                "is not supported by PackedEnsemble.",
            )
        w = self.width(mod.embed_dim)
        new = PackedMultiheadAttention(
            w, mod.num_heads, self.m, mod.dropout, mod.in_proj_bias is not None, mod.batch_first
        )
        return new, {"in_proj_weight": 0, "in_proj_bias": 0, "out_proj_weight": 0, "out_proj_bias": 0}

    # -------------------------------------------------------------- walk
    def build(self, backbone: nn.Module) -> nn.Module:
        """Return a packed deep copy; raises ``ConversionError`` (backbone untouched) on anything unsupported."""
        model = copy.deepcopy(backbone)

        def visit(prefix: str, module: nn.Module) -> nn.Module | None:
            name = type(module).__name__
            if name in _REFUSED:
                raise ConversionError(prefix, f"{name} cannot be packed: {_REFUSED[name]}.")
            made = None
            if isinstance(module, nn.Linear):
                made = self.linear(prefix, module)
            elif isinstance(module, _ConvNd):
                made = self.conv(prefix, module)
            elif isinstance(module, (_BatchNorm, nn.GroupNorm, nn.LayerNorm)):
                made = self.norm(prefix, module)
            elif isinstance(module, nn.MultiheadAttention):
                made = self.mha(prefix, module)
            elif isinstance(module, (nn.Embedding, nn.RNNBase, nn.EmbeddingBag)):
                raise ConversionError(prefix, f"{name} has no packed version in this library.")
            if made is not None:
                new, axes = made
                self.converted.append(prefix)
                for t, axis in axes.items():
                    self.member_axes[f"{prefix}.{t}" if prefix else t] = axis
                return new
            if _is_timm_attention(module):
                wrapper = PackedAttention(module, self.m, prefix)
                self.converted.append(prefix)
                module = wrapper
            elif _splits_heads(module):
                # Other attention modules: M members of h heads are M * h heads when each member's heads are
                # contiguous. A fused q/k/v (or k/v) projection computes member-major [q k v]_i blocks, so its
                # output is reordered part-major [q_0..q_M | k_0.. | v_0..]; the module's own reshape to
                # (3, heads, head_dim) then gives member i heads i*h..(i+1)*h-1. The verification decides.
                cast(Any, module).num_heads *= self.m  # an attention module's own int attribute
                for child_name, parts in (("qkv", 3), ("kv", 2)):
                    child = getattr(module, child_name, None)
                    if isinstance(child, nn.Linear) and child.out_features == parts * child.in_features:
                        self.parts[f"{prefix}.{child_name}" if prefix else child_name] = parts
            for child_name, child in list(module.named_children()):
                new_child = visit(f"{prefix}.{child_name}" if prefix else child_name, child)
                if new_child is not None:
                    setattr(module, child_name, new_child)
            return module if isinstance(module, PackedAttention) else None

        root = visit("", model)
        model = root if root is not None else model
        # Tensors no converted layer owns: pack along the last axis (cls_token, pos_embed, layer scales).
        for path, module, names in leaf_parameter_owners(model):
            if any((f"{path}.{n}" if path else n) in self.member_axes for n in names):
                continue
            is_leaf = not any(True for _ in module.children())
            if is_leaf and type(module).__name__ not in _FREE_PARAM_LEAVES and not isinstance(module, PackedAttention):
                raise ConversionError(
                    path,
                    f"{type(module).__name__} owns parameters {names} and has no packed version. "
                    "Replace it, or wrap it so its parameters act on the channel (last) axis.",
                )
            for n in names:
                p = cast(nn.Parameter, module._parameters[n])  # leaf_parameter_owners lists set parameters only
                full = f"{path}.{n}" if path else n
                if p.dim() == 0 or p.numel() == 1:
                    raise ConversionError(
                        full,
                        f"a parameter of shape {tuple(p.shape)} scales every channel alike; "
                        "it would be shared by all members. Convert this module by hand.",
                    )
                # The channel axis: the last one longer than 1 ((1, N, C) tokens, (C, 1, 1) 2-D layer scales).
                axis = max(i for i, size in enumerate(p.shape) if size > 1)
                shape = list(p.shape)
                shape[axis] = self.packed(shape[axis])
                module._parameters[n] = nn.Parameter(torch.empty(*shape), requires_grad=p.requires_grad)
                self.member_axes[full] = axis
        return model


def _fill_from_sources(
    packed: nn.Module, sources: list[nn.Module], axes: dict[str, int | None], width_exact: bool
) -> None:
    """Copy member i's tensors from ``sources[i]`` into the packed model's member blocks.

    ``width_exact``: every member has the backbone's shapes (alpha == M, gamma == 1), so every tensor is
    copied. Otherwise only free tensors are (tiled/truncated); layers keep the default init.
    """
    m = len(sources)
    src_state = [dict(s.named_parameters()) | dict(s.named_buffers()) for s in sources]
    dst = dict(packed.named_parameters()) | dict(packed.named_buffers())
    with torch.no_grad():
        for name, t in dst.items():
            axis = axes.get(name)
            if name not in src_state[0]:
                continue
            if axis is None:
                t.copy_(src_state[0][name])
                continue
            is_free = name not in _layer_tensor_names(packed, name)
            if not (width_exact or is_free):
                continue
            blocks = t.unflatten(axis, (m, -1))
            for i in range(m):
                src = src_state[i][name].to(t.dtype)
                block = blocks.select(axis, i)
                if src.shape == block.shape:
                    block.copy_(src)
                elif is_free:  # tile/truncate the backbone's tensor to the member width along its member axis
                    reps = [1] * src.dim()
                    reps[axis] = math.ceil(block.shape[axis] / src.shape[axis])
                    block.copy_(src.repeat(*reps).narrow(axis, 0, block.shape[axis]))
                else:
                    raise RuntimeError(
                        f"internal: shape mismatch for {name}: {tuple(src.shape)} vs {tuple(block.shape)}"
                    )


def _layer_tensor_names(model: nn.Module, name: str) -> set[str]:
    # Names of tensors that belong to converted layers (the owner is one of the packed layer types).
    owner_path, _, leaf = name.rpartition(".")
    owner = model.get_submodule(owner_path) if owner_path else model
    layer_types = (
        nn.Linear,
        _ConvNd,
        _BatchNorm,
        nn.GroupNorm,
        PackedLayerNorm,
        GroupedLinear,
        PackedMultiheadAttention,
    )
    return {name} if isinstance(owner, layer_types) else set()


def _source_for_grouped(src: nn.Module, packed_template: nn.Module) -> nn.Module:
    """View of a backbone whose Linear weights are reshaped like GroupedLinear (1, out, in) for copying."""
    src = copy.deepcopy(src)
    for path, mod in packed_template.named_modules():
        if isinstance(mod, GroupedLinear):
            lin = cast(nn.Linear, src.get_submodule(path))
            lin.weight = nn.Parameter(lin.weight.detach()[None])
        elif isinstance(mod, PackedMultiheadAttention):
            mha = cast(nn.MultiheadAttention, src.get_submodule(path))
            holder = nn.Module()
            # PackedMultiheadAttention's tensor names, each with a member axis of 1
            for name, t in (
                ("in_proj_weight", mha.in_proj_weight),
                ("in_proj_bias", mha.in_proj_bias),
                ("out_proj_weight", mha.out_proj.weight),
                ("out_proj_bias", mha.out_proj.bias),
            ):
                setattr(holder, name, None if t is None else nn.Parameter(t.detach()[None]))
            set_submodule(src, path, holder)
    return src


@register_method("packed")
class PackedEnsemble(Ensemble):
    """Packed-Ensembles of any backbone: M narrower members packed in one grouped network.

    Args:
        backbone: any ``nn.Module`` (timm and torchvision models, nested modules); not modified.
        num_members: M.
        alpha: width factor; each member has ``ceil(alpha * C / M)`` channels for a backbone width ``C``.
            ``alpha = M, gamma = 1`` is a deep ensemble (same parameter count as M backbones).
        gamma: groups inside each member (hidden layers); must divide each member's widths unless
            ``min_channels_per_group > 0``.
        init: ``"reinit"``: fresh weights (with ``alpha == M, gamma == 1``: M copies re-initialised by the
            model's own initialiser; otherwise PyTorch's default init of the packed layers).
            ``"copy"``: every member starts from the backbone's weights (pretrained fine-tuning); needs
            ``alpha == num_members`` and ``gamma == 1``.
        min_channels_per_group: torch-uncertainty's rule: lower gamma in a layer while its groups would have
            fewer input channels than this (torch-uncertainty uses 64); 0 (default) applies gamma exactly.
        no_gamma_layers: ``fnmatch`` patterns of layer paths that keep gamma = 1 (torch-uncertainty's
            hand-written ResNets apply gamma only to each block's second conv and shortcut:
            ``["*.conv1", "linear"]`` reproduces their parameter count).
        first_layer, last_layer: module paths (or lists of paths) of the layers reading the shared input
            and of the output layers. By default they are found from the data flow of a probe forward
            (:mod:`~lightning_ensembles.ensembles.dataflow`): the ``Linear``/``Conv`` layers whose input comes
            from the model input through parameter-free operations, and those whose output reaches the model
            output without another layer. Registration order is not used.
        verify: after conversion, check on the probe that ``member(i)`` reproduces output ``i`` and that the
            members are independent (:mod:`~lightning_ensembles.ensembles.verify`); raise ``ConversionError``
            naming the module or operation that couples members otherwise. ``False`` skips it (faster);
            ``verification.ran`` is then ``False``.
        example_input, input_shape: the probe: a batch ``(B, ...)``, or one example's shape (a batch of 2
            is drawn). By default inferred from timm's ``pretrained_cfg``/``patch_embed`` or the first
            convolution / ``Linear`` (the first shape the backbone runs on).
        backbone_kwargs: arguments building ``backbone`` when it is a name (see ``build_backbone``).

    ``converted`` lists converted module paths, ``gamma_reductions`` layers where gamma was lowered,
    ``verification`` what was checked. The output layers' channels are split into members:
    ``(B, M * K)`` becomes ``(M, B, K)`` (the member axis is the output axis that the conversion widened).

    Channel operations in the backbone's own code (``torch.cat``, ``split``, ``chunk``, ``narrow`` and
    slices on the channel axis, as in DenseNet, CSP and Ghost modules) are rewritten per member while
    the packed model runs, by a ``TorchFunctionMode`` (see the section comment above ``_ChannelOps``);
    ``channel_sites`` lists the rewritten call sites. Operations that mix channels across members
    (``F.normalize`` over channels, channel shuffles, means over channels) are found by the verification
    and refused, naming the operation.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 3))
        >>> ens = PackedEnsemble(net, num_members=4, alpha=2)
        >>> ens(torch.randn(5, 4)).shape
        torch.Size([4, 5, 3])
        >>> ens.converted
        ['0', '2']
        >>> ens.verification.passed
        True
        >>> torch.allclose(ens.member(1)(torch.ones(2, 4)), ens(torch.ones(2, 4))[1], atol=1e-6)
        True
    """

    model: nn.Module
    _out_axis: int
    _num_outputs: int
    _rules: dict  # channel-operation rewrites, outside the module tree
    _backbone_structure: nn.Module  # the backbone on the meta device, outside the module tree
    _member_template: nn.Module | None = None  # the 1-member packed network member() fills, built on first use

    def __init__(
        self,
        backbone: nn.Module | str,
        num_members: int = 4,
        alpha: float = 2,
        gamma: int = 1,
        init: Literal["reinit", "copy"] = "reinit",
        min_channels_per_group: int = 0,
        first_layer: str | list[str] | None = None,
        last_layer: str | list[str] | None = None,
        no_gamma_layers: list[str] | None = None,
        verify: bool = True,
        example_input: Tensor | None = None,
        input_shape: Sequence[int] | None = None,
        backbone_kwargs: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(num_members)
        backbone = self.build_backbone(backbone, backbone_kwargs)
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha > 0:
            raise ValueError(f"`alpha` must be a number > 0 (e.g. alpha=2), got {alpha!r}.")
        check_positive_int(gamma, "gamma")
        check_choice("init", init, ("reinit", "copy"))
        if not isinstance(min_channels_per_group, int) or min_channels_per_group < 0:
            raise ValueError(f"`min_channels_per_group` must be an integer >= 0, got {min_channels_per_group!r}.")
        self.alpha, self.gamma, self.init, self.min_channels_per_group = alpha, gamma, init, min_channels_per_group
        self.no_gamma_layers = list(no_gamma_layers or [])
        m = num_members
        exact = alpha == m and gamma == 1
        if init == "copy" and not exact:
            raise ValueError(
                f"init='copy' needs alpha == num_members ({m}) and gamma == 1 so that every member has the "
                f"backbone's shapes; got alpha={alpha}, gamma={gamma}. Use init='reinit'."
            )

        layers = [p for p, mod in backbone.named_modules() if isinstance(mod, (nn.Linear, _ConvNd))]
        if not layers:
            raise ValueError("`backbone` has no Linear or Conv layer; PackedEnsemble has nothing to pack.")
        given = {}
        for arg, value in (("first_layer", first_layer), ("last_layer", last_layer)):
            if value is None:
                continue
            value = [value] if isinstance(value, str) else list(value)
            for v in value:
                if v not in layers:
                    raise ValueError(
                        f"`{arg}`={v!r} is not a Linear/Conv module path of the backbone; choose from {layers[:8]}..."
                    )
            given[arg] = value
        probe = None
        if verify or len(given) < 2 or example_input is not None or input_shape is not None:
            probe = make_probe(backbone, example_input, input_shape)
        flow = None
        if probe is not None:
            flow = trace_layers(backbone, probe)
            if "first_layer" not in given and flow.mixed:
                raise ConversionError(
                    flow.mixed[0],
                    "this layer reads both the model input (through parameter-free "
                    "operations) and another layer's output; the shared input cannot be joined to "
                    "packed channels. Convert by hand or pass first_layer=.",
                )
            if flow.input_reaches_output:
                raise ConversionError(
                    "",
                    "the model output depends on the model input through a path without any "
                    "Linear/Conv layer (a global skip connection); members would share it. Convert by hand.",
                )
        self.first_layer = given.get("first_layer") or (flow.first if flow else [])
        self.last_layer = given.get("last_layer") or (flow.last if flow else [])
        if not self.first_layer or not self.last_layer:
            raise ValueError(
                f"PackedEnsemble found no {'input' if not self.first_layer else 'output'} layer in the data flow "
                "of the probe forward; pass first_layer=/last_layer= (module paths)."
            )
        last_mod = backbone.get_submodule(self.last_layer[0])
        self._out_axis = -1 if isinstance(last_mod, nn.Linear) else 1
        self._num_outputs = (
            last_mod.out_features if isinstance(last_mod, nn.Linear) else cast(_ConvNd, last_mod).out_channels
        )

        def width(c: int) -> int:
            return math.ceil(alpha * c / m - 1e-9)  # tolerance: alpha * c / m computed in floating point

        self._width = width
        # The backbone's structure without data (meta device), kept out of the module tree; member() rebuilds
        # a 1-member packed network from it.
        set_unregistered(self, "_backbone_structure", copy.deepcopy(backbone).to("meta"))
        packer = _Packer(
            m, width, gamma, min_channels_per_group, self.first_layer, self.last_layer, self.no_gamma_layers
        )
        self.model = packer.build(backbone)
        self.converted, self.gamma_reductions = packer.converted, packer.gamma_reductions
        self._member_axes = packer.member_axes
        set_unregistered(self, "_rules", {})
        if probe is not None:
            self._learn_channel_ops(backbone, probe, flow)
        self.channel_sites = sorted(
            {f"{os.path.basename(k[0])}:{k[1]} ({r[0]})" for k, r in self._rules.items() if r[0] != "plain"}
        )
        if self.gamma_reductions:
            warnings.warn(
                f"PackedEnsemble lowered gamma (min_channels_per_group={min_channels_per_group}) in "
                f"{len(self.gamma_reductions)} layers: {dict(list(self.gamma_reductions.items())[:5])}...",
                stacklevel=2,
            )

        if init == "copy" or exact:
            sources = [backbone] * m if init == "copy" else [copy.deepcopy(backbone) for _ in range(m)]
            if init == "reinit":
                for s in sources:
                    reinitialize(s)
        else:
            sources = [backbone] * m  # only free tensors are taken from it (tiled/truncated)
        sources = [_source_for_grouped(s, self.model) for s in sources] if (init == "copy" or exact) else sources
        _fill_from_sources(self.model, sources, self._member_axes, width_exact=init == "copy" or exact)
        self.train(backbone.training)  # keep the backbone's train/eval mode
        # verify=True always made a probe
        self.verification = (
            verify_ensemble(self, probe) if verify and probe is not None else VerificationReport(ran=False)
        )

    def _learn_channel_ops(self, backbone: nn.Module, probe: Tensor, flow: Any) -> None:
        """Run backbone and packed model side by side on the probe: learn the channel-op rewrites and the output axis."""
        modes = {mod: mod.training for mod in list(backbone.modules()) + list(self.model.modules())}
        try:
            backbone.eval()
            self.model.eval()
            with torch.no_grad():
                with _ChannelOps(self.num_members, record=True) as rec:
                    ref_out = backbone(probe)
                learner = _ChannelOps(self.num_members, rules={}, reference=rec.log)
                with learner:
                    out = run_named(self.model, probe, "the packed model's forward", _CONVERT_ADVICE)
        finally:
            for mod, t in modes.items():
                mod.training = t
            clear_caches(backbone)
            clear_caches(self.model)
        set_unregistered(self, "_rules", learner.rules if any(r[0] != "plain" for r in learner.rules.values()) else {})
        if not isinstance(out, Tensor) or not isinstance(ref_out, Tensor) or out.dim() != ref_out.dim():
            raise ConversionError(
                "", f"the backbone returns {type(ref_out).__name__}; PackedEnsemble needs one output tensor."
            )
        axes = [a for a in range(out.dim()) if out.shape[a] != ref_out.shape[a]]
        if len(axes) != 1 or out.shape[axes[0]] != self.num_members * ref_out.shape[axes[0]]:
            raise ConversionError(
                ",".join(self.last_layer),
                f"the packed output has shape {tuple(out.shape)} for the "
                f"backbone's {tuple(ref_out.shape)}; expected exactly one axis widened M={self.num_members} "
                "times by the output layers. Something after the output layers changes the channel "
                "count (pass last_layer=) or the model is not a single-output network.",
            )
        self._out_axis, self._num_outputs = axes[0], ref_out.shape[axes[0]]

    def _ops(self, num_members: int) -> contextlib.AbstractContextManager:
        return _ChannelOps(num_members, self._rules) if self._rules else contextlib.nullcontext()

    def forward(self, x: Tensor) -> Tensor:
        """Member outputs ``(M, B, ...)``; every member sees the whole batch."""
        with self._ops(self.num_members):
            out = self.model(x)
        axis = self._out_axis % out.dim()
        if out.shape[axis] != self.num_members * self._num_outputs:
            raise RuntimeError(
                f"the packed model's output has {out.shape[axis]} channels on axis {axis}, expected "
                f"{self.num_members} * {self._num_outputs}; is `last_layer`={self.last_layer!r} the output layer?"
            )
        return out.unflatten(axis, (self.num_members, -1)).movedim(axis, 0)

    _inner_prefix = "model."

    def member_parameter_axes(self) -> dict[str, int]:
        """Own (per-member) parameters: name in ``named_parameters()`` -> axis holding the M member blocks."""
        params = {n for n, _ in self.named_parameters()}
        return {f"model.{n}": a for n, a in self._member_axes.items() if a is not None and f"model.{n}" in params}

    def stacked_parameters(self) -> dict[str, Tensor]:
        """Every member's own block of each packed parameter, member axis first: ``{name: (M, ...)}``.

        Differentiable views into the packed tensors (so weight-space repulsion reaches the members);
        ``stacked_parameters()[name][i]`` holds the same values as member ``i``'s ``name`` in
        :meth:`member`. Tensors no member owns a block of are left out: shared by all members, they
        cancel in any distance between members.
        """
        out = {}
        for name, p in self.model.named_parameters():
            axis = self._member_axes.get(name)
            if axis is not None:
                out[name] = p.unflatten(axis, (self.num_members, -1)).movedim(axis, 0)
        return out

    def member(self, index: int) -> nn.Module:
        """A standalone network equal to member ``index`` (its block of every packed tensor, as a 1-member model)."""
        index = self._check_index(index)
        template = self._member_template
        if template is None:
            # Per-layer gamma decisions match the ensemble's: the 1-member packer derives them from the
            # same per-member widths with the same rule.
            packer = _Packer(
                1,
                self._width,
                self.gamma,
                self.min_channels_per_group,
                self.first_layer,
                self.last_layer,
                self.no_gamma_layers,
            )
            template = packer.build(self._unpacked_structure())
            set_unregistered(self, "_member_template", template)
        member = copy.deepcopy(template)
        dst = dict(member.named_parameters()) | dict(member.named_buffers())
        src = dict(self.model.named_parameters()) | dict(self.model.named_buffers())
        with torch.no_grad():
            for name, t in dst.items():
                axis = self._member_axes.get(name)
                value = (
                    src[name] if axis is None else src[name].unflatten(axis, (self.num_members, -1)).select(axis, index)
                )
                t.copy_(value.reshape(t.shape))
        member.train(self.training)
        member = member.to(next(self.model.parameters()).device)
        if self._rules and _ChannelOps(1, self._rules).needs_member_wrapper():
            member = ChannelOpsModule(member, self._rules, 1)
        return member

    def _unpacked_structure(self) -> nn.Module:
        # Real (uninitialised) tensors: every one of them is overwritten from the packed model in member().
        return copy.deepcopy(self._backbone_structure).to_empty(device="cpu")
