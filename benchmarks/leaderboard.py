"""Method leaderboard: every registered ensemble method against a single model, same footing, one run.

Tasks and backbones (one backbone per task, shared by every row):

* ``mnist1d``: MNIST-1D from the generator (3,600 train / 400 val / 1,000 test), ``CNN1D`` (8,202
  parameters); OOD set: 1,000 signals of another template family (``ood="waves"``); shifted set:
  1,000 signals with the generator's noise, scale and shear turned up (``DEFAULT_SHIFT``).
* ``digits``: scikit-learn digits, a small 2-D CNN; classes 8 and 9 held out as the OOD set; shifted
  set: the test split plus Gaussian pixel noise (std 0.25, fixed seed).
* ``toy``: the heteroscedastic regression toy (``ToyRegressionDataModule``), an MLP with a Gaussian
  head (mean, raw variance); no OOD or shift columns, NLL inside the training range and in the gap.

Footing: every method has M = 4 members (MC-Dropout: 4 samples) and trains for the same number of
epochs with Adam (lr 3e-3, batch 64), every member on its own loss (the modules' convention), keeping
the epoch of best validation NLL (the early-stopping rule); the single model trains for the same
epochs. TTA rows do not train: they wrap the trained single model. Quality columns are mean ± std
over seeds; training time is process CPU seconds (one intra-op thread: robust on a shared machine);
inference MACs per sample are counted with ``torch.utils.flop_counter.FlopCounterMode`` (FLOPs / 2)
on a batch of 32. "×" columns are relative to the single model of the same run. A method that cannot
be built for a backbone is listed with the error it raised (e.g. LoRA needs attention or linear
layers it can target).

    python benchmarks/leaderboard.py --jobs 3   # 3 seeds, 20 epochs: writes docs/leaderboard.md, docs/img/
    python benchmarks/leaderboard.py --quick    # 1 seed, 4 epochs, MNIST-1D only (about 3 minutes)
"""

from __future__ import annotations

import argparse
import copy
import inspect
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from lightning_ensembles.backbones import CNN1D, MLP
from lightning_ensembles.data import DigitsDataModule, MNIST1DDataModule, ToyRegressionDataModule
from lightning_ensembles.ensembles.base import Ensemble, split_gaussian, training_outputs
from lightning_ensembles.ensembles.registry import ENSEMBLE_METHODS, _load_builtin_methods, build_ensemble
from lightning_ensembles.ensembles.tta import TTAEnsemble
from lightning_ensembles.metrics.calibration import ExpectedCalibrationError
from lightning_ensembles.metrics.diversity import pairwise_disagreement
from lightning_ensembles.metrics.ood import OODAUROC
from lightning_ensembles.metrics.selective import AURC

try:
    from _timing import parse_with_threads
except ImportError:  # run as a module
    from benchmarks._timing import parse_with_threads

NUM_MEMBERS = 4
LR = 3e-3
BATCH = 64


class SmallCNN2D(nn.Module):
    """Two conv-BN-ReLU-maxpool blocks (16, 32 channels) and a linear head: ``(B, 1, 8, 8) -> (B, C)``."""

    def __init__(self, out_features: int = 8) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.BatchNorm2d(32),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
        )
        self.head = nn.Linear(32 * 2 * 2, out_features)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


