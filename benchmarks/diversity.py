"""Cost and effect of each diversity / repulsion regulariser on a deep ensemble (M=4 MLPs).

    python benchmarks/diversity.py            # digits + MNIST-1D, 2 seeds (about 5 minutes on a quiet 2-core CPU)
    python benchmarks/diversity.py --quick    # fewer epochs, 1 seed (about 1 minute)

For each regulariser (and plain training) the script prints, per dataset:
* step time: median milliseconds of one training step (forward, loss + regulariser, backward, Adam),
  timed round-robin over all methods in the same run so machine load hits them alike, and its ratio
  to plain training;
* test accuracy, NLL, ECE (15 bins) of the ensemble (mean of member probabilities) and the mean
  pairwise argmax disagreement of the members, averaged over seeds.

The training loop is what ``EnsembleClassifier`` does: minimise ``M * (mean member CE + weight * value)``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from lightning_ensembles import MLP, DeepEnsemble
from lightning_ensembles.data import load_digits_tensors
from lightning_ensembles.data._tensor_dm import seeded_split
from lightning_ensembles.data.mnist1d import generate_mnist1d
from lightning_ensembles.losses import (
    FunctionSpaceRepulsion,
    InputGradientRepulsion,
    JensenGap,
    JensenShannon,
    PairwiseKL,
    SoftDisagreement,
    WeightSpaceRepulsion,
)
from lightning_ensembles.metrics import Disagreement, ExpectedCalibrationError, NegativeLogLikelihood

try:
    from _timing import parse_with_threads
except ImportError:  # run as a module
    from benchmarks._timing import parse_with_threads

M = 4
LR = 3e-3


def methods(n_train: int):
    """(label, regulariser factory): weights that are felt without wrecking accuracy on these data."""
    return [
        ("plain", None),
        ("PairwiseKL(+0.1)", lambda: PairwiseKL(weight=0.1)),
        ("JensenShannon(+0.3)", lambda: JensenShannon(weight=0.3)),
        ("SoftDisagreement(+1)", lambda: SoftDisagreement(weight=1.0)),
        ("JensenGap(gamma=0.5)", lambda: JensenGap(gamma=0.5)),
        ("JensenGap(gamma=1.5)", lambda: JensenGap(gamma=1.5)),
        ("FunctionSpaceRepulsion(+0.03)", lambda: FunctionSpaceRepulsion(weight=0.03)),
        (f"WeightSpaceRepulsion(1/N={1 / n_train:.1e})", lambda: WeightSpaceRepulsion(weight=1.0 / n_train)),
        ("WeightSpaceRepulsion(+1)", lambda: WeightSpaceRepulsion(weight=1.0)),
        ("InputGradientRepulsion(+1, FoRDE)", lambda: InputGradientRepulsion(weight=1.0)),
        ("InputGradientRepulsion(+10)", lambda: InputGradientRepulsion(weight=10.0)),
    ]


def load(name: str, seed: int):
    if name == "digits":
        x, y = load_digits_tensors()
        tr, _, te = seeded_split(len(y), (0.6, 0.2, 0.2), seed)
        in_features = 64
    else:
        x, y = generate_mnist1d(4000, 42)
        x = (x - x.mean()) / x.std()
        tr, _, te = seeded_split(len(y), (0.7, 0.1, 0.2), seed)
        in_features = 40
    return x[tr], y[tr], x[te], y[te], in_features


def make(in_features: int, seed: int, factory, lr: float):
    torch.manual_seed(seed)
    ens = DeepEnsemble(MLP(in_features, 10, hidden=(128, 128)), num_members=M)
    return ens, (factory() if factory else None), torch.optim.Adam(ens.parameters(), lr=lr)


def step(ens, reg, opt, x, y):
    out = ens(x)
    loss = F.cross_entropy(out.flatten(0, 1), y.repeat(M))
    if reg is not None:
        loss = loss + reg.weight * reg(out, y, inputs=x, ensemble=ens)
    opt.zero_grad(set_to_none=True)
    (M * loss).backward()
    opt.step()


def time_steps(name: str, reps: int, batch: int = 64) -> dict[str, float]:
    """Median ms per step of each method, round-robin so that load changes hit every method alike."""
    xtr, ytr, _, _, d = load(name, 0)
    x, y = xtr[:batch], ytr[:batch]
    setups = {label: make(d, 0, f, LR) for label, f in methods(len(ytr))}
    for s in setups.values():  # warm-up
        step(*s, x, y)
    times: dict[str, list[float]] = {label: [] for label in setups}
    for _ in range(reps):
        for label, s in setups.items():
            t0 = time.perf_counter()
            for _ in range(5):
                step(*s, x, y)
            times[label].append((time.perf_counter() - t0) / 5 * 1e3)
    return {label: statistics.median(v) for label, v in times.items()}


def evaluate(ens, x, y) -> dict[str, float]:
    ens.eval()
    with torch.no_grad():
        member_probs = ens(x).softmax(-1)
    probs = member_probs.mean(0)
    ece, nll, dis = ExpectedCalibrationError(n_bins=15), NegativeLogLikelihood(), Disagreement()
    ece.update(probs, y)
    nll.update(probs, y)
    dis.update(member_probs)
    return {
        "acc": float((probs.argmax(-1) == y).float().mean()),
        "nll": float(nll.compute()),
        "ece": float(ece.compute()),
        "dis": float(dis.compute()),
    }


def train_eval(name: str, seed: int, factory, epochs: int, batch: int = 64) -> dict[str, float]:
    xtr, ytr, xte, yte, d = load(name, seed)
    ens, reg, opt = make(d, seed, factory, LR)
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        perm = torch.randperm(len(ytr), generator=g)
        for i in range(0, len(ytr), batch):
            idx = perm[i : i + batch]
            step(ens, reg, opt, xtr[idx], ytr[idx])
    return evaluate(ens, xte, yte)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer epochs and one seed")
    parser.add_argument("--seeds", type=int, default=None)
    parser.add_argument("--datasets", nargs="+", default=["digits", "mnist1d"], choices=["digits", "mnist1d"])
    args = parse_with_threads(parser)
    seeds = args.seeds or (1 if args.quick else 2)
    epochs = {"digits": 10 if args.quick else 20, "mnist1d": 6 if args.quick else 12}
    reps = 5 if args.quick else 10

    print(
        f"Deep ensemble of M={M} MLPs (64|40-128-128-10), Adam lr {LR:g}, batch 64; {seeds} seed(s); "
        f"torch {torch.__version__}, {torch.get_num_threads()} thread(s).\n"
    )
    for name in args.datasets:
        times = time_steps(name, reps)
        base = times["plain"]
        n_train = len(load(name, 0)[1])
        print(f"### {name} ({epochs[name]} epochs, {n_train} training examples)\n")
        print("| regulariser | step ms | x plain | acc % | NLL | ECE % | disagreement % |")
        print("|---|---|---|---|---|---|---|")
        for label, factory in methods(n_train):
            runs = [train_eval(name, s, factory, epochs[name]) for s in range(seeds)]
            mean = {k: statistics.mean(r[k] for r in runs) for k in runs[0]}
            print(
                f"| {label} | {times[label]:.1f} | {times[label] / base:.2f} | {100 * mean['acc']:.2f} | "
                f"{mean['nll']:.3f} | {100 * mean['ece']:.2f} | {100 * mean['dis']:.1f} |",
                flush=True,
            )
        print()


if __name__ == "__main__":
    main()
