"""EnsembleClassifier: a LightningModule that trains and evaluates any classification ensemble."""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from .._checks import check_choice, check_targets
from ..ensembles.base import Ensemble, aggregate_probs
from ..ensembles.evidential import DirichletHead
from ..losses.base import Regularizer
from ..losses.evidential import annealing_coefficient, dirichlet_uncertainty, evidential_classification_loss
from ..metrics.dense import DenseMetrics
from ..metrics.multilabel import MultilabelMetrics
from ._eval_metrics import EnsembleClassificationMetrics, OODMetrics
from ._optim import OptimizerSpec, SchedulerSpec
from .base import EnsembleModule, _module_args_to_ignore, renamed_kwarg


def check_class_targets(outputs: Tensor, target: Tensor) -> None:
    """``ValueError`` unless ``target`` holds one class index per member output row.

    ``outputs`` is ``(M, B, C)``; ``target`` is ``(B,)`` or, per member, ``(M, B)``.
    """
    batch = outputs.shape[1]
    if target.shape == outputs.shape[:2]:  # one row of targets per member: check them as one (M * B,) batch
        target, batch = target.reshape(-1), target.numel()
    check_targets(
        target,
        batch,
        outputs.shape[-1],
        name="targets",
        hint="Set the backbone's number of outputs to the number of classes.",
    )


