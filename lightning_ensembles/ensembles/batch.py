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
from typing import Any, Literal, cast

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from .._checks import check_choice
from ._member_major import member_major_targets, run_member_major
from .base import Ensemble
from .dataflow import trace_layers
from .layers.batch import _RANK1, BatchEnsembleLayer, PerMemberBatchNorm, PerMemberLinear
from .registry import register_method
from .surgery import ConversionError, convert, replace_modules
from .verify import VerificationReport, make_probe, verify_ensemble

__all__ = ["BatchEnsemble", "TabM", "BatchEnsembleLayer", "PerMemberBatchNorm", "PerMemberLinear"]

_INITS = ("normal", "random_sign", "tabm", "ones")


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
            Or a backbone name, built with ``backbone_kwargs``.
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
        backbone_kwargs: arguments building ``backbone`` when it is a name.

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
        backbone: nn.Module | str,
        num_members: int = 4,
        init: Literal["normal", "random_sign", "tabm", "ones"] = "normal",
        init_std: float = 0.5,
        batch_mode: Literal["repeat", "split"] = "repeat",
        independent_head: bool = False,
        exclude: Sequence[str] | None = None,
        verify: bool = True,
        example_input: Tensor | None = None,
        input_shape: Sequence[int] | None = None,
        backbone_kwargs: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(num_members)
        backbone = self.build_backbone(backbone, backbone_kwargs)
        check_choice("init", init, _INITS)
        check_choice("batch_mode", batch_mode, ("repeat", "split"))
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
                return PerMemberLinear(cast(nn.Linear, mod), m, path)  # the head is an nn.Linear
            return BatchEnsembleLayer(mod, m, path)

        self.model, self.converted = convert(
            backbone, lambda p, mod: _not_mha_child(backbone, p) and select(p, mod), build
        )
        if not any(isinstance(mod, (BatchEnsembleLayer, PerMemberLinear)) for mod in self.model.modules()):
            raise ValueError("`backbone` has no Linear or Conv layer to convert; BatchEnsemble needs at least one.")
        self.reset_fast_weights()
        self.train(backbone.training)  # keep the backbone's train/eval mode
        if verify and probe is not None:  # verify=True always made a probe
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
        return run_member_major(self.model, x, self.num_members, self.training and self.batch_mode == "split")

    def stacked_parameters(self) -> dict[str, Tensor]:
        """The member-specific parameters, member axis first: ``{name: (M, ...)}``.

        Rank-1 factors ``r``, ``s`` and biases of every converted layer, per-member BatchNorm affine
        parameters and per-member heads. The shared weights ``W`` are left out: identical in every
        member, they cancel in any distance between members' full parameter vectors, so weight-space
        repulsion over these tensors equals repulsion over the members' whole weights.
        """
        out: dict[str, Tensor] = {}
        for prefix, module in self.model.named_modules():
            if isinstance(module, _MEMBER_LAYERS):
                for name, p in module.named_parameters(recurse=False):
                    out[f"{prefix}.{name}" if prefix else name] = p
        return out

    def member_targets(self, target: Tensor) -> Tensor:
        """Targets matching :meth:`forward`'s member outputs: ``(M, B, ...)`` repeated, or split in training."""
        return member_major_targets(target, self.num_members, self.training and self.batch_mode == "split")

    def member(self, index: int) -> nn.Module:
        """A standalone copy of the backbone with member ``index``'s fused weights (plain layers)."""
        index = self._check_index(index)
        model = copy.deepcopy(self.model)
        replace_modules(model, lambda p, mod: isinstance(mod, _MEMBER_LAYERS), lambda p, mod: _member_layer(mod, index))
        model.train(self.training)
        return model

    def extra_repr(self) -> str:
        return f"num_members={self.num_members}, init={self.init!r}, batch_mode={self.batch_mode!r}, converted={len(self.converted)} layers"


def _member_layer(module: nn.Module, index: int) -> nn.Module:
    """The plain layer of member ``index`` that a converted layer (one of ``_MEMBER_LAYERS``) stands for."""
    return cast(BatchEnsembleLayer | PerMemberBatchNorm | PerMemberLinear, module).member_layer(index)


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

    Args:
        in_features: number of input features.
        out_features: outputs per member (classes, or regression targets).
        num_members: M (paper: 32).
        hidden_features: width of every hidden block.
        num_blocks: number of hidden ``Linear`` blocks (>= 1).
        dropout: dropout rate after each block.
        batch_mode: as for :class:`BatchEnsemble`.

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
    backbone: nn.Module | str,
    num_members: int = 32,
    batch_mode: Literal["repeat", "split"] = "repeat",
    backbone_kwargs: dict[str, Any] | None = None,
) -> BatchEnsemble:
    """TabM-style conversion of a given MLP backbone (TabM init, independent heads)."""
    return BatchEnsemble(
        backbone,
        num_members,
        init="tabm",
        batch_mode=batch_mode,
        independent_head=True,
        backbone_kwargs=backbone_kwargs,
    )
