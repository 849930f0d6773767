"""SWA / EMA / SWAG averagers and per-member BatchNorm recomputation, against torch.optim.swa_utils."""

import copy

import pytest
import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn, get_swa_multi_avg_fn
from torch.optim.swa_utils import update_bn as torch_update_bn

from lightning_ensembles import DeepEnsemble
from lightning_ensembles.averaging import EMA, SWA, SWAG, SWAGEnsemble, update_bn


def _bn_net():
    return nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))


def _perturb(model, scale=0.1):
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn_like(p))


def test_snapshots_1_2_3_average_to_exactly_2():
    net = nn.Linear(2, 2)
    swa = SWA()
    for w in (1.0, 2.0, 3.0):
        with torch.no_grad():
            net.weight.fill_(w)
            net.bias.fill_(w)
        swa.update(net)
    assert swa.n_averaged == 3
    assert torch.equal(swa.average["weight"], torch.full((2, 2), 2.0))
    assert torch.equal(swa.average["bias"], torch.full((2,), 2.0))


def _ensembles():
    yield "deep", DeepEnsemble(_bn_net(), num_members=4)
    from lightning_ensembles.ensembles.packed import PackedEnsemble

    yield "packed", PackedEnsemble(_bn_net(), num_members=4, alpha=2)


@pytest.mark.parametrize("method", ["swa", "ema"])
@pytest.mark.parametrize("kind", ["deep", "packed"])
def test_matches_averaged_model_per_member(method, kind):
    ens = dict(_ensembles())[kind]
    if method == "swa":
        ours, ref = SWA(), AveragedModel(ens, multi_avg_fn=get_swa_multi_avg_fn())
    else:
        ours, ref = EMA(decay=0.9, average_buffers=False), AveragedModel(ens, multi_avg_fn=get_ema_multi_avg_fn(0.9))
    # Independent per-member references: one AveragedModel per member module, fed that member's weights.
    fn = get_swa_multi_avg_fn() if method == "swa" else get_ema_multi_avg_fn(0.9)
    per_member = [AveragedModel(ens.member(i), multi_avg_fn=fn) for i in range(4)]
    for _ in range(6):
        _perturb(ens)
        ours.update(ens)
        ref.update_parameters(ens)
        for i, ref_i in enumerate(per_member):
            ref_i.update_parameters(ens.member(i))
    averaged = copy.deepcopy(ens)
    ours.copy_to(averaged)
    for (n, p), q in zip(averaged.named_parameters(), ref.module.parameters()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=0, msg=n)
    for i, ref_i in enumerate(per_member):
        member = averaged.member(i)
        for (n, p), q in zip(member.named_parameters(), ref_i.module.parameters()):
            torch.testing.assert_close(p, q, atol=1e-6, rtol=0, msg=f"member {i} {n}")


def test_ema_averages_float_buffers_not_counters():
    net = _bn_net()
    ema = EMA(decay=0.5)
    net.train()
    seen = []
    for _ in range(3):
        net(torch.randn(16, 5))
        seen.append(net[1].running_mean.clone())
        ema.update(net)
    expected = seen[0]
    for s in seen[1:]:
        expected = 0.5 * expected + 0.5 * s
    torch.testing.assert_close(ema.average["1.running_mean"], expected)
    assert "1.num_batches_tracked" not in ema.average


@pytest.mark.parametrize("kind", ["deep", "packed"])
def test_update_bn_per_member_equals_torch_update_bn_on_each_member(kind):
    ens = dict(_ensembles())[kind]
    _perturb(ens, 0.5)
    loader = [(torch.randn(10, 5) * 2 + 1, torch.zeros(10)) for _ in range(4)]
    members = [ens.member(i) for i in range(ens.num_members)]
    for m in members:
        torch_update_bn(loader, m)
    update_bn(loader, ens)
    for i, m in enumerate(members):
        mine = ens.member(i)
        assert len(list(mine.buffers())) == 3  # the member has its BatchNorm statistics
        for (n, b), ref in zip(mine.named_buffers(), m.buffers()):
            torch.testing.assert_close(b, ref, atol=1e-6, rtol=1e-6, msg=f"member {i} {n}")
    assert ens.training  # mode restored


def test_update_bn_on_plain_model_equals_torch():
    net = _bn_net()
    ref = copy.deepcopy(net)
    loader = [torch.randn(7, 5) for _ in range(3)]
    update_bn(loader, net)
    torch_update_bn(loader, ref)
    for b, r in zip(net.buffers(), ref.buffers()):
        torch.testing.assert_close(b, r)


def _swag_fixture(groups_model):
    swag = SWAG(max_rank=3, var_clamp=1e-6, scale=0.5)
    for _ in range(5):
        _perturb(groups_model, 0.3)
        swag.update(groups_model)
    return swag


