"""DeepEnsemble's two parameter layouts: stacked (M, ...) tensors and one tensor per member."""

from __future__ import annotations

import itertools

import pytest
import timm
import torch
from torch import nn

from lightning_ensembles import MLP, DeepEnsemble
from lightning_ensembles.averaging import SWAG, update_bn
from lightning_ensembles.averaging._named import member_groups
from lightning_ensembles.averaging.snapshot import snapshot_ensemble
from lightning_ensembles.ensembles import deep
from lightning_ensembles.ensembles.deep import stack_member_keys
from lightning_ensembles.strategies import MemberShard, slice_members


def _resnet18():
    return timm.create_model("resnet18", num_classes=10, pretrained=False)


def _bn_mlp():
    return nn.Sequential(nn.Linear(5, 7), nn.BatchNorm1d(7), nn.ReLU(), nn.Linear(7, 3))


def _pair(factory, m: int = 3):
    """The same members in both layouts."""
    stacked = DeepEnsemble(factory(), m, storage="stacked")
    per_member = DeepEnsemble(factory(), m, storage="per_member")
    per_member.load_state_dict(stacked.state_dict())
    return stacked, per_member


def test_auto_storage_rule_by_size_and_device(monkeypatch):
    monkeypatch.setattr(deep, "_accelerator_available", lambda: False)
    # ResNet-18's largest weight (512 x 512 x 3 x 3 floats, 9.4 MB) x 4 members exceeds 32 MiB; x 3 does not.
    assert 4 * 512 * 512 * 9 * 4 > deep._MMAP_CEILING > 3 * 512 * 512 * 9 * 4
    assert DeepEnsemble(_resnet18(), 4).storage == "per_member"
    assert DeepEnsemble(_resnet18(), 3).storage == "stacked"
    assert DeepEnsemble(MLP(64, 10), 8).storage == "stacked"
    monkeypatch.setattr(deep, "_accelerator_available", lambda: True)  # vmap reads stacked tensors directly
    assert DeepEnsemble(_resnet18(), 4).storage == "stacked"
    with pytest.raises(ValueError, match="storage"):
        DeepEnsemble(MLP(4, 2), 2, storage="split")


def test_per_member_parameters_and_keys_count_as_formula():
    single = MLP(6, 3, hidden=(8,))
    n_tensors = len(list(single.parameters()))
    ens = DeepEnsemble(single, 4, storage="per_member")
    assert len(list(ens.parameters())) == 4 * n_tensors
    assert sum(p.numel() for p in ens.parameters()) == 4 * sum(p.numel() for p in single.parameters())
    name = next(iter(single.state_dict())).replace(".", "-")
    assert [k for k in ens.state_dict() if k.startswith(f"params.{name}.")] == [f"params.{name}.{i}" for i in range(4)]
    assert ens.resolved_execution(torch.device("cpu")) == "loop"  # CPU: members run as separate models
    assert ens.resolved_execution(torch.device("cuda")) == "vmap"


@pytest.mark.parametrize("execution", ["vmap", "loop"])
@pytest.mark.parametrize("kind", ["mlp", "resnet18"])
def test_per_member_outputs_and_gradients_equal_stacked(kind, execution):
    torch.manual_seed(0)
    if kind == "mlp":
        stacked, per_member = _pair(_bn_mlp)
        x, y = torch.randn(6, 5), torch.randint(0, 3, (18,))
    else:
        stacked, per_member = _pair(_resnet18)
        x, y = torch.randn(4, 3, 16, 16), torch.randint(0, 10, (12,))
    per_member.execution = execution
    for ens in (stacked, per_member):
        ens.train()
        nn.functional.cross_entropy(ens(x).flatten(0, 1), y).backward()
    grads = {n: p.grad for n, p in stacked.params.named_parameters()}
    for name, per in per_member.params.named_children():
        want = grads[name]
        for i, p in enumerate(per):
            assert p.grad is not None, f"{name}[{i}] got no gradient"
            torch.testing.assert_close(p.grad, want[i], atol=1e-5, rtol=1e-4)
    first = next(iter(per_member.params.children()))  # (timm zero-initialises the last BN of each block)
    assert all(p.grad.abs().sum() > 0 for p in first)
    # BatchNorm statistics are per member and equal between layouts.
    for name, buf in per_member.stacked_buffers().items():
        torch.testing.assert_close(buf, stacked.stacked_buffers()[name])
    rm = next(b for n, b in per_member.stacked_buffers().items() if n.endswith("running_mean"))
    for i, j in itertools.combinations(range(3), 2):
        assert not torch.allclose(rm[i], rm[j])
    for ens in (stacked, per_member):
        ens.eval()
    with torch.no_grad():
        out = per_member(x)
        torch.testing.assert_close(out, stacked(x), atol=1e-5, rtol=1e-4)
        for i in range(3):
            torch.testing.assert_close(per_member.member(i).eval()(x), out[i], atol=1e-5, rtol=1e-4)


