"""Member-parallel training: each process trains its own members of a DeepEnsemble, no gradient sync."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.strategies import DDPStrategy, StrategyRegistry
from lightning.pytorch.trainer.states import RunningStage
from torch import Tensor, nn

from ..ensembles.base import Ensemble
from ..ensembles.deep import DeepEnsemble
from .member_shard import MemberShard

__all__ = ["MemberParallelStrategy"]


class MemberParallelStrategy(DDPStrategy):
    """Train a DeepEnsemble of ``M`` members on ``W`` processes, ``M / W`` members each, without DDP.

    Members of a deep ensemble never exchange gradients, so this strategy does not wrap the model
    in ``DistributedDataParallel``: at the start of ``fit`` every :class:`~lightning_ensembles.DeepEnsemble`
    in the LightningModule is replaced by a :class:`~lightning_ensembles.strategies.MemberShard`
    holding members ``[r * M/W, (r + 1) * M/W)`` on rank ``r``, the optimiser is built over those
    members only, and no gradient is ever all-reduced. Everything else is Lightning's DDP machinery
    (launcher, process group, ``self.log(sync_dist=True)``, barriers).

    - **Initialisation**: build the module after ``L.seed_everything(seed)`` as for one process; every
      rank builds the same full ensemble and keeps its slice, so members are exactly those of the
      single-process run with that seed.
    - **Training data**: every rank sees the *same, full* batches (the sampler Lightning injects has
      ``num_replicas=1``: a seeded ``DistributedSampler``, identical on all ranks), as every member of a
      single-process deep ensemble does. A run whose train loader already uses
      ``DistributedSampler(num_replicas=1, rank=0, seed=s)`` reproduces a single-process run with the
      same loader (tested to 1e-5 for deterministic backbones; with dropout each rank draws its own
      masks, so results agree in distribution only).
    - **Forward**: member outputs of other ranks are gathered (``all_gather`` along the member axis),
      so losses, ``train/loss``, diversity terms computed from outputs, and all metrics see
      ``(M, B, ...)``. Other ranks' outputs arrive detached: gradients reach only local members.
    - **Validation/test during fit**: evaluation data are split across ranks as under DDP; inputs are
      gathered, local members run on all of them, and each rank keeps its own rows, so torchmetrics
      synchronisation counts every sample once and metrics equal the single-process values.
    - **Checkpoints** always hold the *full* ensemble (parameters and optimiser state gathered), with
      the same keys and optimiser parameter indices as a single-process run, so they load anywhere
      (one process, or any number of processes dividing ``M``). The optimiser state is mapped on the
      assumption that every parameter group lists an ensemble's parameters member by member in
      ``named_parameters()`` order, as ``self.parameters()`` or a filter over ``named_parameters()``
      does (a group may list all weights, then all biases). At the end of ``fit`` the full
      ensemble is gathered back into the module on every rank, so ``trainer.test`` / ``predict``
      afterwards run as plain DDP evaluation.

    Every trainable parameter must belong to a DeepEnsemble (otherwise it would silently diverge
    between ranks without DDP's gradient averaging), and ``M`` must be divisible by ``W``; both raise a
    ``ValueError`` naming the fix. Registered as ``strategy="member_parallel"``.

    Example:
        >>> import lightning as L
        >>> from lightning_ensembles.strategies import MemberParallelStrategy
        >>> trainer = L.Trainer(accelerator="cpu", devices=2, strategy=MemberParallelStrategy(),
        ...                     logger=False)  # doctest: +SKIP
        >>> isinstance(MemberParallelStrategy(), L.pytorch.strategies.DDPStrategy)
        True
    """

    strategy_name = "member_parallel"

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._shards: dict[str, MemberShard] = {}
        # The shards the optimisers were built over; kept after ``fit`` gathers the members back, since the
        # optimisers still hold only this rank's members then (``trainer.save_checkpoint`` after ``fit``).
        self._optimizer_shards: dict[str, MemberShard] = {}

    # ------------------------------------------------------------------ data
    @property
    def distributed_sampler_kwargs(self) -> dict[str, Any]:
        # Training: every rank sees the full data (one "replica"); evaluation: split as under DDP.
        trainer = getattr(self.lightning_module, "_trainer", None) if self.lightning_module is not None else None
        if trainer is not None and trainer.state.stage in (RunningStage.TRAINING, RunningStage.PREDICTING):
            return {"num_replicas": 1, "rank": 0}
        return super().distributed_sampler_kwargs

    # ------------------------------------------------------------------ model set-up
    def configure_ddp(self) -> None:
        """Shard the DeepEnsembles instead of wrapping the model in DistributedDataParallel."""
        module = self.lightning_module
        assert isinstance(module, L.LightningModule)
        self._shards = self._optimizer_shards = shard_deep_ensembles(module, self.global_rank, self.world_size)
        if self.global_rank:
            # Stochastic layers (dropout) of different ranks' members must not draw identical masks;
            # the training order comes from the seeded sampler, not from this generator.
            torch.manual_seed(torch.initial_seed() + 7919 * self.global_rank)

    def on_train_end(self) -> None:
        """Gather every rank's trained members back into full DeepEnsembles (on every rank)."""
        if self._shards:
            for path, shard in self._shards.items():
                _set_submodule(self.lightning_module, path, shard.gather())
            self._shards = {}
        super().on_train_end()

    def _set_mode(self, mode: str) -> None:
        for shard in self._shards.values():
            shard.mode = mode

    # Evaluation loops read split data ("sharded"); everything else, including callbacks that run the
    # model on the (replicated) training data such as the BatchNorm update after weight averaging,
    # sees the same batches on every rank ("replicated").
    def on_validation_start(self) -> None:
        self._set_mode("sharded")
        super().on_validation_start()

    def on_validation_end(self) -> None:
        self._set_mode("replicated")
        super().on_validation_end()

    def on_test_start(self) -> None:
        self._set_mode("sharded")
        super().on_test_start()

    def on_test_end(self) -> None:
        self._set_mode("replicated")
        super().on_test_end()

    # ------------------------------------------------------------------ checkpoints hold the full ensemble
    def lightning_module_state_dict(self) -> dict[str, Any]:
        """The state dict of the *unsharded* module (collective: every rank calls it when saving).

        Rank ``r``'s ``<path>.local.members.<j>.<rest>`` becomes ``<path>.members.<r * M/W + j>.<rest>``,
        gathered from every rank, in the order a one-process module lists them.
        """
        state = super().lightning_module_state_dict()
        if not self._shards:
            return state
        return _full_state_dict(state, self._shards, self._distributed)

    def load_model_state_dict(self, checkpoint: Mapping[str, Any], strict: bool = True) -> None:
        """Load a full checkpoint (``<path>.members.<i>.<rest>``): each rank keeps its own members."""
        if not self._shards:
            return super().load_model_state_dict(checkpoint, strict)
        self.lightning_module.load_state_dict(_local_state_dict(checkpoint["state_dict"], self._shards), strict=strict)
        return None

    def optimizer_state(self, optimizer: Any) -> dict[str, Any]:
        """The optimiser state of the *unsharded* model (collective: every rank calls it when saving).

        Each rank's optimiser holds only its members' parameters. In every parameter group, each run
        of a sharded ensemble's parameters (listed member by member, as ``self.parameters()`` or a name
        filter over ``named_parameters()`` gives them) is replaced by the same run of every rank, in
        rank order: the indices and per-parameter state are those an optimiser over the one-process
        module's parameters would have, so the checkpoint resumes in one process and vice versa.
        """
        state = super().optimizer_state(optimizer)
        if not (self._optimizer_shards and self._distributed):
            return state
        return _full_optimizer_state(state, _optimizer_layout(optimizer, self._optimizer_shards))

    def load_optimizer_state_dict(self, checkpoint: Mapping[str, Any]) -> None:
        """Load a full optimiser state (see :meth:`optimizer_state`): each rank keeps its members' entries.

        The checkpoint is left untouched: the local state gets its own copies of the tensors.
        """
        if self._shards:
            states = [
                _local_optimizer_state(saved, _optimizer_layout(optimizer, self._shards))
                for optimizer, saved in zip(self.optimizers, checkpoint["optimizer_states"])
            ]
            checkpoint = {**checkpoint, "optimizer_states": states}
        super().load_optimizer_state_dict(checkpoint)

    @property
    def _distributed(self) -> bool:
        return self.world_size > 1 and dist.is_available() and dist.is_initialized()

    @classmethod
    def register_strategies(cls, strategy_registry: Any) -> None:  # Trainer(strategy="member_parallel")
        if cls.strategy_name not in strategy_registry:
            strategy_registry.register(
                cls.strategy_name, cls, description="each process trains its own members of a DeepEnsemble"
            )


def shard_deep_ensembles(module: nn.Module, rank: int, world_size: int) -> dict[str, MemberShard]:
    """Replace every DeepEnsemble in ``module`` by this rank's :class:`MemberShard`; return them by path."""
    found = [(n, m) for n, m in module.named_modules() if isinstance(m, DeepEnsemble)]
    if not found:
        others = [f"{n} ({type(m).__name__})" for n, m in module.named_modules() if isinstance(m, Ensemble)]
        raise ValueError(
            "MemberParallelStrategy trains DeepEnsemble members on separate processes, but the LightningModule "
            f"holds no DeepEnsemble{' (found ' + ', '.join(others) + ')' if others else ''}. Use strategy='ddp'."
        )
    inside = {id(p) for _, m in found for p in m.parameters()}
    stray = [n for n, p in module.named_parameters() if p.requires_grad and id(p) not in inside]
    if stray:
        raise ValueError(
            f"MemberParallelStrategy: trainable parameters outside any DeepEnsemble ({stray[:3]}) would diverge "
            "between processes, because this strategy never averages gradients. Put them inside the ensemble, "
            "freeze them, or use strategy='ddp'."
        )
    shards = {}
    for path, ens in found:
        shard = MemberShard(ens, rank=rank, world_size=world_size)
        _set_submodule(module, path, shard)
        shards[path] = shard
    return shards


def _set_submodule(root: nn.Module, path: str, value: nn.Module) -> None:
    *parents, leaf = path.split(".")
    owner = root.get_submodule(".".join(parents)) if parents else root
    setattr(owner, leaf, value)


def _member_key(rest: str) -> tuple[int, str] | None:
    """``"members.<i>.<tail>"`` -> ``(i, tail)``; ``None`` for any other key."""
    head, _, tail = rest.partition(".")
    index, _, tail = tail.partition(".")
    return (int(index), tail) if head == "members" and index.isdigit() and tail else None


def _shard_of_key(key: str, shards: Mapping[str, MemberShard]) -> tuple[str, str] | tuple[None, None]:
    """``(path, rest)`` when ``key`` lies under the shard (or full ensemble) at ``path``."""
    for path in shards:
        if key.startswith(f"{path}."):
            return path, key[len(path) + 1 :]
    return None, None


def _full_state_dict(state: Mapping[str, Any], shards: Mapping[str, MemberShard], distributed: bool) -> dict[str, Any]:
    """Rename (and, when ``distributed``, gather) the sharded module's ``state`` into the unsharded module's."""
    members: dict[str, tuple[str, int, str]] = {}  # local key -> (path, local member j, rest of the key)
    for key in state:
        path, rest = _shard_of_key(key, shards)
        parsed = _member_key(rest.removeprefix("local.")) if path is not None and rest.startswith("local.") else None
        if parsed is not None:
            members[key] = (path, *parsed)
    keys = list(members)  # the same keys, in the same order, on every rank
    per_rank = _all_gather_values([state[k] for k in keys]) if distributed else None
    out: dict[str, Any] = {}
    done: set[str] = set()
    for key, value in state.items():
        if key not in members:
            path, rest = _shard_of_key(key, shards)
            out[key if path is None else f"{path}.{rest.removeprefix('local.')}"] = value
            continue
        path = members[key][0]
        if path in done:
            continue
        done.add(path)  # emit the whole ensemble, member by member, at its first key
        shard = shards[path]
        block = [i for i, k in enumerate(keys) if members[k][0] == path]
        for r in range(shard.world_size) if distributed else [shard.rank]:
            for i in block:
                _, j, tail = members[keys[i]]
                value = per_rank[r][i] if per_rank is not None else state[keys[i]]
                out[f"{path}.members.{r * shard.members_per_rank + j}.{tail}"] = value
    return out


def _local_state_dict(state: Mapping[str, Any], shards: Mapping[str, MemberShard]) -> dict[str, Any]:
    """The entries of the unsharded ``state`` that this rank's sharded module holds, under its keys.

    Members of other ranks are dropped; member indices beyond the ensemble are kept under their own
    key, so that ``strict`` loading reports them as unexpected, as it would in one process.
    """
    out: dict[str, Any] = {}
    for key, value in state.items():
        path, rest = _shard_of_key(key, shards)
        if path is None:
            out[key] = value
            continue
        shard, parsed = shards[path], _member_key(rest)
        if parsed is None:
            out[f"{path}.local.{rest}"] = value
        elif parsed[0] >= shard.num_members:
            out[key] = value
        elif shard.offset <= parsed[0] < shard.offset + shard.members_per_rank:
            out[f"{path}.local.members.{parsed[0] - shard.offset}.{parsed[1]}"] = value
    return out


def _all_gather_values(values: list[Any]) -> list[list[Any]]:
    """Collective: ``out[r][i]`` is rank ``r``'s ``values[i]``; every rank passes the same structure.

    Tensors (same shape, dtype and device kind on every rank) travel as one flat tensor per dtype and
    device; anything else through ``all_gather_object``.
    """
    world = dist.get_world_size()
    out: list[list[Any]] = [[None] * len(values) for _ in range(world)]
    by_kind: dict[tuple, list[int]] = {}
    others = []
    for i, v in enumerate(values):
        if isinstance(v, Tensor):
            by_kind.setdefault((v.dtype, v.device), []).append(i)
        else:
            others.append(i)
    for idx in by_kind.values():
        flat = torch.cat([values[i].detach().reshape(-1) for i in idx])
        parts = [torch.empty_like(flat) for _ in range(world)]
        dist.all_gather(parts, flat)
        sizes = [values[i].numel() for i in idx]
        for r, part in enumerate(parts):
            for i, piece in zip(idx, part.split(sizes)):
                out[r][i] = piece.view(values[i].shape).clone()
    if others:
        objects: list[Any] = [None] * world
        dist.all_gather_object(objects, [values[i] for i in others])
        for r, theirs in enumerate(objects):
            for i, v in zip(others, theirs):
                out[r][i] = v
    return out


# An optimiser's layout: per parameter group, a list of segments, each ``("param", [index])`` (a
# parameter outside any shard: the same on every rank) or ``("run", [indices], shard)`` (consecutive
# parameters of one shard's members, member by member in ``named_parameters`` order). Indices are
# those of the optimiser's ``state_dict()``.
_Segment = tuple[str, list[int], "MemberShard | None"]


def _optimizer_layout(optimizer: Any, shards: Mapping[str, MemberShard]) -> list[list[_Segment]]:
    """The segments of each parameter group of this rank's ``optimizer`` (see ``_Segment``)."""
    where: dict[int, tuple[MemberShard, tuple[int, int]]] = {}
    for shard in shards.values():
        for j, member in enumerate(shard.local.members):
            for q, p in enumerate(member.parameters()):
                where[id(p)] = (shard, (j, q))
    opt = getattr(optimizer, "_optimizer", optimizer)  # LightningOptimizer
    layout, index = [], 0
    for group in opt.param_groups:
        segments: list[_Segment] = []
        last: tuple[MemberShard, tuple[int, int]] | None = None
        for p in group["params"]:
            found = where.get(id(p))
            if found is None:
                segments.append(("param", [index], None))
            elif last is not None and segments[-1][0] == "run" and last[0] is found[0] and found[1] > last[1]:
                segments[-1][1].append(index)  # the run goes on: same shard, later member or parameter
            else:
                segments.append(("run", [index], found[0]))
            last = found
            index += 1
        layout.append(segments)
    return layout


def _full_optimizer_state(state: Mapping[str, Any], layout: list[list[_Segment]]) -> dict[str, Any]:
    """Collective: the unsharded optimiser state from every rank's ``state`` (laid out as ``layout``)."""
    own = state["state"]
    # Every rank sends the per-parameter state of its runs (tensors on the CPU).
    runs = [[own.get(i) for i in indices] for segments in layout for kind, indices, _ in segments if kind == "run"]
    payload = [[_map_tensors(s, lambda t: t.detach().cpu()) if s is not None else None for s in run] for run in runs]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, payload)
    rank = dist.get_rank()
    if any(len(g) != len(runs) or [len(r) for r in g] != [len(r) for r in runs] for g in gathered):
        raise RuntimeError(
            "MemberParallelStrategy: the optimisers of the ranks hold different parameter layouts, so their "
            "states cannot be combined into the one-process optimiser state. Build the optimiser the same way "
            "on every rank."
        )
    full_state: dict[int, Any] = {}
    full_groups = []
    run_index, n = 0, 0
    for group, segments in zip(state["param_groups"], layout):
        params = []
        for kind, indices, _ in segments:
            if kind == "param":
                entries = [own.get(indices[0])]
            else:
                entries = []
                for r, theirs in enumerate(gathered):
                    if r == rank:
                        entries += runs[run_index]
                    else:  # each tensor back on the device of this rank's tensor in the same place
                        entries += [_like(s, mine) for s, mine in zip(theirs[run_index], runs[run_index])]
                run_index += 1
            for entry in entries:
                if entry is not None:
                    full_state[n] = entry
                params.append(n)
                n += 1
        full_groups.append({**group, "params": params})
    return {**state, "state": full_state, "param_groups": full_groups}


