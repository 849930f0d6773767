"""Single-process checks of the member-parallel building blocks (the multi-process runs are in test_distributed.py)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_ensembles import DeepEnsemble, EnsembleClassifier
from lightning_ensembles.strategies import (
    MemberParallelStrategy,
    MemberShard,
    shard_deep_ensembles,
    slice_members,
)


def _ens(m: int = 4) -> DeepEnsemble:
    return DeepEnsemble(nn.Sequential(nn.Linear(5, 7), nn.BatchNorm1d(7), nn.ReLU(), nn.Linear(7, 3)), num_members=m)


def test_slice_members_matches_full_ensemble_rows():
    ens = _ens().eval()
    x = torch.randn(6, 5)
    part = slice_members(ens, 1, 3).eval()
    assert part.num_members == 2
    torch.testing.assert_close(part(x), ens(x)[1:3])
    # Buffers (BatchNorm statistics) are sliced too, and the slice owns its tensors.
    assert part.stacked_buffers()["1.running_mean"].shape == (2, 7)
    for name, t in ens.stacked_buffers().items():
        torch.testing.assert_close(part.stacked_buffers()[name], t[1:3])
    before = {k: v.clone() for k, v in {**ens.stacked_parameters(), **ens.stacked_buffers()}.items()}
    with torch.no_grad():
        part.members[0][0].weight.add_(1.0)
        part.members[1][1].running_mean.add_(1.0)
    for k, v in {**ens.stacked_parameters(), **ens.stacked_buffers()}.items():
        assert torch.equal(v, before[k]), k  # the full ensemble is unchanged
    torch.testing.assert_close(part.stacked_parameters()["0.weight"][0], before["0.weight"][1] + 1)
    own = {id(t) for t in [*part.parameters(), *part.buffers()]}
    assert not own & {id(t) for t in [*ens.parameters(), *ens.buffers()]}


def test_member_shard_offsets_and_members():
    ens = _ens()
    shard = MemberShard(ens, rank=1, world_size=2)
    assert shard.num_members == 4 and shard.offset == 2 and shard.local.num_members == 2
    x = torch.randn(3, 5)
    torch.testing.assert_close(shard.member(3).eval()(x), ens.member(3).eval()(x))
    with pytest.raises(ValueError, match="lives on rank 0"):
        shard.member(0)
    # Without a process group (world size 1) the shard is the local ensemble.
    single = MemberShard(ens, rank=0, world_size=1)
    torch.testing.assert_close(single.eval()(x), ens.eval()(x))


def test_member_shard_requires_divisible_members():
    with pytest.raises(ValueError, match="num_members divisible"):
        MemberShard(_ens(3), rank=0, world_size=2)
    with pytest.raises(ValueError, match="DeepEnsemble"):
        MemberShard(nn.Linear(2, 2), rank=0, world_size=2)  # type: ignore[arg-type]


def test_shard_deep_ensembles_replaces_and_refuses_stray_parameters():
    model = EnsembleClassifier(backbone="mlp", num_members=4, backbone_kwargs={"in_features": 4, "out_features": 2})
    shards = shard_deep_ensembles(model, rank=0, world_size=2)
    assert list(shards) == ["ensemble"] and isinstance(model.ensemble, MemberShard)
    n_local = sum(p.numel() for p in model.parameters())
    n_full = sum(p.numel() for p in model.ensemble.local.parameters())
    assert n_local == n_full  # only this rank's members are trainable parameters here

    class WithHead(nn.Module):
        def __init__(self):
            super().__init__()
            self.ensemble = _ens()
            self.head = nn.Linear(3, 3)

    with pytest.raises(ValueError, match="head.weight"):
        shard_deep_ensembles(WithHead(), rank=0, world_size=2)
    with pytest.raises(ValueError, match="no DeepEnsemble"):
        shard_deep_ensembles(nn.Linear(2, 2), rank=0, world_size=2)


def test_strategy_is_registered_by_name():
    import lightning as L

    trainer = L.Trainer(strategy="member_parallel", accelerator="cpu", devices=2, logger=False)
    assert isinstance(trainer.strategy, MemberParallelStrategy)


def _classifier() -> EnsembleClassifier:
    torch.manual_seed(0)
    return EnsembleClassifier(backbone="mlp", num_members=4, backbone_kwargs={"in_features": 4, "out_features": 2})


def _stepped_adam(model: nn.Module, params=None) -> torch.optim.Adam:
    opt = torch.optim.Adam(model.parameters() if params is None else params)
    model(torch.randn(3, 4)).sum().backward()
    opt.step()
    return opt


def _local(rank: int, world_size: int = 2) -> tuple[EnsembleClassifier, MemberParallelStrategy]:
    model = _classifier()
    strategy = MemberParallelStrategy(parallel_devices=[torch.device("cpu")])
    strategy._shards = strategy._optimizer_shards = shard_deep_ensembles(model, rank=rank, world_size=world_size)
    return model, strategy


def test_optimizer_state_is_sliced_on_load_without_touching_the_checkpoint():
    full = _classifier()
    opt = _stepped_adam(full)
    n_member = len(list(full.ensemble.members[0].parameters()))  # P parameters per member
    saved = opt.state_dict()
    assert len(saved["state"]) == 4 * n_member  # one-process order: members 0..3, P parameters each
    checkpoint = {"optimizer_states": [saved]}
    want = {i: {k: v.clone() for k, v in s.items()} for i, s in saved["state"].items()}

    local, strategy = _local(rank=1)
    local_opt = torch.optim.Adam(local.parameters())
    strategy.optimizers = [local_opt]
    strategy.load_optimizer_state_dict(checkpoint)
    got = local_opt.state_dict()["state"]
    assert len(got) == 2 * n_member
    for i in range(2 * n_member):  # rank 1 holds members 2 and 3: entries 2P .. 4P - 1 of the full state
        for k, v in want[2 * n_member + i].items():
            torch.testing.assert_close(got[i][k], v)
    # The local state owns its tensors: stepping it leaves the checkpoint (and the source optimiser) alone.
    local(torch.randn(3, 4)).sum().backward()
    local_opt.step()
    assert len(checkpoint["optimizer_states"][0]["state"]) == 4 * n_member  # checkpoint left intact
    for i, s in want.items():
        for k, v in s.items():
            assert torch.equal(checkpoint["optimizer_states"][0]["state"][i][k], v)
            assert torch.equal(opt.state_dict()["state"][i][k], v)


def test_optimizer_state_rejects_a_checkpoint_of_another_ensemble_size():
    other = EnsembleClassifier(backbone="mlp", num_members=2, backbone_kwargs={"in_features": 4, "out_features": 2})
    checkpoint = {"optimizer_states": [_stepped_adam(other).state_dict()]}
    local, strategy = _local(rank=0)
    strategy.optimizers = [torch.optim.Adam(local.parameters())]
    with pytest.raises(ValueError, match="different model or ensemble size"):
        strategy.load_optimizer_state_dict(checkpoint)


class _FakeDist:
    """What ``member_parallel`` needs of ``torch.distributed`` for 2 ranks simulated one after the other:
    ``all_gather_object`` hands back the payloads recorded from both ranks in an earlier pass."""

    def __init__(self, rank: int, payloads: list) -> None:
        self.rank, self.payloads = rank, payloads

    def get_world_size(self, group=None) -> int:
        return 2

    def get_rank(self, group=None) -> int:
        return self.rank

    def all_gather_object(self, out: list, obj) -> None:
        self.payloads[self.rank] = obj
        out[:] = [p if p is not None else obj for p in self.payloads]


@pytest.mark.parametrize("groups", ["parameters", "two_groups", "weights_then_biases"])
def test_optimizer_state_of_two_ranks_combines_into_the_one_process_state(monkeypatch, groups):
    """Saving (each rank's state gathered) gives exactly the state of an optimiser over the unsharded
    module, also with two parameter groups, or one group listing all weights and then all biases."""
    import lightning_ensembles.strategies.member_parallel as mp

    def param_groups(model):
        if groups == "parameters":
            return model.parameters()
        named = list(model.named_parameters())
        weights = [p for n, p in named if n.endswith("weight")]
        biases = [p for n, p in named if not n.endswith("weight")]
        if groups == "weights_then_biases":
            return weights + biases
        return [{"params": weights, "lr": 1e-3}, {"params": biases, "lr": 1e-2}]

    full = _classifier()
    full_opt = _stepped_adam(full, param_groups(full))
    want = full_opt.state_dict()
    full_params = dict(full.named_parameters())
    ranks = [_local(rank) for rank in (0, 1)]
    for rank, (model, strategy) in enumerate(ranks):  # each rank loads its part of the one-process state
        opt = torch.optim.Adam(param_groups(model))
        strategy.optimizers = [opt]
        strategy.load_optimizer_state_dict({"optimizer_states": [want]})
        for name, p in model.named_parameters():  # every parameter got its own member's state
            j, rest = name.removeprefix("ensemble.local.members.").split(".", 1)
            for k, v in full_opt.state[full_params[f"ensemble.members.{2 * rank + int(j)}.{rest}"]].items():
                assert torch.equal(opt.state[p][k], v), (name, k)
        monkeypatch.setattr(type(strategy), "_distributed", property(lambda self: True))
    payloads: list = [None, None]
    for rank, (_, strategy) in enumerate(ranks):  # first pass: record what every rank sends
        monkeypatch.setattr(mp, "dist", _FakeDist(rank, payloads))
        strategy.optimizer_state(strategy.optimizers[0])
    for rank, (_, strategy) in enumerate(ranks):
        monkeypatch.setattr(mp, "dist", _FakeDist(rank, payloads))
        got = strategy.optimizer_state(strategy.optimizers[0])
        assert [g["params"] for g in got["param_groups"]] == [g["params"] for g in want["param_groups"]]
        assert [g["lr"] for g in got["param_groups"]] == [g["lr"] for g in want["param_groups"]]
        assert got["state"].keys() == want["state"].keys()
        for i, s in want["state"].items():
            assert got["state"][i].keys() == s.keys()
            for k, v in s.items():
                assert torch.equal(got["state"][i][k], v), (rank, i, k)


def test_model_state_dict_keys_are_those_of_the_unsharded_module():
    from lightning_ensembles.strategies.member_parallel import (
        _full_state_dict,
        _local_state_dict,
    )

    full = _classifier()
    full(torch.randn(3, 4))
    want = full.state_dict()
    merged: dict = {}
    for rank in (0, 1):
        local, strategy = _local(rank)
        assert any(".local.members." in k for k in local.state_dict())
        # Loading the full state gives each rank its own members, strictly (every key accounted for).
        local.load_state_dict(_local_state_dict(want, strategy._shards), strict=True)
        for j, member in enumerate(local.ensemble.local.members):
            for n, t in member.state_dict().items():
                assert torch.equal(t, want[f"ensemble.members.{2 * rank + j}.{n}"])
        # Saving (single process: no gather) renames the local members to their global indices.
        merged.update(_full_state_dict(local.state_dict(), strategy._shards, distributed=False))
    assert sorted(merged) == sorted(want)
    for k, v in want.items():
        assert torch.equal(merged[k], v), k
    # A checkpoint with more members than this ensemble fails strict loading as it would in one process.
    bigger = EnsembleClassifier(backbone="mlp", num_members=6, backbone_kwargs={"in_features": 4, "out_features": 2})
    local, strategy = _local(rank=0)
    with pytest.raises(RuntimeError, match="members.5"):
        local.load_state_dict(_local_state_dict(bigger.state_dict(), strategy._shards), strict=True)


def test_training_data_replicated_evaluation_data_split():
    from types import SimpleNamespace

    from lightning.fabric.plugins.environments import LightningEnvironment
    from lightning.pytorch.trainer.states import RunningStage

    strategy = MemberParallelStrategy(
        parallel_devices=[torch.device("cpu")] * 2, cluster_environment=LightningEnvironment()
    )
    state = SimpleNamespace(stage=RunningStage.TRAINING)
    strategy._lightning_module = SimpleNamespace(_trainer=SimpleNamespace(state=state))
    assert strategy.distributed_sampler_kwargs == {"num_replicas": 1, "rank": 0}  # every rank: all batches
    for stage in (RunningStage.VALIDATING, RunningStage.SANITY_CHECKING, RunningStage.TESTING):
        state.stage = stage
        assert strategy.distributed_sampler_kwargs["num_replicas"] == 2  # split as under DDP
