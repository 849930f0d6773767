"""Throughput of a 4-member deep ensemble: one process vs DDP vs member-parallel on 2 CPU processes.

All three modes run the same algorithm (4 MLP members, same global batch, same number of steps):

- ``single``: one process (2 threads) trains all members on the whole batch;
- ``ddp``: 2 processes (1 thread each), each holds all 4 members and half of every batch, and
  gradients of every member are all-reduced after each step;
- ``member_parallel``: 2 processes (1 thread each), each holds 2 members and the whole batch,
  member outputs are all-gathered, no gradient is ever reduced.

Each mode runs in its own subprocess (Lightning's DDP launcher re-runs this file for rank 1); the
table reports training samples per second measured between ``on_train_start`` and ``on_train_end``
and ratios against ``single`` from the same invocation. CPU timings on a shared machine are noisy.

    python benchmarks/distributed.py            # ~2-3 minutes on 2 cores
    python benchmarks/distributed.py --quick    # ~1 minute
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import warnings

MODES = ("single", "ddp", "member_parallel")


def run_mode(mode: str, steps: int, batch: int, hidden: int, out: str) -> None:
    import lightning as L
    import torch
    from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

    from lightning_ensembles import EnsembleClassifier
    from lightning_ensembles.strategies import MemberParallelStrategy

    warnings.filterwarnings("ignore")
    torch.set_num_threads(2 if mode == "single" else 1)  # the same 2 cores in every mode
    g = torch.Generator().manual_seed(0)
    n = steps * batch
    data = TensorDataset(torch.randn(n, 64, generator=g), torch.randint(0, 10, (n,), generator=g))
    if mode == "ddp":  # Lightning splits each global batch of `batch` samples over 2 ranks
        loader = DataLoader(data, batch_size=batch // 2, shuffle=False)
    else:  # every member sees whole batches
        loader = DataLoader(
            data, batch_size=batch, sampler=DistributedSampler(data, num_replicas=1, rank=0, shuffle=False)
        )

    class Clock(L.Callback):
        def on_train_start(self, trainer, pl_module):
            self.t0 = time.perf_counter()

        def on_train_end(self, trainer, pl_module):
            self.seconds = time.perf_counter() - self.t0

    L.seed_everything(0, verbose=False)
    model = EnsembleClassifier(
        backbone="mlp",
        num_members=4,
        backbone_kwargs={"in_features": 64, "out_features": 10, "hidden": (hidden, hidden)},
    )
    strategy = {"single": "auto", "ddp": "ddp", "member_parallel": MemberParallelStrategy()}[mode]
    clock = Clock()
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1 if mode == "single" else 2,
        strategy=strategy,
        max_epochs=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
        callbacks=[clock],
    )
    trainer.fit(model, loader)
    if trainer.global_rank == 0:
        with open(out, "w") as f:
            json.dump({"mode": mode, "seconds": clock.seconds, "samples": n}, f)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps (noisier)")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--mode", choices=MODES, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    steps = args.steps or (20 if args.quick else 60)
    if args.mode:  # a worker (and, for the distributed modes, rank 1 re-running this file)
        run_mode(args.mode, steps, args.batch, args.hidden, args.out)
        return

    import tempfile

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for mode in MODES:
            out = os.path.join(tmp, f"{mode}.json")
            cmd = [
                sys.executable,
                os.path.abspath(__file__),
                "--mode",
                mode,
                "--out",
                out,
                "--steps",
                str(steps),
                "--batch",
                str(args.batch),
                "--hidden",
                str(args.hidden),
            ]
            subprocess.run(cmd, check=True, timeout=600, capture_output=True)
            with open(out) as f:
                results[mode] = json.load(f)
    base = results["single"]["samples"] / results["single"]["seconds"]
    print(
        f"4-member deep ensemble, MLP 64-{args.hidden}-{args.hidden}-10, global batch {args.batch}, {steps} steps, CPU\n"
    )
    print("| mode | processes | members per process | samples/s | vs one process |")
    print("|---|---|---|---|---|")
    rows = {"single": (1, 4), "ddp": (2, 4), "member_parallel": (2, 2)}
    for mode in MODES:
        r = results[mode]
        rate = r["samples"] / r["seconds"]
        procs, members = rows[mode]
        print(f"| {mode} | {procs} | {members} | {rate:.0f} | {rate / base:.2f}x |")


if __name__ == "__main__":
    main()
