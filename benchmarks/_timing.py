"""Timing helper shared by the benchmark scripts."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def median_ms(fn: Callable[[], object], reps: int, warmup: int = 1) -> float:
    """Median wall time of ``fn()`` in milliseconds over ``reps`` calls, after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def interleaved_median_ms(
    fns: dict[str, Callable[[], object]], reps: int, warmup: int = 1, inner: int = 1
) -> dict[str, float]:
    """Median wall time (ms) of one ``fns[k]()``, timing a block of ``inner`` calls of each in turn per round.

    Interleaving spreads slow drifts of the machine (other processes, thermal state) evenly over the
    variants, so their ratios are fairer than from back-to-back blocks of calls; ``inner`` > 1 keeps a
    sub-millisecond model's caches warm within its block, as in a real training loop.
    """
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(reps):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            for _ in range(inner):
                fn()
            times[k].append((time.perf_counter() - t0) / inner)
    return {k: statistics.median(v) * 1e3 for k, v in times.items()}
