"""What EnsembleClassifier and EnsembleRegressor share: building the ensemble, the objective, optimisers."""

from __future__ import annotations

import warnings
from typing import Any, TypeVar, cast

import torch
from lightning import LightningModule
from lightning.fabric.utilities.data import AttributeDict
from torch import Tensor, nn

from ..ensembles.base import Ensemble, OwnObjective
from ..ensembles.deep import adopt_checkpoint_storage
from ..ensembles.registry import build_ensemble
from ..losses.base import Regularizer, regularizer_from_config
from . import _optim
from ._rng import collect_rng_states, set_rng_states

_T = TypeVar("_T")


def renamed_kwarg(owner: str, old: str, old_value: _T | None, new: str, new_value: _T) -> _T:
    """The value of keyword ``new``, or of its deprecated former name ``old`` when that was given.

    The old keyword still works (old checkpoints and configs store it) with a ``DeprecationWarning``
    naming the new one, and wins over ``new_value``. ``old_value`` is ``None`` when the old keyword was not given.

    Example:
        >>> import warnings
        >>> with warnings.catch_warnings(record=True) as caught:
        ...     warnings.simplefilter("always")
        ...     renamed_kwarg("EnsembleClassifier", "ece_bins", 10, "n_bins", 15)
        10
        >>> str(caught[0].message)
        'EnsembleClassifier(ece_bins=...) is deprecated; use n_bins=... instead.'
    """
    if old_value is None:
        return new_value
    warnings.warn(f"{owner}({old}=...) is deprecated; use {new}=... instead.", DeprecationWarning, stacklevel=3)
    return old_value


def _module_args_to_ignore(values: dict[str, Any]) -> list[str]:
    """Names of ``nn.Module`` arguments that cannot go into checkpoint hyperparameters as plain data.

    When LightningCLI instantiates the module it hands Lightning the *config* of those arguments
    (class_path dicts) as hyperparameters, which rebuild them; keep those. Plain Python objects
    are left out, and ``load_from_checkpoint`` then needs them passed again (a clear error says so).
    """
    try:  # private but stable since Lightning 2.3: the hparams LightningCLI gives the module.
        from lightning.pytorch.core.mixins.hparams_mixin import _given_hyperparameters

        given = _given_hyperparameters.get() or {}
    except ImportError:  # pragma: no cover
        given = {}
    return [k for k, v in values.items() if isinstance(v, nn.Module) and not isinstance(given.get(k), dict)]


