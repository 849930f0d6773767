"""Running weight averages over a model's named tensors (the state every averaging method shares)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ._named import tracked_tensors

__all__ = ["WeightAverager"]


class WeightAverager:
    """Base class: a running average of a model's tensors, kept as plain tensors by name.

    Subclasses define :meth:`_combine` (how a new weight set enters the average). The average holds
    only tensors, never a copy of the model, so it is cheap to checkpoint (:meth:`state_dict`) and
    works for any ``nn.Module``; for a :class:`~lightning_ensembles.DeepEnsemble` whose members are
    stacked along dim 0, elementwise averaging of the stacked tensors is exactly per-member averaging.

    Args:
        average_buffers: also average floating-point persistent buffers (BatchNorm running
            statistics); otherwise evaluation keeps the model's buffers (or recomputes them).
    """

    def __init__(self, average_buffers: bool = False) -> None:
        self.average_buffers = average_buffers
        self.n_averaged = 0
        self.average: dict[str, Tensor] = {}

    # ------------------------------------------------------------------ updates
    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        """Add ``module``'s current tensors to the average."""
        current = {n: t.detach() for n, t in tracked_tensors(module, self.average_buffers).items()}
        if self.n_averaged == 0:
            self.average = {n: t.clone() for n, t in current.items()}
            self._first(current)
        else:
            if set(current) != set(self.average):
                missing = sorted(set(self.average) ^ set(current))[:5]
                raise ValueError(f"the model's tensors changed since averaging began (differing names: {missing}).")
            names = list(self.average)
            self._combine([self.average[n] for n in names], [current[n].to(self.average[n].device) for n in names])
            self._after(current)
        self.n_averaged += 1

    def _first(self, current: dict[str, Tensor]) -> None:
        """Hook run on the first update (after the average is initialised to ``current``)."""

    def _after(self, current: dict[str, Tensor]) -> None:
        """Hook run after every later update."""

    def _combine(self, averaged: list[Tensor], current: list[Tensor]) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    # ------------------------------------------------------------------ use
    @torch.no_grad()
    def copy_to(self, module: nn.Module) -> None:
        """Write the averaged tensors into ``module`` (in place)."""
        if self.n_averaged == 0:
            raise ValueError("the average has never been updated; call `update(model)` at least once first.")
        targets = tracked_tensors(module, self.average_buffers)
        for n, avg in self.average.items():
            targets[n].copy_(avg)

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue averaging exactly where it stopped."""
        return {"n_averaged": self.n_averaged, "average": dict(self.average)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.n_averaged = int(state["n_averaged"])
        self.average = {n: t.clone() for n, t in state["average"].items()}

    def to(self, device: torch.device | str) -> "WeightAverager":
        """Move the stored tensors to ``device``."""
        self.average = {n: t.to(device) for n, t in self.average.items()}
        return self
