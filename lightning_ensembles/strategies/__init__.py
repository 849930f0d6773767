"""Distributed training helpers: member-parallel deep ensembles and FSDP2 sharding of ensembles."""

from .fsdp import fully_shard_ensembles
from .member_parallel import MemberParallelStrategy, shard_deep_ensembles
from .member_shard import MemberShard, gather_members, slice_members

__all__ = [
    "MemberParallelStrategy",
    "MemberShard",
    "fully_shard_ensembles",
    "gather_members",
    "shard_deep_ensembles",
    "slice_members",
]
