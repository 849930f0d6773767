"""Ensemble distillation into one student: Hinton soft targets, or a multi-head (Hydra) student.

* ``mode="hinton"`` (Hinton et al., 2015): the student matches the ensemble's mean member
  probability at temperature ``T``: ``T^2 KL(mean_i softmax(z_i / T) || softmax(s / T))``.
* ``mode="hydra"`` (Tran et al., 2020): a shared body with one head per teacher member; head ``i``
  matches member ``i`` (``T^2 KL(softmax(z_i / T) || softmax(s_i / T))``, averaged over heads), so the
  student keeps the members' diversity and still reports epistemic uncertainty (mutual information
  between heads) at the cost of one body pass plus M small heads.

Both add ``(1 - alpha)`` times the cross-entropy on the labels (``alpha = 1``: soft targets only).
``mixup > 0`` distils on mixed inputs (:func:`mixup_inputs`), where the members' disagreement shows.
"""

from __future__ import annotations

import copy
from typing import Any, Literal, cast

import torch
import torch.nn.functional as F
from lightning import LightningModule
from lightning.fabric.utilities.data import AttributeDict
from torch import Tensor, nn

from .._checks import check_choice
from ..backbones import resolve_backbone
from ..ensembles.base import Ensemble
from ..ensembles.surgery import set_submodule, set_unregistered
from ..modules._eval_metrics import EnsembleClassificationMetrics
from ..modules.base import _module_args_to_ignore, renamed_kwarg
from ..modules.classifier import predictive_summary

__all__ = ["DistillationModule", "MultiHeadStudent", "distillation_loss", "mixup_inputs"]


def mixup_inputs(x: Tensor, alpha: float) -> Tensor:
    """Convex mixes ``lam * x + (1 - lam) * x[perm]`` with one ``lam ~ Beta(alpha, alpha)`` per sample.

    A transfer set for distillation ("function matching", Beyer et al., 2022): teacher and student see
    the same mixed inputs, so the student learns the ensemble's function between training points, where
    the members disagree, and not only at the training points, where they all fit the labels.
    """
    if alpha <= 0:
        return x
    lam = torch.distributions.Beta(alpha, alpha).sample((x.shape[0],)).to(x.device, x.dtype)
    lam = lam.view(-1, *([1] * (x.dim() - 1)))
    return lam * x + (1 - lam) * x[torch.randperm(x.shape[0], device=x.device)]


def _last_linear(model: nn.Module) -> tuple[str, nn.Linear]:
    found = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not found:
        raise ValueError(
            "MultiHeadStudent needs a backbone whose classifier is an nn.Linear (its last Linear becomes the heads); "
            "this backbone has none. Give a backbone that ends in nn.Linear."
        )
    return found[-1]


class MultiHeadStudent(Ensemble):
    """A backbone whose last ``nn.Linear`` is replaced by ``num_heads`` heads: ``(B, ...) -> (H, B, C)``.

    The body (everything but the last Linear) runs once; the heads are one ``Linear(F, H * C)``. It is
    an :class:`~lightning_ensembles.Ensemble` with H members, so every metric, callback and cascade of
    the library takes it. ``num_heads=1`` is a plain single-head student.

    Args:
        backbone: a module or backbone name whose last ``nn.Linear`` becomes the heads.
        num_heads: number of heads ``H`` (members).
        backbone_kwargs: arguments for a backbone given by name.

    Example:
        >>> import torch
        >>> from lightning_ensembles import MLP
        >>> student = MultiHeadStudent(MLP(8, 3, hidden=(16,)), num_heads=4)
        >>> student(torch.randn(5, 8)).shape
        torch.Size([4, 5, 3])
        >>> torch.allclose(student.member(2)(torch.ones(1, 8)), student(torch.ones(1, 8))[2])
        True
    """

    def __init__(
        self, backbone: nn.Module | str, num_heads: int = 4, backbone_kwargs: dict[str, Any] | None = None
    ) -> None:
        super().__init__(num_heads)
        body = copy.deepcopy(resolve_backbone(backbone, backbone_kwargs))
        path, last = _last_linear(body)
        set_submodule(body, path, nn.Identity())
        self.body = body
        self.in_features, self.num_classes = last.in_features, last.out_features
        self.heads = nn.Linear(last.in_features, num_heads * last.out_features)
        self.head_path = path

    @torch.no_grad()
    def expand_heads(self, num_heads: int) -> MultiHeadStudent:
        """A copy with ``num_heads`` heads, each starting from this student's head ``0`` (Hydra's second phase:
        distil the ensemble mean into one head first, then let the copied heads follow their members)."""
        out = copy.deepcopy(self)
        out.num_members = num_heads
        c = self.num_classes
        out.heads = nn.Linear(self.in_features, num_heads * c).to(self.heads.weight.device)
        out.heads.weight.copy_(self.heads.weight[:c].repeat(num_heads, 1))
        out.heads.bias.copy_(self.heads.bias[:c].repeat(num_heads))
        return out

    def forward(self, x: Tensor) -> Tensor:
        features = self.body(x)
        if features.dim() != 2 or features.shape[-1] != self.in_features:
            raise ValueError(
                f"MultiHeadStudent: the backbone without its last Linear ({self.head_path!r}) returns shape "
                f"{tuple(features.shape)}, expected (B, {self.in_features}); the heads replace that Linear, so it "
                "must be the backbone's final operation. Give a backbone that ends in its classifier Linear."
            )
        return self.heads(features).unflatten(-1, (self.num_members, self.num_classes)).movedim(-2, 0)

    def member(self, index: int) -> nn.Module:
        index = self._check_index(index)
        head = nn.Linear(self.in_features, self.num_classes)
        rows = slice(index * self.num_classes, (index + 1) * self.num_classes)
        with torch.no_grad():
            head.weight.copy_(self.heads.weight[rows])
            head.bias.copy_(self.heads.bias[rows])
        return nn.Sequential(copy.deepcopy(self.body), head.to(self.heads.weight.device)).train(self.training)


