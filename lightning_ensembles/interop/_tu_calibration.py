"""torch-uncertainty's logit scalers as a calibrator (:class:`TUScaler`) and a callback (:class:`TUCalibration`)."""

from __future__ import annotations

import contextlib
import copy
import logging
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from ..calibration._base import MIN_SAMPLES, average_members, check_inputs, check_kind, refuse, too_few
from ..callbacks.posthoc_calibration import PosthocCalibration
from ._tu import tu

__all__ = ["TUCalibration", "TUScaler"]


@contextlib.contextmanager
def _quiet_logging() -> Iterator[None]:
    # torch-uncertainty's Scaler.fit logs a warning whenever it fits on logits instead of a model,
    # which is what this adapter always does.
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(previous)


class TUScaler(nn.Module):
    """A torch-uncertainty logit scaler as a calibrator of this library: ``fit(x, target)``, ``forward(x)``.

    ``scaler``: a torch-uncertainty ``Scaler`` (``TemperatureScaler``, ``VectorScaler``,
    ``MatrixScaler``, ``DirichletScaler``), fitted or not. A copy is kept (``self.scaler``) without the
    model it may wrap: this adapter hands it predictions, not inputs. ``forward`` returns calibrated
    log-probabilities ``(B, C)`` like every calibrator of :mod:`lightning_ensembles.calibration`, for
    the input ``kind``:

    - ``"logits"`` ``(B, C)``: the scaler on the logits, exactly torch-uncertainty's
      ``softmax(scaler(z))``; ``fit`` is torch-uncertainty's own ``Scaler.fit`` (L-BFGS on the
      cross-entropy, its ``lr`` and ``max_iter``) on these logits;
    - ``"probs"`` ``(B, C)``, the ensemble's probabilities: the same on ``log p`` (the ensemble's
      log-probabilities are logits of its prediction);
    - ``"member_logits"`` ``(M, B, C)``: the scaler on every member, member probabilities averaged;
      fitted with the scaler's L-BFGS settings on the NLL of the averaged prediction.

    What this library adds to the fit (as for its own calibrators): fewer than ``min_samples`` samples
    keep the current map, and a fit whose NLL on its own data is higher than before (an L-BFGS run
    that diverged, e.g. to a negative temperature) is undone; both with a ``CalibrationWarning``.
    ``refit=False`` applies a scaler fitted elsewhere and never changes it (``fit`` does nothing).

    Runs in the scaler's dtype (float32), as torch-uncertainty does; returns ``x``'s dtype.

    Args:
        scaler: the torch-uncertainty ``Scaler`` (a copy is kept).
        kind: ``"logits"``, ``"probs"`` or ``"member_logits"``, see above.
        min_samples: fewer fit samples than this keep the current map (with a ``CalibrationWarning``).
        refit: fit the scaler in ``fit``; ``False`` applies it as given (fitted elsewhere).

    Example:
        >>> import torch
        >>> from torch_uncertainty.post_processing import TemperatureScaler
        >>> from lightning_ensembles.calibration import calibrated_logits
        >>> logits, target = calibrated_logits(2000)
        >>> cal = TUScaler(TemperatureScaler(), kind="logits").fit(3 * logits, target)  # 3x too sharp
        >>> 2.5 < cal.scaler.temperature[0].item() < 3.5
        True
        >>> cal(3 * logits).exp().sum(-1).allclose(torch.ones(2000))
        True
    """

    def __init__(
        self, scaler: nn.Module, kind: str = "logits", min_samples: int = MIN_SAMPLES, refit: bool = True
    ) -> None:
        super().__init__()
        base = tu("torch_uncertainty.post_processing.calibration.scaler").Scaler
        if not isinstance(scaler, base):
            raise TypeError(
                f"TUScaler takes one of torch-uncertainty's logit scalers (TemperatureScaler, VectorScaler, MatrixScaler, "
                f"DirichletScaler), got {type(scaler).__name__}. Histogram binning and isotonic regression are not logit "
                "maps: use PosthocCalibration(method='histogram' or 'isotonic') from this library."
            )
        check_kind(kind)
        if min_samples < 1:
            raise ValueError(f"`min_samples` must be >= 1, got {min_samples}.")
        # A copy without the wrapped model (memo maps it to None): its weights stay out of this state dict.
        wrapped = scaler.model
        self.scaler = copy.deepcopy(scaler, {id(wrapped): None} if wrapped is not None else None)
        self.kind = kind
        self.min_samples = min_samples
        self.refit = refit

    @property
    def params(self) -> list[Tensor]:
        """The scaler's parameters (its ``inv_temperature`` list)."""
        return list(self.scaler.inv_temperature)

    def _dtype(self) -> torch.dtype:
        return self.params[0].dtype

    def _logits(self, x: Tensor) -> Tensor:
        """What the scaler is applied to: logits as they are, ``log p`` for probabilities."""
        x = x.to(self._dtype())
        if self.kind == "probs":
            return x.clamp_min(torch.finfo(x.dtype).tiny).log()
        return x

    def _check_classes(self, x: Tensor) -> None:
        want = getattr(self.scaler, "num_classes", None)
        if want is not None and x.shape[-1] != want:
            raise ValueError(
                f"the {type(self.scaler).__name__} was built for num_classes={want}, the predictions have "
                f"{x.shape[-1]} classes. Build it with num_classes={x.shape[-1]}."
            )

    def _log_probs(self, z: Tensor) -> Tensor:
        return average_members(F.log_softmax(self.scaler._scale(z), dim=-1), self.kind)

    def forward(self, x: Tensor) -> Tensor:
        """Calibrated log-probabilities ``(B, C)``."""
        check_inputs(x, self.kind)
        self._check_classes(x)
        return self._log_probs(self._logits(x)).to(x.dtype)

    def _nll(self, z: Tensor, target: Tensor) -> float:
        with torch.no_grad():
            return float(F.nll_loss(self._log_probs(z), target))

    def fit(self, x: Tensor, target: Tensor) -> TUScaler:
        n = check_inputs(x, self.kind, target)
        self._check_classes(x)
        if not self.refit:
            return self
        reason = too_few(type(self).__name__, n, self.min_samples)
        if reason is not None:
            refuse(type(self).__name__, reason)
            return self
        # Inference tensors (Lightning's evaluation loops) cannot take part in autograd: copy them first.
        with torch.inference_mode(False), torch.enable_grad():
            z = self._logits(x.detach()).clone()
            target = target.detach().to(z.device).long().clone()
            saved = [p.detach().clone() for p in self.params]
            nll_before = self._nll(z, target)
            if self.kind == "member_logits":
                self._fit_members(z, target)
            else:
                loader = DataLoader(TensorDataset(z, target), batch_size=len(target))
                self.scaler.device = z.device
                with _quiet_logging():
                    self.scaler.fit(loader, progress=False)
            nll_after = self._nll(z, target)
            if not nll_after <= nll_before:  # also NaN
                with torch.no_grad():
                    for p, s in zip(self.params, saved):
                        p.copy_(s)
                refuse(
                    type(self).__name__,
                    f"the {type(self.scaler).__name__} fit raised the NLL on its {n} samples "
                    f"from {nll_before:.6g} to {nll_after:.6g} (the optimisation diverged); kept the previous map",
                )
        return self

    def _fit_members(self, z: Tensor, target: Tensor) -> None:
        # torch-uncertainty's Scaler.fit pairs one row with one target; members are calibrated here on the
        # NLL of their averaged prediction, with the scaler's own optimiser settings.
        opt = torch.optim.LBFGS(self.params, lr=self.scaler.lr, max_iter=self.scaler.max_iter)

        def closure() -> Tensor:
            opt.zero_grad()
            loss = F.nll_loss(self._log_probs(z), target)
            loss.backward()
            return loss.detach()

        opt.step(closure)
        self.scaler.trained = True


