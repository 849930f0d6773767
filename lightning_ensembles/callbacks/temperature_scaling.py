"""TemperatureScaling: fit a temperature on the validation set of any LightningModule and apply it after."""

from __future__ import annotations

import math
from collections.abc import MutableMapping
from typing import Any

import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from ..calibration.temperature import (
    MIN_SAMPLES,
    TEMPERATURE_BOUNDS,
    CalibrationWarning,
    TemperatureFit,
    member_log_probs,
    safe_fit_temperature,
    scaled_log_probs,
)
from ..metrics import ExpectedCalibrationError, NegativeLogLikelihood
from ._predictions import EpochBuffer, Predictions, read_predictions, step_outputs


def fit_values(preds: Predictions) -> tuple[Tensor, str]:
    """What a temperature is fitted on, and its kind, for a step's predictions.

    ``member_logits`` and ``logits`` as they are; ``member_probs`` as member log-probabilities of kind
    ``member_logits`` (exactly the same scaling, see :func:`~lightning_ensembles.calibration.member_log_probs`);
    ``probs`` (the ensemble prediction) as ``probs``.
    """
    v = preds.values.detach().float()
    if preds.kind == "member_probs":
        return member_log_probs(v), "member_logits"
    if preds.kind in ("member_logits", "logits"):
        return v, preds.kind
    return v, "probs"


def apply_values(preds: Predictions, fitted_kind: str, hook: str) -> tuple[Tensor, str]:
    """What to scale in a step's predictions so that a temperature fitted on ``fitted_kind`` means the same.

    Exact conversions only (``softmax(log p / T) == softmax(z / T)`` when ``p = softmax(z)``):

    ============================  =========================================================================
    fitted on                     applied to
    ============================  =========================================================================
    ``member_logits`` (M, B, C)   ``member_logits``; ``member_probs`` (their logs). Not ``logits`` /
                                  ``probs`` (B, C): the averaged prediction cannot be scaled member by member
    ``logits`` (B, C)             ``logits``; ``probs`` (their logs); member outputs only with one member
    ``probs`` (B, C)              everything (the ensemble probabilities: mean of member softmax)
    ============================  =========================================================================
    """
    kind, v = preds.kind, preds.values.detach().float()
    if fitted_kind == "probs":
        return preds.probs, "probs"
    if fitted_kind == "member_logits":
        if kind == "member_logits":
            return v, kind
        if kind == "member_probs":
            return member_log_probs(v), "member_logits"
        raise ValueError(
            f"TemperatureScaling was fitted on member logits (M, B, C), a temperature that scales every member "
            f"before the members are averaged, but `{hook}` returns only the averaged '{kind}' (B, C), from which "
            f"that cannot be computed. Return 'member_logits' or 'member_probs' (M, B, C) from `{hook}` as well."
        )
    if fitted_kind == "logits":
        if kind == "logits":
            return v, kind
        if kind == "probs":
            return member_log_probs(v), "logits"
        if v.shape[0] == 1:
            return (v[0] if kind == "member_logits" else member_log_probs(v[0])), "logits"
        raise ValueError(
            f"TemperatureScaling was fitted on one prediction per sample, 'logits' (B, C), but `{hook}` returns "
            f"'{kind}' of {v.shape[0]} members (M, B, C): that temperature does not scale members. Return the same "
            "kind of predictions from `validation_step` and from this step."
        )
    raise ValueError(f"TemperatureScaling: unknown fitted kind {fitted_kind!r}.")


