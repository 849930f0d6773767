"""What the callbacks share: a submodule swapped in for test and predict, and reading the steps' predictions.

- :class:`SubmoduleSwap`: test and predict run on a stand-in for one submodule (an average, a snapshot
  ensemble, a Laplace posterior), put back afterwards.
- :class:`PredictionReader`: every validation and test batch's predictions, read as
  :mod:`~lightning_ensembles.callbacks._predictions` describes, go to one ``_update``.
- :class:`FitOnValidation`: fitted on the first validation dataloader at every validation epoch end.
- :class:`ProbabilityRecalibration`: such a fitted map turns predictions into ``"calibrated_probs"``.
- :func:`batch_end_hook`: one typed batch-end hook for every stage; :func:`resolve_attribute`,
  :func:`first_train_loader`, :func:`module_ensemble`: what the callbacks look up in a module or Trainer.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, MutableMapping
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.types import STEP_OUTPUT
from torch import Tensor, nn
from torchmetrics import Metric

from ..calibration.temperature import CalibrationWarning
from ..ensembles.base import Ensemble
from ..ensembles.surgery import set_submodule
from ..metrics import ExpectedCalibrationError, NegativeLogLikelihood
from ._predictions import EpochBuffer, Predictions, read_predictions, step_outputs

__all__ = [
    "STEP_HOOKS",
    "FitOnValidation",
    "PredictionReader",
    "ProbabilityRecalibration",
    "Stage",
    "SubmoduleSwap",
    "batch_end_hook",
    "before_after_metrics",
    "before_after_scores",
    "first_train_loader",
    "module_ensemble",
    "resolve_attribute",
]

#: The evaluation stages a callback reads, and the steps whose outputs it reads there.
Stage = Literal["val", "test", "predict"]
STEP_HOOKS: dict[str, str] = {"val": "validation_step", "test": "test_step", "predict": "predict_step"}


def batch_end_hook(stage: Stage) -> Callable[..., None]:
    """The ``on_<stage>_batch_end`` hook of a callback that handles every stage in ``_batch_end(..., stage, ...)``.

    One typed signature for the validation, test and predict batch-end hooks:
    ``on_test_batch_end = batch_end_hook("test")`` calls
    ``self._batch_end(trainer, pl_module, "test", outputs, batch, dataloader_idx)``.
    """

    def hook(
        self: Any,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: STEP_OUTPUT,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self._batch_end(trainer, pl_module, stage, outputs, batch, dataloader_idx)

    hook.__name__ = hook.__qualname__ = f"on_{'validation' if stage == 'val' else stage}_batch_end"
    return hook


def module_ensemble(pl_module: nn.Module, owner: str, fix: str) -> Ensemble:
    """``pl_module.ensemble``, the ensemble ``owner`` works on; a ``ValueError`` that says ``fix`` if it is none."""
    ensemble = getattr(pl_module, "ensemble", None)
    if not isinstance(ensemble, Ensemble):
        raise ValueError(
            f"{owner} needs the module's ensemble in `pl_module.ensemble` (a lightning_ensembles Ensemble); "
            f"{type(pl_module).__name__} has {type(ensemble).__name__}. {fix}"
        )
    return ensemble


def resolve_attribute(pl_module: nn.Module, attribute: str | None) -> nn.Module:
    """``pl_module`` itself, or its sub-module at the dotted path ``attribute`` (e.g. ``"ensemble"``)."""
    if attribute is None:
        return pl_module
    target: Any = pl_module
    for part in attribute.split("."):
        if not hasattr(target, part):
            raise ValueError(
                f"`attribute`={attribute!r}: {type(pl_module).__name__} has no sub-module {part!r}. "
                "Name the model to average (e.g. 'ensemble'), or pass attribute=None for the whole module."
            )
        target = getattr(target, part)
    if not isinstance(target, nn.Module):
        raise ValueError(f"`attribute`={attribute!r} is a {type(target).__name__}, not an nn.Module.")
    return target


def first_train_loader(trainer: L.Trainer) -> Any:
    """The training dataloader (the first one if there are several), or ``None``."""
    loader = getattr(trainer, "train_dataloader", None)
    datamodule = getattr(trainer, "datamodule", None)
    if loader is None and datamodule is not None:
        try:
            loader = datamodule.train_dataloader()
        except Exception:  # the datamodule may not be set up in a test-only process
            loader = None
    if isinstance(loader, (list, tuple)):
        loader = loader[0] if loader else None
    elif isinstance(loader, dict):
        loader = next(iter(loader.values()), None)
    return loader


# ---------------------------------------------------------------------------------------------------- swap
class SubmoduleSwap(Callback):
    """Base of the callbacks that run ``trainer.test`` and ``trainer.predict`` on a stand-in for one submodule.

    A subclass's :meth:`_eval_start` decides whether there is a stand-in and puts it in with
    :meth:`_swap_in`; at the end of test and predict :meth:`_eval_end` puts the original back.
    """

    #: The submodule the stand-in replaces while it is in (``None`` otherwise), and its dotted path.
    _replaced: nn.Module | None = None
    _replaced_path: str = ""

    def _swap_in(self, pl_module: nn.Module, path: str, stand_in: nn.Module) -> None:
        """Put ``stand_in`` at ``path`` in ``pl_module``, keeping the submodule it replaces."""
        self._replaced, self._replaced_path = pl_module.get_submodule(path), path
        set_submodule(pl_module, path, stand_in)

    def _swap_out(self, pl_module: nn.Module) -> None:
        """Put the replaced submodule back (nothing if none is out)."""
        if self._replaced is not None:
            set_submodule(pl_module, self._replaced_path, self._replaced)
            self._replaced = None

    def _eval_start(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: Stage) -> None:
        """Swap the stand-in in, where there is one (subclasses)."""

    def _eval_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._swap_out(pl_module)

    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._eval_start(trainer, pl_module, "test")

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._eval_end(trainer, pl_module)

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._eval_start(trainer, pl_module, "predict")

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._eval_end(trainer, pl_module)


# ---------------------------------------------------------------------------------------------------- reading
class PredictionReader(Callback, ABC):
    """Base of the callbacks that read the predictions of every validation and test batch.

    The batch-end hooks find the predictions (the step's output dict, or what an
    :class:`~lightning_ensembles.callbacks.Ensembling` callback recorded) of the batches
    :meth:`_reads` takes and hand them to :meth:`_update`; the epoch-end hooks call :meth:`_epoch_end`.
    """

    def _reads(self, trainer: L.Trainer, stage: Stage, dataloader_idx: int) -> bool:
        """Whether a batch of ``stage`` from ``dataloader_idx`` is read (every one by default)."""
        return True

    def _read(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, stage: Stage
    ) -> tuple[Any, Predictions]:
        """The outputs that hold a batch's predictions (the step's, or recorded by ``Ensembling``) and those."""
        found = step_outputs(outputs, trainer, pl_module, batch)
        return found, read_predictions(found, type(self).__name__, STEP_HOOKS[stage])

    @abstractmethod
    def _update(self, stage: Stage, preds: Predictions, outputs: Any, dataloader_idx: int) -> None:
        """Take one batch's predictions; ``outputs`` is the dict they were read from."""

    def _epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: Stage) -> None:
        """At the end of a validation or test epoch (nothing by default)."""

    def _batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, stage: Stage, outputs: Any, batch: Any, idx: int
    ) -> None:
        if self._reads(trainer, stage, idx):
            found, preds = self._read(trainer, pl_module, outputs, batch, stage)
            self._update(stage, preds, found, idx)

    on_validation_batch_end = batch_end_hook("val")
    on_test_batch_end = batch_end_hook("test")

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._epoch_end(trainer, pl_module, "val")

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._epoch_end(trainer, pl_module, "test")


