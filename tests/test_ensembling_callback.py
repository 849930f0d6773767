import lightning as L
import pytest
import torch
import yaml
from _ensembling import ensembled_for_training
from conftest import quiet_trainer
from lightning.pytorch.cli import LightningCLI
from user_project.classifier import LitClassifier, TupleClassifier

from lightning_ensembles.callbacks import EnsembledModel, Ensembling
from lightning_ensembles.data import DigitsDataModule


def _member_weights(module):
    return module.model.ensemble.stacked_parameters()["1.weight"]


def test_unchanged_module_trains_as_an_ensemble_and_logs_ensemble_accuracy():
    L.seed_everything(0)
    dm = DigitsDataModule(batch_size=64)
    module = LitClassifier()
    trainer = quiet_trainer(max_epochs=3, callbacks=[Ensembling(num_members=4)])
    trainer.fit(module, dm)
    assert isinstance(module.model, EnsembledModel) and module.model.num_members == 4
    # Independent check: the ensemble accuracy from the member outputs equals what the user's metric logged.
    module.eval()
    x, y = dm.splits["val"].tensors
    with torch.no_grad():
        members = module.model.ensemble(x)  # (M, B, C)
    acc = (members.softmax(-1).mean(0).argmax(-1) == y).float().mean()
    assert float(trainer.callback_metrics["val_acc"]) == pytest.approx(float(acc), abs=1e-6)
    w = _member_weights(module)
    assert all(not torch.allclose(w[i], w[j]) for i in range(4) for j in range(i + 1, 4))
    # Members really differ in their predictions, and each one is a decent classifier.
    member_acc = (members.argmax(-1) == y).float().mean(1)
    assert (member_acc > 0.8).all()


def test_each_member_gets_its_own_loss_under_the_users_training_step():
    torch.manual_seed(0)
    module = LitClassifier()
    ensembled_for_training(module, num_members=3)
    x, y = torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,))
    loss = module.training_step((x, y), 0)
    members = module.model.ensemble(x)
    expected = torch.stack([torch.nn.functional.cross_entropy(members[i], y) for i in range(3)]).mean()
    torch.testing.assert_close(loss, expected)


def test_split_batch_mode_and_dict_batches():
    module = LitClassifier()
    cb = Ensembling(num_members=2, batch="split")
    cb.apply(module)
    module.train()
    x = torch.randn(5, 1, 8, 8)
    out = module(x)
    members = module.model.ensemble(x)
    assert out.shape == (5, 10)
    torch.testing.assert_close(out[:3], members[0, :3])
    torch.testing.assert_close(out[3:], members[1, 3:])
    # Outside the per-member passes of training_step, a training-mode call gives the ensemble prediction.
    repeat = LitClassifier()
    Ensembling(num_members=3).apply(repeat)
    repeat.train()
    torch.testing.assert_close(repeat(x), repeat.model.combine(repeat.model.ensemble(x)))


def test_checkpoint_restores_into_a_fresh_trainer_with_the_callback(tmp_path):
    L.seed_everything(0)
    dm = DigitsDataModule(batch_size=64)
    module = LitClassifier()
    trainer = quiet_trainer(max_epochs=2, callbacks=[Ensembling(num_members=3)])
    trainer.fit(module, dm)
    trainer.save_checkpoint(tmp_path / "ens.ckpt")
    expected = torch.cat(trainer.predict(module, dm.predict_dataloader()))

    fresh = LitClassifier()
    trainer2 = quiet_trainer(callbacks=[Ensembling(num_members=3)])
    got = torch.cat(trainer2.predict(fresh, dm.predict_dataloader(), ckpt_path=tmp_path / "ens.ckpt"))
    assert torch.equal(got, expected)

    # Outside a Trainer: apply the conversion, then load the state dict.
    bare = LitClassifier()
    Ensembling(num_members=3).apply(bare)
    bare.load_state_dict(torch.load(tmp_path / "ens.ckpt", weights_only=True)["state_dict"])
    x = dm.splits["test"].tensors[0]
    with torch.no_grad():
        torch.testing.assert_close(bare.eval()(x).softmax(-1), expected)

    with pytest.raises(ValueError, match="of 3 members"):
        quiet_trainer(callbacks=[Ensembling(num_members=4)]).predict(
            LitClassifier(), dm.predict_dataloader(), ckpt_path=tmp_path / "ens.ckpt"
        )


