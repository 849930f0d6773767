"""torch-uncertainty interoperability: our ensembles in its routines, its models as our ensembles.

The two libraries stack members differently but in the same order. lightning-ensembles puts the member
axis first, ``(M, B, C)``; torch-uncertainty stacks members on the batch axis, member-major,
``(M * B, C)`` (its ``ClassificationRoutine`` reads ``"(m b) c -> b m c"`` and ``RepeatTarget`` repeats
targets ``"b -> (m b)"``). Converting is ``flatten(0, 1)`` / ``unflatten(0, (M, B))``, no copy.

- :func:`as_tu_model` / :func:`tu_classification_routine`: any :class:`~lightning_ensembles.Ensemble`
  trained and evaluated by torch-uncertainty's ``ClassificationRoutine`` (its metrics, OOD and
  shift evaluation, plots).
- :func:`from_tu_model`: a torch-uncertainty ensemble (packed, MIMO, MC-dropout, BatchEnsemble and
  deep-ensemble builders) as an :class:`~lightning_ensembles.Ensemble`, so
  ``EnsembleClassifier(ensemble=from_tu_model(...))`` and every callback of this library work on it.
- :class:`TUScaler` / :class:`TUCalibration`: torch-uncertainty's logit scalers (temperature, vector,
  matrix, Dirichlet) as a calibrator of this library and as a calibration callback for any Trainer.
- :class:`DigitsTUDataModule`: a torch-uncertainty data module on scikit-learn's digits (offline; every
  data module torch-uncertainty ships downloads its data), ``[test, ood]`` test loaders.

Importing this module needs the extra: ``pip install 'lightning-ensembles[interop]'``.
"""

from __future__ import annotations

import copy
from typing import Any, cast

import torch
from torch import Tensor, nn

from .._checks import check_choice
from ..ensembles.base import Ensemble, OwnObjective, check_member_outputs
from ._names import TU_NAMES
from ._tu import tu
from ._tu_calibration import TUCalibration as TUCalibration  # re-exported (TU_NAMES)
from ._tu_calibration import TUScaler as TUScaler
from ._tu_data import DigitsTUDataModule as DigitsTUDataModule

tu()  # fail on import, with the extra to install, rather than on first use

__all__ = ["KINDS", *TU_NAMES]

#: Which torch-uncertainty ensembles :func:`from_tu_model` wraps, by how they batch members.
KINDS = ("packed", "mimo", "mc_dropout", "batched", "deep")


