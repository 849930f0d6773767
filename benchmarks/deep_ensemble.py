"""Training-step and inference time of DeepEnsemble against torch-uncertainty's member loop and M x one model.

    python benchmarks/deep_ensemble.py            # full table (a few minutes on 2 CPU cores)
    python benchmarks/deep_ensemble.py --quick    # fewer repetitions
    python benchmarks/deep_ensemble.py --optimizer sgd --only resnet   # another optimiser, one backbone

Every variant is trained with the same optimiser (default: ``torch.optim.Adam`` as constructed by default).

All timings in one run, same inputs; ratios are "torch-uncertainty time / ours" (> 1: ours faster).
"""

from __future__ import annotations

import argparse

import timm
import torch
import torch.nn.functional as F
from _timing import interleaved_median_ms, parse_with_threads
from torch import nn

from lightning_ensembles import MLP, DeepEnsemble


def _tu_deep_ensemble(backbone: nn.Module, m: int) -> nn.Module:
    from torch_uncertainty.methods.deep_ensembles import deep_ensembles

    return deep_ensembles(backbone, num_estimators=m, reset_model_parameters=True)


OPTIMIZER = {"kind": "adam"}


def make_optimizer(params) -> torch.optim.Optimizer:
    """The same optimiser for every variant: Adam (PyTorch's default implementation), fused Adam or SGD."""
    kind = OPTIMIZER["kind"]
    if kind == "adam":
        return torch.optim.Adam(params, lr=1e-3)
    if kind == "adam-fused":
        return torch.optim.Adam(params, lr=1e-3, fused=True)
    return torch.optim.SGD(params, lr=1e-2, momentum=0.9)


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
    opt = make_optimizer(backbone.parameters())

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
    models = {
        "ours": DeepEnsemble(factory(), m),  # storage and execution chosen by the library
        "ours-vmap": DeepEnsemble(factory(), m, execution="vmap", storage="stacked"),
        "ours-loop": DeepEnsemble(factory(), m, execution="loop", storage="stacked"),
        "tu": _tu_deep_ensemble(factory(), m),
    }
    train, infer = {}, {}
    for key, model in models.items():
        opt = make_optimizer(model.parameters())
        train[key] = _train_step(model, opt, x, y, m, "concat" if key == "tu" else "members")

        def run(model=model):
            with torch.no_grad():
                model(x)

        infer[key] = run
    single = factory()
    train["single"], infer["single"] = _single_times_m(single, x, y, m)

    for model in [*models.values(), single]:
        model.train()
    row["ours_storage"] = models["ours"].storage
    row["ours_exec_train"] = models["ours"].resolved_execution(x.device, grad=True)
    row.update({f"{k}_train": v for k, v in interleaved_median_ms(train, reps, warmup=2).items()})
    for model in [*models.values(), single]:
        model.eval()
    row.update({f"{k}_infer": v for k, v in interleaved_median_ms(infer, reps, warmup=2).items()})
    row["ours_exec_infer"] = models["ours"].resolved_execution(x.device, grad=False)
    return row


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--optimizer", choices=("adam", "adam-fused", "sgd"), default="adam")
    parser.add_argument("--only", default="", help="run only the backbones whose name contains this text")
    args = parse_with_threads(parser, default=2)
    OPTIMIZER["kind"] = args.optimizer
    torch.manual_seed(0)
    reps = 3 if args.quick else args.reps
    cases = [
        (
            "MLP 64-128-128-10, batch 128",
            lambda: MLP(64, 10, hidden=(128, 128)),
            torch.randn(128, 64),
            torch.randint(0, 10, (128,)),
        ),
        (
            "timm resnet18 32x32, batch 32",
            lambda: timm.create_model("resnet18", num_classes=10),
            torch.randn(32, 3, 32, 32),
            torch.randint(0, 10, (32,)),
        ),
    ]
    rows = [bench(n, f, x, y, m, reps) for n, f, x, y in cases for m in (4, 8) if args.only in n]
    print(
        f"\nDeepEnsemble vs torch-uncertainty deep_ensembles (member loop) vs M x one model; {torch.get_num_threads()} threads, "
        f"optimiser {args.optimizer}, median ms of {reps} interleaved rounds\n"
    )
    print(
        "ours: DeepEnsemble with default arguments (storage and execution chosen by the library); "
        "stacked vmap / stacked loop: storage='stacked' with execution forced.\n"
    )
    print(
        "| backbone | M | ours storage, exec (train / infer) | step ours | step stacked vmap | step stacked loop | step TU "
        "| step M x single | **TU / ours** | infer ours | infer stacked vmap | infer stacked loop | infer TU | **TU / ours** |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['backbone']} | {r['M']} | {r['ours_storage']}, {r['ours_exec_train']} / {r['ours_exec_infer']} | {r['ours_train']:.1f} | "
            f"{r['ours-vmap_train']:.1f} | {r['ours-loop_train']:.1f} | {r['tu_train']:.1f} | {r['single_train']:.1f} | "
            f"**{r['tu_train'] / r['ours_train']:.2f}x** | {r['ours_infer']:.2f} | {r['ours-vmap_infer']:.2f} | "
            f"{r['ours-loop_infer']:.2f} | {r['tu_infer']:.2f} | **{r['tu_infer'] / r['ours_infer']:.2f}x** |"
        )


if __name__ == "__main__":
    main()
