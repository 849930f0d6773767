import pytest
import torch
import torch.nn.functional as F
from _family_checks import (
    DIGITS_MLP,
    checkpoint_round_trip,
    classifier_from_yaml,
    cli_fit_with_diversity_averaging_and_calibration,
    ensembling_callback_fit,
)
from torch import nn

from lightning_ensembles.backbones import MLP
from lightning_ensembles.ensembles.mc_dropout import MCDropout, seeded_uniform
from lightning_ensembles.ensembles.registry import build_ensemble
from lightning_ensembles.ensembles.surgery import ConversionError


class FunctionalDropout(nn.Module):
    """Dropout only through functional calls (what a module-swapping MC-Dropout misses)."""

    def __init__(self) -> None:
        super().__init__()
        self.inp, self.conv, self.out = nn.Linear(6, 16), nn.Conv1d(4, 4, 1), nn.Linear(16, 3)

    def forward(self, x):
        h = F.dropout(F.relu(self.inp(x)), 0.3, self.training)
        h = F.dropout1d(self.conv(h.view(-1, 4, 4)), 0.2, self.training).flatten(1)
        return self.out(torch.dropout(h, 0.1, self.training))


def test_shapes_member_equality_and_reproducible_samples():
    ens = MCDropout(MLP(6, 3, hidden=(32, 32), dropout=0.3), num_members=6).eval()
    assert ens.verification.ran and ens.verification.passed
    x = torch.randn(9, 6)
    out = ens(x)
    assert out.shape == (6, 9, 3) and ens.num_samples == 6
    assert torch.equal(ens(x), out)  # fixed members: a second evaluation gives the same samples
    for i in (0, 5, -1):
        torch.testing.assert_close(ens.member(i)(x), out[i])
    # A member is one fixed thinned network: its output for a row does not depend on the batch.
    torch.testing.assert_close(ens.member(2)(x[4:5]), out[2, 4:5])
    assert all(not torch.allclose(out[i], out[j]) for i in range(6) for j in range(i + 1, 6))
    ens.reseed(123)
    assert not torch.allclose(ens(x), out)


def test_masks_keep_rate_and_independence_between_members():
    p = 0.3
    ens = MCDropout(nn.Sequential(nn.Dropout(p)), num_members=8, input_shape=[16]).eval()
    keep = ens(torch.ones(1, 20000))[:, 0] > 0  # (M, 20000) keep masks
    rates = keep.float().mean(1)
    assert torch.allclose(rates, torch.full_like(rates, 1 - p), atol=0.015)
    both = (keep[:, None] & keep[None]).float().mean(-1)  # P(i and j both keep)
    off = both[~torch.eye(8, dtype=torch.bool)]
    assert torch.allclose(off, torch.full_like(off, (1 - p) ** 2), atol=0.015)  # independent masks
    kept = ens(torch.ones(1, 20000))[:, 0]
    assert torch.allclose(kept[kept > 0], torch.full_like(kept[kept > 0], 1 / (1 - p)))  # inverted scaling
    u = seeded_uniform(torch.tensor([3, 4]), call=1, numel=50000)
    assert abs(float(u.mean()) - 0.5) < 0.01 and not torch.equal(u, seeded_uniform(torch.tensor([3, 4]), 2, 50000))


def test_functional_dropout_is_sampled_torch_uncertainty_issue_152():
    torch.manual_seed(0)
    backbone = FunctionalDropout().eval()
    x = torch.randn(5, 6)
    ens = MCDropout(backbone, num_members=4).eval()
    out = ens(x)
    assert out.std(0).mean() > 0.01  # the samples differ although the backbone has no dropout module
    torch.testing.assert_close(ens.member(1)(x), out[1])
    torch.testing.assert_close(backbone(x), backbone(x))  # the user's model is untouched (still deterministic)
    # Channel dropout keeps the Conv1d's channels whole: per member, a channel is all dropped or all kept.
    ch = MCDropout(nn.Sequential(nn.Dropout2d(0.5)), num_members=3, input_shape=[8, 5, 5]).eval()(
        torch.ones(2, 8, 5, 5)
    )
    per_channel = (ch > 0).float().mean((-1, -2))
    assert set(per_channel.unique().tolist()) <= {0.0, 1.0} and torch.equal(per_channel[:, 0], per_channel[:, 1])


def test_alpha_dropout_keeps_zero_mean_unit_variance():
    ens = MCDropout(nn.Sequential(nn.AlphaDropout(0.2)), num_members=2, input_shape=[16]).eval()
    x = torch.randn(4, 50000)
    out = ens(x)
    assert abs(float(out.mean())) < 0.02 and abs(float(out.var()) - 1.0) < 0.03
    assert (out != x).float().mean() > 0.15  # about p of the units were dropped


