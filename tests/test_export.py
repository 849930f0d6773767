"""Export for deployment: every ensemble method x {torch.export, ONNX, member(i) export}, checked against eager.

The table in docs/export.md is what these tests measure: a method that stops exporting fails here.
"""

import warnings

import pytest
import timm
import torch
from _models import tiny_vit
from torch import nn

from lightning_ensembles.ensembles.registry import ENSEMBLE_METHODS, _load_builtin_methods, build_ensemble
from lightning_ensembles.export import ExportError, export_ensemble, export_member, export_onnx

_load_builtin_methods()

pytest.importorskip("onnxscript")
pytest.importorskip("onnxruntime")

#: Method-specific arguments for the test backbones (LoRA needs its target layers named on an MLP/CNN).
ARGS = {
    "mlp": {"lora": dict(target_modules=["0", "3"]), "tta": dict(num_members=2)},
    # resnet10t has no dropout: MC-Dropout inserts one before the classifier
    "conv": {"tta": dict(num_members=2), "mc_dropout": dict(p=0.1, insert_before=["fc"])},
    # 2 heads: a packed attention needs the heads to split among members
    "vit": {"tta": dict(num_members=2), "mc_dropout": dict(p=0.1), "packed": dict(num_members=2)},
}
METHODS = sorted(ENSEMBLE_METHODS)


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Dropout(0.1), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))


BACKBONES = {
    "mlp": (_mlp, (5, 8)),
    "conv": (lambda: timm.create_model("resnet10t", pretrained=False, num_classes=4), (2, 3, 32, 32)),
    "vit": (lambda: tiny_vit(num_classes=4, img_size=16, depth=1, embed_dim=32, num_heads=2), (2, 3, 16, 16)),
}


def _build(method: str, backbone: str):
    make, shape = BACKBONES[backbone]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ens = build_ensemble(method, make(), **{"num_members": 3, **ARGS[backbone].get(method, {})})
    return ens.eval(), torch.randn(*shape)


def test_every_registered_method_is_covered():
    assert set(METHODS) >= {
        "deep",
        "packed",
        "batch",
        "lora",
        "symmetry",
        "mc_dropout",
        "mimo",
        "masksembles",
        "tta",
        "asymmetric",
    }
    assert set(METHODS) == set(ENSEMBLE_METHODS)


@pytest.mark.parametrize("method", METHODS)
def test_torch_export_and_member_export(method):
    ens, x = _build(method, "mlp")
    program = export_ensemble(ens, x)  # checks against eager itself; checked again here
    with torch.no_grad():
        want = ens(x)
        assert torch.allclose(program.module()(x), want, atol=1e-5)
        x2 = torch.randn(x.shape[0] + 2, *x.shape[1:])  # the batch axis is dynamic for every method
        assert torch.allclose(program.module()(x2), ens(x2), atol=1e-5)
    assert want.shape[0] == ens.num_members
    member = export_member(ens, 1, x)
    with torch.no_grad():
        got = member.module()(x)
    assert torch.allclose(got, want[1], atol=1e-5)
    # the member's program is a plain model: one input, its own weights, output without a member axis
    assert len(member.graph_signature.user_inputs) == 1
    assert got.shape == want.shape[1:]


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_onnx_export_matches_eager(method, tmp_path):
    ens, x = _build(method, "mlp")
    path = tmp_path / f"{method}.onnx"
    export_onnx(ens, x, path)  # runs onnxruntime against eager at two batch sizes
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        assert torch.allclose(torch.from_numpy(got), ens(x), atol=1e-4)
    export_onnx(ens.member(0), x)


@pytest.mark.slow
@pytest.mark.parametrize("backbone", ["conv", "vit"])
@pytest.mark.parametrize("method", METHODS)
def test_timm_backbones_export(method, backbone):
    if method == "lora" and backbone == "conv":
        pytest.skip("LoRA adapts Linear/attention layers; a ResNet has only its classifier (covered by the MLP)")
    ens, x = _build(method, backbone)
    program = export_ensemble(ens, x, atol=1e-4)
    with torch.no_grad():
        assert program.module()(x).shape[:2] == (ens.num_members, x.shape[0])
    if backbone == "vit":  # member export on the conv net is the same code path, and slow on 2 cores
        export_member(ens, ens.num_members - 1, x, atol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["deep", "packed", "mc_dropout"])
def test_timm_vit_onnx(method):
    ens, x = _build(method, "vit")
    export_onnx(ens, x)


def test_mc_dropout_export_keeps_distinct_seeded_samples():
    ens, x = _build("mc_dropout", "mlp")
    program = export_ensemble(ens, x)
    with torch.no_grad():
        out = program.module()(x)
    assert not torch.allclose(out[0], out[1])  # members are different thinned networks, also exported
    assert torch.allclose(out, ens(x), atol=1e-5)


def test_deep_ensemble_exports_a_plain_graph():
    ens, x = _build("deep", "mlp")
    program = export_ensemble(ens, x)
    targets = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert not any("vmap" in t or "batch_dim" in t for t in targets), targets
    linears = [n for n in program.graph.nodes if n.op == "call_function" and "linear" in str(n.target)]
    assert len(linears) == 3 * ens.num_members  # members unrolled: each runs its own three layers


class _ExportDiffers(nn.Module):
    def forward(self, x):
        return x + 1 if torch.compiler.is_exporting() else x


def test_mismatch_is_an_error_naming_the_model():
    with pytest.raises(ExportError, match="_ExportDiffers.*differs from the eager model"):
        export_ensemble(_ExportDiffers(), torch.randn(3, 2))
    with pytest.raises(ValueError, match="example_input"):
        export_ensemble(_ExportDiffers(), [torch.randn(3, 2)])