class EnsembleClassifier(EnsembleModule):
    """Train any classification :class:`~lightning_ensembles.Ensemble` with Lightning.

    Give either a built ``ensemble`` or a ``backbone`` (module, timm name, ``"mlp"`` or dotted path)
    with ``method`` (``"deep"``, ``"packed"``, ``"batch"``, ``"lora"``, ...) and ``num_members``.

    Training: every member gets its own cross-entropy on the whole batch; the logged ``train/loss``
    is the member mean (see the learning-rate convention of :class:`EnsembleModule`), plus weighted
    ``regularizers`` (each logged as ``train/<name>``).

    Validation/test log, for the ensemble (mean of member softmax probabilities): ``acc``, ``nll``,
    ``brier``, ``ece`` (15 bins), and ``member_acc/<i>``, ``member_nll/<i>`` ..., ``disagreement``
    (mean pairwise argmax disagreement) and ``mutual_information``. With several test dataloaders,
    dataloader ``k > 0`` logs under ``test_dl<k>/``; the dataloader at ``ood_dataloader_idx`` (default
    1) is treated as out-of-distribution against dataloader 0 and logs OOD AUROC/AUPR/FPR95 for each
    score in ``ood_scores`` (default all: maximum probability, predictive entropy, mutual information,
    variation ratio, maximum logit, energy; ``test/ood_auroc_msp``, ``test/ood_auroc_energy`` ...).

    ``predict_step`` returns ``{"probs", "member_probs", "entropy", "mutual_information"}``.

    Beyond softmax logits (``docs/beyond_logits.md``): ``loss="evidential"`` turns the backbone's outputs
    into Dirichlet parameters (:class:`~lightning_ensembles.DirichletHead`, ``log alpha`` used as logits)
    trained with Sensoy et al.'s loss, its KL term annealed over ``evidential_annealing_epochs``; the mean
    vacuity is logged (``val/vacuity``) and returned by ``predict_step`` (``"vacuity"``).
    ``task="multilabel"``: outputs ``(M, B, L)``, targets ``(B, L)`` 0/1, per-label binary cross-entropy,
    mean member sigmoid, multilabel metrics (``label_acc``, ``exact_match``, ``nll``, ``brier``, ``ece``
    and ``ece/<label>``). ``task="dense"``: outputs ``(M, B, C, *spatial)``, targets ``(B, *spatial)``
    (``ignore_index`` left out), per-pixel cross-entropy and metrics (``pixel_acc``, ``miou``, ``nll``,
    ``brier``, ``ece``); the evaluation and predict steps also return pixels as samples (``member_logits``
    ``(M, N, C)``, ``N = B * H * W`` in row-major order), so the calibration callbacks work per pixel.

    Args:
        ensemble: a built :class:`~lightning_ensembles.Ensemble` (give this or ``backbone``).
        backbone: the model each member is: a module, a timm name, ``"mlp"`` or a dotted path; its outputs are the
            class logits.
        method: how ``backbone`` is ensembled: ``"deep"``, ``"packed"``, ``"batch"``, ``"lora"``, ... (see
            ``build_ensemble``).
        num_members: number of members ``M``.
        backbone_kwargs: arguments for a backbone given by name.
        ensemble_kwargs: extra arguments of the ensemble ``method``.
        optimizer: an optimizer name (``"adam"``, ``"adamw"`` or ``"sgd"``) or a callable ``params -> Optimizer``.
        lr: learning rate (see the learning-rate convention of :class:`EnsembleModule`).
        weight_decay: weight decay of the optimizer.
        momentum: momentum of SGD.
        scheduler: a scheduler name (``"none"`` or ``"cosine"``) or a callable ``optimizer -> scheduler``.
        regularizers: extra training terms (:class:`~lightning_ensembles.losses.Regularizer`, e.g.
            :class:`~lightning_ensembles.losses.JensenShannon`), each weighted by its ``weight``.
        label_smoothing: label smoothing of the member cross-entropy, in ``[0, 1)``.
        n_bins: bins of the logged ECE (``ece``).
        ood_dataloader_idx: the test dataloader treated as out-of-distribution (``None``: none).
        loss: ``"cross_entropy"`` or ``"evidential"``.
        task: ``"multiclass"``, ``"multilabel"`` or ``"dense"``.
        ignore_index: ``task="dense"``: the target value left out of the loss and the metrics.
        evidential_annealing_epochs: ``loss="evidential"``: epochs over which the KL term is annealed in.
        ood_scores: the OOD scores logged (default all).
        ece_bins: deprecated name of ``n_bins``.

    Example:
        >>> import lightning as L
        >>> from lightning_ensembles import EnsembleClassifier
        >>> from lightning_ensembles.data import DigitsDataModule
        >>> model = EnsembleClassifier(backbone="mlp", num_members=2,
        ...                            backbone_kwargs={"in_features": 64, "out_features": 10})
        >>> trainer = L.Trainer(max_epochs=1, logger=False, enable_progress_bar=False,
        ...                     enable_checkpointing=False, enable_model_summary=False)
        >>> trainer.fit(model, DigitsDataModule())
        >>> 0.0 < float(trainer.callback_metrics["val/acc"]) <= 1.0
        True
    """

    def __init__(
        self,
        ensemble: Ensemble | None = None,
        backbone: nn.Module | str | None = None,
        method: str = "deep",
        num_members: int = 4,
        backbone_kwargs: dict[str, Any] | None = None,
        ensemble_kwargs: dict[str, Any] | None = None,
        optimizer: OptimizerSpec = "adam",
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        momentum: float = 0.9,
        scheduler: SchedulerSpec = "none",
        regularizers: list[Regularizer] | None = None,
        label_smoothing: float = 0.0,
        n_bins: int = 15,
        ood_dataloader_idx: int | None = 1,
        loss: str = "cross_entropy",
        task: str = "multiclass",
        ignore_index: int | None = None,
        evidential_annealing_epochs: int = 10,
        ood_scores: list[str] | None = None,
        ece_bins: int | None = None,
    ) -> None:
        n_bins = renamed_kwarg("EnsembleClassifier", "ece_bins", ece_bins, "n_bins", n_bins)
        check_choice("loss", loss, ("cross_entropy", "evidential"))
        check_choice("task", task, ("multiclass", "multilabel", "dense"))
        if ood_scores is not None:
            OODMetrics(ood_scores)  # refuses unknown score names now, not at test time
        if loss == "evidential" and task != "multiclass":
            raise ValueError(
                f"loss='evidential' (a Dirichlet over classes) needs task='multiclass', got task={task!r}."
            )
        head, head_kwargs = backbone, backbone_kwargs  # (issue 19) evidential: the backbone's head becomes Dirichlet
        if loss == "evidential" and backbone is not None and not isinstance(backbone, DirichletHead):
            head, head_kwargs = DirichletHead(backbone, backbone_kwargs=backbone_kwargs), None
        super().__init__(
            ensemble,
            head,
            method,
            num_members,
            head_kwargs,
            ensemble_kwargs,
            optimizer,
            lr,
            weight_decay,
            momentum,
            scheduler,
            regularizers,
        )
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"`label_smoothing` must be in [0, 1), got {label_smoothing}.")
        self.save_hyperparameters(
            ignore=[*_module_args_to_ignore({"ensemble": ensemble, "backbone": backbone}), "ece_bins"]
        )
        self._plain_hyperparameters()
        self._metrics: dict[tuple[str, int], Any] = {}
        self._ood: Any = None
        self.last_test_results: dict[int, dict[str, float]] = {}

    # ---------------------------------------------------------------- training
    def member_loss(self, outputs: Tensor, target: Tensor) -> Tensor:
        if self.hparams.task != "multiclass":
            return self._dense_or_multilabel_loss(outputs, target)
        if target.dim() != 1:
            check_class_targets(outputs, target)  # raises with the shapes
        per_member = self.ensemble.member_targets(target)  # (M, B'): repeated, or split among members
        check_class_targets(outputs, per_member)
        if self.hparams.loss == "evidential":  # outputs are log alpha (DirichletHead); Sensoy et al.'s annealed loss
            kl = annealing_coefficient(self.current_epoch, self.hparams.evidential_annealing_epochs)
            return evidential_classification_loss(outputs.exp(), per_member, kl)
        # Each member's own cross-entropy on its samples, averaged over members.
        return F.cross_entropy(
            outputs.flatten(0, 1), per_member.flatten(), label_smoothing=self.hparams.label_smoothing
        )

    def _dense_or_multilabel_loss(self, outputs: Tensor, target: Tensor) -> Tensor:
        per_member = self.ensemble.member_targets(target)
        if (
            per_member.shape[:2] != outputs.shape[:2]
            or (self.hparams.task == "multilabel" and per_member.shape != outputs.shape)
            or (self.hparams.task == "dense" and per_member.shape[2:] != outputs.shape[3:])
        ):
            want = "(B, L) 0/1 labels" if self.hparams.task == "multilabel" else "(B, *spatial) class indices"
            raise ValueError(
                f"task={self.hparams.task!r}: targets of shape {tuple(target.shape)} do not fit member outputs "
                f"{tuple(outputs.shape)}; expected {want}."
            )
        if self.hparams.task == "multilabel":  # every member's own binary cross-entropy per label
            return F.binary_cross_entropy_with_logits(outputs, per_member.to(outputs.dtype))
        ignore = -100 if self.hparams.ignore_index is None else self.hparams.ignore_index
        return F.cross_entropy(
            outputs.flatten(0, 1),
            per_member.flatten(0, 1),
            ignore_index=ignore,
            label_smoothing=self.hparams.label_smoothing,
        )

    # ---------------------------------------------------------------- evaluation
    def _metric_set(self, stage: str, dataloader_idx: int, num_classes: int, num_members: int):
        key = (stage, dataloader_idx)
        if key not in self._metrics and self.hparams.task != "multiclass":
            bins = self.hparams.n_bins
            task_metrics = (
                DenseMetrics(num_classes, self.hparams.ignore_index, bins)
                if self.hparams.task == "dense"
                else MultilabelMetrics(num_classes, bins)
            )
            self._metrics[key] = task_metrics.to(self.device)
        if key not in self._metrics:
            self._metrics[key] = EnsembleClassificationMetrics(num_classes, num_members, self.hparams.n_bins).to(
                self.device
            )
        return self._metrics[key]

    def _is_ood(self, stage: str, dataloader_idx: int) -> bool:
        return stage == "test" and dataloader_idx > 0 and dataloader_idx == self.hparams.ood_dataloader_idx

    def _eval_step(self, stage: str, batch: Any, dataloader_idx: int) -> dict[str, Tensor]:
        x, y = batch
        logits = self(x)
        if self.hparams.task != "multiclass":
            return self._eval_dense_or_multilabel(stage, dataloader_idx, logits, y)
        if self.hparams.loss == "evidential":
            vacuity = dirichlet_uncertainty(logits.detach().float())["vacuity"].mean()
            self.log(f"{self._stage_prefix(stage, dataloader_idx)}/vacuity", vacuity, add_dataloader_idx=False)
        if self._is_ood(stage, dataloader_idx):
            # OOD samples have no valid label in the model's classes: only their scores count.
            self._ood_metrics().update(logits, is_ood=True)
            return {"member_logits": logits}
        check_class_targets(logits, y)
        self._metric_set(stage, dataloader_idx, logits.shape[-1], logits.shape[0]).update(logits, y)
        if stage == "test" and self.hparams.ood_dataloader_idx is not None and dataloader_idx == 0:
            self._ood_metrics().update(logits, is_ood=False)
        return {"member_logits": logits, "probs": aggregate_probs(logits), "target": y}

    def _eval_dense_or_multilabel(
        self, stage: str, dataloader_idx: int, logits: Tensor, y: Tensor
    ) -> dict[str, Tensor]:
        if self.hparams.task == "multilabel":
            self._metric_set(stage, dataloader_idx, logits.shape[-1], logits.shape[0]).update(logits, y)
            return {"multilabel_probs": logits.detach().sigmoid().mean(0), "target": y}
        self._metric_set(stage, dataloader_idx, logits.shape[2], logits.shape[0]).update(logits, y)
        # Pixels as samples (M, N, C): the calibration callbacks (temperature, post-hoc maps, metrics) apply per pixel.
        pixel_logits = logits.movedim(2, -1).reshape(logits.shape[0], -1, logits.shape[2])
        flat = y.reshape(-1)
        if self.hparams.ignore_index is not None:
            keep = flat != self.hparams.ignore_index
            pixel_logits, flat = pixel_logits[:, keep], flat[keep]
        return {"member_logits": pixel_logits, "target": flat}

    def _ood_metrics(self):
        if self._ood is None:
            self._ood = OODMetrics(self.hparams.ood_scores).to(self.device)
        return self._ood

    def _eval_epoch_end(self, stage: str) -> None:
        results: dict[int, dict[str, float]] = {}
        for (s, idx), metrics in sorted(self._metrics.items()):
            if s != stage:
                continue
            values = metrics.compute()
            prefix = self._stage_prefix(stage, idx)
            self.log_dict({f"{prefix}/{k}": v for k, v in values.items()}, sync_dist=False, add_dataloader_idx=False)
            results[idx] = {k: float(v) for k, v in values.items()}
            metrics.reset()
        if stage == "test" and self._ood is not None and self._ood.has_both():
            values = self._ood.compute()
            self.log_dict({f"test/{k}": v for k, v in values.items()}, add_dataloader_idx=False)
            results.setdefault(0, {}).update({k: float(v) for k, v in values.items()})
        if self._ood is not None and stage == "test":
            self._ood.reset()
        if stage == "test":
            self.last_test_results = results

    def _reset_metrics(self, stage: str) -> None:
        # Built afresh each epoch: callbacks (SWAG sampling, snapshots) may change the member count.
        self._metrics = {k: v for k, v in self._metrics.items() if k[0] != stage}
        if stage == "test":
            self._ood = None

    def on_validation_epoch_start(self) -> None:
        self._reset_metrics("val")

    def on_test_epoch_start(self) -> None:
        self._reset_metrics("test")

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> dict[str, Tensor]:
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        outputs = self(x)
        if self.hparams.task == "multilabel":
            member_probs = outputs.sigmoid()
            return {"probs": member_probs.mean(0), "member_probs": member_probs}
        axis = 2 if self.hparams.task == "dense" else -1  # dense: the class axis of (M, B, C, *spatial)
        out = predictive_summary(outputs.softmax(dim=axis), class_axis=axis)
        if self.hparams.loss == "evidential":  # Dirichlet vacuity K / S, mean over members
            out["vacuity"] = dirichlet_uncertainty(outputs.float())["vacuity"].mean(0)
        if self.hparams.task == "dense":  # pixels as samples (M, B * prod(spatial), C), for the calibration callbacks
            out["member_logits"] = outputs.movedim(2, -1).reshape(outputs.shape[0], -1, outputs.shape[2])
        return out


