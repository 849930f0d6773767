"""Validation/test metric sets of the ensemble modules, assembled from :mod:`lightning_ensembles.metrics`.

Everything here is a torchmetrics ``Metric`` underneath, so values are synchronised across processes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import cast

import torch
from torch import Tensor, nn
from torchmetrics import MetricCollection

from .._checks import check_not_probs
from ..metrics import (
    FPR95,
    OODAUPR,
    OODAUROC,
    BrierScore,
    ClassificationMetrics,
    ExpectedCalibrationError,
    NegativeLogLikelihood,
)
from ..metrics._empty import no_samples, quiet_when_empty
from ..metrics.ood_scores import OOD_SCORES, ood_score

#: The remedy named when a module's outputs look like probabilities (its backbone ends in a softmax).
_LOGITS_FIX = (
    "make the backbone return logits (drop a final softmax): the ensemble modules take member logits, "
    "and the probs-taking set is ClassificationMetrics(num_classes, inputs='probs')"
)


class EnsembleClassificationMetrics(nn.Module):
    """:class:`~lightning_ensembles.metrics.ClassificationMetrics` plus each member's NLL, Brier and ECE.

    ``update(member_logits (M, B, C), target (B,))``; ``compute()`` returns a flat dict:
    ``acc, nll, brier, ece, disagreement, mutual_information`` of the ensemble and
    ``member_acc/<i>, member_nll/<i>, member_brier/<i>, member_ece/<i>`` for every member. Inputs
    that look like probabilities are refused (``ValueError``); without samples every value is NaN,
    with one :class:`~lightning_ensembles.metrics.NoSamplesWarning`.

    Args:
        num_classes: number of classes ``C``.
        num_members: number of members ``M``.
        n_bins: bins of the ECE.
    """

    def __init__(self, num_classes: int, num_members: int, n_bins: int = 15) -> None:
        super().__init__()
        self.ensemble = ClassificationMetrics(num_classes, n_bins=n_bins)
        self.members = nn.ModuleList(
            MetricCollection(
                {
                    "nll": NegativeLogLikelihood(num_classes, validate_args=False),
                    "brier": BrierScore(num_classes, validate_args=False),
                    "ece": ExpectedCalibrationError(num_classes, n_bins=n_bins, validate_args=False),
                },
                compute_groups=False,
            )
            for _ in range(num_members)
        )

    @property
    def _members(self) -> list[MetricCollection]:
        return [cast(MetricCollection, m) for m in self.members]

    def update(self, logits: Tensor, target: Tensor) -> None:
        logits = logits.detach()
        check_not_probs(logits, "member_logits", _LOGITS_FIX)
        self.ensemble.update(logits, target)  # validates shapes, classes and finiteness
        for probs, metrics in zip(logits.float().softmax(-1), self._members):
            metrics.update(probs, target)

    def compute(self) -> dict[str, Tensor]:
        with quiet_when_empty(ours=True):  # one warning for the whole set, below
            out = dict(self.ensemble.compute())
            for i, metrics in enumerate(self._members):
                out.update({f"member_{k}/{i}": v for k, v in metrics.compute().items()})
        if bool(torch.isnan(out["acc"])):  # accuracy is NaN only without samples
            no_samples(self)
        return out

    def reset(self) -> None:
        self.ensemble.reset()
        for metrics in self._members:
            metrics.reset()


class OODMetrics(nn.Module):
    """OOD AUROC / AUPR / FPR95 (OOD positive) for each selected OOD score of member logits.

    ``scores``: any of :data:`~lightning_ensembles.metrics.ood_scores.OOD_SCORES` (default all:
    ``msp``, ``entropy``, ``mi``, ``variation_ratio``, ``max_logit``, ``energy``; which use logits and
    which probabilities: :mod:`lightning_ensembles.metrics.ood_scores`).
    ``update(member_logits (M, B, C), is_ood)``; inputs that look like probabilities are refused.

    Args:
        scores: the OOD scores to evaluate (default all).
    """

    def __init__(self, scores: Sequence[str] | None = None) -> None:
        super().__init__()
        self.scores = tuple(OOD_SCORES if scores is None else scores)
        unknown = [s for s in self.scores if s not in OOD_SCORES]
        if unknown or not self.scores:
            raise ValueError(f"unknown OOD score(s) {unknown or list(self.scores)}; choose from {list(OOD_SCORES)}.")
        self.metrics = nn.ModuleDict(
            {s: MetricCollection({"auroc": OODAUROC(), "aupr": OODAUPR(), "fpr95": FPR95()}) for s in self.scores}
        )
        self._seen: set[bool] = set()

    def _collection(self, score: str) -> MetricCollection:
        return cast(MetricCollection, self.metrics[score])

    def _score(self, logits: Tensor) -> dict[str, Tensor]:
        # Higher score = more likely OOD (e.g. the maximum probability enters negated).
        z = logits.detach().float()
        return {name: ood_score(name, z) for name in self.scores}

    def update(self, logits: Tensor, is_ood: bool) -> None:
        check_not_probs(logits, "member_logits", _LOGITS_FIX)
        self._seen.add(bool(is_ood))
        for name, score in self._score(logits).items():
            self._collection(name).update(score, torch.full_like(score, int(is_ood), dtype=torch.long))

    def has_both(self) -> bool:
        return self._seen == {True, False}

    def compute(self) -> dict[str, Tensor]:
        with quiet_when_empty(ours=True):
            out = {f"ood_{k}_{name}": v for name in self.scores for k, v in self._collection(name).compute().items()}
        if not self._seen:
            no_samples(self)
        return out

    def reset(self) -> None:
        self._seen = set()
        for name in self.scores:
            self._collection(name).reset()
