"""EnsembleRegressor: a LightningModule for regression ensembles with aleatoric and epistemic uncertainty."""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from .._checks import check_choice
from ..ensembles.base import Ensemble, GaussianMixture, aggregate_gaussian, split_gaussian
from ..ensembles.evidential import NIGHead
from ..losses.base import Regularizer
from ..losses.evidential import evidential_regression_loss, nig_split, nig_uncertainty
from ..metrics import RegressionMetrics
from ._optim import OptimizerSpec, SchedulerSpec
from .base import EnsembleModule, _module_args_to_ignore


class EnsembleRegressor(EnsembleModule):
    """Train a regression ensemble; members predict a Gaussian (``loss="gaussian"``) or a point (``"mse"``).

    With ``loss="gaussian"`` the backbone must output ``2 * num_targets`` values: means, then raw
    variances (``softplus`` makes them positive, see :func:`~lightning_ensembles.ensembles.base.split_gaussian`);
    each member minimises its own Gaussian NLL. The ensemble prediction is the mixture: mean of member
    means, aleatoric variance = mean member variance, epistemic variance = variance of member means.

    Validation/test log ``rmse``, ``nll`` (Gaussian NLL of the moment-matched mixture) and
    ``coverage90`` (fraction of targets inside the central 90% interval); a single ``"mse"`` member has
    no predictive variance, so it logs ``rmse`` only. ``predict_step`` returns
    ``{"mean", "aleatoric", "epistemic", "variance"}``.

    ``loss="evidential"`` (deep evidential regression, Amini et al. 2020): the backbone's output layer is
    widened to Normal-Inverse-Gamma parameters (:class:`~lightning_ensembles.NIGHead`; the backbone outputs
    ``num_targets`` values), each member minimises the NIG NLL plus ``evidential_coeff * |y - gamma| (2 nu +
    alpha)``. A member's predictive is its Student-t, moment-matched (mean ``gamma``, variance
    ``beta (1 + nu) / (nu (alpha - 1))``) in the metrics; ``predict_step``'s ``aleatoric`` is the mean member
    ``beta / (alpha - 1)``, ``epistemic`` the mean member ``beta / (nu (alpha - 1))`` plus the variance of
    the member means.

    Args:
        ensemble: a built :class:`~lightning_ensembles.Ensemble` (give this or ``backbone``).
        backbone: the model each member is: a module, a timm name, ``"mlp"`` or a dotted path, with
            ``2 * num_targets`` outputs for ``loss="gaussian"``, else ``num_targets``.
        method: how ``backbone`` is ensembled: ``"deep"``, ``"packed"``, ``"batch"``, ``"lora"``, ... (see
            ``build_ensemble``).
        num_members: number of members ``M``.
        backbone_kwargs: arguments for a backbone given by name.
        ensemble_kwargs: extra arguments of the ensemble ``method``.
        loss: ``"gaussian"``, ``"mse"`` or ``"evidential"``.
        num_targets: number of regression targets ``D``.
        optimizer: an optimizer name (``"adam"``, ``"adamw"`` or ``"sgd"``) or a callable ``params -> Optimizer``.
        lr: learning rate (see the learning-rate convention of :class:`EnsembleModule`).
        weight_decay: weight decay of the optimizer.
        momentum: momentum of SGD.
        scheduler: a scheduler name (``"none"`` or ``"cosine"``) or a callable ``optimizer -> scheduler``.
        regularizers: extra training terms (:class:`~lightning_ensembles.losses.Regularizer`, e.g.
            :class:`~lightning_ensembles.losses.NegativeCorrelation`), each weighted by its ``weight``.
        evidential_coeff: ``loss="evidential"``: weight of the evidence regulariser.

    Example:
        >>> import lightning as L
        >>> from lightning_ensembles import EnsembleRegressor
        >>> from lightning_ensembles.data import ToyRegressionDataModule
        >>> model = EnsembleRegressor(backbone="mlp", num_members=2,
        ...                           backbone_kwargs={"in_features": 1, "out_features": 2})
        >>> trainer = L.Trainer(max_epochs=1, logger=False, enable_progress_bar=False,
        ...                     enable_checkpointing=False, enable_model_summary=False)
        >>> trainer.fit(model, ToyRegressionDataModule())
        >>> "val/rmse" in trainer.callback_metrics
        True
    """

    def __init__(
        self,
        ensemble: Ensemble | None = None,
        backbone: nn.Module | str | None = None,
        method: str = "deep",
        num_members: int = 4,
        backbone_kwargs: dict[str, Any] | None = None,
        ensemble_kwargs: dict[str, Any] | None = None,
        loss: str = "gaussian",
        num_targets: int = 1,
        optimizer: OptimizerSpec = "adam",
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        momentum: float = 0.9,
        scheduler: SchedulerSpec = "none",
        regularizers: list[Regularizer] | None = None,
        evidential_coeff: float = 0.01,
    ) -> None:
        check_choice("loss", loss, ("gaussian", "mse", "evidential"))
        head, head_kwargs = backbone, backbone_kwargs  # (issue 19) evidential: the head gives NIG parameters
        if loss == "evidential" and backbone is not None and not isinstance(backbone, NIGHead):
            head, head_kwargs = NIGHead(backbone, backbone_kwargs=backbone_kwargs), None
        super().__init__(
            ensemble,
            head,
            method,
            num_members,
            head_kwargs,
            ensemble_kwargs,
            optimizer,
            lr,
            weight_decay,
            momentum,
            scheduler,
            regularizers,
        )
        if num_targets < 1:
            raise ValueError(f"`num_targets` must be >= 1, got {num_targets}.")
        self.save_hyperparameters(ignore=_module_args_to_ignore({"ensemble": ensemble, "backbone": backbone}))
        self._plain_hyperparameters()
        self._metrics: dict[str, RegressionMetrics] = {}

    # ---------------------------------------------------------------- helpers
    def split(self, outputs: Tensor) -> tuple[Tensor, Tensor | None]:
        """Member means and variances ``(M, B, D)`` (variance ``None`` for MSE members)."""
        d = self.hparams.num_targets
        expected = {"gaussian": 2 * d, "evidential": 4 * d}.get(self.hparams.loss, d)
        if outputs.shape[-1] != expected:
            raise ValueError(
                f"member outputs have {outputs.shape[-1]} values per sample; loss={self.hparams.loss!r} with "
                f"num_targets={d} needs {expected}. Set the backbone's output size to {expected}."
            )
        if self.hparams.loss == "gaussian":
            return split_gaussian(outputs)
        if self.hparams.loss == "evidential":  # the member's Student-t, moment-matched
            gamma, nu, alpha, beta = nig_split(outputs)
            return gamma, beta * (1 + nu) / (nu * (alpha - 1))
        return outputs, None

    def _check_target(self, mean: Tensor, target: Tensor) -> Tensor:
        if target.dim() == 1 and mean.shape[-1] == 1:
            target = target[:, None]
        if target.shape != mean.shape[1:]:
            raise ValueError(
                f"targets of shape {tuple(target.shape)} do not fit member predictions {tuple(mean.shape)}: "
                f"expected {tuple(mean.shape[1:])} (batch, num_targets)."
            )
        return target.to(mean.dtype)

    # ---------------------------------------------------------------- training
    def member_loss(self, outputs: Tensor, target: Tensor) -> Tensor:
        mean, var = self.split(outputs)
        if target.dim() == 1 and mean.shape[-1] == 1:
            target = target[:, None]
        if target.dim() != 2 or target.shape[-1] != mean.shape[-1]:
            raise ValueError(
                f"targets of shape {tuple(target.shape)} do not fit member predictions {tuple(mean.shape)}: "
                f"expected (batch, {mean.shape[-1]})."
            )
        per_member = self.ensemble.member_targets(target).to(mean.dtype)  # repeated, or split among members
        if per_member.shape != mean.shape:
            raise ValueError(
                f"targets of shape {tuple(target.shape)} do not fit member predictions {tuple(mean.shape)}: "
                f"expected {tuple(mean.shape[1:])} (batch, num_targets)."
            )
        if self.hparams.loss == "evidential":
            return evidential_regression_loss(outputs, per_member, self.hparams.evidential_coeff)
        if var is None:
            return F.mse_loss(mean, per_member)
        return F.gaussian_nll_loss(mean, per_member, var, full=True)

    # ---------------------------------------------------------------- evaluation
    def _metric_set(self, key: str) -> RegressionMetrics:
        if key not in self._metrics:
            self._metrics[key] = RegressionMetrics(level=0.9).to(self.device)
        return self._metrics[key]

    def _eval_step(self, stage: str, batch: Any, dataloader_idx: int) -> dict[str, Tensor]:
        x, y = batch
        mean, var = self.split(self(x))
        y = self._check_target(mean, y)
        self._metric_set(self._stage_prefix(stage, dataloader_idx)).update(mean, var, y)
        mix = aggregate_gaussian(mean, var)
        return {"mean": mix.mean, "variance": mix.variance, "target": y}

    @property
    def has_predictive_variance(self) -> bool:
        """False for a single point-prediction member (``loss="mse"``, one member): it predicts no variance."""
        return self.hparams.loss != "mse" or self.num_members > 1

    def _eval_epoch_end(self, stage: str) -> None:
        for prefix, metrics in self._metrics.items():
            if prefix.split("_dl")[0] != stage:
                continue
            values = metrics.compute()
            if not self.has_predictive_variance:
                # NLL and interval coverage of a zero variance would be logged as if a variance existed.
                values = {k: v for k, v in values.items() if k == "rmse"}
            self.log_dict({f"{prefix}/{k}": v for k, v in values.items()}, add_dataloader_idx=False)
            metrics.reset()

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> dict[str, Tensor]:
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        outputs = self(x)
        if self.hparams.loss == "evidential":
            u = nig_uncertainty(outputs)
            spread = aggregate_gaussian(u["mean"])  # variance of the member means
            mix = GaussianMixture(spread.mean, u["aleatoric"].mean(0), u["epistemic"].mean(0) + spread.epistemic)
        else:
            mix = aggregate_gaussian(*self.split(outputs))
        return {"mean": mix.mean, "aleatoric": mix.aleatoric, "epistemic": mix.epistemic, "variance": mix.variance}
