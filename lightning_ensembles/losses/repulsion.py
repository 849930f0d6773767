"""Repulsive deep ensembles (D'Angelo & Fortuin, NeurIPS 2021): weight- and function-space repulsion.

Wasserstein gradient descent with a kernel density estimate moves member ``i`` along
``phi_i = grad log p(w_i | D) - sum_j grad_{w_i} k(w_i, w_j) / sum_j k(w_i, w_j)``. The second term is the
gradient of ``log sum_j k(w_i, stopgrad(w_j))`` (:func:`~lightning_ensembles.losses.kernels.log_kde`), so
minimising ``CE_i + weight * log_kde_i`` by gradient descent takes exactly that step; in function
space the same term on member predictions is pulled back to the weights by autograd's
vector-Jacobian product, as in the paper's f-WGD.

Scale: ``EnsembleClassifier`` minimises ``M * (mean_i CE_i + weight * value)`` with ``value =
mean_i log_kde_i``, so member ``i`` gets ``grad CE_i + weight * grad log_kde_i``. ``CE_i`` is a batch
*mean*, i.e. ``-(1/N) log p(D | w_i)``: ``weight = 1 / N_train`` reproduces the paper's update (full-data
likelihood, no annealing) up to the learning rate; larger weights repel more. A negative weight
attracts members (kernel-density attraction).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from .._checks import check_choice, check_pairwise
from ..ensembles.base import Ensemble
from .base import Term
from .kernels import log_kde

__all__ = ["member_parameter_matrix", "WeightSpaceRepulsion", "FunctionSpaceRepulsion"]


def member_parameter_matrix(ensemble: nn.Module | None) -> Tensor:
    """Every member's own parameters flattened into rows, ``(M, P)``, keeping gradients.

    Needs an ensemble that stores member parameters with a leading member axis and says so through
    ``stacked_parameters() -> {name: (M, ...)}`` (``DeepEnsemble``, ``PackedEnsemble`` and
    ``BatchEnsemble`` do, the last two with their member-specific tensors). ``member(i)`` is no substitute: it
    returns a detached copy, so gradients would never reach the ensemble.
    """
    if not isinstance(ensemble, Ensemble):
        kind = "no ensemble" if ensemble is None else type(ensemble).__name__
        raise ValueError(
            f"weight-space repulsion needs the members' parameters as an (M, P) matrix, but got {kind}: it "
            "must have `stacked_parameters()` returning {name: tensor (M, ...)} (DeepEnsemble, PackedEnsemble and BatchEnsemble do). For other "
            "ensembles use FunctionSpaceRepulsion or InputGradientRepulsion, which only need `ensemble(x)`."
        )
    m = getattr(ensemble, "num_members", None)
    tensors = [p for p in ensemble.stacked_parameters().values() if p.requires_grad]
    if not tensors:
        raise ValueError(f"{type(ensemble).__name__}.stacked_parameters() holds no trainable tensors to repel.")
    bad = [tuple(p.shape) for p in tensors if p.dim() == 0 or (m is not None and p.shape[0] != m)]
    if bad:
        raise ValueError(
            f"{type(ensemble).__name__}.stacked_parameters() must give tensors with the member axis first "
            f"({m} members); got shapes {bad[:3]}."
        )
    return torch.cat([p.reshape(p.shape[0], -1) for p in tensors], dim=1)


def _check_bandwidth(bandwidth: float | None) -> float | None:
    if bandwidth is not None and bandwidth <= 0:
        raise ValueError(f"`bandwidth` must be > 0 or None (median heuristic), got {bandwidth}.")
    return bandwidth


class WeightSpaceRepulsion(Term):
    """Kernel-density repulsion between member weight vectors: ``mean_i log sum_j k(w_i, stopgrad(w_j))``.

    RBF kernel with the median bandwidth heuristic (or a fixed ``bandwidth``). Works for ensembles
    exposing ``stacked_parameters()`` (``DeepEnsemble``, ``PackedEnsemble``, ``BatchEnsemble``); others raise a ``ValueError`` that points to
    :class:`FunctionSpaceRepulsion`. See the module docstring for the weight that matches the paper
    (``1 / N_train``). Distances are computed in float64 (weight vectors are long and close together
    late in training, where float32 cancellation would dominate).

    Args:
        weight: multiplier of the value in the training loss (``loss += weight * value``); 0 turns the term off.
        bandwidth: RBF kernel bandwidth (``None``: the median heuristic).
        name: logged as ``train/<name>``; default ``"weight_repulsion"``.

    Example:
        >>> import torch
        >>> from lightning_ensembles import DeepEnsemble
        >>> ens = DeepEnsemble(torch.nn.Linear(3, 2), num_members=4)
        >>> value = WeightSpaceRepulsion(weight=1e-3)(ens(torch.randn(5, 3)), None, ensemble=ens)
        >>> value.backward()
        >>> ens.stacked_parameters()["weight"].grad.shape
        torch.Size([4, 2, 3])
    """

    compares_examples = False  # members' weights, not their predictions

    def __init__(
        self, weight: float = 0.0, bandwidth: float | None = None, name: str | None = "weight_repulsion"
    ) -> None:
        super().__init__(weight, name)
        self.bandwidth = _check_bandwidth(bandwidth)

    def term(self, outputs: Tensor, target: Tensor | None, inputs: Tensor | None, ensemble: nn.Module | None) -> Tensor:
        weights = member_parameter_matrix(ensemble)
        check_pairwise(weights, "WeightSpaceRepulsion", name="member parameters")
        return log_kde(weights.double(), self.bandwidth).mean().to(weights.dtype)


class FunctionSpaceRepulsion(Term):
    """Kernel-density repulsion between member predictions on the batch (f-WGD): ``mean_i log_kde(f_i)``.

    ``f_i`` is member i's output on the whole batch flattened to one vector (``space="logits"``, the
    paper's default, or ``"probs"``: softmax probabilities). Needs only ``ensemble(x)``'s outputs, so it
    works with every ensemble. Same weight scale as :class:`WeightSpaceRepulsion`.

    Args:
        weight: multiplier of the value in the training loss (``loss += weight * value``); 0 turns the term off.
        space: compare ``"logits"`` or softmax ``"probs"``.
        bandwidth: RBF kernel bandwidth (``None``: the median heuristic).
        name: logged as ``train/<name>``; default ``"function_repulsion"``.

    Example:
        >>> import torch
        >>> outputs = torch.randn(4, 8, 3, requires_grad=True)
        >>> value = FunctionSpaceRepulsion(weight=0.01)(outputs, None)
        >>> value.backward()
        >>> outputs.grad.shape
        torch.Size([4, 8, 3])
    """

    def __init__(
        self,
        weight: float = 0.0,
        space: Literal["logits", "probs"] = "logits",
        bandwidth: float | None = None,
        name: str | None = "function_repulsion",
    ) -> None:
        super().__init__(weight, name)
        check_choice("space", space, ("logits", "probs"))
        self.space = space
        self.bandwidth = _check_bandwidth(bandwidth)

    def term(self, outputs: Tensor, target: Tensor | None, inputs: Tensor | None, ensemble: nn.Module | None) -> Tensor:
        check_pairwise(outputs, "FunctionSpaceRepulsion")
        f = outputs.softmax(-1) if self.space == "probs" else outputs
        return log_kde(f.reshape(f.shape[0], -1), self.bandwidth).mean()
