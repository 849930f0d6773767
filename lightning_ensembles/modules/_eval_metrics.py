"""Validation/test metric sets of the ensemble modules, built from torchmetrics (distributed-safe)."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torchmetrics import MeanMetric
from torchmetrics.classification import BinaryAUROC, BinaryAveragePrecision, MulticlassAccuracy, MulticlassCalibrationError


def _entropy(p: Tensor) -> Tensor:
    return -(p * p.clamp_min(1e-12).log()).sum(-1)


class _ProbMetrics(nn.Module):
    """Accuracy, NLL, Brier and ECE of one predictive distribution."""

    def __init__(self, num_classes: int, bins: int) -> None:
        super().__init__()
        self.acc = MulticlassAccuracy(num_classes, average="micro")
        self.ece = MulticlassCalibrationError(num_classes, n_bins=bins, norm="l1")
        self.nll = MeanMetric()
        self.brier = MeanMetric()

    def update(self, probs: Tensor, target: Tensor) -> None:
        self.acc.update(probs, target)
        self.ece.update(probs, target)
        self.nll.update(-probs.gather(-1, target[:, None]).squeeze(-1).clamp_min(1e-12).log())
        onehot = torch.nn.functional.one_hot(target, probs.shape[-1]).to(probs.dtype)
        self.brier.update(((probs - onehot) ** 2).sum(-1))

    def compute(self) -> dict[str, Tensor]:
        return {"acc": self.acc.compute(), "nll": self.nll.compute(), "brier": self.brier.compute(), "ece": self.ece.compute()}

    def reset(self) -> None:
        for m in (self.acc, self.ece, self.nll, self.brier):
            m.reset()


class EnsembleClassificationMetrics(nn.Module):
    """Ensemble and per-member accuracy/NLL/Brier/ECE, pairwise disagreement and mutual information.

    ``update(member_logits (M, B, C), target (B,))``; ``compute()`` returns a flat dict:
    ``acc, nll, brier, ece, disagreement, mutual_information, member_acc/<i>, member_nll/<i>, ...``.
    """

    def __init__(self, num_classes: int, num_members: int, bins: int = 15) -> None:
        super().__init__()
        self.ensemble = _ProbMetrics(num_classes, bins)
        self.members = nn.ModuleList(_ProbMetrics(num_classes, bins) for _ in range(num_members))
        self.disagreement = MeanMetric()
        self.mutual_information = MeanMetric()

    def update(self, logits: Tensor, target: Tensor) -> None:
        logits = logits.detach().float()
        member_probs = logits.softmax(-1)
        probs = member_probs.mean(0)
        self.ensemble.update(probs, target)
        for m, metric in zip(member_probs, self.members):
            metric.update(m, target)
        pred = member_probs.argmax(-1)  # (M, B)
        n = pred.shape[0]
        if n > 1:
            differ = (pred[:, None, :] != pred[None, :, :]).float().sum((0, 1)) / (n * (n - 1))
            self.disagreement.update(differ)
        self.mutual_information.update(_entropy(probs) - _entropy(member_probs).mean(0))

    def compute(self) -> dict[str, Tensor]:
        out = self.ensemble.compute()
        if self.disagreement.update_count:
            out["disagreement"] = self.disagreement.compute()
        out["mutual_information"] = self.mutual_information.compute()
        for i, metric in enumerate(self.members):
            out.update({f"member_{k}/{i}": v for k, v in metric.compute().items()})
        return out

    def reset(self) -> None:
        self.ensemble.reset()
        for m in self.members:
            m.reset()
        self.disagreement.reset()
        self.mutual_information.reset()


class OODMetrics(nn.Module):
    """OOD AUROC / AUPR (OOD positive) / FPR95 for max-probability, entropy and mutual-information scores."""

    scores = ("msp", "entropy", "mi")

    def __init__(self) -> None:
        super().__init__()
        self.auroc = nn.ModuleDict({s: BinaryAUROC() for s in self.scores})
        self.aupr = nn.ModuleDict({s: BinaryAveragePrecision() for s in self.scores})
        self._seen = set()

    @staticmethod
    def _score(logits: Tensor) -> dict[str, Tensor]:
        member_probs = logits.detach().float().softmax(-1)
        probs = member_probs.mean(0)
        ent = _entropy(probs)
        # Higher score = more likely OOD, so the max probability enters negated.
        return {"msp": -probs.max(-1).values, "entropy": ent, "mi": ent - _entropy(member_probs).mean(0)}

    def update(self, logits: Tensor, is_ood: bool) -> None:
        self._seen.add(bool(is_ood))
        for name, score in self._score(logits).items():
            label = torch.full_like(score, int(is_ood), dtype=torch.long)
            self.auroc[name].update(score, label)
            self.aupr[name].update(score, label)

    def has_both(self) -> bool:
        return self._seen == {True, False}

    def compute(self) -> dict[str, Tensor]:
        out = {}
        for name in self.scores:
            out[f"ood_auroc_{name}"] = self.auroc[name].compute()
            out[f"ood_aupr_{name}"] = self.aupr[name].compute()
        return out

    def reset(self) -> None:
        self._seen = set()
        for m in list(self.auroc.values()) + list(self.aupr.values()):
            m.reset()


def make_classification_metrics(num_classes: int, num_members: int, bins: int = 15) -> EnsembleClassificationMetrics:
    return EnsembleClassificationMetrics(num_classes, num_members, bins)


def make_ood_metrics() -> OODMetrics:
    return OODMetrics()