def test_training_steps_match_between_layouts():
    torch.manual_seed(0)
    stacked, per_member = _pair(_bn_mlp, 4)
    x, y = torch.randn(16, 5), torch.randint(0, 3, (64,))
    for ens in (stacked, per_member):
        opt = torch.optim.SGD(ens.parameters(), lr=0.1, momentum=0.9)  # Adam would amplify rounding at zero gradients
        for _ in range(5):
            opt.zero_grad()
            nn.functional.cross_entropy(ens(x).flatten(0, 1), y).backward()
            opt.step()
    for name, p in stacked.stacked_parameters().items():
        torch.testing.assert_close(per_member.stacked_parameters()[name], p, atol=1e-5, rtol=1e-4)


def test_state_dicts_load_across_layouts():
    stacked, per_member = _pair(_bn_mlp)
    other = DeepEnsemble(_bn_mlp(), 3, storage="stacked")
    other.load_state_dict(per_member.state_dict())  # per-member keys into stacked storage
    x = torch.randn(4, 5)
    torch.testing.assert_close(other.eval()(x), stacked.eval()(x))
    assert set(per_member.stacked_state_dict()) == set(stacked.state_dict())
    torch.testing.assert_close(
        per_member.stacked_state_dict()["params.0-weight"], stacked.state_dict()["params.0-weight"]
    )
    # Non-ensemble keys pass through; a missing member is named.
    state = {"head.w": torch.zeros(1), "e.params.w.0": torch.ones(2), "e.params.w.1": torch.zeros(2)}
    out = stack_member_keys(state, "e.")
    assert out["head.w"] is state["head.w"] and out["e.params.w"].shape == (2, 2)
    with pytest.raises(ValueError, match="members"):
        stack_member_keys({"params.w.0": torch.ones(1), "params.w.2": torch.ones(1)})
    # A state dict with the wrong number of members is refused, not silently truncated.
    with pytest.raises(RuntimeError):
        DeepEnsemble(_bn_mlp(), 2, storage="per_member").load_state_dict(stacked.state_dict())
    three = DeepEnsemble(MLP(4, 2), 3, storage="stacked")  # no buffers: only the parameters can tell
    with pytest.raises(RuntimeError, match="params"):
        DeepEnsemble(MLP(4, 2), 2, storage="per_member").load_state_dict(three.state_dict())
    with pytest.raises(RuntimeError, match="params"):
        DeepEnsemble(MLP(4, 2), 2, storage="stacked").load_state_dict(
            DeepEnsemble(MLP(4, 2), 3, storage="per_member").state_dict()
        )


def test_load_member_member_and_copies_per_member():
    ens = DeepEnsemble(_bn_mlp(), 3, storage="per_member").eval()
    single = _bn_mlp().eval()
    ens.load_member(2, single)
    x = torch.randn(4, 5)
    torch.testing.assert_close(ens(x)[2], single(x))
    copy = ens.member(2)
    with torch.no_grad():
        copy[0].weight.add_(1.0)
    torch.testing.assert_close(ens(x)[2], single(x))  # the copy owns its tensors


