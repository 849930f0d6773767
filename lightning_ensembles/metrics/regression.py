"""Regression metrics of a Gaussian predictive ``N(mean, var)``: NLL, interval coverage, quantile calibration.

Inputs: ``mean``, ``var`` and ``target`` of one shape (any shape; every element counts once). For an
ensemble pass the mixture moments from :func:`~lightning_ensembles.aggregate_gaussian`.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from torch import Tensor
from torchmetrics import Metric

from .._checks import check_finite, check_norm, check_positive_int, check_same_shape
from ._empty import NaNWhenEmpty, no_samples
from ._plot import check_plottable, draw_curve, start_plot, synced
from ._running import PerSampleMean, add_sums


def _check_gaussian(mean: Tensor, var: Tensor, target: Tensor) -> None:
    for t, name in ((mean, "mean"), (var, "var"), (target, "target")):
        check_finite(t, name)
        if not t.is_floating_point():
            raise ValueError(f"`{name}` must be floating point, got dtype {t.dtype}.")
    check_same_shape(mean, var, "mean", "var")
    check_same_shape(mean, target, "mean", "target")
    if var.numel() and not bool((var > 0).all()):
        raise ValueError("`var` must be strictly positive (a variance, not a standard deviation or log-variance).")


def normal_central_z(level: float | Tensor) -> Tensor:
    """``z`` such that ``mean +- z * std`` holds probability ``level`` under a normal."""
    level = torch.as_tensor(level, dtype=torch.float64)
    return math.sqrt(2.0) * torch.special.erfinv(level)


class GaussianNLL(PerSampleMean):
    r"""Mean Gaussian negative log-likelihood ``0.5 * (log(2 pi var) + (y - mean)^2 / var)`` per element.

    Equals ``torch.nn.functional.gaussian_nll_loss(mean, target, var, full=True)`` (without its eps clamp).
    Inputs: ``update(mean, var, target)``, three floating-point tensors of one shape, ``var > 0``.

    Args:
        **kwargs: torchmetrics ``Metric`` options (e.g. ``sync_on_compute``).

    Example:
        >>> import torch
        >>> m = GaussianNLL()
        >>> m.update(torch.zeros(1), torch.ones(1), torch.zeros(1))
        >>> round(float(m.compute()), 4)  # 0.5 * log(2 pi)
        0.9189
    """

    higher_is_better = False

    def update(self, mean: Tensor, var: Tensor, target: Tensor) -> None:
        _check_gaussian(mean, var, target)
        mean, var, target = mean.double(), var.double(), target.double()
        self._add(0.5 * (torch.log(2 * math.pi * var) + (target - mean) ** 2 / var))


class IntervalCoverage(PerSampleMean):
    r"""Fraction of targets inside the central ``level`` interval ``mean +- z * std`` (default 90%).

    Args:
        level: the interval's nominal probability, in (0, 1).
        **kwargs: options of ``torchmetrics.Metric``.

    Example:
        >>> import torch
        >>> m = IntervalCoverage(level=0.9)
        >>> m.update(torch.zeros(2), torch.ones(2), torch.tensor([1.0, 2.0]))  # z90 = 1.645
        >>> float(m.compute())
        0.5
    """

    higher_is_better = None

    def __init__(self, level: float = 0.9, **kwargs: Any) -> None:
        if not 0.0 < level < 1.0:
            raise ValueError(f"`level` must be in (0, 1), e.g. 0.9; got {level}.")
        super().__init__(**kwargs)
        self.level = level
        self.z = float(normal_central_z(level))

    def plot(self, val: Tensor | None = None, ax: Any = None) -> tuple[Any, Any]:
        """The observed coverage at the nominal ``level``, one point on the coverage calibration diagram.

        ``(fig, ax)``; the first line of ``ax`` is the point ``(level, coverage)``, the dashed line perfect
        calibration. To see the whole curve, use :class:`QuantileCalibrationError`'s ``plot()``.
        ``val`` (default: ``compute()``) is the coverage drawn. Needs matplotlib.
        """
        with synced(self):
            count = float(self.count)
        check_plottable(self, count > 0)
        coverage, fig, ax = start_plot(self, val, ax)
        draw_curve(
            ax,
            [self.level],
            [coverage],
            f"coverage of the {100 * self.level:g}% interval = {100 * coverage:.1f}%",
            "expected coverage (nominal level)",
            "observed coverage",
            "central interval",
            marker="o",
        )
        return fig, ax

    def update(self, mean: Tensor, var: Tensor, target: Tensor) -> None:
        _check_gaussian(mean, var, target)
        half = self.z * var.double().sqrt()
        self._add((target.double() - mean.double()).abs() <= half)


class QuantileCalibrationError(NaNWhenEmpty, Metric):
    r"""Gap between nominal and observed coverage of central intervals, over ``num_levels`` levels
    ``linspace(0.05, 0.95, num_levels)`` (torch-uncertainty's ``QuantileCalibrationError`` definition):
    ``QCE = mean_k |coverage(level_k) - level_k|`` (``"l2"``: root mean square, ``"max"``: largest gap).

    Keeps one counter per level (constant memory). Inputs as for :class:`GaussianNLL`.

    Args:
        num_levels: the number of nominal levels, evenly spaced from 0.05 to 0.95.
        norm: ``"l1"`` (mean gap), ``"l2"`` (root mean square gap) or ``"max"`` (largest gap).
        **kwargs: passed to ``torchmetrics.Metric`` (e.g. ``sync_on_compute``).

    Example:
        >>> import torch
        >>> m = QuantileCalibrationError(num_levels=3)  # levels 0.05, 0.5, 0.95
        >>> m.update(torch.zeros(2), torch.ones(2), torch.tensor([0.0, 5.0]))  # coverage 0.5 at every level
        >>> round(float(m.compute()), 4)  # (0.45 + 0 + 0.45) / 3
        0.3
    """

    is_differentiable = False
    higher_is_better = False
    full_state_update = False

    levels: Tensor
    covered: Tensor
    count: Tensor

    def __init__(self, num_levels: int = 15, norm: Literal["l1", "l2", "max"] = "l1", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        check_positive_int(num_levels, "num_levels")
        check_norm(norm)
        self.norm = norm
        self.register_buffer("levels", torch.linspace(0.05, 0.95, num_levels, dtype=torch.float64), persistent=False)
        add_sums(self, "covered", shape=(num_levels,))
        add_sums(self, "count")

    def update(self, mean: Tensor, var: Tensor, target: Tensor) -> None:
        _check_gaussian(mean, var, target)
        # |y - mean| / std <= z(level) for each level, i.e. the target lies in that central interval.
        zscore = ((target.double() - mean.double()).abs() / var.double().sqrt()).reshape(-1, 1)
        z = normal_central_z(self.levels.double()).to(zscore.device)
        self.covered += (zscore <= z).double().sum(0)
        self.count += target.numel()

    def curve(self) -> tuple[Tensor, Tensor]:
        """``(levels, observed coverage)``: the calibration curve (local state; :meth:`plot` syncs first)."""
        return self.levels.to(self.covered.device), self.covered / self.count.clamp_min(1)

    def plot(self, val: Tensor | None = None, ax: Any = None) -> tuple[Any, Any]:
        """Coverage calibration curve: expected (nominal) against observed coverage of the central intervals.

        ``(fig, ax)``; the first line of ``ax`` holds :meth:`curve`, the dashed line perfect calibration
        (above it: intervals too wide, below: too narrow). The title holds ``val`` (default:
        ``compute()``). Counters are summed over processes first. Needs matplotlib.
        """
        with synced(self):
            count = float(self.count)
            levels, observed = (t.detach().clone() for t in self.curve())
        check_plottable(self, count > 0)
        value, fig, ax = start_plot(self, val, ax)
        draw_curve(
            ax,
            levels,
            observed,
            f"quantile calibration error = {value:.4f}",
            "expected coverage (nominal level)",
            "observed coverage",
            "central intervals",
        )
        return fig, ax

    def compute(self) -> Tensor:
        if not bool(self.count > 0):
            return no_samples(self, self.count.device)
        gap = (self.covered / self.count - self.levels.to(self.covered.device)).abs()
        if self.norm == "l1":
            return gap.mean().float()
        if self.norm == "l2":
            return gap.pow(2).mean().sqrt().float()
        return gap.max().float()
