"""Timing helper shared by the benchmark scripts."""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch


def median_ms(fn: Callable[[], object], reps: int, warmup: int = 1) -> float:
    """Median wall time of ``fn()`` in milliseconds over ``reps`` calls, after ``warmup`` untimed calls."""
    return interleaved_median_ms({"fn": fn}, reps, warmup, inner=1)["fn"]


def interleaved_median_ms(
    fns: dict[str, Callable[[], object]], reps: int, warmup: int = 1, inner: int | None = None
) -> dict[str, float]:
    """Median wall time (ms) of one ``fns[k]()``, timing a block of ``inner`` calls of each in turn per round.

    Interleaving spreads slow drifts of the machine (other processes, thermal state) evenly over the
    variants, so their ratios are fairer than from back-to-back blocks of calls; ``inner`` > 1 keeps a
    sub-millisecond model's caches warm within its block, as in a real training loop. By default
    ``inner`` makes a block of the slowest variant last about 20 ms (judged by each variant's last
    warm-up call).
    """
    slowest = 0.0
    for fn in fns.values():
        for _ in range(warmup):
            t0 = time.perf_counter()
            fn()
            last = time.perf_counter() - t0
        # the last warm-up call only: a first call may do one-off work (DeepEnsemble's execution timing)
        slowest = max(slowest, last if warmup else 0.0)
    if inner is None:
        inner = max(1, round(0.02 / max(slowest, 1e-6)))
    times: dict[str, list[float]] = {k: [] for k in fns}
    order = list(fns.items())
    for r in range(reps):
        for k, fn in order[r % len(order) :] + order[: r % len(order)]:  # rotate: no variant always goes first
            t0 = time.perf_counter()
            for _ in range(inner):
                fn()
            times[k].append((time.perf_counter() - t0) / inner)
    return {k: statistics.median(v) * 1e3 for k, v in times.items()}


def parse_with_threads(
    parser: argparse.ArgumentParser, default: int = 1, argv: list[str] | None = None
) -> argparse.Namespace:
    """Parse ``parser``'s arguments plus ``--threads`` (torch intra-op threads) and apply that setting.

    One thread is the default: the benchmarks' models are small, and on a shared 2-core machine more
    threads contend for the cores (measured 10-50x slower for tiny MLPs and the zoo's conversions).
    """
    parser.add_argument("--threads", type=int, default=default, help="torch intra-op threads (default %(default)s)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    return args
