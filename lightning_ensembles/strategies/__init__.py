"""Distributed training helpers: member-parallel deep ensembles and FSDP2 sharding of ensembles."""

from .member_parallel import MemberParallelStrategy, shard_deep_ensembles
from .member_shard import MemberShard, gather_members, slice_members

__all__ = ["MemberParallelStrategy", "MemberShard", "gather_members", "shard_deep_ensembles", "slice_members"]

from .fsdp import fully_shard_ensembles

__all__ += ["fully_shard_ensembles"]
