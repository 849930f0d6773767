"""Out-of-distribution detection from any score: AUROC, AUPR and FPR at 95% TPR, OOD as the positive class.

Every metric takes ``update(scores, is_ood)``: ``scores`` ``(B,)`` where **higher means more likely OOD**
(e.g. predictive entropy, mutual information, or ``-max_prob``), ``is_ood`` ``(B,)`` bool or 0/1.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric

from .._checks import check_finite
from ._empty import NaNWhenEmpty, cat_state, no_samples
from ._plot import check_plottable, draw_curve, draw_steps, new_axes, plot_value, start_plot, synced


def _check_ood(scores: Tensor, is_ood: Tensor) -> Tensor:
    check_finite(scores, "scores")
    if not isinstance(is_ood, Tensor):
        raise ValueError(f"`is_ood` must be a tensor of 0/1 or bool labels, got {type(is_ood).__name__}.")
    if scores.dim() != 1 or is_ood.shape != scores.shape:
        raise ValueError(
            f"`scores` and `is_ood` must both have shape (B,); got {tuple(scores.shape)} and {tuple(is_ood.shape)}."
        )
    if not scores.is_floating_point():
        raise ValueError(f"`scores` must be floating point (higher = more OOD), got dtype {scores.dtype}.")
    if is_ood.is_floating_point() or (is_ood.numel() and not bool(((is_ood == 0) | (is_ood == 1)).all())):
        raise ValueError("`is_ood` must hold 0/1 (or bool) labels, 1 = out-of-distribution.")
    return is_ood.long()


class _StoredScores(NaNWhenEmpty, Metric):
    """Keeps every ``(score, is_ood)`` pair; exact ranking metrics need them all."""

    is_differentiable = False
    full_state_update = False

    scores: list[Tensor]
    labels: list[Tensor]

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("scores", [], dist_reduce_fx="cat")
        self.add_state("labels", [], dist_reduce_fx="cat")

    def update(self, scores: Tensor, is_ood: Tensor) -> None:
        self.labels.append(_check_ood(scores, is_ood))
        self.scores.append(scores.double())

    def compute(self) -> Tensor:
        """The metric of the stored scores; without samples NaN after a :class:`NoSamplesWarning`, with
        only one kind of sample NaN."""
        scores = cat_state(self.scores)
        labels = cat_state(self.labels, torch.long).bool()
        if scores.numel() == 0:
            return no_samples(self, self.device)
        n_pos = int(labels.sum())
        if n_pos in (0, labels.numel()):
            return torch.tensor(float("nan"), device=self.device)
        return self._from_ranks(*_ranked(scores, labels)).float()

    def _from_ranks(self, tp: Tensor, fp: Tensor, n_pos: int, n_neg: int) -> Tensor:
        """The metric from the cumulative true / false positives of :func:`_ranked` (samples of both kinds)."""
        raise NotImplementedError

    def roc(self) -> tuple[Tensor, Tensor]:
        """``(fpr, tpr)`` of the ROC curve from ``(0, 0)`` through every distinct threshold (highest score first).

        Reads the processes' gathered scores; needs samples of both kinds.
        """
        return _roc(*self._plot_curve())

    def _plot_curve(self) -> tuple[Tensor, Tensor, int, int]:
        with synced(self):
            scores = cat_state(self.scores).clone()
            labels = cat_state(self.labels, torch.long).bool().clone()
        check_plottable(self, scores.numel() > 0)
        n_pos = int(labels.sum())
        if n_pos in (0, labels.numel()):
            raise ValueError(
                f"{type(self).__name__}: a curve needs both OOD (is_ood=1) and in-distribution (is_ood=0) samples; "
                f"got {n_pos} OOD of {labels.numel()}. Update with samples of both kinds."
            )
        return _ranked(scores, labels)

    def _draw_roc(self, ax: Any, fpr: Tensor, tpr: Tensor, title: str) -> tuple[Any, Any]:
        fig, ax = new_axes(ax, f"{type(self).__name__}.plot()")
        draw_curve(
            ax,
            fpr,
            tpr,
            title,
            "false-positive rate (in-distribution flagged)",
            "true-positive rate (OOD caught)",
            "ROC",
            diagonal="chance",
            marker="",
        )
        return fig, ax


def _roc(tp: Tensor, fp: Tensor, n_pos: int, n_neg: int) -> tuple[Tensor, Tensor]:
    """``(fpr, tpr)`` from ``(0, 0)`` through the cumulative counts of :func:`_ranked`."""
    return torch.cat([fp.new_zeros(1), fp / n_neg]), torch.cat([tp.new_zeros(1), tp / n_pos])


def _pr(tp: Tensor, fp: Tensor, n_pos: int) -> tuple[Tensor, Tensor]:
    """``(recall, precision)`` at each threshold from the cumulative counts of :func:`_ranked`."""
    return tp / n_pos, tp / (tp + fp)


def _ranked(scores: Tensor, labels: Tensor) -> tuple[Tensor, Tensor, int, int]:
    """Cumulative true/false positives at each distinct threshold of samples of both kinds."""
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    s, order = scores.sort(descending=True)
    pos = labels[order]
    # Index of the last sample of each group of tied scores: the only valid cut points.
    last = torch.cat([torch.nonzero(s[1:] != s[:-1]).flatten(), torch.tensor([s.numel() - 1], device=s.device)])
    tp = pos.double().cumsum(0)[last]
    fp = (last + 1).double() - tp
    return tp, fp, n_pos, n_neg


# The ranking metrics are written here rather than wrapping torchmetrics' BinaryAUROC /
# BinaryAveragePrecision: those apply a float32 sigmoid to scores outside [0, 1], which merges
# nearby scores (e.g. entropies of 1e-8 and 1e-7) into ties and changes the result (0.914 instead
# of 0.964 AUROC for predictive entropy on digits).
class OODAUROC(_StoredScores):
    """Area under the ROC curve for telling OOD (positive) from in-distribution samples by ``scores``.

    Exact and tie-aware (trapezoid over distinct thresholds), equal to scikit-learn's ``roc_auc_score``.
    Stores every ``(score, is_ood)`` pair; NaN without samples of both kinds.

    Args:
        **kwargs: passed to ``torchmetrics.Metric`` (e.g. ``sync_on_compute``).

    Example:
        >>> import torch
        >>> m = OODAUROC()
        >>> m.update(torch.tensor([0.1, 0.4, 0.35, 0.8]), torch.tensor([0, 0, 1, 1]))
        >>> float(m.compute())
        0.75
    """

    higher_is_better = True

    def _from_ranks(self, tp: Tensor, fp: Tensor, n_pos: int, n_neg: int) -> Tensor:
        fpr, tpr = _roc(tp, fp, n_pos, n_neg)
        return torch.trapezoid(tpr, fpr)

    def plot(self, val: Tensor | None = None, ax: Any = None) -> tuple[Any, Any]:
        """ROC curve from the stored scores: ``(fig, ax)``, the first line of ``ax`` is :meth:`roc`.

        Its trapezoid area is the AUROC, shown in the title (``val``, default ``compute()``).
        Scores are gathered over processes first. Needs matplotlib.
        """
        fpr, tpr = self.roc()  # raises before compute() can warn on an empty metric
        value = plot_value(self, val)
        return self._draw_roc(ax, fpr, tpr, f"OOD AUROC = {100 * value:.2f}%")


class OODAUPR(_StoredScores):
    """Area under the precision-recall curve (average precision) with OOD as the positive class.

    ``AP = sum_k (R_k - R_{k-1}) P_k`` over distinct thresholds, equal to scikit-learn's
    ``average_precision_score``.

    Args:
        **kwargs: torchmetrics ``Metric`` options.

    Example:
        >>> import torch
        >>> m = OODAUPR()
        >>> m.update(torch.tensor([0.1, 0.4, 0.35, 0.8]), torch.tensor([0, 0, 1, 1]))
        >>> round(float(m.compute()), 4)
        0.8333
    """

    higher_is_better = True

    def _from_ranks(self, tp: Tensor, fp: Tensor, n_pos: int, n_neg: int) -> Tensor:
        recall, precision = _pr(tp, fp, n_pos)
        step = torch.diff(torch.cat([recall.new_zeros(1), recall]))
        return (step * precision).sum()

    def pr_curve(self) -> tuple[Tensor, Tensor]:
        """``(recall, precision)`` at every distinct threshold (highest score first), gathered over processes."""
        tp, fp, n_pos, _ = self._plot_curve()
        return _pr(tp, fp, n_pos)

    def plot(self, val: Tensor | None = None, ax: Any = None) -> tuple[Any, Any]:
        """Precision-recall curve from the stored scores: ``(fig, ax)``.

        The first line of ``ax`` is drawn as steps through ``(0, P_1), (R_1, P_1), ..., (R_K, P_K)``
        (:meth:`pr_curve`), whose area is exactly the average precision shown in the title (``val``,
        default ``compute()``); the dashed line is the fraction of OOD samples (chance). Needs matplotlib.
        """
        recall, precision = self.pr_curve()
        value, fig, ax = start_plot(self, val, ax)
        draw_steps(
            ax,
            recall,
            precision,
            f"OOD AUPR = {100 * value:.2f}%",
            "recall (OOD caught)",
            "precision (flagged that are OOD)",
            "precision-recall",
        )
        with synced(self):
            rate = float(cat_state(self.labels, torch.long).double().mean())
        ax.axhline(rate, ls="--", color="gray", label="chance")
        ax.legend(loc="lower left")
        return fig, ax


class FPR95(_StoredScores):
    r"""False-positive rate (in-distribution samples flagged as OOD) at the first threshold whose
    true-positive rate (OOD samples caught) reaches ``recall`` (default 95%).

    Thresholds are only placed between distinct scores (a tie is never split), as in
    torch-uncertainty's ``FPR95(pos_label=1)``; returns ``nan`` without both kinds of sample.

    Args:
        recall: the true-positive rate to reach, in (0, 1].
        **kwargs: options of ``torchmetrics.Metric``.

    Example:
        >>> import torch
        >>> m = FPR95()
        >>> m.update(torch.tensor([.9, .8, .7, .6, .4, .2, .1]), torch.tensor([1, 0, 1, 0, 0, 1, 0]))
        >>> float(m.compute())
        0.75
    """

    higher_is_better = False

    def __init__(self, recall: float = 0.95, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if not 0.0 < recall <= 1.0:
            raise ValueError(f"`recall` must be in (0, 1], got {recall}.")
        self.recall = recall

    def _first(self, tp: Tensor, n_pos: int) -> Tensor:
        """Index of the first threshold whose true-positive rate reaches ``recall``."""
        return torch.nonzero(tp >= self.recall * n_pos - 1e-9).flatten()[0]

    def _from_ranks(self, tp: Tensor, fp: Tensor, n_pos: int, n_neg: int) -> Tensor:
        return fp[self._first(tp, n_pos)] / n_neg

    def plot(self, val: Tensor | None = None, ax: Any = None) -> tuple[Any, Any]:
        """ROC curve (the first line of ``ax``, ``roc()``) with the operating point marked: ``(fig, ax)``.

        The second line is the operating point ``(FPR, TPR)`` at the first threshold whose TPR reaches
        ``recall``; the title holds ``val`` (default ``compute()``, that point's FPR). Needs matplotlib.
        """
        tp, fp, n_pos, n_neg = self._plot_curve()  # raises before compute() can warn on an empty metric
        value = plot_value(self, val)
        fpr, tpr = _roc(tp, fp, n_pos, n_neg)
        fig, ax = self._draw_roc(ax, fpr, tpr, f"FPR at {100 * self.recall:g}% TPR = {100 * value:.2f}%")
        first = self._first(tp, n_pos)
        ax.plot(
            [float(fp[first] / n_neg)],
            [float(tp[first] / n_pos)],
            "o",
            color="tab:red",
            ms=7,
            label=f"first threshold with TPR >= {100 * self.recall:g}%",
        )
        ax.legend(loc="lower right")
        return fig, ax
