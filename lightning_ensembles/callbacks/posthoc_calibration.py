"""PosthocCalibration: fit any post-hoc calibrator on the validation set of any LightningModule, apply it after."""

from __future__ import annotations

from collections.abc import MutableMapping
from typing import Any

import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn

from ..calibration._base import MIN_SAMPLES
from ..calibration.binning import HistogramBinning, IsotonicCalibration
from ..calibration.scaling import DirichletCalibration, MatrixScaling, VectorScaling
from ..calibration.temperature import TEMPERATURE_BOUNDS, CalibrationWarning, TemperatureScaler
from ..metrics import ExpectedCalibrationError, NegativeLogLikelihood
from ._predictions import EpochBuffer, Predictions, read_predictions, step_outputs

__all__ = ["CALIBRATION_METHODS", "PosthocCalibration", "build_calibrator"]

#: The calibrators by name.
CALIBRATION_METHODS = ("temperature", "vector", "matrix", "dirichlet", "histogram", "isotonic")


def build_calibrator(
    method: str,
    num_classes: int,
    kind: str,
    min_samples: int = MIN_SAMPLES,
    reg_lambda: float = 0.1,
    reg_mu: float = 0.1,
    n_bins: int = 15,
    clip: float = 1e-4,
) -> nn.Module:
    """A fresh calibrator ``method`` (one of :data:`CALIBRATION_METHODS`) for ``num_classes`` inputs of ``kind``."""
    if method == "temperature":
        return TemperatureScaler(kind=kind, min_samples=min_samples, bounds=TEMPERATURE_BOUNDS)
    if method == "vector":
        return VectorScaling(num_classes, kind, reg_lambda=reg_lambda, reg_mu=reg_mu, min_samples=min_samples)
    if method in ("matrix", "dirichlet"):
        cls = MatrixScaling if method == "matrix" else DirichletCalibration
        return cls(num_classes, kind, reg_lambda=reg_lambda, reg_mu=reg_mu, min_samples=min_samples)
    if method == "histogram":
        return HistogramBinning(num_classes, kind, n_bins=n_bins, clip=clip, min_samples=min_samples)
    if method == "isotonic":
        return IsotonicCalibration(num_classes, kind, clip=clip, min_samples=min_samples)
    raise ValueError(f"unknown calibration method {method!r}; choose from {list(CALIBRATION_METHODS)}.")