# ==================================================================== ours -> torch-uncertainty
class TUModel(nn.Module):
    """An :class:`~lightning_ensembles.Ensemble` in torch-uncertainty's layout: ``(B, ...) -> (M * B, ...)``.

    Member-major rows (member ``m``'s prediction for example ``b`` is row ``m * B + b``), what
    ``ClassificationRoutine(is_ensemble=True, format_batch_fn=RepeatTarget(M))`` expects in training
    and evaluation. In training, an ensemble that builds its own training batches (targets other than
    the batch repeated M times: ``batch_mode="split"``, MIMO ``batch_repetition > 1``, MC-dropout
    ``train_samples``) or its own objective (``training_outputs``) is refused with the fix, since the
    routine's ``RepeatTarget`` would pair its outputs with the wrong targets.

    Args:
        ensemble: the ensemble to present in torch-uncertainty's layout.

    Example:
        >>> import torch
        >>> from lightning_ensembles import DeepEnsemble
        >>> from lightning_ensembles.backbones import MLP
        >>> ens = DeepEnsemble(MLP(4, 3, hidden=(8,)), num_members=2)
        >>> tu_model = as_tu_model(ens)
        >>> x = torch.randn(5, 4)
        >>> tu_model(x).shape
        torch.Size([10, 3])
        >>> torch.equal(tu_model(x)[5:], ens(x)[1])  # rows 5..9: member 1
        True
    """

    def __init__(self, ensemble: Ensemble) -> None:
        super().__init__()
        if not isinstance(ensemble, Ensemble):
            raise TypeError(
                f"as_tu_model needs a lightning_ensembles Ensemble, got {type(ensemble).__name__}. Build one first, "
                "e.g. DeepEnsemble(backbone, num_members=4) or build_ensemble('packed', backbone, 4)."
            )
        self.ensemble = ensemble

    @property
    def num_estimators(self) -> int:
        """M, torch-uncertainty's name for the number of members."""
        return self.ensemble.num_members

    def _check_training(self, batch: int) -> None:
        name = type(self.ensemble).__name__
        if isinstance(self.ensemble, OwnObjective):
            raise ValueError(
                f"{name} trains with its own objective (`training_outputs`: transformed inputs, extra loss terms), "
                "which torch-uncertainty's routine cannot call. Train it with EnsembleClassifier and evaluate it "
                "in ClassificationRoutine (trainer.test), or train it in eval-equivalent form elsewhere."
            )
        m = self.num_estimators
        probe = torch.arange(batch)
        targets = self.ensemble.member_targets(probe)
        if tuple(targets.shape) != (m, batch) or not torch.equal(targets, probe.expand(m, batch)):
            raise ValueError(
                f"{name} builds its own training batches in this configuration (its member targets have shape "
                f"{tuple(targets.shape)}, not the batch repeated: ({m}, {batch})), but torch-uncertainty's "
                "RepeatTarget pairs row m * B + b with target b. Configure it so every member sees the whole "
                "batch (batch_mode='repeat', batch_repetition=1, train_samples=None), or train it with "
                "EnsembleClassifier."
            )

    def forward(self, x: Tensor) -> Tensor:
        if self.training:
            self._check_training(x.shape[0])
        out = self.ensemble(x)
        check_member_outputs(out, self.num_estimators, name=f"{type(self.ensemble).__name__} outputs")
        if out.shape[1] != x.shape[0]:
            raise ValueError(
                f"{type(self.ensemble).__name__} returned {out.shape[1]} rows per member for a batch of {x.shape[0]}; "
                "torch-uncertainty's layout needs one row per example and member."
            )
        return out.flatten(0, 1)


def as_tu_model(ensemble: Ensemble) -> TUModel:
    """``ensemble`` as a torch-uncertainty model, ``(B, ...) -> (M * B, ...)`` (see :class:`TUModel`)."""
    return TUModel(ensemble)


def tu_classification_routine(
    ensemble: Ensemble,
    num_classes: int,
    loss: nn.Module | None = None,
    optim_recipe: Any = None,
    **routine_kwargs: Any,
) -> Any:
    """torch-uncertainty's ``ClassificationRoutine`` training and evaluating ``ensemble``.

    Sets what the routine needs for an ensemble: the model in its layout (:func:`as_tu_model`),
    ``is_ensemble=True`` and ``format_batch_fn=RepeatTarget(M)`` (M > 1), and ``loss`` (default
    ``nn.CrossEntropyLoss()``). ``optim_recipe`` is the routine's: an optimizer (or a dict with a
    scheduler), or a callable taking the model. Other keyword arguments go to the routine
    (``eval_ood=True``, ``ood_criterion="mi"`` ...).

    Learning rate: the routine minimises the mean cross-entropy over the ``M * B`` rows, so each
    member's gradient is ``1 / M`` of what it gets from :class:`~lightning_ensembles.EnsembleClassifier`
    (which sums member losses, so that a single model's learning rate trains every member). With SGD
    multiply the learning rate by M to train as EnsembleClassifier does; Adam is invariant to that
    constant (up to its ``eps``). The loss values are equal (the member mean).

    Example:
        >>> import torch
        >>> from lightning_ensembles import DeepEnsemble
        >>> from lightning_ensembles.backbones import MLP
        >>> ens = DeepEnsemble(MLP(64, 10, hidden=(16,)), num_members=3)
        >>> routine = tu_classification_routine(ens, num_classes=10,
        ...                                     optim_recipe=lambda m: torch.optim.Adam(m.parameters(), 1e-3))
        >>> x, y = torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,))
        >>> inputs, targets = routine.format_batch_fn((x, y))
        >>> routine(inputs).shape, targets.shape
        (torch.Size([24, 10]), torch.Size([24]))
    """
    routine_cls = tu("torch_uncertainty.routines").ClassificationRoutine
    repeat_target = tu("torch_uncertainty.transforms").RepeatTarget
    for key in ("model", "is_ensemble", "format_batch_fn"):
        if key in routine_kwargs:
            raise ValueError(
                f"tu_classification_routine sets `{key}` itself; build ClassificationRoutine directly "
                "with model=as_tu_model(ensemble) to choose it."
            )
    model = as_tu_model(ensemble)
    m = model.num_estimators
    return routine_cls(
        model=model,
        num_classes=num_classes,
        loss=nn.CrossEntropyLoss() if loss is None else loss,
        is_ensemble=m > 1,
        format_batch_fn=repeat_target(m) if m > 1 else None,
        optim_recipe=optim_recipe,
        **routine_kwargs,
    )