def test_forward_that_cannot_be_ensembled_fails_at_setup():
    trainer = quiet_trainer(max_epochs=1, callbacks=[Ensembling(num_members=2)])
    with pytest.raises(ValueError, match=r"returned a tuple of 2 items.*Point `attribute`"):
        trainer.fit(TupleClassifier(), DigitsDataModule())


def test_backbone_found_when_attribute_is_left_out():
    module = LitClassifier()
    cb = Ensembling(num_members=2, attribute=None)
    cb.apply(module)
    assert cb.chosen_attribute == "model"
    with pytest.raises(ValueError, match="not a submodule"):
        Ensembling(attribute="encoder").apply(LitClassifier())


def test_users_own_lightning_cli_with_callbacks_from_yaml(tmp_path):
    config = {
        "seed_everything": 0,
        "trainer": {
            "max_epochs": 2,
            "logger": False,
            "enable_progress_bar": False,
            "enable_checkpointing": False,
            "default_root_dir": str(tmp_path),
            "callbacks": [{"class_path": "lightning_ensembles.callbacks.Ensembling", "init_args": {"num_members": 3}}],
        },
        "data": {"batch_size": 64},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    cli = LightningCLI(LitClassifier, DigitsDataModule, args=["fit", "--config", str(path)], save_config_callback=None)
    assert isinstance(cli.model.model, EnsembledModel) and cli.model.model.num_members == 3
    assert float(cli.trainer.callback_metrics["val_acc"]) > 0.8


def test_works_with_averaging_calibration_checkpointing_early_stopping_accumulation_and_bf16(tmp_path):
    from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint

    from lightning_ensembles.callbacks import CalibrationMetrics, ReliabilityDiagram, TemperatureScaling
    from lightning_ensembles.callbacks.weight_averaging import MemberWeightAveraging

    L.seed_everything(0)
    dm = DigitsDataModule(batch_size=64)
    module = LitClassifier()
    ts = TemperatureScaling()
    swa = MemberWeightAveraging("swa", attribute="model", start_epoch=1)
    ckpt = ModelCheckpoint(dirpath=tmp_path, monitor="val_loss", save_last=True)
    callbacks = [
        Ensembling(num_members=3),
        swa,
        CalibrationMetrics(),
        ts,
        ReliabilityDiagram(),
        EarlyStopping(monitor="val_loss", patience=5),
        ckpt,
    ]
    trainer = quiet_trainer(
        max_epochs=3,
        precision="bf16-mixed",
        accumulate_grad_batches=2,
        default_root_dir=tmp_path,
        callbacks=callbacks,
        logger=L.pytorch.loggers.CSVLogger(tmp_path),
        enable_checkpointing=True,
    )
    trainer.fit(module, dm)
    assert swa.averager.n_averaged == 2
    assert ts.is_fitted and ts.temperature > 0
    metrics = trainer.callback_metrics
    assert "val/calibration/ece" in metrics and "val/calibration/mutual_information" in metrics
    (res,) = trainer.test(module, dm, verbose=False)
    assert res["test/ts/nll_after"] <= res["test/ts/nll_before"] + 1e-4
    assert any(tmp_path.rglob("test.png"))
    # The last checkpoint restores the ensemble (and the averaged weights) into a fresh module.
    expected = torch.cat(trainer.predict(module, dm.predict_dataloader()))
    fresh = LitClassifier()
    got = torch.cat(
        quiet_trainer(
            precision="bf16-mixed",
            callbacks=[Ensembling(num_members=3), MemberWeightAveraging("swa", attribute="model")],
        ).predict(fresh, dm.predict_dataloader(), ckpt_path=ckpt.last_model_path)
    )
    torch.testing.assert_close(got, expected)


def test_an_ensemble_with_one_training_output_is_refused_with_the_fix():
    trainer = quiet_trainer(
        max_epochs=1,
        limit_train_batches=1,
        limit_val_batches=0,
        callbacks=[
            Ensembling(
                num_members=3, method="mc_dropout", method_kwargs={"train_samples": 1, "p": 0.2, "insert_before": ["3"]}
            )
        ],
    )
    with pytest.raises(ValueError, match="train_samples=None"):
        trainer.fit(LitClassifier(), DigitsDataModule(batch_size=32))
