"""Evidential losses: Dirichlet classification (Sensoy et al., 2018) and Normal-Inverse-Gamma regression (Amini et al., 2020).

Both act member by member on outputs with the member axis first, ``(M, B, ...)`` (or a single model's
``(B, ...)``), and return the mean over every member and sample, like the cross-entropy of
:class:`~lightning_ensembles.EnsembleClassifier`.

**Classification.** A Dirichlet ``Dir(alpha)`` over class probabilities with ``alpha = evidence + 1``;
expected probability ``p = alpha / S`` (``S = sum_k alpha_k``, the Dirichlet strength), vacuity
``K / S``. The evidential heads of :mod:`lightning_ensembles.ensembles.evidential` output
``log alpha``, so that ``softmax(log alpha) = alpha / S`` is the expected probability and every
probability-based metric applies unchanged. The loss (Sensoy et al., eq. 5 and 9) is the Bayes risk of
the squared error

    ``sum_k (y_k - p_k)^2 + p_k (1 - p_k) / (S + 1)``

(``"digamma"``: ``sum_k y_k (psi(S) - psi(alpha_k))``; ``"log"``: ``sum_k y_k (log S - log alpha_k)``)
plus ``lambda_t KL(Dir(alpha~) || Dir(1))`` on the misleading evidence ``alpha~ = y + (1 - y) alpha``, with
the annealing ``lambda_t = min(1, t / annealing_epochs)`` (t = epoch index, 10 epochs in the paper).

**Regression.** Outputs ``(gamma, nu, alpha, beta)`` of a Normal-Inverse-Gamma prior on the Gaussian's
mean and variance; the marginal likelihood is a Student-t with ``2 alpha`` degrees of freedom, location
``gamma`` and scale ``sqrt(beta (1 + nu) / (nu alpha))``. Loss = its NLL (Amini et al., eq. 8)

    ``0.5 log(pi / nu) - alpha log(Omega) + (alpha + 0.5) log(nu (y - gamma)^2 + Omega) + lgamma(alpha) - lgamma(alpha + 0.5)``,
    ``Omega = 2 beta (1 + nu)``

plus ``coeff * |y - gamma| (2 nu + alpha)`` (eq. 9; ``coeff = 0.01``). Aleatoric variance
``E[sigma^2] = beta / (alpha - 1)``, epistemic ``Var[mu] = beta / (nu (alpha - 1))``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._checks import check_choice

__all__ = [
    "EvidentialClassificationLoss",
    "EvidentialRegressionLoss",
    "annealing_coefficient",
    "dirichlet_kl_uniform",
    "dirichlet_uncertainty",
    "evidential_classification_loss",
    "evidential_regression_loss",
    "nig_constrain",
    "nig_nll",
    "nig_regularizer",
    "nig_split",
    "nig_uncertainty",
]

_RISKS = ("mse", "digamma", "log")


def annealing_coefficient(epoch: int, annealing_epochs: int = 10) -> float:
    """Sensoy et al.'s KL weight ``min(1, epoch / annealing_epochs)`` (0 at the first epoch)."""
    if annealing_epochs < 1:
        raise ValueError(f"`annealing_epochs` must be >= 1, got {annealing_epochs}.")
    return min(1.0, epoch / annealing_epochs)


def dirichlet_kl_uniform(alpha: Tensor) -> Tensor:
    """``KL(Dir(alpha) || Dir(1, ..., 1))`` over the last axis (closed form, Sensoy et al. eq. 8)."""
    s = alpha.sum(-1)
    k = alpha.shape[-1]
    return (
        torch.lgamma(s)
        - math.lgamma(k)
        - torch.lgamma(alpha).sum(-1)
        + ((alpha - 1) * (torch.digamma(alpha) - torch.digamma(s).unsqueeze(-1))).sum(-1)
    )


