import pytest
import torch
from torch import nn

from lightning_ensembles.ensembles.packed import GroupedLinear, PackedEnsemble, PackedMultiheadAttention
from lightning_ensembles.ensembles.registry import build_ensemble


def _count(m):
    return sum(p.numel() for p in m.parameters())


def test_param_count_matches_torch_uncertainty_packed_resnet18():
    from torch_uncertainty.models.classification import packed_resnet, resnet

    single = resnet(in_channels=3, num_classes=10, arch=18, style="cifar")
    reference = packed_resnet(in_channels=3, num_classes=10, arch=18, num_estimators=4, alpha=2, gamma=2, style="cifar")
    with pytest.warns(UserWarning, match="lowered gamma"):
        ours = PackedEnsemble(
            single, 4, alpha=2, gamma=2, min_channels_per_group=64, no_gamma_layers=["*.conv1", "linear"]
        )
    assert abs(_count(ours) / _count(reference) - 1) < 0.02
    assert abs(_count(reference) - 8.18e6) < 0.01e6
    # alpha = M, gamma = 1 is exactly M independent backbones.
    assert _count(PackedEnsemble(single, 4, alpha=4, gamma=1, verify=False)) == 4 * _count(single)


def test_layer_param_formula_alpha2_over_m_gamma():
    net = nn.Sequential(nn.Linear(8, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4))
    ens = PackedEnsemble(net, num_members=4, alpha=2, gamma=2)
    hidden = ens.model[2]
    assert isinstance(hidden, GroupedLinear)
    # alpha^2 / (M * gamma) x the single layer's weights
    assert hidden.weight.numel() == 64 * 64 * 2**2 // (4 * 2)


def test_non_divisible_width_gets_ceil_per_member_and_stays_independent():
    net = nn.Sequential(nn.Linear(4, 10), nn.ReLU(), nn.Linear(10, 3))
    ens = PackedEnsemble(net, num_members=4, alpha=1.5).eval()  # 1.5 * 10 / 4 = 3.75 -> 4 per member
    assert ens.model[0].out_features == 16
    x = torch.randn(6, 4)
    out = ens(x)
    for i in range(4):
        torch.testing.assert_close(ens.member(i)(x), out[i])


def test_copy_init_reproduces_backbone_and_reinit_differs():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 16), nn.BatchNorm1d(16), nn.GELU(), nn.LayerNorm(16), nn.Linear(16, 3)).eval()
    x = torch.randn(5, 4)
    copied = PackedEnsemble(net, 3, alpha=3, init="copy")
    torch.testing.assert_close(copied(x), net(x).expand(3, -1, -1))
    fresh = PackedEnsemble(net, 3, alpha=3).eval()
    out = fresh(x)
    assert not torch.allclose(out[0], out[1])


def test_multihead_attention_members_independent_and_copy_exact():
    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp = nn.Linear(3, 8)
            self.att = nn.MultiheadAttention(8, 2, batch_first=True)
            self.out = nn.Linear(8, 2)

        def forward(self, x):
            h = self.inp(x)
            return self.out(self.att(h, h, h, need_weights=False)[0].mean(1))

    torch.manual_seed(0)
    net = Tiny().eval()
    x = torch.randn(4, 5, 3)
    ens = PackedEnsemble(net, 2, alpha=2, init="copy").eval()
    assert isinstance(ens.model.att, PackedMultiheadAttention)
    torch.testing.assert_close(ens(x), net(x).expand(2, -1, -1), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(ens.member(1)(x), ens(x)[1])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"alpha": 0}, "alpha"),
        ({"alpha": -1}, "alpha"),
        ({"gamma": 0}, "gamma"),
        ({"alpha": 2, "init": "copy"}, "init='copy' needs alpha == num_members"),
        ({"first_layer": "nope"}, "first_layer"),
    ],
)
def test_bad_hyperparameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PackedEnsemble(nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 2)), num_members=4, **kwargs)


def test_gamma_that_cannot_split_a_width_names_the_layer():
    net = nn.Sequential(nn.Conv2d(3, 6, 3), nn.ReLU(), nn.Conv2d(6, 6, 3), nn.Flatten(), nn.LazyLinear(2))
    with pytest.raises(ValueError, match=r"'2'.*not divisible by gamma"):
        PackedEnsemble(net[:3], num_members=2, alpha=2, gamma=4)


def test_unsupported_layer_refused_with_path():
    net = nn.Sequential(nn.Linear(4, 8), nn.Sequential(nn.PReLU(8)), nn.Linear(8, 2))
    with pytest.raises(ValueError, match=r"'1\.0'.*PReLU"):
        PackedEnsemble(net, num_members=2)


def test_registry_and_training_step_decreases_loss():
    ens = build_ensemble("packed", "mlp", num_members=4, backbone_kwargs={"in_features": 8, "out_features": 3}, alpha=2)
    assert isinstance(ens, PackedEnsemble)
    torch.manual_seed(0)
    x, y = torch.randn(64, 8), torch.randint(0, 3, (64,))
    opt = torch.optim.Adam(ens.parameters(), lr=1e-2)
    losses = []
    for _ in range(30):
        out = ens(x)  # (M, B, C): each member its own loss
        loss = nn.functional.cross_entropy(out.flatten(0, 1), y.repeat(4))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