def test_member_shard_runs_stacked_and_gathers_back_to_per_member():
    ens = DeepEnsemble(_bn_mlp(), 4, storage="per_member").eval()
    part = slice_members(ens, 1, 3)
    assert part.storage == "per_member" and part.num_members == 2
    x = torch.randn(5, 5)
    torch.testing.assert_close(part.eval()(x), ens(x)[1:3])
    shard = MemberShard(ens, rank=1, world_size=2)
    assert shard.local.storage == "stacked"  # the strategy maps checkpoints along the member axis
    torch.testing.assert_close(shard.local.eval()(x), ens(x)[2:4])
    whole = MemberShard(ens, rank=0, world_size=1).gather()
    assert whole.storage == "per_member"
    torch.testing.assert_close(whole.eval()(x), ens(x))


def test_swag_groups_per_member_tensors_by_member():
    ens = DeepEnsemble(_bn_mlp(), 3, storage="per_member")
    groups = member_groups(nn.ModuleDict({"e": ens}))
    assert groups["e.params.0-weight.2"] == ("e[2]", False)
    assert groups["e.buffers_.1-running_mean"] == ("e", True)
    swag = SWAG(max_rank=3)
    for _ in range(4):
        with torch.no_grad():
            for p in ens.parameters():
                p.add_(0.1 * torch.randn_like(p))
        swag.update(ens)
    draw = swag.sample(1, torch.Generator().manual_seed(0))[0]
    ens.load_state_dict({**ens.state_dict(), **draw})  # a draw loads into the module it came from
    # Each member has its own low-rank coefficients: with the diagonal part switched off, a draw's
    # offset from the mean lies in the span of that member's own deviations only.
    swag.var_clamp, swag.sq_mean = 0.0, {n: m.square() for n, m in swag.average.items()}
    draws = swag.sample(2, torch.Generator().manual_seed(1))
    for draw in draws:
        for name, mean in swag.average.items():
            devs = swag.deviations[name][: swag.rank].flatten(1)  # (K, numel)
            offset = (draw[name] - mean).flatten()
            coef = torch.linalg.lstsq(devs.T, offset[:, None]).solution
            torch.testing.assert_close(devs.T @ coef, offset[:, None], atol=1e-5, rtol=1e-4)
    k = "params.0-weight"
    coefs = []
    for i in range(3):
        name = f"{k}.{i}"
        devs = swag.deviations[name][: swag.rank].flatten(1)
        coefs.append(torch.linalg.lstsq(devs.T, (draws[0][name] - swag.average[name]).flatten()[:, None]).solution)
    assert not torch.allclose(coefs[0], coefs[1], atol=1e-3)


def test_snapshot_ensemble_and_update_bn_with_per_member_storage():
    ens = DeepEnsemble(_bn_mlp(), 2, storage="per_member")
    snaps = []
    for _ in range(2):
        with torch.no_grad():
            for p in ens.parameters():
                p.add_(torch.randn_like(p))
        snaps.append({k: v.clone() for k, v in ens.state_dict().items()})
    snap = snapshot_ensemble(ens, snaps).eval()
    assert snap.num_members == 4 and snap.storage == "per_member"
    x = torch.randn(3, 5)
    torch.testing.assert_close(snap(x)[2:], ens.eval()(x))
    # update_bn runs the members in train mode without autograd: statistics equal the stacked layout's.
    stacked = DeepEnsemble(_bn_mlp(), 2, storage="stacked")
    stacked.load_state_dict(ens.state_dict())
    loader = [torch.randn(8, 5) * 3 + 1 for _ in range(3)]
    for model in (ens, stacked):
        update_bn(loader, model)
    for name, b in stacked.stacked_buffers().items():
        torch.testing.assert_close(ens.stacked_buffers()[name], b)
    mean = torch.cat(loader) @ ens.member(0)[0].weight.T + ens.member(0)[0].bias
    torch.testing.assert_close(ens.stacked_buffers()["1.running_mean"][0], mean.detach().mean(0), atol=1e-4, rtol=1e-4)


