"""Figures of the metrics' stored state: reliability diagrams, coverage calibration curves, ROC / PR curves.

Shared by the metrics' ``plot()`` (torchmetrics' ``Metric.plot(val=None, ax=None) -> (fig, ax)``) and
the :class:`~lightning_ensembles.callbacks.ReliabilityDiagram` callback. Built on
``matplotlib.figure.Figure`` directly (no pyplot, no global backend change); matplotlib is the
optional ``plots`` extra.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .._optional import require


def _figure_class(feature: str) -> Any:
    return require("matplotlib.figure", "plots", feature).Figure


def new_axes(ax: Any, feature: str, figsize: tuple[float, float] = (5.0, 5.0), dpi: int = 100) -> tuple[Any, Any]:
    """``(fig, ax)``: the given Axes and its figure, or a new one-Axes ``Figure``."""
    if ax is not None:
        return ax.figure, ax
    fig = _figure_class(feature)(figsize=figsize, dpi=dpi)
    return fig, fig.subplots()


def check_plottable(metric: Any, has_samples: bool) -> None:
    """Refuse to draw a metric that no sample reached (an empty figure would look like a result)."""
    if not has_samples:
        raise ValueError(
            f"{type(metric).__name__}.plot(): no samples were passed to update(), so there is nothing to draw; "
            "call update() with predictions and targets first."
        )


@contextlib.contextmanager
def synced(metric: Any) -> Iterator[None]:
    """The metric's state summed / gathered over every process inside the block (a no-op in one process)."""
    with metric.sync_context(should_sync=not metric._is_synced, should_unsync=not metric._is_synced):
        yield


def scalar(val: Tensor | float) -> float:
    """The number for a title: a scalar, or the mean of a per-class / per-label result."""
    if isinstance(val, Tensor):
        return float(val.float().mean()) if val.numel() > 1 else float(val)
    return float(val)


def _numpy(values: Tensor | np.ndarray | Sequence[float]) -> np.ndarray:
    """``values`` as a float64 numpy array (tensors moved to the CPU first)."""
    if isinstance(values, Tensor):
        return values.detach().double().cpu().numpy()
    return np.asarray(values, dtype=np.float64)


def plot_value(metric: Any, val: Tensor | float | None) -> float:
    """The number in a ``plot()`` title: ``val``, by default ``metric.compute()`` (see :func:`scalar`)."""
    return scalar(metric.compute() if val is None else val)


def start_plot(metric: Any, val: Tensor | float | None, ax: Any) -> tuple[float, Any, Any]:
    """``(value, fig, ax)`` of ``metric.plot(val, ax)``: :func:`plot_value` and :func:`new_axes`."""
    value = plot_value(metric, val)
    fig, ax = new_axes(ax, f"{type(metric).__name__}.plot()")
    return value, fig, ax


