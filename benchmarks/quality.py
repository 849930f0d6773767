"""Test NLL of a single MLP vs PackedEnsemble and BatchEnsemble (M=4) on digits and MNIST-1D.

Prints a markdown table (mean over seeds). Every model keeps the epoch with the best validation NLL
(the same early-stopping rule for all). Each member is trained on its own loss (target repeated
over members); the ensemble prediction is the mean of member probabilities.

    python benchmarks/quality.py            # 3 seeds, up to 60 epochs; packed alpha 2 and 4, two BatchEnsemble inits
    python benchmarks/quality.py --quick    # 1 seed, 10 epochs
"""

from __future__ import annotations

import argparse
import copy
import statistics

import torch
import torch.nn.functional as F

from lightning_ensembles.backbones import MLP
from lightning_ensembles.data import DigitsDataModule, MNIST1DDataModule
from lightning_ensembles.ensembles.batch import BatchEnsemble
from lightning_ensembles.ensembles.packed import PackedEnsemble

try:
    from _timing import parse_with_threads
except ImportError:  # run as a module
    from benchmarks._timing import parse_with_threads


def _data(name: str, seed: int):
    dm = DigitsDataModule(seed=seed) if name == "digits" else MNIST1DDataModule(seed=seed)
    parts = dm.build()
    (xtr, ytr), (xva, yva), (xte, yte) = parts["train"], parts["val"], parts["test"]
    mean, std = xtr.mean(), xtr.std()
    return (xtr - mean) / std, ytr, (xva - mean) / std, yva, (xte - mean) / std, yte


def _model(kind: str, in_features: int, alpha: float = 2, batch_init: str = "normal") -> torch.nn.Module:
    mlp = MLP(in_features, 10, hidden=(128, 128))
    if kind == "single":
        return mlp
    if kind == "packed":
        return PackedEnsemble(mlp, num_members=4, alpha=alpha)
    return BatchEnsemble(mlp, num_members=4, init=batch_init)


def _members(model, x):
    out = model(x)
    return out.unsqueeze(0) if out.dim() == 2 else out  # single model: one member


def _evaluate(model, x, y) -> tuple[float, float]:
    model.eval()
    with torch.no_grad():
        probs = _members(model, x).softmax(-1).mean(0)
    nll = F.nll_loss(probs.clamp_min(1e-12).log(), y).item()
    return nll, (probs.argmax(-1) == y).float().mean().item()


def run(
    kind: str, data: str, seed: int, epochs: int, alpha: float = 2, batch_init: str = "normal"
) -> tuple[float, float, int]:
    """Train; keep the epoch with the best validation NLL (early stopping, same rule for every model)."""
    torch.manual_seed(seed)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    xtr, ytr, xva, yva, xte, yte = (t.to(dev) for t in _data(data, seed))
    model = _model(kind, xtr[0].numel(), alpha, batch_init).to(dev)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    best_val, best_state = float("inf"), copy.deepcopy(model.state_dict())
    for _ in range(epochs):
        model.train()
        for idx in torch.randperm(len(ytr), device=dev).split(64):
            out = _members(model, xtr[idx])
            loss = F.cross_entropy(out.flatten(0, 1), ytr[idx].repeat(out.shape[0]))
            opt.zero_grad()
            loss.backward()
            opt.step()
        val_nll, _ = _evaluate(model, xva, yva)
        if val_nll < best_val:
            best_val, best_state = val_nll, copy.deepcopy(model.state_dict())
    model.load_state_dict(best_state)
    nll, acc = _evaluate(model, xte, yte)
    return nll, acc, sum(p.numel() for p in model.parameters())


CONFIGS = (  # (label, kind, alpha, BatchEnsemble init)
    ("single", "single", 2, "normal"),
    ("PackedEnsemble alpha=2", "packed", 2, "normal"),
    ("PackedEnsemble alpha=4", "packed", 4, "normal"),
    ("BatchEnsemble N(1, 0.5)", "batch", 2, "normal"),
    ("BatchEnsemble random sign", "batch", 2, "random_sign"),
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=60)
    args = parse_with_threads(parser, default=2)
    seeds, epochs = (1, 10) if args.quick else (args.seeds, args.epochs)
    print(
        f"MLP 128-128, Adam 1e-3, batch 64, up to {epochs} epochs (epoch of best validation NLL), "
        f"{seeds} seed(s); M=4\n"
    )
    print("| data | model | params | test acc % | test NLL | NLL vs single |")
    print("|---|---|---|---|---|---|")
    for data in ("digits", "mnist1d"):
        base = None
        for label, kind, alpha, batch_init in CONFIGS:
            res = [run(kind, data, s, epochs, alpha, batch_init) for s in range(seeds)]
            nll = statistics.mean(r[0] for r in res)
            acc = statistics.mean(r[1] for r in res)
            base = nll if base is None else base
            print(f"| {data} | {label} | {res[0][2]:,} | {100 * acc:.2f} | {nll:.4f} | {nll / base:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
