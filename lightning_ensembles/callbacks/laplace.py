"""LastLayerLaplace: after ``trainer.fit``, a last-layer Laplace posterior per member; used at test and predict."""

from __future__ import annotations

from typing import Any

from lightning.pytorch.callbacks import Callback

from ..calibration.laplace import LaplaceEnsemble, fit_laplace, load_laplace_ensemble
from ..ensembles.base import Ensemble

__all__ = ["LastLayerLaplace"]


class LastLayerLaplace(Callback):
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

    Example:
        >>> import lightning as L
        >>> from lightning_ensembles import EnsembleClassifier
        >>> from lightning_ensembles.data import DigitsDataModule
        >>> model = EnsembleClassifier(backbone="mlp", num_members=2,
        ...                            backbone_kwargs={"in_features": 64, "out_features": 10})
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
        if prior_method not in ("gridsearch", "marglik"):
            raise ValueError(f"`prior_method` must be 'gridsearch' or 'marglik', got {prior_method!r}.")
        if num_samples < 0:
            raise ValueError(f"`num_samples` must be >= 0, got {num_samples}.")
        self.hessian_structure = hessian_structure
        self.prior_method = prior_method
        self.num_samples = num_samples
        self.link_approx = link_approx
        self.grid_size = grid_size
        self.seed = seed
        self.laplace: LaplaceEnsemble | None = None
        self._saved: dict[str, Any] | None = None
        self._swapped: Any = None

    @staticmethod
    def _ensemble(pl_module: Any) -> Ensemble:
        ens = getattr(pl_module, "ensemble", None)
        if not isinstance(ens, Ensemble):
            raise ValueError(
                f"LastLayerLaplace needs the module's ensemble in `pl_module.ensemble` (an Ensemble); "
                f"{type(pl_module).__name__} has none. Use EnsembleClassifier, or call "
                "`lightning_ensembles.calibration.fit_laplace(model, train_loader, val_loader)` directly."
            )
        return ens

    def on_fit_end(self, trainer, pl_module) -> None:
        ensemble = self._ensemble(pl_module)
        dm = trainer.datamodule
        train = dm.train_dataloader() if dm is not None else trainer.train_dataloader
        val = dm.val_dataloader() if dm is not None else trainer.val_dataloaders
        if isinstance(val, (list, tuple)):
            val = val[0] if val else None
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
    def _swap_in(self, pl_module: Any, stage: str) -> None:
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
        self._swapped = self._ensemble(pl_module)
        pl_module.ensemble = self.laplace

    def _swap_out(self, pl_module: Any) -> None:
        if self._swapped is not None:
            pl_module.ensemble = self._swapped
            self._swapped = None

    def on_test_start(self, trainer, pl_module) -> None:
        self._swap_in(pl_module, "test")

    def on_test_end(self, trainer, pl_module) -> None:
        self._swap_out(pl_module)

    def on_predict_start(self, trainer, pl_module) -> None:
        self._swap_in(pl_module, "predict")

    def on_predict_end(self, trainer, pl_module) -> None:
        self._swap_out(pl_module)

    def on_exception(self, trainer, pl_module, exception) -> None:
        self._swap_out(pl_module)

    # ---------------------------------------------------------------- checkpoint
    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        if self._swapped is not None:  # never save the Laplace copies as the module's weights
            checkpoint["state_dict"] = {
                k: v for k, v in checkpoint["state_dict"].items() if not k.startswith("ensemble.")
            } | {f"ensemble.{k}": v for k, v in self._swapped.state_dict().items()}

    def state_dict(self) -> dict[str, Any]:
        if self.laplace is not None:
            return {"config": self.laplace.config, "state": self.laplace.laplace_state()}
        return self._saved or {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._saved = state_dict or None
        self.laplace = None
