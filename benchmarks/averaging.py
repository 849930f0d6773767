"""Test accuracy / NLL / ECE of weight-averaging methods on digits and MNIST-1D (3 seeds).

    python benchmarks/averaging.py            # full table (a few minutes on 2 CPU cores)
    python benchmarks/averaging.py --quick    # fewer epochs, one seed

One SGD run per seed gives the last iterate and, from the same weight sequence, SWA (epoch ends
from 75% of training, BatchNorm-free MLP so no BN update), EMA (every step) and SWAG (30 draws, same
snapshots as SWA). Separate runs of the same length and model give the snapshot ensemble (cyclic
cosine, 4 cycles) and DCA (2 components x 3 instances, 2 draws per step with the consistency loss;
evaluated on all 9 combinations) and DCWA (instance-mean weights, no retraining), with instances
re-initialised independently ("reinit") or starting equal ("copy").
ECE: 15 bins (torchmetrics). Mean +- std over seeds.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.classification import MulticlassCalibrationError

from lightning_ensembles import MLP
from lightning_ensembles.averaging import EMA, SWA, SWAG, CombinatorialEnsemble, DCAConsistency
from lightning_ensembles.averaging.snapshot import cyclic_cosine_lr, snapshot_ensemble
from lightning_ensembles.data import DigitsDataModule, MNIST1DDataModule

try:
    from _timing import parse_with_threads
except ImportError:  # run as a module
    from benchmarks._timing import parse_with_threads


def _splits(name: str):
    dm = DigitsDataModule() if name == "digits" else MNIST1DDataModule(num_samples=4000)
    dm.setup()
    return {k: dm.splits[k].tensors for k in ("train", "test")}


def _batches(x, y, bs, gen):
    perm = torch.randperm(len(y), generator=gen)
    for i in range(0, len(y), bs):
        idx = perm[i : i + bs]
        yield x[idx], y[idx]


@torch.no_grad()
def _metrics(probs: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    ece = MulticlassCalibrationError(num_classes=probs.shape[-1], n_bins=15, norm="l1")
    return {
        "acc": float((probs.argmax(-1) == y).float().mean()) * 100,
        "nll": float(F.nll_loss(probs.clamp_min(1e-12).log(), y)),
        "ece": float(ece(probs, y)) * 100,
    }


@torch.no_grad()
def _probs(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    model.eval()
    out = model(x)
    return out.softmax(-1) if out.dim() == 2 else out.softmax(-1).mean(0)


def _backbone(in_features: int) -> nn.Module:
    return MLP(in_features, 10, hidden=(128, 128))


def _run_averaging(data, seed, epochs, lr):
    torch.manual_seed(seed)
    (x, y), (xt, yt) = data["train"], data["test"]
    model = _backbone(x[0].numel())
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    swa, ema, swag = SWA(), EMA(decay=0.99), SWAG(max_rank=20)
    gen = torch.Generator().manual_seed(seed)
    start = int(0.75 * epochs)
    for epoch in range(epochs):
        model.train()
        for xb, yb in _batches(x, y, 64, gen):
            loss = F.cross_entropy(model(xb), yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
            ema.update(model)
        if epoch >= start:
            swa.update(model)
            swag.update(model)
    out = {"last iterate": _metrics(_probs(model, xt), yt)}
    for name, avg in (("SWA", swa), ("EMA", ema)):
        m = MLP(x[0].numel(), 10, hidden=(128, 128))
        m.load_state_dict(model.state_dict())
        avg.copy_to(m)
        out[name] = _metrics(_probs(m, xt), yt)
    out["SWAG (30 draws)"] = _metrics(_probs(swag.sample_ensemble(model, 30, seed=seed), xt), yt)
    return out


def _run_snapshot(data, seed, epochs, lr, cycles=4):
    torch.manual_seed(seed)
    (x, y), (xt, yt) = data["train"], data["test"]
    model = _backbone(x[0].numel())
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    gen = torch.Generator().manual_seed(seed)
    steps = epochs * -(-len(y) // 64)
    per_cycle = -(-steps // cycles)
    snaps, step = [], 0
    for _ in range(epochs):
        model.train()
        for xb, yb in _batches(x, y, 64, gen):
            for g in opt.param_groups:
                g["lr"] = cyclic_cosine_lr(step, per_cycle, 2 * lr)
            loss = F.cross_entropy(model(xb), yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
            if step % per_cycle == 0 or step == steps:
                snaps.append({k: v.clone() for k, v in model.state_dict().items()})
    return {f"snapshot ({len(snaps)})": _metrics(_probs(snapshot_ensemble(model, snaps), xt), yt)}


def _run_dca(data, seed, epochs, lr, init, draws=2):
    torch.manual_seed(seed)
    (x, y), (xt, yt) = data["train"], data["test"]
    dca = CombinatorialEnsemble(
        _backbone(x[0].numel()), components=2, num_instances=3, draws_per_step=draws, eval_mode="all", init=init
    )
    reg = DCAConsistency(weight=1.0)
    opt = torch.optim.SGD(dca.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        dca.train()
        for xb, yb in _batches(x, y, 64, gen):
            out = dca(xb)
            loss = F.cross_entropy(out.flatten(0, 1), yb.repeat(draws)) + reg(out, yb, inputs=xb, ensemble=dca)
            opt.zero_grad()
            loss.backward()
            opt.step()
    return {
        f"DCA, {init} init (9 combinations)": _metrics(_probs(dca, xt), yt),
        f"DCWA, {init} init": _metrics(_probs(dca.weight_averaged(), xt), yt),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer epochs and one seed")
    parser.add_argument("--seeds", type=int, default=3)
    args = parse_with_threads(parser)
    seeds = 1 if args.quick else args.seeds
    settings = {"digits": (20 if args.quick else 60, 0.05), "mnist1d": (10 if args.quick else 40, 0.05)}
    for name, (epochs, lr) in settings.items():
        data = _splits(name)
        t0 = time.perf_counter()
        results: dict[str, list[dict[str, float]]] = {}
        for seed in range(seeds):
            for part in (
                _run_averaging(data, seed, epochs, lr),
                _run_snapshot(data, seed, epochs, lr),
                _run_dca(data, seed, epochs, lr, "reinit"),
                _run_dca(data, seed, epochs, lr, "copy"),
            ):
                for method, vals in part.items():
                    results.setdefault(method, []).append(vals)
        print(
            f"\n### {name}: MLP 128-128, SGD lr {lr} momentum 0.9, {epochs} epochs, {seeds} seed(s) "
            f"({time.perf_counter() - t0:.0f} s)\n"
        )
        print("| method | acc % | NLL | ECE % |")
        print("|---|---|---|---|")
        for method, runs in results.items():
            cells = []
            for key, fmt in (("acc", "{:.2f}"), ("nll", "{:.3f}"), ("ece", "{:.2f}")):
                vals = [r[key] for r in runs]
                sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
                cells.append(f"{fmt.format(statistics.mean(vals))} ± {fmt.format(sd)}")
            print(f"| {method} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