class EnsembleModule(LightningModule):
    """Shared machinery; use :class:`EnsembleClassifier` or :class:`EnsembleRegressor`.

    Learning-rate convention: the optimiser minimises the **sum** over members of the member losses
    (``num_members * (mean member loss + sum_k weight_k * regulariser_k)``), so the learning rate that
    trains one model trains every member of a deep ensemble exactly as if it were alone, for SGD as
    for Adam. The logged ``train/loss`` is the member mean (comparable with a single model's loss).
    Shared weights (BatchEnsemble's ``W``, a LoRA backbone) receive the sum of the members' gradients.

    Args:
        ensemble, backbone, method, num_members, backbone_kwargs, ensemble_kwargs: the ensemble to train, built
            or described (see :class:`EnsembleClassifier`).
        optimizer, lr, weight_decay, momentum, scheduler, regularizers: the optimiser and the extra training
            terms (see :class:`EnsembleClassifier`).
    """

    def __init__(
        self,
        ensemble: Ensemble | None,
        backbone: nn.Module | str | None,
        method: str,
        num_members: int,
        backbone_kwargs: dict[str, Any] | None,
        ensemble_kwargs: dict[str, Any] | None,
        optimizer: _optim.OptimizerSpec,
        lr: float,
        weight_decay: float,
        momentum: float,
        scheduler: _optim.SchedulerSpec,
        regularizers: list[Regularizer] | None,
    ) -> None:
        super().__init__()
        if (ensemble is None) == (backbone is None):
            raise ValueError(
                "Give exactly one of `ensemble` (a built Ensemble) or `backbone` (a module or model name, "
                "with `method` and `num_members`)."
            )
        _optim.check_specs(optimizer, scheduler)
        self._optimizer, self._scheduler = _optim.from_config(optimizer), _optim.from_config(scheduler)
        if lr <= 0:
            raise ValueError(f"`lr` must be > 0, got {lr}.")
        if ensemble is None:
            assert backbone is not None  # exactly one of the two, checked above
            ensemble = build_ensemble(method, backbone, num_members, backbone_kwargs, **(ensemble_kwargs or {}))
        elif not isinstance(ensemble, Ensemble):
            raise ValueError(
                f"`ensemble` must be an lightning_ensembles Ensemble, got {type(ensemble).__name__}; "
                "to ensemble a plain model pass it as `backbone=` instead."
            )
        self.ensemble = ensemble
        # Dicts are the plain-data form checkpoints store (`Regularizer.config()`), rebuilt here.
        self.regularizers = nn.ModuleList(regularizer_from_config(r) for r in regularizers or [])

    def _plain_hyperparameters(self) -> None:
        """Store configuration objects in ``hparams`` as plain data, after ``save_hyperparameters``.

        Checkpoints must load with ``weights_only=True``, which refuses pickled objects: regularisers
        become their ``{"class_path", "init_args"}`` config, rebuilt on load by ``__init__``.
        """
        for key in ("optimizer", "scheduler"):  # callables as class_path/init_args, or "custom"
            if key in self.hparams:
                self.hparams[key] = _optim.to_config(self.hparams[key])
        if self.hparams.get("regularizers"):
            self.hparams["regularizers"] = [
                r.config() if isinstance(r, Regularizer) else r for r in self.hparams["regularizers"]
            ]

    @property
    def hparams(self) -> AttributeDict:
        """Lightning's ``hparams`` (an :class:`AttributeDict` once ``save_hyperparameters`` ran), typed as such."""
        return cast(AttributeDict, super().hparams)

    @property
    def _regularizers(self) -> list[Regularizer]:
        return [cast(Regularizer, r) for r in self.regularizers]

    @property
    def num_members(self) -> int:
        return self.ensemble.num_members

    def forward(self, x: Tensor) -> Tensor:
        """Member outputs ``(M, B, ...)``."""
        return self.ensemble(x)

    # ---------------------------------------------------------------- training objective
    def member_loss(self, outputs: Tensor, target: Tensor) -> Tensor:  # pragma: no cover - abstract
        """Mean over members of each member's loss; ``outputs`` is ``(M, B, ...)``."""
        raise NotImplementedError

    def regularization(self, outputs: Tensor, target: Tensor, inputs: Tensor) -> dict[str, Tensor]:
        """Unweighted values of the configured regularisers (the hook for extra training terms).

        Override to add terms; each value is multiplied by its regulariser's ``weight``.
        """
        return {r.name: r(outputs, target, inputs=inputs, ensemble=self.ensemble) for r in self._regularizers}

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        if isinstance(self.ensemble, OwnObjective):
            # Ensembles with per-member training behaviour (e.g. MultiSymmetryEnsemble: transformed
            # inputs, auxiliary heads) give their member outputs and extra loss themselves.
            outputs, extra, logs = self.ensemble.training_outputs(x, y)
            for name, value in logs.items():
                self.log(f"train/{name}", value.detach() if isinstance(value, Tensor) else value)
        else:
            outputs, extra = self(x), None
        loss = self.member_loss(outputs, y)
        total = loss if extra is None else loss + extra
        for r in self._regularizers:
            value = r(outputs, y, inputs=x, ensemble=self.ensemble)
            self.log(f"train/{r.name}", value.detach())
            total = total + r.weight * value
        if not torch.isfinite(total):
            raise FloatingPointError(self._nonfinite_message(outputs, loss, total))
        self.log("train/loss", loss.detach(), prog_bar=True)
        # Sum over the members that produced outputs (see the learning-rate convention in the class
        # docstring); not `num_members`, which can differ, e.g. combinatorial ensembles train on a few
        # sampled combinations of many.
        return total * outputs.shape[0]

    def _nonfinite_message(self, outputs: Tensor, loss: Tensor, total: Tensor) -> str:
        """Say which member (or term) made the training loss non-finite, and at which step."""
        where = f"at global step {self.global_step} (epoch {self.current_epoch})"
        bad = [i for i in range(outputs.shape[0]) if not torch.isfinite(outputs[i]).all()]
        if bad:
            cause = f"the outputs of member(s) {bad} are not finite"
        elif not torch.isfinite(loss):
            cause = "the member loss is not finite although every member's outputs are (check the targets)"
        else:
            cause = "a regulariser or an extra training term is not finite"
        return (
            f"The training loss became {float(total)} {where}: {cause}. Training stopped rather than continue "
            "with non-finite weights. Lower the learning rate, clip gradients (Trainer(gradient_clip_val=1.0)), "
            "or check the inputs of this batch."
        )

    # ---------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Lightning does not save the global RNGs; with them, a resumed run draws the same dropout masks
        # and augmentations as an uninterrupted one. Tensors and tuples only (loads with weights_only).
        checkpoint["lightning_ensembles_rng"] = collect_rng_states()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Before configure_optimizers (Lightning restores the model first): the checkpoint's own
        # DeepEnsemble storage, so its optimiser and averaging states match the parameters.
        if self._trainer is None or not self.trainer.optimizers:
            adopt_checkpoint_storage(self, checkpoint.get("state_dict", {}))
        # Restored when training resumes (after the sanity check, which must not consume them), never
        # by load_from_checkpoint or an evaluation.
        self._pending_rng = checkpoint.get("lightning_ensembles_rng")

    def on_train_start(self) -> None:
        pending = getattr(self, "_pending_rng", None)
        if pending is not None and self.trainer.state.fn == "fit":
            set_rng_states(pending)
        self._pending_rng = None

    # ---------------------------------------------------------------- optimisation

    def configure_optimizers(self):
        params = [p for p in self.parameters() if p.requires_grad]
        opt = _optim.build_optimizer(
            self._optimizer, params, self.hparams.lr, self.hparams.weight_decay, self.hparams.momentum
        )
        sched = _optim.build_scheduler(self._scheduler, opt, self.trainer.estimated_stepping_batches, "val/nll")
        return opt if sched is None else {"optimizer": opt, "lr_scheduler": sched}

    # ---------------------------------------------------------------- evaluation
    def _eval_step(self, stage: str, batch: Any, dataloader_idx: int) -> dict[str, Tensor]:  # pragma: no cover
        """Update the ``stage`` metrics with one batch; return the step's output dict."""
        raise NotImplementedError

    def _eval_epoch_end(self, stage: str) -> None:  # pragma: no cover
        """Compute, log and reset the ``stage`` metrics."""
        raise NotImplementedError

    def validation_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> dict[str, Tensor]:
        return self._eval_step("val", batch, dataloader_idx)

    def test_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> dict[str, Tensor]:
        return self._eval_step("test", batch, dataloader_idx)

    def on_validation_epoch_end(self) -> None:
        self._eval_epoch_end("val")

    def on_test_epoch_end(self) -> None:
        self._eval_epoch_end("test")

    def _stage_prefix(self, stage: str, dataloader_idx: int) -> str:
        return stage if dataloader_idx == 0 else f"{stage}_dl{dataloader_idx}"
