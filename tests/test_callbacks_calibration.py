"""Calibration callbacks on a plain user LightningModule (not ours) and on EnsembleClassifier."""

from __future__ import annotations

import os

import lightning as L
import pytest
import torch
from conftest import quiet_trainer
from torch import nn

from lightning_ensembles.callbacks import (
    CalibrationMetrics,
    ConformalPrediction,
    ReliabilityDiagram,
    TemperatureScaling,
)
from lightning_ensembles.data import DigitsDataModule
from lightning_ensembles.metrics import ExpectedCalibrationError, NegativeLogLikelihood


class PlainClassifier(L.LightningModule):
    """A user's module: knows nothing about this library; its eval steps return logits and targets."""

    def __init__(self, output_key: str = "logits", lr: float = 1e-2) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
        self.output_key, self.lr = output_key, lr

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def _eval(self, batch):
        x, y = batch
        logits = self(x)
        value = logits.softmax(-1) if self.output_key == "probs" else logits
        return {self.output_key: value, "target": y}

    def validation_step(self, batch, batch_idx):
        return self._eval(batch)

    def test_step(self, batch, batch_idx):
        return self._eval(batch)

    def predict_step(self, batch, batch_idx):
        return {"logits": self(batch[0])}

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.lr)


class LossOnly(PlainClassifier):
    def validation_step(self, batch, batch_idx):
        return nn.functional.cross_entropy(self(batch[0]), batch[1])


@pytest.fixture(scope="module")
def overfit_digits():
    """A PlainClassifier trained to overconfidence (small batches, high lr, no regularisation) and its trainer."""
    torch.manual_seed(0)
    ts, cp = TemperatureScaling(), ConformalPrediction(alpha=0.1, method="aps")
    model, dm = PlainClassifier(lr=2e-2), DigitsDataModule(batch_size=64)
    trainer = quiet_trainer(max_epochs=6, num_sanity_val_steps=0, callbacks=[ts, cp])
    trainer.fit(model, dm)
    return model, dm, ts, cp


def _collect(model, loader):
    with torch.no_grad():
        pairs = [(model(x), y) for x, y in loader]
    return torch.cat([p for p, _ in pairs]), torch.cat([y for _, y in pairs])


def test_calibration_metrics_on_a_plain_module_match_direct_computation():
    torch.manual_seed(0)
    model, dm = PlainClassifier(), DigitsDataModule(batch_size=50)
    cb = CalibrationMetrics(metrics=["ece", "nll", "brier", "classwise_ece", "aurc"])
    trainer = quiet_trainer(max_epochs=1, callbacks=[cb])
    trainer.fit(model, dm)
    logits, y = _collect(model, dm.val_dataloader())
    probs = logits.softmax(-1)
    ece, nll = ExpectedCalibrationError(), NegativeLogLikelihood()
    ece.update(probs, y)
    nll.update(probs, y)
    assert cb.last_results["val"]["ece"] == pytest.approx(float(ece.compute()), abs=1e-6)
    assert cb.last_results["val"]["nll"] == pytest.approx(float(nll.compute()), abs=1e-6)
    assert float(trainer.callback_metrics["val/calibration/ece"]) == pytest.approx(float(ece.compute()), abs=1e-6)
    assert "mutual_information" not in cb.last_results["val"]  # no member outputs -> no diversity


def test_calibration_metrics_error_names_the_contract():
    trainer = quiet_trainer(
        max_epochs=1,
        limit_train_batches=1,
        limit_val_batches=1,
        num_sanity_val_steps=0,
        callbacks=[CalibrationMetrics()],
    )
    with pytest.raises(ValueError, match="validation_step.*'member_logits'.*'target'"):
        trainer.fit(LossOnly(), DigitsDataModule())
    with pytest.raises(ValueError, match="unknown metric"):
        CalibrationMetrics(metrics=["ece", "accuracy"])