def test_p_override_and_inserted_dropout_keep_weights():
    backbone = MLP(6, 3, hidden=(16, 16))  # no dropout
    with pytest.raises(ConversionError, match="no dropout ran"):
        MCDropout(backbone, 3)  # refused by the post-conversion check on a probe
    with pytest.raises(ConversionError, match="no dropout ran"):
        MCDropout(backbone, 3, verify=False).eval()(torch.randn(2, 6))  # or at the first evaluation
    with pytest.raises(ConversionError, match=r"'head\.\*'.*matches no module"):
        MCDropout(backbone, 3, p=0.2, insert_before=["head.*"])
    with pytest.raises(ValueError, match="needs a dropout rate"):
        MCDropout(backbone, 3, insert_before=["net.3"])
    ens = MCDropout(backbone, 4, p=0.25, insert_before=["net.3", "net.5"]).eval()
    assert ens.inserted == ["net.3", "net.5"]
    assert list(ens.model.state_dict()) == list(backbone.state_dict())
    for k, v in backbone.state_dict().items():
        assert torch.equal(ens.model.state_dict()[k], v)
    out = ens(torch.randn(3, 6))
    assert out.std(0).mean() > 0.01
    # p overrides the module's rate: nn.Dropout(0.5) sampled at 0.1.
    over = MCDropout(nn.Sequential(nn.Dropout(0.5)), 2, p=0.1, verify=False).eval()(torch.ones(1, 20000))
    assert abs(float((over > 0).float().mean()) - 0.9) < 0.01
    with pytest.raises(ConversionError, match=r"'0\.2'.*p=0"):
        MCDropout(nn.Sequential(nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Dropout(0.0))), 2)


def test_refuses_fused_dropout_with_the_module_path():
    class WithAttention(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.block = nn.Sequential(nn.Linear(4, 4))
            self.block.attn = nn.MultiheadAttention(4, 2, dropout=0.1, batch_first=True)

    with pytest.raises(ConversionError, match=r"'block\.attn'.*MultiheadAttention"):
        MCDropout(WithAttention(), 2)
    with pytest.raises(ConversionError, match=r"'rnn'.*LSTM"):
        MCDropout(nn.ModuleDict({"rnn": nn.LSTM(4, 4, num_layers=2, dropout=0.2)}), 2)


def test_timm_models_functional_head_dropout_and_attention_dropout():
    timm = pytest.importorskip("timm")
    resnet = timm.create_model("resnet18", pretrained=False, num_classes=3, drop_rate=0.3).eval()
    x = torch.randn(2, 3, 32, 32)
    ens = MCDropout(resnet, 3).eval()  # timm's ResNet head calls F.dropout(x, drop_rate, self.training)
    with torch.no_grad():
        out = ens(x)
        assert out.std(0).mean() > 1e-3
        torch.testing.assert_close(ens.member(2)(x), out[2], rtol=1e-4, atol=1e-5)
    for k, v in resnet.state_dict().items():  # pretrained weights survive
        assert torch.equal(ens.model.state_dict()[k], v)
    vit = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2, num_classes=3, attn_drop_rate=0.2
    ).eval()
    ens = MCDropout(vit, 3).eval()  # only attention dropout: the fused kernel is switched to the unfused path
    with torch.no_grad():
        out = ens(x)
    assert out.std(0).mean() > 1e-3
    assert all(not getattr(m, "fused_attn", False) for m in ens.model.modules())


def test_train_samples_and_member_targets():
    ens = MCDropout(MLP(6, 3, hidden=(16,), dropout=0.2), 4, train_samples=1).train()
    x, y = torch.randn(5, 6), torch.randint(0, 3, (5,))
    assert ens(x).shape == (1, 5, 3) and ens.member_targets(y).shape == (1, 5)
    ens.eval()
    assert ens(x).shape == (4, 5, 3) and ens.member_targets(y).shape == (4, 5)
    full = MCDropout(MLP(6, 3, hidden=(16,), dropout=0.2), 4).train()
    out = full(x)
    assert out.shape == (4, 5, 3) and not torch.allclose(out[0], out[1])  # independent training masks
    with pytest.raises(ValueError, match="train_samples"):
        MCDropout(MLP(6, 3), 4, train_samples=5)


def test_yaml_checkpoint_round_trip_and_registry(tmp_path):
    kwargs = {"p": 0.2, "insert_before": ["net.3"], "train_samples": 1}
    model = classifier_from_yaml("mc_dropout", kwargs, num_members=4)
    assert type(model.ensemble).__name__ == "MCDropout" and model.ensemble.p == 0.2
    fresh = classifier_from_yaml("mc_dropout", kwargs, num_members=4)
    x = torch.randn(6, 1, 8, 8)
    state = checkpoint_round_trip(tmp_path, model, fresh, x)
    assert state["ensemble.seeds"].dtype == torch.long  # the members' seeds travel as a buffer
    ens = build_ensemble("mc_dropout", "mlp", num_members=2, backbone_kwargs={**DIGITS_MLP, "dropout": 0.1})
    assert ens.num_members == 2


def test_ensembling_callback_and_calibration_metrics():
    acc = ensembling_callback_fit("mc_dropout", 4, {})
    assert acc > 0.7


def test_cli_with_diversity_term_weight_averaging_and_calibration(tmp_path):
    cli = cli_fit_with_diversity_averaging_and_calibration(
        tmp_path, "mc_dropout", {"p": 0.2, "insert_before": ["net.3"]}
    )
    assert type(cli.model.ensemble).__name__ == "MCDropout"
