"""TemperatureScaling: fit a temperature on the validation set of any LightningModule and apply it after."""

from __future__ import annotations

import math
from typing import Any

import torch
from lightning.pytorch.callbacks import Callback

from ..calibration.temperature import fit_temperature, scaled_log_probs
from ..metrics import ExpectedCalibrationError, NegativeLogLikelihood
from ._predictions import EpochBuffer, read_predictions, step_outputs


class TemperatureScaling(Callback):
    """Post-hoc temperature scaling (Guo et al., 2017) as a Trainer callback for any LightningModule.

    **Fit.** Predictions of the first validation dataloader are collected (read from the dict that
    ``validation_step`` returns, see :mod:`lightning_ensembles.callbacks._predictions`); at the end
    of every validation epoch (sanity checks excluded) a temperature ``T`` is fitted on them by
    minimising NLL with L-BFGS (:func:`~lightning_ensembles.calibration.fit_temperature`). Refitting
    each epoch keeps ``T`` in step with the weights, so the ``T`` of the last validation is the
    "after fit" temperature and every checkpoint holds the ``T`` of its own weights; after
    ``trainer.fit`` it is in ``self.temperature``. A stand-alone ``trainer.validate`` refits it.
    With several processes, the predictions of all ranks are gathered first.

    What is scaled: ``logits`` -> ``softmax(z / T)``; ``member_logits`` -> every member's logits
    divided by ``T`` before averaging; ``probs`` / ``member_probs`` -> ``softmax(log p / T)``.

    **Checkpoint.** ``T`` is saved in the callback state of every checkpoint and restored by
    ``trainer.test(ckpt_path=...)`` / ``trainer.fit(ckpt_path=...)``.

    **Apply.** Test: logs ``test/ts/ece_before``, ``ece_after``, ``nll_before``, ``nll_after`` and
    adds ``"calibrated_probs"`` to the ``test_step`` output dict. Predict: adds
    ``"calibrated_probs"`` ``(B, C)`` to the dict returned by ``predict_step`` (so it appears in
    ``trainer.predict``'s result). Validation logs ``val/ts/temperature`` and the before/after values.
    The module's own metrics are not changed.

    Example:
        >>> import lightning as L
        >>> from lightning_ensembles import EnsembleClassifier
        >>> from lightning_ensembles.callbacks import TemperatureScaling
        >>> from lightning_ensembles.data import DigitsDataModule
        >>> model = EnsembleClassifier(backbone="mlp", num_members=2,
        ...                            backbone_kwargs={"in_features": 64, "out_features": 10})
        >>> ts = TemperatureScaling()
        >>> trainer = L.Trainer(max_epochs=2, callbacks=[ts], logger=False, enable_progress_bar=False,
        ...                     enable_checkpointing=False, enable_model_summary=False)
        >>> trainer.fit(model, DigitsDataModule())
        >>> ts.temperature > 0
        True
    """

    def __init__(self, init: float = 1.5, max_iter: int = 100, n_bins: int = 15) -> None:
        if init <= 0:
            raise ValueError(f"`init` temperature must be > 0, got {init}.")
        self.init = init
        self.max_iter = max_iter
        self.n_bins = n_bins
        self.temperature: float = math.nan
        self.kind: str | None = None
        self._buffer = EpochBuffer()
        self._test_metrics: dict[str, Any] = {}

    @property
    def is_fitted(self) -> bool:
        return not math.isnan(self.temperature)

    # ---------------------------------------------------------------- fit on validation
    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        self._buffer.reset()

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if trainer.sanity_checking or dataloader_idx != 0:
            return
        outputs = step_outputs(outputs, trainer, pl_module, batch)
        preds = read_predictions(outputs, type(self).__name__, "validation_step")
        if preds.target is not None:
            values, kind = preds.scalable
            self._buffer.add(values, preds.target, kind)

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking or not len(self._buffer):
            return
        values, target = self._buffer.gather(trainer)
        kind = self._buffer.kind
        self._buffer.reset()
        self.temperature = fit_temperature(values, target, kind, self.init, self.max_iter)
        self.kind = kind
        report = self._before_after(values, target)
        pl_module.log("val/ts/temperature", self.temperature, add_dataloader_idx=False)
        for name, value in report.items():
            pl_module.log(f"val/ts/{name}", value, add_dataloader_idx=False)

    def _before_after(self, values: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
        out = {}
        for tag, temp in (("before", 1.0), ("after", self.temperature)):
            probs = scaled_log_probs(values.double(), temp, self.kind).exp()
            ece, nll = ExpectedCalibrationError(n_bins=self.n_bins), NegativeLogLikelihood()
            ece.update(probs, target)
            nll.update(probs, target)
            out[f"ece_{tag}"], out[f"nll_{tag}"] = float(ece.compute()), float(nll.compute())
        return out

    # ---------------------------------------------------------------- apply
    def _calibrated(self, preds) -> torch.Tensor:
        values, kind = preds.scalable
        if kind != self.kind:
            raise ValueError(f"TemperatureScaling was fitted on '{self.kind}' but this step returns '{kind}'.")
        return scaled_log_probs(values, self.temperature, kind).exp()

    def on_test_epoch_start(self, trainer, pl_module) -> None:
        self._require_fit("test")
        self._test_metrics = {
            f"{name}_{tag}": factory().to(pl_module.device)
            for tag in ("before", "after")
            for name, factory in (("ece", lambda: ExpectedCalibrationError(n_bins=self.n_bins)), ("nll", NegativeLogLikelihood))
        }

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        outputs = step_outputs(outputs, trainer, pl_module, batch)
        preds = read_predictions(outputs, type(self).__name__, "test_step")
        calibrated = self._calibrated(preds)
        outputs["calibrated_probs"] = calibrated
        if preds.target is None or dataloader_idx != 0:
            return
        for tag, probs in (("before", preds.probs), ("after", calibrated.float())):
            self._test_metrics[f"ece_{tag}"].update(probs, preds.target)
            self._test_metrics[f"nll_{tag}"].update(probs, preds.target)

    def on_test_epoch_end(self, trainer, pl_module) -> None:
        if all(m.update_count == 0 for m in self._test_metrics.values()):
            return
        pl_module.log("test/ts/temperature", self.temperature, add_dataloader_idx=False)
        for name, metric in self._test_metrics.items():
            pl_module.log(f"test/ts/{name}", metric.compute(), add_dataloader_idx=False)

    def on_predict_epoch_start(self, trainer, pl_module) -> None:
        self._require_fit("predict")

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        outputs = step_outputs(outputs, trainer, pl_module, batch)
        preds = read_predictions(outputs, type(self).__name__, "predict_step")
        outputs["calibrated_probs"] = self._calibrated(preds)

    def _require_fit(self, stage: str) -> None:
        if not self.is_fitted:
            raise RuntimeError(
                f"TemperatureScaling has no temperature at {stage} time: run `trainer.fit` (with validation) or "
                "`trainer.validate` first, or load a checkpoint saved with this callback."
            )

    # ---------------------------------------------------------------- checkpoint
    def state_dict(self) -> dict[str, Any]:
        return {"temperature": self.temperature, "kind": self.kind}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.temperature = float(state_dict["temperature"])
        self.kind = state_dict["kind"]
