"""LastLayerLaplace: after ``trainer.fit``, a last-layer Laplace posterior per member; used at test and predict."""

from __future__ import annotations

from typing import Any

import lightning as L

from .._checks import check_choice
from ..calibration.laplace import LaplaceEnsemble, fit_laplace, load_laplace_ensemble
from ..ensembles.base import Ensemble
from ._base import Stage, SubmoduleSwap, module_ensemble

__all__ = ["LastLayerLaplace"]


class LastLayerLaplace(SubmoduleSwap):
    """Fit :func:`~lightning_ensembles.calibration.laplace.fit_laplace` on a trained ensemble at the end of ``fit``.

    For modules that hold their ensemble in ``pl_module.ensemble`` (``EnsembleClassifier``, or any module
    with such an attribute). At the end of ``trainer.fit`` every member gets a last-layer Laplace posterior
    fitted on the training dataloader, its prior precision tuned on the validation dataloader (grid search
    on the validation NLL). During ``trainer.test`` / ``trainer.predict`` the module's ensemble is replaced
    by the :class:`~lightning_ensembles.calibration.laplace.LaplaceEnsemble` (member log-probabilities,
    ``(M, B, C)`` or ``(M * S, B, C)`` with ``num_samples=S``; the module's metrics and predictions use them
    as logits) and put back afterwards. ``trainer.validate`` is unchanged.

    Checkpoint: the fitted state is saved as tensors and plain data in the callback state of a checkpoint
    written after ``fit`` (``trainer.save_checkpoint``; checkpoints written during ``fit`` predate the
    fit) and restored with ``trainer.test(ckpt_path=...)``.

    Args:
        hessian_structure: the Hessian approximation of the last layer (e.g. ``"kron"``, ``"diag"``, ``"full"``).
        prior_method: ``"gridsearch"`` (validation NLL) or ``"marglik"`` (marginal likelihood, no validation data).
        num_samples: ``0``: the ``link_approx`` predictive per member; ``S > 0``: ``S`` posterior samples per member.
        link_approx: the approximation of the predictive with ``num_samples=0`` (e.g. ``"probit"``).
        grid_size: prior precisions tried by the grid search.
        seed: the seed of the posterior samples (``num_samples > 0``).

    Example:
        >>> import lightning as L
        >>> from lightning_ensembles import MLP, EnsembleClassifier
        >>> from lightning_ensembles.data import DigitsDataModule
        >>> model = EnsembleClassifier(backbone=MLP(64, 10), num_members=2)
        >>> la = LastLayerLaplace(grid_size=5)
        >>> trainer = L.Trainer(max_epochs=1, callbacks=[la], logger=False, enable_progress_bar=False,
        ...                     enable_checkpointing=False, enable_model_summary=False)
        >>> trainer.fit(model, DigitsDataModule())
        >>> len(la.laplace.prior_precisions)
        2
    """

    def __init__(
        self,
        hessian_structure: str = "kron",
        prior_method: str = "gridsearch",
        num_samples: int = 0,
        link_approx: str = "probit",
        grid_size: int = 21,
        seed: int = 0,
    ) -> None:
        self.prior_method = check_choice("prior_method", prior_method, ("gridsearch", "marglik"))
        if num_samples < 0:
            raise ValueError(f"`num_samples` must be >= 0, got {num_samples}.")
        self.hessian_structure, self.link_approx = hessian_structure, link_approx
        self.num_samples, self.grid_size, self.seed = num_samples, grid_size, seed
        self.laplace: LaplaceEnsemble | None = None
        self._saved: dict[str, Any] | None = None

    @staticmethod
    def _ensemble(pl_module: L.LightningModule) -> Ensemble:
        return module_ensemble(
            pl_module,
            "LastLayerLaplace",
            "Use EnsembleClassifier, or call "
            "`lightning_ensembles.calibration.fit_laplace(model, train_loader, val_loader)` directly.",
        )

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        ensemble = self._ensemble(pl_module)
        dm = getattr(trainer, "datamodule", None)
        train = dm.train_dataloader() if dm is not None else trainer.train_dataloader
        val = dm.val_dataloader() if dm is not None else trainer.val_dataloaders
        if isinstance(val, (list, tuple)):
            val = val[0] if val else None
        if train is None:
            raise ValueError(
                "LastLayerLaplace fits on the training data, but `trainer.fit` had no training dataloader."
            )
        if self.prior_method == "gridsearch" and val is None:
            raise ValueError(
                "LastLayerLaplace(prior_method='gridsearch') tunes the prior precision on validation data, but "
                "`trainer.fit` had no validation dataloader; give one, or use prior_method='marglik'."
            )
        self.laplace = fit_laplace(
            ensemble,
            train,
            val,
            self.hessian_structure,
            self.prior_method,
            self.num_samples,
            self.link_approx,
            grid_size=self.grid_size,
            seed=self.seed,
        )
        self._saved = None

    # ---------------------------------------------------------------- swap at test / predict
    def _eval_start(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: Stage) -> None:
        if self.laplace is None and self._saved is not None:
            self.laplace = load_laplace_ensemble(
                self._ensemble(pl_module),
                self._saved["state"],
                self._saved["config"],
                self.num_samples,
                self.link_approx,
                self.seed,
            )
        if self.laplace is None:
            raise RuntimeError(
                f"LastLayerLaplace has no fitted posterior at {stage} time: run `trainer.fit` first, or load a "
                "checkpoint saved (with `trainer.save_checkpoint`) after a fit with this callback."
            )
        self._ensemble(pl_module)  # the module holds an Ensemble to replace
        self._swap_in(pl_module, "ensemble", self.laplace)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._swap_out(pl_module)

    # ---------------------------------------------------------------- checkpoint
    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        if self._replaced is not None:  # never save the Laplace copies as the module's weights
            checkpoint["state_dict"] = {
                k: v for k, v in checkpoint["state_dict"].items() if not k.startswith("ensemble.")
            } | {f"ensemble.{k}": v for k, v in self._replaced.state_dict().items()}

    def state_dict(self) -> dict[str, Any]:
        if self.laplace is not None:
            return {"config": self.laplace.config, "state": self.laplace.laplace_state()}
        return self._saved or {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._saved = state_dict or None
        self.laplace = None
