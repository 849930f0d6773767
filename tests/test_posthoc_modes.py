"""Post-hoc calibration callbacks in every Trainer mode: fit, stand-alone validate (inference mode), test, predict.

Values are checked against hand computations: calibrated probabilities are
``softmax(member_logits / T).mean(0)`` of the members, and the temperature of a stand-alone
``trainer.validate`` is :func:`fit_temperature` on the validation predictions computed here.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from conftest import quiet_trainer
from user_project.classifier import LitClassifier

from lightning_ensembles import EnsembleClassifier
from lightning_ensembles.calibration import CalibrationWarning, conformal_quantile, fit_temperature
from lightning_ensembles.callbacks import ConformalPrediction, Ensembling, TemperatureScaling
from lightning_ensembles.data import DigitsDataModule


def _x_y(loader):
    xs, ys = zip(*loader)
    return torch.cat(xs), torch.cat(ys)


def _member_logits(model, x):
    model.eval()
    with torch.no_grad():
        return model(x)  # EnsembleClassifier: (M, B, C)


@pytest.fixture(scope="module")
def trained_ensemble():
    """An EnsembleClassifier trained until its temperature lies inside the default bounds."""
    torch.manual_seed(0)
    model = EnsembleClassifier(
        backbone="mlp", num_members=3, lr=1e-2, backbone_kwargs={"in_features": 64, "out_features": 10}
    )
    dm = DigitsDataModule(batch_size=64)
    ts = TemperatureScaling()
    cp = ConformalPrediction(alpha=0.1, method="thr")
    trainer = quiet_trainer(max_epochs=3, num_sanity_val_steps=0, callbacks=[ts, cp])
    with warnings.catch_warnings():
        warnings.simplefilter("error", CalibrationWarning)  # a well-posed fit: no refusal
        trainer.fit(model, dm)
    assert ts.kind == "member_logits" and 0.05 < ts.temperature < 20 and ts.temperature != 1.0
    return model, dm, ts, cp


# ------------------------------------------------------------------ TemperatureScaling + EnsembleClassifier
def test_predict_with_ensemble_classifier_gives_member_wise_calibrated_probs(trained_ensemble):
    """Fitted on 'member_logits', applied to the 'member_probs' of EnsembleClassifier.predict_step."""
    model, dm, ts, _ = trained_ensemble
    out = quiet_trainer(callbacks=[ts]).predict(model, dm)  # used to raise "fitted on 'member_logits' ..."
    got = torch.cat([o["calibrated_probs"] for o in out])
    x, _ = _x_y(dm.predict_dataloader())
    expected = (_member_logits(model, x).double() / ts.temperature).softmax(-1).mean(0)
    torch.testing.assert_close(got.double(), expected, atol=2e-6, rtol=0)
    # Not the uncalibrated probabilities.
    assert (got - torch.cat([o["probs"] for o in out])).abs().max() > 1e-2


def test_test_stage_matches_hand_computation(trained_ensemble):
    model, dm, ts, _ = trained_ensemble
    trainer = quiet_trainer(callbacks=[ts])
    (res,) = trainer.test(model, dm, verbose=False)
    x, y = _x_y(dm.test_dataloader())
    probs = (_member_logits(model, x).double() / ts.temperature).softmax(-1).mean(0)
    nll = F.nll_loss(probs.clamp_min(1e-12).log(), y)
    assert res["test/ts/nll_after"] == pytest.approx(float(nll), abs=1e-5)


def test_standalone_validate_under_inference_mode_refits(trained_ensemble):
    model, dm, _, _ = trained_ensemble
    fresh = TemperatureScaling()
    trainer = quiet_trainer(callbacks=[fresh])
    assert trainer.predict_loop.inference_mode and trainer.validate_loop.inference_mode  # Lightning's default
    trainer.validate(model, dm, verbose=False)  # used to raise "element 0 of tensors does not require grad"
    x, y = _x_y(dm.val_dataloader())
    expected = fit_temperature(_member_logits(model, x), y, "member_logits")
    assert fresh.temperature == pytest.approx(expected, rel=1e-4)
    assert fresh.kind == "member_logits"
    # ... and the refitted callback applies at predict, again under inference mode.
    out = trainer.predict(model, dm)
    assert out[0]["calibrated_probs"].shape == out[0]["probs"].shape


class ProbsOnlyPredict(EnsembleClassifier):
    """An ensemble whose predict_step returns only the averaged probabilities."""

    def predict_step(self, batch, batch_idx, dataloader_idx=0):
        return {"probs": super().predict_step(batch, batch_idx, dataloader_idx)["probs"]}


def test_member_fit_refuses_averaged_probs_with_a_clear_message(trained_ensemble):
    model, dm, ts, _ = trained_ensemble
    probs_only = ProbsOnlyPredict(
        backbone="mlp", num_members=3, backbone_kwargs={"in_features": 64, "out_features": 10}
    )
    probs_only.load_state_dict(model.state_dict())
    with pytest.raises(ValueError, match=r"fitted on member logits.*only the averaged 'probs'.*'member_probs'"):
        quiet_trainer(callbacks=[ts]).predict(probs_only, dm)


# ------------------------------------------------------------------ TemperatureScaling + a plain user module
class DictClassifier(LitClassifier):
    """A user's module whose validation_step returns logits and predict_step returns probabilities."""

    def validation_step(self, batch, batch_idx):
        x, y = batch
        return {"logits": self(x), "target": y}

    def predict_step(self, batch, batch_idx):
        return {"probs": self(batch[0]).softmax(-1)}


