"""One rank's share of a DeepEnsemble, which gathers the other ranks' member outputs in forward."""

from __future__ import annotations

from typing import Literal

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .._checks import check_choice
from ..ensembles.base import Ensemble
from ..ensembles.deep import DeepEnsemble

__all__ = ["MemberShard", "gather_members", "slice_members"]


def _replace_stacked(ens: DeepEnsemble, fn, storage: str | None = None) -> DeepEnsemble:
    """A copy of ``ens`` whose every stacked tensor ``t`` (member axis 0) is replaced by ``fn(t)``."""
    params = {n: _keep_grad_flag(fn(p.detach()), p) for n, p in ens.stacked_parameters().items()}
    buffers = {n: fn(b.detach()) for n, b in ens.stacked_buffers().items()}
    return ens.with_members(params, buffers, storage=storage)


def _keep_grad_flag(t: Tensor, like: Tensor) -> Tensor:
    return t.requires_grad_(like.requires_grad) if t.is_floating_point() else t


def slice_members(ens: DeepEnsemble, start: int, stop: int, storage: str | None = None) -> DeepEnsemble:
    """A DeepEnsemble holding members ``[start, stop)`` of ``ens`` (copies, same order, ``storage`` default: ``ens``'s).

    Example:
        >>> import torch
        >>> from lightning_ensembles import DeepEnsemble
        >>> ens = DeepEnsemble(torch.nn.Linear(3, 2), num_members=4)
        >>> part = slice_members(ens, 2, 4)
        >>> torch.equal(part(torch.ones(1, 3)), ens(torch.ones(1, 3))[2:4])
        True
    """
    if not 0 <= start < stop <= ens.num_members:
        raise ValueError(f"member slice [{start}, {stop}) is out of range for {ens.num_members} members.")
    return _replace_stacked(ens, lambda t: t[start:stop].clone(), storage)


def _all_gather_cat(t: Tensor, group=None) -> Tensor:
    """Concatenate ``t`` from every rank along dim 0 (shapes equal on all ranks)."""
    world = dist.get_world_size(group)
    parts = [torch.empty_like(t) for _ in range(world)]
    dist.all_gather(parts, t.contiguous(), group=group)
    return torch.cat(parts, 0)


def gather_members(ens: DeepEnsemble, group=None, storage: str | None = None) -> DeepEnsemble:
    """Collective: the DeepEnsemble of every rank's members, in rank order (call on all ranks)."""
    return _replace_stacked(ens, lambda t: _all_gather_cat(t, group), storage)