def _check_alpha(alpha: Tensor, target: Tensor) -> Tensor:
    if target.shape != alpha.shape[:-1]:
        raise ValueError(
            f"targets of shape {tuple(target.shape)} do not fit Dirichlet parameters {tuple(alpha.shape)}: expected "
            f"class indices of shape {tuple(alpha.shape[:-1])} (repeat them over members with `target.expand(M, -1)`)."
        )
    if target.is_floating_point():
        raise ValueError("targets must be integer class indices (torch.long), got a floating-point tensor.")
    if bool((alpha < 1).any()):
        raise ValueError(
            "Dirichlet parameters must be >= 1 (alpha = evidence + 1); pass `log_alpha.exp()` of an evidential head, "
            "or `evidence + 1`."
        )
    return F.one_hot(target, alpha.shape[-1]).to(alpha.dtype)


def evidential_classification_loss(alpha: Tensor, target: Tensor, kl_weight: float = 0.0, risk: str = "mse") -> Tensor:
    """Mean Sensoy et al. loss of Dirichlet parameters ``alpha`` ``(..., C)`` for class indices ``target`` ``(...)``.

    ``kl_weight`` is the annealing coefficient ``lambda_t`` (:func:`annealing_coefficient`).

    Example:
        >>> import torch
        >>> alpha = torch.tensor([[9.0, 1.0]])  # 8 units of evidence for class 0
        >>> round(float(evidential_classification_loss(alpha, torch.tensor([0]))), 4)  # 2 * 0.1^2 + 2 * 0.09 / 11
        0.0364
    """
    check_choice("risk", risk, _RISKS)
    y = _check_alpha(alpha, target)
    s = alpha.sum(-1, keepdim=True)
    if risk == "mse":
        p = alpha / s
        loss = ((y - p) ** 2 + p * (1 - p) / (s + 1)).sum(-1)
    elif risk == "digamma":
        loss = (y * (torch.digamma(s) - torch.digamma(alpha))).sum(-1)
    else:
        loss = (y * (s.log() - alpha.log())).sum(-1)
    if kl_weight:
        loss = loss + kl_weight * dirichlet_kl_uniform(y + (1 - y) * alpha)
    return loss.mean()


def dirichlet_uncertainty(log_alpha: Tensor) -> dict[str, Tensor]:
    """Expected probabilities ``alpha / S``, vacuity ``K / S`` and strength ``S`` of ``log alpha`` ``(..., C)``."""
    alpha = log_alpha.exp()
    s = alpha.sum(-1)
    return {"probs": alpha / s.unsqueeze(-1), "vacuity": alpha.shape[-1] / s, "strength": s}


