import pytest
import torch
from _family_checks import (
    checkpoint_round_trip,
    classifier_from_yaml,
    cli_fit_with_diversity_averaging_and_calibration,
    ensembling_callback_fit,
)
from _models import tiny_vit
from torch import nn

from lightning_ensembles.backbones import MLP
from lightning_ensembles.ensembles.masksembles import MaskedOutput, Masksembles, generate_masks
from lightning_ensembles.ensembles.surgery import ConversionError


def _mean_iou(masks: torch.Tensor) -> float:
    inter = masks @ masks.T
    union = masks.sum(1)[:, None] + masks.sum(1)[None] - inter
    off = ~torch.eye(masks.shape[0], dtype=torch.bool)
    return float((inter / union)[off].mean())


@pytest.mark.parametrize("channels,num,scale", [(64, 4, 2.0), (32, 3, 3.0), (100, 5, 1.5)])
def test_masks_follow_the_paper(channels, num, scale):
    masks = generate_masks(channels, num, scale, torch.Generator().manual_seed(1))
    ones = int(channels / (scale * (1 - (1 - 1 / scale) ** num)))  # the paper's ones per mask
    assert masks.shape == (num, channels)
    assert set(masks.unique().tolist()) == {0.0, 1.0}
    assert torch.equal(masks.sum(1), torch.full((num,), float(ones)))  # every member keeps the same width
    assert (masks.sum(0) > 0).all()  # no channel is dead in all members
    assert len({tuple(r.tolist()) for r in masks}) == num  # distinct members


def test_scale_controls_overlap():
    gen = torch.Generator().manual_seed(0)
    ious = [sum(_mean_iou(generate_masks(128, 4, s, gen)) for _ in range(3)) / 3 for s in (1.0, 1.5, 2.0, 3.0, 5.0)]
    assert ious[0] == 1.0 and all(a > b for a, b in zip(ious, ious[1:]))
    with pytest.raises(ValueError, match="at least 10 channels"):
        generate_masks(8, 2, 2.0)
    with pytest.raises(ValueError, match=r"\[1, 6\]"):
        generate_masks(32, 2, 7.0)


def test_shapes_member_equality_and_weights_kept():
    backbone = MLP(6, 3, hidden=(32, 32))
    ens = Masksembles(backbone, num_members=4, scale=2.0, seed=0).eval()
    assert ens.converted == ["net.1", "net.3"]
    x = torch.randn(5, 6)
    out = ens(x)
    assert out.shape == (4, 5, 3)
    for i in range(4):
        torch.testing.assert_close(ens.member(i)(x), out[i])
    assert all(not torch.allclose(out[i], out[j]) for i in range(4) for j in range(i + 1, 4))
    for name, p in backbone.named_parameters():
        path, leaf = name.rsplit(".", 1)
        owner = ens.model.get_submodule(path)
        owner = owner.module if isinstance(owner, MaskedOutput) else owner
        assert torch.equal(owner.get_parameter(leaf), p)
    # Member i is exactly the backbone with the channels outside mask i switched off (reference by hand).
    masks = ens.masks()
    i = 2
    h = torch.relu(backbone.net[1](x) * masks["net.1"][i])
    h = torch.relu(backbone.net[3](h) * masks["net.3"][i])
    torch.testing.assert_close(out[i], backbone.net[5](h))
    assert torch.equal(Masksembles(backbone, 4, seed=0).masks()["net.1"], masks["net.1"])  # seeded
    one = Masksembles(backbone, 3, scale=1.0).eval()(x)
    torch.testing.assert_close(one, backbone(x).expand(3, 5, 3))  # scale 1: one model


