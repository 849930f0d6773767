"""The main job: a single model and an ensemble of it, trained from one config and compared in one table.

    lightning-ensembles showcase --config examples/configs/mnist1d_showcase.yaml

The config is an ordinary ``fit`` config of the ensemble (an :class:`~lightning_ensembles.EnsembleClassifier`
and a datamodule whose test dataloaders include an OOD set and, optionally, a shifted set, such as
:class:`~lightning_ensembles.data.MNIST1DDataModule` with ``ood`` and ``shift_test``). The showcase fits
it twice, with Lightning's own loop: once as a single model (``method: deep``, ``num_members: 1``, no
``ensemble_kwargs``: the plain backbone) and once as configured; each run keeps the checkpoint its
``ModelCheckpoint`` picks and is tested on it. It prints a table (accuracy, NLL, ECE, OOD AUROC of
the predictive entropy, accuracy and ECE under shift, parameters, training time), writes it to
``<default_root_dir>/showcase.json`` and draws the reliability diagrams of both models on the test
split into ``<default_root_dir>/reliability.png``. Further arguments go to both ``fit`` runs
(``--trainer.max_epochs 2``); ``--threads`` sets torch's intra-op threads (default 1).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import Any

import torch

from .metrics import ExpectedCalibrationError

__all__ = ["run_showcase", "format_comparison", "plot_reliability_pair", "main"]

#: Columns of the comparison table: (key in the results, header, digits).
COLUMNS = (
    ("acc", "accuracy", 4),
    ("nll", "NLL", 4),
    ("ece", "ECE", 4),
    ("ood_auroc", "OOD AUROC", 4),
    ("shift_acc", "shift acc", 4),
    ("shift_ece", "shift ECE", 4),
    ("params", "params", 0),
    ("train_s", "train s", 1),
)


def format_comparison(results: dict[str, dict[str, float]]) -> str:
    """A plain-text table with one row per model (``results[name][column]``), columns as in :data:`COLUMNS`.

    Example:
        >>> row = {"acc": .9, "nll": .3, "ece": .02, "ood_auroc": .8, "shift_acc": .7, "shift_ece": .1,
        ...        "params": 8202, "train_s": 12.5}
        >>> print(format_comparison({"single model": row}).splitlines()[1])
        single model          0.9000    0.3000    0.0200    0.8000    0.7000    0.1000      8202      12.5
    """
    head = f"{'model':<18}" + "".join(f"{h:>10}" for _, h, _ in COLUMNS)
    lines = [head]
    for name, r in results.items():
        cells = "".join(
            f"{r.get(k, float('nan')):>10.{d}f}" if d else f"{int(r.get(k, 0)):>10d}" for k, _, d in COLUMNS
        )
        lines.append(f"{name:<18}" + cells)
    return "\n".join(lines)


def plot_reliability_pair(panels: dict[str, ExpectedCalibrationError], path: str, title: str = "") -> str:
    """Reliability diagrams side by side (one per filled :class:`ExpectedCalibrationError`), saved as PNG at ``path``."""
    import numpy as np

    from ._optional import require

    Figure = require("matplotlib.figure", "plots", "plot_reliability_pair").Figure
    fig = Figure(figsize=(4.0 * len(panels), 4.2), dpi=100)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (name, ece) in zip(axes, panels.items()):
        count, conf, acc = (t.double().cpu().numpy() for t in ece.bins())
        # Confidences of exactly 1 (the extra last bin) are drawn with the top bin.
        top = count[-2] + count[-1]
        if top > 0:
            conf[-2] = (conf[-2] * count[-2] + conf[-1] * count[-1]) / top
            acc[-2] = (acc[-2] * count[-2] + acc[-1] * count[-1]) / top
        count, conf, acc = count[:-1].copy(), conf[:-1], acc[:-1]
        count[-1] = top
        n = len(count)
        centers = (np.arange(n) + 0.5) / n
        seen = count > 0
        ax.bar(centers[seen], acc[seen], width=1 / n, edgecolor="black", color="tab:blue", label="accuracy")
        over = conf > acc  # overconfident bins in red, underconfident in green
        for mask, color, label in (
            (seen & over, "tab:red", "overconfident gap"),
            (seen & ~over, "tab:green", "underconfident gap"),
        ):
            if mask.any():
                ax.bar(
                    centers[mask],
                    np.abs(conf - acc)[mask],
                    bottom=np.minimum(acc, conf)[mask],
                    width=1 / n,
                    color=color,
                    alpha=0.45,
                    hatch="//",
                    label=label,
                )
        ax.plot([0, 1], [0, 1], "--", color="gray")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_xlabel("confidence")
        ax.set_title(f"{name}: ECE {100 * float(ece.compute()):.2f}%", fontsize=10)
    axes[0].set_ylabel("accuracy")
    axes[0].legend(loc="upper left", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path)
    return path


def _test_names(datamodule: Any) -> tuple[str, ...]:
    return tuple(getattr(datamodule, "test_sets", ("test",)))


@torch.no_grad()
def _test_calibration(model: Any, datamodule: Any) -> ExpectedCalibrationError:
    loaders = datamodule.test_dataloader()
    loader = loaders[0] if isinstance(loaders, (list, tuple)) else loaders
    ece = ExpectedCalibrationError(n_bins=15)
    model.eval()
    for x, y in loader:
        ece.update(model(x.to(model.device)).softmax(-1).mean(0).cpu(), y)
    return ece


def _fit_and_test(
    config: str, overrides: list[str], root: str
) -> tuple[dict[str, float], ExpectedCalibrationError, str]:
    from .cli import run_cli

    args = ["fit", "--config", config, *overrides, "--trainer.default_root_dir", root, "--test_after_fit", "false"]
    t0 = time.perf_counter()
    cli = run_cli(args)
    train_s = time.perf_counter() - t0
    trainer, model, dm = cli.trainer, cli.model, cli.datamodule
    ckpt = "best" if getattr(trainer.checkpoint_callback, "best_model_path", "") else None
    trainer.test(model, datamodule=dm, ckpt_path=ckpt, verbose=False)
    res = model.last_test_results
    names = _test_names(dm)
    out = {k: res[0][k] for k in ("acc", "nll", "brier", "ece")}
    out["ood_auroc"] = res[0].get("ood_auroc_entropy", float("nan"))
    if "shift" in names:
        shift = res[names.index("shift")]
        out["shift_acc"], out["shift_ece"], out["shift_nll"] = shift["acc"], shift["ece"], shift["nll"]
    out["params"] = float(sum(p.numel() for p in model.ensemble.parameters()))
    out["train_s"] = train_s
    label = f"{model.hparams.method} ensemble ({model.ensemble.num_members})"
    return out, _test_calibration(model, dm), label


def _root_dir(config: str, rest: list[str]) -> str:
    import yaml

    if "--trainer.default_root_dir" in rest:
        return rest[rest.index("--trainer.default_root_dir") + 1]
    with open(config) as f:
        cfg = yaml.safe_load(f) or {}
    return (cfg.get("trainer") or {}).get("default_root_dir") or os.path.join("outputs", "showcase")


def run_showcase(args: list[str] | None = None) -> dict[str, dict[str, float]]:
    """Fit and test the single model and the ensemble of ``--config``; print and return the comparison.

    Returns ``{"single model": {...}, "<method> ensemble (M)": {...}}`` with the :data:`COLUMNS` keys
    (plus ``brier``, ``shift_nll``).
    """
    parser = argparse.ArgumentParser(
        prog="lightning-ensembles showcase", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", required=True, help="a fit config of an EnsembleClassifier (YAML)")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads (default 1: these small models run several times slower with "
        "2 threads on 2 cores, measured 248 s vs 53 s of CPU for the MNIST-1D showcase)",
    )
    known, rest = parser.parse_known_args(args)
    rest = list(rest)
    threads = torch.get_num_threads()
    torch.set_num_threads(known.threads)
    try:
        return _run(known.config, rest)
    finally:
        torch.set_num_threads(threads)  # the caller's setting (tests run in one process)


def _run(config: str, rest: list[str]) -> dict[str, dict[str, float]]:
    root = _root_dir(config, rest)
    rest = [
        a
        for i, a in enumerate(rest)
        if a != "--trainer.default_root_dir" and (i == 0 or rest[i - 1] != "--trainer.default_root_dir")
    ]
    wall0, cpu0 = time.perf_counter(), time.process_time()
    single_args = [
        "--model.init_args.method",
        "deep",
        "--model.init_args.num_members",
        "1",
        "--model.init_args.ensemble_kwargs",
        "null",
    ]
    results, panels = {}, {}
    for run, extra in (("single", single_args), ("ensemble", [])):
        print(f"\n== {run} ==", flush=True)
        res, ece, label = _fit_and_test(config, [*extra, *rest], os.path.join(root, run))
        name = "single model" if run == "single" else label
        results[name], panels[name] = res, ece
    png = plot_reliability_pair(panels, os.path.join(root, "reliability.png"), "test split")
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    with open(os.path.join(root, "showcase.json"), "w") as f:
        json.dump({"results": results, "wall_s": wall, "cpu_s": cpu}, f, indent=2)
    print("\n" + format_comparison(results))
    print(
        f"\nreliability diagrams: {png}; table: {os.path.join(root, 'showcase.json')}; "
        f"total {wall:.0f} s wall, {cpu:.0f} s CPU",
        flush=True,
    )
    return results


def main(args: list[str] | None = None) -> None:
    """``lightning-ensembles showcase --config <yaml> [fit overrides]``."""
    run_showcase(args)
