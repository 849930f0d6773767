import pytest
import torch
from torch import nn

from lightning_ensembles.backbones import MLP
from lightning_ensembles.ensembles.batch import BatchEnsemble, BatchEnsembleLayer, TabM
from lightning_ensembles.ensembles.registry import build_ensemble


def test_linear_param_count_and_reference_formula():
    layer = BatchEnsembleLayer(nn.Linear(64, 128), num_members=4)
    assert sum(p.numel() for p in layer.parameters()) == 9472
    with torch.no_grad():
        layer.r.normal_(1, 0.5)
        layer.s.normal_(1, 0.5)
        layer.bias.normal_()
    x = torch.randn(4, 3, 64)
    out = layer(x.flatten(0, 1)).unflatten(0, (4, 3))
    w = layer.layer.weight
    for i in range(4):  # y_i = ((x * r_i) W^T) * s_i + b_i, written independently
        ref = ((x[i] * layer.r[i]) @ w.T) * layer.s[i] + layer.bias[i]
        torch.testing.assert_close(out[i], ref)


@pytest.mark.parametrize(
    "conv", [nn.Conv2d(4, 6, 3, groups=2), nn.ConvTranspose2d(4, 6, 3, groups=2), nn.Conv1d(4, 4, 3)]
)
def test_member_layer_fuses_rank1_factors_for_grouped_and_transposed_convs(conv):
    layer = BatchEnsembleLayer(conv, num_members=3)
    with torch.no_grad():
        layer.r.normal_(1, 0.5)
        layer.s.normal_(1, 0.5)
    x = torch.randn(3, 2, 4, *([7] * (conv.weight.dim() - 2)))
    out = layer(x.flatten(0, 1)).unflatten(0, (3, 2))
    for i in range(3):
        torch.testing.assert_close(layer.member_layer(i)(x[i]), out[i], atol=1e-5, rtol=1e-4)


def test_m1_ones_reduces_to_backbone_and_nested_models_keep_weights():
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()), nn.Flatten(), nn.Linear(4 * 36, 3)
    )
    net.eval()
    x = torch.randn(2, 3, 8, 8)
    ens = BatchEnsemble(net, num_members=1, init="ones")
    torch.testing.assert_close(ens(x)[0], net(x))
    assert torch.equal(ens.model[0][0].layer.weight, net[0][0].weight)  # W kept


def test_per_member_batchnorm_statistics_do_not_mix_members_in_training():
    net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    ens = BatchEnsemble(net, num_members=3).train()
    x = torch.randn(8, 3)
    out = ens(x)
    with torch.no_grad():
        ens.model[0].r[0].mul_(5.0)
        ens.model[0].bias[0].add_(3.0)
    out2 = ens(x)
    assert torch.equal(out[1:], out2[1:]) and not torch.equal(out[0], out2[0])


@pytest.mark.parametrize("init", ["normal", "random_sign", "tabm", "ones"])
def test_inits(init):
    ens = BatchEnsemble(MLP(4, 2, hidden=(8, 8)), num_members=4, init=init)
    layers = [m for m in ens.model.modules() if isinstance(m, BatchEnsembleLayer)]
    first_r = layers[0].r
    if init == "random_sign":
        assert set(first_r.unique().tolist()) <= {-1.0, 1.0}
    if init == "tabm":
        assert set(first_r.unique().tolist()) <= {-1.0, 1.0}
        assert all(torch.all(m.s == 1) for m in layers) and all(torch.all(m.r == 1) for m in layers[1:])
    if init == "ones":
        assert all(torch.all(m.r == 1) and torch.all(m.s == 1) for m in layers)
    if init == "normal":
        assert abs(torch.cat([m.r.flatten() for m in layers]).std().item() - 0.5) < 0.2


def test_split_mode_and_member_targets():
    ens = BatchEnsemble(MLP(4, 2, hidden=(8,)), num_members=4, batch_mode="split").train()
    x, y = torch.randn(8, 4), torch.arange(8)
    assert ens(x).shape == (4, 2, 2)
    assert torch.equal(ens.member_targets(y)[1], y[2:4])
    with pytest.raises(ValueError, match="divisible by num_members"):
        ens(torch.randn(6, 4))
    ens.eval()
    assert ens(x).shape == (4, 8, 2) and ens.member_targets(y).shape == (4, 8)


def test_tabm_preset_and_registry():
    tabm = TabM(in_features=6, out_features=3, num_members=8, hidden_features=16, num_blocks=2)
    assert tabm(torch.randn(5, 6)).shape == (8, 5, 3)
    head = tabm.model.net[-1]
    assert head.weight.shape == (8, 3, 16)  # independent heads
    assert isinstance(build_ensemble("batch", "mlp", 2, {"in_features": 4, "out_features": 2}), BatchEnsemble)


def test_bad_arguments():
    with pytest.raises(ValueError, match="init"):
        BatchEnsemble(nn.Linear(2, 2), init="xavier")
    with pytest.raises(ValueError, match="batch_mode"):
        BatchEnsemble(nn.Linear(2, 2), batch_mode="chunk")
    with pytest.raises(ValueError, match="no Linear or Conv"):
        BatchEnsemble(nn.ReLU())


def test_training_reduces_loss():
    torch.manual_seed(0)
    ens = BatchEnsemble(MLP(8, 3, hidden=(32,)), num_members=4)
    x, y = torch.randn(64, 8), torch.randint(0, 3, (64,))
    opt = torch.optim.Adam(ens.parameters(), lr=1e-2)
    first = None
    for _ in range(80):
        loss = nn.functional.cross_entropy(ens(x).flatten(0, 1), ens.member_targets(y).flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        first = first or loss.item()
    assert loss.item() < 0.6 * first