# ---------------------------------------------------------------------------------------------------- fitting
class FitOnValidation(PredictionReader):
    """Base of the callbacks fitted on the first validation dataloader at the end of every validation epoch.

    Validation batches with targets (sanity checks excluded) are collected, the predictions of all
    processes are gathered at the epoch end and handed to :meth:`_fit`. An epoch without samples, or a
    ``trainer.fit`` / ``trainer.validate`` that ran no validation epoch, keeps the previous fit with a
    :class:`~lightning_ensembles.calibration.CalibrationWarning` (:meth:`_keep_previous` says what is kept).
    Test batches go to :meth:`_test_batch`. Results of a predict step that returns no dict are kept in
    ``self.predictions`` (one CPU tensor per batch, reset at every predict run).
    """

    #: What is fitted, for the error at test or predict time without a fit (e.g. ``"temperature"``).
    fitted_name = "fit"

    def __init__(self) -> None:
        self.predictions: list[Tensor] = []
        self._buffer = EpochBuffer()
        self._validated = False

    @property
    @abstractmethod
    def is_fitted(self) -> bool:
        """Whether there is a fit to apply."""

    @abstractmethod
    def _fit_values(self, preds: Predictions) -> tuple[Tensor, str]:
        """What one validation batch contributes to the fit, and its kind."""

    @abstractmethod
    def _fit(self, pl_module: L.LightningModule, values: Tensor, target: Tensor, kind: str) -> None:
        """Fit on one validation epoch's values and targets (all processes')."""

    @abstractmethod
    def _keep_previous(self) -> str:
        """Keep the previous fit where none was made; what was kept, for the warning."""

    @abstractmethod
    def _test_batch(self, preds: Predictions, outputs: Any, dataloader_idx: int) -> None:
        """Apply the fit to one test batch."""

    @abstractmethod
    def _predict_batch(self, preds: Predictions, outputs: Any, returned: Any) -> None:
        """Apply the fit to one predict batch; ``returned`` is what ``predict_step`` returned."""

    def _reads(self, trainer: L.Trainer, stage: Stage, dataloader_idx: int) -> bool:
        return stage != "val" or (not trainer.sanity_checking and dataloader_idx == 0)

    def _update(self, stage: Stage, preds: Predictions, outputs: Any, dataloader_idx: int) -> None:
        if stage == "test":
            self._test_batch(preds, outputs, dataloader_idx)
        elif preds.target is not None:
            values, kind = self._fit_values(preds)
            self._buffer.add(values, preds.target, kind)

    def _batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, stage: Stage, outputs: Any, batch: Any, idx: int
    ) -> None:
        if stage != "predict":
            super()._batch_end(trainer, pl_module, stage, outputs, batch, idx)
        else:
            found, preds = self._read(trainer, pl_module, outputs, batch, stage)
            self._predict_batch(preds, found, outputs)

    on_predict_batch_end = batch_end_hook("predict")

    def _not_fitted(self, reason: str) -> None:
        kept = self._keep_previous()
        rank_zero_warn(f"{type(self).__name__}: {reason}; {kept}.", category=CalibrationWarning)

    def _require_fit(self, stage: str) -> None:
        if not self.is_fitted:
            raise RuntimeError(
                f"{type(self).__name__} has no {self.fitted_name} at {stage} time: run `trainer.fit` (with "
                "validation) or `trainer.validate` first, or load a checkpoint saved with this callback."
            )

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._validated = False

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage in ("fit", "validate") and not self._validated:
            self._not_fitted(
                f"`trainer.{stage}` ran no validation epoch (an empty validation dataloader, limit_val_batches=0 "
                "or no validation_step)"
            )
        self._validated = False

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._buffer.reset()

    def _epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: Stage) -> None:
        if stage != "val":
            self._test_epoch_end(pl_module)
        elif not trainer.sanity_checking:
            self._validated = True
            if not len(self._buffer):
                self._not_fitted(
                    "no validation predictions with targets on dataloader 0 (empty dataloader, or batches without "
                    "targets)"
                )
                return
            kind = self._buffer.kind
            values, target = self._buffer.gather(trainer)
            self._buffer.reset()
            assert kind is not None  # set by the first batch added
            self._fit(pl_module, values, target, kind)

    def _test_epoch_end(self, pl_module: L.LightningModule) -> None:
        """Log the test results (subclasses)."""

    def _hand_back(self, returned: Any, key: str, value: Tensor) -> None:
        """Add ``value`` to what a predict step returned; a step that returned no dict cannot carry it: keep it."""
        if isinstance(returned, MutableMapping):
            returned[key] = value
        else:  # e.g. a tensor, with Ensembling providing the member outputs
            self.predictions.append(value.detach().cpu())

    def on_predict_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._require_fit("predict")
        self.predictions = []


