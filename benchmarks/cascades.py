"""Cost/quality frontier of cheaper-than-the-ensemble inference: cascades, distilled students, bridges.

For MNIST-1D (1-D CNN) and scikit-learn digits (MLP), per seed: single models of growing width, a deep
ensemble of M=4 base-width members, early-exit cascades over it (window rule at the selective
threshold for 5% risk, and the confidence-threshold baseline; widths fitted on validation data), a
Hinton-distilled and a Hydra (multi-head) student, and base + bridge networks. Every model is trained
with Adam (lr 3e-3, batch 64) and keeps the epoch of best validation NLL. Students distil on mixup
inputs (teacher and student see the same mixes); the Hinton student trains 2x the members' epochs, the
Hydra student starts from it (its head copied M times) and trains 1x more. MACs per sample are counted with
``torch.utils.flop_counter.FlopCounterMode`` over the real (early-exiting) forward passes.

OOD set: standard Gaussian noise in the normalised input space (the data's mean and scale); the OOD
score is ``1 - max prob``.

    python benchmarks/cascades.py            # 3 seeds, both data sets; writes docs/img/inference_frontier.png
    python benchmarks/cascades.py --quick    # 1 seed, fewer epochs

Prints one markdown table per data set (mean +- std over seeds) and the acceptance checks.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from lightning_ensembles.backbones import MLP
from lightning_ensembles.data import DigitsDataModule, MNIST1DDataModule
from lightning_ensembles.inference import (
    BridgeEnsemble,
    EnsembleCascade,
    MultiHeadStudent,
    count_macs,
    distillation_loss,
    evaluate_cascade,
    fit_bezier_curve,
    fit_bridge,
    mixup_inputs,
    prediction_metrics,
)
from lightning_ensembles.inference.bridge import default_bridge

M = 4
RISK = 0.05
WIDTHS = (0.0, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, float("inf"))


class CNN1D(nn.Module):
    """Three conv blocks (width w, 2w, 2w; kernel 5, 5, 3; max-pool 2) and a linear classifier."""

    def __init__(self, width: int = 32, num_classes: int = 10, length: int = 40) -> None:
        super().__init__()
        w = width
        self.body = nn.Sequential(
            nn.Conv1d(1, w, 5, padding=2),
            nn.ReLU(),
            nn.MaxPool1d(2),
            nn.Conv1d(w, 2 * w, 5, padding=2),
            nn.ReLU(),
            nn.MaxPool1d(2),
            nn.Conv1d(2 * w, 2 * w, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool1d(2),
            nn.Flatten(),
        )
        self.head = nn.Linear(2 * w * (length // 8), num_classes)

    def forward(self, x):
        return self.head(self.body(x))


SETUPS = {
    # name: (model factory by width, member width, single-model widths, bridge feature layer, bridge hidden,
    #        epochs of a full run, epochs with --quick)
    "mnist1d": (lambda w: CNN1D(w), 32, (8, 16, 32, 64), "body.5", 64, 15, 6),
    "digits": (lambda w: MLP(64, 10, hidden=(w, w)), 64, (16, 32, 64, 128, 256), "net.2", 16, 40, 15),
}
LR = 3e-3
MIXUP = 1.0  # distillation transfer set: Beta(1, 1) mixes of training inputs (teacher and student see the same)
HINTON_EPOCHS = 2  # the Hinton student trains 2x the members' epochs; Hydra's second phase 1x more


def _data(name: str, seed: int):
    dm = DigitsDataModule(seed=seed) if name == "digits" else MNIST1DDataModule(seed=seed)
    parts = dm.build()
    (xtr, ytr), (xva, yva), (xte, yte) = parts["train"], parts["val"], parts["test"]
    mean, std = xtr.mean(), xtr.std()
    xtr, xva, xte = ((t - mean) / std for t in (xtr, xva, xte))
    # OOD: standard Gaussian noise in the normalised input space (same mean and scale as the data).
    ood = torch.randn(xte.shape, generator=torch.Generator().manual_seed(1234 + seed))
    return xtr, ytr, xva, yva, xte, yte, ood


def _nll(probs, y) -> float:
    return float(F.nll_loss(probs.clamp_min(1e-12).log(), y))


def _train(model: nn.Module, loss_fn, xtr, ytr, xva, yva, epochs: int, lr: float = LR, seed: int = 0) -> nn.Module:
    """Adam, batch 64; keeps the epoch with the best validation NLL of the model's (mean) prediction."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    best, best_state = float("inf"), copy.deepcopy(model.state_dict())
    for _ in range(epochs):
        model.train()
        for idx in torch.randperm(len(ytr), generator=g).split(64):
            if getattr(loss_fn, "takes_model", False):
                loss = loss_fn(model, xtr[idx], ytr[idx])
            else:
                loss = loss_fn(model(xtr[idx]), xtr[idx], ytr[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        model.eval()
        with torch.no_grad():
            out = model(xva)
            probs = out.softmax(-1).mean(0) if out.dim() == 3 else out.softmax(-1)
        nll = _nll(probs, yva)
        if nll < best:
            best, best_state = nll, copy.deepcopy(model.state_dict())
    model.load_state_dict(best_state)
    return model.eval()


def _ce(out, x, y):
    return F.cross_entropy(out, y)


def _model_metrics(model: nn.Module, xte, yte, ood) -> dict[str, float]:
    """Metrics of any model returning (B, C) or (H, B, C) logits, with its counted MACs per sample."""
    with torch.no_grad():
        out, oo = model(xte), model(ood)
    probs = out.softmax(-1).mean(0) if out.dim() == 3 else out.softmax(-1)
    oprobs = oo.softmax(-1).mean(0) if oo.dim() == 3 else oo.softmax(-1)
    res = prediction_metrics(probs, yte, ood_score=1 - oprobs.max(-1).values, risk=RISK)
    res["macs_per_sample"] = count_macs(model, xte) / len(xte)
    return res


def run_seed(name: str, seed: int, epochs: int) -> dict[str, dict]:
    make, width, widths, feature_layer, bridge_hidden = SETUPS[name][:5]
    xtr, ytr, xva, yva, xte, yte, ood = _data(name, seed)
    rows: dict[str, dict] = {}
    t0 = time.time()

    # Members of the deep ensemble (each its own seed) and single models of growing width.
    members = []
    for i in range(M):
        torch.manual_seed(1000 * seed + i)
        members.append(_train(make(width), _ce, xtr, ytr, xva, yva, epochs, seed=1000 * seed + i))
    for w in widths:
        if w == width:
            model = members[0]
        else:
            torch.manual_seed(1000 * seed + 100 + w)
            model = _train(make(w), _ce, xtr, ytr, xva, yva, epochs, seed=1000 * seed + 100 + w)
        rows[f"single w={w}"] = _model_metrics(model, xte, yte, ood)
    member_rows = [_model_metrics(m, xte, yte, ood) for m in members]
    rows["member mean"] = {k: statistics.mean(r[k] for r in member_rows) for k in member_rows[0]}

    # The full ensemble is the cascade with an infinite window (every member on every sample).
    full = EnsembleCascade(members, width=float("inf")).fit(xva, yva)
    rows[f"deep ensemble M={M}"] = evaluate_cascade(full, xte, yte, ood, risk=RISK)

    # Cascades: widths fitted on validation data (cheapest that keeps the ensemble's accuracy within 0.5
    # points and coverage at 5% risk within 1 point there); plus a sweep of widths for the frontier plot.
    sweeps: dict[str, list[dict]] = {}
    for rule in ("window", "confidence"):
        cascade = EnsembleCascade(members, exit_rule=rule, decision="selective", target_risk=RISK)
        fit = cascade.fit_width(xva, yva, widths=WIDTHS, accuracy_tolerance=0.005, coverage_tolerance=0.01)
        res = evaluate_cascade(cascade, xte, yte, ood, risk=RISK)
        res["width"] = fit["width"]
        rows[f"cascade ({rule})"] = res
        sweeps[rule] = []
        for w in WIDTHS[1:-1]:
            cascade.fit(xva, yva, width=w)
            sweeps[rule].append(evaluate_cascade(cascade, xte, yte, ood, risk=RISK))

    # Distilled students, same architecture as a member. Hinton: one head on the ensemble mean. Hydra
    # (Tran et al.'s two phases): the Hinton student's head copied M times, then head i follows member i.
    def distil(mode):
        def loss_fn(student, x, y):
            xs = mixup_inputs(x, MIXUP)
            with torch.no_grad():
                teacher = torch.stack([m(xs) for m in members])
            return distillation_loss(student(xs), teacher, mode=mode, temperature=1.0, alpha=1.0)

        loss_fn.takes_model = True
        return loss_fn

    torch.manual_seed(1000 * seed + 500)
    hinton = _train(
        MultiHeadStudent(make(width), num_heads=1),
        distil("hinton"),
        xtr,
        ytr,
        xva,
        yva,
        HINTON_EPOCHS * epochs,
        seed=1000 * seed + 500,
    )
    rows["distilled (hinton)"] = _model_metrics(hinton, xte, yte, ood)
    hydra = _train(hinton.expand_heads(M), distil("hydra"), xtr, ytr, xva, yva, epochs, seed=1000 * seed + 501)
    rows[f"distilled (hydra, {M} heads)"] = _model_metrics(hydra, xte, yte, ood)

    # Bridges: a Bezier curve from member 0 to member 1; bridges on member 0's features predict the curve
    # models at t = 0.5 and t = 0.75.
    steps = epochs * (len(ytr) // 64)
    curve = fit_bezier_curve(members[0], members[1], xtr, ytr, steps=steps, lr=1e-2, batch_size=64, seed=seed)
    bridges = []
    for t in (0.5, 0.75):
        target = curve.model_at(t, xtr)
        bridge = default_bridge(_features(members[0], feature_layer, xtr[:2]), 10, hidden=bridge_hidden)
        bridges.append(
            fit_bridge(members[0], feature_layer, target, xtr, bridge, steps=steps, lr=LR, batch_size=64, seed=seed)
        )
        if t == 0.5:
            rows["curve midpoint (full model)"] = _model_metrics(target, xte, yte, ood)
    rows["base member"] = _model_metrics(members[0], xte, yte, ood)
    rows["base + 1 bridge"] = _model_metrics(BridgeEnsemble(members[0], feature_layer, bridges[:1]), xte, yte, ood)
    rows["base + 2 bridges"] = _model_metrics(BridgeEnsemble(members[0], feature_layer, bridges), xte, yte, ood)
    print(f"  {name} seed {seed}: {time.time() - t0:.0f}s", flush=True)
    return {"rows": rows, "sweeps": sweeps}


def _features(model, layer, x):
    from lightning_ensembles.inference.bridge import _run_with_features

    with torch.no_grad():
        return _run_with_features(model, layer, x)[1]


def _mean_std(values):
    mean = statistics.mean(values)
    return mean, (statistics.stdev(values) if len(values) > 1 else 0.0)


COLS = (
    ("acc", 100, "acc %"),
    ("nll", 1, "NLL"),
    ("ece", 100, "ECE %"),
    ("coverage_at_risk", 100, "cov@5% %"),
    ("ood_auroc", 100, "OOD AUROC %"),
    ("ood_fpr95", 100, "FPR95 %"),
    ("macs_per_sample", 1e-3, "kMACs/sample"),
)


def report(name: str, results: list[dict]) -> tuple[str, list[str]]:
    ens_key = f"deep ensemble M={M}"
    names = list(results[0]["rows"])
    lines = [
        f"### {name}",
        "",
        "| model | " + " | ".join(c[2] for c in COLS) + " | MACs vs ensemble |",
        "|---|" + "---|" * (len(COLS) + 1),
    ]
    for n in names:
        cells = []
        for key, scale, _ in COLS:
            mean, std = _mean_std([r["rows"][n][key] * scale for r in results])
            cells.append(
                f"{mean:.3f} +- {std:.3f}"
                if key == "nll"
                else f"{mean:.1f} +- {std:.1f}"
                if scale != 1e-3
                else f"{mean:.1f}"
            )
        rel = statistics.mean(r["rows"][n]["macs_per_sample"] / r["rows"][ens_key]["macs_per_sample"] for r in results)
        lines.append(f"| {n} | " + " | ".join(cells) + f" | {rel:.2f}x |")
    checks = []
    for rule in ("window", "confidence"):
        per_seed = []
        for r in results:
            c, e = r["rows"][f"cascade ({rule})"], r["rows"][ens_key]
            d_cov, d_acc = 100 * (e["coverage_at_risk"] - c["coverage_at_risk"]), 100 * (e["acc"] - c["acc"])
            ratio = c["macs_per_sample"] / e["macs_per_sample"]
            per_seed.append((d_cov <= 1.0 and d_acc <= 0.5 and ratio <= 0.5, d_cov, d_acc, ratio, c["width"]))
        ok = all(p[0] for p in per_seed)
        detail = "; ".join(f"cov -{p[1]:.2f} pt, acc -{p[2]:.2f} pt, {p[3]:.2f}x MACs, width {p[4]}" for p in per_seed)
        checks.append(
            f"{name} cascade ({rule}) matches the ensemble (cov within 1 pt, acc within 0.5 pt, <= 50% MACs) "
            f"on every seed: {'PASS' if ok else 'FAIL'} [{detail}]"
        )
    for student in ("distilled (hinton)", f"distilled (hydra, {M} heads)"):
        fracs = []
        for r in results:
            single, ens, s = (r["rows"][k]["nll"] for k in ("member mean", ens_key, student))
            fracs.append((single - s) / (single - ens) if single > ens else float("nan"))
        mean = statistics.mean(fracs)
        checks.append(
            f"{name} {student} recovers {100 * mean:.0f}% of the ensemble's NLL gain over a single member "
            f"(per seed {', '.join(f'{100 * f:.0f}%' for f in fracs)}): "
            f"{'PASS' if mean >= 0.5 else 'FAIL'} (target >= 50%)"
        )
    return "\n".join(lines), checks


def plot(all_results: dict[str, list[dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = (
        ("nll", "test NLL", 1),
        ("coverage_at_risk", "coverage at 5% risk (%)", 100),
        ("ood_auroc", "OOD AUROC (%)", 100),
    )
    fig, axes = plt.subplots(len(all_results), 3, figsize=(15, 4.2 * len(all_results)), squeeze=False)
    for row, (name, results) in enumerate(all_results.items()):
        rows = results[0]["rows"]

        def avg(n, key):
            return statistics.mean(r["rows"][n][key] for r in results)

        for col, (key, label, scale) in enumerate(metrics):
            ax = axes[row][col]
            singles = [n for n in rows if n.startswith("single")]
            ax.plot(
                [avg(n, "macs_per_sample") for n in singles],
                [scale * avg(n, key) for n in singles],
                "o-",
                color="gray",
                label="single models (growing width)",
            )
            for rule, color in (("window", "tab:blue"), ("confidence", "tab:orange")):
                xs = [
                    statistics.mean(r["sweeps"][rule][i]["macs_per_sample"] for r in results)
                    for i in range(len(WIDTHS) - 2)
                ]
                ys = [
                    scale * statistics.mean(r["sweeps"][rule][i][key] for r in results) for i in range(len(WIDTHS) - 2)
                ]
                ax.plot(xs, ys, ".--", color=color, alpha=0.6, label=f"cascade ({rule}), width sweep")
                n = f"cascade ({rule})"
                ax.plot(
                    avg(n, "macs_per_sample"), scale * avg(n, key), "*", ms=14, color=color, label=f"{n}, fitted width"
                )
            for n, marker, color in (
                (f"deep ensemble M={M}", "s", "black"),
                ("distilled (hinton)", "^", "tab:green"),
                (f"distilled (hydra, {M} heads)", "v", "tab:red"),
                ("base + 1 bridge", "D", "tab:purple"),
                ("base + 2 bridges", "P", "tab:purple"),
            ):
                ax.plot(avg(n, "macs_per_sample"), scale * avg(n, key), marker, ms=9, color=color, label=n)
            ax.set_xscale("log")
            ax.set_xlabel("MACs per sample (counted)")
            ax.set_ylabel(label)
            ax.set_title(f"{name}: {label}")
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7, loc="best")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 seed, fewer epochs")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=None, help="default: 15 (MNIST-1D) / 40 (digits); --quick 6 / 15")
    parser.add_argument("--data", nargs="+", default=["mnist1d", "digits"], choices=list(SETUPS))
    parser.add_argument(
        "--plot", default=str(Path(__file__).resolve().parents[1] / "docs" / "img" / "inference_frontier.png")
    )
    args = parser.parse_args()
    seeds = 1 if args.quick else args.seeds
    torch.set_num_threads(1)
    start = time.time()
    all_results, all_checks = {}, []
    for name in args.data:
        epochs = args.epochs or SETUPS[name][6 if args.quick else 5]
        print(f"{name}: M={M}, Adam {LR}, batch 64, {epochs} epochs (best validation NLL), {seeds} seed(s)", flush=True)
        all_results[name] = [run_seed(name, s, epochs) for s in range(seeds)]
        table, checks = report(name, all_results[name])
        print("\n" + table + "\n", flush=True)
        all_checks += checks
    print("Checks:")
    for c in all_checks:
        print("- " + c)
    if args.plot:
        plot(all_results, Path(args.plot))
        print(f"\nplot written to {args.plot}")
    print(f"total time {time.time() - start:.0f}s")


if __name__ == "__main__":
    main()