def predictive_summary(member_probs: Tensor, class_axis: int = -1) -> dict[str, Tensor]:
    """``probs`` (the member mean), ``member_probs``, ``entropy`` and ``mutual_information`` of member probabilities.

    ``member_probs`` is ``(M, B, ...)`` with the classes on ``class_axis``; entropies are in nats.

    Example:
        >>> import torch
        >>> out = predictive_summary(torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]]))  # two certain members disagree
        >>> out["probs"], round(float(out["mutual_information"]), 4)
        (tensor([[0.5000, 0.5000]]), 0.6931)
    """
    probs = member_probs.mean(dim=0)
    entropy = -(probs * probs.clamp_min(1e-12).log()).sum(class_axis if class_axis < 0 else class_axis - 1)
    member_entropy = -(member_probs * member_probs.clamp_min(1e-12).log()).sum(class_axis).mean(0)
    return {
        "probs": probs,
        "member_probs": member_probs,
        "entropy": entropy,
        "mutual_information": entropy - member_entropy,
    }


def format_report(results: dict[str, float], title: str = "test") -> str:
    """Accuracy, NLL, Brier and ECE of the ensemble and each member as an aligned GitHub-markdown table.

    One row for the ensemble, one per member (``member_<metric>/<i>`` keys) and their mean; numbers
    right-aligned under a header rule, so the text reads as a table in a terminal and renders as one
    when pasted into a README or an issue. Metrics missing from ``results`` are left out; a missing
    per-member value shows as ``-``.

    Example:
        >>> print(format_report({"acc": 0.9, "nll": 0.3, "member_acc/0": 0.8, "member_nll/0": 0.5}))
        test: ensemble vs members
        | model       |    acc |    nll |
        |:------------|-------:|-------:|
        | ensemble    | 0.9000 | 0.3000 |
        | member 0    | 0.8000 | 0.5000 |
        | member mean | 0.8000 | 0.5000 |
    """
    cols = [c for c in ("acc", "nll", "brier", "ece") if c in results]
    num_members = sum(1 for k in results if k.startswith("member_acc/"))

    def value(key: str) -> float | None:
        v = results.get(key)
        return None if v is None else float(v)

    def member_mean(c: str) -> float | None:
        vals = [v for i in range(num_members) if (v := value(f"member_{c}/{i}")) is not None]
        return sum(vals) / num_members if len(vals) == num_members else None

    rows = [("ensemble", [value(c) for c in cols])]
    rows += [(f"member {i}", [value(f"member_{c}/{i}") for c in cols]) for i in range(num_members)]
    if num_members:  # results without per-member keys (e.g. a plain model's) get the ensemble row only
        rows.append(("member mean", [member_mean(c) for c in cols]))
    cells = [[name] + ["-" if v is None else f"{v:.4f}" for v in vals] for name, vals in rows]
    width = [max(len(h), *(len(r[j]) for r in cells)) for j, h in enumerate(["model", *cols])]
    header = (
        "| "
        + " | ".join(h.ljust(width[0]) if j == 0 else h.rjust(width[j]) for j, h in enumerate(["model", *cols]))
        + " |"
    )
    rule = "|:" + "-" * (width[0] + 1) + "|" + "|".join("-" * (w + 1) + ":" for w in width[1:]) + "|"
    body = [
        "| " + " | ".join(c.ljust(width[0]) if j == 0 else c.rjust(width[j]) for j, c in enumerate(r)) + " |"
        for r in cells
    ]
    return "\n".join([f"{title}: ensemble vs members", header, rule, *body])
