"""The ensemble contract and the one place where member outputs are aggregated.

Every ensemble in this library is an ``nn.Module`` mapping a batch ``(B, ...)`` to member outputs
with the member axis first, ``(M, B, ...)``. Losses, metrics, averaging and callbacks consume that
shape; :func:`aggregate_probs` / :func:`aggregate_gaussian` turn it into the ensemble prediction.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "Ensemble",
    "GaussianMixture",
    "aggregate_probs",
    "aggregate_log_probs",
    "aggregate_gaussian",
    "split_gaussian",
    "check_member_outputs",
]

#: Smallest predicted variance; keeps Gaussian NLL finite.
MIN_VARIANCE = 1e-6


def check_member_outputs(outputs: Tensor, num_members: int | None = None, name: str = "outputs") -> None:
    """Raise a ``ValueError`` unless ``outputs`` has the member axis first, ``(M, B, ...)``."""
    if not isinstance(outputs, Tensor):
        raise ValueError(f"`{name}` must be a tensor of member outputs (M, B, ...), got {type(outputs).__name__}.")
    if outputs.dim() < 2:
        raise ValueError(
            f"`{name}` must have the member axis first, shape (M, B, ...); got shape {tuple(outputs.shape)}. "
            "Stack single-model outputs with `outputs.unsqueeze(0)`."
        )
    if num_members is not None and outputs.shape[0] != num_members:
        raise ValueError(f"`{name}` has {outputs.shape[0]} members on axis 0, expected {num_members}.")


def aggregate_log_probs(logits: Tensor) -> Tensor:
    """Log of the mean member softmax probability: ``(M, B, C) -> (B, C)``.

    Computed with ``logsumexp`` so that it stays finite where a member is certain; this is the
    "logit" of the ensemble that a user's ``cross_entropy`` expects.
    """
    check_member_outputs(logits, name="logits")
    m = logits.shape[0]
    return torch.logsumexp(F.log_softmax(logits, dim=-1), dim=0) - torch.log(
        torch.tensor(float(m), dtype=logits.dtype, device=logits.device)
    )


def aggregate_probs(logits: Tensor) -> Tensor:
    """Ensemble predictive distribution: mean of member softmax probabilities, ``(M, B, C) -> (B, C)``.

    Probabilities are averaged, never logits (the convention of every reference implementation).
    """
    check_member_outputs(logits, name="logits")
    return logits.softmax(dim=-1).mean(dim=0)


def split_gaussian(outputs: Tensor) -> tuple[Tensor, Tensor]:
    """Split Gaussian-regression outputs ``(..., 2 * D)`` into mean ``(..., D)`` and variance ``(..., D)``.

    The first half of the last axis is the mean, the second half an unconstrained value mapped to a
    variance with ``softplus`` (plus :data:`MIN_VARIANCE`).
    """
    if outputs.shape[-1] % 2:
        raise ValueError(
            f"Gaussian outputs need an even last dimension (mean and variance per target); got {outputs.shape[-1]}. "
            "Give the backbone 2 * num_targets outputs, or use loss='mse'."
        )
    mean, raw = outputs.chunk(2, dim=-1)
    return mean, F.softplus(raw) + MIN_VARIANCE


class GaussianMixture(NamedTuple):
    """Moments of an equally weighted mixture of member Gaussians."""

    mean: Tensor
    """Mixture mean (mean of member means)."""
    aleatoric: Tensor
    """Mean of member variances (noise the members predict)."""
    epistemic: Tensor
    """Variance of member means (disagreement between members)."""

    @property
    def variance(self) -> Tensor:
        """Total predictive variance: aleatoric + epistemic (law of total variance)."""
        return self.aleatoric + self.epistemic


def aggregate_gaussian(mean: Tensor, variance: Tensor | None = None) -> GaussianMixture:
    """Mixture mean and variance of member Gaussians given ``(M, B, ...)`` means and variances.

    With ``variance=None`` (members trained with MSE) the aleatoric part is zero.
    The epistemic part uses the population variance (divide by M), as the mixture's variance does.
    """
    check_member_outputs(mean, name="mean")
    mix_mean = mean.mean(dim=0)
    epistemic = mean.var(dim=0, unbiased=False)
    aleatoric = torch.zeros_like(mix_mean) if variance is None else variance.mean(dim=0)
    return GaussianMixture(mix_mean, aleatoric, epistemic)


class Ensemble(nn.Module, ABC):
    """Base class of every ensemble: ``forward(x) -> (M, B, ...)`` with the member axis first.

    Subclasses implement :meth:`forward` and :meth:`member`. ``num_members`` is fixed at construction.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from lightning_ensembles import DeepEnsemble
        >>> ens = DeepEnsemble(nn.Linear(3, 2), num_members=4)
        >>> ens(torch.randn(5, 3)).shape
        torch.Size([4, 5, 2])
        >>> Ensemble.aggregate(ens(torch.randn(5, 3))).shape
        torch.Size([5, 2])
    """

    def __init__(self, num_members: int) -> None:
        super().__init__()
        if not isinstance(num_members, int) or isinstance(num_members, bool) or num_members < 1:
            raise ValueError(f"`num_members` must be an integer >= 1, got {num_members!r}. Use e.g. num_members=4.")
        self.num_members = num_members

    @abstractmethod
    def forward(self, x: Tensor) -> Tensor:
        """Member outputs ``(M, B, ...)`` for a batch ``(B, ...)``."""

    @abstractmethod
    def member(self, index: int) -> nn.Module:
        """A standalone ``nn.Module`` computing member ``index`` alone (a copy, safe to export)."""

    def member_targets(self, target: Tensor) -> Tensor:
        """Targets matching :meth:`forward`'s member outputs: ``(B, ...) -> (M, B, ...)``.

        By default every member sees the whole batch, so the targets are repeated (a view, no copy).
        Ensembles that split the batch among members in training override this.
        """
        return target.unsqueeze(0).expand(self.num_members, *target.shape)

    def _check_index(self, index: int) -> int:
        if not -self.num_members <= index < self.num_members:
            raise IndexError(f"member index {index} out of range for an ensemble of {self.num_members} members.")
        return index % self.num_members

    @staticmethod
    def aggregate(outputs: Tensor, task: str = "classification") -> Tensor | GaussianMixture:
        """Ensemble prediction from member outputs.

        ``task="classification"``: mean member softmax ``(B, C)``;
        ``task="gaussian"``: :class:`GaussianMixture` of outputs split by :func:`split_gaussian`;
        ``task="regression"``: mixture of point predictions (aleatoric part zero).
        """
        if task == "classification":
            return aggregate_probs(outputs)
        if task == "gaussian":
            return aggregate_gaussian(*split_gaussian(outputs))
        if task == "regression":
            return aggregate_gaussian(outputs)
        raise ValueError(f"unknown task {task!r}; choose 'classification', 'gaussian' or 'regression'.")
