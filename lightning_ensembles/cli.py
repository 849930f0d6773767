"""The ``lightning-ensembles`` command: LightningCLI over the ensemble modules and offline datamodules.

    lightning-ensembles fit --config examples/configs/digits_deep.yaml
    lightning-ensembles test --config examples/configs/digits_deep.yaml --ckpt_path path/to.ckpt
    lightning-ensembles fit --config examples/configs/digits_deep.yaml --print_config
    lightning-ensembles showcase --config examples/configs/mnist1d_showcase.yaml   # single model vs ensemble

``fit`` ends with a test run on the best checkpoint (``--test_after_fit false`` to skip) and, for
classifiers, prints a table of test accuracy, NLL, Brier and ECE for the ensemble and each member.
"""

from __future__ import annotations

from lightning import LightningDataModule, LightningModule
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from .modules import EnsembleClassifier, format_report


class EnsembleCLI(LightningCLI):
    """LightningCLI with any LightningModule / LightningDataModule by ``class_path`` and a test report.

    Args:
        *args, **kwargs: those of ``LightningCLI``; the parser also takes ``--test_after_fit`` (default true).
    """

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument(
            "--test_after_fit", type=bool, default=True, help="After `fit`, test the best checkpoint and print a table."
        )

    def _print_report(self) -> None:
        model = self.model
        if isinstance(model, EnsembleClassifier) and model.last_test_results.get(0) and self.trainer.is_global_zero:
            print("\n" + format_report(model.last_test_results[0]), flush=True)

    def after_fit(self) -> None:
        if not self.config.fit.get("test_after_fit", True) or self.datamodule is None:
            return
        ckpt = "best" if getattr(self.trainer.checkpoint_callback, "best_model_path", "") else None
        self.trainer.test(self.model, datamodule=self.datamodule, ckpt_path=ckpt)
        self._print_report()

    def after_test(self) -> None:
        self._print_report()


def run_cli(args: list[str] | None = None, run: bool = True) -> EnsembleCLI:
    """Build (and by default run) the CLI; ``args`` as on the command line. Returns the CLI object."""
    return EnsembleCLI(
        LightningModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        # No top-level --optimizer/--lr_scheduler: they would silently replace the module's
        # configure_optimizers. The modules take any optimiser/scheduler as `--model.init_args.optimizer`.
        auto_configure_optimizers=False,
        args=args,
        run=run,
    )


def main() -> None:
    """Entry point of the ``lightning-ensembles`` console script (``showcase`` runs :mod:`lightning_ensembles.showcase`)."""
    import sys

    if len(sys.argv) > 1 and sys.argv[1] == "showcase":
        from .showcase import main as showcase

        showcase(sys.argv[2:])
        return
    run_cli()


if __name__ == "__main__":  # pragma: no cover
    main()
