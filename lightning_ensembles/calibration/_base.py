"""What the post-hoc calibrators share: input kinds, member averaging, the fit safeguards, resizable state.

Every calibrator maps predictions to calibrated log-probabilities ``(B, C)`` and takes one of three
input kinds (as :class:`~lightning_ensembles.calibration.TemperatureScaler`):

- ``"logits"`` ``(B, C)``: one model's logits;
- ``"member_logits"`` ``(M, B, C)``: the calibration map is applied to **every member**, then the
  member probabilities are averaged (the ensemble of calibrated members);
- ``"probs"`` ``(B, C)``: the map is applied to **the ensemble's** probabilities (mean of member
  softmax), after averaging.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._checks import check_choice, check_finite, check_targets
from .temperature import MIN_SAMPLES, CalibrationWarning

Kind = Literal["logits", "member_logits", "probs"]
KINDS = ("logits", "member_logits", "probs")


def check_kind(kind: str) -> None:
    check_choice("kind", kind, KINDS)


def check_inputs(x: Tensor, kind: str, target: Tensor | None = None) -> int:
    """Validate ``x`` (and ``target``) for ``kind``; return the number of samples."""
    check_kind(kind)
    want = 3 if kind == "member_logits" else 2
    if not isinstance(x, Tensor) or x.dim() != want:
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"{kind} must have shape {'(M, B, C)' if want == 3 else '(B, C)'}, got {shape}.")
    check_finite(x, kind)
    n = x.shape[-2]
    if target is not None:
        check_targets(target, n, x.shape[-1])
    return n


def check_classes(owner: str, x: Tensor, num_classes: int) -> None:
    """``ValueError`` unless the predictions ``x`` have the ``num_classes`` classes ``owner`` was built for."""
    if x.shape[-1] != num_classes:
        raise ValueError(f"{owner} was built for {num_classes} classes, got {x.shape[-1]}.")


def fit_refusal(owner: str, x: Tensor, target: Tensor, kind: str, num_classes: int, min_samples: int) -> str | None:
    """Check the inputs of a fit of ``owner``; the reason to refuse it (too few samples), or ``None`` to fit."""
    n = check_inputs(x, kind, target)
    check_classes(owner, x, num_classes)
    return too_few(owner, n, min_samples)


def log_probs_of(x: Tensor, kind: str) -> Tensor:
    """Log-probabilities of the inputs, ``(B, C)`` or ``(M, B, C)`` for member logits (no calibration)."""
    if kind == "probs":
        return x.clamp_min(torch.finfo(x.dtype).tiny).log()
    return F.log_softmax(x, dim=-1)


def average_members(log_probs: Tensor, kind: str) -> Tensor:
    """``log mean_m p_m`` for member log-probabilities ``(M, B, C)``; other kinds pass through."""
    if kind == "member_logits":
        return torch.logsumexp(log_probs, dim=0) - math.log(log_probs.shape[0])
    return log_probs


def refuse(owner: str, reason: str, warn: bool = True) -> str:
    if warn:
        warnings.warn(f"{owner}: {reason}.", CalibrationWarning, stacklevel=3)
    return reason


def too_few(owner: str, n: int, min_samples: int) -> str | None:
    """The reason to refuse a fit on ``n`` samples, or ``None``."""
    if n == 0:
        return "no samples to fit on; kept the current calibration map"
    if n < min_samples:
        return (
            f"only {n} samples (fewer than min_samples={min_samples}): a calibration map fitted on so few is "
            "unreliable; kept the current map"
        )
    return None


def calibrated_logits(
    num_samples: int, num_classes: int = 3, scale: float = 1.0, seed: int = 0
) -> tuple[Tensor, Tensor]:
    """Seeded logits ``(N, C)`` (standard normal times ``scale``) and labels ``(N,)`` drawn from their softmax.

    The logits of a perfectly calibrated model, for examples and tests: a calibrator fitted on a distorted
    copy (e.g. ``3 * logits``, overconfident) should undo the distortion.

    Example:
        >>> logits, target = calibrated_logits(4, num_classes=5)
        >>> logits.shape, target.shape
        (torch.Size([4, 5]), torch.Size([4]))
    """
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(num_samples, num_classes, generator=g) * scale
    return logits, torch.multinomial(logits.softmax(-1), 1, generator=g).squeeze(1)


class ResizableState(nn.Module):
    """Buffers whose shape is known only after fitting (e.g. isotonic thresholds) load at any saved shape."""

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        for name, buf in list(self._buffers.items()):
            saved = state_dict.get(prefix + name)
            if buf is not None and isinstance(saved, Tensor) and saved.shape != buf.shape:
                self._buffers[name] = torch.empty_like(saved, dtype=buf.dtype, device=buf.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


__all__ = ["KINDS", "MIN_SAMPLES", "Kind", "ResizableState", "average_members", "check_inputs", "log_probs_of"]
