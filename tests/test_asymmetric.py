import pytest
import torch
from _family_checks import (
    checkpoint_round_trip,
    classifier_from_yaml,
    cli_fit_with_diversity_averaging_and_calibration,
    ensembling_callback_fit,
)
from torch import nn

from lightning_ensembles import DeepEnsemble
from lightning_ensembles.backbones import MLP
from lightning_ensembles.ensembles.asymmetric import WAsymmetricLayer, asymmetric_ensemble, w_asymmetric
from lightning_ensembles.ensembles.registry import build_ensemble
from lightning_ensembles.ensembles.surgery import ConversionError


def test_layer_fixes_a_random_subset_per_unit_and_trains_the_rest():
    lin = nn.Linear(20, 8)
    layer = WAsymmetricLayer(lin, num_fixed=5, scale=1.0, generator=torch.Generator().manual_seed(0))
    mask, values = layer.fixed_mask, layer.fixed_values
    assert torch.equal(mask.sum(1), torch.full((8,), 5))
    assert len({tuple(r.tolist()) for r in mask}) == 8  # every unit has its own fixed pattern: no two can swap
    assert (values[mask] != 0).all() and (values[~mask] == 0).all()
    x = torch.randn(4, 20)
    w = torch.where(mask, values, lin.weight)
    torch.testing.assert_close(layer(x), x @ w.T + lin.bias)  # reference by hand
    layer(x).pow(2).sum().backward()
    assert (lin.weight.grad[mask] == 0).all() and (lin.weight.grad[~mask] != 0).any()
    opt = torch.optim.SGD(layer.parameters(), lr=0.1, weight_decay=0.1)
    before = layer.effective_weight().detach().clone()
    opt.step()
    after = layer.effective_weight().detach()
    assert torch.equal(after[mask], before[mask]) and not torch.equal(after[~mask], before[~mask])


def test_conv_rows_are_output_channels():
    conv = nn.Conv2d(3, 6, 3)
    layer = WAsymmetricLayer(conv, num_fixed=4, generator=torch.Generator().manual_seed(0))
    assert layer.fixed_mask.shape == conv.weight.shape
    assert torch.equal(layer.fixed_mask.flatten(1).sum(1), torch.full((6,), 4))
    x = torch.randn(2, 3, 7, 7)
    torch.testing.assert_close(layer(x), torch.nn.functional.conv2d(x, layer.effective_weight(), conv.bias))


def test_conversion_keeps_free_weights_and_refuses_by_path():
    backbone = MLP(16, 3, hidden=(32,))
    net = w_asymmetric(backbone, num_fixed=4, seed=0)
    for i in (1, 3):
        conv = net.net[i]
        assert isinstance(conv, WAsymmetricLayer)
        orig = backbone.net[i].weight
        assert torch.equal(conv.effective_weight()[~conv.fixed_mask], orig[~conv.fixed_mask])
    assert torch.equal(w_asymmetric(backbone, 4, seed=0).net[1].fixed_mask, net.net[1].fixed_mask)  # seeded
    only = w_asymmetric(backbone, 4, layers=["net.3"], seed=0)
    assert isinstance(only.net[1], nn.Linear) and isinstance(only.net[3], WAsymmetricLayer)
    with pytest.raises(ConversionError, match=r"'net\.1'.*fan-in 4.*num_fixed=6"):
        w_asymmetric(MLP(4, 3, hidden=(8,)), num_fixed=6)
    with pytest.raises(ConversionError, match=r"'head\*'.*matches no"):
        w_asymmetric(backbone, layers=["head*"])
    with pytest.raises(ConversionError, match="no nn.Linear"):
        w_asymmetric(nn.Sequential(nn.ReLU()))


def test_ensemble_members_shared_masks_and_member_equality():
    ens = asymmetric_ensemble(MLP(16, 3, hidden=(32,)), num_members=3, num_fixed=4, seed=0)
    assert isinstance(ens, DeepEnsemble)
    masks = ens.stacked_buffers()["net.1.fixed_mask"]
    assert torch.equal(masks[0], masks[1]) and torch.equal(masks[0], masks[2])
    weights = ens.stacked_parameters()["net.1.layer.weight"]
    assert not torch.allclose(weights[0], weights[1])  # free weights drawn per member
    x = torch.randn(5, 16)
    out = ens.eval()(x)
    for i in range(3):
        torch.testing.assert_close(ens.member(i)(x), out[i])
    own = asymmetric_ensemble(MLP(16, 3, hidden=(32,)), num_members=3, num_fixed=4, shared_masks=False, seed=0)
    m = own.stacked_buffers()["net.1.fixed_mask"]
    assert not torch.equal(m[0], m[1]) and not torch.equal(m[1], m[2])


def test_yaml_checkpoint_round_trip(tmp_path):
    model = classifier_from_yaml("asymmetric", {"num_fixed": 4, "seed": 0}, num_members=2)
    fresh = classifier_from_yaml("asymmetric", {"num_fixed": 4, "seed": 1}, num_members=2)
    state = checkpoint_round_trip(tmp_path, model, fresh, torch.randn(6, 1, 8, 8))
    assert state["ensemble.buffers_.net-1-fixed_mask"].dtype == torch.bool  # the masks travel with the checkpoint
    assert (
        build_ensemble(
            "asymmetric",
            "mlp",
            num_members=2,
            num_fixed=2,
            backbone_kwargs={"in_features": 4, "out_features": 2, "hidden": [8]},
        ).num_members
        == 2
    )


def test_cli_with_diversity_term_weight_averaging_and_calibration(tmp_path):
    cli = cli_fit_with_diversity_averaging_and_calibration(tmp_path, "asymmetric", {"num_fixed": 4})
    assert "fixed_mask" in " ".join(cli.model.ensemble.stacked_buffers())


def test_ensembling_callback_and_calibration_metrics():
    assert ensembling_callback_fit("asymmetric", 2, {"num_fixed": 3}) > 0.6
