import pytest
import torch
from _family_checks import (
    checkpoint_round_trip,
    classifier_from_yaml,
    cli_fit_with_diversity_averaging_and_calibration,
    ensembling_callback_fit,
)
from _models import tiny_vit
from conftest import quiet_trainer
from torch import nn

from lightning_ensembles.backbones import MLP
from lightning_ensembles.ensembles.mimo import MIMO, MIMOInput, MIMOOutput
from lightning_ensembles.ensembles.surgery import ConversionError


def _params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_shapes_member_equality_and_copy_init_keeps_the_backbone():
    backbone = MLP(10, 4, hidden=(32, 32)).eval()
    ens = MIMO(backbone, num_members=3).eval()
    x = torch.randn(7, 10)
    out = ens(x)
    assert out.shape == (3, 7, 4) and ens.converted == ["net.1", "net.5"]
    for i in range(3):
        torch.testing.assert_close(ens.member(i)(x), out[i])
        torch.testing.assert_close(out[i], backbone(x), rtol=1e-5, atol=1e-5)  # init="copy" keeps the function
    # Parameters: M x the input layer's weight, M x the output layer's weight and bias, the rest once.
    fi, fo, hi, ho = 10, 32, 32, 4
    assert _params(ens) == _params(backbone) + 2 * fi * fo + 2 * (hi * ho + ho)
    reinit = MIMO(backbone, num_members=3, init="reinit").eval()
    assert not torch.allclose(reinit(x)[0], backbone(x))


def test_stacked_parameters_are_the_member_blocks_and_take_weight_space_repulsion():
    from lightning_ensembles.losses import WeightSpaceRepulsion

    ens = MIMO(MLP(10, 4, hidden=(16,)), num_members=3, init="reinit")
    blocks = ens.stacked_parameters()
    assert {k: tuple(v.shape) for k, v in blocks.items()} == {
        "net.1.layer.weight": (3, 16, 10),
        "net.3.layer.weight": (3, 4, 16),
        "net.3.layer.bias": (3, 4),
    }
    w_in = ens.model.net[1].layer.weight
    assert torch.equal(blocks["net.1.layer.weight"][2], w_in[:, 20:30])  # slot 2's input columns
    value = WeightSpaceRepulsion(weight=1.0)(ens(torch.randn(5, 10)), None, ensemble=ens)
    value.backward()
    assert torch.isfinite(value) and w_in.grad is not None and w_in.grad.abs().sum() > 0


def test_conv_backbone_widens_channels_and_heads():
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 5, 1))  # a segmentation-like output
    ens = MIMO(net, num_members=2).eval()
    assert ens.model[0].layer.weight.shape == (8, 6, 3, 3) and ens.model[2].layer.weight.shape == (10, 8, 1, 1)
    x = torch.randn(4, 3, 6, 6)
    out = ens(x)
    assert out.shape == (2, 4, 5, 6, 6)
    torch.testing.assert_close(out[1], net(x), rtol=1e-5, atol=1e-5)
    # Slot inputs go to the right channel block: member 1's block only ever sees slot 1.
    xs = torch.stack([torch.zeros_like(x), x])
    with torch.no_grad():
        ens.model[0].layer.weight[:, :3] = 0  # cut slot 0 off
    torch.testing.assert_close(ens.forward_slots(xs)[0], ens(x)[0])


def test_training_batches_follow_the_paper():
    torch.manual_seed(0)
    ens = MIMO(MLP(4, 2, hidden=(8,)), num_members=4, input_repetition=0.25, batch_repetition=2)
    idx = ens.training_indices(10)
    assert idx.shape == (4, 20)
    for row in idx:  # every member sees every example exactly R times
        assert torch.equal(torch.bincount(row % 10, minlength=10), torch.full((10,), 2))
    shared = (idx == idx[0]).all(0)
    assert shared[15:].all() and shared.float().mean() < 0.5  # the last n - int(n * (1 - rho)) slots are shared
    none = MIMO(MLP(4, 2, hidden=(8,)), num_members=4).training_indices(64)
    assert (none == none[0]).all(0).float().mean() < 0.1  # rho = 0: independent shuffles


def test_training_outputs_are_put_back_in_batch_order():
    """With block-diagonal weights head m depends on slot m only: the training output [m, t] must then be
    member m's evaluation output on example t % B, whatever the shuffle."""
    m, h = 3, 6
    ens = MIMO(MLP(5, 2, hidden=(m * h,)), num_members=m, batch_repetition=2)
    with torch.no_grad():
        w_in, w_out = ens.model.net[1].layer.weight, ens.model.net[3].layer.weight  # (M*h, M*5), (M*2, M*h)
        for i in range(m):
            for j in range(m):
                if i != j:
                    w_in[i * h : (i + 1) * h, j * 5 : (j + 1) * 5] = 0
                    w_out[i * 2 : (i + 1) * 2, j * h : (j + 1) * h] = 0
    x, y = torch.randn(8, 5), torch.arange(8)
    ens.eval()
    expected = ens(x).repeat(1, 2, 1)
    ens.train()
    out = ens(x)
    assert out.shape == (3, 16, 2)
    torch.testing.assert_close(out, expected)
    assert torch.equal(ens.member_targets(y), y.repeat(2).expand(3, 16))


