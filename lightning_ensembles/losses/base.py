"""The regulariser interface: extra training terms computed from member outputs."""

from __future__ import annotations

from torch import Tensor, nn

__all__ = ["Regularizer"]


class Regularizer(nn.Module):
    """A term added to the member-averaged training loss: ``loss += weight * value``.

    Subclasses implement :meth:`forward` and return the *unweighted* scalar ``value``;
    ``EnsembleClassifier`` / ``EnsembleRegressor`` multiply by ``weight`` and log the value as
    ``train/<name>``. ``inputs`` and ``ensemble`` are passed for terms that need them (input
    gradients, weight-space repulsion).

    Example:
        >>> import torch
        >>> class MeanLogit(Regularizer):
        ...     def forward(self, outputs, target, inputs=None, ensemble=None):
        ...         return outputs.mean()
        >>> MeanLogit(weight=0.1)(torch.ones(2, 3, 4), torch.zeros(3)).item()
        1.0
    """

    def __init__(self, weight: float = 0.0, name: str | None = None) -> None:
        super().__init__()
        self.weight = float(weight)
        self.name = name or type(self).__name__.lower()

    def forward(self, outputs: Tensor, target: Tensor, inputs: Tensor | None = None, ensemble: nn.Module | None = None) -> Tensor:  # pragma: no cover
        raise NotImplementedError