def distillation_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    target: Tensor | None = None,
    mode: Literal["hinton", "hydra"] = "hinton",
    temperature: float = 1.0,
    alpha: float = 1.0,
) -> Tensor:
    """Distillation objective of student ``(H, B, C)`` (or ``(B, C)``) from teacher members ``(M, B, C)``.

    ``hinton``: every student head matches the ensemble mean at ``temperature``; ``hydra``: head ``i``
    matches member ``i`` (needs ``H == M``). Plus ``(1 - alpha)`` x cross-entropy on ``target``.

    Example:
        >>> import torch
        >>> t = torch.randn(3, 4, 5)
        >>> float(distillation_loss(t, t, mode="hydra")) < 1e-6   # each head equals its member
        True
        >>> float(distillation_loss(t.mean(0), t)) > 0            # one head cannot equal three members
        True
    """
    if student_logits.dim() == 2:
        student_logits = student_logits.unsqueeze(0)
    if teacher_logits.dim() != 3 or student_logits.dim() != 3 or student_logits.shape[1:] != teacher_logits.shape[1:]:
        raise ValueError(
            f"student logits (H, B, C) {tuple(student_logits.shape)} and teacher member logits (M, B, C) "
            f"{tuple(teacher_logits.shape)} must share batch and class axes."
        )
    if temperature <= 0 or not 0.0 <= alpha <= 1.0:
        raise ValueError(f"`temperature` must be > 0 and `alpha` in [0, 1]; got {temperature}, {alpha}.")
    t = temperature
    log_q = F.log_softmax(student_logits.float() / t, dim=-1)  # (H, B, C)
    teacher = teacher_logits.detach().float()
    if check_choice("mode", mode, ("hinton", "hydra")) == "hinton":
        p = F.softmax(teacher / t, dim=-1).mean(0, keepdim=True).expand_as(log_q)
    else:
        if student_logits.shape[0] != teacher.shape[0]:
            raise ValueError(
                f"mode='hydra' pairs head i with member i: the student has {student_logits.shape[0]} heads and the "
                f"teacher {teacher.shape[0]} members. Build the student with num_heads={teacher.shape[0]}."
            )
        p = F.softmax(teacher / t, dim=-1)
    kl = (p * (p.clamp_min(1e-12).log() - log_q)).sum(-1).mean()  # mean over heads and samples
    loss = alpha * t * t * kl
    if alpha < 1.0:
        if target is None:
            raise ValueError("alpha < 1 adds the label cross-entropy: pass `target`.")
        ce = F.cross_entropy(student_logits.flatten(0, 1), target.repeat(student_logits.shape[0]))
        loss = loss + (1.0 - alpha) * ce
    return loss