def _local_optimizer_state(saved: Mapping[str, Any], layout: list[list[_Segment]]) -> dict[str, Any]:
    """The part of an unsharded optimiser state ``saved`` for this rank's optimiser (laid out as ``layout``)."""
    if len(saved["param_groups"]) != len(layout):
        raise ValueError(
            f"the checkpoint's optimiser has {len(saved['param_groups'])} parameter groups, this one {len(layout)}."
        )
    state: dict[int, Any] = {}
    groups = []
    n = 0
    for g, (group, segments) in enumerate(zip(saved["param_groups"], layout)):
        ids = list(group["params"])
        want = sum(len(indices) * (shard.world_size if shard is not None else 1) for _, indices, shard in segments)
        if len(ids) != want:
            raise ValueError(
                f"parameter group {g} of the checkpoint's optimiser has {len(ids)} parameters; the unsharded model's "
                f"optimiser would have {want}. Was the checkpoint written for a different model or ensemble size?"
            )
        params, pos = [], 0
        for _, indices, shard in segments:
            if shard is None:
                picked = ids[pos : pos + 1]
                pos += 1
            else:
                size, rank = len(indices), shard.rank
                picked = ids[pos + rank * size : pos + (rank + 1) * size]
                pos += size * shard.world_size
            for i in picked:
                if i in saved["state"]:  # copies: stepping the optimiser must not change the checkpoint
                    state[n] = _map_tensors(saved["state"][i], lambda t: t.clone())
                params.append(n)
                n += 1
        groups.append({**group, "params": params})
    return {**saved, "state": state, "param_groups": groups}


def _map_tensors(entry: Mapping[str, Any], fn) -> dict[str, Any]:
    return {k: fn(v) if isinstance(v, Tensor) else v for k, v in entry.items()}


def _like(entry: Mapping[str, Any] | None, mine: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """``entry`` with each tensor moved to the device of ``mine``'s tensor under the same key."""
    if entry is None or mine is None:
        return entry
    return {
        k: v.to(mine[k].device) if isinstance(v, Tensor) and isinstance(mine.get(k), Tensor) else v
        for k, v in entry.items()
    }


MemberParallelStrategy.register_strategies(StrategyRegistry)
