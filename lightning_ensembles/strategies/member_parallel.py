"""Member-parallel training: each process trains its own members of a DeepEnsemble, no gradient sync."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.strategies import DDPStrategy, StrategyRegistry
from lightning.pytorch.trainer.states import RunningStage
from torch import Tensor, nn

from ..ensembles.base import Ensemble
from ..ensembles.deep import DeepEnsemble, stack_member_keys
from ..ensembles.surgery import set_submodule
from .member_shard import MemberShard, _all_gather_cat

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
      the same keys as a single-process run, so they load anywhere. At the end of ``fit`` the full
      ensemble is gathered back into the module on every rank, so ``trainer.test`` / ``predict``
      afterwards run as plain DDP evaluation.

    Every trainable parameter must belong to a DeepEnsemble (otherwise it would silently diverge
    between ranks without DDP's gradient averaging), and ``M`` must be divisible by ``W``; both raise a
    ``ValueError`` naming the fix. Registered as ``strategy="member_parallel"``.

    Args:
        **kwargs: passed to Lightning's ``DDPStrategy`` (``process_group_backend``, ``timeout``, ...).

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
        self._shards = shard_deep_ensembles(module, self.global_rank, self.world_size)
        if self.global_rank:
            # Stochastic layers (dropout) of different ranks' members must not draw identical masks;
            # the training order comes from the seeded sampler, not from this generator.
            torch.manual_seed(torch.initial_seed() + 7919 * self.global_rank)

    def on_train_end(self) -> None:
        """Gather every rank's trained members back into full DeepEnsembles (on every rank)."""
        if self._shards:
            module = self.lightning_module
            assert isinstance(module, L.LightningModule)
            for path, shard in self._shards.items():
                set_submodule(module, path, shard.gather())
            self._shards = {}
        super().on_train_end()

    def _set_mode(self, mode: Literal["replicated", "sharded"]) -> None:
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
        state = super().lightning_module_state_dict()
        if not self._shards:
            return state
        out: dict[str, Any] = {}
        for key, value in state.items():
            path, rest = _split_shard_key(key, self._shards)
            if path is None:
                out[key] = value
            else:  # every DeepEnsemble tensor is stacked along the member axis
                out[f"{path}.{rest}"] = _all_gather_cat(value.detach()) if self._distributed else value
        return out

    def load_model_state_dict(self, checkpoint: Mapping[str, Any], strict: bool = True) -> None:
        if not self._shards:
            return super().load_model_state_dict(checkpoint, strict)
        state = dict(checkpoint["state_dict"])
        for path, shard in self._shards.items():
            state = stack_member_keys(state, f"{path}.")  # a checkpoint of per-member storage
            lo, hi = shard.offset, shard.offset + shard.members_per_rank
            for key in [k for k in state if k.startswith(f"{path}.")]:
                state[f"{path}.local.{key[len(path) + 1 :]}"] = state.pop(key)[lo:hi]
        module = self.lightning_module
        assert isinstance(module, L.LightningModule)
        module.load_state_dict(state, strict=strict)

    def optimizer_state(self, optimizer: Any) -> dict[str, Any]:
        state: dict[str, Any] = super().optimizer_state(optimizer)
        if not (self._shards and self._distributed):
            return state
        # ``state_dict()`` shares its per-parameter dicts with the live optimiser: build new ones.
        state = {**state, "state": {i: dict(v) for i, v in state["state"].items()}}
        for idx, param in _indexed_params(optimizer):
            if id(param) in self._sharded_param_ids:
                for k, v in state["state"].get(idx, {}).items():
                    if isinstance(v, Tensor) and v.shape == param.shape:
                        state["state"][idx][k] = _all_gather_cat(v.detach())
        return state

    def load_optimizer_state_dict(self, checkpoint: Mapping[str, Any]) -> None:
        if self._shards:
            per_rank = {id(p): s for s in self._shards.values() for p in s.parameters()}
            states = []
            for optimizer, opt_state in zip(self.optimizers, checkpoint["optimizer_states"]):
                opt_state = {**opt_state, "state": {i: dict(v) for i, v in opt_state["state"].items()}}
                states.append(opt_state)
                for idx, param in _indexed_params(optimizer):
                    shard = per_rank.get(id(param))
                    if shard is None:
                        continue
                    lo, hi = shard.offset, shard.offset + shard.members_per_rank
                    for k, v in opt_state["state"].get(idx, {}).items():
                        if (
                            isinstance(v, Tensor)
                            and v.dim()
                            and v.shape[0] == shard.num_members
                            and v.shape[1:] == param.shape[1:]
                        ):
                            opt_state["state"][idx][k] = v[lo:hi].clone()
            checkpoint = {**checkpoint, "optimizer_states": states}
        super().load_optimizer_state_dict(checkpoint)

    @property
    def _sharded_param_ids(self) -> set[int]:
        return {id(p) for s in self._shards.values() for p in s.parameters()}

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
        set_submodule(module, path, shard)
        shards[path] = shard
    return shards


def _split_shard_key(key: str, shards: Mapping[str, MemberShard]) -> tuple[str | None, str]:
    for path in shards:
        prefix = f"{path}.local."
        if key.startswith(prefix):
            return path, key[len(prefix) :]
    return None, key


def _indexed_params(optimizer: Any):
    opt = getattr(optimizer, "_optimizer", optimizer)  # LightningOptimizer
    idx = 0
    for group in opt.param_groups:
        for p in group["params"]:
            yield idx, p
            idx += 1


MemberParallelStrategy.register_strategies(StrategyRegistry)
