"""Out-of-distribution detection from any score: AUROC, AUPR and FPR at 95% TPR, OOD as the positive class.

Every metric takes ``update(scores, is_ood)``: ``scores`` ``(B,)`` where **higher means more likely OOD**
(e.g. predictive entropy, mutual information, or ``-max_prob``), ``is_ood`` ``(B,)`` bool or 0/1.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric

from ._checks import check_finite
from ._empty import NaNWhenEmpty, cat_state, no_samples


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

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("scores", [], dist_reduce_fx="cat")
        self.add_state("labels", [], dist_reduce_fx="cat")

    def update(self, scores: Tensor, is_ood: Tensor) -> None:
        self.labels.append(_check_ood(scores, is_ood))
        self.scores.append(scores.double())

    def _curve(self) -> tuple[Tensor, Tensor, int, int] | Tensor:
        """Cumulative true/false positives at each distinct threshold, from the highest score down.

        Without samples: NaN after a :class:`NoSamplesWarning`; with only one kind of sample: NaN.
        """
        scores = cat_state(self.scores)
        labels = cat_state(self.labels, torch.long).bool()
        if scores.numel() == 0:
            return no_samples(self, self.device)
        n_pos, n_neg = int(labels.sum()), int((~labels).sum())
        if n_pos == 0 or n_neg == 0:
            return torch.tensor(float("nan"), device=self.device)
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

    Example:
        >>> import torch
        >>> m = OODAUROC()
        >>> m.update(torch.tensor([0.1, 0.4, 0.35, 0.8]), torch.tensor([0, 0, 1, 1]))
        >>> float(m.compute())
        0.75
    """

    higher_is_better = True

    def compute(self) -> Tensor:
        curve = self._curve()
        if isinstance(curve, Tensor):
            return curve
        tp, fp, n_pos, n_neg = curve
        tpr = torch.cat([tp.new_zeros(1), tp / n_pos])
        fpr = torch.cat([fp.new_zeros(1), fp / n_neg])
        return torch.trapezoid(tpr, fpr).float()


class OODAUPR(_StoredScores):
    """Area under the precision-recall curve (average precision) with OOD as the positive class.

    ``AP = sum_k (R_k - R_{k-1}) P_k`` over distinct thresholds, equal to scikit-learn's
    ``average_precision_score``.

    Example:
        >>> import torch
        >>> m = OODAUPR()
        >>> m.update(torch.tensor([0.1, 0.4, 0.35, 0.8]), torch.tensor([0, 0, 1, 1]))
        >>> round(float(m.compute()), 4)
        0.8333
    """

    higher_is_better = True

    def compute(self) -> Tensor:
        curve = self._curve()
        if isinstance(curve, Tensor):
            return curve
        tp, fp, n_pos, _ = curve
        recall = tp / n_pos
        precision = tp / (tp + fp)
        step = torch.diff(torch.cat([recall.new_zeros(1), recall]))
        return (step * precision).sum().float()


class FPR95(_StoredScores):
    r"""False-positive rate (in-distribution samples flagged as OOD) at the first threshold whose
    true-positive rate (OOD samples caught) reaches ``recall`` (default 95%).

    Thresholds are only placed between distinct scores (a tie is never split), as in
    torch-uncertainty's ``FPR95(pos_label=1)``; returns ``nan`` without both kinds of sample.

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

    def compute(self) -> Tensor:
        curve = self._curve()
        if isinstance(curve, Tensor):
            return curve
        tp, fp, n_pos, n_neg = curve
        first = torch.nonzero(tp >= self.recall * n_pos - 1e-9).flatten()[0]
        return (fp[first] / n_neg).float()