# ==================================================================== torch-uncertainty -> ours
def _detect_kind(model: nn.Module) -> str:
    methods = tu("torch_uncertainty.methods")
    layers = tu("torch_uncertainty.layers")
    if isinstance(model, tu("torch_uncertainty.methods.mc_dropout")._MCDropout):
        return "mc_dropout"
    if isinstance(model, tu("torch_uncertainty.methods.deep_ensembles")._DeepEnsembles):
        return "deep"
    if any(c.__name__.startswith("_MIMO") for c in type(model).__mro__):
        return "mimo"
    mods = list(model.modules())
    if any(
        isinstance(m, (layers.PackedLinear, layers.PackedConv1d, layers.PackedConv2d, layers.PackedConv3d))
        for m in mods
    ):
        return "packed"
    if isinstance(model, methods.BatchEnsemble) or any(
        isinstance(m, (layers.BatchLinear, layers.BatchConv1d, layers.BatchConv2d)) for m in mods
    ):
        return "batched"
    raise ValueError(
        f"from_tu_model cannot tell which kind of torch-uncertainty ensemble {type(model).__name__} is (no "
        f"packed/BatchEnsemble layer, not a MIMO, MC-dropout or deep-ensemble wrapper). Pass kind= one of {KINDS} "
        "if it batches members as that kind does; a single model is no ensemble: convert it with this library "
        "(method='deep', 'packed', 'mc_dropout' ...)."
    )


def _infer_num_estimators(model: nn.Module) -> int | None:
    for mod in model.modules():
        m = getattr(mod, "num_estimators", None)
        if isinstance(m, int) and not isinstance(m, bool):
            return m
    return None


def _splits_training_batch(model: nn.Module) -> bool:
    """BatchEnsemble models that give each member ``B / M`` of the rows in training instead of repeating."""
    return getattr(model, "repeat_training_inputs", None) is False or getattr(model, "repeat_strategy", None) == "paper"


def mimo_indices(num_members: int, batch: int, input_repetition: float, device: torch.device | None = None) -> Tensor:
    """``(M, B)`` positions each MIMO member reads, drawn as torch-uncertainty's ``MIMOBatchFormat`` draws them.

    One shuffle of the batch; its first ``int(B * (1 - rho))`` positions are shuffled again per member,
    the rest shared (``rho = input_repetition``). Every row is a permutation of ``range(B)``.
    """
    main = torch.randperm(batch, device=device)
    shuffled = int(batch * (1.0 - input_repetition))
    rows = [
        torch.cat([main[:shuffled][torch.randperm(shuffled, device=device)], main[shuffled:]])
        for _ in range(num_members)
    ]
    return torch.stack(rows)