class PosthocCalibration(Callback):
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

    Example:
        >>> import lightning as L
        >>> from lightning_ensembles import EnsembleClassifier
        >>> from lightning_ensembles.data import DigitsDataModule
        >>> model = EnsembleClassifier(backbone="mlp", num_members=2,
        ...                            backbone_kwargs={"in_features": 64, "out_features": 10})
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
        if method not in CALIBRATION_METHODS:
            raise ValueError(f"unknown calibration method {method!r}; choose from {list(CALIBRATION_METHODS)}.")
        if apply_to not in ("ensemble", "members"):
            raise ValueError(f"`apply_to` must be 'ensemble' or 'members', got {apply_to!r}.")
        self.method = method
        self.apply_to = apply_to
        self.kwargs = {
            "min_samples": min_samples,
            "reg_lambda": reg_lambda,
            "reg_mu": reg_mu,
            "n_bins": n_bins,
            "clip": clip,
        }
        self.ece_bins = ece_bins
        self.calibrator: nn.Module | None = None
        self.num_classes: int | None = None
        self.predictions: list[Tensor] = []
        self._buffer = EpochBuffer()
        self._test: dict[str, Any] = {}

    @property
    def state_key(self) -> str:
        # Several instances (e.g. one per method) keep their own state in a checkpoint.
        return self._generate_state_key(method=self.method, apply_to=self.apply_to)

    @property
    def kind(self) -> str:
        return "member_logits" if self.apply_to == "members" else "probs"

    @property
    def tag(self) -> str:
        return f"cal_{self.method}"

    def _new_calibrator(self, num_classes: int) -> nn.Module:
        """A fresh calibrator for ``num_classes`` classes (subclasses bring others, e.g. the torch-uncertainty adapter)."""
        return build_calibrator(self.method, num_classes, self.kind, **self.kwargs)

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
        self.calibrator.to(values.device)
        return self.calibrator(values.double()).exp().float()

    # ---------------------------------------------------------------- fit on validation
    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        self._buffer.reset()

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if trainer.sanity_checking or dataloader_idx != 0:
            return
        preds = read_predictions(
            step_outputs(outputs, trainer, pl_module, batch), type(self).__name__, "validation_step"
        )
        if preds.target is not None:
            self._buffer.add(self._values(preds, "validation_step"), preds.target, self.kind)

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking:
            return
        if not len(self._buffer):
            rank_zero_warn(
                "PosthocCalibration: no validation predictions with targets on dataloader 0; kept the current map.",
                category=CalibrationWarning,
            )
            return
        values, target = self._buffer.gather(trainer)
        self._buffer.reset()
        num_classes = values.shape[-1]
        if self.calibrator is None or self.num_classes != num_classes:
            self.num_classes = num_classes
            self.calibrator = self._new_calibrator(num_classes)
        self.calibrator.fit(values.double(), target)
        before = self._identity(values)
        after = self.calibrator(values.double()).exp()
        for name, value in self._scores(before, after, target).items():
            pl_module.log(f"val/{self.tag}/{name}", value, add_dataloader_idx=False)

    def _identity(self, values: Tensor) -> Tensor:
        return values.double().exp().mean(0) if self.kind == "member_logits" else values.double()

    def _scores(self, before: Tensor, after: Tensor, target: Tensor) -> dict[str, float]:
        out = {}
        for tag, probs in (("before", before), ("after", after)):
            ece, nll = ExpectedCalibrationError(n_bins=self.ece_bins), NegativeLogLikelihood()
            ece.update(probs, target)
            nll.update(probs, target)
            out[f"nll_{tag}"], out[f"ece_{tag}"] = float(nll.compute()), float(ece.compute())
        return out

    # ---------------------------------------------------------------- apply
    def _require_fit(self, stage: str) -> None:
        if self.calibrator is None:
            raise RuntimeError(
                f"PosthocCalibration has no fitted map at {stage} time: run `trainer.fit` (with validation) or "
                "`trainer.validate` first, or load a checkpoint saved with this callback."
            )

    def on_test_epoch_start(self, trainer, pl_module) -> None:
        self._require_fit("test")
        self._test = {
            f"{name}_{tag}": cls().to(pl_module.device)
            for tag in ("before", "after")
            for name, cls in (
                ("ece", lambda: ExpectedCalibrationError(n_bins=self.ece_bins)),
                ("nll", NegativeLogLikelihood),
            )
        }

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        outputs = step_outputs(outputs, trainer, pl_module, batch)
        preds = read_predictions(outputs, type(self).__name__, "test_step")
        calibrated = self._calibrated(preds, "test_step")
        if isinstance(outputs, MutableMapping):
            outputs["calibrated_probs"] = calibrated
        if preds.target is None or dataloader_idx != 0:
            return
        for tag, probs in (("before", preds.probs), ("after", calibrated)):
            self._test[f"ece_{tag}"].update(probs, preds.target)
            self._test[f"nll_{tag}"].update(probs, preds.target)

    def on_test_epoch_end(self, trainer, pl_module) -> None:
        if not self._test or all(m.update_count == 0 for m in self._test.values()):
            return
        for name, metric in self._test.items():
            pl_module.log(f"test/{self.tag}/{name}", metric.compute(), add_dataloader_idx=False)

    def on_predict_epoch_start(self, trainer, pl_module) -> None:
        self._require_fit("predict")
        self.predictions = []

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        preds = read_predictions(step_outputs(outputs, trainer, pl_module, batch), type(self).__name__, "predict_step")
        calibrated = self._calibrated(preds, "predict_step")
        if isinstance(outputs, MutableMapping):
            outputs["calibrated_probs"] = calibrated
        else:
            self.predictions.append(calibrated.detach().cpu())

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
