"""Packed-Ensembles layers: M members side by side on the channel axis, each reading only its own block.

Built by :class:`~lightning_ensembles.ensembles.packed.PackedEnsemble`'s converter; usable on their own.
"""

from __future__ import annotations

import math
from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..surgery import ConversionError
from ._compiled import grouped_matmul

__all__ = ["GroupedLinear", "PackedLayerNorm", "PackedMultiheadAttention", "PackedAttention"]


class GroupedLinear(nn.Module):
    """Block-diagonal ``Linear``: ``groups`` independent ``in/groups -> out/groups`` maps on the last axis.

    Example:
        >>> import torch
        >>> lin = GroupedLinear(8, 6, groups=2)
        >>> lin.weight.shape, lin(torch.randn(3, 8)).shape
        (torch.Size([2, 3, 4]), torch.Size([3, 6]))

    Args:
        in_features, out_features: total widths (all groups), both divisible by ``groups``.
        groups: number of independent blocks.
        bias: whether to learn an additive bias.
    """

    def __init__(self, in_features: int, out_features: int, groups: int, bias: bool = True) -> None:
        super().__init__()
        if in_features % groups or out_features % groups:
            raise ValueError(
                f"in_features={in_features} and out_features={out_features} must be divisible by groups={groups}."
            )
        self.in_features, self.out_features, self.groups = in_features, out_features, groups
        self.weight = nn.Parameter(torch.empty(groups, out_features // groups, in_features // groups))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """``nn.Linear``'s default initialisation, per group (fan-in of one group)."""
        for w in self.weight:
            nn.init.kaiming_uniform_(w, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(self.weight.shape[-1])
            nn.init.uniform_(self.bias, -bound, bound)

    #: ``(M, parts)``: reorder the member-major output ``(M, parts, r)`` part-major ``(parts, M, r)`` (set by
    #: the converter on fused q/k/v projections of attention modules it runs with M * h heads).
    output_parts: tuple[int, int] | None = None

    def forward(self, x: Tensor) -> Tensor:
        y = grouped_matmul(x, self.weight)
        y = y if self.bias is None else y + self.bias
        if self.output_parts is not None:
            y = y.unflatten(-1, (*self.output_parts, -1)).transpose(-3, -2).flatten(-3)
        return y

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, groups={self.groups}, bias={self.bias is not None}"


class PackedLayerNorm(nn.Module):
    """LayerNorm applied within each of ``num_members`` channel blocks (channel axis -1 or 1).

    Example:
        >>> import torch
        >>> ln = PackedLayerNorm(6, num_members=2)
        >>> y = ln(torch.randn(4, 6))
        >>> torch.allclose(y[:, :3].mean(-1), torch.zeros(4), atol=1e-6)
        True

    Args:
        num_channels: total width ``M * w`` (divisible by ``num_members``).
        num_members: M; each member's ``w`` channels are normalised together.
        eps: added to the variance, as in ``nn.LayerNorm``.
        affine: whether to learn a per-channel weight.
        bias: whether to learn a per-channel bias (with ``affine``).
        channel_dim: the channel axis, ``-1`` (channel-last) or ``1`` (channel-first, timm ``LayerNorm2d``).
    """

    def __init__(
        self,
        num_channels: int,
        num_members: int,
        eps: float = 1e-5,
        affine: bool = True,
        bias: bool = True,
        channel_dim: int = -1,
    ) -> None:
        super().__init__()
        if num_channels % num_members:
            raise ValueError(f"num_channels={num_channels} is not divisible by num_members={num_members}.")
        self.num_channels, self.num_members, self.eps, self.channel_dim = num_channels, num_members, eps, channel_dim
        self.weight = nn.Parameter(torch.ones(num_channels)) if affine else None
        self.bias = nn.Parameter(torch.zeros(num_channels)) if affine and bias else None

    def forward(self, x: Tensor) -> Tensor:
        w = self.num_channels // self.num_members
        xm = x.movedim(self.channel_dim, -1) if self.channel_dim != -1 else x
        y = F.layer_norm(xm.unflatten(-1, (self.num_members, w)), (w,), eps=self.eps).flatten(-2)
        if self.weight is not None:
            y = y * self.weight
        if self.bias is not None:
            y = y + self.bias
        return y.movedim(-1, self.channel_dim) if self.channel_dim != -1 else y


def _sdpa_heads(x: Tensor, m: int, heads: int) -> Tensor:
    # (B, L, M * w) -> (B, M, heads, L, w / heads)
    b, length, _ = x.shape
    return x.view(b, length, m, heads, -1).permute(0, 2, 3, 1, 4)


class PackedMultiheadAttention(nn.Module):
    """``nn.MultiheadAttention`` run independently per member on ``(.., M * w)`` embeddings.

    Same call signature as ``nn.MultiheadAttention`` (``kdim = vdim = embed_dim``); attention
    weights are not returned (the second output is ``None``). Supports 2-D ``attn_mask`` and
    ``key_padding_mask``.

    Example:
        >>> import torch
        >>> mha = PackedMultiheadAttention(embed_dim=8, num_heads=2, num_members=2, batch_first=True)
        >>> out, _ = mha(torch.randn(3, 5, 16), torch.randn(3, 5, 16), torch.randn(3, 5, 16))
        >>> out.shape
        torch.Size([3, 5, 16])

    Args:
        embed_dim: each member's embedding width (divisible by ``num_heads``); inputs are ``M * embed_dim`` wide.
        num_heads: attention heads per member.
        num_members: M.
        dropout: attention dropout in training.
        bias: whether the projections have biases.
        batch_first: inputs ``(B, L, E)`` instead of ``(L, B, E)``.
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        num_members: int,
        dropout: float = 0.0,
        bias: bool = True,
        batch_first: bool = False,
    ) -> None:
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"per-member embed_dim={embed_dim} is not divisible by num_heads={num_heads}.")
        m, e = num_members, embed_dim
        self.embed_dim, self.num_heads, self.num_members = e, num_heads, m
        self.dropout, self.batch_first = dropout, batch_first
        self.in_proj_weight = nn.Parameter(torch.empty(m, 3 * e, e))
        self.in_proj_bias = nn.Parameter(torch.zeros(m, 3 * e)) if bias else None
        self.out_proj_weight = nn.Parameter(torch.empty(m, e, e))
        self.out_proj_bias = nn.Parameter(torch.zeros(m, e)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """``nn.MultiheadAttention``'s initialisation per member."""
        for w in self.in_proj_weight:
            nn.init.xavier_uniform_(w)
        for w in self.out_proj_weight:
            nn.init.kaiming_uniform_(w, a=math.sqrt(5))
        for b in (self.in_proj_bias, self.out_proj_bias):
            if b is not None:
                nn.init.zeros_(b)

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None = None,
        need_weights: bool = True,
        attn_mask: Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[Tensor, None]:
        if not self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        m, e = self.num_members, self.embed_dim
        wq, wk, wv = self.in_proj_weight.split(e, dim=1)
        bq, bk, bv = self.in_proj_bias.split(e, dim=1) if self.in_proj_bias is not None else (None, None, None)

        def proj(t: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
            y = torch.einsum("blmi,moi->blmo", t.unflatten(-1, (m, e)), w)
            return (y if b is None else y + b).flatten(-2)

        q, k, v = (
            _sdpa_heads(proj(t, w, b), m, self.num_heads)
            for t, w, b in ((query, wq, bq), (key, wk, bk), (value, wv, bv))
        )
        mask = None
        if attn_mask is not None:
            if attn_mask.dim() != 2:
                raise ValueError("PackedMultiheadAttention supports only 2-D attn_mask (L, S).")
            mask = ~attn_mask if attn_mask.dtype == torch.bool else attn_mask
        if key_padding_mask is not None:
            kpm = (~key_padding_mask if key_padding_mask.dtype == torch.bool else key_padding_mask)[
                :, None, None, None, :
            ]
            mask = kpm if mask is None else (mask & kpm if mask.dtype == torch.bool else mask + kpm)
        out = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            dropout_p=self.dropout if self.training else 0.0,
            is_causal=is_causal and mask is None,
        )
        out = out.permute(0, 3, 1, 2, 4).flatten(-2)  # (B, L, M, e)
        out = torch.einsum("blmi,moi->blmo", out, self.out_proj_weight)
        if self.out_proj_bias is not None:
            out = out + self.out_proj_bias
        out = out.flatten(-2)
        return (out if self.batch_first else out.transpose(0, 1)), None


class PackedAttention(nn.Module):
    """timm ``Attention`` (fused ``qkv``) with attention computed within each member's channel block.

    Holds the original module's children (``qkv``, ``proj``, dropouts), which the converter packs.

    Example:
        >>> import torch
        >>> from timm.layers import Attention
        >>> att = PackedAttention(Attention(dim=8, num_heads=2), num_members=1)
        >>> att(torch.randn(2, 5, 8)).shape
        torch.Size([2, 5, 8])

    Args:
        attn: the timm ``Attention`` whose children are taken over (no ``q_norm``/``k_norm``/``norm``, no gate).
        num_members: M.
        path: the module's path in the model, named by errors.
    """

    num_heads: int
    qkv: nn.Module
    proj: nn.Module
    attn_drop: nn.Dropout
    proj_drop: nn.Module

    def __init__(self, attn: nn.Module, num_members: int, path: str = "") -> None:
        super().__init__()
        for name in ("q_norm", "k_norm", "norm"):
            if not isinstance(getattr(attn, name, nn.Identity()), nn.Identity):
                raise ConversionError(
                    path,
                    f"timm Attention with a non-identity `{name}` (normalises across the head "
                    "dimension with shared weights) is not supported by PackedEnsemble.",
                )
        if getattr(attn, "gate", None) is not None:
            raise ConversionError(path, "gated timm Attention is not supported by PackedEnsemble.")
        self.num_members, self.num_heads = num_members, cast(int, attn.num_heads)
        self.qkv, self.proj = cast(nn.Module, attn.qkv), cast(nn.Module, attn.proj)
        self.attn_drop, self.proj_drop = cast(nn.Dropout, attn.attn_drop), cast(nn.Module, attn.proj_drop)

    def forward(self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
        b, n, c = x.shape
        m, h = self.num_members, self.num_heads
        # Member-major channel layout: member i's qkv block is [q_i, k_i, v_i], exactly the backbone's layout.
        qkv = self.qkv(x).view(b, n, m, 3, h, -1).permute(3, 0, 2, 4, 1, 5)  # (3, B, M, h, N, hd)
        q, k, v = qkv.unbind(0)
        if attn_mask is not None:
            attn_mask = attn_mask.unsqueeze(1)  # broadcast over members
        else:  # members x heads as one head axis: 4-D attention, the only one ONNX export converts
            q, k, v = (t.flatten(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, is_causal=is_causal, dropout_p=self.attn_drop.p if self.training else 0.0
        )
        out = out.view(b, m, h, n, -1).permute(0, 3, 1, 2, 4).reshape(b, n, -1)
        return self.proj_drop(self.proj(out))
