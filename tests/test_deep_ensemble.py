import itertools
import warnings

import pytest
import timm
import torch
from torch import nn

from lightning_ensembles import MLP, DeepEnsemble, Ensemble
from lightning_ensembles.ensembles.base import aggregate_gaussian, aggregate_probs


def _resnet18(**kw):
    return timm.create_model("resnet18", num_classes=10, pretrained=False, **kw)


def _vit():
    return timm.create_model(
        "vit_tiny_patch16_224", num_classes=10, img_size=32, patch_size=8, depth=2, pretrained=False
    )


@pytest.mark.parametrize("execution", ["vmap", "loop"])
@pytest.mark.parametrize("kind", ["mlp", "resnet18"])
def test_vectorized_output_equals_each_member(kind, execution):
    if kind == "mlp":
        ens = DeepEnsemble(MLP(64, 10), num_members=3, execution=execution)
        x = torch.randn(5, 64)
    else:
        ens = DeepEnsemble(_resnet18(), num_members=3, execution=execution)
        x = torch.randn(4, 3, 32, 32)
    ens.eval()
    out = ens(x)
    assert out.shape == (3, x.shape[0], 10)
    for i in range(3):
        member = ens.member(i).eval()
        torch.testing.assert_close(member(x), out[i], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("execution", ["vmap", "loop"])
def test_batchnorm_stats_per_member_and_every_member_gets_gradients(execution):
    ens = DeepEnsemble(_resnet18(), num_members=3, execution=execution)
    before = {k: v.clone() for k, v in ens.stacked_buffers().items()}
    opt = torch.optim.SGD(ens.parameters(), lr=0.1)
    ens.train()
    x, y = torch.randn(6, 3, 32, 32), torch.randint(0, 10, (6,))
    out = ens(x)
    loss = nn.functional.cross_entropy(out.flatten(0, 1), y.repeat(3))
    loss.backward()
    for name, p in ens.stacked_parameters().items():
        assert p.grad is not None, name
    # Every member's slice of the first conv received a non-zero gradient.
    g = ens.stacked_parameters()["conv1.weight"].grad
    assert all(g[i].abs().sum() > 0 for i in range(3))
    opt.step()
    rm = ens.stacked_buffers()["bn1.running_mean"]
    assert not torch.equal(rm, before["bn1.running_mean"])
    for i, j in itertools.combinations(range(3), 2):
        assert not torch.allclose(rm[i], rm[j])
    assert int(ens.stacked_buffers()["bn1.num_batches_tracked"][0]) == 1


def _random_tensor_names(factory):
    a, b = factory(), factory()
    return [n for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()) if not torch.equal(p, q)]


def _assert_members_differ(ens, names):
    stacked = ens.stacked_parameters()
    for name in names:
        for i, j in itertools.combinations(range(ens.num_members), 2):
            assert not torch.equal(stacked[name][i], stacked[name][j]), f"{name}: members {i} and {j} are equal"


@pytest.mark.parametrize("factory", [_resnet18, _vit, lambda: MLP(8, 3)], ids=["resnet18", "vit", "mlp"])
def test_reinit_redraws_every_random_tensor(factory):
    random_names = _random_tensor_names(factory)
    if factory is _vit:
        assert {"cls_token", "pos_embed"} <= set(random_names)
    _assert_members_differ(DeepEnsemble(factory(), num_members=3, init="reinit"), random_names)


def test_reinit_from_a_timm_name_uses_fresh_models():
    ens = DeepEnsemble(
        "vit_tiny_patch16_224", 3, backbone_kwargs=dict(num_classes=10, img_size=32, patch_size=8, depth=2)
    )
    _assert_members_differ(ens, _random_tensor_names(_vit))


def test_reinit_redraws_orphan_tensors_without_initialiser():
    class Tokens(nn.Module):
        def __init__(self):
            super().__init__()
            self.token = nn.Parameter(torch.randn(1, 4) * 0.02)  # no layer and no init_weights owns it
            self.scale = nn.Parameter(torch.ones(4))  # constant: stays
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            return self.fc(x * self.scale + self.token)

    with pytest.warns(UserWarning, match="token"):
        ens = DeepEnsemble(Tokens(), num_members=2)
    tok = ens.stacked_parameters()["token"]
    assert not torch.equal(tok[0], tok[1])
    assert torch.equal(ens.stacked_parameters()["scale"][0], torch.ones(4))


def test_copy_init_starts_every_member_from_the_backbone():
    backbone = _resnet18()
    ens = DeepEnsemble(backbone, num_members=3, init="copy")
    for name, p in backbone.named_parameters():
        for i in range(3):
            assert torch.equal(ens.stacked_parameters()[name][i], p.detach())
    for name, b in backbone.named_buffers():
        assert torch.equal(ens.stacked_buffers()[name][1], b)


