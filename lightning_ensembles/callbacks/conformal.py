"""ConformalPrediction: split-conformal prediction sets on top of any classifier's (ensemble) probabilities."""

from __future__ import annotations

from typing import Any

from lightning.pytorch.callbacks import Callback

from ..calibration.conformal import ConformalClassifier, Method
from ..metrics import SetCoverage, SetSize
from ._predictions import EpochBuffer, read_predictions, step_outputs


class ConformalPrediction(Callback):
    """Calibrate conformal prediction sets on validation predictions; report coverage and set size at test.

    The threshold is calibrated on the first validation dataloader at the end of every validation
    epoch (sanity checks excluded; predictions of all processes are gathered), from the ensemble
    probabilities that ``validation_step`` returns (see :mod:`lightning_ensembles.callbacks._predictions`).
    At test it logs ``test/conformal/coverage`` (fraction of true classes inside their set; at
    least ``1 - alpha`` in expectation) and ``test/conformal/set_size``, and adds the boolean
    ``"prediction_set"`` ``(B, C)`` to the ``test_step`` / ``predict_step`` output dicts. The
    threshold is saved in checkpoints.

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

    @property
    def threshold(self) -> float:
        return float(self.conformal.threshold)

    # ---------------------------------------------------------------- calibrate on validation
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
        if trainer.sanity_checking or not len(self._buffer):
            return
        probs, target = self._buffer.gather(trainer)
        self._buffer.reset()
        self.conformal.fit(probs, target)
        pl_module.log("val/conformal/threshold", min(self.threshold, 1e6), add_dataloader_idx=False)

    # ---------------------------------------------------------------- apply
    def _sets(self, outputs: Any, hook: str):
        if not self.conformal.is_fitted:
            raise RuntimeError(
                "ConformalPrediction is not calibrated: run `trainer.fit` (with validation) or `trainer.validate` "
                "first, or load a checkpoint saved with this callback."
            )
        preds = read_predictions(outputs, type(self).__name__, hook)
        sets = self.conformal.predict_sets(preds.probs)
        outputs["prediction_set"] = sets
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

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        outputs = step_outputs(outputs, trainer, pl_module, batch)
        self._sets(outputs, "predict_step")

    # ---------------------------------------------------------------- checkpoint
    def state_dict(self) -> dict[str, Any]:
        return {"threshold": self.threshold}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.conformal.threshold.fill_(float(state_dict["threshold"]))