def test_calibration_metrics_with_ensemble_members_and_ood_dataloader():
    from lightning_ensembles import EnsembleClassifier

    model = EnsembleClassifier(backbone="mlp", num_members=3, backbone_kwargs={"in_features": 64, "out_features": 10})
    cb = CalibrationMetrics(metrics=["ece", "nll", "mutual_information", "disagreement"])
    trainer = quiet_trainer(callbacks=[cb])
    trainer.test(model, DigitsDataModule(ood_classes=(8, 9)), verbose=False)
    res = cb.last_results
    assert set(res) == {"test"}  # the OOD dataloader has no targets in the outputs: skipped
    assert res["test"]["mutual_information"] > 0 and 0 <= res["test"]["disagreement"] <= 1
    assert res["test"]["ece"] == pytest.approx(model.last_test_results[0]["ece"], abs=1e-6)


def test_temperature_scaling_callback_fits_applies_and_checkpoints(overfit_digits, tmp_path):
    model, dm, ts, _ = overfit_digits
    assert ts.kind == "logits" and ts.temperature > 1.0  # an overfitted net is overconfident
    # T is the NLL minimiser on the validation set of the final weights.
    logits, y = _collect(model, dm.val_dataloader())
    from lightning_ensembles.calibration import fit_temperature

    assert ts.temperature == pytest.approx(fit_temperature(logits, y), rel=1e-3)
    trainer = quiet_trainer(callbacks=[ts])
    trainer.test(model, dm, verbose=False)
    m = trainer.callback_metrics
    assert float(m["test/ts/ece_after"]) < float(m["test/ts/ece_before"])
    assert float(m["test/ts/nll_after"]) < float(m["test/ts/nll_before"])
    # Predict: calibrated probabilities appear in the returned dicts.
    out = trainer.predict(model, dm)
    expected = (torch.cat([o["logits"] for o in out]) / ts.temperature).softmax(-1)
    assert torch.allclose(torch.cat([o["calibrated_probs"] for o in out]), expected, atol=1e-5)
    # Checkpoint round trip: a fresh callback gets T back from the checkpoint.
    path = str(tmp_path / "model.ckpt")
    trainer.save_checkpoint(path)
    fresh = TemperatureScaling()
    with pytest.raises(RuntimeError, match="no temperature"):
        quiet_trainer(callbacks=[fresh]).test(model, dm, verbose=False)
    quiet_trainer(callbacks=[fresh]).test(model, dm, ckpt_path=path, verbose=False)
    assert fresh.temperature == pytest.approx(ts.temperature)


def test_conformal_callback_coverage_on_held_out_digits(overfit_digits):
    model, dm, _, cp = overfit_digits
    trainer = quiet_trainer(callbacks=[cp])
    trainer.test(model, dm, verbose=False)
    assert abs(cp.last_results["coverage"] - 0.9) <= 0.03, cp.last_results
    assert cp.last_results["set_size"] >= 1.0 - 0.1
    out = trainer.predict(model, dm)
    assert out[0]["prediction_set"].dtype == torch.bool and out[0]["prediction_set"].shape == out[0]["logits"].shape


@pytest.mark.parametrize("use_tensorboard", [False, True])
def test_reliability_diagram_png_after_test(tmp_path, use_tensorboard):
    import matplotlib.image as mpimg
    from lightning.pytorch.loggers import TensorBoardLogger

    torch.manual_seed(0)
    cb = ReliabilityDiagram(figsize=(5.0, 6.0), dpi=80)
    logger = TensorBoardLogger(str(tmp_path), name="tb") if use_tensorboard else False
    trainer = quiet_trainer(max_epochs=1, default_root_dir=str(tmp_path), callbacks=[cb], logger=logger)
    model = PlainClassifier(output_key="probs")
    trainer.fit(model, DigitsDataModule())
    trainer.test(model, DigitsDataModule(), verbose=False)
    names = [os.path.basename(p) for p in cb.paths]
    assert names == ["val_epoch0.png", "test.png"]
    image = mpimg.imread(cb.paths[-1])
    assert image.shape[:2] == (6 * 80, 5 * 80)
    assert image[..., :3].std() > 0.05  # not a blank canvas
    if use_tensorboard:
        assert cb.paths[-1].startswith(logger.log_dir)
        assert any(f.startswith("events.out.tfevents") for f in os.listdir(logger.log_dir))


