"""Training-step time, inference time and memory of efficient ensembles vs a single ResNet-18, M = 4.

Rows (one run, ratios to the single model of the same family):
  torchvision resnet18: single, DeepEnsemble, PackedEnsemble(alpha=2, gamma=2), BatchEnsemble;
  torch-uncertainty CIFAR ResNet-18: single, its hand-written packed_resnet(2, 2, 4), and our conversion
  of its single model with the same alpha, gamma and channel rule (like for like).

Memory: peak CUDA memory on a GPU; on CPU the bytes of parameters + gradients + tensors saved for
backward in one training step (activation memory; CPU has no peak-allocation counter).

    python benchmarks/efficient.py            # batch 32, 32x32, 10 timed steps
    python benchmarks/efficient.py --quick    # 3 timed steps
"""

from __future__ import annotations

import argparse
import time
import warnings

import torch
import torch.nn.functional as F
import torchvision

from lightning_ensembles.ensembles.batch import BatchEnsemble
from lightning_ensembles.ensembles.deep import DeepEnsemble
from lightning_ensembles.ensembles.packed import PackedEnsemble

M = 4


def _members(model, x):
    out = model(x)
    return out.unsqueeze(0) if out.dim() == 2 else out


def _tu_members(model, x):  # torch-uncertainty stacks members on the batch axis: (M * B, C)
    out = model(x)
    return out.unflatten(0, (-1, x.shape[0]))


def _measure(model, call, x, y, steps: int, device) -> tuple[float, float, float]:
    model.to(device).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def step():
        out = call(model, x)
        loss = F.cross_entropy(out.flatten(0, 1), y.repeat(out.shape[0]))
        opt.zero_grad()
        loss.backward()
        opt.step()

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    step()  # warm-up
    saved = []

    def pack(t):
        saved.append(t.numel() * t.element_size())
        return t

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step()
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    mem = torch.cuda.max_memory_allocated() if device.type == "cuda" else 2 * params + sum(saved)
    sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    train = (time.perf_counter() - t0) / steps
    model.eval()
    with torch.no_grad():
        call(model, x)
        sync()
        t0 = time.perf_counter()
        for _ in range(steps):
            call(model, x)
        sync()
    infer = (time.perf_counter() - t0) / steps
    return train, infer, mem


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    steps = 3 if args.quick else args.steps
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    warnings.simplefilter("ignore")
    x = torch.randn(args.batch_size, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (args.batch_size,), device=device)

    from torch_uncertainty.models.classification import packed_resnet, resnet

    def tv():
        return torchvision.models.resnet18(num_classes=10)

    def tu_single():
        return resnet(in_channels=3, num_classes=10, arch=18, style="cifar")

    rows = [
        ("torchvision", "single resnet18", tv, _members),
        ("torchvision", "DeepEnsemble", lambda: DeepEnsemble(tv(), M), _members),
        ("torchvision", "PackedEnsemble(a=2, g=2)", lambda: PackedEnsemble(tv(), M, alpha=2, gamma=2), _members),
        ("torchvision", "BatchEnsemble", lambda: BatchEnsemble(tv(), M), _members),
        ("torch-uncertainty", "single resnet(18, cifar)", tu_single, _members),
        (
            "torch-uncertainty",
            "hand-written packed_resnet(2, 2, 4)",
            lambda: packed_resnet(
                in_channels=3, num_classes=10, arch=18, num_estimators=M, alpha=2, gamma=2, style="cifar"
            ),
            _tu_members,
        ),
        (
            "torch-uncertainty",
            "PackedEnsemble(converted, 2, 2, 4)",
            lambda: PackedEnsemble(
                tu_single(), M, alpha=2, gamma=2, min_channels_per_group=64, no_gamma_layers=["*.conv1", "linear"]
            ),
            _members,
        ),
    ]
    print(
        f"device={device}, threads={torch.get_num_threads()}, batch {args.batch_size}, 32x32, {steps} timed steps, M={M}\n"
    )
    print("| family | model | params (M) | train step ms | ratio | inference ms | ratio | memory MB | ratio |")
    print("|---|---|---|---|---|---|---|---|---|")
    base: dict[str, tuple[float, float, float]] = {}
    results = {}
    for family, name, make, call in rows:
        model = make()
        n = sum(p.numel() for p in model.parameters()) / 1e6
        tr, inf, mem = _measure(model, call, x, y, steps, device)
        base.setdefault(family, (tr, inf, mem))
        b = base[family]
        results[name] = tr
        print(
            f"| {family} | {name} | {n:.2f} | {1e3 * tr:.1f} | {tr / b[0]:.2f}x | {1e3 * inf:.1f} | {inf / b[1]:.2f}x "
            f"| {mem / 2**20:.0f} | {mem / b[2]:.2f}x |",
            flush=True,
        )
    conv, hand = results["PackedEnsemble(converted, 2, 2, 4)"], results["hand-written packed_resnet(2, 2, 4)"]
    print(
        f"\nconverted / hand-written packed ResNet-18 training step: {conv / hand:.2f}x (target <= 1.1x); "
        f"PackedEnsemble(resnet18) / single: {results['PackedEnsemble(a=2, g=2)'] / base['torchvision'][0]:.2f}x (target <= 1.3x)"
    )


if __name__ == "__main__":
    main()