class Single(Ensemble):
    """The backbone as a one-member ensemble."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__(1)
        self.net = net

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x).unsqueeze(0)

    def member(self, index: int) -> nn.Module:
        return self.net


@dataclass
class Task:
    name: str
    kind: str  # "classification" or "regression"
    backbone: Callable[[], nn.Module]
    data: Callable[[int, bool], dict[str, tuple[Tensor, Tensor]]]
    augment: list[str] = field(default_factory=list)  # TTA transforms ([] = TTA does not apply)
    kwargs: dict[str, dict] = field(default_factory=dict)  # per-method constructor arguments


def _mnist1d(seed: int, tiny: bool) -> dict[str, tuple[Tensor, Tensor]]:
    dm = MNIST1DDataModule(
        num_samples=400 if tiny else 5000, split=(0.72, 0.08, 0.2), seed=seed, ood="waves", shift_test=True
    )
    return dm.build()


def _digits(seed: int, tiny: bool) -> dict[str, tuple[Tensor, Tensor]]:
    parts = DigitsDataModule(seed=seed, ood_classes=(8, 9)).build()
    if tiny:
        parts = {k: (x[:200], y[:200]) for k, (x, y) in parts.items()}
    x, y = parts["test"]
    g = torch.Generator().manual_seed(1000 + seed)
    parts["shift"] = (x + 0.25 * torch.randn(x.shape, generator=g), y)
    return parts


def _toy(seed: int, tiny: bool) -> dict[str, tuple[Tensor, Tensor]]:
    n = (128, 64, 100) if tiny else (512, 128, 400)
    return ToyRegressionDataModule(num_train=n[0], num_val=n[1], num_test=n[2], seed=seed).build()


# Per-method arguments: dropout before the head (the backbones have none), MIMO from scratch as in
# its paper; symmetry with the groups a 1-D signal has (flips), the default (rotations) on images.
_COMMON = {
    "mc_dropout": {"p": 0.2, "insert_before": ["head"], "train_samples": 1},
    "mimo": {"input_repetition": 0.5, "init": "reinit"},
}
TASKS = {
    "mnist1d": Task(
        "mnist1d",
        "classification",
        lambda: CNN1D(1, 10, 40),
        _mnist1d,
        ["identity", "shift_1", "shift_-1", "shift_2"],
        {
            **_COMMON,
            "symmetry": {"symmetries": ["plain", "plain", "invariant-hflip", "equivariant-hflip"]},
            # the first convolution has fan-in 5, fewer than the 6 fixed weights per unit
            "asymmetric": {"layers": ["features.4", "features.8", "head"]},
        },
    ),
    "digits": Task(
        "digits",
        "classification",
        lambda: SmallCNN2D(8),
        _digits,
        ["identity", "shift_1_0", "shift_0_1", "shift_-1_0"],
        dict(_COMMON),
    ),
    "toy": Task(
        "toy",
        "regression",
        lambda: MLP(1, 2, hidden=(64, 64)),
        _toy,
        [],
        {
            "mc_dropout": {"p": 0.1, "insert_before": ["net.4"], "train_samples": 1},
            "mimo": _COMMON["mimo"],
            "asymmetric": {"layers": ["net.3", "net.5"]},
        },
    ),  # fan-in 1 first
}


def methods() -> list[str]:
    """Every registered method name (the registry as it is when this runs)."""
    _load_builtin_methods()
    return list(ENSEMBLE_METHODS)


def build(task: Task, method: str, single: nn.Module | None = None, example: Tensor | None = None) -> Ensemble:
    """The ``method`` ensemble of the task's backbone (TTA: of the trained ``single`` backbone)."""
    if method == "single":
        return Single(task.backbone())
    if method == "tta":
        if not task.augment:
            raise ValueError("no input augmentation applies to the toy's scalar inputs")
        return TTAEnsemble(single, transforms=task.augment)
    if method == "symmetry" and task.kind == "regression":
        raise ValueError("no flip or rotation group acts on the toy's scalar inputs")
    kwargs = dict(task.kwargs.get(method, {}))
    if example is not None and "example_input" in inspect.signature(ENSEMBLE_METHODS[method]).parameters:
        kwargs.setdefault("example_input", example)  # converters trace the backbone on it to verify themselves
    return build_ensemble(method, task.backbone(), num_members=NUM_MEMBERS, **kwargs)


def _loss(task: Task, model: Ensemble, x: Tensor, y: Tensor) -> Tensor:
    out, extra, _ = training_outputs(model, x, y)  # own objective: per-member inputs, auxiliary heads
    target = model.member_targets(y if task.kind == "classification" else y)
    if task.kind == "classification":
        loss = F.cross_entropy(out.flatten(0, 1), target.flatten())
    else:
        mean, var = split_gaussian(out)
        loss = F.gaussian_nll_loss(mean, target.to(mean.dtype), var, full=True)
    total = loss if extra is None else loss + extra
    return total * out.shape[0]  # each member on its own loss (the modules' convention)


@torch.no_grad()
def _predict(model: Ensemble, x: Tensor, chunk: int = 512) -> Tensor:
    model.eval()
    return torch.cat([model(part) for part in x.split(chunk)], dim=1)


