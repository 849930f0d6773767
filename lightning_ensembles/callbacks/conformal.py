"""ConformalPrediction: split-conformal prediction sets on top of any classifier's (ensemble) probabilities."""

from __future__ import annotations

from collections.abc import MutableMapping
from typing import Any

from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from ..calibration.conformal import ConformalClassifier, Method
from ..calibration.temperature import CalibrationWarning
from ..metrics import SetCoverage, SetSize
from ._predictions import EpochBuffer, read_predictions, step_outputs


class ConformalPrediction(Callback):
    """Calibrate conformal prediction sets on validation predictions; report coverage and set size at test.

    The threshold is calibrated on the first validation dataloader at the end of every validation
    epoch (sanity checks excluded; predictions of all processes are gathered), from the ensemble
    probabilities that ``validation_step`` returns (see :mod:`lightning_ensembles.callbacks._predictions`).
    At test it logs ``test/conformal/coverage`` (fraction of true classes inside their set; at
    least ``1 - alpha`` in expectation) and ``test/conformal/set_size``, and adds the boolean
    ``"prediction_set"`` ``(B, C)`` to the ``test_step`` / ``predict_step`` output dicts (a
    ``predict_step`` that returns no dict, e.g. a tensor with
    :class:`~lightning_ensembles.callbacks.Ensembling` providing the member outputs, cannot carry it:
    the sets of its batches are in ``self.predictions``, one CPU tensor per batch, reset at every
    predict run). The threshold is saved in checkpoints. Every kind of prediction works at every
    stage: the sets are built from the ensemble probabilities (mean of member softmax).

    A stand-alone ``trainer.validate`` recalibrates (also under ``inference_mode=True``). A validation
    run without samples (an empty dataloader, batches without targets) keeps the previous threshold
    with a :class:`~lightning_ensembles.calibration.CalibrationWarning`; so does a calibration set too
    small for ``alpha`` (fewer than ``ceil(1/alpha) - 1`` samples, 9 for ``alpha=0.1``), whose threshold
    is infinite (every set holds all classes).

    Args:
        alpha: miscoverage; ``0.1`` gives 90% sets.
        method: ``"thr"`` (1 - p_y, smallest sets), ``"aps"`` or ``"raps"`` (adaptive sets).
        randomized: randomised APS/RAPS scores (exact coverage; sets vary with the seed).
        penalty, k_reg: RAPS regularisation ``penalty * max(rank - k_reg, 0)``.
        seed: seed of the randomisation.

    Example:
        >>> import lightning as L
        >>> from lightning_ensembles import EnsembleClassifier
        >>> from lightning_ensembles.callbacks import ConformalPrediction
        >>> from lightning_ensembles.data import DigitsDataModule
        >>> model = EnsembleClassifier(backbone="mlp", num_members=2,
        ...                            backbone_kwargs={"in_features": 64, "out_features": 10})
        >>> cp = ConformalPrediction(alpha=0.1, method="aps")
        >>> trainer = L.Trainer(max_epochs=1, callbacks=[cp], logger=False, enable_progress_bar=False,
        ...                     enable_checkpointing=False, enable_model_summary=False)
        >>> trainer.fit(model, DigitsDataModule())
        >>> cp.threshold > 0
        True
    """

    def __init__(
        self,
        alpha: float = 0.1,
        method: Method = "aps",
        randomized: bool = True,
        penalty: float = 0.1,
        k_reg: int = 1,
        seed: int = 0,
    ) -> None:
        self.conformal = ConformalClassifier(alpha, method, randomized, penalty, k_reg, seed)
        self._buffer = EpochBuffer()
        self._metrics: dict[str, Any] = {}
        self.last_results: dict[str, float] = {}
        self.predictions: list[Tensor] = []
        self._validated = False

    @property
    def threshold(self) -> float:
        return float(self.conformal.threshold)

    # ---------------------------------------------------------------- calibrate on validation
    def setup(self, trainer, pl_module, stage: str) -> None:
        self._validated = False

    def teardown(self, trainer, pl_module, stage: str) -> None:
        if stage in ("fit", "validate") and not self._validated:
            rank_zero_warn(
                f"ConformalPrediction: `trainer.{stage}` ran no validation epoch (an empty validation dataloader, "
                "limit_val_batches=0 or no validation_step); the threshold was not calibrated "
                f"({'kept ' + format(self.threshold, '.4g') if self.conformal.is_fitted else 'none yet'}).",
                category=CalibrationWarning,
            )
        self._validated = False

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        self._buffer.reset()

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if trainer.sanity_checking or dataloader_idx != 0:
            return
        outputs = step_outputs(outputs, trainer, pl_module, batch)
        preds = read_predictions(outputs, type(self).__name__, "validation_step")
        if preds.target is not None:
            self._buffer.add(preds.probs, preds.target, "probs")

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking:
            return
        self._validated = True
        if not len(self._buffer):
            rank_zero_warn(
                "ConformalPrediction: no validation predictions with targets on dataloader 0 (empty dataloader, "
                "or batches without targets); the threshold was not recalibrated.",
                category=CalibrationWarning,
            )
            return
        probs, target = self._buffer.gather(trainer)
        self._buffer.reset()
        self.conformal.fit(probs, target)
        pl_module.log("val/conformal/threshold", min(self.threshold, 1e6), add_dataloader_idx=False)

    # ---------------------------------------------------------------- apply
    def _sets(self, outputs: Any, hook: str, returned: Any = None):
        if not self.conformal.is_fitted:
            raise RuntimeError(
                "ConformalPrediction is not calibrated: run `trainer.fit` (with validation) or `trainer.validate` "
                "first, or load a checkpoint saved with this callback."
            )
        preds = read_predictions(outputs, type(self).__name__, hook)
        sets = self.conformal.predict_sets(preds.probs)
        outputs["prediction_set"] = sets
        if hook == "predict_step" and not isinstance(returned, MutableMapping):
            self.predictions.append(sets.detach().cpu())  # what the step returned cannot carry it
        return sets, preds.target

    def on_test_epoch_start(self, trainer, pl_module) -> None:
        self._metrics = {"coverage": SetCoverage().to(pl_module.device), "set_size": SetSize().to(pl_module.device)}

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        outputs = step_outputs(outputs, trainer, pl_module, batch)
        sets, target = self._sets(outputs, "test_step")
        if target is not None and dataloader_idx == 0:
            self._metrics["coverage"].update(sets, target)
            self._metrics["set_size"].update(sets)

    def on_test_epoch_end(self, trainer, pl_module) -> None:
        if self._metrics["coverage"].update_count == 0:
            return
        for name, metric in self._metrics.items():
            value = metric.compute()
            self.last_results[name] = float(value)
            pl_module.log(f"test/conformal/{name}", value, add_dataloader_idx=False)

    def on_predict_epoch_start(self, trainer, pl_module) -> None:
        self.predictions = []

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._sets(step_outputs(outputs, trainer, pl_module, batch), "predict_step", returned=outputs)

    # ---------------------------------------------------------------- checkpoint
    def state_dict(self) -> dict[str, Any]:
        return {"threshold": self.threshold}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.conformal.threshold.fill_(float(state_dict["threshold"]))
