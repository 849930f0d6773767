"""MemberWeightAveraging: SWA, EMA or SWAG of every member of any ensemble, as a Trainer callback."""

from __future__ import annotations

import warnings
from typing import Any, Literal

import lightning as L
import torch
from torch import Tensor, nn
from torch.optim.swa_utils import SWALR

from .._checks import check_choice
from ..averaging.base import WeightAverager
from ..averaging.bn import has_batchnorm, update_bn
from ..averaging.ema import EMA
from ..averaging.swa import SWA
from ..averaging.swag import SWAG, SWAGEnsemble
from ..ensembles.base import Ensemble
from ._base import Stage, SubmoduleSwap, first_train_loader, resolve_attribute

__all__ = ["MemberWeightAveraging", "resolve_attribute", "first_train_loader"]


class MemberWeightAveraging(SubmoduleSwap):
    """Average the weights of any LightningModule (every member of an ensemble) during training.

    ``method``: ``"swa"`` (equal-weight mean of snapshots), ``"ema"`` (exponential moving average)
    or ``"swag"`` (SWA mean plus a Gaussian posterior to sample from). Averaging is elementwise on
    every floating tensor of the averaged model, so the members of a
    :class:`~lightning_ensembles.DeepEnsemble` (stacked along dim 0) or a PackedEnsemble (disjoint
    channel blocks) are each averaged on their own.

    Updates come only from training hooks: after the last batch of every ``every_n``-th epoch
    (``interval="epoch"``) or every ``every_n``-th optimiser step (``interval="step"``), from
    ``start_epoch`` on (an epoch index, or a fraction of ``max_epochs`` if a float in (0, 1)).
    Validation, test and predict run on the averaged weights once at least one update happened
    (never before). At the end of ``fit`` the averaged weights are written into the model, and
    BatchNorm statistics are recomputed for each member on the training data (``update_bn=True``;
    EMA averages the statistics instead). During training, validation with SWA/SWAG uses the
    averaged parameters with the model's current BatchNorm statistics.

    ``swa_lr``: from ``start_epoch`` on, every optimiser's learning rate is annealed to ``swa_lr``
    over ``annealing_epochs`` epochs (``torch.optim.swa_utils.SWALR``) and the module's own
    schedulers stop; any number of optimisers is supported.

    SWAG (``method="swag"``): keeps the last ``max_rank`` deviations; when ``attribute`` names an
    :class:`~lightning_ensembles.Ensemble` and ``num_samples > 0``, test and predict run on a
    :class:`~lightning_ensembles.averaging.SWAGEnsemble` of ``num_samples`` draws per member
    (MultiSWAG, BatchNorm recomputed per draw), otherwise on the SWAG mean.

    Everything (averages, moments, counters, the SWA schedule) is in the checkpoint, so a resumed
    run continues exactly.

    Args:
        method: ``"swa"``, ``"ema"`` or ``"swag"``.
        attribute: dotted path of the model to average (e.g. ``"ensemble"``); ``None``: the whole module.
        start_epoch: the first epoch averaged: an index, or a fraction of ``max_epochs`` in ``[0, 1)``.
        interval: ``"epoch"`` or ``"step"``: when updates happen.
        every_n: update every this many epochs or steps.
        decay: the EMA decay.
        swa_lr: the learning rate annealed to from ``start_epoch`` on; ``None``: the module's own schedule.
        annealing_epochs, annealing_strategy: how ``swa_lr`` is reached (``"cos"`` or ``"linear"``).
        update_bn: recompute BatchNorm statistics on the training data at the end of ``fit``.
        max_rank: SWAG: deviations kept for the low-rank covariance.
        num_samples: SWAG: draws per member evaluated at test and predict (``0``: the SWAG mean).
        swag_scale: SWAG: scale of the sampled covariance.
        sample_seed: SWAG: seed of the draws.

    Example:
        >>> import lightning as L
        >>> from lightning_ensembles import MLP, EnsembleClassifier
        >>> from lightning_ensembles.data import DigitsDataModule
        >>> model = EnsembleClassifier(backbone=MLP(64, 10), num_members=2)
        >>> swa = MemberWeightAveraging("swa", attribute="ensemble", start_epoch=1)
        >>> trainer = L.Trainer(max_epochs=2, callbacks=[swa], logger=False, enable_progress_bar=False,
        ...                     enable_checkpointing=False, enable_model_summary=False)
        >>> trainer.fit(model, DigitsDataModule())
        >>> swa.averager.n_averaged
        1
    """

    def __init__(
        self,
        method: Literal["swa", "ema", "swag"] = "swa",
        attribute: str | None = None,
        start_epoch: int | float = 0,
        interval: Literal["epoch", "step"] = "epoch",
        every_n: int = 1,
        decay: float = 0.999,
        swa_lr: float | None = None,
        annealing_epochs: int = 5,
        annealing_strategy: Literal["cos", "linear"] = "cos",
        update_bn: bool = True,
        max_rank: int = 20,
        num_samples: int = 30,
        swag_scale: float = 0.5,
        sample_seed: int = 0,
    ) -> None:
        self.method = check_choice("method", method, ("swa", "ema", "swag"))
        self.interval = check_choice("interval", interval, ("epoch", "step"))
        self.annealing_strategy = check_choice("annealing_strategy", annealing_strategy, ("cos", "linear"))
        if not isinstance(every_n, int) or every_n < 1:
            raise ValueError(f"`every_n` must be an integer >= 1, got {every_n!r}.")
        if isinstance(start_epoch, float) and not 0.0 <= start_epoch < 1.0:
            raise ValueError(
                f"`start_epoch` must be an epoch index (int >= 0) or a fraction of max_epochs in [0, 1), got {start_epoch}."
            )
        if isinstance(start_epoch, int) and start_epoch < 0:
            raise ValueError(f"`start_epoch` must be >= 0, got {start_epoch}.")
        if swa_lr is not None and swa_lr <= 0:
            raise ValueError(f"`swa_lr` must be > 0 (or None to keep the module's schedule), got {swa_lr}.")
        if annealing_epochs < 0:
            raise ValueError(f"`annealing_epochs` must be >= 0, got {annealing_epochs}.")
        if num_samples < 0:
            raise ValueError(f"`num_samples` must be >= 0, got {num_samples}.")
        self.attribute = attribute
        self.start_epoch, self.every_n = start_epoch, every_n
        self.swa_lr, self.annealing_epochs = swa_lr, annealing_epochs
        self.update_bn = update_bn and method != "ema"
        self.num_samples, self.sample_seed = num_samples, sample_seed
        self.averager: WeightAverager
        if method == "swa":
            self.averager = SWA()
        elif method == "ema":
            self.averager = EMA(decay=decay)
        else:
            self.averager = SWAG(max_rank=max_rank, scale=swag_scale)
        self.swag_ensemble: SWAGEnsemble | None = None
        self._last_step = -1
        self._swalr: list[SWALR] | None = None
        self._swalr_state: list[dict[str, Any]] | None = None
        self._final_buffers: dict[str, Tensor] | None = None
        self._transferred = False
        self._backup: dict[str, Tensor] | None = None

    @property
    def state_key(self) -> str:
        return self._generate_state_key(method=self.method, attribute=self.attribute)

    # ------------------------------------------------------------------ schedule
    def first_epoch(self, trainer: L.Trainer) -> int:
        """The epoch index from which averaging (and the SWA learning rate) starts."""
        if isinstance(self.start_epoch, float):
            if trainer.max_epochs is None or trainer.max_epochs < 0:
                raise ValueError(
                    "a fractional `start_epoch` needs Trainer(max_epochs=...); give an epoch index instead."
                )
            return int(self.start_epoch * trainer.max_epochs)
        return self.start_epoch

    def _is_last_batch(self, trainer: L.Trainer, batch_idx: int) -> bool:
        progress = trainer.fit_loop.epoch_loop.batch_progress
        return bool(progress.is_last_batch) or batch_idx + 1 >= trainer.num_training_batches

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        target = resolve_attribute(pl_module, self.attribute)
        self.averager.to(pl_module.device)
        self._transferred = False
        if self.method == "swag" and self.num_samples and not isinstance(target, Ensemble):
            warnings.warn(
                "MemberWeightAveraging(method='swag'): the averaged model is not an Ensemble, so evaluation uses the SWAG "
                "mean; draw an ensemble of samples with `callback.averager.sample_ensemble(model)`.",
                stacklevel=2,
            )

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.swa_lr is not None and self._swalr is None and trainer.current_epoch >= self.first_epoch(trainer):
            self._install_swalr(trainer, self.swa_lr)

    def _install_swalr(self, trainer: L.Trainer, swa_lr: float) -> None:
        # The module's own schedulers stop: their decay would fight SWALR's (as Lightning's SWA does).
        # SWALR is stepped here at each epoch's last batch, which works under manual optimisation too.
        trainer.strategy.lr_scheduler_configs = []
        self._swalr = []
        for i, opt in enumerate(trainer.optimizers):
            lrs = [g["lr"] for g in opt.param_groups]
            sched = SWALR(
                opt, swa_lr=swa_lr, anneal_epochs=self.annealing_epochs, anneal_strategy=self.annealing_strategy
            )
            if self._swalr_state is not None:
                # Resume: SWALR's constructor already stepped once; restore its counters and the lr.
                sched.load_state_dict(self._swalr_state[i])
                for g, lr in zip(opt.param_groups, lrs):
                    g["lr"] = lr
            self._swalr.append(sched)
        self._swalr_state = None

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        epoch, first = trainer.current_epoch, self.first_epoch(trainer)
        last = self._is_last_batch(trainer, batch_idx)
        if epoch >= first:
            if self.interval == "step":
                step = trainer.global_step
                due = step != self._last_step and step > 0 and step % self.every_n == 0
            else:
                due = last and (epoch - first) % self.every_n == 0
                step = trainer.global_step
            if due:
                self.averager.update(resolve_attribute(pl_module, self.attribute))
                self._last_step = step
        if last and self._swalr is not None:
            for sched in self._swalr:
                sched.step()

    # ------------------------------------------------------------------ evaluation on the average
    def _load_average(self, pl_module: L.LightningModule) -> None:
        if self._transferred or self._backup is not None or self.averager.n_averaged == 0:
            return  # never evaluate an average that has not been updated
        target = resolve_attribute(pl_module, self.attribute)
        self.averager.to(pl_module.device)
        state = dict(target.state_dict(keep_vars=True))
        names = list(self.averager.average) + list(self._final_buffers or {})
        self._backup = {n: state[n].detach().clone() for n in names}
        self.averager.copy_to(target)
        if self._final_buffers:
            with torch.no_grad():
                for n, b in self._final_buffers.items():
                    state[n].copy_(b)

    def _restore_weights(self, pl_module: L.LightningModule) -> None:
        if self._backup is None:
            return
        state = resolve_attribute(pl_module, self.attribute).state_dict(keep_vars=True)
        with torch.no_grad():
            for n, t in self._backup.items():
                state[n].copy_(t)
        self._backup = None

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._load_average(pl_module)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Callbacks run before the module's own epoch-end hook, but metrics were accumulated in the steps.
        self._restore_weights(pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.averager.n_averaged == 0:
            warnings.warn(
                "MemberWeightAveraging: training ended before the first update; the model is left unchanged.",
                stacklevel=2,
            )
            return
        target = resolve_attribute(pl_module, self.attribute)
        self.averager.copy_to(target)
        loader = first_train_loader(trainer)
        if self.update_bn and has_batchnorm(target):
            if loader is None:
                warnings.warn(
                    "MemberWeightAveraging: no training dataloader to recompute BatchNorm statistics.", stacklevel=2
                )
            else:
                update_bn(loader, target, device=pl_module.device)
                self._final_buffers = {n: b.detach().clone() for n, b in target.named_buffers()}
        self._transferred = True
        if self.method == "swag" and self.num_samples and isinstance(target, Ensemble):
            self.swag_ensemble = self._build_swag_ensemble(target, loader)

    def _build_swag_ensemble(self, target: nn.Module, loader: Any) -> SWAGEnsemble:
        assert isinstance(self.averager, SWAG)
        return self.averager.sample_ensemble(target, self.num_samples, loader=loader, seed=self.sample_seed)

    def _eval_start(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: Stage) -> None:
        self._load_average(pl_module)
        if self.method == "swag" and self.num_samples and self.averager.n_averaged and self.attribute:
            target = resolve_attribute(pl_module, self.attribute)
            if isinstance(target, Ensemble) and not isinstance(target, SWAGEnsemble):
                if self.swag_ensemble is None:
                    loader = first_train_loader(trainer) if has_batchnorm(target) else None
                    self.swag_ensemble = self._build_swag_ensemble(target, loader)
                self._swap_in(pl_module, self.attribute, self.swag_ensemble.to(pl_module.device))

    def _eval_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super()._eval_end(trainer, pl_module)
        self._restore_weights(pl_module)

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict[str, Any]:
        swalr = [s.state_dict() for s in self._swalr] if self._swalr is not None else self._swalr_state
        return {
            "method": self.method,
            "averager": self.averager.state_dict(),
            "last_step": self._last_step,
            "swalr": swalr,
            "final_buffers": self._final_buffers,
        }

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        # Checkpoints written before the rename (the class was `WeightAveraging`, a name Lightning 2.6
        # took for its own callback) keep this callback's state under the old key: move it to the new one
        # so that resuming restores the averages instead of silently starting them over.
        states = checkpoint.get("callbacks") or {}
        legacy = self.state_key.replace(type(self).__qualname__, "WeightAveraging", 1)
        if self.state_key not in states and legacy in states:
            states[self.state_key] = states.pop(legacy)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict["method"] != self.method:
            raise ValueError(
                f"checkpoint holds a {state_dict['method']!r} average, this callback does {self.method!r}."
            )
        self.averager.load_state_dict(state_dict["averager"])
        self._last_step = int(state_dict["last_step"])
        self._swalr, self._swalr_state = None, state_dict["swalr"]
        self._final_buffers = state_dict["final_buffers"]
        self.swag_ensemble = None