class TUEnsemble(Ensemble):
    """A torch-uncertainty ensemble as an :class:`~lightning_ensembles.Ensemble`: ``(B, ...) -> (M, B, C)``.

    Built by :func:`from_tu_model`; ``model`` is the torch-uncertainty model (trained in place).
    How each kind trains (evaluation is always torch-uncertainty's own forward, rearranged):

    - ``"packed"``, ``"deep"``: the model's forward, ``(M * B, C)`` -> ``(M, B, C)``.
    - ``"mimo"``: the batch formatted as torch-uncertainty's ``MIMOBatchFormat`` does (per-member
      shuffles, shared fraction ``input_repetition``, batch repetition 1) and each member's outputs
      put back in batch order, so the targets are the batch repeated (as in this library's MIMO).
    - ``"mc_dropout"``: one dropout sample per example in training, ``(1, B, C)`` (torch-uncertainty's
      MC-dropout trains as its backbone); ``M`` samples at evaluation.
    - ``"batched"``: every member sees the whole batch (the input is repeated when the model would
      split the batch among members, ``repeat_training_inputs=False`` / ``repeat_strategy="paper"``).

    ``member(i)``: ``"deep"`` gives a copy of model ``i``; ``"packed"``, ``"mimo"`` and ``"batched"`` a
    copy of the whole model that returns output ``i`` (their members share layers, grouped or
    widened, so a member costs the ensemble's forward); ``"mc_dropout"`` raises ``NotImplementedError``
    (torch-uncertainty draws fresh masks at every call: sample ``i`` is not a fixed network).

    Args:
        model: the torch-uncertainty model.
        num_estimators: number of members ``M``.
        kind: ``"packed"``, ``"mimo"``, ``"mc_dropout"``, ``"batched"`` or ``"deep"``, see above.
        input_repetition: ``"mimo"``: fraction of the batch shared by all members in training.
    """

    def __init__(self, model: nn.Module, num_estimators: int, kind: str, input_repetition: float = 0.0) -> None:
        super().__init__(num_estimators)
        check_choice("kind", kind, KINDS)
        if not 0.0 <= input_repetition <= 1.0:
            raise ValueError(f"`input_repetition` must be in [0, 1], got {input_repetition!r}.")
        self.model = model
        self.kind = kind
        self.input_repetition = float(input_repetition)

    def _run(self, x: Tensor, shuffle: bool) -> Tensor:
        """The model's outputs ``(M, B, ...)``; ``shuffle``: MIMO training batches (else the same input per slot)."""
        m, b = self.num_members, x.shape[0]
        perm = None
        if self.kind == "mimo" and self.training:
            # torch-uncertainty's MIMO expects an already formatted (M * B) batch in training.
            perm = mimo_indices(m, b, self.input_repetition, x.device) if shuffle else None
            slots = x[perm] if perm is not None else x.unsqueeze(0).expand(m, *x.shape)
            out = self.model(slots.flatten(0, 1))
        elif self.kind == "batched" and self.training and _splits_training_batch(self.model):
            out = self.model(x.unsqueeze(0).expand(m, *x.shape).flatten(0, 1))
        else:
            out = self.model(x)
        if not isinstance(out, Tensor):
            raise ValueError(
                f"{type(self.model).__name__} returned {type(out).__name__}, not a tensor (a probabilistic regression "
                "head returns a dict of distribution parameters); from_tu_model wraps classification and point outputs."
            )
        if self.kind == "mc_dropout" and self.training:
            if out.shape[0] != b:
                raise ValueError(f"MC-dropout model returned {out.shape[0]} rows in training for a batch of {b}.")
            return out.unsqueeze(0)
        if out.shape[0] != m * b:
            raise ValueError(
                f"{type(self.model).__name__} ({self.kind}) returned {out.shape[0]} rows for a batch of {b}; "
                f"torch-uncertainty's layout with num_estimators={m} has M * B = {m * b}. Pass the model's own "
                "number of estimators as num_estimators (or the right kind=)."
            )
        out = out.unflatten(0, (m, b))
        if perm is not None:
            # out[m, j] predicts example perm[m, j]: put it back at position perm[m, j].
            inverse = torch.argsort(perm, dim=1)
            out = out.gather(1, inverse.view(*inverse.shape, *([1] * (out.dim() - 2))).expand_as(out))
        return out

    def forward(self, x: Tensor) -> Tensor:
        """``(M, B, ...)`` member outputs (``(1, B, ...)`` for MC-dropout in training)."""
        return self._run(x, shuffle=True)

    def member_targets(self, target: Tensor) -> Tensor:
        if self.kind == "mc_dropout" and self.training:
            return target.unsqueeze(0)
        return super().member_targets(target)

    def member(self, index: int) -> nn.Module:
        index = self._check_index(index)
        if self.kind == "mc_dropout":
            raise NotImplementedError(
                "torch-uncertainty's MC-dropout draws new dropout masks at every call, so sample "
                f"{index} is not a fixed network that could be returned. Use lightning_ensembles.MCDropout(backbone, "
                "num_members=M) for seeded samples whose member(i) reproduces output i."
            )
        if self.kind == "deep":
            return copy.deepcopy(cast(nn.ModuleList, self.model.core_models)[index]).train(self.training)
        return _TUMember(copy.deepcopy(self), index).train(self.training)

    def extra_repr(self) -> str:
        extra = f", input_repetition={self.input_repetition}" if self.kind == "mimo" else ""
        return f"num_members={self.num_members}, kind={self.kind!r}{extra}"


