"""LoRA-Ensemble layers: frozen shared layers plus per-member low-rank factors on member-major rows.

Built by :class:`~lightning_ensembles.ensembles.lora.LoRAEnsemble`'s converter; usable on their own.
"""

from __future__ import annotations

import copy
import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..surgery import set_unregistered
from ._compiled import member_linear

__all__ = ["LoRAFactors", "BatchedLoRALinear", "BatchedLinear", "BatchedLoRAMultiheadAttention"]


class _Rows:
    """Rows (M * B) the ensemble is currently running; shared by its adapted layers to catch
    layers that do not receive the batch on dim 0 (their member slices would be wrong)."""

    def __init__(self) -> None:
        self.expected: int | None = None


class LoRAFactors(nn.Module):
    """Per-member low-rank factors for a weight of shape ``(out, in)``, split into ``splits`` output blocks.

    Member ``i``, block ``s`` adds ``scaling * B[i, s] @ A[i, s]`` (``A``: ``(rank, in)``, ``B``:
    ``(out / splits, rank)``). ``splits=3`` on a fused ``qkv`` weight gives q, k and v their own rank-r
    pairs (one rank-r LoRA on the fused matrix is not equivalent; see the LoRA-Ensemble code).

    Example:
        >>> f = LoRAFactors(num_members=2, in_features=6, out_features=9, rank=2, splits=3)
        >>> f.A.shape, f.B.shape
        (torch.Size([2, 3, 2, 6]), torch.Size([2, 3, 3, 2]))
        >>> f.delta_weight(0).shape  # zero at init because B = 0
        torch.Size([9, 6])

    Args:
        num_members: M.
        in_features, out_features: the adapted weight's shape ``(out, in)``.
        rank: r, the rank of every ``B A`` pair.
        splits: number of output blocks with their own pair (3 for a fused ``qkv``).
        scaling: factor of every ``B A`` (``lora_alpha / rank``).
        init: initialiser of ``A`` (``B`` starts at zero).
        init_gain: gain of the Xavier draw, or standard deviation of the normal one.
    """

    def __init__(
        self,
        num_members: int,
        in_features: int,
        out_features: int,
        rank: int,
        splits: int = 1,
        scaling: float = 1.0,
        init: Literal["xavier_uniform", "normal", "kaiming_uniform"] = "xavier_uniform",
        init_gain: float = 10.0,
    ) -> None:
        super().__init__()
        if out_features % splits:
            raise ValueError(f"`out_features`={out_features} is not divisible by `splits`={splits}.")
        self.num_members, self.rank, self.splits, self.scaling = num_members, rank, splits, scaling
        self.in_features, self.out_features = in_features, out_features
        self.A = nn.Parameter(torch.empty(num_members, splits, rank, in_features))
        self.B = nn.Parameter(torch.zeros(num_members, splits, out_features // splits, rank))
        with torch.no_grad():
            a = self.A.view(-1, rank, in_features)
            for k in range(a.shape[0]):  # an independent draw per member and block: members differ
                if init == "xavier_uniform":
                    nn.init.xavier_uniform_(a[k], gain=init_gain)
                elif init == "normal":
                    nn.init.normal_(a[k], std=init_gain)
                else:
                    nn.init.kaiming_uniform_(a[k], a=math.sqrt(5))

    def delta(self, x: Tensor, block: int | None = None) -> Tensor:
        """Adapter output for member-major rows ``x``: ``(M * B, ..., in) -> (M * B, ..., out)``.

        ``block`` restricts to one output block (e.g. only the ``k`` slice of a fused projection).
        """
        m = self.num_members
        # member i owns rows [i*B, (i+1)*B) of x; z (..., r) per block
        if block is not None:
            z = member_linear(x, self.A[:, block])  # (..., r)
            return self.scaling * member_linear(z, self.B[:, block])  # (..., out / splits)
        z = member_linear(x, self.A.reshape(m, -1, self.in_features))  # (..., splits * r)
        if self.splits == 1:
            out = member_linear(z, self.B[:, 0])
        else:  # each block's rank-r code goes through its own B only
            zm = z.reshape(m, -1, self.splits, self.rank)
            out = torch.einsum("mnsr,msor->mnso", zm, self.B).reshape(*x.shape[:-1], self.out_features)
        return self.scaling * out

    def delta_weight(self, index: int) -> Tensor:
        """``scaling * B_i A_i`` of member ``index`` as one ``(out, in)`` matrix (blocks stacked on out)."""
        return self.scaling * torch.cat([self.B[index, s] @ self.A[index, s] for s in range(self.splits)], dim=0)


def _check_rows(x: Tensor, rows: _Rows, num_members: int, path: str, axis: int = 0) -> None:
    # A multiple of the repeated batch is allowed: window attention (Swin) folds windows into the batch
    # axis, batch-outermost, so member i's rows stay one contiguous block. Anything else is caught by the
    # post-conversion verification.
    n = x.shape[axis] if x.dim() > axis else -1
    if (rows.expected is not None and (n < rows.expected or n % rows.expected)) or n % num_members:
        raise ValueError(
            f"LoRAEnsemble: adapted module {path!r} received input of shape {tuple(x.shape)}, whose dim {axis} is not "
            f"the repeated batch ({rows.expected if rows.expected is not None else 'a multiple of num_members'}). "
            "Linear targets must receive the batch on dim 0 (batch-first); leave this module out of `target_modules`."
        )


class BatchedLoRALinear(nn.Module):
    """A frozen ``nn.Linear`` plus per-member LoRA factors, applied to member-major repeated batches.

    Input ``(M * B, ..., in)``; rows ``[i * B, (i + 1) * B)`` belong to member ``i``.

    Example:
        >>> import torch
        >>> layer = BatchedLoRALinear(torch.nn.Linear(4, 6), num_members=2, rank=2)
        >>> layer(torch.randn(2 * 3, 4)).shape
        torch.Size([6, 6])

    Args:
        base: the ``nn.Linear`` to adapt (frozen and shared by the members).
        num_members, rank, splits, scaling, init, init_gain: the :class:`LoRAFactors`.
        path: the layer's path in the converted model, named by errors.
        rows: the row count shared by an ensemble's adapted layers (each layer gets its own by default).
    """

    base: nn.Linear
    _rows: _Rows  # shared plain object, not a submodule

    def __init__(
        self,
        base: nn.Linear,
        num_members: int,
        rank: int,
        splits: int = 1,
        scaling: float = 1.0,
        init: Literal["xavier_uniform", "normal", "kaiming_uniform"] = "xavier_uniform",
        init_gain: float = 10.0,
        path: str = "",
        rows: _Rows | None = None,
    ) -> None:
        super().__init__()
        self.base = base.requires_grad_(False)
        self.lora = LoRAFactors(
            num_members, base.in_features, base.out_features, rank, splits, scaling, init, init_gain
        )
        self.path = path
        set_unregistered(self, "_rows", rows or _Rows())

    def forward(self, x: Tensor) -> Tensor:
        _check_rows(x, self._rows, self.lora.num_members, self.path)
        return self.base(x) + self.lora.delta(x)

    def merged(self, index: int) -> nn.Linear:
        """A plain ``nn.Linear`` equal to member ``index`` (LoRA merged into the weight)."""
        layer = copy.deepcopy(self.base)
        with torch.no_grad():
            layer.weight.add_(self.lora.delta_weight(index).to(layer.weight.dtype))
        return layer


class BatchedLinear(nn.Module):
    """M independent ``Linear`` layers (one per member) on member-major rows: per-member heads.

    Example:
        >>> import torch
        >>> head = BatchedLinear(torch.nn.Linear(4, 3), num_members=2)
        >>> head(torch.randn(2 * 5, 4)).shape
        torch.Size([10, 3])

    Args:
        base: the ``nn.Linear`` every member's head is shaped like.
        num_members: M.
        init: ``"reinit"`` draws every member's weights afresh (``nn.Linear``'s initialiser); ``"copy"``
            starts each from ``base``'s.
        path: the layer's path in the converted model, named by errors.
        rows: the row count shared by an ensemble's adapted layers (each layer gets its own by default).
    """

    weight: nn.Parameter
    bias: nn.Parameter | None
    _template: nn.Linear  # a copy of ``base`` (outside the module tree), the class of merged heads
    _rows: _Rows

    def __init__(
        self,
        base: nn.Linear,
        num_members: int,
        init: Literal["reinit", "copy"] = "reinit",
        path: str = "",
        rows: _Rows | None = None,
    ) -> None:
        super().__init__()
        self.num_members, self.path = num_members, path
        self.in_features, self.out_features = base.in_features, base.out_features
        copies = [copy.deepcopy(base) for _ in range(num_members)]
        if init == "reinit":
            for c in copies:  # independent draws with nn.Linear's own initialiser
                c.reset_parameters()
        self.weight = nn.Parameter(torch.stack([c.weight.detach() for c in copies]))  # (M, out, in)
        self.bias = (
            nn.Parameter(torch.stack([c.bias.detach() for c in copies])) if base.bias is not None else None
        )  # (M, out)
        set_unregistered(self, "_template", copy.deepcopy(base))
        set_unregistered(self, "_rows", rows or _Rows())

    def forward(self, x: Tensor) -> Tensor:
        _check_rows(x, self._rows, self.num_members, self.path)
        return member_linear(x, self.weight, self.bias)

    def merged(self, index: int) -> nn.Linear:
        """Member ``index``'s head as a plain ``nn.Linear``."""
        layer = copy.deepcopy(self._template).to(self.weight.device, self.weight.dtype)
        with torch.no_grad():
            layer.weight.copy_(self.weight[index])
            if self.bias is not None:
                layer.bias.copy_(self.bias[index])
        return layer


def _additive(mask: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, float("-inf"))
    return mask.to(dtype)


class BatchedLoRAMultiheadAttention(nn.Module):
    """A frozen ``nn.MultiheadAttention`` with per-member LoRA on its q, k, v and output projections.

    ``nn.MultiheadAttention`` reads ``in_proj_weight`` and ``out_proj.weight`` directly inside
    ``F.multi_head_attention_forward`` (``out_proj.forward`` is never called), so its Linear children
    cannot be adapted one by one; this module recomputes the attention with adapted projections.
    Same call signature and outputs as ``nn.MultiheadAttention`` (attention weights only when
    ``need_weights=True``). It sets ``_qkv_same_embed_dim = False`` so that
    ``nn.TransformerEncoderLayer`` skips its fused fast path, which would bypass the adapters.

    Example:
        >>> import torch
        >>> mha = torch.nn.MultiheadAttention(8, 2, batch_first=True)
        >>> lora = BatchedLoRAMultiheadAttention(mha, num_members=2, rank=2)
        >>> x = torch.randn(4, 5, 8)  # 2 members x batch 2
        >>> torch.allclose(lora(x, x, x)[0], mha(x, x, x)[0], atol=1e-6)  # B = 0 at init
        True

    Args:
        base: the ``nn.MultiheadAttention`` to adapt (frozen and shared by the members); ``kdim`` and
            ``vdim`` equal to ``embed_dim``, no ``add_bias_kv`` or ``add_zero_attn``.
        num_members, rank, scaling, init, init_gain: the :class:`LoRAFactors` (q, k and v get their own).
        path: the module's path in the converted model, named by errors.
        rows: the row count shared by an ensemble's adapted layers (each layer gets its own by default).
    """

    _qkv_same_embed_dim = False
    base: nn.MultiheadAttention
    _rows: _Rows

    def __init__(
        self,
        base: nn.MultiheadAttention,
        num_members: int,
        rank: int,
        scaling: float = 1.0,
        init: Literal["xavier_uniform", "normal", "kaiming_uniform"] = "xavier_uniform",
        init_gain: float = 10.0,
        path: str = "",
        rows: _Rows | None = None,
    ) -> None:
        super().__init__()
        problems = []
        if not base._qkv_same_embed_dim:
            problems.append("kdim/vdim differ from embed_dim")
        if base.bias_k is not None:
            problems.append("add_bias_kv=True")
        if base.add_zero_attn:
            problems.append("add_zero_attn=True")
        if problems:
            raise ValueError(
                f"LoRAEnsemble cannot adapt nn.MultiheadAttention {path!r}: {', '.join(problems)} is not supported. "
                "Leave it out of `target_modules`."
            )
        self.base = base.requires_grad_(False)
        e = base.embed_dim
        self.embed_dim, self.num_heads, self.batch_first, self.path = e, base.num_heads, base.batch_first, path
        self.in_lora = LoRAFactors(num_members, e, 3 * e, rank, 3, scaling, init, init_gain)
        self.out_lora = LoRAFactors(num_members, e, e, rank, 1, scaling, init, init_gain)
        set_unregistered(self, "_rows", rows or _Rows())

    # attributes nn.TransformerEncoder(Layer) reads while deciding on its fast path
    @property
    def in_proj_weight(self) -> Tensor:
        return self.base.in_proj_weight

    @property
    def in_proj_bias(self) -> Tensor | None:
        return self.base.in_proj_bias

    @property
    def out_proj(self) -> nn.Linear:
        return self.base.out_proj

    def _project(self, x: Tensor, block: int) -> Tensor:
        e = self.embed_dim
        w = self.base.in_proj_weight[block * e : (block + 1) * e]
        b = None if self.base.in_proj_bias is None else self.base.in_proj_bias[block * e : (block + 1) * e]
        return F.linear(x, w, b) + self.in_lora.delta(x, block)

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
    ) -> tuple[Tensor, Tensor | None]:
        if query.dim() != 3:
            raise ValueError(f"LoRAEnsemble: {self.path!r} supports batched 3-D inputs only, got {tuple(query.shape)}.")
        if not self.batch_first:  # (L, N, E) -> (N, L, E); members are slices of N
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        _check_rows(query, self._rows, self.in_lora.num_members, self.path)
        n, lq, e = query.shape
        h, d = self.num_heads, e // self.num_heads
        if query is key and key is value:  # self-attention: one fused projection
            q, k, v = (
                F.linear(query, self.base.in_proj_weight, self.base.in_proj_bias) + self.in_lora.delta(query)
            ).chunk(3, dim=-1)
        else:
            q, k, v = self._project(query, 0), self._project(key, 1), self._project(value, 2)
        q, k, v = (t.reshape(n, -1, h, d).transpose(1, 2) for t in (q, k, v))  # (N, H, L, d)
        ls = k.shape[2]
        mask = _additive(attn_mask, q.dtype)
        if mask is not None:
            mask = mask.view(1, 1, lq, ls) if mask.dim() == 2 else mask.view(n, h, lq, ls)
        elif is_causal:
            mask = torch.full((lq, ls), float("-inf"), dtype=q.dtype, device=q.device).triu(1)
        kpm = _additive(key_padding_mask, q.dtype)
        if kpm is not None:
            kpm = kpm.view(n, 1, 1, ls)
            mask = kpm if mask is None else mask + kpm
        p = self.base.dropout if self.training else 0.0
        weights = None
        if need_weights:
            scores = q @ k.transpose(-2, -1) / math.sqrt(d)
            if mask is not None:
                scores = scores + mask
            attn = scores.softmax(dim=-1)
            weights = attn.mean(dim=1) if average_attn_weights else attn
            out = F.dropout(attn, p, self.training) @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
        out = out.transpose(1, 2).reshape(n, lq, e)
        out = self.base.out_proj(out) + self.out_lora.delta(out)
        if not self.batch_first:
            out = out.transpose(0, 1)
        return out, weights

    def merged(self, index: int) -> nn.MultiheadAttention:
        """A plain ``nn.MultiheadAttention`` equal to member ``index``."""
        mha = copy.deepcopy(self.base)
        with torch.no_grad():
            mha.in_proj_weight.add_(self.in_lora.delta_weight(index))
            mha.out_proj.weight.add_(self.out_lora.delta_weight(index))
        return mha
