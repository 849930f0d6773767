"""Conversion zoo: Deep, Packed, BatchEnsemble and (attention models) LoRA with M = 2 over many timm
architectures and torch-uncertainty's standard builders.

For every (model, method) the conversion either **works**, **refuses** clearly (``ConversionError``),
**crashes** (any other exception, at conversion or at the first forward) or is **silently wrong**.
"Works" is decided by checks written here, apart from the converters' own verification:

* the backbone gets known, non-trivial "pretrained" weights and the ensemble starts from them
  (Deep/Packed ``init="copy"``, BatchEnsemble ``init="ones"``, LoRA ``head_init="copy"``; B = 0), so every
  member must equal the backbone: ``out[i] == backbone(x)`` (relative tolerance 1e-3);
* member 0's own tensors are perturbed (``member_parameter_axes()`` / ``stacked_parameters()``): output 0
  must change and every other output must stay bit-for-bit equal;
* after the perturbation ``member(i)(x) == out[i]`` for every member.

A failure of any of these counts as silently wrong. torch-uncertainty's builders are also compared,
where it has a hand-written packed model, by parameter count (``alpha=2, gamma=1, M=4``).

    python benchmarks/zoo.py                     # every model (about 15 minutes on one CPU thread)
    python benchmarks/zoo.py --quick             # 6 models
    python benchmarks/zoo.py --models resnet10t densenet --methods packed
"""

from __future__ import annotations

import argparse
import copy
import signal
import time
import traceback
import warnings
from collections import Counter

import timm
import torch
from torch import nn

from lightning_ensembles.ensembles.batch import BatchEnsemble
from lightning_ensembles.ensembles.deep import DeepEnsemble
from lightning_ensembles.ensembles.lora import LoRAEnsemble
from lightning_ensembles.ensembles.packed import PackedEnsemble
from lightning_ensembles.ensembles.surgery import ConversionError

try:
    from _timing import parse_with_threads
except ImportError:  # run as a module
    from benchmarks._timing import parse_with_threads

