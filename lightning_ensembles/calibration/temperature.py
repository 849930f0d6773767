"""Temperature scaling (Guo et al., 2017): one scalar ``T`` dividing the logits, fitted by minimising NLL.

:func:`fit_temperature` is the bare NLL minimiser. :func:`safe_fit_temperature` (used by
:class:`TemperatureScaler` and the :class:`~lightning_ensembles.callbacks.TemperatureScaling` callback)
refuses ill-posed fits and keeps a safe temperature instead, with a :class:`CalibrationWarning` that
gives the reason:

========================================  =============================================================
situation                                 temperature kept
========================================  =============================================================
no samples                                the previous one (``fallback``, 1.0 = identity if none)
fewer than ``min_samples`` (100) samples  the previous one: with few samples the NLL minimiser runs off
                                          (5 correctly classified samples: ``T -> 0``)
optimum outside ``bounds`` (0.05, 20)     the previous one, or 1.0 where that has a higher NLL than
                                          1.0 on the fit data
optimum with a higher NLL than ``T = 1``  1.0: a fit never makes the NLL on its own data worse than
                                          no scaling
========================================  =============================================================
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Literal, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._checks import check_choice, check_finite, check_targets

#: Fewer samples than this and :func:`safe_fit_temperature` keeps the previous temperature.
MIN_SAMPLES = 100
#: An optimum outside this bracket is refused by :func:`safe_fit_temperature`.
TEMPERATURE_BOUNDS = (0.05, 20.0)


class CalibrationWarning(UserWarning):
    """A post-hoc calibration fit was refused (too few samples, an optimum out of bounds ...) and a safe value kept."""


#: What the tensor handed to the scaler holds: ``(B, C)`` logits, ``(M, B, C)`` member logits or ``(B, C)`` probabilities.
Kind = Literal["logits", "member_logits", "probs"]


def _check(x: Tensor, kind: str) -> None:
    check_choice("kind", kind, ("logits", "member_logits", "probs"))
    want = 3 if kind == "member_logits" else 2
    if x.dim() != want:
        shape = "(M, B, C)" if want == 3 else "(B, C)"
        raise ValueError(f"{kind} must have shape {shape}, got {tuple(x.shape)}.")
    check_finite(x, kind)


def scaled_log_probs(x: Tensor, temperature: Tensor | float, kind: Kind = "logits") -> Tensor:
    """Log-probabilities ``(B, C)`` after temperature scaling.

    - ``logits``: ``log_softmax(z / T)``;
    - ``member_logits``: log of ``mean_m softmax(z_m / T)`` (every member scaled by the same ``T``,
      then averaged: the same thing as dividing the ensemble's forward output by ``T``);
    - ``probs``: ``log_softmax(log p / T)`` (``p ** (1/T)`` renormalised).
    """
    _check(x, kind)
    if kind == "probs":
        x = x.clamp_min(1e-12).log()
    scaled = F.log_softmax(x / temperature, dim=-1)
    if kind == "member_logits":
        return torch.logsumexp(scaled, dim=0) - math.log(x.shape[0])
    return scaled


def member_log_probs(member_probs: Tensor) -> Tensor:
    """``log p`` of member probabilities, usable as ``member_logits`` (or ``(B, C)`` probabilities as ``logits``).

    ``log softmax(z)`` equals ``z`` up to a constant per row, and ``softmax`` ignores that constant even
    after division by ``T``: ``softmax(log p / T) == softmax(z / T)`` exactly, so a temperature fitted on
    logits applies to the probabilities of the same model. The only loss is where a probability
    underflowed to 0 in its dtype (logit gaps above ~87 in float32); it is clamped to the smallest
    normal number of the dtype (``log`` = -87.3 in float32).
    """
    return member_probs.clamp_min(torch.finfo(member_probs.dtype).tiny).log()


def fit_temperature(x: Tensor, target: Tensor, kind: Kind = "logits", init: float = 1.5, max_iter: int = 100) -> float:
    """Temperature ``T > 0`` minimising the mean NLL of ``scaled_log_probs(x, T, kind)`` on ``target``.

    Optimises ``log T`` (so ``T`` stays positive) with L-BFGS and a strong-Wolfe line search: unlike
    Guo et al.'s fixed ``lr=0.01`` it converges from ``init`` to a far-away optimum (e.g. ``T = 5``)
    in a handful of steps. Runs in float64 on detached copies of the inputs, with gradients enabled
    and outside inference mode, so it also works inside ``torch.no_grad()`` / ``torch.inference_mode()``
    (e.g. in a callback hook of a ``trainer.validate`` run). No safeguard: see :func:`safe_fit_temperature`.

    Example:
        >>> from lightning_ensembles.calibration import calibrated_logits
        >>> logits, target = calibrated_logits(4000, num_classes=5, scale=2)
        >>> round(fit_temperature(logits * 5, target), 1)  # logits 5x too sharp -> T close to 5
        5.0
    """
    _check(x, kind)
    batch = x.shape[1] if kind == "member_logits" else x.shape[0]
    check_targets(target, batch, x.shape[-1])
    if init <= 0:
        raise ValueError(f"`init` temperature must be > 0, got {init}.")
    # Inference tensors (made under `torch.inference_mode`, as Lightning's evaluation loops do) cannot
    # take part in autograd: copy them outside inference mode first.
    with torch.inference_mode(False), torch.enable_grad():
        x = x.detach().to(torch.float64).clone()
        target = target.detach().to(x.device).clone()
        log_t = torch.tensor(math.log(init), dtype=torch.float64, device=x.device, requires_grad=True)
        opt = torch.optim.LBFGS([log_t], lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe")

        def closure() -> Tensor:
            opt.zero_grad()
            loss = F.nll_loss(scaled_log_probs(x, log_t.exp(), kind), target)
            loss.backward()
            return loss

        opt.step(closure)
        return float(log_t.detach().exp())


def temperature_nll(x: Tensor, target: Tensor, temperature: float, kind: Kind = "logits") -> float:
    """Mean NLL of ``scaled_log_probs(x, temperature, kind)`` on ``target`` (float64)."""
    with torch.no_grad():
        log_probs = scaled_log_probs(x.detach().double(), float(temperature), kind)
        return float(F.nll_loss(log_probs, target.detach().to(log_probs.device)))


@dataclass
class TemperatureFit:
    """What :func:`safe_fit_temperature` decided.

    ``temperature`` is the value to use; ``optimum`` the NLL minimiser (NaN when no fit was run);
    ``reason`` says why the optimum was not taken (``None`` when it was); ``nll_identity`` and ``nll``
    are the NLL on the fit data at ``T = 1`` and at ``temperature`` (NaN without data).
    """

    temperature: float
    optimum: float
    num_samples: int
    nll_identity: float
    nll: float
    reason: str | None = None

    @property
    def accepted(self) -> bool:
        return self.reason is None


def safe_fit_temperature(
    x: Tensor,
    target: Tensor,
    kind: Kind = "logits",
    init: float = 1.5,
    max_iter: int = 100,
    min_samples: int = MIN_SAMPLES,
    bounds: tuple[float, float] = TEMPERATURE_BOUNDS,
    fallback: float = 1.0,
    warn: bool = True,
) -> TemperatureFit:
    """:func:`fit_temperature` that refuses ill-posed fits and keeps a safe temperature instead.

    The rules (see the table in :mod:`lightning_ensembles.calibration.temperature`): with no samples or
    fewer than ``min_samples``, ``fallback`` (the previous temperature; 1.0 is the identity) is kept; an
    optimum outside ``bounds`` keeps ``fallback`` unless that has a higher NLL on ``x`` than ``T = 1``
    (then 1.0); an optimum with a higher NLL than ``T = 1`` (a failed optimisation) gives 1.0. So the
    temperature returned never has a higher NLL on ``x`` than 1.0 whenever ``x`` holds at least
    ``min_samples`` samples. Each refusal issues a :class:`CalibrationWarning` with the reason
    (``warn=False``: only ``TemperatureFit.reason``).

    Example:
        >>> import torch, warnings
        >>> logits, target = torch.randn(5, 3) * 10, torch.randint(0, 3, (5,))
        >>> with warnings.catch_warnings(record=True):
        ...     fit = safe_fit_temperature(logits, target)
        >>> fit.temperature, fit.reason.startswith("only 5 samples")
        (1.0, True)
    """
    lo, hi = bounds
    if not 0 < lo < hi:
        raise ValueError(f"`bounds` must be (low, high) with 0 < low < high, got {bounds}.")
    if min_samples < 1:
        raise ValueError(f"`min_samples` must be >= 1, got {min_samples}.")
    if not fallback > 0:
        raise ValueError(f"`fallback` temperature must be > 0, got {fallback}.")
    _check(x, kind)
    n = x.shape[1] if kind == "member_logits" else x.shape[0]
    nan = math.nan
    if n == 0:
        return _refused(
            TemperatureFit(fallback, nan, 0, nan, nan, f"no samples to fit on; kept T={fallback:.4g}"), warn
        )
    check_targets(target, n, x.shape[-1])
    if n < min_samples:
        reason = (
            f"only {n} samples (fewer than min_samples={min_samples}): a temperature fitted on so few is unreliable "
            f"(it runs off towards 0 when they are all classified correctly); kept T={fallback:.4g}"
        )
        return _refused(TemperatureFit(fallback, nan, n, nan, nan, reason), warn)
    optimum = fit_temperature(x, target, kind, init, max_iter)
    nll_identity = temperature_nll(x, target, 1.0, kind)
    if not (math.isfinite(optimum) and lo <= optimum <= hi):
        keep = fallback
        nll_keep = temperature_nll(x, target, keep, kind)
        if not nll_keep <= nll_identity:
            keep, nll_keep = 1.0, nll_identity
        reason = (
            f"the NLL-optimal temperature {optimum:.4g} on {n} samples is outside the bounds [{lo:g}, {hi:g}] (a model "
            f"far from calibrated, e.g. trained too little, or a separable fit set); kept T={keep:.4g}. "
            "Pass wider `bounds` if such a temperature is wanted"
        )
        return _refused(TemperatureFit(keep, optimum, n, nll_identity, nll_keep, reason), warn)
    nll = temperature_nll(x, target, optimum, kind)
    if not nll <= nll_identity:
        reason = (
            f"the fitted temperature {optimum:.4g} gives a higher NLL ({nll:.6g}) than T=1 ({nll_identity:.6g}) on "
            f"the {n} fit samples (the optimisation failed); kept T=1"
        )
        return _refused(TemperatureFit(1.0, optimum, n, nll_identity, nll_identity, reason), warn)
    return TemperatureFit(optimum, optimum, n, nll_identity, nll)


def _refused(fit: TemperatureFit, warn: bool) -> TemperatureFit:
    if warn:
        warnings.warn(f"temperature scaling: {fit.reason}.", CalibrationWarning, stacklevel=3)
    return fit


class TemperatureScaler(nn.Module):
    """A fitted temperature as a module: ``fit(x, target)`` then ``scaler(x)`` gives calibrated log-probs.

    ``temperature`` is a buffer (1.0 until fitted), so it travels with ``state_dict`` and checkpoints.
    ``fit`` is :func:`safe_fit_temperature` with the current temperature as the fallback: fewer than
    ``min_samples`` samples, or an optimum outside ``bounds``, keep the current value with a
    :class:`CalibrationWarning`; ``last_fit`` holds the decision.

    Args:
        kind: what the calibrator is given: ``"logits"`` ``(B, C)``, ``"member_logits"`` ``(M, B, C)`` (mapped per
            member, then averaged) or ``"probs"`` ``(B, C)``.
        init: starting temperature of the fit.
        max_iter: L-BFGS iterations of a fit.
        min_samples: fewer fit samples than this keep the current map (with a ``CalibrationWarning``).
        bounds: ``(low, high)``: a fitted temperature outside them is refused (the current one is kept).

    Example:
        >>> import torch
        >>> from lightning_ensembles.calibration import calibrated_logits
        >>> logits, target = calibrated_logits(2000)
        >>> scaler = TemperatureScaler(kind="logits").fit(3 * logits, target)  # 3x too sharp
        >>> 2.5 < float(scaler.temperature) < 3.5, scaler.last_fit.accepted
        (True, True)
        >>> scaler(3 * logits).exp().sum(-1).allclose(torch.ones(2000))
        True
    """

    temperature: Tensor

    def __init__(
        self,
        kind: Kind = "logits",
        init: float = 1.5,
        max_iter: int = 100,
        min_samples: int = MIN_SAMPLES,
        bounds: tuple[float, float] = TEMPERATURE_BOUNDS,
    ) -> None:
        super().__init__()
        check_choice("kind", kind, ("logits", "member_logits", "probs"))
        self.kind = kind
        self.init = init
        self.max_iter = max_iter
        self.min_samples = min_samples
        self.bounds = cast("tuple[float, float]", tuple(bounds))  # a list from a YAML config becomes a tuple
        self.last_fit: TemperatureFit | None = None
        self.register_buffer("temperature", torch.tensor(1.0))

    def fit(self, x: Tensor, target: Tensor) -> TemperatureScaler:
        self.last_fit = safe_fit_temperature(
            x, target, self.kind, self.init, self.max_iter, self.min_samples, self.bounds, float(self.temperature)
        )
        t = self.temperature
        with torch.inference_mode(False):  # a normal tensor, even when fitted (or built) under inference mode
            self.temperature = torch.tensor(self.last_fit.temperature, dtype=t.dtype, device=t.device)
        return self

    def forward(self, x: Tensor) -> Tensor:
        return scaled_log_probs(x, self.temperature.to(x.dtype), self.kind)
