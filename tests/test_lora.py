"""LoRAEnsemble: batched adapters on a frozen shared backbone (timm ViT and nn.MultiheadAttention)."""

from __future__ import annotations

import copy
import math

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

from lightning_ensembles.ensembles.lora import BatchedLoRAMultiheadAttention, LoRAEnsemble, LoRAFactors
from lightning_ensembles.ensembles.registry import build_ensemble

M = 3
EMBED, DEPTH, HEADS, CLASSES = 32, 2, 2, 10


def tiny_vit(**kw) -> nn.Module:
    cfg = dict(
        pretrained=False,
        img_size=8,
        patch_size=2,
        in_chans=1,
        embed_dim=EMBED,
        depth=DEPTH,
        num_heads=HEADS,
        num_classes=CLASSES,
    )
    cfg.update(kw)
    return timm.create_model("vit_tiny_patch16_224", **cfg)


class MHANet(nn.Module):
    """Patch tokens -> nn.MultiheadAttention (batch_first) -> MLP -> mean pool -> head."""

    def __init__(self, dim: int = 16, heads: int = 2, classes: int = 5):
        super().__init__()
        self.embed = nn.Linear(4, dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.head = nn.Linear(dim, classes)

    def forward(self, x):
        t = self.embed(x.reshape(x.shape[0], -1, 4))  # (B, 16, dim) from 1x8x8
        t = t + self.attn(t, t, t, need_weights=False)[0]
        t = t + self.mlp(t)
        return self.head(t.mean(1))


class EncoderNet(nn.Module):
    """Sequence-first nn.TransformerEncoderLayer (batch on dim 1)."""

    def __init__(self, dim: int = 16, classes: int = 4):
        super().__init__()
        self.embed = nn.Linear(4, dim)
        self.enc = nn.TransformerEncoderLayer(dim, 2, dim_feedforward=32, dropout=0.0, batch_first=False)
        self.head = nn.Linear(dim, classes)

    def forward(self, x):
        t = self.embed(x.reshape(x.shape[0], -1, 4)).transpose(0, 1)  # (L, B, dim)
        return self.head(self.enc(t).mean(0))


def head_member_reference(backbone: nn.Module, ens: LoRAEnsemble, i: int, head: str = "head") -> nn.Module:
    """The frozen backbone with member i's head: what member i must equal while B = 0."""
    ref = copy.deepcopy(backbone)
    h = ens.backbone.get_submodule(head)
    with torch.no_grad():
        ref.get_submodule(head).weight.copy_(h.weight[i])
        ref.get_submodule(head).bias.copy_(h.bias[i])
    return ref.eval()


def train_steps(ens: LoRAEnsemble, x: torch.Tensor, y: torch.Tensor, steps: int = 3, lr: float = 1e-2) -> list[float]:
    opt = torch.optim.Adam([p for p in ens.parameters() if p.requires_grad], lr=lr)
    losses = []
    for _ in range(steps):
        out = ens(x)
        loss = F.cross_entropy(out.reshape(-1, out.shape[-1]), y.repeat(ens.num_members))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses


def frozen_state(ens: LoRAEnsemble) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in ens.named_parameters() if not p.requires_grad}


