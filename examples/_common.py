"""Shared bits of the examples: a --smoke flag (tiny run for the test suite) and a quiet Trainer."""

from __future__ import annotations

import argparse
from pathlib import Path

import lightning as L


def parse_args(description: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--smoke", action="store_true", help="a few steps only (used by the test suite)")
    parser.add_argument("--out", type=Path, default=Path("outputs") / "examples", help="where files are written")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    return args


def trainer(args: argparse.Namespace, epochs: int, **kwargs) -> L.Trainer:
    smoke = dict(max_epochs=1, limit_train_batches=3, limit_val_batches=2, limit_test_batches=2) if args.smoke else {}
    options = dict(
        max_epochs=epochs,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=str(args.out),
    )
    options.update(kwargs)
    options.update(smoke)
    return L.Trainer(**options)


def save_figure(fig, path: Path, **savefig_kwargs) -> Path:
    """Write a matplotlib figure to ``path`` (100 dpi) and say where."""
    fig.savefig(path, dpi=100, **savefig_kwargs)
    print(f"wrote {path}")
    return path
