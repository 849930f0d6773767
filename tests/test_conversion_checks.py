"""Conversions check themselves: every failure class of issue 16, item 1.

Each test fails on the converters before verification/data-flow tracing: DenseNet's concatenation
coupled members, F.normalize and channel shuffles were converted silently, F.linear on a converted
layer crashed, and registration order picked the wrong input/output layers.
"""

import warnings

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

from lightning_ensembles.ensembles.batch import BatchEnsemble
from lightning_ensembles.ensembles.dataflow import trace_layers
from lightning_ensembles.ensembles.lora import LoRAEnsemble
from lightning_ensembles.ensembles.packed import PackedEnsemble
from lightning_ensembles.ensembles.surgery import ConversionError
from lightning_ensembles.ensembles.verify import make_probe

_NEW = "example_input" in PackedEnsemble.__init__.__code__.co_varnames  # False only when run against the old code


def _members_match_and_independent(ens, x, m):
    """Independent of the library's verification: member(i) == out[i]; perturbing member 0 moves only output 0."""
    ens.eval()
    with torch.no_grad():
        out = ens(x)
        for i in range(m):
            torch.testing.assert_close(ens.member(i).eval()(x), out[i], atol=1e-5, rtol=1e-4)
        for blocks in ens.stacked_parameters().values():  # (M, ...) views of each member's own tensors
            blocks[0].add_(torch.randn_like(blocks[0]))
        out2 = ens(x)
    assert not torch.equal(out2[0], out[0])
    for i in range(1, m):
        assert torch.equal(out2[i], out[i]), f"member {i} changed when only member 0's tensors did"


class DenseBlock(nn.Module):
    """DenseNet-style: each layer reads the concatenation of all previous feature maps."""

    def __init__(self, c=4, growth=3, layers=2, classes=3):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.layers = nn.ModuleList(
            nn.Sequential(nn.BatchNorm2d(c + k * growth), nn.ReLU(), nn.Conv2d(c + k * growth, growth, 3, padding=1))
            for k in range(layers)
        )
        self.head = nn.Linear(c + layers * growth, classes)

    def forward(self, x):
        feats = [self.stem(x)]
        for layer in self.layers:
            feats.append(layer(torch.cat(feats, 1)))
        return self.head(torch.cat(feats, 1).mean((2, 3)))


def test_densenet_concatenation_keeps_members_independent():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    ens = PackedEnsemble(DenseBlock(), num_members=2, alpha=2)
    _members_match_and_independent(ens, x, 2)
    assert ens.verification.passed and ens.channel_sites  # the torch.cat calls are rewritten per member
    # alpha != M: member widths differ from the backbone's and the concatenation still follows them
    _members_match_and_independent(PackedEnsemble(DenseBlock(c=8, growth=4), num_members=4, alpha=2), x, 4)


def test_tiny_timm_densenet_member_equals_output():
    torch.manual_seed(0)
    net = timm.create_model("densenet121", num_classes=3, growth_rate=4, block_config=(1, 2))
    x = torch.randn(2, 3, 32, 32)
    ens = PackedEnsemble(net, num_members=2, alpha=2, **({"example_input": x} if _NEW else {}))
    _members_match_and_independent(ens, x, 2)


