"""ECE-family metrics on 1,000,000 x 100 predictions: update+compute time and state memory vs references.

Run: ``python benchmarks/metrics.py`` (``--quick``: 100,000 predictions). Prints a markdown table.
Our metrics check their inputs by default (probabilities in [0, 1] summing to 1, targets in range:
two extra passes over the probabilities); rows with ``validate_args=False`` skip those checks.
Predictions arrive in batches of 10,000 (cycling through a small pool of random batches, so input
generation is not timed; every prediction then appears once per cycle, and these tied copies share
their target, so the adaptive ECE's tie handling leaves its value equal to torch-uncertainty's).
"state" is the memory the metric holds after all updates (what grows
with N); timings are wall-clock on this machine, ratios are measured in the same run.
"""

from __future__ import annotations

import argparse
import time

import torch


def state_bytes(metric) -> int:
    total = 0
    for name in metric._defaults:
        value = getattr(metric, name)
        tensors = value if isinstance(value, list) else [value]
        total += sum(t.numel() * t.element_size() for t in tensors)
    return total


def bench(factory, batches, repeats: int) -> tuple[float, float, int, float]:
    """Best-of-``repeats`` update and compute seconds, state bytes and the value."""
    best_update, best_compute = float("inf"), float("inf")
    for _ in range(repeats):
        metric = factory()
        start = time.perf_counter()
        for probs, target in batches:
            metric.update(probs, target)
        mid = time.perf_counter()
        value = float(metric.compute())
        end = time.perf_counter()
        best_update, best_compute = min(best_update, mid - start), min(best_compute, end - mid)
    return best_update, best_compute, state_bytes(metric), value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="100,000 predictions instead of 1,000,000")
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--batch", type=int, default=10_000)
    parser.add_argument("--repeats", type=int, default=1, help="best of this many runs")
    args = parser.parse_args()
    torch.set_num_threads(2)
    n = 100_000 if args.quick else 1_000_000
    g = torch.Generator().manual_seed(0)
    pool = []
    for _ in range(10):
        logits = torch.randn(args.batch, args.classes, generator=g) * 3
        pool.append((logits.softmax(-1), torch.randint(0, args.classes, (args.batch,), generator=g)))
    batches = [pool[i % len(pool)] for i in range(n // args.batch)]

    from torch_uncertainty.metrics.classification import AdaptiveCalibrationError as TUACE
    from torch_uncertainty.metrics.classification import ClasswiseCalibrationError as TUCW
    from torchmetrics.classification import MulticlassCalibrationError

    from lightning_ensembles.metrics import (
        AdaptiveCalibrationError,
        ClasswiseCalibrationError,
        ExpectedCalibrationError,
    )

    c = args.classes
    pairs = [
        (
            "ECE l1 (15 bins)",
            lambda: ExpectedCalibrationError(c, 15),
            "torchmetrics MulticlassCalibrationError",
            lambda: MulticlassCalibrationError(c, n_bins=15),
        ),
        (
            "ECE l1, validate_args=False",
            lambda: ExpectedCalibrationError(c, 15, validate_args=False),
            "torchmetrics MulticlassCalibrationError",
            lambda: MulticlassCalibrationError(c, n_bins=15),
        ),
        (
            "MCE (max norm)",
            lambda: ExpectedCalibrationError(c, 15, norm="max"),
            "torchmetrics MulticlassCalibrationError",
            lambda: MulticlassCalibrationError(c, n_bins=15, norm="max"),
        ),
        (
            "adaptive ECE (top-label)",
            lambda: AdaptiveCalibrationError(c, 15),
            "torch-uncertainty AdaptiveCalibrationError",
            lambda: TUACE(task="multiclass", num_classes=c, num_bins=15),
        ),
        # torch-uncertainty's ACE does not check its inputs: like-for-like is validate_args=False.
        (
            "adaptive ECE, validate_args=False",
            lambda: AdaptiveCalibrationError(c, 15, validate_args=False),
            "torch-uncertainty AdaptiveCalibrationError",
            lambda: TUACE(task="multiclass", num_classes=c, num_bins=15),
        ),
        # torch-uncertainty's classwise ECE stores every probability and a one-hot target (~1.2 GB at 1M x 100).
        (
            "classwise ECE",
            lambda: ClasswiseCalibrationError(c, 15),
            "torch-uncertainty ClasswiseCalibrationError",
            (lambda: TUCW(num_classes=c, num_bins=15)) if args.quick else None,
        ),
    ]
    print(f"{n:,} predictions x {c} classes, batches of {args.batch:,}, best of {args.repeats}\n")
    print(
        "| metric | ours update+compute (s) | reference | ref update+compute (s) | time ratio ours/ref | ours state | ref state | abs diff |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name, ours, ref_name, ref in pairs:
        ou, oc, ob, ov = bench(ours, batches, args.repeats)
        if ref is None:
            print(
                f"| {name} | {ou + oc:.2f} | {ref_name} | skipped (stores all inputs; run --quick) | - | {ob / 1e3:.1f} kB | - | - |"
            )
            continue
        ru, rc, rb, rv = bench(ref, batches, 1 if "Classwise" in ref_name else args.repeats)
        print(
            f"| {name} | {ou + oc:.2f} | {ref_name} | {ru + rc:.2f} | {(ou + oc) / (ru + rc):.2f}x | "
            f"{ob / 1e3:.1f} kB | {rb / 1e6:.1f} MB | {abs(ov - rv):.1e} |"
        )


if __name__ == "__main__":
    main()
