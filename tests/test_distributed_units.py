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
    # Stacked buffers (BatchNorm statistics) are sliced too, and the slice owns its tensors.
    assert part.stacked_buffers()["1.running_mean"].shape == (2, 7)
    with torch.no_grad():
        part.stacked_parameters()["0.weight"].add_(1.0)
    assert not torch.equal(part.stacked_parameters()["0.weight"], ens.stacked_parameters()["0.weight"][1:3])


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


def test_optimizer_state_is_sliced_on_load_without_touching_the_checkpoint():
    def model():
        return EnsembleClassifier(backbone="mlp", num_members=4, backbone_kwargs={"in_features": 4, "out_features": 2})

    full = model()
    opt = torch.optim.Adam(full.parameters())
    full(torch.randn(3, 4)).sum().backward()
    opt.step()
    checkpoint = {"optimizer_states": [opt.state_dict()]}
    want = opt.state_dict()["state"][0]["exp_avg"].clone()

    local = model()
    strategy = MemberParallelStrategy(parallel_devices=[torch.device("cpu")])
    strategy._shards = shard_deep_ensembles(local, rank=1, world_size=2)
    local_opt = torch.optim.Adam(local.parameters())
    strategy.optimizers = [local_opt]
    strategy.load_optimizer_state_dict(checkpoint)
    torch.testing.assert_close(local_opt.state_dict()["state"][0]["exp_avg"], want[2:4])  # rank 1: members 2, 3
    assert checkpoint["optimizer_states"][0]["state"][0]["exp_avg"].shape[0] == 4  # checkpoint left intact
    assert opt.state_dict()["state"][0]["exp_avg"].shape[0] == 4  # and so is the source optimiser


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