@pytest.mark.parametrize("stacked", [False, True])
def test_swag_moments_and_sampling(stacked):
    model = DeepEnsemble(nn.Linear(3, 2), num_members=2) if stacked else nn.Linear(3, 2)
    snaps = []
    swag = SWAG(max_rank=3, var_clamp=1e-6, scale=0.5)
    for _ in range(5):
        _perturb(model, 0.3)
        snaps.append({n: p.detach().clone() for n, p in model.named_parameters()})
        swag.update(model)
    # Independent reference of the moments from the stored snapshots.
    for n in swag.average:
        w = torch.stack([s[n] for s in snaps])
        torch.testing.assert_close(swag.average[n], w.mean(0), atol=1e-6, rtol=0)
        var = (w.square().mean(0) - w.mean(0).square()).clamp_min(1e-6)
        torch.testing.assert_close(swag.variance()[n], var, atol=1e-6, rtol=1e-4)
        # last K=3 deviations: w_i - mean of w_1..w_i
        devs = torch.stack([w[i] - w[: i + 1].mean(0) for i in (2, 3, 4)])
        got = swag.deviations[n]
        assert sorted(got.flatten().tolist()) == pytest.approx(sorted(devs.flatten().tolist()), abs=1e-6)
        expected_var = 0.5 * (var + devs.square().sum(0) / 2)
        torch.testing.assert_close(swag.marginal_variance()[n], expected_var, atol=1e-6, rtol=1e-4)

    # Monte-Carlo: with 20,000 draws the sample mean is within 5 standard errors of the SWA mean
    # and the sample variance within 5% of the stored diagonal + low-rank variance.
    n_draws = 20000
    draws = swag.sample(n_draws, generator=torch.Generator().manual_seed(0))
    for n, mean in swag.average.items():
        w = torch.stack([d[n] for d in draws])
        target_var = swag.marginal_variance()[n]
        assert ((w.mean(0) - mean).abs() <= 5 * (target_var / n_draws).sqrt()).all()
        torch.testing.assert_close(w.var(0), target_var, rtol=0.05, atol=1e-7)
    if stacked:
        # MultiSWAG: members draw independent low-rank noise -> no correlation between members.
        w = torch.stack([d["params.weight"] for d in draws])  # (N, 2, 2, 3)
        corr = torch.corrcoef(torch.stack([w[:, 0, 0, 0], w[:, 1, 0, 0]]))[0, 1]
        assert abs(float(corr)) < 0.05


def test_swag_state_dict_roundtrip_continues_exactly():
    net_a = nn.Linear(4, 2)
    net_b = copy.deepcopy(net_a)
    full, part = SWAG(max_rank=2), SWAG(max_rank=2)
    seq = [[torch.randn_like(p) for p in net_a.parameters()] for _ in range(5)]
    for k, deltas in enumerate(seq):
        with torch.no_grad():
            for p, q, d in zip(net_a.parameters(), net_b.parameters(), deltas):
                p.add_(d)
                q.add_(d)
        full.update(net_a)
        part.update(net_b)
        if k == 2:
            resumed = SWAG(max_rank=2)
            resumed.load_state_dict(copy.deepcopy(part.state_dict()))
            part = resumed
    for key in ("average", "sq_mean", "deviations"):
        for n in full.average:
            assert torch.equal(getattr(full, key)[n], getattr(part, key)[n])


def test_swag_ensemble_shapes_and_members():
    ens = DeepEnsemble(_bn_net(), num_members=2)
    swag = _swag_fixture(ens)
    loader = [torch.randn(16, 5) for _ in range(2)]
    sens = swag.sample_ensemble(ens, num_samples=3, loader=loader, seed=1)
    x = torch.randn(4, 5)
    sens.eval()
    out = sens(x)
    assert out.shape == (6, 4, 3) and sens.num_members == 6
    # member(k) is draw k // 2 of member k % 2 and reproduces that slice of the output
    member = sens.member(3).eval()
    torch.testing.assert_close(member(x), out[3], atol=1e-5, rtol=1e-5)
    # BN statistics were recomputed for each draw: equal to torch's update_bn on that member
    ref = sens.member(3)
    torch_update_bn(loader, ref)
    for b, r in zip(member.buffers(), ref.buffers()):
        torch.testing.assert_close(b, r, atol=1e-5, rtol=1e-5)


def test_errors_name_the_argument():
    with pytest.raises(ValueError, match="decay"):
        EMA(decay=1.5)
    with pytest.raises(ValueError, match="max_rank"):
        SWAG(max_rank=-1)
    with pytest.raises(ValueError, match="update"):
        SWA().copy_to(nn.Linear(1, 1))
    with pytest.raises(ValueError, match="samples"):
        SWAGEnsemble(nn.Linear(1, 1), [])
