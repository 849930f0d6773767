"""Ensemble families against a single model and a deep ensemble on digits and MNIST-1D (same run).

Backbone: MLP(in, 8, hidden=(128, 128)); classes 8 and 9 are held out of training and serve as the
out-of-distribution set (OOD AUROC of the predictive entropy). Every model trains with Adam (lr 1e-3,
batch 64), each member on its own loss, and keeps the epoch with the best validation NLL. Columns:
test accuracy, NLL, ECE (15 bins), OOD AUROC, parameters, median training-step time (batch 64:
forward, backward, Adam step) and inference time (batch 256, no grad), both timed once with all
models interleaved, one intra-op thread and the process CPU clock by default (``--clock wall`` for
wall time; the CPU clock is what a call costs even when other processes share the cores); quality
columns are mean +- std over seeds.

Rows: single model; deep ensemble (M=4); MC-Dropout (p=0.2 inserted before the two last layers,
8 samples, trained at one sample per example); MIMO (M=3, rho=0.5, init="reinit"); Masksembles
(M=4, scale 2); TTA of the single model and of the deep ensemble (3 augmentations: identity and two
one-pixel shifts; no training of their own, their training time is the base model's); TTA of a
single model trained on the same augmentations (``train_augment=True``); W-Asymmetric deep ensemble
(M=4, 6 fixed weights per unit, shared masks). ``disagreement`` is the mean pairwise argmax
disagreement of the members on the test set (diversity).

    python benchmarks/families.py            # 3 seeds, 40 epochs
    python benchmarks/families.py --quick    # 1 seed, 5 epochs
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_ensembles.backbones import MLP
from lightning_ensembles.data import DigitsDataModule, MNIST1DDataModule
from lightning_ensembles.ensembles.asymmetric import asymmetric_ensemble
from lightning_ensembles.ensembles.base import Ensemble
from lightning_ensembles.ensembles.deep import DeepEnsemble
from lightning_ensembles.ensembles.masksembles import Masksembles
from lightning_ensembles.ensembles.mc_dropout import MCDropout
from lightning_ensembles.ensembles.mimo import MIMO
from lightning_ensembles.ensembles.tta import TTAEnsemble
from lightning_ensembles.metrics.calibration import ExpectedCalibrationError
from lightning_ensembles.metrics.diversity import pairwise_disagreement
from lightning_ensembles.metrics.ood import OODAUROC

try:
    from _timing import interleaved_median_ms, parse_with_threads
    from leaderboard import Single
except ImportError:  # run as a module
    from benchmarks._timing import interleaved_median_ms, parse_with_threads
    from benchmarks.leaderboard import Single

OOD_CLASSES = (8, 9)
AUGMENT = {"digits": ["identity", "shift_1_0", "shift_0_1"], "mnist1d": ["identity", "shift_1", "shift_-1"]}


def _data(name: str, seed: int):
    dm = DigitsDataModule(seed=seed) if name == "digits" else MNIST1DDataModule(seed=seed)
    parts = dm.build()
    (xtr, ytr), (xva, yva), (xte, yte) = parts["train"], parts["val"], parts["test"]
    mean, std = xtr.mean(), xtr.std()
    ood = torch.tensor(OOD_CLASSES)

    def keep(x, y, in_dist=True):
        m = ~torch.isin(y, ood) if in_dist else torch.isin(y, ood)
        return (x[m] - mean) / std, y[m]

    return keep(xtr, ytr), keep(xva, yva), keep(xte, yte), keep(xte, yte, in_dist=False)[0]


def _build(kind: str, in_features: int, dataset: str) -> Ensemble:
    mlp = MLP(in_features, 10 - len(OOD_CLASSES), hidden=(128, 128))
    if kind == "single":
        return Single(mlp)
    if kind == "deep":
        return DeepEnsemble(mlp, num_members=4)
    if kind == "mc_dropout":
        return MCDropout(mlp, num_members=8, p=0.2, insert_before=["net.3", "net.5"], train_samples=1)
    if kind == "mimo":
        return MIMO(mlp, num_members=3, input_repetition=0.5, init="reinit")
    if kind == "masksembles":
        return Masksembles(mlp, num_members=4, scale=2.0)
    if kind == "asymmetric":
        return asymmetric_ensemble(mlp, num_members=4, num_fixed=6)
    if kind == "tta_trained":
        return TTAEnsemble(mlp, transforms=AUGMENT[dataset], train_augment=True)
    raise ValueError(kind)


def _loss(model: Ensemble, x: Tensor, y: Tensor) -> Tensor:
    out = model(x)
    target = model.member_targets(y)
    return F.cross_entropy(out.flatten(0, 1), target.flatten()) * out.shape[0]  # sum over members


@torch.no_grad()
def _evaluate(model: Ensemble, x: Tensor, y: Tensor, x_ood: Tensor | None = None) -> dict[str, float]:
    model.eval()
    member_probs = model(x).softmax(-1)
    probs = member_probs.mean(0)
    out = {
        "disagreement": float(pairwise_disagreement(member_probs).mean()),
        "nll": F.nll_loss(probs.clamp_min(1e-12).log(), y).item(),
        "acc": (probs.argmax(-1) == y).float().mean().item(),
    }
    if x_ood is not None:
        ece = ExpectedCalibrationError(n_bins=15)
        ece.update(probs, y)
        out["ece"] = float(ece.compute())
        p_ood = model(x_ood).softmax(-1).mean(0)
        entropy = lambda p: -(p * p.clamp_min(1e-12).log()).sum(-1)  # noqa: E731
        auroc = OODAUROC()
        auroc.update(
            torch.cat([entropy(probs), entropy(p_ood)]),
            torch.cat([torch.zeros(len(probs)), torch.ones(len(p_ood))]).long(),
        )
        out["auroc"] = float(auroc.compute())
    return out


def _train(model: Ensemble, data, epochs: int) -> Ensemble:
    (xtr, ytr), (xva, yva) = data[0], data[1]
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    best, best_state = float("inf"), copy.deepcopy(model.state_dict())
    for _ in range(epochs):
        model.train()
        for idx in torch.randperm(len(ytr)).split(64):
            loss = _loss(model, xtr[idx], ytr[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        nll = _evaluate(model, xva, yva)["nll"]
        if nll < best:
            best, best_state = nll, copy.deepcopy(model.state_dict())
    model.load_state_dict(best_state)
    return model


def cpu_interleaved_median_ms(
    fns: dict[str, object], reps: int, warmup: int = 2, block_ms: float = 20.0
) -> dict[str, float]:
    """Like ``interleaved_median_ms`` but on the process CPU clock: with one intra-op thread this is the
    work a call costs, unaffected by the time other processes hold the cores (a shared, loaded machine)."""
    last = {}
    for k, fn in fns.items():
        for _ in range(warmup):
            t0 = time.process_time()
            fn()
            last[k] = time.process_time() - t0
    inner = max(1, round(block_ms / 1e3 / max(max(last.values()), 1e-6)))
    times: dict[str, list[float]] = {k: [] for k in fns}
    order = list(fns.items())
    for r in range(reps):
        for k, fn in order[r % len(order) :] + order[: r % len(order)]:
            t0 = time.process_time()
            for _ in range(inner):
                fn()
            times[k].append((time.process_time() - t0) / inner)
    return {k: statistics.median(v) * 1e3 for k, v in times.items()}


def _timings(
    models: dict[str, Ensemble], x: Tensor, y: Tensor, xi: Tensor, reps: int, clock: str = "cpu"
) -> dict[str, tuple[float, float]]:
    """Median training-step and inference ms per model, all models timed interleaved (fair on a busy machine)."""
    steps, infers = {}, {}
    for kind, model in models.items():
        if kind in ("tta_single", "tta_deep"):
            continue  # TTA of a trained model does not train: its training step is its base model's
        trained = copy.deepcopy(model).train()
        opt = torch.optim.Adam(trained.parameters(), lr=1e-3)

        def step(model=trained, opt=opt):
            loss = _loss(model, x, y)
            opt.zero_grad()
            loss.backward()
            opt.step()

        steps[kind] = step
    for kind, model in models.items():
        model.eval()

        def run(model=model):
            with torch.no_grad():
                model(xi)

        infers[kind] = run
    timer = cpu_interleaved_median_ms if clock == "cpu" else interleaved_median_ms
    step_ms = timer(steps, reps, warmup=2)
    step_ms.update({k: step_ms[k.removeprefix("tta_")] for k in ("tta_single", "tta_deep")})
    infer_ms = timer(infers, reps, warmup=2)
    return {k: (step_ms[k], infer_ms[k]) for k in models}


ROWS = ("single", "deep", "mc_dropout", "mimo", "masksembles", "tta_single", "tta_deep", "tta_trained", "asymmetric")
LABELS = {
    "single": "single model",
    "deep": "deep ensemble (4)",
    "mc_dropout": "MC-Dropout (8 samples)",
    "mimo": "MIMO (3)",
    "masksembles": "Masksembles (4, s=2)",
    "tta_single": "TTA of single (3 aug.)",
    "tta_deep": "TTA of deep ensemble (4 x 3)",
    "tta_trained": "TTA, trained on its augmentations (3)",
    "asymmetric": "W-Asymmetric deep ensemble (4)",
}


def run_dataset(
    name: str, seeds: list[int], epochs: int, reps: int, clock: str = "cpu"
) -> dict[str, list[dict[str, float]]]:
    results: dict[str, list[dict[str, float]]] = {r: [] for r in ROWS}
    timed: dict[str, Ensemble] = {}
    for seed in seeds:
        data = _data(name, seed)
        (xtr, ytr), _, (xte, yte), x_ood = data
        models: dict[str, Ensemble] = {}
        for kind in ("single", "deep", "mc_dropout", "mimo", "masksembles", "asymmetric", "tta_trained"):
            torch.manual_seed(seed)
            models[kind] = _train(_build(kind, xtr[0].numel(), name), data, epochs)
        models["tta_single"] = TTAEnsemble(models["single"], transforms=AUGMENT[name])
        models["tta_deep"] = TTAEnsemble(models["deep"], transforms=AUGMENT[name])
        for kind in ROWS:
            res = _evaluate(models[kind], xte, yte, x_ood)
            res["params"] = sum(p.numel() for p in models[kind].parameters())
            results[kind].append(res)
        if not timed:
            timed, batch = models, (xtr[:64], ytr[:64], xte[:256])
    times = _timings(timed, *batch, reps, clock)  # timings do not depend on the seed: measured once, interleaved
    for kind in ROWS:
        for res in results[kind]:
            res["step_ms"], res["infer_ms"] = times[kind]
    return results


def _fmt(values: list[float], digits: int) -> str:
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def table(name: str, results: dict[str, list[dict[str, float]]]) -> str:
    head = (
        "| method | accuracy | NLL | ECE | OOD AUROC | disagreement | parameters | train step (ms) | inference (ms) |"
    )
    lines = [f"**{name}**", "", head, "|" + "---|" * 9]
    for row in ROWS:
        rs = results[row]
        get = lambda k: [r[k] for r in rs]  # noqa: E731
        lines.append(
            f"| {LABELS[row]} | {_fmt(get('acc'), 3)} | {_fmt(get('nll'), 3)} | {_fmt(get('ece'), 3)} | "
            f"{_fmt(get('auroc'), 3)} | {_fmt(get('disagreement'), 3)} | {int(rs[0]['params']):,} | {statistics.median(get('step_ms')):.2f} | "
            f"{statistics.median(get('infer_ms')):.2f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="1 seed, 5 epochs, fewer timing repetitions")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument(
        "--clock",
        choices=("cpu", "wall"),
        default="cpu",
        help="cpu: process CPU time per call (robust on a loaded machine, meant for --threads 1); "
        "wall: wall-clock time",
    )
    args = parse_with_threads(parser)
    seeds = [0] if args.quick else list(range(args.seeds))
    epochs = 5 if args.quick else args.epochs
    reps = 5 if args.quick else 25
    t0 = time.perf_counter()
    for name in ("digits", "mnist1d"):
        print(table(name, run_dataset(name, seeds, epochs, reps, args.clock)), "\n", flush=True)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(
        f"seeds {seeds}, {epochs} epochs, {args.threads} threads, {args.clock} clock, torch {torch.__version__}, {os.cpu_count()} CPUs, "
        f"load average {load:.1f} at the end; total {time.perf_counter() - t0:.0f} s"
    )


if __name__ == "__main__":
    main()