# ------------------------------------------------------------------ ill-posed fits in the callback
def test_temperature_fit_on_five_samples_is_refused(overfit_digits):
    """The reported case: T fitted on 5 validation samples collapsed (2.3e-4) and tripled the test NLL."""
    import copy

    from lightning_ensembles.calibration import CalibrationWarning

    model, dm, ts, _ = overfit_digits
    fresh = TemperatureScaling()
    with pytest.warns(CalibrationWarning, match=r"only 5 samples.*min_samples=100.*kept T=1"):
        quiet_trainer(callbacks=[fresh], limit_val_batches=1).validate(
            model, DigitsDataModule(batch_size=5), verbose=False
        )
    assert fresh.temperature == 1.0 and not fresh.last_fit.accepted
    (res,) = quiet_trainer(callbacks=[fresh]).test(model, dm, verbose=False)
    assert res["test/ts/nll_after"] == pytest.approx(res["test/ts/nll_before"], abs=1e-6)  # identity, not 3x
    # A fitted callback keeps its previous temperature.
    fitted = copy.deepcopy(ts)
    with pytest.warns(CalibrationWarning, match="only 5 samples"):
        quiet_trainer(callbacks=[fitted], limit_val_batches=1).validate(
            model, DigitsDataModule(batch_size=5), verbose=False
        )
    assert fitted.temperature == ts.temperature and fitted.kind == ts.kind


def test_temperature_empty_validation_warns_and_keeps_the_previous_value(overfit_digits):
    import copy

    from lightning_ensembles.calibration import CalibrationWarning

    model, dm, ts, _ = overfit_digits
    fitted = copy.deepcopy(ts)
    with pytest.warns(CalibrationWarning, match="ran no validation epoch"):
        quiet_trainer(callbacks=[fitted], limit_val_batches=0).validate(model, dm, verbose=False)
    assert fitted.temperature == ts.temperature

    class NoTargets(PlainClassifier):
        def validation_step(self, batch, batch_idx):
            return {"logits": self(batch[0])}

    no_targets = NoTargets()
    no_targets.load_state_dict(model.state_dict())
    with pytest.warns(CalibrationWarning, match="no validation predictions with targets"):
        quiet_trainer(callbacks=[fitted]).validate(no_targets, dm, verbose=False)
    assert fitted.temperature == ts.temperature
    fresh = TemperatureScaling()
    with pytest.warns(CalibrationWarning, match="ran no validation epoch"):
        quiet_trainer(callbacks=[fresh], limit_val_batches=0).validate(model, dm, verbose=False)
    assert fresh.temperature == 1.0  # the identity: test and predict run uncalibrated, not crash


def test_temperature_out_of_bounds_is_refused_and_validation_nll_never_worse(overfit_digits):
    from lightning_ensembles.calibration import CalibrationWarning

    model, dm, ts, _ = overfit_digits
    assert 1.0 < ts.temperature < 20.0
    narrow = TemperatureScaling(bounds=(0.5, 1.0))  # the optimum lies above
    trainer = quiet_trainer(callbacks=[narrow])
    with pytest.warns(CalibrationWarning, match=r"outside the bounds \[0.5, 1\]"):
        (res,) = trainer.validate(model, dm, verbose=False)
    assert narrow.temperature == 1.0 and narrow.last_fit.optimum == pytest.approx(ts.temperature, rel=1e-3)
    assert res["val/ts/nll_after"] == pytest.approx(res["val/ts/nll_before"])
    (res,) = quiet_trainer(callbacks=[TemperatureScaling()]).validate(model, dm, verbose=False)
    assert res["val/ts/nll_after"] < res["val/ts/nll_before"]
    with pytest.raises(ValueError, match="bounds"):
        TemperatureScaling(bounds=(2.0, 1.0))
    with pytest.raises(ValueError, match="min_samples"):
        TemperatureScaling(min_samples=0)
