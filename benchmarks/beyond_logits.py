"""What each "beyond logits" tool adds over a plain deep ensemble: NLL, ECE, OOD AUROC and cost.

    python benchmarks/beyond_logits.py            # digits, MNIST-1D, toy regression; 3 seeds
    python benchmarks/beyond_logits.py --quick    # digits and toy regression, 1 seed, short training

Classification (digits with classes 8, 9 held out as OOD; MNIST-1D with the generator's wave templates
as OOD): a deep ensemble of M=4 MLPs is trained once per seed; every post-hoc calibrator is fitted on its
validation split, applied to the ensemble (after averaging) and to the members (before averaging);
last-layer Laplace (laplace-torch, kron, prior precision by validation grid search) per member; an
evidential ensemble (DirichletHead + Sensoy et al.'s loss) is trained on its own. NLL and ECE (15 bins)
on the in-distribution test split; OOD AUROC of the predictive entropy of each method's prediction.
A second table gives the OOD AUROC of every OOD score of the plain ensemble.

Regression (toy ``x sin x`` with a gap in the training inputs): Gaussian deep ensemble vs deep evidential
regression (one member and an ensemble of 4); NLL of the moment-matched predictive, RMSE, 90% coverage,
OOD AUROC of the epistemic variance (test points in the gap or beyond the data as OOD).

Cost: seconds to fit the extra step (post-hoc fit; training for the evidential rows), and the time of one
prediction over the test split relative to the plain ensemble's.
"""

from __future__ import annotations

import argparse
import math
import time
import warnings
from collections import defaultdict

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_ensembles import DeepEnsemble
from lightning_ensembles.backbones import MLP
from lightning_ensembles.calibration import CalibrationWarning
from lightning_ensembles.calibration.laplace import fit_laplace
from lightning_ensembles.callbacks.posthoc_calibration import build_calibrator
from lightning_ensembles.data import DigitsDataModule, MNIST1DDataModule, ToyRegressionDataModule
from lightning_ensembles.ensembles.base import aggregate_gaussian, split_gaussian
from lightning_ensembles.ensembles.evidential import DirichletHead, NIGHead
from lightning_ensembles.losses.evidential import (
    annealing_coefficient,
    evidential_classification_loss,
    evidential_regression_loss,
    nig_uncertainty,
)
from lightning_ensembles.metrics import OODAUROC, ExpectedCalibrationError, NegativeLogLikelihood, entropy
from lightning_ensembles.metrics.ood_scores import OOD_SCORES, ood_score
from lightning_ensembles.metrics.regression import GaussianNLL, IntervalCoverage

torch.set_num_threads(1)
warnings.filterwarnings("ignore", category=CalibrationWarning)
warnings.filterwarnings("ignore", message=".*link_approx.*")

CALIBRATORS = ("temperature", "vector", "matrix", "dirichlet", "histogram", "isotonic")


# ------------------------------------------------------------------ data
def classification_data(name: str, seed: int):
    if name == "digits":
        dm = DigitsDataModule(ood_classes=(8, 9), seed=seed)
        dm.setup()
        flat = lambda t: t.flatten(1)  # noqa: E731
        return {k: (flat(v.tensors[0]), v.tensors[1]) for k, v in dm.splits.items()}, 64
    dm = MNIST1DDataModule(num_samples=4000, ood="waves", seed=seed)
    dm.setup()
    return {k: (v.tensors[0].flatten(1), v.tensors[1]) for k, v in dm.splits.items()}, 40


# ------------------------------------------------------------------ training
def train(ens: nn.Module, x, y, epochs: int, loss_fn, lr: float = 1e-3, seed: int = 0) -> float:
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(ens.parameters(), lr=lr)
    start = time.perf_counter()
    ens.train()
    for epoch in range(epochs):
        for idx in torch.randperm(len(y), generator=g).split(64):
            out = ens(x[idx])
            loss = loss_fn(out, y[idx].expand(out.shape[0], *y[idx].shape), epoch)
            opt.zero_grad()
            (loss * out.shape[0]).backward()  # the sum over members, as the modules do
            opt.step()
    ens.eval()
    return time.perf_counter() - start


def ce_loss(out, y, epoch):
    return F.cross_entropy(out.flatten(0, 1), y.flatten())


def evidential_loss(out, y, epoch):
    return evidential_classification_loss(out.exp(), y, annealing_coefficient(epoch, 10))


def timed(fn, *args):
    start = time.perf_counter()
    with torch.no_grad():
        out = fn(*args)
    return out, time.perf_counter() - start


