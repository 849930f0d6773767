"""LoRA-Ensembles: one frozen, shared backbone and M low-rank adapters run in one batched pass.

Mühlematter et al., "LoRA-Ensemble: Efficient Uncertainty Modelling for Self-attention Networks"
(2024; code github.com/prs-eth/LoRA-Ensemble). Member ``i`` computes ``h = W0 x + s * B_i A_i x`` on every
adapted ``Linear`` and has its own classification head; everything else is frozen and shared.

Why not ``peft``: peft's LoRA can hold several adapters but trains one active adapter per forward
pass (its mixed-adapter batches, ``adapter_names=``, are for inference only), so M members would need
M passes. The batched layers below apply every member's factors to its own slice of one repeated
batch with batched matrix products (``torch.bmm``), which is the whole point of the method.
"""

from __future__ import annotations

import copy
import fnmatch
import math
import warnings
from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import Ensemble
from .dataflow import trace_layers
from .registry import register_method
from .surgery import ConversionError
from .verify import VerificationReport, make_probe, verify_ensemble

__all__ = ["LoRAEnsemble", "LoRAFactors", "BatchedLoRALinear", "BatchedLoRAMultiheadAttention", "BatchedLinear"]

#: Name patterns adapted when ``target_modules`` is not given: timm's ViT-style attention (fused
#: ``qkv`` and output ``proj``; also separate ``q``/``k``/``v``/``q_proj``... projections). Every
#: ``nn.MultiheadAttention`` is adapted as well (its q, k, v and output projections).
DEFAULT_TARGETS: tuple[str, ...] = (
    "*attn.qkv",
    "*attn.proj",
    "*attn.q",
    "*attn.k",
    "*attn.v",
    "*attn.q_proj",
    "*attn.k_proj",
    "*attn.v_proj",
    "*attn.out_proj",
)


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
        lead = x.shape[:-1]
        xm = x.reshape(m, -1, self.in_features)  # (M, N, in): member i owns rows [i*B, (i+1)*B)
        if block is not None:
            z = torch.bmm(xm, self.A[:, block].transpose(1, 2))  # (M, N, r)
            out = torch.bmm(z, self.B[:, block].transpose(1, 2))  # (M, N, out / splits)
            return (self.scaling * out).reshape(*lead, -1)
        z = torch.bmm(xm, self.A.reshape(m, -1, self.in_features).transpose(1, 2))  # (M, N, splits * r)
        if self.splits == 1:
            out = torch.bmm(z, self.B[:, 0].transpose(1, 2))
        else:  # each block's rank-r code goes through its own B only
            z = z.view(m, z.shape[1], self.splits, self.rank)
            out = torch.einsum("mnsr,msor->mnso", z, self.B).reshape(m, z.shape[1], self.out_features)
        return (self.scaling * out).reshape(*lead, self.out_features)

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
    """

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
        self.__dict__["_rows"] = rows or _Rows()  # shared plain object, not a submodule

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
    """

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
        self.__dict__["_template"] = copy.deepcopy(base)
        self.__dict__["_rows"] = rows or _Rows()

    def forward(self, x: Tensor) -> Tensor:
        _check_rows(x, self._rows, self.num_members, self.path)
        lead = x.shape[:-1]
        xm = x.reshape(self.num_members, -1, self.in_features)
        if self.bias is None:
            out = torch.bmm(xm, self.weight.transpose(1, 2))
        else:
            out = torch.baddbmm(self.bias.unsqueeze(1), xm, self.weight.transpose(1, 2))
        return out.reshape(*lead, self.out_features)

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
    """

    _qkv_same_embed_dim = False

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
        self.__dict__["_rows"] = rows or _Rows()

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


def _find_head(backbone: nn.Module, head: str | None, data_last: list[str] | None = None) -> str | None:
    if head is None or head == "none":
        return None
    names = dict(backbone.named_modules())
    if head != "auto":
        if head not in names:
            linears = [n for n, m in names.items() if isinstance(m, nn.Linear)]
            raise ValueError(f"`head`={head!r} is not a submodule of the backbone; Linear layers: {linears[-8:]}.")
        if not isinstance(names[head], nn.Linear):
            raise ValueError(f"`head`={head!r} is a {type(names[head]).__name__}; a per-member head must be nn.Linear.")
        return head
    get_classifier = getattr(backbone, "get_classifier", None)  # timm convention
    if callable(get_classifier):
        clf = get_classifier()
        if isinstance(clf, (tuple, list)) and data_last is not None:  # distilled models: (head, head_dist)
            clf = None
        elif not isinstance(clf, nn.Linear):  # e.g. timm's num_classes=0: the last Linear is not a head
            raise ConversionError(
                "",
                f"`head`='auto': the backbone's classifier is a {type(clf).__name__}, not an nn.Linear. Build it with "
                "num_classes > 0, name the head module, or pass head=None.",
            )
        for n, m in names.items():
            if m is clf:
                return n
    inside_mha = {f"{n}.out_proj" for n, m in names.items() if isinstance(m, nn.MultiheadAttention)}
    linears = [n for n, m in names.items() if isinstance(m, nn.Linear) and n not in inside_mha]
    if data_last is not None:  # the output layer from the data flow, not registration order
        heads = [n for n in data_last if n in linears]
        if len(heads) != 1:
            raise ConversionError(
                "",
                f"`head`='auto': the output layers in the data flow are {data_last}, not one "
                "nn.Linear; name the head module (head='...') or pass head=None for a shared head.",
            )
        return heads[0]
    if not linears:
        raise ValueError("`head`='auto' found no nn.Linear head in the backbone; pass `head=None` for a shared head.")
    return linears[-1]


@register_method("lora")
class LoRAEnsemble(Ensemble):
    """LoRA-Ensemble: a frozen shared backbone, M members with their own LoRA factors and heads.

    Every target ``Linear`` computes ``W0 x + b + (lora_alpha / rank) * B_i A_i x`` for member ``i``;
    ``nn.MultiheadAttention`` targets get this on the q, k, v and output projections. The batch is
    repeated member-major (rows ``[i*B, (i+1)*B)`` are member ``i``) and the whole ensemble runs in one
    forward pass with batched matrix products. Each member sees the whole batch.

    Args:
        backbone: a built model (use ``build_ensemble`` / the CLI for names). It is deep-copied, so
            the given module is left untouched, and every one of its parameters is frozen.
        num_members: M.
        rank: LoRA rank r (>= 1). Paper: 8.
        lora_alpha: scaling numerator, ``scaling = lora_alpha / rank``. Default ``None`` means
            ``scaling = 1`` (the LoRA-Ensemble code adds ``B A x`` unscaled).
        target_modules: ``fnmatch`` patterns on module names (``"blocks.*.attn.qkv"``, ``"*.fc1"``).
            Matching ``nn.Linear`` and ``nn.MultiheadAttention`` modules are adapted. Default: the
            attention projections of timm ViT-style blocks (:data:`DEFAULT_TARGETS`) and every
            ``nn.MultiheadAttention``.
        fused_qkv: give Linear layers named ``*qkv`` three independent (A, B) pairs, one per q/k/v
            slice, as the paper does (one rank-r LoRA on the fused matrix is a different model).
        head: per-member classification head: ``"auto"`` (timm's ``get_classifier()``, else the last
            ``nn.Linear``), a module name, or ``None`` for the backbone's own (frozen, shared) head.
        head_init: ``"reinit"`` draws every member's head afresh (nn.Linear's initialiser);
            ``"copy"`` starts each from the backbone's head.
        init: initialiser of ``A``: ``"xavier_uniform"`` (paper), ``"normal"`` (std = ``init_gain``)
            or ``"kaiming_uniform"`` (the LoRA paper's). ``B`` is always zero, so at step 0 every
            member equals the frozen backbone with its own head.
        init_gain: gain of the Xavier draw; 10 in the paper's final configurations (the main
            diversity knob).
        verify: after conversion, check on a probe that ``member(i)`` reproduces output ``i`` and that
            members are independent (:mod:`~lightning_ensembles.ensembles.verify`), raising
            ``ConversionError`` otherwise; ``False`` skips it (``verification.ran`` is then ``False``).
        example_input, input_shape: the probe batch, or one example's shape; inferred by default.
            The probe also finds the output layer (``head="auto"`` without timm's ``get_classifier``)
            from the data flow, and leaves out targets whose forward never runs (their weight is read
            directly by other code), with a warning (``skipped_targets``).

    Trainable parameters (all other weights are frozen)::

        M * ( sum over adapted Linear(in, out) with s splits of  r * (s * in + out)
            + sum over adapted MultiheadAttention(E)          of  8 * r * E
            + head_in * head_out + head_out )                 # per-member head (with bias)

    (``s = 3`` for fused ``qkv`` layers, else 1.) :meth:`parameter_summary` reports this against a
    deep ensemble of M full backbones.

    Example:
        >>> import timm, torch
        >>> vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=8, patch_size=2,
        ...                         in_chans=1, embed_dim=32, depth=2, num_heads=2, num_classes=10)
        >>> ens = LoRAEnsemble(vit, num_members=4, rank=4)
        >>> ens(torch.randn(3, 1, 8, 8)).shape
        torch.Size([4, 3, 10])
        >>> ens.adapted_modules
        ['blocks.0.attn.qkv', 'blocks.0.attn.proj', 'blocks.1.attn.qkv', 'blocks.1.attn.proj']
        >>> ens.trainable_parameters() == 4 * (2 * (4 * (3 * 32 + 96) + 4 * (32 + 32)) + 32 * 10 + 10)
        True
    """

    def __init__(
        self,
        backbone: nn.Module,
        num_members: int = 4,
        rank: int = 8,
        lora_alpha: float | None = None,
        target_modules: Sequence[str] | None = None,
        fused_qkv: bool = True,
        head: str | None = "auto",
        head_init: Literal["reinit", "copy"] = "reinit",
        init: Literal["xavier_uniform", "normal", "kaiming_uniform"] = "xavier_uniform",
        init_gain: float = 10.0,
        verify: bool = True,
        example_input: Tensor | None = None,
        input_shape: Sequence[int] | None = None,
    ) -> None:
        super().__init__(num_members)
        if not isinstance(backbone, nn.Module):
            raise ValueError(
                f"`backbone` must be a built nn.Module, got {type(backbone).__name__}; "
                "use build_ensemble('lora', name, backbone_kwargs=...) for names."
            )
        if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
            raise ValueError(f"`rank` must be an integer >= 1, got {rank!r}. The paper uses rank=8.")
        if init not in ("xavier_uniform", "normal", "kaiming_uniform"):
            raise ValueError(f"`init` must be 'xavier_uniform', 'normal' or 'kaiming_uniform', got {init!r}.")
        if head_init not in ("reinit", "copy"):
            raise ValueError(f"`head_init` must be 'reinit' or 'copy', got {head_init!r}.")
        if lora_alpha is not None and lora_alpha <= 0:
            raise ValueError(f"`lora_alpha` must be > 0 (or None for scaling 1), got {lora_alpha}.")
        if isinstance(target_modules, str):
            target_modules = [target_modules]
        self.rank = rank
        self.scaling = 1.0 if lora_alpha is None else lora_alpha / rank
        self.init, self.init_gain = init, init_gain
        self._rows = _Rows()

        # Plan the whole conversion first so that a refusal leaves nothing half-converted.
        try:
            probe = make_probe(backbone, example_input, input_shape)
        except ValueError:
            if verify:
                raise
            probe = None
        flow = trace_layers(backbone, probe, (nn.Linear, nn.MultiheadAttention)) if probe is not None else None
        names = dict(backbone.named_modules())
        head_path = _find_head(backbone, head, flow.last if flow is not None else None)
        mha_children = {
            f"{n}.{c}" for n, m in names.items() if isinstance(m, nn.MultiheadAttention) for c in ("out_proj",)
        }
        patterns = list(target_modules) if target_modules is not None else list(DEFAULT_TARGETS)
        targets: list[str] = []
        for n, m in names.items():
            if not n or n == head_path:
                continue
            default_mha = target_modules is None and isinstance(m, nn.MultiheadAttention)
            if not default_mha and not any(fnmatch.fnmatchcase(n, p) for p in patterns):
                continue
            if isinstance(m, nn.Linear) and n in mha_children:
                if target_modules is not None:
                    parent = n.rsplit(".", 1)[0]
                    raise ValueError(
                        f"`target_modules` matched {n!r}, the output projection inside nn.MultiheadAttention "
                        f"{parent!r}, which never calls it; target {parent!r} instead."
                    )
                continue
            if isinstance(m, (nn.Linear, nn.MultiheadAttention)):
                targets.append(n)
        if not targets:
            available = [n for n, m in names.items() if isinstance(m, (nn.Linear, nn.MultiheadAttention)) and n]
            raise ConversionError(
                "",
                f"`target_modules`={patterns} matched no nn.Linear or nn.MultiheadAttention in the backbone. "
                f"Available: {available[:20]}{' ...' if len(available) > 20 else ''}. Patterns use fnmatch, "
                "e.g. '*attn.qkv' or 'layers.*.self_attn'.",
            )
        nested = [t for t in targets if any(t.startswith(o + ".") for o in targets if o != t)]
        targets = [t for t in targets if t not in nested]  # a MultiheadAttention target covers its children
        self.skipped_targets = [t for t in targets if flow is not None and (t not in flow.called or t in flow.constant)]
        if self.skipped_targets:
            warnings.warn(
                f"LoRAEnsemble leaves {self.skipped_targets[:5]} unadapted (frozen, shared): their forward never "
                "runs on the probe (their weight is read directly, or they are unused) or never sees the batch.",
                stacklevel=2,
            )
            targets = [t for t in targets if t not in self.skipped_targets]
            if not targets:
                raise ValueError(
                    "`target_modules` matched only layers whose forward never runs on the probe; nothing to adapt."
                )

        model = copy.deepcopy(backbone).requires_grad_(False)
        self.adapted_modules: list[str] = targets
        self.head_path = head_path
        for path in targets:
            module = model.get_submodule(path)
            if isinstance(module, nn.MultiheadAttention):
                new: nn.Module = BatchedLoRAMultiheadAttention(
                    module, num_members, rank, self.scaling, init, init_gain, path, self._rows
                )
            else:
                splits = 3 if fused_qkv and path.rsplit(".", 1)[-1] == "qkv" and module.out_features % 3 == 0 else 1
                new = BatchedLoRALinear(
                    module, num_members, rank, splits, self.scaling, init, init_gain, path, self._rows
                )
            model.set_submodule(path, new)
        if head_path is not None:
            model.set_submodule(
                head_path, BatchedLinear(model.get_submodule(head_path), num_members, head_init, head_path, self._rows)
            )
        self.backbone = model
        self.verification = verify_ensemble(self, probe) if verify else VerificationReport(ran=False)

    _inner_prefix = "backbone."

    def member_parameter_axes(self) -> dict[str, int]:
        """Own (per-member) parameters: LoRA factors and per-member heads, member axis 0."""
        out = {}
        for path, mod in self.backbone.named_modules():
            if isinstance(mod, (LoRAFactors, BatchedLinear)):
                for n, _ in mod.named_parameters(recurse=False):
                    out[f"backbone.{path}.{n}" if path else f"backbone.{n}"] = 0
        return out

    def forward(self, x: Tensor) -> Tensor:
        """Member outputs ``(M, B, ...)`` from one pass over the member-major repeated batch."""
        m, b = self.num_members, x.shape[0]
        rep = x.unsqueeze(0).expand(m, *x.shape).reshape(m * b, *x.shape[1:])
        self._rows.expected = m * b
        try:
            out = self.backbone(rep)
        finally:
            self._rows.expected = None
        if not isinstance(out, Tensor) or out.shape[0] != m * b:
            raise ValueError(
                f"LoRAEnsemble: the backbone returned {getattr(out, 'shape', type(out).__name__)}; expected a tensor with "
                f"the batch ({m * b} repeated rows) on dim 0."
            )
        return out.reshape(m, b, *out.shape[1:])

    def member(self, index: int) -> nn.Module:
        """Standalone backbone of member ``index``: its LoRA merged into the weights, its own head."""
        index = self._check_index(index)
        model = copy.deepcopy(self.backbone)
        for path in self.adapted_modules + ([self.head_path] if self.head_path else []):
            model.set_submodule(path, self.backbone.get_submodule(path).merged(index))
        model.requires_grad_(True)
        model.train(self.training)
        return model

    # ------------------------------------------------------------------ accounting
    def trainable_parameters(self) -> int:
        """Number of trainable (adapter and head) parameters."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def parameter_summary(self) -> dict[str, int | float]:
        """Trainable / frozen parameter counts against a deep ensemble of M full backbones."""
        trainable = self.trainable_parameters()
        frozen = sum(p.numel() for p in self.parameters() if not p.requires_grad)
        head = self.backbone.get_submodule(self.head_path)._template if self.head_path else None
        single = frozen + (sum(p.numel() for p in head.parameters()) if head is not None else 0)
        deep = self.num_members * single
        return {
            "trainable": trainable,
            "frozen_shared": frozen,
            "total": trainable + frozen,
            "deep_ensemble_trainable": deep,
            "trainable_fraction_of_deep": trainable / deep,
        }

    def extra_repr(self) -> str:
        return (
            f"num_members={self.num_members}, rank={self.rank}, scaling={self.scaling:g}, init={self.init!r}, "
            f"init_gain={self.init_gain:g}, adapted={len(self.adapted_modules)} modules, head={self.head_path!r}"
        )