class _TUMember(nn.Module):
    """Output ``index`` of a (copied) :class:`TUEnsemble`: ``(B, ...) -> (B, ...)``."""

    def __init__(self, ensemble: TUEnsemble, index: int) -> None:
        super().__init__()
        self.ensemble, self.index = ensemble, index

    def forward(self, x: Tensor) -> Tensor:
        return self.ensemble._run(x, shuffle=False)[self.index]


def from_tu_model(
    model: nn.Module,
    num_estimators: int | None = None,
    kind: str | None = None,
    input_repetition: float = 0.0,
) -> TUEnsemble:
    """A torch-uncertainty ensemble model as an :class:`~lightning_ensembles.Ensemble` (see :class:`TUEnsemble`).

    Args:
        model: built by torch-uncertainty (``packed_resnet``, ``packed_mlp``, ``mimo_resnet``,
            ``mimo_mlp``, ``mc_dropout(...)``, ``batch_ensemble(...)``, ``batched_resnet``,
            ``deep_ensembles(...)`` ...); wrapped, not copied.
        num_estimators: M; by default the model's own ``num_estimators``. A different value is refused.
        kind: one of :data:`KINDS`; detected from the model's layers and class by default.
        input_repetition: MIMO's ``rho`` (torch-uncertainty's ``MIMOBatchFormat(rho=...)``, default 0).

    Example:
        >>> import torch
        >>> from torch_uncertainty.models.mlp import packed_mlp
        >>> tu_model = packed_mlp(in_features=4, num_outputs=3, hidden_dims=[16], num_estimators=2, alpha=2)
        >>> ens = from_tu_model(tu_model)
        >>> ens.kind, ens.num_members
        ('packed', 2)
        >>> x = torch.randn(5, 4)
        >>> torch.equal(ens(x), tu_model(x).unflatten(0, (2, 5)))  # torch-uncertainty's rows, members first
        True
        >>> torch.allclose(ens.member(1)(x), ens(x)[1])
        True
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"from_tu_model needs a torch-uncertainty nn.Module, got {type(model).__name__}.")
    if isinstance(model, TUModel):
        raise TypeError(
            "this model is already a lightning_ensembles ensemble in torch-uncertainty's layout; use its "
            "`.ensemble` attribute."
        )
    kind = _detect_kind(model) if kind is None else kind
    own = _infer_num_estimators(model)
    if num_estimators is None:
        if own is None:
            raise ValueError(f"cannot read the number of estimators of {type(model).__name__}: pass num_estimators=M.")
        num_estimators = own
    elif own is not None and own != num_estimators:
        raise ValueError(
            f"num_estimators={num_estimators} but the model was built with num_estimators={own}; pass "
            f"{own} (or leave it out)."
        )
    return TUEnsemble(model, num_estimators, kind, input_repetition)
