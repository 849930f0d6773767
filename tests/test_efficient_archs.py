"""Packed-Ensembles and BatchEnsemble conversion of real architectures (timm families, torchvision, MLP)."""

import pytest
import timm
import torch
import torchvision
from torch import nn

from lightning_ensembles.backbones import MLP
from lightning_ensembles.ensembles.batch import BatchEnsemble, BatchEnsembleLayer, PerMemberBatchNorm, PerMemberLinear
from lightning_ensembles.ensembles.packed import PackedEnsemble

M = 2
ARCHS = {
    "resnet10t": lambda: timm.create_model("resnet10t", num_classes=5),
    "mobilenetv3_small_050": lambda: timm.create_model("mobilenetv3_small_050", num_classes=5),  # depthwise + SE
    "convnext": lambda: timm.create_model("convnext_atto", num_classes=5, depths=(1, 1, 1, 1), dims=(8, 16, 16, 32)),
    "regnetx_002": lambda: timm.create_model("regnetx_002", num_classes=5),  # grouped convs
    "vit": lambda: timm.create_model(
        "vit_tiny_patch16_224", num_classes=5, img_size=16, patch_size=8, depth=2, embed_dim=16, num_heads=2
    ),
    "tinynet_e": lambda: timm.create_model("tinynet_e", num_classes=5),  # EfficientNet family
    "tv_resnet18": lambda: torchvision.models.resnet18(num_classes=5),
    "mlp": lambda: MLP(3 * 16 * 16, 5, hidden=(16, 16)),
}


def _pretrained_style(model: nn.Module, seed: int = 0) -> nn.Module:
    """Known, non-trivial weights everywhere (timm zero-inits some heads and residual BN weights)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2 + (1.0 if p.dim() == 1 else 0.0))
        for name, b in model.named_buffers():
            if name.endswith("running_var"):
                b.copy_(torch.rand(b.shape, generator=g) + 0.5)
            elif name.endswith("running_mean"):
                b.copy_(torch.randn(b.shape, generator=g) * 0.1)
    return model.eval()


@pytest.fixture(scope="module", params=list(ARCHS))
def arch(request):
    torch.manual_seed(0)
    size = 32 if request.param == "convnext" else 16  # ConvNeXt downsamples by 32
    return request.param, _pretrained_style(ARCHS[request.param]()), torch.randn(2, 3, size, size)


def _perturb_packed_member0(ens: PackedEnsemble) -> None:
    with torch.no_grad():
        for name, p in ens.model.named_parameters():
            axis = ens._member_axes.get(name)
            if axis is not None:
                p.unflatten(axis, (M, -1)).select(axis, 0).add_(
                    torch.randn_like(p.unflatten(axis, (M, -1)).select(axis, 0))
                )


def _perturb_batch_member0(ens: BatchEnsemble) -> None:
    with torch.no_grad():
        for mod in ens.model.modules():
            if isinstance(mod, (BatchEnsembleLayer, PerMemberBatchNorm, PerMemberLinear)):
                for p in mod.parameters(recurse=False):
                    p[0].add_(torch.randn_like(p[0]) * 0.3)


def _check(ens, backbone, x, perturb, exact):
    with torch.no_grad():
        out = ens(x)
        assert out.shape == (M, 2, 5)
        if exact:  # pretrained weights survive: every member equals the backbone at step 0
            torch.testing.assert_close(out, backbone(x).expand(M, -1, -1), atol=1e-5, rtol=1e-4)
        for i in range(M):
            torch.testing.assert_close(ens.member(i)(x), out[i], atol=1e-5, rtol=1e-4)
        perturb(ens)
        out2 = ens(x)
    assert not torch.equal(out2[0], out[0])
    for i in range(1, M):
        assert torch.equal(out2[i], out[i]), f"member {i} changed when only member 0's weights did"


def _check_backward(ens, x, member_grad):
    ens.train()
    out = ens(x)
    for i in range(M):  # each member's own loss reaches that member's parameters
        ens.zero_grad()
        out[i].square().mean().backward(retain_graph=True)
        assert member_grad(ens, i) > 0 and all(member_grad(ens, j) == 0 for j in range(M) if j != i)


def _packed_grad(ens, i):
    total = 0.0
    for name, p in ens.model.named_parameters():
        axis = ens._member_axes.get(name)
        if axis is not None and p.grad is not None:
            total += p.grad.unflatten(axis, (M, -1)).select(axis, i).abs().sum().item()
    return total


def _batch_grad(ens, i):
    return sum(
        mod.s.grad[i].abs().sum().item()
        for mod in ens.model.modules()
        if isinstance(mod, BatchEnsembleLayer) and mod.s.grad is not None
    )


def test_packed_conversion(arch):
    name, backbone, x = arch
    ens = PackedEnsemble(backbone, num_members=M, alpha=M, init="copy")
    assert ens.converted
    _check(ens, backbone, x, _perturb_packed_member0, exact=True)
    _check_backward(ens, x, _packed_grad)


def test_batch_conversion(arch):
    name, backbone, x = arch
    ens = BatchEnsemble(backbone, num_members=M, init="ones")
    _check(ens, backbone, x, _perturb_batch_member0, exact=True)
    ens.reset_fast_weights()
    _check_backward(ens, x, _batch_grad)


def test_mlp_mixer_is_refused_with_path():
    from timm.models.mlp_mixer import MlpMixer

    mixer = MlpMixer(num_classes=5, img_size=16, patch_size=8, num_blocks=1, embed_dim=16)
    with pytest.raises(ValueError, match=r"'blocks\.0'.*token-mixing"):
        PackedEnsemble(mixer, num_members=2)
