import pickle

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
from lightning_ensembles.ensembles.registry import build_ensemble
from lightning_ensembles.ensembles.tta import Augmentation, TTAEnsemble


def test_named_transforms_against_hand_written_reference():
    x = torch.randn(2, 3, 5, 5)
    assert torch.equal(Augmentation("hflip")(x), x[..., torch.arange(4, -1, -1)])
    assert torch.equal(Augmentation("vflip")(x), x[..., torch.arange(4, -1, -1), :])
    assert torch.equal(Augmentation("rot180")(x), x.flip(-1).flip(-2))
    assert torch.equal(Augmentation("rot90")(x), x.transpose(-1, -2).flip(-2))
    shifted = Augmentation("shift_1_-2")(x)  # content moves down 1 and left 2, edges replicated
    assert torch.equal(shifted[..., 1:, :3], x[..., :4, 2:])
    assert torch.equal(shifted[..., 0, :3], x[..., 0, 2:]) and torch.equal(shifted[..., 1:, 3], x[..., :4, 4])
    torch.testing.assert_close(Augmentation("rotate_0")(x), x)
    r = Augmentation("rotate_90")(x)
    assert torch.allclose(r, Augmentation("rot90")(x), atol=1e-5) or torch.allclose(
        r, Augmentation("rot270")(x), atol=1e-5
    )
    crop = Augmentation("crop_1_tl")(x)  # top-left 3x3 crop resized back to 5x5
    ref = torch.nn.functional.interpolate(x[..., :3, :3], size=(5, 5), mode="bilinear", align_corners=False)
    torch.testing.assert_close(crop, ref)
    torch.testing.assert_close(Augmentation("crop_1_c")(x)[..., 2, 2], x[..., 2, 2])  # the centre stays
    with pytest.raises(ValueError, match="leaves nothing"):
        Augmentation("crop_3_c")(x)
    signal = torch.arange(6.0).view(1, 6)
    assert Augmentation("shift_-2")(signal).tolist() == [[2.0, 3.0, 4.0, 5.0, 5.0, 5.0]]
    with pytest.raises(ValueError, match=r"unknown transform 'flip'.*hflip"):
        Augmentation("flip")
    aug = pickle.loads(pickle.dumps(Augmentation("shift_1")))  # picklable (parsed from its name)
    assert torch.equal(aug(signal), Augmentation("shift_1")(signal))


def test_plain_model_and_deep_ensemble_member_order():
    torch.manual_seed(0)
    net = MLP(8, 3, hidden=(16,))
    tta = TTAEnsemble(net, transforms=["identity", "hflip", "shift_2"]).eval()
    x = torch.randn(4, 8)
    out = tta(x)
    assert out.shape == (3, 4, 3) and tta.num_members == 3
    torch.testing.assert_close(out[1], net(x.flip(-1)))
    deep = DeepEnsemble(net, num_members=2)
    tta = TTAEnsemble(deep, transforms=["identity", "hflip", "shift_2"]).eval()
    out = tta(x)
    assert out.shape == (6, 4, 3)
    members = deep.eval()(x.flip(-1))
    torch.testing.assert_close(out[1], members[0])  # member m * A + a
    torch.testing.assert_close(out[4], members[1])
    for i in range(6):
        torch.testing.assert_close(tta.member(i)(x), out[i])


@pytest.mark.parametrize(
    "method,kwargs",
    [
        ("deep", {}),
        ("packed", {"alpha": 2}),
        ("batch", {}),
        ("mc_dropout", {"p": 0.2, "insert_before": ["net.3"]}),
        ("mimo", {}),
        ("masksembles", {}),
    ],
)
def test_composes_with_every_method(method, kwargs):
    tta = TTAEnsemble(
        MLP(8, 3, hidden=(32,)),
        num_members=2,
        transforms=["identity", "hflip"],
        inner_method=method,
        inner_kwargs=kwargs,
    ).eval()
    x = torch.randn(5, 8)
    out = tta(x)
    assert out.shape == (4, 5, 3) and tta.inner_members == 2
    for i in (0, 3):
        torch.testing.assert_close(tta.member(i)(x), out[i], rtol=1e-4, atol=1e-5)
    assert tta.aggregate(out).shape == (5, 3)


def test_training_modes_and_member_targets():
    x, y = torch.randn(6, 8), torch.arange(6)
    tta = TTAEnsemble(MLP(8, 3), num_members=2, transforms=["identity", "hflip"], inner_method="deep").train()
    assert tta(x).shape == (2, 6, 3) and tta.member_targets(y).shape == (2, 6)  # plain batch in training
    tta.train_augment = True
    assert tta(x).shape == (4, 6, 3) and torch.equal(tta.member_targets(y), y.expand(4, 6))
    # An inner ensemble that tiles its training batch (MIMO, batch_repetition=2): targets follow it.
    mimo = TTAEnsemble(
        MLP(8, 3, hidden=(16,)),
        num_members=2,
        transforms=["identity", "hflip"],
        inner_method="mimo",
        inner_kwargs={"batch_repetition": 2},
        train_augment=True,
    ).train()
    out, targets = mimo(x), mimo.member_targets(y)
    assert out.shape[:2] == targets.shape == (2, 24)


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match=r"num_members`=4 but 2 transforms x 1 inner members give 2"):
        TTAEnsemble(MLP(8, 3), num_members=4, transforms=["identity", "hflip"])
    with pytest.raises(ValueError, match="rot90/rot270 need square"):
        TTAEnsemble(nn.Flatten(), transforms=["rot90"]).eval()(torch.randn(2, 1, 3, 4))
    with pytest.raises(ValueError, match="at least one augmentation"):
        TTAEnsemble(MLP(8, 3), transforms=[])


def test_user_transforms_as_modules_and_callables():
    net = MLP(8, 3)
    tta = TTAEnsemble(net, transforms=[nn.Identity(), lambda x: x * 0.5]).eval()
    x = torch.randn(3, 8)
    torch.testing.assert_close(tta(x)[1], net(x * 0.5))


def test_yaml_checkpoint_round_trip(tmp_path):
    kwargs = {"transforms": ["identity", "shift_1_0"], "inner_method": "deep"}
    model = classifier_from_yaml("tta", kwargs, num_members=2)
    assert model.ensemble.num_members == 4
    fresh = classifier_from_yaml("tta", kwargs, num_members=2)
    checkpoint_round_trip(tmp_path, model, fresh, torch.randn(6, 1, 8, 8))
    assert (
        build_ensemble(
            "tta",
            "mlp",
            num_members=2,
            transforms=["identity", "hflip"],
            backbone_kwargs={"in_features": 4, "out_features": 2},
        ).num_members
        == 2
    )


def test_ensembling_callback_and_calibration_metrics():
    assert ensembling_callback_fit("tta", 2, {"transforms": ["identity", "shift_0_1"], "train_augment": True}) > 0.6


def test_cli_with_diversity_term_weight_averaging_and_calibration(tmp_path):
    kwargs = {"transforms": ["identity", "shift_1_0"], "inner_method": "deep", "train_augment": True}
    cli = cli_fit_with_diversity_averaging_and_calibration(tmp_path, "tta", kwargs, num_members=2)
    assert cli.model.ensemble.num_members == 4
