"""Training-step and inference time of DeepEnsemble against torch-uncertainty's member loop and M x one model.

    python benchmarks/deep_ensemble.py            # full table (a few minutes on 2 CPU cores)
    python benchmarks/deep_ensemble.py --quick    # fewer repetitions

All timings in one run, same inputs; ratios are "torch-uncertainty time / ours" (> 1: ours faster).
"""

from __future__ import annotations

import argparse

import timm
import torch
import torch.nn.functional as F
from _timing import median_ms
from torch import nn

from lightning_ensembles import MLP, DeepEnsemble


def _tu_deep_ensemble(backbone: nn.Module, m: int) -> nn.Module:
    from torch_uncertainty.methods.deep_ensembles import deep_ensembles

    return deep_ensembles(backbone, num_estimators=m, reset_model_parameters=True)


def _train_step(model: nn.Module, opt: torch.optim.Optimizer, x, y, m: int, layout: str):
    def step():
        opt.zero_grad(set_to_none=True)
        out = model(x)
        if layout == "members":  # (M, B, C)
            loss = F.cross_entropy(out.flatten(0, 1), y.repeat(m))
        else:  # torch-uncertainty: (M * B, C)
            loss = F.cross_entropy(out, y.repeat(m))
        loss.backward()
        opt.step()

    return step


def _single_times_m(backbone: nn.Module, x, y, m: int):
    opt = torch.optim.Adam(backbone.parameters(), lr=1e-3)

    def step():
        for _ in range(m):
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(backbone(x), y).backward()
            opt.step()

    def infer():
        with torch.no_grad():
            for _ in range(m):
                backbone(x)

    return step, infer


def bench(name: str, factory, x, y, m: int, reps: int) -> dict:
    row: dict = {"backbone": name, "M": m}
    variants = {
        "ours": DeepEnsemble(factory(), m),
        "ours-vmap": DeepEnsemble(factory(), m, execution="vmap"),
        "ours-loop": DeepEnsemble(factory(), m, execution="loop"),
    }
    row["ours_exec"] = variants["ours"].resolved_execution(x.device)
    for key, ens in variants.items():
        ens.train()
        opt = torch.optim.Adam(ens.parameters(), lr=1e-3)
        row[f"{key}_train"] = median_ms(_train_step(ens, opt, x, y, m, "members"), reps, warmup=2)
        ens.eval()
        with torch.no_grad():
            row[f"{key}_infer"] = median_ms(lambda ens=ens: ens(x), reps, warmup=2)
    tu = _tu_deep_ensemble(factory(), m)
    tu.train()
    opt = torch.optim.Adam(tu.parameters(), lr=1e-3)
    row["tu_train"] = median_ms(_train_step(tu, opt, x, y, m, "concat"), reps, warmup=2)
    tu.eval()
    with torch.no_grad():
        row["tu_infer"] = median_ms(lambda: tu(x), reps, warmup=2)
    single = factory()
    step, infer = _single_times_m(single, x, y, m)
    single.train()
    row["single_train"] = median_ms(step, reps, warmup=2)
    single.eval()
    row["single_infer"] = median_ms(infer, reps, warmup=2)
    return row


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    reps = 3 if args.quick else 10
    cases = [
        ("MLP 64-128-128-10, batch 128", lambda: MLP(64, 10, hidden=(128, 128)), torch.randn(128, 64), torch.randint(0, 10, (128,))),
        ("timm resnet18 32x32, batch 32", lambda: timm.create_model("resnet18", num_classes=10), torch.randn(32, 3, 32, 32), torch.randint(0, 10, (32,))),
    ]
    rows = [bench(n, f, x, y, m, reps) for n, f, x, y in cases for m in (4, 8)]
    print(f"\nDeepEnsemble vs torch-uncertainty deep_ensembles (member loop) vs M x one model; {torch.get_num_threads()} threads, median ms\n")
    print("| backbone | M | ours exec | step ours | step vmap | step loop | step TU | step M x single | **TU / ours** | infer ours | infer TU | **TU / ours** |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['backbone']} | {r['M']} | {r['ours_exec']} | {r['ours_train']:.1f} | {r['ours-vmap_train']:.1f} | "
            f"{r['ours-loop_train']:.1f} | {r['tu_train']:.1f} | {r['single_train']:.1f} | "
            f"**{r['tu_train'] / r['ours_train']:.2f}x** | {r['ours_infer']:.1f} | {r['tu_infer']:.1f} | "
            f"**{r['tu_infer'] / r['ours_infer']:.2f}x** |"
        )


if __name__ == "__main__":
    main()
