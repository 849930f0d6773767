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
import warnings
from collections.abc import Sequence
from typing import Any, Literal, cast

from torch import Tensor, nn

from .._checks import check_choice, check_positive_int
from .base import Ensemble
from .dataflow import trace_layers
from .layers.lora import (
    BatchedLinear,
    BatchedLoRALinear,
    BatchedLoRAMultiheadAttention,
    LoRAFactors,
    _Rows,
)
from .registry import register_method
from .surgery import ConversionError, set_submodule
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


#: The modules LoRAEnsemble puts in the backbone (each has ``merged(index)``).
_Adapted = BatchedLoRALinear | BatchedLoRAMultiheadAttention | BatchedLinear


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
        backbone: a model, or a backbone name built with ``backbone_kwargs``. It is deep-copied, so
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
        backbone_kwargs: arguments building ``backbone`` when it is a name (see ``build_backbone``).

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
        backbone: nn.Module | str,
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
        backbone_kwargs: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(num_members)
        backbone = self.build_backbone(backbone, backbone_kwargs)
        check_positive_int(rank, "rank", hint="The paper uses rank=8.")
        check_choice("init", init, ("xavier_uniform", "normal", "kaiming_uniform"))
        check_choice("head_init", head_init, ("reinit", "copy"))
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
            available = [
                n
                for n, m in names.items()
                if isinstance(m, (nn.Linear, nn.MultiheadAttention)) and n and n != head_path
            ]
            head_hit = head_path is not None and any(fnmatch.fnmatchcase(head_path, p) for p in patterns)
            why = (
                f"{head_path!r} is the per-member head (head={head!r}): each member trains its own full copy of it, "
                "so LoRA does not adapt it; pass head=None to adapt it with LoRA instead. "
                if head_hit
                else ""
            )
            raise ConversionError(
                "",
                f"`target_modules`={patterns} matched no nn.Linear or nn.MultiheadAttention in the backbone. {why}"
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
                linear = cast(nn.Linear, module)  # targets are Linear or MultiheadAttention modules
                splits = 3 if fused_qkv and path.rsplit(".", 1)[-1] == "qkv" and linear.out_features % 3 == 0 else 1
                new = BatchedLoRALinear(
                    linear, num_members, rank, splits, self.scaling, init, init_gain, path, self._rows
                )
            set_submodule(model, path, new)
        if head_path is not None:
            set_submodule(
                model,
                head_path,
                BatchedLinear(
                    cast(nn.Linear, model.get_submodule(head_path)), num_members, head_init, head_path, self._rows
                ),
            )
        self.backbone = model
        # verify=True always made a probe
        self.verification = (
            verify_ensemble(self, probe) if verify and probe is not None else VerificationReport(ran=False)
        )

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
            set_submodule(model, path, cast(_Adapted, self.backbone.get_submodule(path)).merged(index))
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
        head = cast(BatchedLinear, self.backbone.get_submodule(self.head_path))._template if self.head_path else None
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
