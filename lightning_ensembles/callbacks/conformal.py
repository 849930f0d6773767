"""ConformalPrediction: split-conformal prediction sets on top of any classifier's (ensemble) probabilities."""

from __future__ import annotations

from typing import Any

import lightning as L
from torch import Tensor
from torchmetrics import Metric

from ..calibration.conformal import ConformalClassifier, Method
from ..metrics import SetCoverage, SetSize
from ._base import FitOnValidation
from ._predictions import Predictions


class ConformalPrediction(FitOnValidation):
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
    stage: the sets are built from the ensemble probabilities (mean of member softmax). Every test and
    predict run draws the randomisation afresh from ``seed``, so its sets depend only on the threshold
    and the data (the same after reloading a checkpoint).

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
        >>> from lightning_ensembles import MLP, EnsembleClassifier
        >>> from lightning_ensembles.data import DigitsDataModule
        >>> model = EnsembleClassifier(backbone=MLP(64, 10), num_members=2)
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
        super().__init__()
        self.conformal = ConformalClassifier(alpha, method, randomized, penalty, k_reg, seed)
        self.seed = seed
        self._metrics: dict[str, Metric] = {}
        self.last_results: dict[str, float] = {}

    fitted_name = "calibrated threshold"

    @property
    def threshold(self) -> float:
        return float(self.conformal.threshold)

    @property
    def is_fitted(self) -> bool:
        return bool(self.conformal.is_fitted)

    # ---------------------------------------------------------------- calibrate on validation
    def _fit_values(self, preds: Predictions) -> tuple[Tensor, str]:
        return preds.probs, "probs"

    def _fit(self, pl_module: L.LightningModule, values: Tensor, target: Tensor, kind: str) -> None:
        self.conformal.fit(values, target)
        pl_module.log("val/conformal/threshold", min(self.threshold, 1e6), add_dataloader_idx=False)

    def _keep_previous(self) -> str:
        kept = f"kept {self.threshold:.4g}" if self.is_fitted else "none yet"
        return f"the threshold was not calibrated ({kept})"

    # ---------------------------------------------------------------- apply
    def _sets(self, preds: Predictions, outputs: Any) -> Tensor:
        """The prediction sets of a batch, also added to the dict its predictions came from."""
        sets = self.conformal.predict_sets(preds.probs)
        outputs["prediction_set"] = sets
        return sets

    def on_test_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._require_fit("test")
        self.conformal.generator.manual_seed(self.seed)
        self._metrics = {"coverage": SetCoverage().to(pl_module.device), "set_size": SetSize().to(pl_module.device)}

    def _test_batch(self, preds: Predictions, outputs: Any, dataloader_idx: int) -> None:
        sets = self._sets(preds, outputs)
        if preds.target is not None and dataloader_idx == 0:
            self._metrics["coverage"].update(sets, preds.target)
            self._metrics["set_size"].update(sets)

    def _test_epoch_end(self, pl_module: L.LightningModule) -> None:
        if self._metrics["coverage"].update_count == 0:
            return
        for name, metric in self._metrics.items():
            value = metric.compute()
            self.last_results[name] = float(value)
            pl_module.log(f"test/conformal/{name}", value, add_dataloader_idx=False)

    def on_predict_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_predict_epoch_start(trainer, pl_module)
        self.conformal.generator.manual_seed(self.seed)

    def _predict_batch(self, preds: Predictions, outputs: Any, returned: Any) -> None:
        sets = self._sets(preds, outputs)
        if outputs is not returned:  # what the step returned does not hold the sets yet
            self._hand_back(returned, "prediction_set", sets)

    # ---------------------------------------------------------------- checkpoint
    def state_dict(self) -> dict[str, Any]:
        return {"threshold": self.threshold}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.conformal.threshold.fill_(float(state_dict["threshold"]))