def before_after_metrics(n_bins: int, device: torch.device) -> dict[str, Metric]:
    """``ece_before``, ``nll_before``, ``ece_after``, ``nll_after``: metrics of predictions before and after a map."""
    return {
        f"{name}_{tag}": metric.to(device)
        for tag in ("before", "after")
        for name, metric in (("ece", ExpectedCalibrationError(n_bins=n_bins)), ("nll", NegativeLogLikelihood()))
    }


def before_after_scores(before: Tensor, after: Tensor, target: Tensor, n_bins: int) -> dict[str, float]:
    """The ECE and NLL of probabilities ``before`` and ``after`` a map (keys as :func:`before_after_metrics`)."""
    metrics = before_after_metrics(n_bins, before.device)
    for tag, probs in (("before", before), ("after", after)):
        metrics[f"ece_{tag}"].update(probs, target)
        metrics[f"nll_{tag}"].update(probs, target)
    return {name: float(metric.compute()) for name, metric in metrics.items()}


class ProbabilityRecalibration(FitOnValidation):
    """Base of the callbacks whose fitted map gives calibrated probabilities at test and predict.

    Test: adds ``"calibrated_probs"`` ``(B, C)`` to the ``test_step`` output dict and logs
    ``test/<tag>/ece_before``, ``ece_after``, ``nll_before``, ``nll_after`` of the first test dataloader.
    Predict: adds ``"calibrated_probs"`` to the dict ``predict_step`` returns (or to ``self.predictions``).
    """

    #: The middle part of the logged names (``val/<tag>/...``, ``test/<tag>/...``).
    tag = "calibration"

    def __init__(self, ece_bins: int = 15) -> None:
        super().__init__()
        self.ece_bins = ece_bins
        self._test_metrics: dict[str, Metric] = {}

    @abstractmethod
    def _calibrated(self, preds: Predictions, hook: str) -> Tensor:
        """Calibrated probabilities ``(B, C)`` of one batch; ``hook`` is the step they came from."""

    def _test_results(self) -> dict[str, Any]:
        """What is logged at the end of a test epoch."""
        return {name: metric.compute() for name, metric in self._test_metrics.items()}

    def _log_scores(self, pl_module: L.LightningModule, stage: str, scores: dict[str, Any]) -> None:
        for name, value in scores.items():
            pl_module.log(f"{stage}/{self.tag}/{name}", value, add_dataloader_idx=False)

    def on_test_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._require_fit("test")
        self._test_metrics = before_after_metrics(self.ece_bins, pl_module.device)

    def _test_batch(self, preds: Predictions, outputs: Any, dataloader_idx: int) -> None:
        calibrated = self._calibrated(preds, "test_step")
        if isinstance(outputs, MutableMapping):
            outputs["calibrated_probs"] = calibrated
        if preds.target is None or dataloader_idx != 0:
            return
        for tag, probs in (("before", preds.probs), ("after", calibrated.float())):
            self._test_metrics[f"ece_{tag}"].update(probs, preds.target)
            self._test_metrics[f"nll_{tag}"].update(probs, preds.target)

    def _test_epoch_end(self, pl_module: L.LightningModule) -> None:
        if any(metric.update_count for metric in self._test_metrics.values()):
            self._log_scores(pl_module, "test", self._test_results())

    def _predict_batch(self, preds: Predictions, outputs: Any, returned: Any) -> None:
        self._hand_back(returned, "calibrated_probs", self._calibrated(preds, "predict_step"))