class MemberShard(Ensemble):
    """Members ``[rank * M/W, (rank + 1) * M/W)`` of a DeepEnsemble of ``M`` members, on one of ``W`` ranks.

    Only the local members have parameters here; ``forward`` runs them and gathers the other ranks'
    member outputs (``all_gather`` along the member axis), so it returns ``(M, B, ...)`` exactly like
    the full ensemble, and losses, metrics and callbacks see every member. Gradients flow only into
    the local slice: the outputs of other ranks' members arrive detached, and no collective runs in
    backward, so nothing ever averages gradients between ranks.

    ``mode`` says how the ranks' batches relate (set by
    :class:`~lightning_ensembles.strategies.MemberParallelStrategy` for each stage):

    - ``"replicated"`` (training): every rank holds the *same* batch; outputs are gathered.
    - ``"sharded"`` (validation/test): every rank holds its *own* part of the data, as under DDP;
      inputs are gathered first, the local members run on all of them, and each rank keeps the
      rows of its own batch, so metric synchronisation sees each sample exactly once.

    Outside ``torch.distributed`` (world size 1) it is just the local ensemble.

    Args:
        ensemble: the full DeepEnsemble (every rank builds the same one); its members are copied.
        rank: this process's rank ``r``, in ``[0, world_size)``.
        world_size: the number of processes ``W``; must divide ``M``.
        mode: ``"replicated"`` or ``"sharded"`` (see above).

    Example:
        >>> import torch
        >>> from lightning_ensembles import DeepEnsemble
        >>> full = DeepEnsemble(torch.nn.Linear(3, 2), num_members=2)
        >>> shard = MemberShard(full, rank=0, world_size=1)
        >>> shard(torch.zeros(5, 3)).shape
        torch.Size([2, 5, 2])
    """

    def __init__(
        self,
        ensemble: DeepEnsemble,
        rank: int,
        world_size: int,
        mode: Literal["replicated", "sharded"] = "replicated",
    ) -> None:
        if not isinstance(ensemble, DeepEnsemble):
            raise ValueError(  # noqa: TRY004 - the library raises ValueError for bad arguments
                f"member-parallel training shards DeepEnsemble members; got {type(ensemble).__name__}. "
                "Train other ensembles (packed, batch, LoRA) with strategy='ddp'."
            )
        m = ensemble.num_members
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"`rank`={rank} must lie in [0, world_size={world_size}).")
        if m % world_size:
            raise ValueError(
                f"member-parallel training needs num_members divisible by the number of processes: "
                f"num_members={m}, world size={world_size}. Use num_members={max(1, m // world_size) * world_size} "
                f"or {-(-m // world_size) * world_size}, or devices={_divisors_hint(m)}."
            )
        super().__init__(m)
        self.rank, self.world_size = rank, world_size
        self.members_per_rank = m // world_size
        self.offset = rank * self.members_per_rank
        # The local members are always stacked: MemberParallelStrategy maps checkpoints and optimiser
        # state between ranks along the member axis of each parameter. The full ensemble's storage is
        # restored by `gather()`.
        self.full_storage = ensemble.storage
        self.local = slice_members(ensemble, self.offset, self.offset + self.members_per_rank, storage="stacked")
        self.mode = mode

    @property
    def distributed(self) -> bool:
        return self.world_size > 1 and dist.is_available() and dist.is_initialized()

    def forward(self, x: Tensor) -> Tensor:
        if not self.distributed:
            return self.local(x)
        if check_choice("mode", self.mode, ("replicated", "sharded")) == "sharded":
            return self._forward_sharded(x)
        local = self.local(x)
        parts = [torch.empty_like(local) for _ in range(self.world_size)]
        dist.all_gather(parts, local.detach().contiguous())
        parts[self.rank] = local  # keep the autograd graph of this rank's members
        return torch.cat(parts, 0)

    def _forward_sharded(self, x: Tensor) -> Tensor:
        # Ranks may hold batches of different sizes (the last batch): gather sizes, pad, trim.
        size = torch.tensor([x.shape[0]], device=x.device)
        sizes = [int(s) for s in _all_gather_cat(size)]
        padded = x.new_zeros((max(sizes), *x.shape[1:]))
        padded[: x.shape[0]] = x
        inputs = _all_gather_cat(padded).split(max(sizes))
        everyone = torch.cat([xi[:n] for xi, n in zip(inputs, sizes)], 0)
        local = self.local(everyone)  # (M/W, sum(sizes), ...)
        parts = [torch.empty_like(local) for _ in range(self.world_size)]
        dist.all_gather(parts, local.detach().contiguous())
        parts[self.rank] = local
        start = sum(sizes[: self.rank])
        return torch.cat(parts, 0)[:, start : start + x.shape[0]]

    def member(self, index: int) -> nn.Module:
        index = self._check_index(index)
        if not self.offset <= index < self.offset + self.members_per_rank:
            raise ValueError(
                f"member {index} lives on rank {index // self.members_per_rank}; this rank holds members "
                f"[{self.offset}, {self.offset + self.members_per_rank}). Use `gather()` for the full ensemble."
            )
        return self.local.member(index - self.offset)

    def gather(self) -> DeepEnsemble:
        """Collective (call on every rank): the full DeepEnsemble with every rank's trained members."""
        if not self.distributed:
            return slice_members(self.local, 0, self.local.num_members, storage=self.full_storage)
        return gather_members(self.local, storage=self.full_storage)

    def extra_repr(self) -> str:
        return f"num_members={self.num_members}, rank={self.rank}, local=[{self.offset}, {self.offset + self.members_per_rank})"


def _divisors_hint(m: int) -> str:
    return " or ".join(str(d) for d in range(1, m + 1) if m % d == 0)