# ------------------------------------------------------------------ scoring
def scores(probs: torch.Tensor, y: torch.Tensor, probs_ood: torch.Tensor) -> dict[str, float]:
    nll, ece, auroc = NegativeLogLikelihood(), ExpectedCalibrationError(n_bins=15), OODAUROC()
    nll.update(probs.float(), y)
    ece.update(probs.float(), y)
    s_in, s_out = entropy(probs.double()), entropy(probs_ood.double())
    auroc.update(torch.cat([s_in, s_out]), torch.cat([torch.zeros_like(s_in), torch.ones_like(s_out)]).long())
    return {"nll": float(nll.compute()), "ece": float(ece.compute()), "auroc": float(auroc.compute())}


def classification_run(name: str, seed: int, epochs: int, members: int):
    data, d_in = classification_data(name, seed)
    (xtr, ytr), (xva, yva), (xte, yte), (xood, _) = data["train"], data["val"], data["test"], data["ood"]
    hidden = [128, 128] if name == "digits" else [256, 256]
    classes = 10
    torch.manual_seed(seed)
    ens = DeepEnsemble(MLP(d_in, classes, hidden=hidden), num_members=members)
    train_s = train(ens, xtr, ytr, epochs, ce_loss, seed=seed)
    (z_te, base_t), z_va = timed(ens, xte), ens(xva).detach()
    z_ood = ens(xood).detach()
    rows: dict[str, dict[str, float]] = {}
    probs = lambda z: z.softmax(-1).mean(0)  # noqa: E731
    rows["plain ensemble"] = scores(probs(z_te), yte, probs(z_ood)) | {"fit_s": train_s, "predict_x": 1.0}
    for method in CALIBRATORS:
        for apply_to in ("ensemble", "members"):
            if method == "matrix" and apply_to == "ensemble":
                continue  # on probabilities, matrix scaling acts on log p: it is Dirichlet calibration
            kind = "probs" if apply_to == "ensemble" else "member_logits"
            # the ensemble's probabilities, or the members' own logits (Dirichlet takes their log-softmax itself)
            prep = (lambda z: probs(z).double()) if apply_to == "ensemble" else (lambda z: z.double())
            cal = build_calibrator(method, classes, kind)
            start = time.perf_counter()
            cal.fit(prep(z_va), yva)
            fit_s = time.perf_counter() - start
            out, t = timed(lambda z: cal(prep(z)).exp(), z_te)
            rows[f"{method} ({apply_to})"] = scores(out, yte, cal(prep(z_ood)).exp()) | {
                "fit_s": fit_s,
                "predict_x": (base_t + t) / base_t,
            }
    tr_loader = DataLoader(TensorDataset(xtr, ytr), batch_size=128)
    va_loader = DataLoader(TensorDataset(xva, yva), batch_size=128)
    start = time.perf_counter()
    la = fit_laplace(ens, tr_loader, va_loader, grid_size=21)
    fit_s = time.perf_counter() - start
    lp, t = timed(la, xte)
    rows["last-layer Laplace"] = scores(lp.exp().mean(0), yte, la(xood).exp().mean(0)) | {
        "fit_s": fit_s,
        "predict_x": t / base_t,
    }
    torch.manual_seed(seed)
    ev = DeepEnsemble(DirichletHead(MLP(d_in, classes, hidden=hidden)), num_members=members)
    ev_s = train(ev, xtr, ytr, epochs, evidential_loss, seed=seed)
    (ev_te, t) = timed(ev, xte)
    rows["evidential ensemble"] = scores(probs(ev_te), yte, probs(ev(xood).detach())) | {
        "fit_s": ev_s,
        "predict_x": t / base_t,
    }
    ood_rows = {}
    for s in OOD_SCORES:
        m = OODAUROC()
        a, b = ood_score(s, z_te), ood_score(s, z_ood)
        m.update(torch.cat([a, b]), torch.cat([torch.zeros_like(a), torch.ones_like(b)]).long())
        ood_rows[s] = float(m.compute())
    return rows, ood_rows