def nig_split(outputs: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Split NIG outputs ``(..., 4 * D)`` into ``gamma, nu, alpha, beta`` ``(..., D)`` each (already constrained)."""
    if outputs.shape[-1] % 4:
        raise ValueError(
            f"Normal-Inverse-Gamma outputs need 4 values per target (gamma, nu, alpha, beta); got {outputs.shape[-1]}. "
            "Convert the backbone with `evidential_head(backbone, 'nig')`."
        )
    return outputs.chunk(4, dim=-1)  # type: ignore[return-value]


#: Smallest value added to the positive NIG parameters (keeps the NLL finite).
NIG_EPS = 1e-6


def nig_constrain(raw: Tensor) -> Tensor:
    """Raw outputs ``(..., 4 D)`` -> NIG parameters ``(gamma, softplus(nu), softplus(alpha) + 1, softplus(beta))``.

    (Here rather than in the head's module: the Packed-Ensembles converter rewrites the ``chunk`` / ``cat``
    of a backbone's own code per member, and this is such code.)
    """
    gamma, nu, alpha, beta = raw.chunk(4, dim=-1)
    return torch.cat(
        [gamma, F.softplus(nu) + NIG_EPS, F.softplus(alpha) + 1 + NIG_EPS, F.softplus(beta) + NIG_EPS], dim=-1
    )


def nig_nll(y: Tensor, gamma: Tensor, nu: Tensor, alpha: Tensor, beta: Tensor) -> Tensor:
    """Elementwise NLL of ``y`` under the NIG marginal (a Student-t), Amini et al. eq. 8."""
    omega = 2 * beta * (1 + nu)
    return (
        0.5 * torch.log(math.pi / nu)
        - alpha * torch.log(omega)
        + (alpha + 0.5) * torch.log(nu * (y - gamma) ** 2 + omega)
        + torch.lgamma(alpha)
        - torch.lgamma(alpha + 0.5)
    )


def nig_regularizer(y: Tensor, gamma: Tensor, nu: Tensor, alpha: Tensor) -> Tensor:
    """Elementwise evidence regulariser ``|y - gamma| (2 nu + alpha)`` (Amini et al. eq. 9)."""
    return (y - gamma).abs() * (2 * nu + alpha)


def evidential_regression_loss(outputs: Tensor, target: Tensor, coeff: float = 0.01) -> Tensor:
    """Mean deep evidential regression loss of NIG ``outputs`` ``(..., 4 * D)`` for ``target`` ``(..., D)``.

    Example:
        >>> import torch
        >>> out = torch.tensor([[0.0, 1.0, 2.0, 1.0]])  # gamma=0, nu=1, alpha=2, beta=1
        >>> round(float(evidential_regression_loss(out, torch.tensor([[0.0]]), coeff=0.0)), 4)  # Student-t(4, 0, 1) NLL
        0.9808
    """
    gamma, nu, alpha, beta = nig_split(outputs)
    if target.shape != gamma.shape:
        raise ValueError(
            f"targets of shape {tuple(target.shape)} do not fit NIG outputs {tuple(outputs.shape)}: expected "
            f"{tuple(gamma.shape)} (one value per target; repeat over members with `target.expand(M, ...)`)."
        )
    if bool((nu <= 0).any() | (alpha <= 1).any() | (beta <= 0).any()):
        raise ValueError(
            "NIG parameters need nu > 0, alpha > 1, beta > 0; use the outputs of an evidential 'nig' head."
        )
    target = target.to(gamma.dtype)
    return (nig_nll(target, gamma, nu, alpha, beta) + coeff * nig_regularizer(target, gamma, nu, alpha)).mean()


def nig_uncertainty(outputs: Tensor) -> dict[str, Tensor]:
    """Mean ``gamma``, aleatoric ``beta / (alpha - 1)`` and epistemic ``beta / (nu (alpha - 1))`` of NIG outputs."""
    gamma, nu, alpha, beta = nig_split(outputs)
    aleatoric = beta / (alpha - 1)
    return {"mean": gamma, "aleatoric": aleatoric, "epistemic": aleatoric / nu}


class EvidentialClassificationLoss(nn.Module):
    """Sensoy et al.'s loss on ``log alpha`` outputs, with the KL weight annealed over ``annealing_epochs``.

    ``loss(log_alpha (M, B, C) or (B, C), target, epoch)``.

    Args:
        annealing_epochs: epochs over which the KL term's weight rises from 0 to 1.
        risk: the data term, ``"mse"``, ``"digamma"`` or ``"log"``.

    Example:
        >>> import torch
        >>> loss = EvidentialClassificationLoss()
        >>> log_alpha = torch.log(torch.tensor([[[9.0, 1.0]]]))
        >>> round(float(loss(log_alpha, torch.tensor([[0]]), epoch=0)), 4)
        0.0364
    """

    def __init__(self, annealing_epochs: int = 10, risk: str = "mse") -> None:
        super().__init__()
        check_choice("risk", risk, _RISKS)
        annealing_coefficient(0, annealing_epochs)
        self.annealing_epochs = annealing_epochs
        self.risk = risk

    def forward(self, log_alpha: Tensor, target: Tensor, epoch: int = 0) -> Tensor:
        kl = annealing_coefficient(epoch, self.annealing_epochs)
        return evidential_classification_loss(log_alpha.exp(), target, kl, self.risk)


class EvidentialRegressionLoss(nn.Module):
    """Amini et al.'s NIG NLL plus ``coeff * |y - gamma| (2 nu + alpha)``; ``loss(outputs (..., 4D), target (..., D))``.

    Args:
        coeff: weight of the evidence regulariser ``|y - gamma| (2 nu + alpha)``.
    """

    def __init__(self, coeff: float = 0.01) -> None:
        super().__init__()
        if coeff < 0:
            raise ValueError(f"`coeff` must be >= 0, got {coeff}.")
        self.coeff = coeff

    def forward(self, outputs: Tensor, target: Tensor) -> Tensor:
        return evidential_regression_loss(outputs, target, self.coeff)