def fold_top_bin(count: Tensor, confidence: Tensor, accuracy: Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``n_bins`` bins for drawing from the ``n_bins + 1`` of the binned metrics.

    The extra last bin (confidences of exactly 1) is merged into the top bin with count-weighted means.
    """
    n, conf, acc = (_numpy(t).copy() for t in (count, confidence, accuracy))
    top = n[-2] + n[-1]
    if top > 0:
        conf[-2] = (conf[-2] * n[-2] + conf[-1] * n[-1]) / top
        acc[-2] = (acc[-2] * n[-2] + acc[-1] * n[-1]) / top
    n, conf, acc = n[:-1], conf[:-1], acc[:-1]
    n[-1] = top
    return n, conf, acc


def draw_reliability(
    ax: Any,
    count: Tensor,
    confidence: Tensor,
    accuracy: Tensor,
    title: str = "",
    xlabel: str = "confidence (top-label probability)",
    ylabel: str = "accuracy",
) -> None:
    """Accuracy bars per equal-width bin (empty bins left out), the gap to the mean confidence, the diagonal.

    ``count``, ``confidence``, ``accuracy``: per-bin values with ``n_bins + 1`` entries, as
    :meth:`ExpectedCalibrationError.bins` returns them. The first bar container of ``ax`` holds the
    accuracies, the second the gaps.
    """
    count_, conf, acc = fold_top_bin(count, confidence, accuracy)
    n_bins = len(count_)
    width = 1.0 / n_bins
    centers = (np.arange(n_bins) + 0.5) * width
    seen = count_ > 0
    ax.bar(centers[seen], acc[seen], width=width, edgecolor="black", color="tab:blue", label=ylabel)
    ax.bar(
        centers[seen],
        np.abs(acc - conf)[seen],
        bottom=np.minimum(acc, conf)[seen],
        width=width,
        edgecolor="tab:red",
        color="tab:red",
        alpha=0.35,
        hatch="//",
        label="gap to confidence",
    )
    ax.plot([0, 1], [0, 1], "--", color="gray", label="perfect calibration")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.legend(loc="upper left")


def reliability_figure(
    count: Tensor,
    confidence: Tensor,
    accuracy: Tensor,
    title: str = "",
    figsize: tuple[float, float] = (6.0, 7.0),
    dpi: int = 100,
    xlabel: str = "confidence (top-label probability)",
    ylabel: str = "accuracy",
    feature: str = "a reliability diagram",
) -> tuple[Any, Any]:
    """``(fig, ax)``: :func:`draw_reliability` on ``ax`` above a histogram of the samples per bin."""
    fig = _figure_class(feature)(figsize=figsize, dpi=dpi)
    ax, hist = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    draw_reliability(ax, count, confidence, accuracy, title, xlabel, ylabel)
    ax.set_xlabel("")
    count_, _, _ = fold_top_bin(count, confidence, accuracy)
    n_bins = len(count_)
    hist.bar(
        (np.arange(n_bins) + 0.5) / n_bins,
        count_ / max(count_.sum(), 1),
        width=1.0 / n_bins,
        edgecolor="black",
        color="tab:gray",
    )
    hist.set_xlabel(xlabel)
    hist.set_ylabel("fraction of samples")
    fig.tight_layout()
    return fig, ax


def draw_curve(
    ax: Any,
    x: Tensor | np.ndarray | Sequence[float],
    y: Tensor | np.ndarray | Sequence[float],
    title: str,
    xlabel: str,
    ylabel: str,
    label: str,
    diagonal: str | None = "perfect calibration",
    marker: str = "o",
    drawstyle: str = "default",
) -> None:
    """One line of points ``(x, y)`` (the first line of ``ax``) in the unit square, optionally with the diagonal."""
    ax.plot(_numpy(x), _numpy(y), marker=marker, ms=4, color="tab:blue", label=label, drawstyle=drawstyle)
    if diagonal:
        ax.plot([0, 1], [0, 1], "--", color="gray", label=diagonal)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(loc="lower right")


def draw_steps(ax: Any, x: Tensor, y: Tensor, title: str, xlabel: str, ylabel: str, label: str) -> None:
    """:func:`draw_curve` of the steps through ``(0, y_1), (x_1, y_1), ..., (x_K, y_K)``, without a diagonal.

    For curves whose area is a right-endpoint sum: risk-coverage (AURC) and precision-recall (average precision).
    """
    x = torch.cat([x.new_zeros(1), x])
    y = torch.cat([y[:1], y])
    draw_curve(ax, x, y, title, xlabel, ylabel, label, diagonal=None, marker="", drawstyle="steps-pre")


def plot_bins(
    metric: Any,
    val: Tensor | float | None,
    ax: Any,
    bins: tuple[Tensor, Tensor, Tensor],
    name: str,
    xlabel: str,
    ylabel: str,
) -> tuple[Any, Any]:
    """``plot()`` of a binned calibration metric from its synced ``(count, mean confidence, accuracy)`` bins.

    Without ``ax``: :func:`reliability_figure` (diagram and histogram); with ``ax``: :func:`draw_reliability`.
    The title is ``name = val`` in percent, ``val`` defaulting to ``metric.compute()``.
    """
    count, conf, acc = bins
    check_plottable(metric, bool(count.sum() > 0))
    value = plot_value(metric, val)
    title = f"{name} = {100 * value:.2f}%"
    if ax is None:
        return reliability_figure(
            count, conf, acc, title, xlabel=xlabel, ylabel=ylabel, feature=f"{type(metric).__name__}.plot()"
        )
    draw_reliability(ax, count, conf, acc, title, xlabel, ylabel)
    return ax.figure, ax
