"""Split-conformal prediction sets for classifiers: THR (LAC), APS and RAPS scores.

Given calibration probabilities and labels, the threshold ``q`` is the ``ceil((n + 1)(1 - alpha))``-th
smallest calibration score; the set of a new input is ``{k : score(x, k) <= q}``. Under
exchangeability its coverage is at least ``1 - alpha`` (and below ``1 - alpha + 1/(n + 1)`` without
ties). torch-uncertainty's ``ConformalCls*`` use the same scores but ``torch.quantile(scores, 1 - alpha)``
(an interpolated quantile without the ``(n + 1)`` correction), which loses the finite-sample guarantee,
and they wrap a model; here everything works on stored probabilities, so it plugs into a callback.
"""

from __future__ import annotations

import math
import warnings
from typing import Literal

import torch
from torch import Tensor, nn

from .._checks import check_choice, check_probs, check_targets
from .temperature import CalibrationWarning

Method = Literal["thr", "aps", "raps"]


def conformal_scores(
    probs: Tensor,
    method: Method = "aps",
    randomized: bool = True,
    penalty: float = 0.1,
    k_reg: int = 1,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Non-conformity score of every class, ``(B, C)`` (lower = more conforming).

    - ``thr``: ``1 - p_k``;
    - ``aps``: total probability of the classes ranked at or above ``k``, minus ``U * p_k`` with
      ``U ~ Uniform(0, 1)`` when ``randomized`` (one draw per sample, breaking ties);
    - ``raps``: APS plus ``penalty * max(rank_k - k_reg, 0)`` (rank 1 = most likely class).
    """
    check_probs(probs)
    if method == "thr":
        return 1 - probs
    check_choice("method", method, ("thr", "aps", "raps"))
    ordered, order = probs.sort(dim=-1, descending=True)
    cumsum = ordered.cumsum(-1)
    if randomized:
        u = torch.rand(probs.shape[0], 1, generator=generator, dtype=probs.dtype).to(probs.device)
        cumsum = cumsum - u * ordered
    if method == "raps":
        rank = torch.arange(1, probs.shape[-1] + 1, device=probs.device, dtype=probs.dtype)
        cumsum = cumsum + penalty * (rank - k_reg).clamp_min(0)
    return torch.empty_like(cumsum).scatter_(-1, order, cumsum)


def min_calibration_samples(alpha: float) -> int:
    """The fewest calibration samples whose ``ceil((n + 1)(1 - alpha))``-th score exists (9 for ``alpha=0.1``)."""
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"`alpha` (miscoverage) must be in (0, 1), e.g. 0.1 for 90% sets; got {alpha}.")
    n = max(1, math.floor((1 - alpha) / alpha) - 1)
    while math.ceil((n + 1) * (1 - alpha)) > n:
        n += 1
    return n


def conformal_quantile(scores: Tensor, alpha: float) -> float:
    """The ``ceil((n + 1)(1 - alpha))``-th smallest score (``inf`` when that exceeds ``n``)."""
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"`alpha` (miscoverage) must be in (0, 1), e.g. 0.1 for 90% sets; got {alpha}.")
    n = scores.numel()
    if n == 0:
        raise ValueError("conformal calibration needs at least one calibration sample.")
    k = math.ceil((n + 1) * (1 - alpha))
    if k > n:
        return math.inf
    return float(scores.flatten().double().kthvalue(k).values)


class ConformalClassifier(nn.Module):
    """Calibrate a threshold on held-out probabilities, then turn probabilities into prediction sets.

    Args:
        alpha: miscoverage: the sets contain the true class with probability ``>= 1 - alpha``.
        method: non-conformity score, ``"thr"``, ``"aps"`` or ``"raps"`` (see :func:`conformal_scores`).
        randomized: randomised APS/RAPS scores (one uniform draw per sample, breaking ties).
        penalty: RAPS penalty per rank beyond ``k_reg``.
        k_reg: ranks RAPS leaves unpenalised.
        seed: seed of the randomisation.

    Example:
        >>> from lightning_ensembles.calibration import calibrated_logits
        >>> logits, y = calibrated_logits(2000, num_classes=5, scale=2)
        >>> cp = ConformalClassifier(alpha=0.1, method="thr").fit(logits[:1000].softmax(-1), y[:1000])
        >>> sets = cp.predict_sets(logits[1000:].softmax(-1))
        >>> coverage = sets.gather(1, y[1000:, None]).float().mean()
        >>> bool(0.87 < coverage < 0.93)
        True
    """

    threshold: Tensor

    def __init__(
        self,
        alpha: float = 0.1,
        method: Method = "aps",
        randomized: bool = True,
        penalty: float = 0.1,
        k_reg: int = 1,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if not 0.0 < alpha < 1.0:
            raise ValueError(f"`alpha` (miscoverage) must be in (0, 1), e.g. 0.1 for 90% sets; got {alpha}.")
        check_choice("method", method, ("thr", "aps", "raps"))
        if penalty < 0 or k_reg < 0:
            raise ValueError(f"RAPS needs `penalty` >= 0 and `k_reg` >= 0, got {penalty} and {k_reg}.")
        self.alpha, self.method, self.randomized = alpha, method, randomized
        self.penalty, self.k_reg = penalty, k_reg
        self.generator = torch.Generator().manual_seed(seed)
        self.register_buffer("threshold", torch.tensor(float("nan"), dtype=torch.float64))

    @property
    def is_fitted(self) -> bool:
        return not bool(torch.isnan(self.threshold))

    def scores(self, probs: Tensor) -> Tensor:
        return conformal_scores(probs, self.method, self.randomized, self.penalty, self.k_reg, self.generator)

    def fit(self, probs: Tensor, target: Tensor) -> ConformalClassifier:
        check_probs(probs)
        check_targets(target, probs.shape[0], probs.shape[-1])
        true_scores = self.scores(probs).gather(1, target[:, None]).squeeze(1)
        self.threshold.fill_(conformal_quantile(true_scores, self.alpha))
        if math.isinf(float(self.threshold)):
            warnings.warn(
                f"conformal calibration on {probs.shape[0]} samples: alpha={self.alpha} needs at least "
                f"{min_calibration_samples(self.alpha)} for a finite threshold, so every prediction set holds all "
                "classes (coverage 1, trivially).",
                CalibrationWarning,
                stacklevel=2,
            )
        return self

    def predict_sets(self, probs: Tensor) -> Tensor:
        """Boolean ``(B, C)`` membership of each class in each prediction set."""
        if not self.is_fitted:
            raise RuntimeError("ConformalClassifier is not calibrated: call `fit(probs, target)` first.")
        return self.scores(probs) <= self.threshold.to(probs.device, probs.dtype)