@pytest.fixture(scope="module")
def trained_plain():
    torch.manual_seed(0)
    model, dm = DictClassifier(lr=2e-2), DigitsDataModule(batch_size=64)
    ts = TemperatureScaling()
    with warnings.catch_warnings():
        warnings.simplefilter("error", CalibrationWarning)  # a well-posed fit: no refusal
        quiet_trainer(max_epochs=4, num_sanity_val_steps=0, callbacks=[ts]).fit(model, dm)
    assert ts.kind == "logits" and 0.05 < ts.temperature < 20
    return model, dm, ts


def test_plain_module_fitted_on_logits_applies_to_predicted_probs(trained_plain):
    model, dm, ts = trained_plain
    out = quiet_trainer(callbacks=[ts]).predict(model, dm)  # used to raise "fitted on 'logits' ... 'probs'"
    x, _ = _x_y(dm.predict_dataloader())
    model.eval()
    with torch.no_grad():
        expected = (model(x).double() / ts.temperature).softmax(-1)
    torch.testing.assert_close(torch.cat([o["calibrated_probs"] for o in out]).double(), expected, atol=2e-6, rtol=0)


def test_plain_module_standalone_validate_refits(trained_plain):
    model, dm, ts = trained_plain
    fresh = TemperatureScaling()
    quiet_trainer(callbacks=[fresh]).validate(model, dm, verbose=False)
    x, y = _x_y(dm.val_dataloader())
    model.eval()
    with torch.no_grad():
        logits = model(x)
    assert fresh.temperature == pytest.approx(fit_temperature(logits, y), rel=1e-4)
    assert fresh.temperature == pytest.approx(ts.temperature, rel=1e-3)  # same weights as the end of fit


def test_unchanged_user_module_with_ensembling_in_every_mode():
    """tests/user_project's LitClassifier: its steps return nothing / a tensor; Ensembling gives member logits."""
    torch.manual_seed(0)
    module, dm = LitClassifier(lr=2e-2), DigitsDataModule(batch_size=64)
    ts, cp = TemperatureScaling(), ConformalPrediction(alpha=0.1, method="thr")
    ens = Ensembling(num_members=3)
    quiet_trainer(max_epochs=3, num_sanity_val_steps=0, callbacks=[ens, ts, cp]).fit(module, dm)
    assert ts.kind == "member_logits"

    # Stand-alone validate (inference mode) refits on the member logits.
    fresh_ts, fresh_cp = TemperatureScaling(), ConformalPrediction(alpha=0.1, method="thr")
    trainer = quiet_trainer(callbacks=[ens, fresh_ts, fresh_cp])
    trainer.validate(module, dm, verbose=False)
    x, y = _x_y(dm.val_dataloader())
    module.eval()
    with torch.no_grad():
        member_logits = module.model.ensemble(x)
    assert fresh_ts.temperature == pytest.approx(fit_temperature(member_logits, y, "member_logits"), rel=1e-4)
    scores = 1 - member_logits.softmax(-1).mean(0).gather(1, y[:, None]).squeeze(1)
    assert fresh_cp.threshold == pytest.approx(conformal_quantile(scores, 0.1), abs=1e-6)

    # Predict: the step returns a tensor, which cannot carry the results; the callbacks keep them.
    out = trainer.predict(module, dm)
    assert isinstance(out[0], torch.Tensor)
    xp, _ = _x_y(dm.predict_dataloader())
    with torch.no_grad():
        member_logits = module.model.ensemble(xp)
    expected = (member_logits.double() / fresh_ts.temperature).softmax(-1).mean(0)
    torch.testing.assert_close(torch.cat(fresh_ts.predictions).double(), expected, atol=2e-6, rtol=0)
    probs = member_logits.softmax(-1).mean(0)
    assert torch.equal(torch.cat(fresh_cp.predictions), (1 - probs) <= fresh_cp.threshold)


# ------------------------------------------------------------------ ConformalPrediction
def test_conformal_predict_and_standalone_validate_with_ensemble_classifier(trained_ensemble):
    model, dm, _, cp = trained_ensemble
    fresh = ConformalPrediction(alpha=0.1, method="thr")
    trainer = quiet_trainer(callbacks=[fresh])
    trainer.validate(model, dm, verbose=False)  # inference mode
    x, y = _x_y(dm.val_dataloader())
    probs = _member_logits(model, x).softmax(-1).mean(0)
    q = conformal_quantile(1 - probs.gather(1, y[:, None]).squeeze(1), 0.1)
    assert fresh.threshold == pytest.approx(q, abs=1e-6) and cp.threshold == pytest.approx(q, abs=1e-6)
    out = trainer.predict(model, dm)  # EnsembleClassifier returns 'probs' and 'member_probs'
    xp, _ = _x_y(dm.predict_dataloader())
    pp = _member_logits(model, xp).softmax(-1).mean(0)
    assert torch.equal(torch.cat([o["prediction_set"] for o in out]), (1 - pp) <= q)
    assert fresh.predictions == []  # the dicts carried the sets


def test_conformal_warns_on_empty_validation_and_keeps_threshold(trained_ensemble):
    model, dm, _, cp = trained_ensemble
    before = cp.threshold
    with pytest.warns(CalibrationWarning, match="ran no validation epoch"):
        quiet_trainer(callbacks=[cp], limit_val_batches=0).validate(model, dm, verbose=False)
    assert cp.threshold == before


def test_conformal_warns_when_too_few_samples_for_alpha(trained_ensemble):
    model, _, _, _ = trained_ensemble
    cp = ConformalPrediction(alpha=0.1, method="thr")
    with pytest.warns(CalibrationWarning, match="needs at least 9"):
        quiet_trainer(callbacks=[cp], limit_val_batches=1).validate(
            model, DigitsDataModule(batch_size=5), verbose=False
        )
    assert cp.threshold == float("inf")