class TemperatureScaling(Callback):
    """Post-hoc temperature scaling (Guo et al., 2017) as a Trainer callback for any LightningModule.

    **Fit.** Predictions of the first validation dataloader are collected (read from the dict that
    ``validation_step`` returns, see :mod:`lightning_ensembles.callbacks._predictions`); at the end
    of every validation epoch (sanity checks excluded) a temperature ``T`` is fitted on them by
    minimising NLL with L-BFGS (:func:`~lightning_ensembles.calibration.fit_temperature`). Refitting
    each epoch keeps ``T`` in step with the weights, so the ``T`` of the last validation is the
    "after fit" temperature and every checkpoint holds the ``T`` of its own weights; after
    ``trainer.fit`` it is in ``self.temperature``. A stand-alone ``trainer.validate`` refits it (also
    under Lightning's default ``inference_mode=True``). With several processes, the predictions of all ranks are gathered first.

    **Safeguards.** The fit is :func:`~lightning_ensembles.calibration.safe_fit_temperature`: with
    fewer than ``min_samples`` (default 100) validation samples, or an NLL-optimal ``T`` outside
    ``bounds`` (default ``[0.05, 20]``), the previous temperature is kept (1.0, the identity, when
    there is none) and a :class:`~lightning_ensembles.calibration.CalibrationWarning` gives the reason;
    a fitted ``T`` never has a higher validation NLL than ``T = 1``. A validation run without
    samples (an empty dataloader, batches without targets) warns and keeps the previous value too.
    ``last_fit`` holds the last decision (:class:`~lightning_ensembles.calibration.TemperatureFit`).

    What is scaled: ``logits`` -> ``softmax(z / T)``; ``member_logits`` and ``member_probs`` -> every
    member divided by ``T`` before averaging (member probabilities through their logs, the same
    thing: ``softmax(log p / T) == softmax(z / T)``); ``probs`` -> ``softmax(log p / T)``. At test and
    predict the step may return another kind than at validation where the conversion is exact (e.g.
    fitted on ``member_logits``, applied to the ``member_probs`` of ``EnsembleClassifier.predict_step``);
    where it is not (fitted on member outputs, only the averaged ``probs`` returned) the error says so.
    A temperature of exactly 1 is the identity and applies to every kind.

    **Checkpoint.** ``T`` is saved in the callback state of every checkpoint and restored by
    ``trainer.test(ckpt_path=...)`` / ``trainer.fit(ckpt_path=...)``.

    **Apply.** Test: logs ``test/ts/ece_before``, ``ece_after``, ``nll_before``, ``nll_after`` and
    adds ``"calibrated_probs"`` to the ``test_step`` output dict. Predict: adds
    ``"calibrated_probs"`` ``(B, C)`` to the dict returned by ``predict_step`` (so it appears in
    ``trainer.predict``'s result); a ``predict_step`` that returns no dict (a tensor, with
    :class:`~lightning_ensembles.callbacks.Ensembling` providing the member outputs) cannot carry it,
    so the calibrated probabilities of its batches are in ``self.predictions`` (a list, one CPU tensor
    per batch in the order they ran, reset at every predict run). Validation logs
    ``val/ts/temperature`` and the before/after values. The module's own metrics are not changed.

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

    def __init__(
        self,
        init: float = 1.5,
        max_iter: int = 100,
        n_bins: int = 15,
        min_samples: int = MIN_SAMPLES,
        bounds: tuple[float, float] = TEMPERATURE_BOUNDS,
    ) -> None:
        if init <= 0:
            raise ValueError(f"`init` temperature must be > 0, got {init}.")
        if min_samples < 1:
            raise ValueError(f"`min_samples` must be >= 1, got {min_samples}.")
        if not 0 < bounds[0] < bounds[1]:
            raise ValueError(f"`bounds` must be (low, high) with 0 < low < high, got {bounds}.")
        self.init = init
        self.max_iter = max_iter
        self.n_bins = n_bins
        self.min_samples = min_samples
        self.bounds = (float(bounds[0]), float(bounds[1]))
        self.temperature: float = math.nan
        self.kind: str | None = None
        self.last_fit: TemperatureFit | None = None
        self.predictions: list[Tensor] = []
        self._buffer = EpochBuffer()
        self._test_metrics: dict[str, Any] = {}
        self._validated = False

    @property
    def is_fitted(self) -> bool:
        return not math.isnan(self.temperature)

    # ---------------------------------------------------------------- fit on validation
    def setup(self, trainer, pl_module, stage: str) -> None:
        self._validated = False

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        self._buffer.reset()

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if trainer.sanity_checking or dataloader_idx != 0:
            return
        outputs = step_outputs(outputs, trainer, pl_module, batch)
        preds = read_predictions(outputs, type(self).__name__, "validation_step")
        if preds.target is not None:
            values, kind = fit_values(preds)
            self._buffer.add(values, preds.target, kind)

    @property
    def _fallback(self) -> float:
        """The safe temperature kept when a fit is refused: the previous one, else the identity."""
        return self.temperature if self.is_fitted else 1.0

    def _keep(self, reason: str) -> None:
        self.temperature = self._fallback
        if self.temperature == 1.0:
            self.kind = None  # the identity applies to every kind
        rank_zero_warn(f"TemperatureScaling: {reason}.", category=CalibrationWarning)

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking:
            return
        self._validated = True
        if not len(self._buffer):
            self.last_fit = None
            self._keep(
                "no validation predictions with targets on dataloader 0 (empty dataloader, or batches without "
                f"targets); kept T={self._fallback:.4g}"
            )
            return
        values, target = self._buffer.gather(trainer)
        kind = self._buffer.kind
        self._buffer.reset()
        fit = safe_fit_temperature(
            values, target, kind, self.init, self.max_iter, self.min_samples, self.bounds, self._fallback, warn=False
        )
        self.last_fit = fit
        if fit.accepted or fit.temperature == 1.0 or self.kind is None:
            self.kind = kind
        self.temperature = fit.temperature
        if not fit.accepted:
            rank_zero_warn(f"TemperatureScaling: {fit.reason}.", category=CalibrationWarning)
        scaled = apply_values(Predictions(kind, values, target), self.kind or kind, "validation_step")
        report = self._before_after(*scaled, target)
        pl_module.log("val/ts/temperature", self.temperature, add_dataloader_idx=False)
        for name, value in report.items():
            pl_module.log(f"val/ts/{name}", value, add_dataloader_idx=False)

    def teardown(self, trainer, pl_module, stage: str) -> None:
        if stage in ("fit", "validate") and not self._validated:
            self._keep(
                f"`trainer.{stage}` ran no validation epoch (an empty validation dataloader, limit_val_batches=0 or "
                f"no validation_step), so no temperature was fitted; kept T={self._fallback:.4g}"
            )
        self._validated = False

    def _before_after(self, values: torch.Tensor, kind: str, target: torch.Tensor) -> dict[str, float]:
        out = {}
        for tag, temp in (("before", 1.0), ("after", self.temperature)):
            probs = scaled_log_probs(values.double(), temp, kind).exp()
            ece, nll = ExpectedCalibrationError(n_bins=self.n_bins), NegativeLogLikelihood()
            ece.update(probs, target)
            nll.update(probs, target)
            out[f"ece_{tag}"], out[f"nll_{tag}"] = float(ece.compute()), float(nll.compute())
        return out

    # ---------------------------------------------------------------- apply
    def _calibrated(self, preds: Predictions, hook: str) -> torch.Tensor:
        if self.temperature == 1.0 or self.kind is None:
            return preds.probs  # the identity, whatever was fitted on
        values, kind = apply_values(preds, self.kind, hook)
        return scaled_log_probs(values, self.temperature, kind).exp()

    def on_test_epoch_start(self, trainer, pl_module) -> None:
        self._require_fit("test")
        self._test_metrics = {
            f"{name}_{tag}": factory().to(pl_module.device)
            for tag in ("before", "after")
            for name, factory in (
                ("ece", lambda: ExpectedCalibrationError(n_bins=self.n_bins)),
                ("nll", NegativeLogLikelihood),
            )
        }

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        outputs = step_outputs(outputs, trainer, pl_module, batch)
        preds = read_predictions(outputs, type(self).__name__, "test_step")
        calibrated = self._calibrated(preds, "test_step")
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
        self.predictions = []

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        found = step_outputs(outputs, trainer, pl_module, batch)
        preds = read_predictions(found, type(self).__name__, "predict_step")
        calibrated = self._calibrated(preds, "predict_step")
        if isinstance(outputs, MutableMapping):
            outputs["calibrated_probs"] = calibrated
        else:  # what the step returned cannot carry it (e.g. a tensor): keep it here
            self.predictions.append(calibrated.detach().cpu())

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
