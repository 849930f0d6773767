"""Parametric post-hoc calibration beyond one temperature: vector, matrix and Dirichlet scaling.

- :class:`VectorScaling` (Guo et al., 2017): ``softmax(w * z + b)``, ``w, b`` of size ``C``;
- :class:`MatrixScaling` (Guo et al., 2017): ``softmax(W z + b)``, ``W`` ``C x C``;
- :class:`DirichletCalibration` (Kull et al., NeurIPS 2019): ``softmax(W log p + b)``, matrix scaling of
  the log-probabilities (a Dirichlet family of calibration maps). It acts on probabilities, so it applies
  to ``probs`` and to ``member_logits`` (through ``log_softmax``) with the same meaning.

Every map is fitted with a penalty on its distance from the identity map, added to the mean NLL:
``lambda / (C (C - 1)) * sum_{i != j} W_ij^2`` (Kull et al.'s ODIR: Off-Diagonal and Intercept
Regularisation) ``+ lambda / C * sum_i (W_ii - 1)^2 + mu / C * sum_j b_j^2``, ``lambda = mu = 0.1`` by
default. ODIR leaves the diagonal free; it is penalised here too because a validation set that the model
nearly separates otherwise drives the scales to infinity (measured: vector scaling fitted on the 288
validation digits without a penalty reaches weights ~100 and a test NLL of 20, against 0.085 unscaled and
0.076 with the penalty). ``reg_lambda=0, reg_mu=0`` gives the unpenalised maps of Guo et al.

All fits start at the identity map, run L-BFGS in float64 (outside inference mode, so they work in
a callback hook of ``trainer.validate``) and are safeguarded as temperature scaling is: with fewer
than ``min_samples`` samples the current map is kept, and a fit whose NLL on its own data is higher
than the identity's (a failed optimisation) is refused; each refusal issues a
:class:`~lightning_ensembles.calibration.CalibrationWarning` and sets ``last_reason``.

The map is a set of buffers (``weight``, ``bias``): it travels with ``state_dict`` and loads with
``torch.load(weights_only=True)``. Inputs: see :mod:`lightning_ensembles.calibration._base`
(``"logits"``, ``"member_logits"`` -- the map applied to every member before averaging, fitted on the
averaged prediction's NLL -- or ``"probs"`` -- the ensemble's probabilities, through their logs).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._base import (
    MIN_SAMPLES,
    Kind,
    average_members,
    check_classes,
    check_inputs,
    check_kind,
    fit_refusal,
    log_probs_of,
    refuse,
)

__all__ = ["DirichletCalibration", "MatrixScaling", "VectorScaling"]


class _LinearCalibrator(nn.Module):
    """A linear map of (log-)scores followed by a softmax; subclasses choose the shape and the inputs."""

    weight: Tensor
    bias: Tensor
    diagonal = False
    on_log_probs = False  # Dirichlet calibration maps log p, the others the logits themselves

    def __init__(
        self,
        num_classes: int,
        kind: Kind = "logits",
        reg_lambda: float = 0.1,
        reg_mu: float = 0.1,
        max_iter: int = 200,
        min_samples: int = MIN_SAMPLES,
    ) -> None:
        super().__init__()
        check_kind(kind)
        if num_classes < 2:
            raise ValueError(f"`num_classes` must be >= 2, got {num_classes}.")
        if reg_lambda < 0 or reg_mu < 0:
            raise ValueError(f"`reg_lambda` and `reg_mu` must be >= 0, got {reg_lambda} and {reg_mu}.")
        self.num_classes = num_classes
        self.kind = kind
        self.reg_lambda = reg_lambda
        self.reg_mu = reg_mu
        self.max_iter = max_iter
        self.min_samples = min_samples
        self.last_reason: str | None = None
        eye = torch.ones(num_classes) if self.diagonal else torch.eye(num_classes)
        self.register_buffer("weight", eye)
        self.register_buffer("bias", torch.zeros(num_classes))

    # ------------------------------------------------------------------ the map
    def _scores(self, x: Tensor) -> Tensor:
        """What the linear map acts on: logits, or log-probabilities (Dirichlet, and ``probs`` inputs)."""
        if self.kind == "probs" or self.on_log_probs:
            return log_probs_of(x, self.kind)
        return x

    def _map(self, scores: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
        mapped = scores * weight if self.diagonal else scores @ weight.T
        return average_members(F.log_softmax(mapped + bias, dim=-1), self.kind)

    def forward(self, x: Tensor) -> Tensor:
        """Calibrated log-probabilities ``(B, C)``."""
        check_inputs(x, self.kind)
        check_classes(type(self).__name__, x, self.num_classes)
        return self._map(self._scores(x), self.weight.to(x.dtype), self.bias.to(x.dtype))

    # ------------------------------------------------------------------ fit
    def _penalty(self, weight: Tensor, bias: Tensor) -> Tensor:
        c = self.num_classes
        total = weight.new_zeros(())
        if self.reg_lambda:
            diag = weight if self.diagonal else torch.diagonal(weight)
            total = total + self.reg_lambda * (diag - 1).pow(2).sum() / c
            if not self.diagonal:
                off = weight - torch.diag(diag)
                total = total + self.reg_lambda * off.pow(2).sum() / (c * (c - 1))
        if self.reg_mu:
            total = total + self.reg_mu * bias.pow(2).sum() / c
        return total

    def fit(self, x: Tensor, target: Tensor) -> _LinearCalibrator:
        """Fit the map on validation predictions ``x`` (of this calibrator's ``kind``) and class indices ``target``."""
        name = type(self).__name__
        self.last_reason = fit_refusal(name, x, target, self.kind, self.num_classes, self.min_samples)
        if self.last_reason:
            refuse(name, self.last_reason)
            return self
        with torch.inference_mode(False), torch.enable_grad():
            scores = self._scores(x.detach().double().clone())
            target = target.detach().to(scores.device).clone()
            identity = (torch.ones if self.diagonal else torch.eye)(self.num_classes, dtype=torch.float64)
            weight = identity.clone().requires_grad_(True)
            bias = torch.zeros(self.num_classes, dtype=torch.float64, requires_grad=True)
            opt = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=self.max_iter, line_search_fn="strong_wolfe")

            def closure() -> Tensor:
                opt.zero_grad()
                loss = F.nll_loss(self._map(scores, weight, bias), target) + self._penalty(weight, bias)
                loss.backward()
                return loss

            opt.step(closure)
            with torch.no_grad():
                nll = float(F.nll_loss(self._map(scores, weight, bias), target))
                nll_identity = float(F.nll_loss(self._map(scores, identity, torch.zeros_like(bias)), target))
        if not (torch.isfinite(weight).all() and torch.isfinite(bias).all() and nll <= nll_identity):
            self.last_reason = refuse(
                name,
                f"the fitted map gives a higher NLL ({nll:.6g}) than the identity ({nll_identity:.6g}) on its {x.shape[-2]} fit "
                "samples (the optimisation failed); kept the current map",
            )
            return self
        with torch.inference_mode(False):
            self.weight = weight.detach().to(self.weight)
            self.bias = bias.detach().to(self.bias)
        return self