M = 2
K = 5  # classes
V = dict(img_size=32)
# name -> (family, timm name, kwargs, input size, has attention)
ZOO: dict[str, tuple[str, str, dict, int, bool]] = {
    "resnet10t": ("ResNet", "resnet10t", {}, 32, False),
    "resnet18": ("ResNet", "resnet18", {}, 32, False),
    "skresnet18": ("ResNet (selective kernel)", "skresnet18", {}, 32, False),
    "res2net": ("Res2Net", "res2net50_14w_8s", {"layers": [1, 1, 1, 1]}, 32, False),
    "dpn48b": ("DPN (dual path: split + cat)", "dpn48b", {}, 32, False),
    "densenet": ("DenseNet", "densenet121", {"growth_rate": 8, "block_config": (2, 2, 2, 2)}, 32, False),
    "cspresnet50": ("CSP", "cspresnet50", {}, 32, False),
    "cs3darknet_focus_s": ("CSP (CSP3)", "cs3darknet_focus_s", {}, 32, False),
    "cspnext_tiny": ("CSP (CSPNeXt)", "cspnext_tiny", {}, 32, False),
    "test_byobnet": ("BYOBNet", "test_byobnet", {}, 32, False),
    "test_nfnet": ("NFNet (weight-standardised convs)", "test_nfnet", {}, 32, False),
    "test_efficientnet_gn": ("EfficientNet (GroupNorm)", "test_efficientnet_gn", {}, 32, False),
    "test_coatnet": ("CoAtNet", "test_coatnet", {}, 160, True),
    "test_maxvit": ("MaxViT", "test_maxvit", {}, 160, True),
    "test_vit_relpos": ("ViT (relative position)", "test_vit_relpos", {}, 160, True),
    "vovnet": ("VoVNet (OSA concat)", "ese_vovnet19b_slim_dw", {}, 32, False),
    "hgnetv2_b0": ("HGNet (concat)", "hgnetv2_b0", {}, 32, False),
    "ghostnet_050": ("GhostNet", "ghostnet_050", {}, 32, False),
    "ghostnetv2": ("GhostNet", "ghostnetv2_100", {}, 64, False),
    "mobilenetv2_050": ("MobileNet", "mobilenetv2_050", {}, 32, False),
    "mobilenetv3_small_050": ("MobileNet", "mobilenetv3_small_050", {}, 32, False),
    "mobilenetv4_conv_small": ("MobileNet", "mobilenetv4_conv_small", {}, 32, False),
    "hardcorenas_a": ("MobileNet (NAS)", "hardcorenas_a", {}, 32, False),
    "lcnet_050": ("LCNet", "lcnet_050", {}, 32, False),
    "mnasnet_050": ("MnasNet", "mnasnet_050", {}, 32, False),
    "mixnet_s": ("MixNet (mixed kernels: split)", "mixnet_s", {}, 32, False),
    "tinynet_e": ("EfficientNet", "tinynet_e", {}, 32, False),
    "efficientnet_b0": ("EfficientNet", "efficientnet_b0", {}, 32, False),
    "rexnet_100": ("ReXNet (partial residual)", "rexnet_100", {}, 32, False),
    "regnetx_002": ("RegNet", "regnetx_002", {}, 32, False),
    "regnety_002": ("RegNet (SE)", "regnety_002", {}, 32, False),
    "dla46_c": ("DLA", "dla46_c", {}, 32, False),
    "repvit_m0_9": ("RepViT", "repvit_m0_9", {}, 32, False),
    "fastvit_t8": ("FastViT", "fastvit_t8", {}, 32, False),
    "inception_next_atto": ("InceptionNeXt (channel split)", "inception_next_atto", {}, 32, False),
    "mambaout_femto": ("MambaOut (gated split)", "mambaout_femto", {}, 32, False),
    "starnet_s050": ("StarNet", "starnet_s050", {}, 32, False),
    "convnext_atto": ("ConvNeXt", "convnext_atto", {}, 32, False),
    "convnextv2_atto": ("ConvNeXt", "convnextv2_atto", {}, 32, False),
    "poolformerv2_s12": ("MetaFormer", "poolformerv2_s12", {}, 32, False),
    "edgenext_xx_small": ("EdgeNeXt", "edgenext_xx_small", {}, 32, True),
    "efficientformer_l1": ("EfficientFormer", "efficientformer_l1", {"depths": (1, 1, 1, 1)}, 224, True),
    "efficientformerv2_s0": ("EfficientFormer", "efficientformerv2_s0", {}, 224, True),
    "efficientvit_m0": ("EfficientViT (MIT/MSRA)", "efficientvit_m0", {"img_size": 64}, 64, True),
    "efficientvit_b0": ("EfficientViT (MIT)", "efficientvit_b0", {}, 64, True),
    "mobilevit_xxs": ("MobileViT", "mobilevit_xxs", {}, 64, True),
    "mobilevitv2_050": ("MobileViT", "mobilevitv2_050", {}, 64, True),
    "levit_128s": ("LeViT", "levit_128s", {"img_size": 64}, 64, True),
    "vit_tiny": ("ViT", "vit_tiny_patch16_224", {"img_size": 32, "patch_size": 8, "depth": 2}, 32, True),
    "deit_tiny_distilled": (
        "DeiT (distilled: 2 heads)",
        "deit_tiny_distilled_patch16_224",
        {"img_size": 32, "patch_size": 8, "depth": 2},
        32,
        True,
    ),
    "cait": ("CaiT", "cait_xxs24_224", {"img_size": 32, "patch_size": 8, "depth": 2, "depth_token_only": 1}, 32, True),
    "xcit_nano": ("XCiT", "xcit_nano_12_p16_224", {"img_size": 32, "patch_size": 8, "depth": 2}, 32, True),
    "eva02_tiny": ("EVA-02 (RoPE)", "eva02_tiny_patch14_224", {"img_size": 28, "depth": 2}, 28, True),
    "beit": (
        "BEiT (relative position bias)",
        "beit_base_patch16_224",
        {"img_size": 32, "patch_size": 8, "depth": 2, "embed_dim": 32, "num_heads": 2},
        32,
        True,
    ),
    "pit_ti": ("PiT", "pit_ti_224", {"img_size": 64}, 64, True),
    "convit_tiny": (
        "ConViT",
        "convit_tiny",
        {"img_size": 32, "patch_size": 8, "depth": 2, "local_up_to_layer": 1},
        32,
        True,
    ),
    "swin": (
        "Swin",
        "swin_tiny_patch4_window7_224",
        {"img_size": 32, "window_size": 4, "embed_dim": 32, "depths": (1, 1), "num_heads": (2, 4)},
        32,
        True,
    ),
    "pvt_v2_b0": ("PVT", "pvt_v2_b0", {}, 64, True),
    "twins": ("Twins", "twins_svt_small", {"img_size": 64, "depths": (1, 1, 1, 1)}, 64, True),
    "coat_lite_tiny": ("CoaT", "coat_lite_tiny", {"img_size": 64}, 64, True),
    "visformer_tiny": ("Visformer", "visformer_tiny", {"img_size": 64}, 64, True),
    "mixer": ("MLP-Mixer", "mixer_s16_224", {"img_size": 32}, 32, False),
    "resmlp": ("ResMLP", "resmlp_12_224", {"img_size": 32}, 32, False),
    "gmlp": ("gMLP (spatial gating split)", "gmlp_ti16_224", {"img_size": 32}, 32, False),
    "sequencer": ("Sequencer (LSTM)", "sequencer2d_s", {"img_size": 32, "layers": (1, 1, 1, 1)}, 32, False),
}
QUICK = ["resnet10t", "densenet", "cspresnet50", "ghostnet_050", "vit_tiny", "swin"]


