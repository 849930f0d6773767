"""CalibrationMetrics: log calibration and uncertainty metrics of any LightningModule on validation and test."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, cast

import lightning as L
from torch import Tensor, nn
from torchmetrics import Metric

from .._checks import check_choice, check_not_probs, check_num_classes, check_probs, check_targets
from ..metrics import (
    AURC,
    AdaptiveCalibrationError,
    BrierScore,
    ClasswiseCalibrationError,
    Disagreement,
    ExpectedCalibrationError,
    MutualInformation,
    NegativeLogLikelihood,
    PredictiveEntropy,
)
from ._base import STEP_HOOKS, PredictionReader, Stage
from ._predictions import Predictions, stage_prefix

#: Metrics of the ensemble prediction ``(B, C)`` against targets.
PROB_METRICS = ("ece", "ace", "classwise_ece", "mce", "nll", "brier", "aurc")
#: Metrics of member probabilities ``(M, B, C)``; skipped when the step returns no member outputs.
MEMBER_METRICS = ("mutual_information", "disagreement", "predictive_entropy")


def _build(name: str, num_classes: int, n_bins: int) -> Metric:
    # Inputs are checked once per batch by the callback (`_check`, against the dtype the step
    # returned), so the metrics skip their own checks of the float32 values they receive.
    factories = {
        "ece": lambda: ExpectedCalibrationError(num_classes, n_bins=n_bins, validate_args=False),
        "mce": lambda: ExpectedCalibrationError(num_classes, n_bins=n_bins, norm="max", validate_args=False),
        "ace": lambda: AdaptiveCalibrationError(num_classes, n_bins=n_bins, validate_args=False),
        "classwise_ece": lambda: ClasswiseCalibrationError(num_classes, n_bins=n_bins, validate_args=False),
        "nll": lambda: NegativeLogLikelihood(num_classes, validate_args=False),
        "brier": lambda: BrierScore(num_classes, validate_args=False),
        "aurc": lambda: AURC(num_classes, validate_args=False),
        "mutual_information": lambda: MutualInformation(validate_args=False),
        "disagreement": lambda: Disagreement(validate_args=False),
        "predictive_entropy": lambda: PredictiveEntropy(validate_args=False),
    }
    return factories[name]()


def _check(preds: Predictions, probs: Tensor, member_probs: Tensor | None, num_classes: int | None, hook: str) -> int:
    """Validate one batch (probabilities in the dtype the step returned them); its number of classes.

    ``"logits"`` / ``"member_logits"`` that look like probabilities are refused: softmaxing them again
    would silently flatten every prediction. Logits may hold ``-inf`` (masked classes): their softmax
    is what gets checked.
    """
    name = f"{preds.kind}` from `{hook}"  # shown as `member_logits` from `validation_step`
    values = preds.values.detach()
    if preds.kind == "logits":
        check_not_probs(values, name, "return probabilities under 'probs' instead")
        check_probs(probs, f"softmax of {name}")
    elif preds.kind == "member_logits":
        assert member_probs is not None  # member outputs give member probabilities
        check_not_probs(values, name, "return probabilities under 'member_probs' instead")
        check_probs(member_probs, f"softmax of {name}", members=True)
    else:
        check_probs(values, name, members=preds.kind == "member_probs")
    c = check_num_classes(values, num_classes, name)
    assert preds.target is not None  # batches without targets are skipped before
    check_targets(preds.target, values.shape[-2], c, f"target` from `{hook}")
    return c


class CalibrationMetrics(PredictionReader):
    """Compute and log calibration/uncertainty metrics for any LightningModule.

    Predictions are read from what ``validation_step`` / ``test_step`` return: a dict with
    ``"member_logits"`` ``(M, B, C)``, ``"member_probs"``, ``"logits"`` ``(B, C)`` or ``"probs"``,
    plus ``"target"`` ``(B,)`` (see :mod:`lightning_ensembles.callbacks._predictions`). A step that
    returns anything else raises a ``ValueError`` that states this contract; batches without a
    target (an OOD dataloader) are skipped. Each batch is checked once, as returned: probabilities
    must sum to 1 within a tolerance that follows their dtype (so ``logits.softmax(-1)`` computed in
    bfloat16 under ``precision="bf16-mixed"`` passes), and ``"logits"`` that look like probabilities
    are refused with a ``ValueError``.

    Logged at each epoch end as ``<stage>/<prefix>/<metric>`` (``stage`` = ``val``, ``test``, or
    ``test_dl<k>`` for dataloader ``k > 0``). Metrics are torchmetrics objects, synced across
    processes before logging. The values are also kept in ``last_results[stage]``.

    Args:
        metrics: names from ``ece, mce, ace, classwise_ece, nll, brier, aurc`` and, for member
            outputs, ``mutual_information, disagreement, predictive_entropy``. ``None``: all but ``ace``
            and ``aurc`` (those two store every confidence; the others keep constant memory).
        n_bins: bins of the binned calibration errors.
        stages: which of ``"val"`` and ``"test"`` to evaluate.
        prefix: middle part of the logged names.

    Example:
        >>> import lightning as L
        >>> from lightning_ensembles import MLP, EnsembleClassifier
        >>> from lightning_ensembles.callbacks import CalibrationMetrics
        >>> from lightning_ensembles.data import DigitsDataModule
        >>> model = EnsembleClassifier(backbone=MLP(64, 10), num_members=2)
        >>> cb = CalibrationMetrics(metrics=["ece", "nll", "mutual_information"])
        >>> trainer = L.Trainer(max_epochs=1, callbacks=[cb], logger=False, enable_progress_bar=False,
        ...                     enable_checkpointing=False, enable_model_summary=False)
        >>> _ = trainer.test(model, DigitsDataModule(), verbose=False)
        >>> sorted(cb.last_results["test"])
        ['ece', 'mutual_information', 'nll']
    """

    def __init__(
        self,
        metrics: Sequence[str] | None = None,
        n_bins: int = 15,
        stages: Sequence[str] = ("val", "test"),
        prefix: str = "calibration",
    ) -> None:
        known = PROB_METRICS + MEMBER_METRICS
        chosen = tuple(metrics) if metrics is not None else tuple(m for m in known if m not in ("ace", "aurc"))
        unknown = [m for m in chosen if m not in known]
        if unknown:
            raise ValueError(f"unknown metric(s) {unknown} for CalibrationMetrics; choose from {list(known)}.")
        for stage in stages:
            check_choice("stages", stage, ("val", "test"))
        if not isinstance(n_bins, int) or n_bins < 1:
            raise ValueError(f"`n_bins` must be an integer >= 1, got {n_bins!r}.")
        self.metric_names, self.stages = chosen, tuple(stages)
        self.n_bins, self.prefix = n_bins, prefix
        self._metrics: dict[str, nn.ModuleDict] = {}
        self._num_classes: dict[str, int] = {}
        self.last_results: dict[str, dict[str, float]] = {}

    # ---------------------------------------------------------------- collection
    def _reads(self, trainer: L.Trainer, stage: Stage, dataloader_idx: int) -> bool:
        return stage in self.stages and not trainer.sanity_checking

    def _update(self, stage: Stage, preds: Predictions, outputs: Any, dataloader_idx: int) -> None:
        if preds.target is None:
            return
        key = stage_prefix(stage, dataloader_idx)
        probs, member_probs = preds.probs, preds.member_probs
        self._num_classes[key] = _check(preds, probs, member_probs, self._num_classes.get(key), STEP_HOOKS[stage])
        if key not in self._metrics:
            names = [n for n in self.metric_names if n in PROB_METRICS or member_probs is not None]
            self._metrics[key] = nn.ModuleDict({n: _build(n, probs.shape[-1], self.n_bins) for n in names}).to(
                probs.device
            )
        for name, module in self._metrics[key].items():
            metric = cast(Metric, module)  # a ModuleDict holds them (for `.to(device)`)
            if name in MEMBER_METRICS:
                metric.update(member_probs)
            else:
                metric.update(probs, preds.target)

    def _epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: Stage) -> None:
        if stage == "test" or not trainer.sanity_checking:
            self._log(pl_module, stage)

    def _log(self, pl_module: L.LightningModule, stage: str) -> None:
        for key in [k for k in self._metrics if k.split("_dl")[0] == stage]:
            metrics = self._metrics.pop(key)
            self._num_classes.pop(key, None)
            values = {name: cast(Metric, metric).compute() for name, metric in metrics.items()}
            self.last_results[key] = {name: float(v) for name, v in values.items()}
            for name, value in values.items():
                pl_module.log(f"{key}/{self.prefix}/{name}", value, add_dataloader_idx=False)