def test_lightning_checkpoint_resumes_and_loads_into_the_other_layout(tmp_path):
    from conftest import quiet_trainer
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_ensembles import EnsembleClassifier

    def build(storage):
        torch.manual_seed(0)
        return EnsembleClassifier(
            backbone="mlp",
            num_members=3,
            backbone_kwargs={"in_features": 5, "out_features": 3},
            ensemble_kwargs={"storage": storage},
        )

    torch.manual_seed(1)
    data = DataLoader(TensorDataset(torch.randn(32, 5), torch.randint(0, 3, (32,))), batch_size=8)
    straight = build("per_member")  # e.g. trained on a CPU-only machine
    quiet_trainer(max_epochs=2).fit(straight, data)
    model = build("per_member")
    trainer = quiet_trainer(max_epochs=1)
    trainer.fit(model, data)
    trainer.save_checkpoint(tmp_path / "per_member.ckpt")
    # Resumed by a module whose "auto" storage is stacked (an MLP; on a GPU machine also ResNets):
    # it takes the checkpoint's storage, so the Adam state matches and training continues exactly.
    resumed = build("auto")
    assert resumed.ensemble.storage == "stacked"
    quiet_trainer(max_epochs=2).fit(resumed, data, ckpt_path=tmp_path / "per_member.ckpt")
    assert resumed.ensemble.storage == "per_member"
    for name, p in straight.ensemble.stacked_parameters().items():
        torch.testing.assert_close(resumed.ensemble.stacked_parameters()[name], p)
    # load_from_checkpoint adopts it too; an explicit storage is kept, with identical predictions.
    loaded = EnsembleClassifier.load_from_checkpoint(tmp_path / "per_member.ckpt", ensemble_kwargs={"storage": "auto"})
    assert loaded.ensemble.storage == "per_member"
    stacked = EnsembleClassifier.load_from_checkpoint(
        tmp_path / "per_member.ckpt", ensemble_kwargs={"storage": "stacked"}
    )
    assert stacked.ensemble.storage == "stacked"
    x = torch.randn(4, 5)
    with torch.no_grad():
        torch.testing.assert_close(stacked.eval().ensemble(x), model.eval().ensemble(x))
        torch.testing.assert_close(loaded.eval().ensemble(x), model.ensemble(x))


def test_weight_space_repulsion_reaches_per_member_parameters():
    from lightning_ensembles.losses import WeightSpaceRepulsion

    stacked, per_member = _pair(lambda: MLP(4, 2), 3)
    x = torch.randn(5, 4)
    values = []
    for ens in (stacked, per_member):
        value = WeightSpaceRepulsion(weight=1.0)(ens(x), None, ensemble=ens)
        value.backward()
        values.append(value.detach())
    torch.testing.assert_close(values[0], values[1])
    for name, p in stacked.params.named_parameters():
        got = torch.stack([q.grad for q in getattr(per_member.params, name)])
        assert got.abs().sum() > 0
        torch.testing.assert_close(got, p.grad)


def test_ensembling_callback_resume_takes_the_checkpoints_storage(tmp_path):
    from conftest import quiet_trainer
    from user_project.classifier import LitClassifier

    from lightning_ensembles.callbacks import Ensembling
    from lightning_ensembles.data import DigitsDataModule

    dm = DigitsDataModule(batch_size=256)
    trainer = quiet_trainer(
        max_epochs=1, callbacks=[Ensembling(num_members=2, method_kwargs={"storage": "per_member"})]
    )
    trainer.fit(LitClassifier(), dm)
    trainer.save_checkpoint(tmp_path / "ens.ckpt")
    fresh = LitClassifier()
    resumed = quiet_trainer(max_epochs=2, callbacks=[Ensembling(num_members=2)])  # "auto": stacked for this model
    resumed.fit(fresh, dm, ckpt_path=tmp_path / "ens.ckpt")
    assert fresh.model.ensemble.storage == "per_member" and resumed.current_epoch == 2