class TUCalibration(PosthocCalibration):
    """:class:`~lightning_ensembles.callbacks.PosthocCalibration` with a torch-uncertainty scaler as the map.

    Everything else is that callback's: fitted at the end of every validation epoch on the first
    validation dataloader's predictions (``apply_to="ensemble"``: on the ensemble probabilities;
    ``"members"``: on every member before averaging), logs ``val/cal_tu_<Scaler>/nll_before`` ...,
    adds ``"calibrated_probs"`` to test and predict outputs, and saves the fitted parameters in
    checkpoints. ``refit=False`` applies a scaler fitted elsewhere (``scaler.fit(...)`` in
    torch-uncertainty) unchanged, also at test time without a validation run. See :class:`TUScaler`.

    Args:
        scaler: the torch-uncertainty ``Scaler`` to fit and apply.
        apply_to: ``"ensemble"`` or ``"members"``, see above.
        refit: refit the scaler at every validation epoch; ``False`` applies it as given.
        min_samples: fewer fit samples than this keep the current map (with a ``CalibrationWarning``).
        ece_bins: bins of the logged ECE (as :class:`~lightning_ensembles.callbacks.PosthocCalibration`'s, whose
            ``n_bins`` is the bin count of histogram binning).

    Example:
        >>> import lightning as L
        >>> from torch_uncertainty.post_processing import TemperatureScaler
        >>> from lightning_ensembles import EnsembleClassifier
        >>> from lightning_ensembles.data import DigitsDataModule
        >>> model = EnsembleClassifier(backbone="mlp", num_members=2,
        ...                            backbone_kwargs={"in_features": 64, "out_features": 10})
        >>> cal = TUCalibration(TemperatureScaler())
        >>> trainer = L.Trainer(max_epochs=1, callbacks=[cal], logger=False, enable_progress_bar=False,
        ...                     enable_checkpointing=False, enable_model_summary=False)
        >>> trainer.fit(model, DigitsDataModule())
        >>> cal.calibrator.scaler.temperature[0].item() > 0
        True
    """

    def __init__(
        self,
        scaler: nn.Module,
        apply_to: str = "ensemble",
        refit: bool = True,
        min_samples: int = MIN_SAMPLES,
        ece_bins: int = 15,
    ) -> None:
        super().__init__(method="temperature", apply_to=apply_to, min_samples=min_samples, ece_bins=ece_bins)
        self._template = TUScaler(scaler, self.kind, min_samples=min_samples, refit=refit)
        self.method = f"tu_{type(scaler).__name__}"
        self.refit = refit
        if not refit:
            if not getattr(scaler, "trained", False):
                raise ValueError(
                    f"refit=False applies a fitted scaler, but this {type(scaler).__name__} was never "
                    "fitted (scaler.trained is False). Fit it first, or pass refit=True."
                )
            self.calibrator = self._new_calibrator(0)
            # 0: "any number of classes": a checkpoint of this callback restores the map (not None), and a
            # validation run rebuilds it from the same fitted scaler.
            self.num_classes = 0

    def _new_calibrator(self, num_classes: int) -> nn.Module:
        return copy.deepcopy(self._template)
