"""SnapshotEnsemble: one training run, a cyclic cosine learning rate, one ensemble member per cycle."""

from __future__ import annotations

import math
import warnings
from typing import Any

import lightning as L
from torch import Tensor, nn

from ..averaging.snapshot import cyclic_cosine_lr, snapshot_ensemble
from ..ensembles.deep import DeepEnsemble
from ._base import Stage, SubmoduleSwap, resolve_attribute

__all__ = ["SnapshotEnsemble"]


class SnapshotEnsemble(SubmoduleSwap):
    """Snapshot Ensembles (Huang et al., 2017) for any LightningModule.

    The learning rate of every optimiser follows a cosine from its initial value (``lr_max`` if
    given) down to ``lr_min`` in each of ``num_cycles`` equal cycles of the run's optimiser steps,
    replacing the module's schedulers. At the end of each cycle the weights of the model at
    ``attribute`` (the whole module if ``None``) are stored as a snapshot. :meth:`ensemble` builds
    a :class:`~lightning_ensembles.DeepEnsemble` of the snapshots; snapshots of a DeepEnsemble of
    M members give ``num_cycles * M`` members.

    When ``attribute`` names a :class:`~lightning_ensembles.DeepEnsemble` (e.g. the ``ensemble``
    of ``EnsembleClassifier(num_members=1)``) test and predict run on the snapshot ensemble
    (``evaluate=True``); a plain model keeps its output shape, so its snapshots are only available
    through :meth:`ensemble`. Snapshots and the schedule are in the checkpoint; the learning rate is
    a function of the global step, so a resumed run continues exactly.

    Args:
        num_cycles: the number of learning-rate cycles, one snapshot each.
        attribute: dotted path of the model to snapshot (e.g. ``"ensemble"``); ``None``: the whole module.
        lr_max: the learning rate at the start of every cycle; ``None``: each optimiser's own.
        lr_min: the learning rate at the end of every cycle.
        evaluate: test and predict on the snapshot ensemble (when ``attribute`` names a DeepEnsemble).

    Example:
        >>> import lightning as L
        >>> from lightning_ensembles import MLP, EnsembleClassifier
        >>> from lightning_ensembles.data import DigitsDataModule
        >>> model = EnsembleClassifier(backbone=MLP(64, 10), num_members=1, optimizer="sgd", lr=0.05)
        >>> snap = SnapshotEnsemble(num_cycles=2, attribute="ensemble")
        >>> trainer = L.Trainer(max_epochs=2, callbacks=[snap], logger=False, enable_progress_bar=False,
        ...                     enable_checkpointing=False, enable_model_summary=False)
        >>> trainer.fit(model, DigitsDataModule())
        >>> snap.ensemble().num_members
        2
    """

    def __init__(
        self,
        num_cycles: int = 5,
        attribute: str | None = None,
        lr_max: float | None = None,
        lr_min: float = 0.0,
        evaluate: bool = True,
    ) -> None:
        if not isinstance(num_cycles, int) or num_cycles < 1:
            raise ValueError(f"`num_cycles` must be an integer >= 1, got {num_cycles!r}.")
        if lr_max is not None and lr_max <= 0:
            raise ValueError(f"`lr_max` must be > 0 (or None for the optimiser's lr), got {lr_max}.")
        if lr_min < 0 or (lr_max is not None and lr_min >= lr_max):
            raise ValueError(f"`lr_min` must be >= 0 and below `lr_max`, got {lr_min}.")
        self.num_cycles, self.attribute, self.evaluate = num_cycles, attribute, evaluate
        self.lr_max, self.lr_min = lr_max, lr_min
        self.snapshots: list[dict[str, Tensor]] = []
        self.steps_per_cycle: int | None = None
        self._base_lrs: list[list[float]] | None = None
        self._ensemble: DeepEnsemble | None = None
        self._template: nn.Module | None = None
        self._total_steps: int | None = None

    @property
    def state_key(self) -> str:
        return self._generate_state_key(attribute=self.attribute, num_cycles=self.num_cycles)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        resolve_attribute(pl_module, self.attribute)  # fail early on a bad attribute
        total = trainer.estimated_stepping_batches
        if not math.isfinite(total) or total < self.num_cycles:
            raise ValueError(
                f"SnapshotEnsemble needs a known number of optimiser steps >= num_cycles={self.num_cycles}; got {total}. "
                "Set Trainer(max_epochs=...) or max_steps."
            )
        if self.steps_per_cycle is None:
            self.steps_per_cycle = math.ceil(total / self.num_cycles)
            self._total_steps = int(total)
        if self._base_lrs is None:
            self._base_lrs = [[self.lr_max or g["lr"] for g in opt.param_groups] for opt in trainer.optimizers]
        if trainer.strategy.lr_scheduler_configs:
            warnings.warn(
                "SnapshotEnsemble replaces the module's learning-rate schedulers with its cyclic cosine.", stacklevel=2
            )
        trainer.strategy.lr_scheduler_configs = []

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        assert self._base_lrs is not None and self.steps_per_cycle is not None
        step = trainer.global_step
        for opt, bases in zip(trainer.optimizers, self._base_lrs):
            for g, base in zip(opt.param_groups, bases):
                g["lr"] = cyclic_cosine_lr(step, self.steps_per_cycle, base, self.lr_min)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        assert self.steps_per_cycle is not None
        step = trainer.global_step
        # A cycle ends every `steps_per_cycle` steps; the last one may be shorter and ends with the run.
        ended = step % self.steps_per_cycle == 0 or step == self._total_steps
        if step > 0 and ended and len(self.snapshots) < min(self.num_cycles, math.ceil(step / self.steps_per_cycle)):
            target = resolve_attribute(pl_module, self.attribute)
            self.snapshots.append({k: v.detach().clone() for k, v in target.state_dict().items()})
            self._ensemble = None

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if len(self.snapshots) < self.num_cycles:  # the run stopped early: keep its last weights too
            warnings.warn(
                f"SnapshotEnsemble: training ended after {len(self.snapshots)} of {self.num_cycles} cycles.",
                stacklevel=2,
            )

    def ensemble(self, pl_module: L.LightningModule | None = None) -> DeepEnsemble:
        """The snapshot ensemble (built once per set of snapshots)."""
        if self._ensemble is None:
            if pl_module is None and self._template is None:
                raise ValueError("pass the LightningModule the snapshots were taken from.")
            template = resolve_attribute(pl_module, self.attribute) if pl_module is not None else self._template
            assert template is not None
            self._ensemble = snapshot_ensemble(template, self.snapshots)
        return self._ensemble

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._template = resolve_attribute(pl_module, self.attribute)

    # ------------------------------------------------------------------ evaluation
    def _eval_start(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: Stage) -> None:
        if not (self.evaluate and self.snapshots and self.attribute):
            return
        target = resolve_attribute(pl_module, self.attribute)
        if not isinstance(target, DeepEnsemble):
            return  # a plain model's callers expect (B, ...) outputs; use `ensemble()` explicitly
        self._template = target
        self._swap_in(pl_module, self.attribute, self.ensemble(pl_module).to(pl_module.device).train(target.training))

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict[str, Any]:
        return {
            "snapshots": self.snapshots,
            "steps_per_cycle": self.steps_per_cycle,
            "base_lrs": self._base_lrs,
            "total_steps": self._total_steps,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.snapshots = [dict(s) for s in state_dict["snapshots"]]
        self.steps_per_cycle = state_dict["steps_per_cycle"]
        self._base_lrs = state_dict["base_lrs"]
        self._total_steps = state_dict["total_steps"]
        self._ensemble = None