class DistillationModule(LightningModule):
    """Distil a trained ensemble (a checkpoint of :class:`~lightning_ensembles.EnsembleClassifier`) into one student.

    Args:
        teacher_checkpoint: path of the trained ensemble's checkpoint. It is opened with
            ``torch.load(weights_only=True)`` and rebuilt by ``EnsembleClassifier.load_from_checkpoint``
            (backbone names resolve through the allowlist of :mod:`lightning_ensembles.backbones`), only
            when training starts: loading a trained student needs no teacher.
        student: the student backbone (module, timm name, ``"mlp"`` or allowed dotted path), any
            architecture whose classifier is a final ``nn.Linear``.
        mode: ``"hinton"`` (one head, ensemble-mean soft targets) or ``"hydra"`` (one head per member).
        num_heads: heads of the student; default 1 for ``hinton`` and the teacher's M for ``hydra``.
        temperature, alpha: see :func:`distillation_loss`.
        mixup: ``Beta(mixup, mixup)`` mixing of the inputs of the soft-target term (0: the training inputs
            as they are); the label term, if any, uses the unmixed inputs.
        teacher_kwargs: extra arguments for ``load_from_checkpoint`` (e.g. a ``backbone`` module the
            checkpoint could not store).
        teacher: an in-memory teacher ``Ensemble`` instead of a checkpoint (Python use; not saved).

    The student is a :class:`MultiHeadStudent`, ``forward(x) -> (H, B, C)``. Validation/test log
    ``acc, nll, brier, ece, disagreement, mutual_information`` of the student's mean prediction;
    ``predict_step`` returns the same dict as ``EnsembleClassifier``.

    Example:
        >>> import torch
        >>> from lightning_ensembles import DeepEnsemble, MLP
        >>> teacher = DeepEnsemble(MLP(8, 3, hidden=(16,)), num_members=4)
        >>> module = DistillationModule(student=MLP(8, 3, hidden=(16,)), mode="hydra", num_heads=4, teacher=teacher)
        >>> x, y = torch.randn(6, 8), torch.randint(0, 3, (6,))
        >>> module(x).shape, bool(module.training_step((x, y), 0) > 0)
        (torch.Size([4, 6, 3]), True)
    """

    def __init__(
        self,
        teacher_checkpoint: str | None = None,
        student: nn.Module | str = "mlp",
        student_kwargs: dict[str, Any] | None = None,
        mode: Literal["hinton", "hydra"] = "hinton",
        num_heads: int | None = None,
        temperature: float = 1.0,
        alpha: float = 1.0,
        mixup: float = 0.0,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        n_bins: int = 15,
        teacher_kwargs: dict[str, Any] | None = None,
        teacher: Ensemble | None = None,
        ece_bins: int | None = None,
    ) -> None:
        super().__init__()
        n_bins = renamed_kwarg("DistillationModule", "ece_bins", ece_bins, "n_bins", n_bins)
        check_choice("mode", mode, ("hinton", "hydra"))
        if (teacher_checkpoint is None) == (teacher is None):
            raise ValueError(
                "Give exactly one of `teacher_checkpoint` (a trained EnsembleClassifier checkpoint) or `teacher`."
            )
        if teacher is not None and not isinstance(teacher, Ensemble):
            raise ValueError(f"`teacher` must be a lightning_ensembles Ensemble, got {type(teacher).__name__}.")
        if temperature <= 0 or not 0.0 <= alpha <= 1.0 or lr <= 0 or mixup < 0:
            raise ValueError(
                f"need temperature > 0, alpha in [0, 1], mixup >= 0 and lr > 0; got {temperature}, {alpha}, {mixup}, {lr}."
            )
        if num_heads is None:
            if mode == "hydra":
                num_heads = (
                    teacher.num_members if teacher is not None else _checkpoint_members(cast(str, teacher_checkpoint))
                )  # given: no teacher
            else:
                num_heads = 1
        if mode == "hydra" and teacher is not None and num_heads != teacher.num_members:
            raise ValueError(
                f"mode='hydra' needs one head per member: num_heads={teacher.num_members}, got {num_heads}."
            )
        ignore = _module_args_to_ignore({"student": student}) + ["teacher", "ece_bins"]
        self.save_hyperparameters(ignore=ignore)
        self.hparams["num_heads"] = num_heads
        self.student = MultiHeadStudent(student, num_heads, student_kwargs)
        # The teacher is kept out of the module tree: not trained, not saved, not switched to train mode.
        set_unregistered(self, "_teacher", None if teacher is None else teacher.eval())
        self._metrics: dict[str, EnsembleClassificationMetrics] = {}

    @property
    def hparams(self) -> AttributeDict:
        """Lightning's ``hparams`` (an :class:`AttributeDict` once ``save_hyperparameters`` ran), typed as such."""
        return cast(AttributeDict, super().hparams)

    # ---------------------------------------------------------------- teacher
    @property
    def teacher(self) -> Ensemble:
        """The teacher ensemble, loaded from ``teacher_checkpoint`` on first use."""
        if self.__dict__["_teacher"] is None:
            set_unregistered(
                self, "_teacher", load_teacher(self.hparams.teacher_checkpoint, self.hparams.teacher_kwargs)
            )
        teacher = self.__dict__["_teacher"]
        return teacher.to(self.device).eval()

    def on_fit_start(self) -> None:
        teacher = self.teacher
        if self.hparams.mode == "hydra" and teacher.num_members != self.student.num_members:
            raise ValueError(
                f"mode='hydra' needs one head per member: the teacher has {teacher.num_members} members, the student "
                f"{self.student.num_members} heads. Set num_heads={teacher.num_members}."
            )

    # ---------------------------------------------------------------- training
    def forward(self, x: Tensor) -> Tensor:
        """Student head logits ``(H, B, C)``."""
        return self.student(x)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        hp = self.hparams
        xs = mixup_inputs(x, hp.mixup)
        with torch.no_grad():
            teacher_logits = self.teacher(xs)
        loss = distillation_loss(self(xs), teacher_logits, mode=hp.mode, temperature=hp.temperature, alpha=1.0)
        loss = hp.alpha * loss
        if hp.alpha < 1.0:
            out = self(x)
            loss = loss + (1.0 - hp.alpha) * F.cross_entropy(out.flatten(0, 1), y.repeat(out.shape[0]))
        self.log("train/loss", loss.detach(), prog_bar=True)
        return loss

    def configure_optimizers(self):
        return torch.optim.Adam(self.student.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)

    # ---------------------------------------------------------------- evaluation
    def _eval_step(self, stage: str, batch: Any) -> dict[str, Tensor]:
        x, y = batch
        logits = self(x)
        if stage not in self._metrics:
            self._metrics[stage] = EnsembleClassificationMetrics(
                logits.shape[-1], logits.shape[0], self.hparams.n_bins
            ).to(self.device)
        self._metrics[stage].update(logits, y)
        return {"member_logits": logits, "target": y}

    def _eval_end(self, stage: str) -> None:
        metrics = self._metrics.pop(stage, None)
        if metrics is not None:
            values = metrics.compute()
            self.log_dict({f"{stage}/{k}": v for k, v in values.items() if "/" not in k})

    def validation_step(self, batch: Any, batch_idx: int) -> dict[str, Tensor]:
        return self._eval_step("val", batch)

    def test_step(self, batch: Any, batch_idx: int) -> dict[str, Tensor]:
        return self._eval_step("test", batch)

    def on_validation_epoch_end(self) -> None:
        self._eval_end("val")

    def on_test_epoch_end(self) -> None:
        self._eval_end("test")

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> dict[str, Tensor]:
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        return predictive_summary(self(x).softmax(-1))


