"""The tests' quiet CPU Trainer, shared by the test files (through conftest) and their subprocess scripts."""

from __future__ import annotations

from typing import Any

import lightning as L

#: No logger, progress bar, model summary or checkpoints unless a test asks for them.
QUIET = dict(
    accelerator="cpu",
    devices=1,
    logger=False,
    enable_progress_bar=False,
    enable_model_summary=False,
    enable_checkpointing=False,
)


def quiet_trainer(**overrides: Any) -> L.Trainer:
    """``L.Trainer(**QUIET)`` with ``overrides`` on top."""
    return L.Trainer(**{**QUIET, **overrides})