def regression_run(seed: int, epochs: int, members: int):
    dm = ToyRegressionDataModule(seed=seed)
    dm.setup()
    (xtr, ytr), (xte, yte) = dm.splits["train"].tensors, dm.splits["test"].tensors
    is_ood = ((xte.abs() < 2) | (xte.abs() > 5)).squeeze(1).long()
    rows = {}

    def report(mean, var, epistemic, fit_s, t):
        nll, cov, auroc = GaussianNLL(), IntervalCoverage(level=0.9), OODAUROC()
        keep = is_ood == 0  # NLL / coverage / RMSE where there is training data
        nll.update(mean[keep], var[keep], yte[keep])
        cov.update(mean[keep], var[keep], yte[keep])
        auroc.update(epistemic.sum(-1).double(), is_ood)
        rmse = float(((mean[keep] - yte[keep]) ** 2).mean().sqrt())
        return {
            "nll": float(nll.compute()),
            "rmse": rmse,
            "cov90": float(cov.compute()),
            "auroc": float(auroc.compute()),
            "fit_s": fit_s,
            "predict_s": t,
        }

    def gaussian_loss(out, y, epoch):
        m, v = split_gaussian(out)
        return F.gaussian_nll_loss(m, y, v, full=True)

    def nig_loss(out, y, epoch):
        return evidential_regression_loss(out, y, coeff=0.01)

    torch.manual_seed(seed)
    ens = DeepEnsemble(MLP(1, 2, hidden=[64, 64]), num_members=members)
    fit_s = train(ens, xtr, ytr, epochs, gaussian_loss, lr=3e-3, seed=seed)
    out, t = timed(ens, xte)
    mix = aggregate_gaussian(*split_gaussian(out))
    rows[f"gaussian ensemble M={members}"] = report(mix.mean, mix.variance, mix.epistemic, fit_s, t)
    for m in (1, members):
        torch.manual_seed(seed)
        ev = DeepEnsemble(NIGHead(MLP(1, 1, hidden=[64, 64])), num_members=m)
        fit_s = train(ev, xtr, ytr, epochs, nig_loss, lr=3e-3, seed=seed)
        out, t = timed(ev, xte)
        u = nig_uncertainty(out)
        spread = aggregate_gaussian(u["mean"])
        epistemic = u["epistemic"].mean(0) + spread.epistemic
        var = u["aleatoric"].mean(0) + epistemic
        rows[f"evidential M={m}"] = report(spread.mean, var, epistemic, fit_s, t)
    return rows


# ------------------------------------------------------------------ tables
def mean_std(values: list[float]) -> str:
    mu = sum(values) / len(values)
    sd = math.sqrt(sum((v - mu) ** 2 for v in values) / max(1, len(values) - 1))
    return f"{mu:.4f}" + (f"±{sd:.4f}" if len(values) > 1 else "")


def table(title: str, runs: list[dict[str, dict[str, float]]], cols: tuple[str, ...]) -> None:
    print(f"\n{title}")
    print("| method | " + " | ".join(cols) + " |")
    print("|---|" + "---|" * len(cols))
    for name in runs[0]:
        cells = []
        for c in cols:
            vals = [r[name][c] for r in runs]
            cells.append(
                mean_std(vals) if c not in ("fit_s", "predict_x", "predict_s") else f"{sum(vals) / len(vals):.3g}"
            )
        print(f"| {name} | " + " | ".join(cells) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="digits and toy regression, 1 seed, short training")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--members", type=int, default=4)
    args = parser.parse_args()
    seeds = [0] if args.quick else list(range(args.seeds))
    datasets = ("digits",) if args.quick else ("digits", "mnist1d")
    epochs = {"digits": 10 if args.quick else 40, "mnist1d": 30, "toy": 100 if args.quick else 300}
    for name in datasets:
        runs, ood = [], defaultdict(list)
        for seed in seeds:
            rows, ood_rows = classification_run(name, seed, epochs[name], args.members)
            runs.append(rows)
            for k, v in ood_rows.items():
                ood[k].append(v)
        table(
            f"{name}: deep ensemble M={args.members}, {len(seeds)} seed(s), {epochs[name]} epochs "
            "(NLL, ECE on the test split; OOD AUROC of predictive entropy; fit seconds; predict time vs plain)",
            runs,
            ("nll", "ece", "auroc", "fit_s", "predict_x"),
        )
        print(f"\n{name}: OOD AUROC of each score of the plain ensemble")
        print("| score | " + " | ".join(OOD_SCORES) + " |")
        print("|---|" + "---|" * len(OOD_SCORES))
        print("| AUROC | " + " | ".join(mean_std(ood[s]) for s in OOD_SCORES) + " |")
    runs = [regression_run(seed, epochs["toy"], args.members) for seed in seeds]
    table(
        f"toy regression, {len(seeds)} seed(s), {epochs['toy']} epochs (NLL/RMSE/coverage where there is data; "
        "OOD AUROC of epistemic variance, gap and beyond as OOD)",
        runs,
        ("nll", "rmse", "cov90", "auroc", "fit_s", "predict_s"),
    )


if __name__ == "__main__":
    main()
