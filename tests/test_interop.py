"""torch-uncertainty interoperability: both layouts, both training directions, scalers, data module, docs."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

pytest.importorskip("torch_uncertainty")

from _fresh_python import import_error_output  # noqa: E402
from conftest import quiet_trainer  # noqa: E402
from torch_uncertainty.methods import batch_ensemble, mc_dropout  # noqa: E402
from torch_uncertainty.models.mlp import mimo_mlp, packed_mlp  # noqa: E402
from torch_uncertainty.post_processing import MatrixScaler, TemperatureScaler, VectorScaler  # noqa: E402
from torch_uncertainty.transforms import MIMOBatchFormat, RepeatTarget  # noqa: E402

from lightning_ensembles import DeepEnsemble, EnsembleClassifier  # noqa: E402
from lightning_ensembles.backbones import MLP  # noqa: E402
from lightning_ensembles.calibration import CalibrationWarning, fit_temperature, temperature_nll  # noqa: E402
from lightning_ensembles.ensembles.base import aggregate_probs  # noqa: E402
from lightning_ensembles.interop.torch_uncertainty import (  # noqa: E402
    DigitsTUDataModule,
    TUCalibration,
    TUScaler,
    as_tu_model,
    from_tu_model,
    tu_classification_routine,
)

ROOT = Path(__file__).parents[1]


@pytest.fixture(scope="module")
def digits():
    dm = DigitsTUDataModule(batch_size=64, eval_ood=True)
    dm.setup("fit")
    dm.setup("test")
    return dm


def _batch(dm, n=64):
    x, y = dm.train.tensors
    return x[:n], y[:n]


def _val_acc(ens, dm) -> float:
    ens.eval()
    with torch.no_grad():
        x, y = dm.val.tensors
        return float((aggregate_probs(ens(x)).argmax(-1) == y).float().mean())


def _adam(lr=1e-2):
    return lambda model: torch.optim.Adam(model.parameters(), lr=lr)


# ---------------------------------------------------------------- ours inside torch-uncertainty
def test_tu_layout_is_member_major():
    ens = DeepEnsemble(MLP(64, 10, hidden=(16,)), num_members=3).eval()
    x = torch.randn(5, 1, 8, 8)
    out = as_tu_model(ens)(x)
    # ClassificationRoutine reads "(m b) c -> b m c": row m * B + b is member m on example b.
    assert torch.equal(out.view(3, 5, 10), ens(x))
    assert torch.equal(out[2 * 5 + 4], ens.member(2)(x)[4])


def test_routine_training_loss_and_gradients_equal_ensemble_classifier(digits):
    ens = DeepEnsemble(MLP(64, 10, hidden=(32,)), num_members=3)
    routine = tu_classification_routine(ens, num_classes=10, optim_recipe=_adam())
    ours = EnsembleClassifier(ensemble=ens)  # the same ensemble, the same weights
    x, y = _batch(digits)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # self.log outside a Trainer
        tu_loss = routine.training_step((x, y))
        our_total = ours.training_step((x, y), 0)
    # Same loss (the member mean); EnsembleClassifier optimises the member sum (learning-rate convention).
    torch.testing.assert_close(tu_loss * 3, our_total)
    torch.testing.assert_close(tu_loss, F.cross_entropy(ens(x).flatten(0, 1), y.repeat(3)))
    first = next(ens.parameters())
    (tu_grad,) = torch.autograd.grad(tu_loss, [first])
    (our_grad,) = torch.autograd.grad(our_total, [first])
    torch.testing.assert_close(our_grad, 3 * tu_grad)


def test_fit_in_routine_then_metrics_agree_with_ensemble_classifier(digits):
    torch.manual_seed(0)
    ens = DeepEnsemble(MLP(64, 10, hidden=(32,)), num_members=3)
    routine = tu_classification_routine(ens, num_classes=10, optim_recipe=_adam(), eval_ood=True)
    # (torch-uncertainty's metrics keep inference tensors across Trainer runs: validate a fresh routine only)
    before = _val_acc(ens, digits)
    quiet_trainer(max_epochs=1, limit_train_batches=8).fit(routine, digits)
    assert routine.trainer.callback_metrics["val/cls/Acc"] > before + 0.3
    assert _val_acc(ens, digits) == pytest.approx(float(routine.trainer.callback_metrics["val/cls/Acc"]), abs=1e-6)

    tu_res = quiet_trainer().test(routine, digits, verbose=False)[0]
    our_res = quiet_trainer().test(EnsembleClassifier(ensemble=ens), digits, verbose=False)[0]
    for tu_key, our_key in (
        ("test/cls/Acc", "test/acc"),
        ("test/cls/NLL", "test/nll"),
        ("test/cls/Brier", "test/brier"),
        ("test/ens_MI", "test/mutual_information"),
        ("ood/AUROC", "test/ood_auroc_msp"),
    ):
        assert tu_res[tu_key] == pytest.approx(our_res[our_key], abs=2e-4), tu_key


def test_routine_refuses_ensembles_that_build_their_own_batches():
    from lightning_ensembles.ensembles.batch import BatchEnsemble

    ens = BatchEnsemble(MLP(4, 3, hidden=(8,)), num_members=2, batch_mode="split").train()
    with pytest.raises(ValueError, match="batch_mode='repeat'"):
        as_tu_model(ens)(torch.randn(4, 4))
    as_tu_model(ens).eval()(torch.randn(4, 4))  # evaluation is fine
    with pytest.raises(TypeError, match="lightning_ensembles Ensemble"):
        as_tu_model(nn.Linear(4, 3))
    with pytest.raises(ValueError, match="sets `is_ensemble` itself"):
        tu_classification_routine(DeepEnsemble(nn.Linear(4, 3), 2), 3, is_ensemble=False)


# ---------------------------------------------------------------- torch-uncertainty models as ours
def _packed(m=3):
    return packed_mlp(in_features=64, num_outputs=10, hidden_dims=[48], num_estimators=m, alpha=2, flatten_start_dim=1)


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_packed_outputs_are_tu_outputs_rearranged(mode):
    model = _packed().train(mode == "train")
    ens = from_tu_model(model)
    assert (ens.kind, ens.num_members) == ("packed", 3)
    x = torch.randn(7, 1, 8, 8)
    expected = model(x).view(3, 7, 10)  # "(m b) c -> m b c"
    torch.testing.assert_close(ens(x), expected)
    for i in range(3):
        torch.testing.assert_close(ens.member(i)(x), expected[i])


def test_packed_loss_equals_tu_routine_loss(digits):
    model = _packed()
    x, y = _batch(digits)
    tu_inputs, tu_targets = RepeatTarget(3)((x, y))
    tu_loss = F.cross_entropy(model(tu_inputs), tu_targets)
    clf = EnsembleClassifier(ensemble=from_tu_model(model))
    torch.testing.assert_close(clf.member_loss(clf(x), y), tu_loss)


def test_ensemble_classifier_trains_a_tu_packed_model(digits):
    torch.manual_seed(0)
    clf = EnsembleClassifier(ensemble=from_tu_model(_packed()), lr=1e-2)
    before = _val_acc(clf.ensemble, digits)
    quiet_trainer(max_epochs=1, limit_train_batches=8).fit(clf, digits)
    res = quiet_trainer().test(clf, digits, verbose=False)[0]
    assert res["test/acc"] > before + 0.3, (before, res["test/acc"])
    assert 0.5 < res["test/ood_auroc_msp"] <= 1.0  # dataloader 1 of the torch-uncertainty module is OOD


def test_checkpoint_of_a_tu_model_loads_with_weights_only(digits, tmp_path):
    clf = EnsembleClassifier(ensemble=from_tu_model(_packed()))
    trainer = quiet_trainer(max_epochs=1, limit_train_batches=2, limit_val_batches=1)
    trainer.fit(clf, digits)
    path = tmp_path / "tu.ckpt"
    trainer.save_checkpoint(path)
    torch.load(path, weights_only=True)  # tensors and plain data only
    restored = EnsembleClassifier.load_from_checkpoint(path, ensemble=from_tu_model(_packed()), weights_only=True)
    x = digits.test.tensors[0][:8]
    torch.testing.assert_close(restored.eval()(x), clf.eval()(x))


def test_mimo_training_batches_are_tu_mimo_batch_format(digits):
    model = mimo_mlp(in_features=64, num_outputs=10, hidden_dims=[32], num_estimators=3, flatten_start_dim=1).train()
    ens = from_tu_model(model, input_repetition=0.5)
    assert ens.kind == "mimo"
    x, y = _batch(digits, 20)
    torch.manual_seed(3)
    tu_inputs, tu_targets = MIMOBatchFormat(3, rho=0.5)((x, y))
    tu_out = model(tu_inputs)
    torch.manual_seed(3)
    out = ens(x)  # the same draws, each member's outputs put back in batch order
    assert out.shape == (3, 20, 10)
    for m in range(3):
        rows = slice(m * 20, (m + 1) * 20)
        torch.testing.assert_close(F.cross_entropy(out[m], y), F.cross_entropy(tu_out[rows], tu_targets[rows]))
        # member m's row for example tu_targets' j-th position is tu_out's row j
        torch.testing.assert_close(out[m].sort(0).values, tu_out[rows].sort(0).values)
    ens.eval()  # the wrapped model too
    assert not model.training
    torch.testing.assert_close(ens(x), model(x).view(3, 20, 10))
    torch.testing.assert_close(ens.member(2)(x), model(x).view(3, 20, 10)[2])


def test_mc_dropout_trains_one_sample_and_evaluates_m(digits):
    core = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Dropout(0.3), nn.Linear(32, 10))
    model = mc_dropout(core, num_estimators=4)
    ens = from_tu_model(model)
    assert (ens.kind, ens.num_members) == ("mc_dropout", 4)
    x, y = _batch(digits, 16)
    ens.train()
    assert ens(x).shape == (1, 16, 10) and ens.member_targets(y).shape == (1, 16)
    ens.eval()
    torch.manual_seed(1)
    out = ens(x)
    torch.manual_seed(1)
    torch.testing.assert_close(out, model(x).view(4, 16, 10))
    assert not torch.allclose(out[0], out[1])  # dropout stays on at evaluation
    with pytest.raises(NotImplementedError, match="fresh|new dropout masks"):
        ens.member(0)
    clf = EnsembleClassifier(ensemble=ens, lr=1e-2)
    quiet_trainer(max_epochs=1, limit_train_batches=4, limit_val_batches=2).fit(clf, digits)
    assert torch.isfinite(torch.tensor(quiet_trainer().validate(clf, digits, verbose=False)[0]["val/nll"]))


def test_batch_ensemble_members_see_the_whole_batch():
    core = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    model = batch_ensemble(core, num_estimators=2, convert_layers=True)  # splits the batch in training
    ens = from_tu_model(model).train()
    assert ens.kind == "batched"
    x = torch.randn(5, 6)
    out = ens(x)
    assert out.shape == (2, 5, 3)
    torch.testing.assert_close(out, model.eval()(x).view(2, 5, 3))  # repeated input = the eval forward


def test_tu_deep_ensemble_member_is_its_model():
    from torch_uncertainty.methods import deep_ensembles

    model = deep_ensembles(nn.Linear(4, 3), num_estimators=3)
    ens = from_tu_model(model)
    assert (ens.kind, ens.num_members) == ("deep", 3)
    x = torch.randn(5, 4)
    torch.testing.assert_close(ens(x), model(x).view(3, 5, 3))
    member = ens.member(2)
    assert isinstance(member, nn.Linear) and member is not model.core_models[2]
    torch.testing.assert_close(member(x), ens(x)[2])


def test_from_tu_model_refusals():
    with pytest.raises(ValueError, match="num_estimators=3"):
        from_tu_model(_packed(3), num_estimators=4)
    with pytest.raises(ValueError, match="cannot tell which kind"):
        from_tu_model(nn.Linear(3, 2))
    with pytest.raises(ValueError, match=r"M \* B = 8"):
        from_tu_model(nn.Linear(3, 2), num_estimators=2, kind="packed")(torch.randn(4, 3))


# ---------------------------------------------------------------- scalers
def _logits_targets(n=1500, c=5, sharp=3.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, c, generator=g) * 2
    target = torch.multinomial(logits.softmax(-1), 1, generator=g).squeeze(1)
    return sharp * logits, target


@pytest.mark.parametrize(
    "make",
    [TemperatureScaler, lambda: VectorScaler(num_classes=5), lambda: MatrixScaler(num_classes=5)],
    ids=["temperature", "vector", "matrix"],
)
def test_tu_scaler_adapter_equals_tu_own_fit_and_output(make):
    z, y = _logits_targets()
    reference = make()
    reference.fit(DataLoader(TensorDataset(z, y), batch_size=256), progress=False)
    adapter = TUScaler(make(), kind="logits").fit(z, y)
    for p, q in zip(adapter.params, reference.inv_temperature):
        torch.testing.assert_close(p, q)
    torch.testing.assert_close(adapter(z).exp(), reference(z).softmax(-1))
    assert F.nll_loss(adapter(z), y) < F.cross_entropy(z, y) - 0.05  # the fit calibrates


def test_tu_scaler_on_members_matches_member_temperature():
    z, y = _logits_targets(seed=1)
    members = torch.stack([z, z + torch.randn_like(z)])  # (M, B, C)
    adapter = TUScaler(TemperatureScaler(), kind="member_logits").fit(members, y)
    expected = fit_temperature(members, y, kind="member_logits")  # float64, strong-Wolfe L-BFGS
    # torch-uncertainty's L-BFGS settings (lr 0.1, no line search) in float32 stop a little short of it
    assert adapter.scaler.temperature[0].item() == pytest.approx(expected, rel=1e-2)
    nll = F.nll_loss(adapter(members.double()), y).item()
    assert nll == pytest.approx(temperature_nll(members, y, expected, kind="member_logits"), abs=1e-5)
    assert nll < temperature_nll(members, y, 1.0, kind="member_logits") - 0.05


def test_tu_scaler_refuses_too_few_samples_and_non_logit_scalers():
    from torch_uncertainty.post_processing import HistogramBinningScaler

    z, y = _logits_targets(n=20)
    cal = TUScaler(TemperatureScaler(), kind="logits")
    with pytest.warns(CalibrationWarning, match="only 20 samples"):
        cal.fit(z, y)
    assert cal.scaler.temperature[0].item() == 1.0
    with pytest.raises(TypeError, match="not logit maps"):
        TUScaler(HistogramBinningScaler())
    with pytest.raises(ValueError, match="num_classes=3"):
        TUScaler(VectorScaler(num_classes=3)).fit(*_logits_targets())


def _val_test_probs(clf, dm):
    clf.eval()
    with torch.no_grad():
        return [(aggregate_probs(clf(ds.tensors[0])), ds.tensors[1]) for ds in (dm.val, dm.test)]


def test_tu_calibration_callback_equals_tu_scaler_on_the_ensemble(digits, tmp_path):
    torch.manual_seed(0)
    clf = EnsembleClassifier(ensemble=DeepEnsemble(MLP(64, 10, hidden=(32,)), num_members=2), lr=1e-2)
    cal = TUCalibration(TemperatureScaler())
    quiet_trainer(max_epochs=1, callbacks=[cal]).fit(clf, digits)  # one fit, from T = 1 as the reference
    (p_val, y_val), (p_test, _) = _val_test_probs(clf, digits)
    reference = TemperatureScaler()
    reference.fit(DataLoader(TensorDataset(p_val.log(), y_val), batch_size=512), progress=False)
    assert cal.calibrator.scaler.temperature[0].item() == pytest.approx(reference.temperature[0].item(), rel=1e-3)

    loader = DataLoader(TensorDataset(digits.test.tensors[0]), batch_size=100)
    preds = quiet_trainer(callbacks=[cal]).predict(clf, loader)
    calibrated = torch.cat([p["calibrated_probs"] for p in preds])
    torch.testing.assert_close(calibrated, reference(p_test.log()).softmax(-1), atol=1e-5, rtol=1e-4)

    # The fitted map is plain tensors in the checkpoint state, and a fresh callback restores it.
    path = tmp_path / "cal.pt"
    torch.save(cal.state_dict(), path)
    restored = TUCalibration(TemperatureScaler())
    restored.load_state_dict(torch.load(path, weights_only=True))
    assert restored.calibrator.scaler.temperature[0].item() == cal.calibrator.scaler.temperature[0].item()


def test_tu_calibration_on_members_fits_the_averaged_prediction(digits):
    torch.manual_seed(0)
    clf = EnsembleClassifier(ensemble=DeepEnsemble(MLP(64, 10, hidden=(32,)), num_members=2), lr=1e-2)
    cal = TUCalibration(TemperatureScaler(), apply_to="members")
    quiet_trainer(max_epochs=1, limit_train_batches=4, callbacks=[cal]).fit(clf, digits)
    with torch.no_grad():
        x, y = digits.val.tensors
        member_logits = clf.eval()(x)
    expected = fit_temperature(member_logits, y, kind="member_logits")
    assert cal.calibrator.scaler.temperature[0].item() == pytest.approx(expected, rel=1e-2)


def test_tu_calibration_applies_a_prefitted_scaler_without_validation(digits):
    clf = EnsembleClassifier(ensemble=DeepEnsemble(MLP(64, 10, hidden=(16,)), num_members=2))
    (p_val, y_val), (p_test, _) = _val_test_probs(clf, digits)
    fitted = VectorScaler(num_classes=10)
    fitted.fit(DataLoader(TensorDataset(p_val.log(), y_val), batch_size=512), progress=False)
    with pytest.raises(ValueError, match="never fitted"):
        TUCalibration(VectorScaler(num_classes=10), refit=False)
    cal = TUCalibration(fitted, refit=False)
    loader = DataLoader(TensorDataset(digits.test.tensors[0]), batch_size=100)
    preds = quiet_trainer(callbacks=[cal]).predict(clf, loader)
    calibrated = torch.cat([p["calibrated_probs"] for p in preds])
    torch.testing.assert_close(calibrated, fitted(p_test.log()).softmax(-1), atol=1e-5, rtol=1e-4)
    assert not torch.allclose(calibrated, p_test, atol=1e-3)


# ---------------------------------------------------------------- data module, optional import, docs
def test_digits_tu_datamodule_serves_test_and_ood_loaders(digits):
    test, ood = digits.test_dataloader()
    x, y = next(iter(ood))
    assert set(y.unique().tolist()) <= {8, 9}
    assert not torch.isin(digits.train.tensors[1], torch.tensor([8, 9])).any()
    assert len(test.dataset) + len(ood.dataset) == 360  # the 20% test split of 1,797
    assert next(iter(digits.postprocess_dataloader()))[0].shape[1:] == (1, 8, 8)


def test_interop_without_the_extra_names_the_install():
    prelude = "import sys; sys.modules['torch_uncertainty'] = None\nimport lightning_ensembles.interop as interop\n"
    assert "pip install 'lightning-ensembles[interop]'" in import_error_output(prelude, "interop.from_tu_model")


def test_docs_snippets_run():
    text = (ROOT / "docs" / "interop.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert blocks
    scope: dict = {}
    exec(compile("\n".join(blocks), "docs/interop.md", "exec"), scope)  # noqa: S102
    assert scope["results"]["test/acc"] > 0.5