def _pretrained_style(model: nn.Module, seed: int = 0) -> nn.Module:
    """Known, non-trivial weights everywhere (timm zero-inits some heads and residual scales)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1 + (1.0 if p.dim() == 1 else 0.0))
        for name, b in model.named_buffers():
            if name.endswith("running_var"):
                b.copy_(torch.rand(b.shape, generator=g) + 0.5)
            elif name.endswith("running_mean"):
                b.copy_(torch.randn(b.shape, generator=g) * 0.1)
    return model.eval()


def _own_blocks(ens: nn.Module) -> list[tuple[torch.Tensor, int]]:
    if isinstance(ens, DeepEnsemble):
        return [(t, 0) for t in ens.stacked_parameters().values()]
    params = dict(ens.named_parameters())
    return [(params[n], a) for n, a in ens.member_parameter_axes().items()]


def _close(a: torch.Tensor, b: torch.Tensor) -> tuple[bool, float]:
    diff = float((a - b).abs().max())
    return diff <= 1e-4 + 1e-3 * float(b.abs().max()), diff


def check(ens: nn.Module, backbone: nn.Module, x: torch.Tensor) -> str | None:
    """None if the ensemble passes the benchmark's own checks, else what is wrong."""
    ens.eval()
    with torch.no_grad():
        ref = backbone(x)
        out = ens(x)
        if out.shape != (M, *ref.shape):
            return f"output shape {tuple(out.shape)} != {(M, *ref.shape)}"
        for i in range(M):
            ok, diff = _close(out[i], ref)
            if not ok:
                return f"member {i} != backbone at step 0 (diff {diff:.2g})"
        blocks = _own_blocks(ens)
        g = torch.Generator().manual_seed(1)
        for t, axis in blocks:
            b0 = t.unflatten(axis, (M, -1)).select(axis, 0)
            b0.add_(torch.randn(b0.shape, generator=g) * 0.1 * (b0.abs().mean() + 1e-2))
        ens.train().eval()  # timm drops its evaluation-mode caches of parameter-derived tensors on train()
        out2 = ens(x)
        if torch.equal(out2[0], out[0]):
            return "perturbing member 0's own tensors did not change output 0"
        for i in range(1, M):
            if not torch.equal(out2[i], out[i]):
                return f"perturbing member 0 changed output {i} (coupled members)"
        for i in range(M):
            ok, diff = _close(ens.member(i).eval()(x), out2[i])
            if not ok:
                return f"member({i}) != output {i} (diff {diff:.2g})"
    return None


