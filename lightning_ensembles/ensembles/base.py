"""The ensemble contract and the one place where member outputs are aggregated.

Every ensemble in this library is an ``nn.Module`` mapping a batch ``(B, ...)`` to member outputs
with the member axis first, ``(M, B, ...)``. Losses, metrics, averaging and callbacks consume that
shape; :func:`aggregate_probs` / :func:`aggregate_gaussian` turn it into the ensemble prediction.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, NamedTuple, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._checks import check_choice, check_member_outputs, check_positive_int
from ..backbones import resolve_backbone

__all__ = [
    "Ensemble",
    "OwnObjective",
    "training_outputs",
    "GaussianMixture",
    "aggregate_probs",
    "aggregate_log_probs",
    "aggregate_gaussian",
    "split_gaussian",
    "check_member_outputs",
]

#: Smallest predicted variance; keeps Gaussian NLL finite.
MIN_VARIANCE = 1e-6


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


#: ``(member outputs (M, B, ...), extra loss or None, values to log)`` of one training batch.
TrainingOutputs = tuple[Tensor, Tensor | None, dict[str, Any]]


@runtime_checkable
class OwnObjective(Protocol):
    """An ensemble that trains with its own objective (per-member inputs, auxiliary heads, extra loss terms).

    Training loops call :func:`training_outputs`, which uses the ensemble's ``training_outputs`` when it
    has one (e.g. :class:`~lightning_ensembles.ensembles.symmetry.MultiSymmetryEnsemble`); a loop that
    cannot honour an own objective (torch-uncertainty's routine) refuses ``isinstance(ens, OwnObjective)``.
    """

    def training_outputs(self, x: Tensor, y: Tensor) -> TrainingOutputs:
        """Member outputs ``(M, B, ...)``, an extra loss term (or ``None``) and values to log."""
        ...


def training_outputs(ensemble: nn.Module, x: Tensor, y: Tensor) -> TrainingOutputs:
    """What one training step of ``ensemble`` on the batch ``(x, y)`` gives to the loss.

    The ensemble's own :class:`OwnObjective` if it has one; otherwise ``(ensemble(x), None, {})``: plain
    member outputs, no extra loss term, nothing to log.

    Example:
        >>> from lightning_ensembles import DeepEnsemble
        >>> ens = DeepEnsemble(nn.Linear(3, 2), num_members=4)
        >>> out, extra, logs = training_outputs(ens, torch.randn(5, 3), torch.zeros(5, dtype=torch.long))
        >>> out.shape, extra, logs
        (torch.Size([4, 5, 2]), None, {})
    """
    if isinstance(ensemble, OwnObjective):
        return ensemble.training_outputs(x, y)
    return ensemble(x), None, {}


class Ensemble(nn.Module, ABC):
    """Base class of every ensemble: ``forward(x) -> (M, B, ...)`` with the member axis first.

    Subclasses implement :meth:`forward` and :meth:`member`. ``num_members`` is fixed at construction.

    The rest of the contract has defaults: :meth:`member_targets` (every member sees the whole batch),
    :meth:`stacked_parameters` (no member-stacked parameters), and, optionally, an own training objective
    (``training_outputs``, see :class:`OwnObjective`). Converters build their backbone with
    :meth:`build_backbone`, so every registered method accepts ``backbone_kwargs``.

    Args:
        num_members: M, the number of members (an integer >= 1).

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
        check_positive_int(num_members, "num_members", hint="Use e.g. num_members=4.")
        self.num_members = num_members

    @abstractmethod
    def forward(self, x: Tensor) -> Tensor:
        """Member outputs ``(M, B, ...)`` for a batch ``(B, ...)``."""

    @abstractmethod
    def member(self, index: int) -> nn.Module:
        """A standalone ``nn.Module`` computing member ``index`` alone (a copy, safe to export)."""

    @staticmethod
    def build_backbone(backbone: nn.Module | str, backbone_kwargs: dict[str, Any] | None = None) -> nn.Module:
        """The backbone module: ``backbone`` itself, or built from a name with ``backbone_kwargs``.

        See :func:`~lightning_ensembles.backbones.resolve_backbone` for the names allowed.
        """
        return resolve_backbone(backbone, backbone_kwargs)

    def stacked_parameters(self) -> dict[str, Tensor]:
        """The member-specific parameters, member axis first: ``{name: (M, ...)}`` (views that keep gradients).

        Weight-space losses (:class:`~lightning_ensembles.losses.repulsion.WeightSpaceRepulsion`) read the
        members' weights here. Empty by default: ensembles whose members share every weight (MC dropout,
        masksembles, TTA) have none. Ensembles storing per-member tensors override it.
        """
        return {}

    def member_parameter_axes(self) -> dict[str, int]:
        """Own (per-member) parameters: name in ``named_parameters()`` -> the axis holding the M member blocks.

        The post-conversion checks (:mod:`~lightning_ensembles.ensembles.verify`) perturb and differentiate
        these blocks. Empty by default (members that share every parameter).
        """
        return {}

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
        check_choice("task", task, ("classification", "gaussian", "regression"))
        if task == "classification":
            return aggregate_probs(outputs)
        if task == "gaussian":
            return aggregate_gaussian(*split_gaussian(outputs))
        return aggregate_gaussian(outputs)
