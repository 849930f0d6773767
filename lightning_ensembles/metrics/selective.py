"""Selective prediction: area under the risk-coverage curve and coverage at a given risk."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities.data import dim_zero_cat

from ._checks import check_num_classes, check_probs, check_targets


class _RiskCoverage(Metric):
    """Stores the top-label confidence and error of every sample (sorting needs them all)."""

    is_differentiable = False
    full_state_update = False

    def __init__(self, num_classes: int | None = None, validate_args: bool = True, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.num_classes = num_classes
        self.validate_args = validate_args
        self.add_state("confidences", [], dist_reduce_fx="cat")
        self.add_state("errors", [], dist_reduce_fx="cat")

    def update(self, probs: Tensor, target: Tensor) -> None:
        if self.validate_args:
            check_probs(probs)
            c = check_num_classes(probs, self.num_classes)
            check_targets(target, probs.shape[0], c)
        conf, pred = probs.max(-1)
        self.confidences.append(conf.double())
        self.errors.append((pred != target).double())

    def risks(self) -> Tensor:
        """``risk[k-1]`` = error rate among the ``k`` most confident samples (ties keep input order)."""
        conf = dim_zero_cat(self.confidences)
        err = dim_zero_cat(self.errors)
        order = torch.sort(conf, descending=True, stable=True).indices
        k = torch.arange(1, conf.numel() + 1, dtype=torch.float64, device=conf.device)
        return err[order].cumsum(0) / k


class AURC(_RiskCoverage):
    r"""Area under the risk-coverage curve: ``mean_k risk(k)``, ``risk(k)`` = error rate of the ``k``
    most confident predictions (Geifman et al., 2019). Lower is better.

    torch-uncertainty's ``AURC`` integrates the same curve with the trapezoid rule and divides by
    ``1 - 1/N``: ``AURC_tu = (N * AURC - (risk(1) + risk(N)) / 2) / (N - 1)``; the two agree as N grows.

    Example:
        >>> import torch
        >>> m = AURC()
        >>> m.update(torch.tensor([[.7, .3], [.6, .4], [.8, .2]]), torch.tensor([0, 1, 0]))
        >>> round(float(m.compute()), 4)
        0.1111
    """

    higher_is_better = False

    def compute(self) -> Tensor:
        risk = self.risks()
        if risk.numel() == 0:
            return torch.tensor(float("nan"), device=self.device)
        return risk.mean().float()


class CoverageAtRisk(_RiskCoverage):
    r"""Largest coverage ``k / N`` whose selective risk ``risk(k)`` is at most ``risk``; ``nan`` if none.

    Same definition as torch-uncertainty's ``CovAtxRisk(risk_threshold=risk)``.

    Example:
        >>> import torch
        >>> m = CoverageAtRisk(risk=0.4)
        >>> m.update(torch.tensor([[.7, .3], [.6, .4], [.8, .2]]), torch.tensor([0, 1, 0]))
        >>> round(float(m.compute()), 4)
        1.0
    """

    higher_is_better = True

    def __init__(self, risk: float = 0.05, num_classes: int | None = None, validate_args: bool = True, **kwargs: Any) -> None:
        if not 0.0 <= risk <= 1.0:
            raise ValueError(f"`risk` must be in [0, 1], got {risk}.")
        super().__init__(num_classes, validate_args, **kwargs)
        self.risk = risk

    def compute(self) -> Tensor:
        risk = self.risks()
        ok = torch.nonzero(risk <= self.risk).flatten()
        if ok.numel() == 0:
            return torch.tensor(float("nan"), device=self.device)
        return ((ok[-1] + 1) / risk.numel()).float()