def test_trained_subnetworks_become_independent():
    """The paper's finding: after training, head m barely reacts to the inputs of the other slots."""
    from lightning_ensembles import EnsembleClassifier
    from lightning_ensembles.data import DigitsDataModule

    torch.manual_seed(0)
    ens = MIMO(MLP(64, 10, hidden=(128,)), num_members=3, init="reinit")
    model = EnsembleClassifier(ensemble=ens, lr=3e-3)
    dm = DigitsDataModule(batch_size=64)
    quiet_trainer(max_epochs=12).fit(model, dm)
    ens.eval()
    x = dm.splits["test"].tensors[0][:200]
    x2 = x[torch.randperm(200)]
    with torch.no_grad():
        base = ens.forward_slots(torch.stack([x, x, x])).softmax(-1)
        own = ens.forward_slots(torch.stack([x2, x, x])).softmax(-1)  # change slot 0
    change_own = (own[0] - base[0]).abs().sum(-1).mean()
    change_other = (own[1:] - base[1:]).abs().sum(-1).mean()
    assert change_other < 0.25 * change_own
    acc = (ens(x).softmax(-1).mean(0).argmax(-1) == dm.splits["test"].tensors[1][:200]).float().mean()
    assert acc > 0.85


def test_refusals_name_the_module():
    with pytest.raises(ConversionError, match=r"'0'.*grouped convolution"):
        MIMO(nn.Sequential(nn.Conv2d(4, 4, 3, groups=2), nn.Flatten(), nn.LazyLinear(2)), 2)
    with pytest.raises(ConversionError, match=r"'0'.*distinct input and output"):
        MIMO(nn.Sequential(nn.Linear(3, 2)), 2)
    with pytest.raises(ConversionError, match=r"'1'.*must be nn.Linear or nn.Conv"):
        MIMO(nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 2)), 2, last_layer="1")
    with pytest.raises(ConversionError, match=r"'nope'.*not a submodule"):
        MIMO(MLP(3, 2), 2, first_layer="nope")
    with pytest.raises(ConversionError, match="no nn.Linear or nn.Conv"):
        MIMO(nn.Sequential(nn.ReLU()), 2)

    class Reordered(nn.Module):  # registers its output layer first: the registration-order guess is wrong
        def __init__(self) -> None:
            super().__init__()
            self.head, self.body = nn.Linear(8, 2), nn.Linear(3, 8)

        def forward(self, x):
            return self.head(torch.relu(self.body(x)))

    with pytest.raises(ConversionError, match=r"'body'.*not where the data leaves.*first_layer=/last_layer="):
        MIMO(Reordered(), 2, input_shape=[3])
    fixed = MIMO(Reordered(), 2, first_layer="body", last_layer="head", input_shape=[3])
    assert fixed.verification.passed
    with pytest.raises(ValueError, match="input_repetition"):
        MIMO(MLP(3, 2), 2, input_repetition=1.0)


def test_timm_backbone_keeps_its_weights():
    timm = pytest.importorskip("timm")
    net = timm.create_model("resnet18", pretrained=False, num_classes=3).eval()
    ens = MIMO(net, num_members=2).eval()
    assert ens.converted == ["conv1", "fc"]
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = ens(x)
        torch.testing.assert_close(out[0], net(x), rtol=1e-4, atol=1e-4)
    assert ens.model.conv1.layer.weight.shape == (64, 6, 7, 7)
    assert isinstance(ens.model.conv1, MIMOInput) and isinstance(ens.model.fc, MIMOOutput)
    assert torch.equal(ens.model.layer1[0].conv1.weight, net.layer1[0].conv1.weight)


def test_yaml_checkpoint_round_trip(tmp_path):
    kwargs = {"input_repetition": 0.5, "init": "reinit"}
    model = classifier_from_yaml("mimo", kwargs, num_members=3)
    assert type(model.ensemble).__name__ == "MIMO" and model.ensemble.input_repetition == 0.5
    fresh = classifier_from_yaml("mimo", kwargs, num_members=3)
    checkpoint_round_trip(tmp_path, model, fresh, torch.randn(6, 1, 8, 8))


def test_ensembling_callback_and_calibration_metrics():
    assert ensembling_callback_fit("mimo", 2, {"init": "reinit"}) > 0.6


def test_cli_with_diversity_term_weight_averaging_and_calibration(tmp_path):
    cli = cli_fit_with_diversity_averaging_and_calibration(tmp_path, "mimo", {"input_repetition": 0.5})
    assert type(cli.model.ensemble).__name__ == "MIMO"


def test_timm_vit_patch_embedding_and_head():
    vit = tiny_vit().eval()
    ens = MIMO(vit, num_members=2).eval()
    assert ens.converted == ["patch_embed.proj", "head"] and ens.verification.passed
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(ens(x)[1], vit(x), rtol=1e-4, atol=1e-4)  # cls token, positions: shared
