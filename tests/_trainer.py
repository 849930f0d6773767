"""The tests' quiet CPU Trainer, shared by the test files (through conftest) and their subprocess scripts."""

from __future__ import annotations

from typing import Any

import lightning as L

#: What the tests' trainers leave off unless a test asks for it.
OFF = ("logger", "enable_progress_bar", "enable_model_summary", "enable_checkpointing")
#: One CPU device; no logger, progress bar, model summary or checkpoints.
QUIET = {"accelerator": "cpu", "devices": 1, **dict.fromkeys(OFF, False)}


def quiet_trainer(**overrides: Any) -> L.Trainer:
    """``L.Trainer(**QUIET)`` with ``overrides`` on top."""
    return L.Trainer(**{**QUIET, **overrides})


def cli_fit_args(config: object, root: object, *extra: str, test_batches: int | None = 1) -> list[str]:
    """``lightning-ensembles fit`` arguments for a one-epoch smoke run of ``config`` under ``root``."""
    args = ["fit", "--config", str(config), "--trainer.max_epochs=1"]
    args += ["--trainer.limit_train_batches=2", "--trainer.limit_val_batches=1"]
    if test_batches is not None:
        args.append(f"--trainer.limit_test_batches={test_batches}")
    return [*args, f"--trainer.default_root_dir={root}", *extra]
