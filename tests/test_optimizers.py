"""Optimisers and schedulers: short names, any torch class from YAML (LightningCLI's callables) or Python."""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch
from _trainer import cli_fit_args
from conftest import quiet_trainer

from lightning_ensembles import EnsembleClassifier
from lightning_ensembles.data import DigitsDataModule

CONFIG = Path(__file__).parents[1] / "examples" / "configs" / "digits_deep.yaml"
KW = {"in_features": 64, "out_features": 10, "hidden": [16]}


def _fit(model, tmp_path=None, epochs=1):
    trainer = quiet_trainer(
        max_epochs=epochs,
        limit_train_batches=2,
        limit_val_batches=1,
        enable_checkpointing=tmp_path is not None,
        default_root_dir=tmp_path,
    )
    trainer.fit(model, DigitsDataModule(batch_size=32))
    return trainer


def test_short_names_keep_working():
    trainer = _fit(
        EnsembleClassifier(
            backbone="mlp",
            num_members=2,
            backbone_kwargs=KW,
            optimizer="sgd",
            lr=0.05,
            momentum=0.5,
            scheduler="cosine",
        )
    )
    opt = trainer.optimizers[0]
    assert isinstance(opt, torch.optim.SGD) and opt.defaults["momentum"] == 0.5
    assert isinstance(trainer.lr_scheduler_configs[0].scheduler, torch.optim.lr_scheduler.CosineAnnealingLR)


def test_python_callables_and_their_checkpoint_form(tmp_path):
    model = EnsembleClassifier(
        backbone="mlp",
        num_members=2,
        backbone_kwargs=KW,
        optimizer=functools.partial(torch.optim.RMSprop, lr=0.02),
        scheduler=functools.partial(torch.optim.lr_scheduler.StepLR, step_size=1, gamma=0.5),
    )
    assert model.hparams.optimizer == {"class_path": "torch.optim.rmsprop.RMSprop", "init_args": {"lr": 0.02}}
    trainer = _fit(model, tmp_path, epochs=2)
    opt = trainer.optimizers[0]
    assert isinstance(opt, torch.optim.RMSprop)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.02 * 0.5**2)  # StepLR stepped once per epoch
    path = tmp_path / "m.ckpt"
    trainer.save_checkpoint(path)
    again = EnsembleClassifier.load_from_checkpoint(path, weights_only=True)
    resumed = quiet_trainer(max_epochs=3, limit_train_batches=2, limit_val_batches=1)
    resumed.fit(again, DigitsDataModule(batch_size=32), ckpt_path=path, weights_only=True)
    assert isinstance(resumed.optimizers[0], torch.optim.RMSprop)
    assert resumed.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.02 * 0.5**3)


def test_a_callable_that_cannot_be_stored_must_be_passed_again(tmp_path):
    model = EnsembleClassifier(
        backbone="mlp", num_members=2, backbone_kwargs=KW, optimizer=lambda params: torch.optim.SGD(params, lr=0.1)
    )
    assert model.hparams.optimizer == "custom"
    trainer = _fit(model, tmp_path)
    path = tmp_path / "m.ckpt"
    trainer.save_checkpoint(path)
    again = EnsembleClassifier.load_from_checkpoint(path, weights_only=True)  # inference needs no optimiser
    with pytest.raises(ValueError, match="pass `optimizer=`"):
        _fit(again)


def test_data_paths_outside_torch_optim_are_refused():
    with pytest.raises(ValueError, match="torch.optim"):
        EnsembleClassifier(
            backbone="mlp",
            num_members=2,
            backbone_kwargs=KW,
            optimizer={"class_path": "os.system", "init_args": {"command": "true"}},
        )
    with pytest.raises(ValueError, match="must be one of"):
        EnsembleClassifier(backbone="mlp", num_members=2, backbone_kwargs=KW, optimizer="adamax")


def test_cli_takes_any_torch_optimizer_and_scheduler_and_has_no_overriding_flags(tmp_path):
    from lightning_ensembles.cli import run_cli

    cli = run_cli(
        cli_fit_args(
            CONFIG,
            tmp_path,
            "--model.init_args.num_members=2",
            '--model.init_args.optimizer={"class_path": "torch.optim.RMSprop", "init_args": {"lr": 0.01}}',
            '--model.init_args.scheduler={"class_path": "torch.optim.lr_scheduler.StepLR", '
            '"init_args": {"step_size": 1, "gamma": 0.5}}',
        )
    )
    assert isinstance(cli.trainer.optimizers[0], torch.optim.RMSprop)
    assert isinstance(cli.trainer.lr_scheduler_configs[0].scheduler, torch.optim.lr_scheduler.StepLR)
    ckpt = torch.load(cli.trainer.checkpoint_callback.best_model_path, weights_only=True)
    assert ckpt["hyper_parameters"]["optimizer"]["class_path"] == "torch.optim.RMSprop"
    with pytest.raises(SystemExit):  # LightningCLI's --optimizer would replace configure_optimizers
        run_cli(["fit", "--config", str(CONFIG), "--optimizer=Adam", "--trainer.max_epochs=1"])


def test_datamodules_save_their_hyperparameters():
    dm = DigitsDataModule(batch_size=16, ood_classes=[9])
    assert dm.hparams.batch_size == 16 and list(dm.hparams.ood_classes) == [9]