class VectorScaling(_LinearCalibrator):
    """Vector scaling (Guo et al., 2017): ``softmax(w * z + b)`` with one scale and one offset per class.

    Args:
        num_classes: number of classes ``C`` (>= 2).
        kind: what the calibrator is given: ``"logits"`` ``(B, C)``, ``"member_logits"`` ``(M, B, C)`` (mapped per
            member, then averaged) or ``"probs"`` ``(B, C)``.
        reg_lambda: penalty ``lambda / C * sum_c (w_c - 1)^2`` on the scales' distance from 1 (0: none).
        reg_mu: penalty ``mu / C * sum_c b_c^2`` on the offsets (0: none).
        max_iter: L-BFGS iterations of a fit.
        min_samples: with fewer fit samples the current scales and offsets are kept (with a ``CalibrationWarning``).

    Example:
        >>> import torch
        >>> from lightning_ensembles.calibration import calibrated_logits
        >>> logits, target = calibrated_logits(3000)
        >>> vs = VectorScaling(3, reg_lambda=0, reg_mu=0).fit(logits * torch.tensor([3.0, 1.0, 0.5]), target)  # per-class miscalibration
        >>> torch.allclose(vs.weight, torch.tensor([1 / 3, 1.0, 2.0]), atol=0.3)  # undoes the scales
        True
    """

    diagonal = True


class MatrixScaling(_LinearCalibrator):
    """Matrix scaling (Guo et al., 2017): ``softmax(W z + b)``, regularised towards the identity (``reg_lambda``, ``reg_mu``).

    Args:
        num_classes: number of classes ``C`` (>= 2).
        kind: what the calibrator is given: ``"logits"`` ``(B, C)``, ``"member_logits"`` ``(M, B, C)`` (mapped per
            member, then averaged) or ``"probs"`` ``(B, C)``.
        reg_lambda: penalty on the distance of ``W`` from the identity, off the diagonal (ODIR) and on it (0: none).
        reg_mu: penalty ``mu / C * sum_j b_j^2`` on the bias (0: none).
        max_iter: L-BFGS iterations of a fit.
        min_samples: with fewer fit samples the current matrix and bias are kept (with a ``CalibrationWarning``).

    Example:
        >>> import torch
        >>> from lightning_ensembles.calibration import calibrated_logits
        >>> logits, target = calibrated_logits(3000)
        >>> ms = MatrixScaling(3).fit(2 * logits, target)  # 2x too sharp
        >>> nll = lambda lp: float(torch.nn.functional.nll_loss(lp, target))
        >>> abs(nll(ms(2 * logits)) - nll(logits.log_softmax(-1))) < 0.01  # as good as the true model
        True
    """


class DirichletCalibration(MatrixScaling):
    """Dirichlet calibration (Kull et al., 2019): ``softmax(W log p + b)``, regularised towards the identity.

    For ``kind="logits"`` / ``"member_logits"`` the map acts on ``log_softmax(z)`` (of each member), so a
    map fitted on logits applies exactly to the probabilities of the same model.

    Args:
        num_classes: number of classes ``C`` (>= 2).
        kind: what the calibrator is given: ``"logits"`` ``(B, C)``, ``"member_logits"`` ``(M, B, C)`` (mapped per
            member, then averaged) or ``"probs"`` ``(B, C)``.
        reg_lambda: penalty on the distance of the map of ``log p`` from the identity (0: none).
        reg_mu: penalty on the size of the bias (0: none).
        max_iter: L-BFGS iterations of a fit.
        min_samples: with fewer fit samples the current map is kept (with a ``CalibrationWarning``).

    Example:
        >>> import torch
        >>> from lightning_ensembles.calibration import calibrated_logits
        >>> logits, target = calibrated_logits(3000)
        >>> dc = DirichletCalibration(3, kind="probs").fit((3 * logits).softmax(-1), target)  # 3x too sharp
        >>> nll = lambda lp: float(torch.nn.functional.nll_loss(lp, target))
        >>> abs(nll(dc((3 * logits).softmax(-1))) - nll(logits.log_softmax(-1))) < 0.01  # as good as the true model
        True
    """

    on_log_probs = True
