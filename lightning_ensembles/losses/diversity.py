"""Output-space diversity: how far apart the members' predictions are, as differentiable terms.

Every function takes member outputs with the member axis first, ``(M, B, ...)``, and returns a
scalar averaged over the batch. The :class:`~lightning_ensembles.losses.base.Regularizer` classes
return **minus** the diversity, so that ``loss += weight * value`` with a **positive weight
encourages diversity** and a negative weight discourages it (default weight 0: off).

When to use which sign: forced diversity helps small ensembles (M <= 4 or so) of under-parameterised
models; for large ensembles of strong models it hurts accuracy and calibration ("Pathologies of
Predictive Diversity in Deep Ensembles", Abe et al. 2023), where a small *negative* weight can help.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._checks import check_choice, check_class_target, check_logits, check_pairwise, check_same_batch
from ..ensembles.base import aggregate_log_probs, split_gaussian
from .base import Term

__all__ = [
    "pairwise_kl",
    "jensen_shannon",
    "soft_disagreement",
    "ambiguity",
    "jensen_gap",
    "PairwiseKL",
    "JensenShannon",
    "SoftDisagreement",
    "NegativeCorrelation",
    "JensenGap",
    "JensenGapLoss",
]


def _entropy(log_p: Tensor) -> Tensor:
    # From log-probabilities so that certain members (p = 0 somewhere) give 0 * -inf -> 0, not nan.
    return -(log_p.exp() * log_p).nan_to_num(nan=0.0).sum(-1)


# ---------------------------------------------------------------------------------------------- functions
def pairwise_kl(logits: Tensor) -> Tensor:
    """Mean over ordered member pairs ``i != j`` and the batch of ``KL(p_i || p_j)`` (nats).

    Summing both orders makes it symmetric. Unbounded: two confident members that disagree are
    infinitely far apart, so prefer :func:`jensen_shannon` for a *positive* (diversity-seeking) weight.
    """
    check_logits(logits, "pairwise_kl")
    m = logits.shape[0]
    log_p = F.log_softmax(logits, dim=-1)
    p = log_p.exp()
    # KL(p_i || p_j) = sum_c p_i log p_i - sum_c p_i log p_j; the cross term for all pairs at once.
    cross = torch.einsum("ibc,jbc->ijb", p, log_p)
    neg_entropy = torch.einsum("ibc,ibc->ib", p, log_p)
    kl = neg_entropy.unsqueeze(1) - cross  # (M, M, B), zero on the diagonal
    return kl.sum(dim=(0, 1)).mean() / (m * (m - 1))


def jensen_shannon(logits: Tensor, pairwise: bool = False) -> Tensor:
    """Jensen-Shannon divergence between member predictive distributions (nats), batch mean.

    ``pairwise=False``: the generalised JS divergence ``H(mean_i p_i) - mean_i H(p_i)`` (the mutual
    information between prediction and member; bounded by ``log M``). ``pairwise=True``: the mean over
    pairs ``i < j`` of ``JS(p_i, p_j)`` (each bounded by ``log 2``). Both equal for ``M = 2``.
    """
    check_logits(logits, "jensen_shannon")
    log_p = F.log_softmax(logits, dim=-1)
    member_entropy = _entropy(log_p)  # (M, B)
    if not pairwise:
        return (_entropy(aggregate_log_probs(logits)) - member_entropy.mean(0)).mean()
    m = logits.shape[0]
    i, j = torch.triu_indices(m, m, offset=1, device=logits.device)
    log_mix = torch.logaddexp(log_p[i], log_p[j]) - math.log(2.0)  # (pairs, B, C)
    js = _entropy(log_mix) - 0.5 * (member_entropy[i] + member_entropy[j])
    return js.mean()


def soft_disagreement(logits: Tensor) -> Tensor:
    """Differentiable member disagreement: mean over pairs ``i != j`` of ``0.5 ||p_i - p_j||^2``, batch mean.

    For confident (one-hot) members it *is* the argmax disagreement (0 or 1 per pair), and it is 0 for
    identical members whatever their confidence. It equals the probability that two members disagree
    when each samples a class from its own distribution, ``1 - <p_i, p_j>``, minus the members' own
    sampling disagreement (Gini impurity ``1 - ||p||^2``); that raw sampling version is not used because
    it also rewards uncertainty: maximising it makes members less confident rather than different
    (measured on digits, a positive weight on it *lowered* argmax disagreement).
    """
    check_logits(logits, "soft_disagreement")
    m = logits.shape[0]
    p = logits.softmax(dim=-1)
    # sum_{i,j} ||p_i - p_j||^2 = 2 M sum_i ||p_i||^2 - 2 ||sum_i p_i||^2: O(M) instead of O(M^2).
    spread = m * p.pow(2).sum(-1).sum(0) - p.sum(0).pow(2).sum(-1)  # (B,)
    return (spread / (m * (m - 1))).mean()


def ambiguity(predictions: Tensor) -> Tensor:
    """Spread of regression predictions around their mean, ``mean_i mean_b mean_d (f_i - f_bar)^2``.

    The "ambiguity" of the decomposition ``MSE(f_bar) = mean_i MSE(f_i) - ambiguity`` (Krogh & Vedelsby),
    i.e. the penalty of negative correlation learning.
    """
    check_pairwise(predictions, "ambiguity", name="predictions")
    return (predictions - predictions.mean(0, keepdim=True)).pow(2).mean()


def _member_ce_and_ensemble_nll(logits: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    """``(mean_i CE(z_i, y), NLL(mean_i p_i, y))`` of member logits ``(M, B, C)``: the two Jensen-gap terms."""
    m, b, c = logits.shape
    member_ce = F.cross_entropy(logits.reshape(m * b, c), target.repeat(m))
    return member_ce, F.nll_loss(aggregate_log_probs(logits), target)


def jensen_gap(logits: Tensor, target: Tensor) -> Tensor:
    """``NLL(mean_i p_i, y) - mean_i CE(z_i, y)``: never positive (Jensen), zero when members agree.

    ``mean CE + (1 - gamma) * jensen_gap`` is the "Jensen gap" objective
    ``gamma * mean_i CE(z_i, y) + (1 - gamma) * NLL(mean_i p_i, y)`` (Abe et al., 2023).
    """
    check_logits(logits, "jensen_gap")
    check_class_target(logits, target, "jensen_gap")
    member_ce, ensemble_nll = _member_ce_and_ensemble_nll(logits, target)
    return ensemble_nll - member_ce


# ---------------------------------------------------------------------------------------------- regularizers
class PairwiseKL(Term):
    """Minus the mean pairwise KL divergence between members (see :func:`pairwise_kl`).

    Positive ``weight``: push members' predictive distributions apart; negative: pull them together
    (a distillation-like consensus term, where the unboundedness of KL is harmless).

    Args:
        weight: multiplier of the value in the training loss (``loss += weight * value``); 0 turns the term off.
        name: logged as ``train/<name>``; default ``"neg_pairwise_kl"``.

    Example:
        >>> import torch
        >>> reg = PairwiseKL(weight=-0.1)
        >>> round(reg(torch.tensor([[[2.0, 0.0]], [[0.0, 2.0]]]), torch.tensor([0])).item(), 4)
        -1.5232
    """

    def __init__(self, weight: float = 0.0, name: str | None = "neg_pairwise_kl") -> None:
        super().__init__(weight, name)

    def term(self, outputs: Tensor, target: Tensor | None, inputs: Tensor | None, ensemble: nn.Module | None) -> Tensor:
        return -pairwise_kl(outputs)


class JensenShannon(Term):
    """Minus the Jensen-Shannon divergence between members (see :func:`jensen_shannon`).

    Bounded (``<= log M``), so a positive ``weight`` cannot run away the way KL can.

    Args:
        weight: multiplier of the value in the training loss (``loss += weight * value``); 0 turns the term off.
        pairwise: the mean pairwise JS divergence instead of the generalised one.
        name: logged as ``train/<name>``; default ``"neg_jensen_shannon"``.

    Example:
        >>> import torch
        >>> reg = JensenShannon(weight=0.1)
        >>> round(-reg(torch.tensor([[[9.0, -9.0]], [[-9.0, 9.0]]]), torch.tensor([0])).item(), 4)  # ~ log 2
        0.6931
    """

    def __init__(self, weight: float = 0.0, pairwise: bool = False, name: str | None = "neg_jensen_shannon") -> None:
        super().__init__(weight, name)
        self.pairwise = pairwise

    def term(self, outputs: Tensor, target: Tensor | None, inputs: Tensor | None, ensemble: nn.Module | None) -> Tensor:
        return -jensen_shannon(outputs, pairwise=self.pairwise)


class SoftDisagreement(Term):
    """Minus the differentiable pairwise disagreement (see :func:`soft_disagreement`).

    Args:
        weight: multiplier of the value in the training loss (``loss += weight * value``); 0 turns the term off.
        name: logged as ``train/<name>``; default ``"neg_disagreement"``.

    Example:
        >>> import torch
        >>> reg = SoftDisagreement(weight=0.1)
        >>> abs(reg(torch.zeros(3, 4, 2), torch.zeros(4, dtype=torch.long)).item())  # identical members
        0.0
        >>> reg(torch.tensor([[[20.0, 0.0]], [[0.0, 20.0]]]), torch.zeros(1, dtype=torch.long)).item()  # ~ -1
        -1.0
    """

    def __init__(self, weight: float = 0.0, name: str | None = "neg_disagreement") -> None:
        super().__init__(weight, name)

    def term(self, outputs: Tensor, target: Tensor | None, inputs: Tensor | None, ensemble: nn.Module | None) -> Tensor:
        return -soft_disagreement(outputs)


class NegativeCorrelation(Term):
    """Negative correlation learning for regression: minus the ambiguity of member predictions.

    NCL (Liu & Yao; Brown et al.) trains member i on ``0.5 (f_i - y)^2 - lambda (f_i - f_bar)^2``;
    with an MSE member loss (no 1/2, as in ``EnsembleRegressor(loss="mse")``) that is this term with
    ``weight = 2 * lambda``; ``lambda = 1`` then trains the ensemble mean as one model.
    ``output="gaussian"`` uses the mean half of ``(..., 2 * D)`` Gaussian outputs (see
    :func:`~lightning_ensembles.ensembles.base.split_gaussian`).

    Args:
        weight: multiplier of the value in the training loss (``loss += weight * value``); 0 turns the term off.
            ``2 * lambda`` of NCL.
        output: ``"point"`` predictions or ``"gaussian"`` (mean, variance) outputs.
        name: logged as ``train/<name>``; default ``"neg_ambiguity"``.

    Example:
        >>> import torch
        >>> reg = NegativeCorrelation(weight=0.5)
        >>> reg(torch.tensor([[[1.0]], [[3.0]]]), torch.tensor([[2.0]])).item()  # spread of 1 and 3 around 2
        -1.0
    """

    def __init__(self, weight: float = 0.0, output: str = "point", name: str | None = "neg_ambiguity") -> None:
        super().__init__(weight, name)
        check_choice("output", output, ("point", "gaussian"))
        self.output = output

    def term(self, outputs: Tensor, target: Tensor | None, inputs: Tensor | None, ensemble: nn.Module | None) -> Tensor:
        check_pairwise(outputs, "NegativeCorrelation")
        check_same_batch(outputs, target, "target", "NegativeCorrelation")
        preds = split_gaussian(outputs)[0] if self.output == "gaussian" else outputs
        if target is not None and target.shape != preds.shape[1:] and target.shape != preds.shape[1:-1]:
            raise ValueError(
                f"NegativeCorrelation: `target` of shape {tuple(target.shape)} does not match member predictions "
                f"{tuple(preds.shape)} (expected {tuple(preds.shape[1:])}); with Gaussian (mean, variance) outputs "
                "pass output='gaussian'."
            )
        return -ambiguity(preds)


class JensenGap(Term):
    """The Jensen-gap objective as a regulariser: value ``NLL(mean_i p_i) - mean_i CE_i`` (<= 0).

    Added to the member-mean cross-entropy with ``weight = 1 - gamma`` it gives
    ``gamma * mean_i CE_i + (1 - gamma) * NLL(mean_i p_i)`` (Abe et al., 2023): ``gamma = 1`` (weight 0)
    is independent member training, ``gamma = 0`` (weight 1) trains the averaged prediction only,
    ``gamma < 1`` (positive weight) encourages diversity, ``gamma > 1`` discourages it. Give either
    ``weight`` or ``gamma``. For the whole objective as one loss use :class:`JensenGapLoss`.

    Args:
        weight: multiplier of the value in the training loss (``loss += weight * value``); 0 turns the term off.
            ``1 - gamma``.
        gamma: the objective's ``gamma`` instead of ``weight``.
        name: logged as ``train/<name>``; default ``"neg_jensen_gap"``.

    Example:
        >>> import torch
        >>> reg = JensenGap(gamma=0.5)
        >>> reg.weight
        0.5
        >>> reg(torch.zeros(2, 3, 4), torch.zeros(3, dtype=torch.long)).item()  # identical members: no gap
        0.0
    """

    def __init__(self, weight: float = 0.0, gamma: float | None = None, name: str | None = "neg_jensen_gap") -> None:
        if gamma is not None:
            if weight != 0.0 and weight != 1.0 - gamma:
                raise ValueError(
                    f"give `weight` or `gamma`, not both (weight={weight}, gamma={gamma}); weight = 1 - gamma."
                )
            weight = 1.0 - gamma
        super().__init__(weight, name)

    @property
    def gamma(self) -> float:
        """``1 - weight``: the weight of the member-average loss in the Jensen-gap objective."""
        return 1.0 - self.weight

    def term(self, outputs: Tensor, target: Tensor | None, inputs: Tensor | None, ensemble: nn.Module | None) -> Tensor:
        check_logits(outputs, "JensenGap")
        return jensen_gap(outputs, check_class_target(outputs, target, "JensenGap"))


class JensenGapLoss(nn.Module):
    """``gamma * mean_i CE(z_i, y) + (1 - gamma) * NLL(mean_i p_i, y)`` on member logits ``(M, B, C)``.

    ``gamma = 1``: plain member training (the mean member cross-entropy); ``gamma = 0``: the NLL of the
    averaged prediction; values in between trade one for the other, ``gamma > 1`` penalises diversity.

    Args:
        gamma: weight of the member-mean cross-entropy (``1 - gamma``: of the ensemble NLL).

    Example:
        >>> import torch
        >>> logits, y = torch.randn(3, 5, 4), torch.randint(0, 4, (5,))
        >>> loss = JensenGapLoss(gamma=1.0)(logits, y)
        >>> bool(torch.isclose(loss, torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.repeat(3))))
        True
    """

    def __init__(self, gamma: float = 1.0) -> None:
        super().__init__()
        self.gamma = float(gamma)

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        check_logits(logits, "JensenGapLoss", pairwise=False)
        check_class_target(logits, target, "JensenGapLoss")
        member_ce, ensemble_nll = _member_ce_and_ensemble_nll(logits, target)
        return self.gamma * member_ce + (1.0 - self.gamma) * ensemble_nll

    def extra_repr(self) -> str:
        return f"gamma={self.gamma}"