def build(method: str, backbone: nn.Module, x: torch.Tensor) -> nn.Module:
    if method == "deep":
        return DeepEnsemble(backbone, num_members=M, init="copy", storage="stacked")
    if method == "packed":
        return PackedEnsemble(backbone, num_members=M, alpha=M, init="copy", example_input=x)
    if method == "batch":
        return BatchEnsemble(backbone, num_members=M, init="ones", example_input=x)
    return LoRAEnsemble(backbone, num_members=M, rank=2, head_init="copy", example_input=x)


class _Timeout(Exception):
    pass


def _alarm(signum, frame):  # noqa: ANN001
    raise _Timeout()


def run_one(backbone: nn.Module, x: torch.Tensor, method: str, timeout: int) -> tuple[str, str, float]:
    t0 = time.perf_counter()
    signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(timeout)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ens = build(method, backbone, x)
            problem = check(ens, backbone, x)
        status, detail = ("wrong", problem) if problem else ("works", "")
    except ConversionError as err:
        status, detail = "refused", str(err)
    except _Timeout:
        status, detail = "timeout", f"over {timeout} s"
    except Exception as err:  # noqa: BLE001 - a crash is what this benchmark counts
        status, detail = "crash", f"{type(err).__name__}: {err} @ {traceback.extract_tb(err.__traceback__)[-1].name}"
    finally:
        signal.alarm(0)
    return status, detail, time.perf_counter() - t0


def tu_models() -> dict[str, tuple[callable, callable | None, tuple[int, ...], dict]]:
    """torch-uncertainty builders: name -> (single builder, hand-written packed builder or None, input, kwargs)."""
    from torch_uncertainty.models.classification import (
        inception_time,
        lenet,
        packed_inception_time,
        packed_lenet,
        packed_resnet,
        packed_vgg,
        packed_wideresnet28x10,
        resnet,
        vgg,
        wideresnet28x10,
    )
    from torch_uncertainty.models.mlp import mlp, packed_mlp

    pe = {"num_estimators": 4, "alpha": 2, "gamma": 1}
    it = {"kernel_size": 8, "embed_dim": 8, "num_blocks": 3}
    return {
        "resnet18 (cifar)": (
            lambda: resnet(in_channels=3, num_classes=K, arch=18, style="cifar"),
            lambda: packed_resnet(in_channels=3, num_classes=K, arch=18, style="cifar", **pe),
            (3, 32, 32),
            {},
        ),
        "wideresnet28x10 (cifar)": (
            lambda: wideresnet28x10(in_channels=3, num_classes=K, style="cifar"),
            lambda: packed_wideresnet28x10(in_channels=3, num_classes=K, style="cifar", **pe),
            (3, 32, 32),
            {},
        ),
        "vgg11 (cifar)": (
            lambda: vgg(in_channels=3, num_classes=K, arch=11, style="cifar"),
            lambda: packed_vgg(in_channels=3, num_classes=K, arch=11, style="cifar", **pe),
            (3, 32, 32),
            {},
        ),
        "lenet": (
            lambda: lenet(in_channels=1, num_classes=K),
            lambda: packed_lenet(in_channels=1, num_classes=K, **pe),
            (1, 32, 32),
            {},
        ),
        "mlp (head registered first)": (
            lambda: mlp(in_features=8, num_outputs=K, hidden_dims=[16, 16]),
            lambda: packed_mlp(in_features=8, num_outputs=K, hidden_dims=[16, 16], **pe),
            (8,),
            {},
        ),
        "inception_time (input feeds several layers)": (
            lambda: inception_time(in_channels=2, num_classes=K, **it),
            lambda: packed_inception_time(in_channels=2, num_classes=K, **pe, **it),
            (2, 32),
            {},
        ),
    }


