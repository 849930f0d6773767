"""Non-parametric post-hoc calibration: histogram binning and isotonic regression, one-vs-rest per class.

Both map each class probability ``p_k`` through a monotone step function fitted on validation data
(for class ``k``, the samples whose label is ``k`` are the positives), then renormalise the row
(Zadrozny & Elkan, 2002):

- :class:`HistogramBinning`: ``n_bins`` equal-width bins on ``[0, 1]``; a bin maps to the frequency of
  the class among the validation samples in it (an empty bin keeps its midpoint);
- :class:`IsotonicCalibration`: scikit-learn's ``IsotonicRegression`` (``out_of_bounds="clip"``);
  its breakpoints are stored as tensors and applied by linear interpolation in torch, exactly as
  scikit-learn's ``predict``.

A fitted step function gives probability 0 to every region where the class was never seen, which
makes the NLL of a sample of that class infinite: the calibrated values are floored at ``clip``
(default ``1e-4``) before the row is renormalised.

Inputs: ``"logits"`` / ``"probs"`` ``(B, C)`` or ``"member_logits"`` ``(M, B, C)``. For member logits
one map is fitted on the pooled member probabilities (every member with the same targets) and
applied to each member before the members are averaged. State (bin values, breakpoints) is buffers,
saved in ``state_dict`` and loadable with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._base import (
    MIN_SAMPLES,
    Kind,
    ResizableState,
    average_members,
    check_classes,
    check_inputs,
    check_kind,
    fit_refusal,
    refuse,
)

__all__ = ["HistogramBinning", "IsotonicCalibration", "interp"]


def interp(x: Tensor, xp: Tensor, fp: Tensor) -> Tensor:
    """``numpy.interp`` in torch: piecewise-linear through ``(xp, fp)`` (``xp`` increasing), clipped at the ends."""
    if xp.numel() == 1:
        return fp.expand_as(x).clone()
    idx = torch.searchsorted(xp, x.contiguous(), right=True).clamp(1, xp.numel() - 1)
    x0, x1, y0, y1 = xp[idx - 1], xp[idx], fp[idx - 1], fp[idx]
    slope = torch.where(x1 > x0, (y1 - y0) / (x1 - x0).clamp_min(torch.finfo(xp.dtype).tiny), torch.zeros_like(y0))
    out = y0 + slope * (x - x0)
    return torch.where(x <= xp[0], fp[0], torch.where(x >= xp[-1], fp[-1], out))


class _OneVsRest(ResizableState):
    def __init__(self, num_classes: int, kind: Kind, clip: float, min_samples: int) -> None:
        super().__init__()
        check_kind(kind)
        if num_classes < 2:
            raise ValueError(f"`num_classes` must be >= 2, got {num_classes}.")
        if not 0 < clip < 1.0 / num_classes:
            raise ValueError(f"`clip` must be in (0, 1/num_classes), got {clip}.")
        self.num_classes = num_classes
        self.kind = kind
        self.clip = clip
        self.min_samples = min_samples
        self.last_reason: str | None = None
        self.register_buffer("fitted", torch.tensor(False))

    def _probs(self, x: Tensor) -> Tensor:
        return x if self.kind == "probs" else x.softmax(-1)

    def _map_class(self, p: Tensor, k: int) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def _fit_class(self, p: Tensor, positive: Tensor, k: int) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def fit(self, x: Tensor, target: Tensor):
        """Fit one map per class on validation predictions ``x`` (of ``kind``) and class indices ``target``."""
        name = type(self).__name__
        self.last_reason = fit_refusal(name, x, target, self.kind, self.num_classes, self.min_samples)
        if self.last_reason:
            refuse(name, self.last_reason)
            return self
        p = self._probs(x.detach().double())
        if self.kind == "member_logits":  # pool the members, every member with the same targets
            target = target.repeat(p.shape[0])
            p = p.reshape(-1, p.shape[-1])
        target = target.to(p.device)
        with torch.inference_mode(False):
            self._start_fit()
            for k in range(self.num_classes):
                self._fit_class(p[:, k].contiguous(), (target == k).double(), k)
            self.fitted = torch.tensor(True)
        return self

    def _start_fit(self) -> None:
        pass

    def forward(self, x: Tensor) -> Tensor:
        """Calibrated log-probabilities ``(B, C)``."""
        check_inputs(x, self.kind)
        check_classes(type(self).__name__, x, self.num_classes)
        if not bool(self.fitted):
            raise RuntimeError(f"{type(self).__name__} is not fitted: call `.fit(x, target)` on validation data first.")
        p = self._probs(x.double())
        mapped = torch.stack([self._map_class(p[..., k], k) for k in range(self.num_classes)], dim=-1)
        mapped = mapped.clamp(self.clip, 1.0)
        log_probs = (mapped / mapped.sum(-1, keepdim=True)).log()
        return average_members(log_probs, self.kind).to(x.dtype)


class HistogramBinning(_OneVsRest):
    """Histogram binning (Zadrozny & Elkan, 2001), one-vs-rest: each class probability -> its bin's class frequency.

    Args:
        num_classes: number of classes ``C`` (>= 2).
        kind: what the calibrator is given: ``"logits"`` ``(B, C)``, ``"member_logits"`` ``(M, B, C)`` (mapped per
            member, then averaged) or ``"probs"`` ``(B, C)``.
        n_bins: equal-width probability bins per class.
        clip: smallest calibrated probability before renormalising, in ``(0, 1 / C)``.
        min_samples: with fewer fit samples the current bin values are kept (with a ``CalibrationWarning``).

    Example:
        >>> import torch
        >>> from lightning_ensembles.calibration import calibrated_logits
        >>> logits, target = calibrated_logits(5000)
        >>> hb = HistogramBinning(3, n_bins=10).fit(3 * logits, target)  # overconfident logits
        >>> nll = lambda lp: float(torch.nn.functional.nll_loss(lp, target))
        >>> nll(hb(3 * logits)) < nll(torch.log_softmax(3 * logits, -1))
        True
    """

    values: Tensor

    def __init__(
        self,
        num_classes: int,
        kind: Kind = "logits",
        n_bins: int = 15,
        clip: float = 1e-4,
        min_samples: int = MIN_SAMPLES,
    ) -> None:
        super().__init__(num_classes, kind, clip, min_samples)
        if n_bins < 1:
            raise ValueError(f"`n_bins` must be >= 1, got {n_bins}.")
        self.n_bins = n_bins
        midpoints = (torch.arange(n_bins, dtype=torch.float64) + 0.5) / n_bins
        self.register_buffer("values", midpoints.repeat(num_classes, 1))  # (C, n_bins)

    def _bin(self, p: Tensor) -> Tensor:
        return (p * self.n_bins).long().clamp(0, self.n_bins - 1)  # [lo, hi) bins, 1.0 in the last

    def _fit_class(self, p: Tensor, positive: Tensor, k: int) -> None:
        b = self._bin(p)
        count = torch.zeros(self.n_bins, dtype=torch.float64, device=p.device).index_add_(0, b, torch.ones_like(p))
        hits = torch.zeros(self.n_bins, dtype=torch.float64, device=p.device).index_add_(0, b, positive)
        values = self.values[k].to(p.device).clone()
        seen = count > 0
        values[seen] = hits[seen] / count[seen]
        self.values[k] = values.to(self.values)

    def _map_class(self, p: Tensor, k: int) -> Tensor:
        return self.values[k].to(p)[self._bin(p)]


class IsotonicCalibration(_OneVsRest):
    """Isotonic regression (Zadrozny & Elkan, 2002) per class, fitted with scikit-learn, applied in torch.

    Args:
        num_classes: number of classes ``C`` (>= 2).
        kind: what the calibrator is given: ``"logits"`` ``(B, C)``, ``"member_logits"`` ``(M, B, C)`` (mapped per
            member, then averaged) or ``"probs"`` ``(B, C)``.
        clip: smallest calibrated probability before renormalising, in ``(0, 1 / C)``.
        min_samples: with fewer fit samples the current step functions are kept (with a ``CalibrationWarning``).

    Example:
        >>> import torch
        >>> from lightning_ensembles.calibration import calibrated_logits
        >>> logits, target = calibrated_logits(5000)
        >>> iso = IsotonicCalibration(3).fit(3 * logits, target)
        >>> nll = lambda lp: float(torch.nn.functional.nll_loss(lp, target))
        >>> nll(iso(3 * logits)) < nll(torch.log_softmax(3 * logits, -1))
        True
    """

    x_thresholds: Tensor
    y_thresholds: Tensor
    lengths: Tensor

    def __init__(
        self, num_classes: int, kind: Kind = "logits", clip: float = 1e-4, min_samples: int = MIN_SAMPLES
    ) -> None:
        super().__init__(num_classes, kind, clip, min_samples)
        # Breakpoints of each class's step function, padded to a common length (lengths says how many are real).
        self.register_buffer("x_thresholds", torch.zeros(num_classes, 1, dtype=torch.float64))
        self.register_buffer("y_thresholds", torch.zeros(num_classes, 1, dtype=torch.float64))
        self.register_buffer("lengths", torch.ones(num_classes, dtype=torch.long))
        self._parts: list[tuple[Tensor, Tensor]] = []

    def _start_fit(self) -> None:
        self._parts = []

    def _fit_class(self, p: Tensor, positive: Tensor, k: int) -> None:
        from sklearn.isotonic import IsotonicRegression

        iso = IsotonicRegression(y_min=0.0, y_max=1.0, out_of_bounds="clip")
        iso.fit(p.cpu().numpy(), positive.cpu().numpy())
        self._parts.append((torch.as_tensor(iso.X_thresholds_), torch.as_tensor(iso.y_thresholds_)))
        if k == self.num_classes - 1:  # all classes fitted: pack them
            width = max(len(xs) for xs, _ in self._parts)
            xt = torch.zeros(self.num_classes, width, dtype=torch.float64)
            yt = torch.zeros_like(xt)
            for i, (xs, ys) in enumerate(self._parts):
                xt[i, : len(xs)], yt[i, : len(ys)] = xs, ys
            device = self.lengths.device
            self.x_thresholds, self.y_thresholds = xt.to(device), yt.to(device)
            self.lengths = torch.tensor([len(xs) for xs, _ in self._parts], device=device)
            self._parts = []

    def _map_class(self, p: Tensor, k: int) -> Tensor:
        n = int(self.lengths[k])
        xp, fp = self.x_thresholds[k, :n].to(p), self.y_thresholds[k, :n].to(p)
        return interp(p, xp, fp)
