"""PosthocCalibration: fit any post-hoc calibrator on the validation set of any LightningModule, apply it after."""

from __future__ import annotations

from typing import Any, cast

import lightning as L
import torch
from torch import Tensor, nn

from .._checks import check_choice
from ..calibration._base import MIN_SAMPLES
from ..calibration.binning import HistogramBinning, IsotonicCalibration
from ..calibration.scaling import DirichletCalibration, MatrixScaling, VectorScaling
from ..calibration.temperature import TEMPERATURE_BOUNDS, Kind, TemperatureScaler
from ._base import ProbabilityRecalibration, before_after_scores
from ._predictions import Predictions

__all__ = ["CALIBRATION_METHODS", "PosthocCalibration", "build_calibrator"]

#: The calibrators by name.
CALIBRATION_METHODS = ("temperature", "vector", "matrix", "dirichlet", "histogram", "isotonic")


def build_calibrator(
    method: str,
    num_classes: int,
    kind: Kind,
    min_samples: int = MIN_SAMPLES,
    reg_lambda: float = 0.1,
    reg_mu: float = 0.1,
    n_bins: int = 15,
    clip: float = 1e-4,
) -> nn.Module:
    """A fresh calibrator ``method`` (one of :data:`CALIBRATION_METHODS`) for ``num_classes`` inputs of ``kind``."""
    check_choice("method", method, CALIBRATION_METHODS)
    if method == "temperature":
        return TemperatureScaler(kind=kind, min_samples=min_samples, bounds=TEMPERATURE_BOUNDS)
    if method == "vector":
        return VectorScaling(num_classes, kind, reg_lambda=reg_lambda, reg_mu=reg_mu, min_samples=min_samples)
    if method in ("matrix", "dirichlet"):
        cls = MatrixScaling if method == "matrix" else DirichletCalibration
        return cls(num_classes, kind, reg_lambda=reg_lambda, reg_mu=reg_mu, min_samples=min_samples)
    if method == "histogram":
        return HistogramBinning(num_classes, kind, n_bins=n_bins, clip=clip, min_samples=min_samples)
    return IsotonicCalibration(num_classes, kind, clip=clip, min_samples=min_samples)


