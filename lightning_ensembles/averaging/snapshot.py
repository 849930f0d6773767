"""Snapshot Ensembles (Huang et al., 2017): a cyclic cosine learning rate and one member per cycle."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal, cast

import torch
from torch import Tensor, nn

from ..ensembles.base import Ensemble
from ..ensembles.deep import DeepEnsemble, stack_member_keys

__all__ = ["cyclic_cosine_lr", "snapshot_ensemble"]


def cyclic_cosine_lr(step: int, steps_per_cycle: int, lr_max: float, lr_min: float = 0.0) -> float:
    """Learning rate of optimiser step ``step`` (0-based): a cosine from ``lr_max`` to ``lr_min`` every cycle.

    Huang et al.'s ``lr0 / 2 * (cos(pi * mod(t - 1, ceil(T / M)) / ceil(T / M)) + 1)`` with 1-based
    ``t``, generalised to a floor ``lr_min``.

    Example:
        >>> [round(cyclic_cosine_lr(s, 4, 1.0), 3) for s in range(6)]
        [1.0, 0.854, 0.5, 0.146, 1.0, 0.854]
    """
    if steps_per_cycle < 1:
        raise ValueError(f"`steps_per_cycle` must be >= 1, got {steps_per_cycle}.")
    phase = (step % steps_per_cycle) / steps_per_cycle
    return lr_min + 0.5 * (lr_max - lr_min) * (1.0 + math.cos(math.pi * phase))


@torch.no_grad()
def snapshot_ensemble(template: nn.Module, snapshots: Sequence[dict[str, Tensor]]) -> DeepEnsemble:
    """A :class:`~lightning_ensembles.DeepEnsemble` whose members are the given snapshots of ``template``.

    Snapshots of a DeepEnsemble (M members each) give ``len(snapshots) * M`` members, snapshot-major.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> net = nn.Linear(2, 1)
        >>> snaps = [{"weight": torch.full((1, 2), float(k)), "bias": torch.zeros(1)} for k in range(3)]
        >>> snapshot_ensemble(net, snaps)(torch.ones(1, 2)).flatten().tolist()
        [0.0, 2.0, 4.0]
    """
    if not snapshots:
        raise ValueError("no snapshots yet: a snapshot is taken at the end of every learning-rate cycle.")
    if isinstance(template, DeepEnsemble):
        ens = DeepEnsemble(
            template.member(0),
            num_members=len(snapshots) * template.num_members,
            init="copy",
            execution=template.execution,
            storage=cast(Literal["auto", "stacked", "per_member"], template.storage),
        )
        stacked = [stack_member_keys(s) for s in snapshots]  # snapshots of per-member storage
        ens.load_state_dict({k: torch.cat([s[k] for s in stacked]) for k in stacked[0]})
        return ens
    if isinstance(template, Ensemble):
        raise ValueError(
            f"snapshot ensembles of a {type(template).__name__} are not supported; snapshot a plain model or a "
            "DeepEnsemble (e.g. EnsembleClassifier(num_members=1))."
        )
    ens = DeepEnsemble(template, num_members=len(snapshots), init="copy")
    import copy

    member = copy.deepcopy(template)
    for i, state in enumerate(snapshots):
        member.load_state_dict(state)
        ens.load_member(i, member)
    return ens