# ---------------------------------------------------------------------------- timm ViT
def test_vit_shapes_step0_equivalence_and_frozen_after_step():
    vit = tiny_vit().eval()
    ens = LoRAEnsemble(vit, num_members=M, rank=4).eval()
    x, y = torch.randn(5, 1, 8, 8), torch.randint(0, CLASSES, (5,))
    out = ens(x)
    assert out.shape == (M, 5, CLASSES)
    assert ens.adapted_modules == [f"blocks.{i}.attn.{p}" for i in range(DEPTH) for p in ("qkv", "proj")]
    for i in range(M):  # B = 0: member i is the frozen backbone plus its own head
        torch.testing.assert_close(out[i], head_member_reference(vit, ens, i)(x), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(out[0], out[1])  # heads differ

    before = frozen_state(ens)
    lora_before = {n: p.detach().clone() for n, p in ens.named_parameters() if p.requires_grad}
    ens.train()
    losses = train_steps(ens, x, y, steps=5)
    assert losses[-1] < losses[0]
    after = frozen_state(ens)
    assert before.keys() == after.keys() and len(before) == sum(1 for _ in vit.parameters()) - 2  # all but the head
    for n in before:
        assert torch.equal(before[n], after[n]), f"frozen weight {n} changed"
    for n, p in ens.named_parameters():
        if p.requires_grad and (".B" in n or "head" in n):
            assert not torch.equal(lora_before[n], p), f"trainable {n} did not change"
    assert torch.equal(
        dict(vit.named_parameters())["blocks.0.attn.qkv.weight"], ens.backbone.blocks[0].attn.qkv.base.weight
    )  # the given module was not modified


def test_vit_member_reproduces_member_after_training():
    vit = tiny_vit()
    ens = LoRAEnsemble(vit, num_members=M, rank=4)
    x, y = torch.randn(6, 1, 8, 8), torch.randint(0, CLASSES, (6,))
    train_steps(ens, x, y, steps=3)
    ens.eval()
    out = ens(x)
    for i in range(M):
        member = ens.member(i)
        assert type(member) is type(vit)
        assert not any("Batched" in type(m).__name__ for m in member.modules())
        torch.testing.assert_close(member(x), out[i], atol=1e-5, rtol=1e-4)
    assert ens.member(-1).head.weight.shape == (CLASSES, EMBED)


def test_vit_trainable_parameter_formula():
    r = 4
    ens = LoRAEnsemble(tiny_vit(), num_members=M, rank=r)
    per_block = r * (3 * EMBED + 3 * EMBED) + r * (EMBED + EMBED)  # qkv: 3 slices r*(E + E); proj: r*(E + E)
    expected = M * (DEPTH * per_block + EMBED * CLASSES + CLASSES)
    assert ens.trainable_parameters() == expected
    summary = ens.parameter_summary()
    assert summary["deep_ensemble_trainable"] == M * sum(p.numel() for p in tiny_vit().parameters())
    assert summary["trainable_fraction_of_deep"] < 0.2


def test_unfused_qkv_and_pattern_selection():
    ens = LoRAEnsemble(
        tiny_vit(), num_members=2, rank=2, target_modules=["blocks.1.mlp.fc1"], fused_qkv=False, head=None
    )
    assert ens.adapted_modules == ["blocks.1.mlp.fc1"]
    assert ens.trainable_parameters() == 2 * 2 * (EMBED + 4 * EMBED)  # no per-member head
    one = LoRAEnsemble(tiny_vit(), num_members=2, rank=2, target_modules=["*qkv"], fused_qkv=False, head=None)
    assert one.trainable_parameters() == 2 * DEPTH * 2 * (EMBED + 3 * EMBED)  # one rank-2 pair per fused matrix


def test_build_from_registry_with_timm_name():
    ens = build_ensemble(
        "lora",
        "vit_tiny_patch16_224",
        num_members=2,
        backbone_kwargs=dict(img_size=8, patch_size=2, in_chans=1, embed_dim=16, depth=1, num_heads=2, num_classes=3),
        rank=2,
    )
    assert isinstance(ens, LoRAEnsemble)
    assert ens(torch.randn(4, 1, 8, 8)).shape == (2, 4, 3)


# ---------------------------------------------------------------------------- batched factors vs a loop
def test_factors_match_per_member_loop_reference():
    f = LoRAFactors(num_members=3, in_features=5, out_features=6, rank=2, splits=3, scaling=0.5, init_gain=1.0)
    with torch.no_grad():
        f.B.normal_()
    x = torch.randn(3 * 4, 7, 5)  # (M * B, tokens, in)
    got = f.delta(x)
    for m in range(3):
        xm = x[m * 4 : (m + 1) * 4]
        ref = torch.cat([xm @ f.A[m, s].T @ f.B[m, s].T for s in range(3)], dim=-1) * 0.5
        torch.testing.assert_close(got[m * 4 : (m + 1) * 4], ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(xm @ f.delta_weight(m).T, ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(f.delta(x, block=1)[m * 4 : (m + 1) * 4], ref[..., 2:4], atol=1e-5, rtol=1e-5)


def test_xavier_init_per_member_and_gain():
    f = LoRAFactors(num_members=4, in_features=120, out_features=30, rank=8, init_gain=10.0)
    bound = 10.0 * math.sqrt(6.0 / (8 + 120))  # Xavier-uniform on a (rank, in) matrix
    A = f.A.detach()
    assert float(A.abs().max()) <= bound + 1e-6
    assert abs(float(A.std()) - bound / math.sqrt(3)) < 0.05 * bound
    assert not torch.allclose(f.A[0], f.A[1])
    assert torch.count_nonzero(f.B) == 0


# ---------------------------------------------------------------------------- nn.MultiheadAttention
def test_mha_backbone_step0_training_and_member():
    net = MHANet().eval()
    ens = LoRAEnsemble(net, num_members=M, rank=2)
    assert ens.adapted_modules == ["attn"]  # default targets: every nn.MultiheadAttention
    assert ens.trainable_parameters() == M * (8 * 2 * 16 + 16 * 5 + 5)
    x, y = torch.randn(4, 1, 8, 8), torch.randint(0, 5, (4,))
    out = ens.eval()(x)
    assert out.shape == (M, 4, 5)
    for i in range(M):
        torch.testing.assert_close(out[i], head_member_reference(net, ens, i)(x), atol=1e-5, rtol=1e-5)
    before = frozen_state(ens)
    ens.train()
    train_steps(ens, x, y, steps=3)
    assert all(torch.equal(before[n], p) for n, p in frozen_state(ens).items())
    ens.eval()
    out = ens(x)
    for i in range(M):
        member = ens.member(i)
        assert isinstance(member.attn, nn.MultiheadAttention)
        torch.testing.assert_close(member(x), out[i], atol=1e-5, rtol=1e-4)


def test_sequence_first_transformer_encoder_layer():
    net = EncoderNet().eval()
    ens = LoRAEnsemble(net, num_members=2, rank=2)
    assert ens.adapted_modules == ["enc.self_attn"]
    x, y = torch.randn(3, 1, 8, 8), torch.randint(0, 4, (3,))
    train_steps(ens.train(), x, y, steps=2)
    ens.eval()
    with torch.no_grad():  # no_grad + eval is where PyTorch's fused fast path would kick in
        out = ens(x)
        for i in range(2):
            torch.testing.assert_close(ens.member(i)(x), out[i], atol=1e-5, rtol=1e-4)
    # A batch-first Linear target inside a sequence-first model is refused by the verification, naming it.
    with pytest.raises(ValueError, match="enc.linear1"):
        LoRAEnsemble(net, num_members=2, rank=2, target_modules=["enc.linear1"])
    bad = LoRAEnsemble(net, num_members=2, rank=2, target_modules=["enc.linear1"], verify=False)
    with pytest.raises(ValueError, match="enc.linear1"):  # and at run time without verification
        bad(x)


@pytest.mark.parametrize("batch_first", [True, False])
def test_mha_wrapper_matches_torch_with_masks(batch_first):
    mha = nn.MultiheadAttention(8, 2, batch_first=batch_first).eval()
    lora = BatchedLoRAMultiheadAttention(mha, num_members=2, rank=2).eval()
    q, kv = torch.randn(4, 3, 8), torch.randn(4, 5, 8)  # 2 members x batch 2; cross-attention
    if not batch_first:
        q, kv = q.transpose(0, 1), kv.transpose(0, 1)
    kpm = torch.zeros(4, 5, dtype=torch.bool)
    kpm[:, -1] = True
    attn_mask = torch.rand(3, 5) > 0.6
    attn_mask[:, 0] = False  # every query keeps a key
    for need in (True, False):
        got, w = lora(q, kv, kv, key_padding_mask=kpm, attn_mask=attn_mask, need_weights=need)
        ref, rw = mha(q, kv, kv, key_padding_mask=kpm, attn_mask=attn_mask, need_weights=need)
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
        if need:
            torch.testing.assert_close(w, rw, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------- bad input
def test_errors_list_what_is_available():
    with pytest.raises(ValueError, match=r"matched no nn.Linear.*Available: \['blocks.0.attn.qkv"):
        LoRAEnsemble(tiny_vit(), target_modules=["*does_not_exist*"])
    with pytest.raises(ValueError, match="`rank` must be an integer >= 1"):
        LoRAEnsemble(tiny_vit(), rank=0)
    with pytest.raises(ValueError, match="target 'attn' instead"):
        LoRAEnsemble(MHANet(), target_modules=["attn.out_proj"])
    with pytest.raises(ValueError, match="per-member head must be nn.Linear"):
        LoRAEnsemble(tiny_vit(), head="blocks.0")
    with pytest.raises(ValueError, match="classifier is a Identity"):
        LoRAEnsemble(tiny_vit(num_classes=0))
    with pytest.raises(ValueError, match="not a submodule"):
        LoRAEnsemble(tiny_vit(), head="nope")
    with pytest.raises(ValueError, match="add_bias_kv"):
        LoRAEnsemble(nn.Sequential(nn.MultiheadAttention(8, 2, add_bias_kv=True)), head=None, verify=False)