def test_conv_backbone_masks_after_batchnorm_and_whole_channels():
    net = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Conv2d(16, 24, 3),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(24, 2),
    )
    ens = Masksembles(net, num_members=3, scale=2.0, seed=0).eval()
    assert ens.converted == ["1", "3"]  # after the BatchNorm that follows conv 0, after conv 3
    captured = {}
    ens.model[2].register_forward_hook(lambda m, i, o: captured.update(act=o))
    ens(torch.randn(2, 3, 8, 8))
    act = captured["act"].view(3, 2, 16, 8, 8)
    dead = (act == 0).all(-1).all(-1).all(1)  # (M, C): channels that are off for every example
    assert torch.equal(~dead, ens.masks()["1"].bool())


def test_split_batch_mode_and_member_targets():
    ens = Masksembles(MLP(6, 3, hidden=(32,)), 4, batch_mode="split").train()
    x, y = torch.randn(8, 6), torch.arange(8)
    out = ens(x)
    assert out.shape == (4, 2, 3) and torch.equal(ens.member_targets(y), y.view(4, 2))
    ens.eval()
    torch.testing.assert_close(ens(x)[1, 2:4], out[1])  # member 1 saw chunk 1 in training
    with pytest.raises(ValueError, match="divisible by num_members"):
        ens.train()(torch.randn(7, 6))


def test_refusals_name_the_module():
    with pytest.raises(ConversionError, match=r"'net\.2'.*channel count of a ReLU"):
        Masksembles(MLP(6, 3, hidden=(32,)), 2, after=["net.2"])
    with pytest.raises(ConversionError, match=r"'net\.1'.*at least 10 channels"):
        Masksembles(MLP(6, 3, hidden=(8,)), 2)
    with pytest.raises(ConversionError, match=r"'blocks\.\*'.*matches no module"):
        Masksembles(MLP(6, 3, hidden=(32,)), 2, after=["blocks.*"])


def test_timm_backbone():
    timm = pytest.importorskip("timm")
    net = timm.create_model("resnet18", pretrained=False, num_classes=3).eval()
    ens = Masksembles(net, num_members=2, scale=2.0, seed=0).eval()
    assert "bn1" in ens.converted and "fc" not in ens.converted
    assert all(isinstance(ens.model.get_submodule(p), MaskedOutput) for p in ens.converted)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = ens(x)
        torch.testing.assert_close(ens.member(1)(x), out[1], rtol=1e-4, atol=1e-5)
    assert out.shape == (2, 2, 3)


def test_yaml_checkpoint_round_trip(tmp_path):
    model = classifier_from_yaml("masksembles", {"scale": 2.0, "seed": 1}, num_members=3)
    fresh = classifier_from_yaml("masksembles", {"scale": 2.0, "seed": 2}, num_members=3)
    state = checkpoint_round_trip(tmp_path, model, fresh, torch.randn(6, 1, 8, 8))
    assert state["ensemble.model.net.1.masks"].shape == (3, 32)  # masks travel with the checkpoint


def test_ensembling_callback_and_calibration_metrics():
    assert ensembling_callback_fit("masksembles", 3, {"scale": 1.5}) > 0.6


def test_cli_with_diversity_term_weight_averaging_and_calibration(tmp_path):
    cli = cli_fit_with_diversity_averaging_and_calibration(tmp_path, "masksembles", {"scale": 2.0})
    assert type(cli.model.ensemble).__name__ == "Masksembles"


def test_timm_vit_tokens_masked_on_the_channel_axis():
    vit = tiny_vit().eval()
    ens = Masksembles(vit, num_members=2, scale=2.0, seed=0).eval()
    assert "blocks.0.mlp.fc1" in ens.converted and "head" not in ens.converted and ens.verification.passed
    captured = {}
    ens.model.blocks[0].mlp.fc1.register_forward_hook(lambda m, i, o: captured.update(out=o))
    with torch.no_grad():
        ens(torch.randn(2, 3, 32, 32))
    out = captured["out"].view(2, 2, *captured["out"].shape[1:])  # (M, B, tokens, C)
    off = (out == 0).all(1).all(1)  # (M, C): channels zero for every example and token
    assert torch.equal(~off, ens.masks()["blocks.0.mlp.fc1"].bool())
