"""Early-exit cascade evaluation for ``trainer.test`` / ``trainer.predict`` of any ensemble module."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor

from ..inference.cascade import EnsembleCascade, prediction_metrics
from ..inference.macs import MacCounter
from ._base import Stage, batch_end_hook, module_ensemble

__all__ = ["CascadeEvaluation"]


def _inputs_targets(batch: Any) -> tuple[Tensor, Tensor | None]:
    if isinstance(batch, Tensor):
        return batch, None
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], Tensor):
        y = batch[1] if len(batch) > 1 and isinstance(batch[1], Tensor) else None
        return batch[0], y
    raise ValueError(
        "CascadeEvaluation reads batches as `x` or `(x, y)` tensors; got "
        f"{type(batch).__name__}. Use a dataloader that yields (inputs, targets)."
    )


class CascadeEvaluation(Callback):
    """Run an :class:`~lightning_ensembles.inference.EnsembleCascade` over the module's ensemble in test/predict.

    At the start of ``trainer.test``/``trainer.predict`` the cascade is built from ``pl_module.ensemble``
    (any :class:`~lightning_ensembles.Ensemble`, e.g. of :class:`~lightning_ensembles.EnsembleClassifier`)
    and its windows are fitted on the datamodule's validation data (``width="auto"``: the cheapest width
    within ``accuracy_tolerance`` / ``coverage_tolerance`` of the full ensemble there, see
    :meth:`EnsembleCascade.fit_width`).

    Test: logs ``test/cascade_acc``, ``_nll``, ``_ece``, ``_coverage_at_risk``, ``_aurc``,
    ``_macs_per_sample`` (counted with ``FlopCounterMode``), ``_members_per_sample``, ``_width`` and, with
    an OOD test dataloader at ``ood_dataloader_idx``, ``_ood_auroc`` / ``_ood_fpr95``; the values are also
    in ``callback.results``. Predict: adds ``cascade_probs``, ``cascade_score`` and ``cascade_members_used``
    to each step's output dict.

    Args:
        exit_rule: ``"window"`` or ``"confidence"``: when the cascade stops adding members.
        decision: ``"selective"`` (risk control) or ``"ood"`` (OOD detection at ``target_tpr``).
        target_risk: the selective risk the decision threshold is set for.
        target_tpr: the in-distribution true-positive rate of the OOD threshold.
        width: window half-width in quantile units of the validation uncertainty (``float("inf")`` runs every
            member), or ``"auto"``: the cheapest within the tolerances, fitted on validation data.
        accuracy_tolerance, coverage_tolerance: how far below the full ensemble ``width="auto"`` may go.
        score: ``"msp"`` or ``"entropy"``: the confidence score.
        ood_dataloader_idx: the test dataloader with OOD data (``None``: none).

    Example:
        >>> import lightning as L
        >>> from lightning_ensembles import MLP, EnsembleClassifier
        >>> from lightning_ensembles.data import DigitsDataModule
        >>> model = EnsembleClassifier(backbone=MLP(64, 10), num_members=2)
        >>> cb = CascadeEvaluation(width=float("inf"))
        >>> trainer = L.Trainer(max_epochs=1, logger=False, enable_progress_bar=False, callbacks=[cb],
        ...                     enable_checkpointing=False, enable_model_summary=False)
        >>> trainer.fit(model, DigitsDataModule())
        >>> _ = trainer.test(model, DigitsDataModule(), verbose=False)
        >>> cb.results["members_per_sample"]
        2.0
    """

    def __init__(
        self,
        exit_rule: Literal["window", "confidence"] = "window",
        decision: Literal["selective", "ood"] = "selective",
        target_risk: float = 0.05,
        target_tpr: float = 0.95,
        width: float | Literal["auto"] = "auto",
        accuracy_tolerance: float = 0.005,
        coverage_tolerance: float = 0.01,
        score: Literal["msp", "entropy"] = "msp",
        ood_dataloader_idx: int | None = 1,
    ) -> None:
        super().__init__()
        if width != "auto":
            EnsembleCascade._check_width(width)
        self.exit_rule, self.decision, self.score = exit_rule, decision, score
        self.target_risk, self.target_tpr, self.width = target_risk, target_tpr, width
        self.accuracy_tolerance, self.coverage_tolerance = accuracy_tolerance, coverage_tolerance
        self.ood_dataloader_idx = ood_dataloader_idx
        self.cascade: EnsembleCascade | None = None
        self.results: dict[str, float] = {}
        self._parts: dict[int, list[tuple[Tensor, Tensor, Tensor, Tensor | None]]] = {}
        self._macs: dict[int, int] = {}

    # ------------------------------------------------------------------ building
    def _build(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        ensemble = module_ensemble(
            pl_module, "CascadeEvaluation", "Use EnsembleClassifier (or give your module an `ensemble` attribute)."
        )
        datamodule = getattr(trainer, "datamodule", None)
        if datamodule is None or not hasattr(datamodule, "val_dataloader"):
            raise ValueError(
                "CascadeEvaluation fits its windows on validation data: pass a datamodule with a `val_dataloader` "
                "to trainer.test/predict (e.g. `trainer.test(model, datamodule=dm)`)."
            )
        if hasattr(datamodule, "setup"):
            datamodule.setup("validate")
        xs, ys = [], []
        for batch in datamodule.val_dataloader():
            x, y = _inputs_targets(batch)
            xs.append(x)
            if y is not None:
                ys.append(y)
        x_val = torch.cat(xs).to(pl_module.device)
        y_val = torch.cat(ys).to(pl_module.device) if ys else None
        was_training = ensemble.training
        ensemble.eval()
        cascade = EnsembleCascade(
            ensemble,
            self.exit_rule,
            self.decision,
            self.target_risk,
            self.target_tpr,
            0.0 if self.width == "auto" else float(self.width),
            "given",
            self.score,
        )
        ensemble.train(was_training)
        cascade = cascade.to(pl_module.device).eval()
        if self.width == "auto":
            if y_val is None:
                raise ValueError(
                    "width='auto' compares accuracy with the full ensemble: the validation data needs labels."
                )
            cascade.fit_width(
                x_val, y_val, accuracy_tolerance=self.accuracy_tolerance, coverage_tolerance=self.coverage_tolerance
            )
        else:
            cascade.fit(x_val, y_val)
        self.cascade = cascade
        self._parts, self._macs, self.results = {}, {}, {}

    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._build(trainer, pl_module)

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._build(trainer, pl_module)

    # ------------------------------------------------------------------ running
    def _run(self, x: Tensor, dataloader_idx: int):
        assert self.cascade is not None
        with MacCounter() as counter:
            out = self.cascade(x)
        self._macs[dataloader_idx] = self._macs.get(dataloader_idx, 0) + counter.macs
        return out

    def _batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, stage: Stage, outputs: Any, batch: Any, idx: int
    ) -> None:
        x, y = _inputs_targets(batch)
        out = self._run(x, idx)
        if stage == "test":
            self._parts.setdefault(idx, []).append(
                (out.probs.cpu(), out.score.cpu(), out.members_used.cpu(), None if y is None else y.cpu())
            )
            return
        if not (isinstance(outputs, Mapping) and hasattr(outputs, "__setitem__")):
            raise ValueError(
                f"CascadeEvaluation adds the cascade's results to predict_step's output dict, but predict_step "
                f"returned {type(outputs).__name__}. Return a dict (EnsembleClassifier does)."
            )
        # Lightning stores the step's dict after the callbacks ran: the added keys are returned by predict.
        outputs["cascade_probs"] = out.probs
        outputs["cascade_score"] = out.score
        outputs["cascade_members_used"] = out.members_used

    on_test_batch_end = batch_end_hook("test")
    on_predict_batch_end = batch_end_hook("predict")

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        parts = self._parts.get(0, [])
        targets = [t for *_, t in parts if t is not None]
        if not parts or len(targets) < len(parts):
            return
        probs, score, used = (torch.cat(list(column)) for column in list(zip(*parts))[:3])
        y = torch.cat(targets)
        ood_score = None
        if self.ood_dataloader_idx is not None and self.ood_dataloader_idx in self._parts:
            ood_score = torch.cat([p[1] for p in self._parts[self.ood_dataloader_idx]])
        results = prediction_metrics(probs, y, score, ood_score, self.target_risk)
        results["macs_per_sample"] = self._macs.get(0, 0) / len(y)
        results["members_per_sample"] = float(used.double().mean())
        assert self.cascade is not None
        results["width"] = self.cascade.width
        self.results = results
        pl_module.log_dict({f"test/cascade_{k}": float(v) for k, v in results.items()}, add_dataloader_idx=False)
