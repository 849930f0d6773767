"""TemperatureScaling: fit a temperature on the validation set of any LightningModule and apply it after."""

from __future__ import annotations

import math
from typing import Any, cast

import lightning as L
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from ..calibration.temperature import (
    MIN_SAMPLES,
    TEMPERATURE_BOUNDS,
    CalibrationWarning,
    Kind,
    TemperatureFit,
    member_log_probs,
    safe_fit_temperature,
    scaled_log_probs,
)
from ._base import ProbabilityRecalibration, before_after_scores
from ._predictions import Predictions


def fit_values(preds: Predictions) -> tuple[Tensor, Kind]:
    """What a temperature is fitted on, and its kind, for a step's predictions.

    ``member_logits`` and ``logits`` as they are; ``member_probs`` as member log-probabilities of kind
    ``member_logits`` (exactly the same scaling, see :func:`~lightning_ensembles.calibration.member_log_probs`);
    ``probs`` (the ensemble prediction) as ``probs``.
    """
    v = preds.values.detach().float()
    if preds.kind == "member_probs":
        return member_log_probs(v), "member_logits"
    if preds.kind in ("member_logits", "logits"):
        return v, cast(Kind, preds.kind)
    return v, "probs"


def apply_values(preds: Predictions, fitted_kind: str, hook: str) -> tuple[Tensor, Kind]:
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
            return v, "member_logits"
        if kind == "member_probs":
            return member_log_probs(v), "member_logits"
        raise ValueError(
            f"TemperatureScaling was fitted on member logits (M, B, C), a temperature that scales every member "
            f"before the members are averaged, but `{hook}` returns only the averaged '{kind}' (B, C), from which "
            f"that cannot be computed. Return 'member_logits' or 'member_probs' (M, B, C) from `{hook}` as well."
        )
    if fitted_kind == "logits":
        if kind == "logits":
            return v, "logits"
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


class TemperatureScaling(ProbabilityRecalibration):
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

    Args:
        init: the temperature the L-BFGS fit starts from.
        max_iter: L-BFGS iterations of a fit.
        n_bins: bins of the logged ECE.
        min_samples: fewer validation samples keep the previous temperature.
        bounds: ``(low, high)``: an NLL-optimal temperature outside keeps the previous one.

    Example:
        >>> import lightning as L
        >>> from lightning_ensembles import MLP, EnsembleClassifier
        >>> from lightning_ensembles.data import DigitsDataModule
        >>> model = EnsembleClassifier(backbone=MLP(64, 10), num_members=2)
        >>> ts = TemperatureScaling()
        >>> trainer = L.Trainer(max_epochs=2, callbacks=[ts], logger=False, enable_progress_bar=False,
        ...                     enable_checkpointing=False, enable_model_summary=False)
        >>> trainer.fit(model, DigitsDataModule())
        >>> 0.05 <= ts.temperature <= 20  # the default bounds
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
        super().__init__(ece_bins=n_bins)
        self.init, self.max_iter, self.n_bins = init, max_iter, n_bins
        self.min_samples, self.bounds = min_samples, (float(bounds[0]), float(bounds[1]))
        self.temperature: float = math.nan
        self.kind: Kind | None = None
        self.last_fit: TemperatureFit | None = None

    tag = "ts"
    fitted_name = "temperature"

    @property
    def is_fitted(self) -> bool:
        return not math.isnan(self.temperature)

    # ---------------------------------------------------------------- fit on validation
    def _fit_values(self, preds: Predictions) -> tuple[Tensor, str]:
        return fit_values(preds)

    @property
    def _fallback(self) -> float:
        """The safe temperature kept when a fit is refused: the previous one, else the identity."""
        return self.temperature if self.is_fitted else 1.0

    def _keep_previous(self) -> str:
        self.last_fit = None
        self.temperature = self._fallback
        if self.temperature == 1.0:
            self.kind = None  # the identity applies to every kind
        return f"kept T={self.temperature:.4g}"

    def _fit(self, pl_module: L.LightningModule, values: Tensor, target: Tensor, kind: str) -> None:
        fitted_kind = cast(Kind, kind)  # what `fit_values` gave
        fit = safe_fit_temperature(
            values,
            target,
            fitted_kind,
            self.init,
            self.max_iter,
            self.min_samples,
            self.bounds,
            self._fallback,
            warn=False,
        )
        self.last_fit = fit
        if fit.accepted or fit.temperature == 1.0 or self.kind is None:
            self.kind = fitted_kind
        self.temperature = fit.temperature
        if not fit.accepted:
            rank_zero_warn(f"TemperatureScaling: {fit.reason}.", category=CalibrationWarning)
        scaled, scaled_kind = apply_values(Predictions(kind, values, target), self.kind or kind, "validation_step")
        before, after = (scaled_log_probs(scaled.double(), t, scaled_kind).exp() for t in (1.0, self.temperature))
        pl_module.log("val/ts/temperature", self.temperature, add_dataloader_idx=False)
        self._log_scores(pl_module, "val", before_after_scores(before, after, target, self.n_bins))

    # ---------------------------------------------------------------- apply
    def _calibrated(self, preds: Predictions, hook: str) -> Tensor:
        if self.temperature == 1.0 or self.kind is None:
            return preds.probs  # the identity, whatever was fitted on
        values, kind = apply_values(preds, self.kind, hook)
        return scaled_log_probs(values, self.temperature, kind).exp()

    def _test_results(self) -> dict[str, Any]:
        return {"temperature": self.temperature, **super()._test_results()}

    # ---------------------------------------------------------------- checkpoint
    def state_dict(self) -> dict[str, Any]:
        return {"temperature": self.temperature, "kind": self.kind}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.temperature = float(state_dict["temperature"])
        self.kind = state_dict["kind"]