def test_auto_execution_rule_and_vmap_fallback_warns_once():
    assert DeepEnsemble(MLP(4, 2), 2).resolved_execution() == "vmap"
    assert DeepEnsemble(_resnet18(), 2).resolved_execution(torch.device("cpu")) == "vmap"  # training
    assert DeepEnsemble(_resnet18(), 2).eval().resolved_execution(torch.device("cpu"), grad=False) == "loop"
    assert DeepEnsemble(_resnet18(), 2).resolved_execution(torch.device("cuda")) == "vmap"
    # Inference of a non-convolutional backbone on CPU: timed once, then fixed; training stays vmap.
    ens = DeepEnsemble(MLP(4, 2), 3).eval()
    x = torch.randn(5, 4)
    with torch.no_grad():
        assert ens.resolved_execution() == "measure"
        out = ens(x)
        chosen = ens.resolved_execution()
        assert chosen in ("loop", "vmap")
        torch.testing.assert_close(ens._forward_loop(x), ens._forward_vmap(x))
        torch.testing.assert_close(ens(x), out)
    assert ens.resolved_execution() == "vmap"
    assert ens.train().resolved_execution(grad=False) == "vmap"

    class DataDependent(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            if self.fc.weight.sum().item() > 1e9:  # .item() cannot run under vmap
                return x
            return self.fc(x)

    ens = DeepEnsemble(DataDependent(), 3, execution="vmap")
    x = torch.randn(5, 4)
    with pytest.warns(UserWarning, match="vmap cannot run"):
        out = ens(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        torch.testing.assert_close(ens(x), out)
    assert ens.resolved_execution() == "loop"
    for i in range(3):
        torch.testing.assert_close(ens.member(i)(x), out[i])


def test_autocast_inference_does_not_depend_on_a_timing():
    """Under autocast vmap and the loop give different dtypes (vmap keeps bias adds in float32): the
    timed choice must not decide the prediction, whatever an earlier timing outside autocast chose."""
    torch.manual_seed(0)
    x = torch.randn(5, 4)
    ens = DeepEnsemble(MLP(4, 2), 3).eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        loop, vm = ens._forward_loop(x), ens._forward_vmap(x)
        assert loop.dtype != vm.dtype  # the reason for the rule; if torch aligns them this may go
        ens.__dict__["_measured_inference"] = "loop"  # as if a timing outside autocast had picked the loop
        assert ens.resolved_execution() == "vmap"
        torch.testing.assert_close(ens(x), vm, rtol=0, atol=0)
        ens.train()
        with torch.enable_grad():
            assert ens(x).dtype == vm.dtype  # training and evaluation agree under autocast
    with torch.no_grad():
        assert ens.eval().resolved_execution() == "loop"  # outside autocast the timing's choice stands


def test_genuine_errors_are_not_swallowed_by_the_fallback():
    ens = DeepEnsemble(MLP(4, 2), 2)
    with pytest.raises(RuntimeError):
        ens(torch.randn(3, 5))
    assert ens.resolved_execution() == "vmap"


def test_state_dict_roundtrip_and_load_member():
    a, b = DeepEnsemble(MLP(4, 2), 3), DeepEnsemble(MLP(4, 2), 3)
    x = torch.randn(5, 4)
    assert not torch.allclose(a(x), b(x))
    b.load_state_dict(a.state_dict())
    torch.testing.assert_close(a(x), b(x))
    single = MLP(4, 2)
    a.load_member(1, single)
    torch.testing.assert_close(a(x)[1], single(x))


def test_bad_arguments_name_the_problem():
    with pytest.raises(ValueError, match="num_members"):
        DeepEnsemble(MLP(4, 2), num_members=0)
    with pytest.raises(ValueError, match="not a timm model name"):
        DeepEnsemble("resnet_does_not_exist", 2)
    with pytest.raises(ValueError, match="no parameters"):
        DeepEnsemble(nn.ReLU(), 2)
    with pytest.raises(ValueError, match="init"):
        DeepEnsemble(MLP(4, 2), 2, init="random")
    with pytest.raises(IndexError):
        DeepEnsemble(MLP(4, 2), 2).member(2)


def test_aggregation_rules():
    logits = torch.randn(4, 6, 3)
    torch.testing.assert_close(aggregate_probs(logits), logits.softmax(-1).mean(0))
    torch.testing.assert_close(Ensemble.aggregate(logits), logits.softmax(-1).mean(0))
    mean, var = torch.randn(4, 6, 1), torch.rand(4, 6, 1)
    mix = aggregate_gaussian(mean, var)
    # Law of total variance against the mixture's second moment.
    second = (var + mean**2).mean(0)
    torch.testing.assert_close(mix.variance, second - mean.mean(0) ** 2, atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="member axis"):
        aggregate_probs(torch.randn(5))


@pytest.mark.parametrize("set_to_none", [True, False])
def test_loop_gradients_equal_vmap_and_accumulate(set_to_none):
    # The loop writes member gradients into reusable buffers: results must not depend on that reuse.
    torch.manual_seed(0)
    loop = DeepEnsemble(_resnet18(), 3, execution="loop")
    vec = DeepEnsemble(_resnet18(), 3, execution="vmap")
    vec.load_state_dict(loop.state_dict())
    x, y = torch.randn(4, 3, 16, 16), torch.randint(0, 10, (12,))
    grads = []
    for ens in (loop, vec):
        ens.zero_grad(set_to_none=set_to_none)
        nn.functional.cross_entropy(ens(x).flatten(0, 1), y).backward()
        grads.append([p.grad.clone() for p in ens.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    kept = [p.grad for p in loop.parameters()]  # a caller holding last step's gradients
    first = [g.clone() for g in kept]
    loop.zero_grad(set_to_none=set_to_none)
    nn.functional.cross_entropy(loop(x).flatten(0, 1), y).backward()
    nn.functional.cross_entropy(loop(x).flatten(0, 1), y).backward()  # accumulation: twice the gradient
    for p, g in zip(loop.parameters(), grads[0]):
        torch.testing.assert_close(p.grad, 2 * g, atol=1e-5, rtol=1e-4)
    if set_to_none:  # the kept tensors were not overwritten by the buffer reuse
        for k, f in zip(kept, first):
            assert torch.equal(k, f)