def _nll(task: Task, out: Tensor, y: Tensor) -> float:
    if task.kind == "classification":
        return F.nll_loss(out.softmax(-1).mean(0).clamp_min(1e-12).log(), y).item()
    mean, var = split_gaussian(out)
    mix_mean = mean.mean(0)
    mix_var = var.mean(0) + mean.var(0, unbiased=False)
    return F.gaussian_nll_loss(mix_mean, y, mix_var, full=True).item()


def train(task: Task, model: Ensemble, data: dict, epochs: int, seed: int) -> tuple[Ensemble, float, int]:
    """Adam for ``epochs``; returns the model at its best validation-NLL epoch, CPU seconds, that epoch."""
    (xtr, ytr), (xva, yva) = data["train"], data["val"]
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=LR)
    g = torch.Generator().manual_seed(seed)
    best, best_state, best_epoch = math.inf, copy.deepcopy(model.state_dict()), 0
    t0 = time.process_time()
    for epoch in range(epochs):
        model.train()
        for idx in torch.randperm(len(ytr), generator=g).split(BATCH):
            if len(idx) < 2:  # BatchNorm needs two samples
                continue
            loss = _loss(task, model, xtr[idx], ytr[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        nll = _nll(task, _predict(model, xva), yva)
        if nll < best:
            best, best_state, best_epoch = nll, copy.deepcopy(model.state_dict()), epoch + 1
    seconds = time.process_time() - t0
    model.load_state_dict(best_state)
    return model.eval(), seconds, best_epoch


def macs_per_sample(model: Ensemble, x: Tensor) -> float:
    """Inference multiply-accumulates per sample (FLOPs / 2 of one forward pass, batch of ``len(x)``)."""
    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x)
    return counter.get_total_flops() / 2 / len(x)


def _entropy(p: Tensor) -> Tensor:
    return -(p * p.clamp_min(1e-12).log()).sum(-1)


def evaluate(task: Task, model: Ensemble, data: dict) -> dict[str, float]:
    """Quality columns of one trained model on the task's test sets."""
    x, y = data["test"]
    out = _predict(model, x)
    res: dict[str, float] = {"nll": _nll(task, out, y)}
    if task.kind == "regression":
        mean, var = split_gaussian(out)
        mix_var = var.mean(0) + mean.var(0, unbiased=False)
        res["rmse"] = (mean.mean(0) - y).pow(2).mean().sqrt().item()
        gap = (x[:, 0] > ToyRegressionDataModule.gap[0]) & (x[:, 0] < ToyRegressionDataModule.gap[1])
        res["nll_gap"] = _nll(task, out[:, gap], y[gap])
        res["nll_in"] = _nll(task, out[:, ~gap], y[~gap])
        res["std_gap_ratio"] = (mix_var[gap].sqrt().mean() / mix_var[~gap].sqrt().mean()).item()
        return res
    member_probs = out.softmax(-1)
    probs = member_probs.mean(0)
    res["acc"] = (probs.argmax(-1) == y).float().mean().item()
    res["member_acc"] = (member_probs.argmax(-1) == y).float().mean().item()
    res["disagreement"] = pairwise_disagreement(member_probs).mean().item()
    res["brier"] = (probs - F.one_hot(y, probs.shape[-1])).pow(2).sum(-1).mean().item()
    ece = ExpectedCalibrationError(n_bins=15)
    ece.update(probs, y)
    res["ece"] = float(ece.compute())
    # Signed: below 0 the model is underconfident on average, above 0 overconfident (ECE hides the sign).
    res["conf_minus_acc"] = probs.max(-1).values.mean().item() - res["acc"]
    aurc = AURC()
    aurc.update(probs, y)
    res["aurc"] = float(aurc.compute())
    p_ood = _predict(model, data["ood"][0]).softmax(-1).mean(0)
    auroc = OODAUROC()
    auroc.update(
        torch.cat([_entropy(probs), _entropy(p_ood)]),
        torch.cat([torch.zeros(len(probs)), torch.ones(len(p_ood))]).long(),
    )
    res["ood_auroc"] = float(auroc.compute())
    xs, ys = data["shift"]
    ps = _predict(model, xs).softmax(-1).mean(0)
    res["shift_acc"] = (ps.argmax(-1) == ys).float().mean().item()
    ece_s = ExpectedCalibrationError(n_bins=15)
    ece_s.update(ps, ys)
    res["shift_ece"] = float(ece_s.compute())
    return res


def run_task(
    task: Task, names: list[str], seeds: list[int], epochs: int, tiny: bool, log: Callable[[str], None] = print
) -> tuple[dict[str, list[dict]], dict[str, str], dict]:
    """Train and evaluate every method on every seed. Returns (results per row, skip reasons, extras for plots)."""
    results: dict[str, list[dict]] = {}
    skipped: dict[str, str] = {}
    extras: dict = {}
    for seed in seeds:
        data = task.data(seed, tiny)
        probe = data["test"][0][:32]
        single_net = None
        for name in ["single", *[n for n in names if n != "single"]]:
            if name in skipped:
                continue
            torch.manual_seed(seed)
            try:
                model = build(task, name, single_net, data["train"][0][:2])
            except Exception as err:  # noqa: BLE001 - a method that does not apply is a row with its reason
                reason = str(err).splitlines()[0]
                skipped[name] = f"{type(err).__name__}: {reason[:300]}{' ...' if len(reason) > 300 else ''}"
                log(f"  {task.name}/{name}: skipped ({skipped[name]})")
                continue
            if name == "tta":
                seconds, epoch = results["single"][-1]["train_s"], results["single"][-1]["epoch"]
            else:
                model, seconds, epoch = train(task, model, data, epochs, seed)
            if name == "single":
                single_net = model.net
            res = evaluate(task, model, data)
            res.update(
                train_s=seconds,
                epoch=epoch,
                params=sum(p.numel() for p in model.parameters()),
                macs=macs_per_sample(model, probe),
            )
            results.setdefault(name, []).append(res)
            if seed == seeds[0] and name in ("single", "deep") and task.kind == "classification":
                x, y = data["test"]
                ece = ExpectedCalibrationError(n_bins=15)
                ece.update(_predict(model, x).softmax(-1).mean(0), y)
                extras[name] = ece
            log(
                f"  {task.name}/{name} seed {seed}: "
                + ", ".join(
                    f"{k} {v:.4g}" for k, v in res.items() if k in ("acc", "nll", "ece", "ood_auroc", "rmse", "train_s")
                )
            )
    return results, skipped, extras


# ------------------------------------------------------------------------------------------- report
#: Reported metrics of the classification tasks: key -> (column header, digits shown).
CLS_FORMAT = {
    "acc": ("accuracy", 4),
    "nll": ("NLL", 3),
    "brier": ("Brier", 4),
    "ece": ("ECE", 4),
    "aurc": ("AURC", 4),
    "ood_auroc": ("OOD AUROC", 3),
    "shift_acc": ("shift acc", 3),
    "shift_ece": ("shift ECE", 3),
}
#: ... and of the regression tasks.
REG_FORMAT = {
    "nll": CLS_FORMAT["nll"],
    "rmse": ("RMSE", 3),
    "nll_in": ("NLL (train range)", 3),
    "nll_gap": ("NLL (gap)", 3),
    "std_gap_ratio": ("std gap / range", 2),
}
CLS_COLS = [(k, *v) for k, v in CLS_FORMAT.items()]
REG_COLS = [(k, *v) for k, v in REG_FORMAT.items()]
LOWER_IS_BETTER = {"nll", "brier", "ece", "aurc", "shift_ece", "rmse", "nll_in", "nll_gap"}


def _mean(rows: list[dict], key: str) -> float:
    return statistics.mean(r[key] for r in rows)


def _fmt(rows: list[dict], key: str, digits: int) -> str:
    values = [r[key] for r in rows]
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def _si(v: float) -> str:
    return f"{v / 1e6:.2f}M" if v >= 1e6 else f"{v / 1e3:.1f}k" if v >= 1e3 else f"{v:.0f}"


def table(task: Task, results: dict[str, list[dict]]) -> str:
    """Markdown table of one task: quality columns (mean ± std), then cost columns relative to the single model."""
    cols = CLS_COLS if task.kind == "classification" else REG_COLS
    head = [
        "method",
        *(h for _, h, _ in cols),
        "params (× single)",
        "train CPU s (× single)",
        "inference MACs/sample (× single)",
        "best epoch",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    base = results["single"]
    for name, rows in results.items():
        cost = []
        for key in ("params", "train_s", "macs"):
            value, ref = _mean(rows, key), _mean(base, key)
            shown = _si(value) if key != "train_s" else f"{value:.1f}"
            cost.append(f"{shown} ({value / ref:.2f}×)" if ref else shown)
        cells = [name, *(_fmt(rows, k, d) for k, _, d in cols), *cost, _fmt(rows, "epoch", 0)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def verdicts(task: Task, results: dict[str, list[dict]]) -> list[str]:
    """Where a method loses to the single model or to the deep ensemble, with the measured diagnostics."""
    cols = CLS_COLS if task.kind == "classification" else REG_COLS
    out = []
    for name, rows in results.items():
        if name == "single":
            continue
        for ref in ("single", "deep"):
            if ref == name or ref not in results:
                continue
            lost = []
            for key, header, digits in cols:
                mine, theirs = _mean(rows, key), _mean(results[ref], key)
                worse = mine > theirs if key in LOWER_IS_BETTER else mine < theirs
                if worse:
                    lost.append(f"{header} {mine:.{digits}f} vs {theirs:.{digits}f}")
            if not lost:
                continue
            line = f"- **{name}** loses to **{ref}** on: " + "; ".join(lost) + "."
            if task.kind == "classification":
                line += (
                    f" Measured: mean member accuracy {_mean(rows, 'member_acc'):.4f} vs {_mean(results[ref], 'member_acc'):.4f}, "
                    f"member disagreement {_mean(rows, 'disagreement'):.4f} vs {_mean(results[ref], 'disagreement'):.4f}, "
                    f"best validation epoch {_mean(rows, 'epoch'):.1f} vs {_mean(results[ref], 'epoch'):.1f}"
                )
                if "conf_minus_acc" in rows[0] and "conf_minus_acc" in results[ref][0]:
                    line += (
                        f", mean confidence - accuracy {_mean(rows, 'conf_minus_acc'):+.4f} vs "
                        f"{_mean(results[ref], 'conf_minus_acc'):+.4f} (below 0: underconfident)"
                    )
                line += "."
            else:
                line += (
                    f" Measured: predictive std in the gap / in the training range {_mean(rows, 'std_gap_ratio'):.2f} "
                    f"vs {_mean(results[ref], 'std_gap_ratio'):.2f}."
                )
            out.append(line)
    return out


def plot_nll_vs_macs(per_task: dict[str, dict[str, list[dict]]], path: str) -> str:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.0 * len(per_task), 4.2), dpi=100)
    axes = fig.subplots(1, len(per_task), squeeze=False)[0]
    for ax, (name, results) in zip(axes, per_task.items()):
        for method, rows in results.items():
            ax.scatter(_mean(rows, "macs"), _mean(rows, "nll"), s=30)
            ax.annotate(
                method, (_mean(rows, "macs"), _mean(rows, "nll")), fontsize=8, xytext=(3, 3), textcoords="offset points"
            )
        ax.set_xscale("log")
        ax.set_xlabel("inference MACs per sample")
        ax.set_ylabel("test NLL")
        ax.set_title(name)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    return path


def _job(task: str, names: list[str], seed: int, epochs: int, tiny: bool, threads: int):
    torch.set_num_threads(threads)
    print(f"{task}: seed {seed}, {epochs} epochs", flush=True)
    return run_task(TASKS[task], names, [seed], epochs, tiny)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="1 seed, 4 epochs, MNIST-1D only (about 3 minutes)")
    parser.add_argument("--tiny", action="store_true", help="tests only: tiny data, 1 epoch, 1 seed")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--tasks", default="mnist1d,digits,toy", help="comma-separated: mnist1d, digits, toy")
    parser.add_argument("--methods", default="all", help="comma-separated registry names, or 'all'")
    parser.add_argument(
        "--out",
        default=os.path.join(os.path.dirname(__file__), "..", "docs"),
        help="folder for leaderboard.md and img/leaderboard_*.png",
    )
    parser.add_argument("--jobs", type=int, default=1, help="(task, seed) runs in parallel processes")
    args = parse_with_threads(parser, argv=argv)
    seeds = list(range(args.seeds))
    epochs = args.epochs
    tasks = args.tasks.split(",")
    if args.quick:
        seeds, epochs, tasks = [0], 4, (["mnist1d"] if args.tasks == parser.get_default("tasks") else tasks)
    if args.tiny:
        seeds, epochs = [0], 1
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        parser.error(f"unknown tasks {unknown}; choose from {list(TASKS)}")
    registered = methods()
    names = registered + ["tta"] * ("tta" not in registered) if args.methods == "all" else args.methods.split(",")
    bad = [n for n in names if n not in registered and n != "single"]
    if bad:
        parser.error(f"unknown methods {bad}; registered: {registered}")
    wall0, cpu0 = time.perf_counter(), time.process_time()
    per_task, sections = {}, []
    img = os.path.join(args.out, "img")
    os.makedirs(img, exist_ok=True)
    jobs = [(name, seed) for name in tasks for seed in seeds]
    if args.jobs > 1:  # (task, seed) runs in parallel processes, one intra-op thread each
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(args.jobs) as pool:
            futures = [pool.submit(_job, name, names, seed, epochs, args.tiny, args.threads) for name, seed in jobs]
            outputs = [f.result() for f in futures]
    else:
        outputs = [_job(name, names, seed, epochs, args.tiny, args.threads) for name, seed in jobs]
    for name in tasks:
        task = TASKS[name]
        results: dict[str, list[dict]] = {}
        skipped: dict[str, str] = {}
        extras: dict = {}
        for (job_task, seed), (res, skip, ext) in zip(jobs, outputs):
            if job_task != name:
                continue
            for method, rows in res.items():
                results.setdefault(method, []).extend(rows)
            skipped.update(skip)
            if seed == seeds[0]:
                extras = ext
        per_task[name] = results
        part = [f"## {name}", "", table(task, results), ""]
        if skipped:
            part += ["Not applicable here (the error the method raised):", ""]
            part += [f"- **{k}**: {v}" for k, v in skipped.items()] + [""]
        lost = verdicts(task, results)
        part += ["Where a method loses (means over seeds):", ""] + (lost or ["- none"]) + [""]
        if "single" in extras and "deep" in extras:
            from lightning_ensembles.showcase import plot_reliability_pair

            path = os.path.join(img, f"leaderboard_reliability_{name}.png")
            plot_reliability_pair(
                {"single model": extras["single"], "deep ensemble (4)": extras["deep"]},
                path,
                f"{name}, test split, seed {seeds[0]}",
            )
            part += [f"![reliability, {name}](img/{os.path.basename(path)})", ""]
        sections.append("\n".join(part))
    plot = plot_nll_vs_macs(per_task, os.path.join(img, "leaderboard_nll_macs.png"))
    import resource

    children = resource.getrusage(resource.RUSAGE_CHILDREN)  # the --jobs worker processes
    wall = time.perf_counter() - wall0
    cpu = time.process_time() - cpu0 + children.ru_utime + children.ru_stime
    command = "python benchmarks/leaderboard.py " + " ".join(argv if argv is not None else sys.argv[1:])
    single = per_task.get("mnist1d", {}).get("single")
    header = [
        "# Method leaderboard",
        "",
        "<!-- Generated by benchmarks/leaderboard.py: do not edit by hand; rerun the command below. -->",
        "",
        f"Command: `{command.strip()}`; seeds {seeds}, {epochs} epochs, M = {NUM_MEMBERS}, Adam lr {LR}, "
        f"batch {BATCH}; torch {torch.__version__}, {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs, {args.threads} thread(s); {wall:.0f} s wall, {cpu:.0f} s CPU.",
        "",
        (__doc__ or "").split("\n\n")[2].strip().replace("``", "`"),
        "",
        (__doc__ or "").split("\n\n")[3].strip().replace("``", "`"),
        "",
    ]
    if single:
        header += [
            f"The single CNN1D reaches {_mean(single, 'acc'):.4f} test accuracy on MNIST-1D here "
            "(the MNIST-1D paper's CNN: about 0.94).",
            "",
        ]
    header += [f"![test NLL against inference MACs](img/{os.path.basename(plot)})", ""]
    with open(os.path.join(args.out, "leaderboard.md"), "w") as f:
        f.write("\n".join(header + sections))
    print(f"wrote {os.path.join(args.out, 'leaderboard.md')}; {wall:.0f} s wall, {cpu:.0f} s CPU", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