class PosthocCalibration(ProbabilityRecalibration):
    """Post-hoc calibration of any classifier by ``method``, fitted on validation data, for any Trainer.

    ``method``: ``"temperature"``, ``"vector"``, ``"matrix"``, ``"dirichlet"``, ``"histogram"`` or
    ``"isotonic"`` (see :mod:`lightning_ensembles.calibration`). ``apply_to``:

    - ``"ensemble"`` (default, and the better choice, see ``docs/beyond_logits.md``): the map is fitted on
      and applied to the ensemble prediction, the mean of member probabilities;
    - ``"members"``: the map is applied to every member before the members are averaged (the step must give
      member outputs). Parametric maps are fitted on the NLL of the averaged prediction; histogram binning
      and isotonic regression on the pooled member probabilities.

    The callback works in log-probability space: member logits enter as ``log_softmax(z)``, member
    probabilities as ``log p`` (the same values), so a map fitted at validation (where a step returns
    logits) applies exactly at predict (where it may return probabilities). For ``"vector"`` and
    ``"matrix"`` this means the map acts on log-probabilities; the classes in
    :mod:`lightning_ensembles.calibration` also take raw logits.

    Predictions are read from the step output dicts as by :class:`TemperatureScaling` (``member_logits``,
    ``member_probs``, ``logits`` or ``probs``, and ``target``), or recorded by ``Ensembling``. The map is
    refitted at the end of every validation epoch (sanity checks excluded), on all ranks' predictions.
    Too few samples (``min_samples``) or a failed fit keep the previous map (identity if none) with a
    :class:`~lightning_ensembles.calibration.CalibrationWarning`.

    Logs ``val/cal_<method>/nll_before``, ``nll_after``, ``ece_before``, ``ece_after`` (and ``test/...``);
    adds ``"calibrated_probs"`` ``(B, C)`` to the test and predict step outputs (or, for a predict step
    that returns no dict, to ``self.predictions``). The fitted map is saved in the checkpoint's callback
    state as tensors and plain data (loads with ``weights_only=True``).

    Args:
        method: the calibrator, one of :data:`CALIBRATION_METHODS`.
        apply_to: ``"ensemble"`` or ``"members"`` (see above).
        min_samples: fewer validation samples keep the previous map.
        reg_lambda, reg_mu: regularisation of the ``"vector"``, ``"matrix"`` and ``"dirichlet"`` maps.
        n_bins: bins of ``"histogram"`` binning.
        clip: the floor of the calibrated probabilities of ``"histogram"`` and ``"isotonic"``.
        ece_bins: bins of the logged ECE.

    Example:
        >>> import lightning as L
        >>> from lightning_ensembles import MLP, EnsembleClassifier
        >>> from lightning_ensembles.data import DigitsDataModule
        >>> model = EnsembleClassifier(backbone=MLP(64, 10), num_members=2)
        >>> cal = PosthocCalibration(method="vector")
        >>> trainer = L.Trainer(max_epochs=1, callbacks=[cal], logger=False, enable_progress_bar=False,
        ...                     enable_checkpointing=False, enable_model_summary=False)
        >>> trainer.fit(model, DigitsDataModule())
        >>> cal.calibrator.weight.shape
        torch.Size([10])
    """

    def __init__(
        self,
        method: str = "vector",
        apply_to: str = "ensemble",
        min_samples: int = MIN_SAMPLES,
        reg_lambda: float = 0.1,
        reg_mu: float = 0.1,
        n_bins: int = 15,
        clip: float = 1e-4,
        ece_bins: int = 15,
    ) -> None:
        super().__init__(ece_bins=ece_bins)
        self.method = check_choice("method", method, CALIBRATION_METHODS)
        self.apply_to = check_choice("apply_to", apply_to, ("ensemble", "members"))
        self.min_samples, self.n_bins, self.clip = min_samples, n_bins, clip
        self.reg_lambda, self.reg_mu = reg_lambda, reg_mu
        self.calibrator: nn.Module | None = None
        self.num_classes: int | None = None

    fitted_name = "fitted map"

    @property
    def state_key(self) -> str:
        # Several instances (e.g. one per method) keep their own state in a checkpoint.
        return self._generate_state_key(method=self.method, apply_to=self.apply_to)

    @property
    def kind(self) -> Kind:
        return "member_logits" if self.apply_to == "members" else "probs"

    @property
    def tag(self) -> str:  # type: ignore[override]  # a property where the base has a class attribute
        return f"cal_{self.method}"

    @property
    def is_fitted(self) -> bool:
        return self.calibrator is not None

    def _new_calibrator(self, num_classes: int) -> nn.Module:
        """A fresh calibrator for ``num_classes`` classes (subclasses bring others, e.g. the torch-uncertainty adapter)."""
        return build_calibrator(
            self.method,
            num_classes,
            self.kind,
            min_samples=self.min_samples,
            reg_lambda=self.reg_lambda,
            reg_mu=self.reg_mu,
            n_bins=self.n_bins,
            clip=self.clip,
        )

    # ---------------------------------------------------------------- inputs
    def _values(self, preds: Predictions, hook: str) -> Tensor:
        """Member log-probabilities (``apply_to="members"``) or ensemble probabilities for one batch."""
        if self.apply_to == "ensemble":
            return preds.probs
        if preds.kind == "member_logits":
            return preds.values.detach().float().log_softmax(-1)
        if preds.kind == "member_probs":
            v = preds.values.detach().float()
            return v.clamp_min(torch.finfo(v.dtype).tiny).log()
        raise ValueError(
            f"PosthocCalibration(apply_to='members') needs member outputs (M, B, C), but `{hook}` returns only "
            f"'{preds.kind}' (B, C). Return 'member_logits' or 'member_probs' from `{hook}`, or use apply_to='ensemble'."
        )

    def _calibrated(self, preds: Predictions, hook: str) -> Tensor:
        values = self._values(preds, hook)
        assert self.calibrator is not None  # test and predict start with `_require_fit`
        self.calibrator.to(values.device)
        return self.calibrator(values.double()).exp().float()

    # ---------------------------------------------------------------- fit on validation
    def _fit_values(self, preds: Predictions) -> tuple[Tensor, str]:
        return self._values(preds, "validation_step"), self.kind

    def _keep_previous(self) -> str:
        return "kept the current map"

    def _fit(self, pl_module: L.LightningModule, values: Tensor, target: Tensor, kind: str) -> None:
        num_classes = values.shape[-1]
        if self.calibrator is None or self.num_classes != num_classes:
            self.num_classes = num_classes
            self.calibrator = self._new_calibrator(num_classes)
        cast(Any, self.calibrator).fit(values.double(), target)  # every calibrator has `fit(x, target)`, no shared base
        before = values.double().exp().mean(0) if self.kind == "member_logits" else values.double()
        after = self.calibrator(values.double()).exp()
        self._log_scores(pl_module, "val", before_after_scores(before, after, target, self.ece_bins))

    # ---------------------------------------------------------------- checkpoint
    def state_dict(self) -> dict[str, Any]:
        if self.calibrator is None:
            return {"method": self.method, "apply_to": self.apply_to, "num_classes": None, "state": {}}
        state = {k: v.detach().cpu() for k, v in self.calibrator.state_dict().items()}
        return {"method": self.method, "apply_to": self.apply_to, "num_classes": self.num_classes, "state": state}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if (state_dict["method"], state_dict["apply_to"]) != (self.method, self.apply_to):
            raise ValueError(
                f"the checkpoint holds a PosthocCalibration(method={state_dict['method']!r}, "
                f"apply_to={state_dict['apply_to']!r}), this callback is method={self.method!r}, "
                f"apply_to={self.apply_to!r}: configure the callback as it was saved."
            )
        self.num_classes = state_dict["num_classes"]
        if self.num_classes is None:
            self.calibrator = None
            return
        self.calibrator = self._new_calibrator(self.num_classes)
        self.calibrator.load_state_dict(state_dict["state"])