def _checkpoint_members(checkpoint: str) -> int:
    """The member count a teacher checkpoint records (read with ``weights_only=True``)."""
    hparams = torch.load(checkpoint, map_location="cpu", weights_only=True).get("hyper_parameters", {})
    ensemble_hparams = hparams.get("ensemble")
    if isinstance(ensemble_hparams, dict):  # a LightningCLI-built ensemble: its init_args
        m = ensemble_hparams.get("init_args", {}).get("num_members")
        if isinstance(m, int):
            return m
    # Only an ensemble built from a backbone *name* has `num_members` as its true count (a passed module is
    # not stored, and `num_members` then keeps its default).
    if not isinstance(hparams.get("backbone"), (str, dict)) or not isinstance(hparams.get("num_members"), int):
        raise ValueError(
            f"cannot read the member count of {checkpoint!r}: give `num_heads` (the teacher's number of members)."
        )
    return int(hparams["num_members"])


def load_teacher(checkpoint: str, teacher_kwargs: dict[str, Any] | None = None) -> Ensemble:
    """The ensemble of an ``EnsembleClassifier`` checkpoint, loaded with ``weights_only=True`` on CPU."""
    from ..modules import EnsembleClassifier

    module = EnsembleClassifier.load_from_checkpoint(
        checkpoint, map_location="cpu", weights_only=True, **(teacher_kwargs or {})
    )
    return module.ensemble.eval()