def _count(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", help=f"subset of {list(ZOO)}")
    parser.add_argument("--methods", nargs="*", default=["deep", "packed", "batch", "lora"])
    parser.add_argument("--quick", action="store_true", help=f"only {QUICK}")
    parser.add_argument("--no-tu", action="store_true", help="skip torch-uncertainty's builders")
    parser.add_argument("--timeout", type=int, default=600, help="seconds per (model, method)")
    args = parse_with_threads(parser)
    names = args.models or (QUICK if args.quick else list(ZOO))
    torch.manual_seed(0)
    counts = {m: Counter() for m in args.methods}
    rows = []
    for name in names:
        family, timm_name, kwargs, size, attention = ZOO[name]
        try:
            backbone = _pretrained_style(timm.create_model(timm_name, pretrained=False, num_classes=K, **kwargs))
        except Exception as err:  # noqa: BLE001
            print(f"{name}: cannot build the backbone: {err}")
            continue
        x = torch.randn(2, 3, size, size)
        try:
            with torch.no_grad():
                backbone(x)
            backbone.train().eval()
        except Exception as err:  # noqa: BLE001 - a zoo entry whose backbone itself does not run is a zoo bug
            print(f"{name}: the backbone itself fails on {tuple(x.shape)}: {err}")
            continue
        cells = []
        for method in args.methods:
            if method == "lora" and not attention:
                cells.append("-")
                continue
            status, detail, secs = run_one(backbone, x, method, args.timeout)
            counts[method][status] += 1
            cells.append(status)
            print(f"{name:24s} {method:7s} {status:8s} {secs:6.1f}s {detail[:220]}", flush=True)
        rows.append((name, family, cells))

    print("\n| model | family | " + " | ".join(args.methods) + " |")
    print("|---|---|" + "---|" * len(args.methods))
    for name, family, cells in rows:
        print(f"| {ZOO[name][1]} | {family} | " + " | ".join(cells) + " |")
    print("\n| method | models | works | refuses (ConversionError) | crashes | silently wrong | timeouts |")
    print("|---|---|---|---|---|---|---|")
    for method, c in counts.items():
        print(
            f"| {method} | {sum(c.values())} | {c['works']} | {c['refused']} | {c['crash']} | {c['wrong']} | {c['timeout']} |"
        )

    if args.no_tu:
        return
    print("\ntorch-uncertainty builders (M = 2 checks as above; parameter counts at M = 4, alpha = 2, gamma = 1):")
    tu_counts = {m: Counter() for m in args.methods if m != "lora"}
    print("| builder | " + " | ".join(tu_counts) + " | ours packed params | torch-uncertainty packed params |")
    print("|---|" + "---|" * (len(tu_counts) + 2))
    for name, (single, packed, shape, kw) in tu_models().items():
        backbone = _pretrained_style(single())
        x = torch.randn(2, *shape)
        cells = []
        for method in tu_counts:
            status, detail, secs = run_one(backbone, x, method, args.timeout)
            tu_counts[method][status] += 1
            cells.append(status)
            print(f"  {name:28s} {method:7s} {status:8s} {secs:6.1f}s {detail[:200]}", flush=True)
        ours = theirs = "-"
        if packed is not None:
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    ens = PackedEnsemble(
                        copy.deepcopy(backbone), num_members=4, alpha=2, gamma=1, example_input=x, **kw
                    )
                ours, theirs = f"{_count(ens):,}", f"{_count(packed()):,}"
            except Exception as err:  # noqa: BLE001
                ours = f"{type(err).__name__}"
        print(f"| {name} | " + " | ".join(cells) + f" | {ours} | {theirs} |", flush=True)
    for method, c in tu_counts.items():
        print(
            f"torch-uncertainty {method}: works {c['works']}, refuses {c['refused']}, crashes {c['crash']}, "
            f"silently wrong {c['wrong']}, timeouts {c['timeout']}"
        )


if __name__ == "__main__":
    main()