class SplitGhost(nn.Module):
    """CSP split (x.split with the backbone's widths) and Ghost-style concatenate-then-slice."""

    def __init__(self, c=8, classes=3):
        super().__init__()
        self.c = c
        self.stem = nn.Conv2d(3, c, 1)
        self.a, self.b = nn.Conv2d(c // 2, c // 2, 3, padding=1), nn.Conv2d(c // 2, c, 1)
        self.head = nn.Linear(c, classes)

    def forward(self, x):
        h = self.stem(x)
        left, right = h.split([self.c // 2, self.c // 2], dim=1)
        h = torch.cat([self.a(left), right], dim=1)
        h = torch.cat([h, self.b(left)], dim=1)[:, : self.c]
        return self.head(h.mean((2, 3)))


@pytest.mark.parametrize(("m", "alpha"), [(2, 2), (4, 2)])
def test_split_and_slice_are_applied_per_member(m, alpha):
    x = torch.randn(2, 3, 6, 6)
    ens = PackedEnsemble(SplitGhost(), num_members=m, alpha=alpha)
    _members_match_and_independent(ens, x, m)
    kinds = {site.split("(")[-1].rstrip(")") for site in ens.channel_sites}
    assert {"split", "cat", "getitem"} <= kinds


class Normalized(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 8), nn.Linear(8, 3)

    def forward(self, x):
        return self.fc2(F.normalize(self.fc1(x), dim=-1))  # the norm runs over every member's features


def test_normalize_across_members_is_refused_naming_the_operation():
    with pytest.raises(ConversionError, match=r"not independent.*normalize at test_conversion_checks.py"):
        PackedEnsemble(Normalized(), num_members=2)
    # BatchEnsemble keeps members on the batch axis, where the same code is per member
    assert BatchEnsemble(Normalized(), num_members=2).verification.passed


class Shuffle(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp, self.mid, self.out = nn.Conv2d(3, 4, 1), nn.Conv2d(4, 4, 1, groups=2), nn.Conv2d(4, 3, 1)

    def forward(self, x):
        h = self.mid(self.inp(x))
        b, c, hh, ww = h.shape
        h = h.view(b, 2, c // 2, hh, ww).transpose(1, 2).reshape(b, c, hh, ww)  # ShuffleNet channel shuffle
        return self.out(h).mean((2, 3))


def test_channel_shuffle_is_refused_naming_module_and_operation():
    with pytest.raises(
        ConversionError,
        match=r"module '<root>'.*not independent.*(transpose|reshape|view) at "
        r"test_conversion_checks.py",
    ):
        PackedEnsemble(Shuffle(), num_members=2)


class ReadsWeight(nn.Module):
    """Calls F.linear with a child layer's weight instead of calling the layer (weight tying style)."""

    def __init__(self):
        super().__init__()
        self.inp, self.proj, self.out = nn.Linear(4, 6), nn.Linear(6, 6), nn.Linear(6, 3)

    def forward(self, x):
        return self.out(F.linear(self.inp(x).relu(), self.proj.weight, self.proj.bias).relu())


def test_f_linear_on_a_converted_layer_works_or_refuses_clearly():
    x = torch.randn(3, 4)
    with pytest.warns(UserWarning, match=r"\['proj'\].*never runs"):
        batch = BatchEnsemble(ReadsWeight(), num_members=2)
    assert batch.shared_layers == ["proj"]  # kept plain and shared: the direct read sees a real weight
    _members_match_and_independent(batch, x, 2)
    with pytest.raises(ConversionError, match=r"module '<root>'.*ReadsWeight.*reads a converted layer's weight"):
        PackedEnsemble(ReadsWeight(), num_members=2)


def test_batch_layer_weight_access_names_the_fix():
    from lightning_ensembles.ensembles.batch import BatchEnsembleLayer

    layer = BatchEnsembleLayer(nn.Linear(2, 2), 2, path="fc")
    with pytest.raises(AttributeError, match=r"exclude=\['fc'\]"):
        layer.weight  # noqa: B018


def test_output_layer_registered_first_torch_uncertainty_mlp():
    from torch_uncertainty.models.mlp import mlp

    net = mlp(in_features=5, num_outputs=3, hidden_dims=[8, 8])
    assert next(n for n, m in net.named_modules() if isinstance(m, nn.Linear)) == "final_layer"
    x = torch.randn(4, 5)
    ens = PackedEnsemble(net, num_members=2, alpha=2)
    _members_match_and_independent(ens, x, 2)
    assert ens.first_layer == ["layers.0"] and ens.last_layer == ["final_layer"]
    flow = trace_layers(net, torch.randn(2, 5))
    assert flow.first == ["layers.0"] and flow.last == ["final_layer"]
    tabm = BatchEnsemble(net, num_members=2, independent_head=True)
    assert type(tabm.model.final_layer).__name__ == "PerMemberLinear"


def test_input_feeding_several_layers_inception_time():
    from torch_uncertainty.models.classification.inception_time import inception_time

    net = inception_time(in_channels=2, num_classes=3, num_blocks=1, embed_dim=4, kernel_size=8)
    x = torch.randn(2, 2, 16)
    ens = PackedEnsemble(net, num_members=2, alpha=2, **({"example_input": x} if _NEW else {}))
    _members_match_and_independent(ens, x, 2)
    flow = trace_layers(net, x)
    assert len(flow.first) > 1  # the input feeds the three convolutions and the max-pool branch


class Attention(nn.Module):
    """Named like timm's Attention, with qkv/proj/num_heads, but computing something else."""

    def __init__(self, dim=8, num_heads=2):
        super().__init__()
        self.num_heads, self.qkv, self.proj = num_heads, nn.Linear(dim, dim * 3), nn.Linear(dim, dim)

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        return self.proj(torch.sigmoid(q) * k + v)


def test_module_named_attention_is_not_mistaken_for_timms():
    net = nn.Sequential(nn.Linear(4, 8), Attention(), nn.Linear(8, 3))
    x = torch.randn(2, 5, 4)
    ens = PackedEnsemble(net, num_members=2, alpha=2, **({"example_input": x} if _NEW else {}))
    _members_match_and_independent(ens, x, 2)


def test_verification_that_did_not_run_is_not_reported_as_passed():
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    ens = PackedEnsemble(net, num_members=2, verify=False, first_layer="0", last_layer="2")
    assert not ens.verification.ran and not ens.verification.passed
    assert "not verified" in str(ens.verification)
    checked = PackedEnsemble(net, num_members=2)
    assert checked.verification.ran and checked.verification.passed and "independent" in str(checked.verification)


def test_no_probe_asks_for_example_input():
    class TwoInputs(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            return self.fc(x[..., :4] * x[..., 4:])

    with pytest.raises(ValueError, match=r"example_input="):
        PackedEnsemble(TwoInputs(), num_members=2)
    assert make_probe(TwoInputs(), input_shape=(8,)).shape == (2, 8)
    ens = PackedEnsemble(TwoInputs(), num_members=2, input_shape=(8,))
    assert ens.verification.passed


def test_lora_skips_targets_read_directly_and_verifies():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.Module()
            self.attn.qkv, self.attn.proj = nn.Linear(8, 8), nn.Linear(8, 8)
            self.head = nn.Linear(8, 3)

        def forward(self, x):
            return self.head(self.attn.proj(F.linear(x, self.attn.qkv.weight)).mean(1))

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ens = LoRAEnsemble(Block(), num_members=2, rank=2, example_input=torch.randn(2, 5, 8))
    assert ens.skipped_targets == ["attn.qkv"] and ens.adapted_modules == ["attn.proj"]
    assert any("never runs" in str(w.message) for w in caught)
    assert ens.verification.passed


class HeadsAttention(nn.Module):
    """ViT-style attention that is not timm's class: heads split with self.num_heads from a fused qkv."""

    def __init__(self, dim=8, num_heads=2):
        super().__init__()
        self.num_heads, self.qkv, self.proj = num_heads, nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, c))


class TokenNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed, self.attn, self.head = nn.Linear(4, 8), HeadsAttention(), nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.attn(self.embed(x)).mean(1))


def test_other_attention_modules_run_members_as_extra_heads():
    x = torch.randn(2, 5, 4)
    ens = PackedEnsemble(TokenNet(), num_members=2, alpha=2, **({"example_input": x} if _NEW else {}))
    _members_match_and_independent(ens, x, 2)
    assert ens.model.attn.num_heads == 4  # 2 members x 2 heads; the fused qkv output is reordered part-major
