"""ReliabilityDiagram: write accuracy-vs-confidence plots (PNG) for validation and test of any LightningModule."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import lightning as L

from .._checks import check_choice
from ..metrics import ExpectedCalibrationError
from ..metrics._plot import reliability_figure
from ._base import PredictionReader, Stage
from ._predictions import Predictions


class ReliabilityDiagram(PredictionReader):
    """Reliability diagram (PNG) of the first validation/test dataloader, for any LightningModule.

    Reads predictions as :class:`CalibrationMetrics` does (a ``validation_step`` / ``test_step``
    dict with ``logits``, ``probs``, ``member_logits`` or ``member_probs`` and ``target``). Keeps
    only per-bin sums (constant memory, synced across processes). At epoch end, process 0 writes
    ``<log_dir>/reliability/<stage>[_epoch<E>].png`` (test: ``test.png``; validation every
    ``every_n_epochs`` epochs, sanity checks excluded) with accuracy bars, the gap to perfect
    calibration, the sample histogram and the ECE in the title, and logs the figure to every logger
    that takes images (TensorBoard ``add_figure``; loggers with ``log_image``, e.g. W&B).
    ``<log_dir>`` is the first logger's ``log_dir`` or, without one, ``trainer.default_root_dir``.
    The image is ``figsize * dpi`` pixels. Paths written are kept in ``self.paths``.

    Args:
        n_bins: confidence bins.
        stages: which of ``"val"`` and ``"test"`` to plot.
        every_n_epochs: plot validation every this many epochs.
        figsize: figure size in inches ``(width, height)``.
        dpi: resolution of the PNG.

    Example:
        >>> import lightning as L, tempfile
        >>> from lightning_ensembles import MLP, EnsembleClassifier
        >>> from lightning_ensembles.callbacks import ReliabilityDiagram
        >>> from lightning_ensembles.data import DigitsDataModule
        >>> model = EnsembleClassifier(backbone=MLP(64, 10), num_members=2)
        >>> cb = ReliabilityDiagram(stages=["test"])
        >>> trainer = L.Trainer(default_root_dir=tempfile.mkdtemp(), callbacks=[cb], logger=False,
        ...                     enable_progress_bar=False, enable_model_summary=False)
        >>> _ = trainer.test(model, DigitsDataModule(), verbose=False)
        >>> [os.path.basename(p) for p in cb.paths]
        ['test.png']
    """

    def __init__(
        self,
        n_bins: int = 15,
        stages: Sequence[str] = ("val", "test"),
        every_n_epochs: int = 1,
        figsize: tuple[float, float] = (6.0, 7.0),
        dpi: int = 100,
    ) -> None:
        for stage in stages:
            check_choice("stages", stage, ("val", "test"))
        if every_n_epochs < 1:
            raise ValueError(f"`every_n_epochs` must be >= 1, got {every_n_epochs}.")
        self.n_bins, self.stages, self.every_n_epochs = n_bins, tuple(stages), every_n_epochs
        self.figsize, self.dpi = (float(figsize[0]), float(figsize[1])), dpi
        self.paths: list[str] = []
        self._ece: dict[str, ExpectedCalibrationError] = {}

    def _reads(self, trainer: L.Trainer, stage: Stage, dataloader_idx: int) -> bool:
        if dataloader_idx != 0 or stage not in self.stages or trainer.sanity_checking:
            return False
        return stage == "test" or trainer.current_epoch % self.every_n_epochs == 0

    def _update(self, stage: Stage, preds: Predictions, outputs: Any, dataloader_idx: int) -> None:
        if preds.target is None:
            return
        probs = preds.probs
        if stage not in self._ece:
            self._ece[stage] = ExpectedCalibrationError(n_bins=self.n_bins).to(probs.device)
        self._ece[stage].update(probs, preds.target)

    def _epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: Stage) -> None:
        self._write(trainer, stage)

    def _write(self, trainer: L.Trainer, stage: str) -> None:
        metric = self._ece.pop(stage, None)
        if metric is None:
            return
        ece = float(metric.compute())  # syncs the bin sums on every rank
        with metric.sync_context():  # bin sums of all processes; no-op in a single process
            count, conf, acc = (t.clone() for t in metric.bins())
        if trainer.global_rank != 0:
            return
        name = "test" if stage == "test" else f"val_epoch{trainer.current_epoch}"
        # The figure of ExpectedCalibrationError.plot(), at this callback's size and resolution.
        fig, _ = reliability_figure(
            count,
            conf,
            acc,
            f"{stage} reliability  ECE = {100 * ece:.2f}%",
            figsize=self.figsize,
            dpi=self.dpi,
            feature="ReliabilityDiagram",
        )
        root = (
            trainer.loggers[0].log_dir if trainer.loggers and trainer.loggers[0].log_dir else trainer.default_root_dir
        )
        folder = os.path.join(root, "reliability")
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, f"{name}.png")
        fig.savefig(path, dpi=self.dpi)
        self.paths.append(path)
        tag = f"{stage}/reliability_diagram"
        for logger in trainer.loggers:
            experiment: Any = getattr(logger, "experiment", None)
            if hasattr(experiment, "add_figure"):  # TensorBoard
                experiment.add_figure(tag, fig, global_step=trainer.global_step)
            elif hasattr(logger, "log_image"):  # W&B, Neptune, Comet ...
                logger.log_image(key=tag, images=[path], step=trainer.global_step)
