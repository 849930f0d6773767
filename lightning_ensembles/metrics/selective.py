"""Selective prediction: area under the risk-coverage curve and coverage at a given risk.

A selective classifier accepts the predictions whose confidence reaches a threshold. Samples with
the same confidence are accepted or rejected together, so the operating points are the distinct
confidences (one point per tied group, as ROC curves place theirs): both metrics are computed on
those points only and give one value for every order of the same predictions.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric

from .._checks import as_float, check_probs_targets
from ._empty import NaNWhenEmpty, cat_state, no_samples
from ._plot import check_plottable, draw_steps, start_plot, synced


class _RiskCoverage(NaNWhenEmpty, Metric):
    """Stores the top-label confidence and error of every sample (sorting needs them all)."""

    is_differentiable = False
    full_state_update = False

    confidences: list[Tensor]
    errors: list[Tensor]

    def __init__(self, num_classes: int | None = None, validate_args: bool = True, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.num_classes = num_classes
        self.validate_args = validate_args
        self.add_state("confidences", [], dist_reduce_fx="cat")
        self.add_state("errors", [], dist_reduce_fx="cat")

    def update(self, probs: Tensor, target: Tensor) -> None:
        if self.validate_args:
            check_probs_targets(probs, target, self.num_classes)
        conf, pred = as_float(probs).max(-1)
        self.confidences.append(conf.double())
        self.errors.append((pred != target).double())

    def _points(self) -> tuple[Tensor, Tensor, int]:
        """Accepted-sample counts and error counts at each operating point (most confident first), and N."""
        conf = cat_state(self.confidences)
        err = cat_state(self.errors).to(conf.device)
        n = conf.numel()
        if n == 0:
            return conf, conf, 0
        conf, order = torch.sort(conf, descending=True)
        # Last index of each tied group: the only places a threshold can cut. Errors are 0/1, so the
        # float64 cumulative sums are exact integers whatever the order inside a group.
        last = torch.cat([torch.nonzero(conf[1:] != conf[:-1]).flatten(), torch.tensor([n - 1], device=conf.device)])
        return (last + 1).double(), err[order].cumsum(0)[last], n

    def curve(self) -> tuple[Tensor, Tensor]:
        """The operating points, most confident first: ``(coverage, risk)``, one per distinct confidence.

        Threshold ``t`` accepts every sample with confidence ``>= t``; ``coverage`` is the accepted
        fraction, ``risk`` its error rate (float64). Empty tensors when there are no samples.
        """
        accepted, errors, n = self._points()
        return accepted / max(n, 1), errors / accepted

    def plot(self, val: Tensor | None = None, ax: Any = None) -> tuple[Any, Any]:
        """Risk-coverage curve of the stored predictions: ``(fig, ax)`` (torchmetrics' ``Metric.plot`` contract).

        The first line of ``ax`` holds :meth:`curve` as steps through ``(0, risk_1), (cov_1, risk_1), ...``:
        the area under the steps is the AURC. ``CoverageAtRisk`` adds the risk limit and marks the
        chosen coverage. The title holds ``val`` (default ``compute()``). Predictions are gathered over
        processes first. Needs matplotlib.
        """
        with synced(self):
            coverage, risk = (t.clone() for t in self.curve())
        check_plottable(self, coverage.numel() > 0)
        value, fig, ax = start_plot(self, val, ax)
        draw_steps(
            ax,
            coverage,
            risk,
            self._plot_title(value),
            "coverage (fraction accepted, most confident first)",
            "selective risk (error rate of the accepted)",
            "risk-coverage",
        )
        ax.set_ylim(0, max(1e-3, float(risk.max())) * 1.05)
        self._plot_extra(ax, coverage, risk)
        ax.legend(loc="upper left")
        return fig, ax

    def _plot_title(self, value: float) -> str:
        return f"AURC = {value:.4f}"

    def _plot_extra(self, ax: Any, coverage: Tensor, risk: Tensor) -> None:
        """Nothing more for AURC; CoverageAtRisk draws its limit."""

    def risks(self) -> Tensor:
        """Per sample, in order of decreasing confidence: the risk of the operating point that accepts it.

        ``risk[k-1]`` is the error rate of the ``k`` most confident samples when no tie straddles ``k``;
        ``AURC = risks().mean()``.
        """
        accepted, errors, _ = self._points()
        sizes = torch.diff(torch.cat([accepted.new_zeros(1), accepted])).long()
        return (errors / accepted).repeat_interleave(sizes)


class AURC(_RiskCoverage):
    r"""Area under the risk-coverage curve: ``mean_k risk(k)``, ``risk(k)`` = error rate of the ``k``
    most confident predictions (Geifman et al., 2019). Lower is better.

    Tied confidences form one operating point: ``AURC = sum_g (cov_g - cov_{g-1}) * risk_g`` over the
    distinct confidences from high to low (``cov_g``, ``risk_g``: coverage and error rate of the samples
    at least as confident as group ``g``), the same area without ties. It does not depend on the order
    of the samples (the old per-sample sort let tied samples count in input order).

    torch-uncertainty's ``AURC`` integrates the same curve with the trapezoid rule and divides by
    ``1 - 1/N``: ``AURC_tu = (N * AURC - (risk(1) + risk(N)) / 2) / (N - 1)``; the two agree as N grows
    (on confidences without ties; torch-uncertainty's value depends on the order of tied samples).

    Stores two floats per sample. Inputs: ``probs`` ``(B, C)`` probabilities, ``target`` ``(B,)`` class indices.

    Args:
        num_classes: C, checked against the last axis of ``probs`` when given (default: any).
        validate_args: check that ``probs`` are probabilities and ``target`` class indices; ``False`` skips it.
        **kwargs: passed to ``torchmetrics.Metric`` (e.g. ``sync_on_compute``).

    Example:
        >>> import torch
        >>> m = AURC()
        >>> m.update(torch.tensor([[.7, .3], [.6, .4], [.8, .2]]), torch.tensor([0, 1, 0]))
        >>> round(float(m.compute()), 4)
        0.1111
    """

    higher_is_better = False

    def compute(self) -> Tensor:
        accepted, errors, n = self._points()
        if n == 0:
            return no_samples(self, self.device)
        # Each group adds (its size / N) * (error rate after accepting it): a right-endpoint area.
        steps = torch.diff(torch.cat([accepted.new_zeros(1), accepted]))
        return ((steps * errors / accepted).sum() / n).float()


class CoverageAtRisk(_RiskCoverage):
    r"""Largest coverage ``k / N`` whose selective risk ``risk(k)`` is at most ``risk``; ``nan`` if none.

    Only operating points count: a tied group is accepted whole, so ``k`` ends a group of equal
    confidences. Without ties this is torch-uncertainty's ``CovAtxRisk(risk_threshold=risk)``.

    Args:
        risk: the largest accepted selective risk (error rate), in [0, 1].
        num_classes: the number of classes C, or ``None`` to take it from each batch.
        validate_args: ``False`` skips the input checks of ``update``.
        **kwargs: torchmetrics ``Metric`` options.

    Example:
        >>> import torch
        >>> m = CoverageAtRisk(risk=0.4)
        >>> m.update(torch.tensor([[.7, .3], [.6, .4], [.8, .2]]), torch.tensor([0, 1, 0]))
        >>> round(float(m.compute()), 4)
        1.0
    """

    higher_is_better = True

    def __init__(
        self, risk: float = 0.05, num_classes: int | None = None, validate_args: bool = True, **kwargs: Any
    ) -> None:
        if not 0.0 <= risk <= 1.0:
            raise ValueError(f"`risk` must be in [0, 1], got {risk}.")
        super().__init__(num_classes, validate_args, **kwargs)
        self.risk = risk

    def _plot_title(self, value: float) -> str:
        return f"coverage at risk <= {self.risk:g}: {100 * value:.2f}%"

    def _plot_extra(self, ax: Any, coverage: Tensor, risk: Tensor) -> None:
        ax.axhline(self.risk, ls="--", color="gray", label=f"risk limit {self.risk:g}")
        ok = torch.nonzero(risk <= self.risk).flatten()
        if ok.numel():  # the largest coverage within the limit (none: nothing to mark, the value is NaN)
            ax.plot([float(coverage[ok[-1]])], [float(risk[ok[-1]])], "o", color="tab:red", ms=7, label="chosen")

    def compute(self) -> Tensor:
        coverage, risk = self.curve()
        if risk.numel() == 0:
            return no_samples(self, self.device)
        ok = torch.nonzero(risk <= self.risk).flatten()
        if ok.numel() == 0:
            return torch.tensor(float("nan"), device=self.device)
        return coverage[ok[-1]].float()
