"""Post-hoc calibrators beyond temperature: formulas, references (scikit-learn), kinds, checkpoints, callback."""

from __future__ import annotations

import io
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import quiet_trainer

from lightning_ensembles import EnsembleClassifier
from lightning_ensembles.calibration import (
    CalibrationWarning,
    DirichletCalibration,
    HistogramBinning,
    IsotonicCalibration,
    MatrixScaling,
    TemperatureScaler,
    VectorScaling,
)
from lightning_ensembles.calibration.binning import interp
from lightning_ensembles.callbacks import PosthocCalibration
from lightning_ensembles.data import DigitsDataModule

ALL = (VectorScaling, MatrixScaling, DirichletCalibration, HistogramBinning, IsotonicCalibration)


def _miscalibrated(n=4000, c=4, seed=0):
    """Logits with a known per-class miscalibration: the true model is softmax(z), we observe z * scale + shift."""
    g = torch.Generator().manual_seed(seed)
    z = 1.5 * torch.randn(n, c, generator=g, dtype=torch.float64)
    y = torch.multinomial(z.softmax(-1), 1, generator=g).squeeze(1)
    scale = torch.linspace(0.4, 3.0, c, dtype=torch.float64)
    shift = torch.linspace(-1.0, 1.0, c, dtype=torch.float64)
    return z * scale + shift, y, z, scale, shift


def _nll(log_probs, y):
    return float(F.nll_loss(log_probs, y))


def test_vector_scaling_recovers_a_known_per_class_miscalibration():
    x, y, _, scale, shift = _miscalibrated(n=20000)
    vs = VectorScaling(4, reg_lambda=0, reg_mu=0).fit(x, y)  # unpenalised: the exact inverse map
    # softmax(w * (z * scale + shift) + b) = softmax(z) needs w = 1/scale and b = -shift/scale (+ a constant)
    assert torch.allclose(vs.weight.double(), 1 / scale, rtol=0.08)
    b = vs.bias.double() + shift / scale
    assert float((b - b.mean()).abs().max()) < 0.15


@pytest.mark.parametrize("cls", ALL)
def test_calibrators_lower_held_out_nll_of_a_miscalibrated_model(cls):
    x, y, _, _, _ = _miscalibrated()
    xt, yt, _, _, _ = _miscalibrated(seed=1)
    cal = cls(4).fit(x, y)
    before = _nll(F.log_softmax(xt, -1), yt)
    after = _nll(cal(xt), yt)
    assert after < before - 0.02, (before, after)
    assert torch.allclose(cal(xt).exp().sum(-1), torch.ones(len(yt), dtype=torch.float64))


def test_matrix_beats_temperature_when_the_miscalibration_is_per_class():
    x, y, _, _, _ = _miscalibrated()
    xt, yt, _, _, _ = _miscalibrated(seed=1)
    ts = TemperatureScaler().fit(x, y)
    ms = MatrixScaling(4).fit(x, y)
    assert _nll(ms(xt), yt) < _nll(ts(xt), yt) - 0.01


def test_penalty_keeps_maps_near_identity_on_a_small_separable_validation_set():
    # 150 samples the model classifies perfectly: unpenalised scales run off
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 3, (300,), generator=g)
    x = 3 * torch.nn.functional.one_hot(y, 3).double() + 0.5 * torch.randn(300, 3, generator=g, dtype=torch.float64)
    free = VectorScaling(3, reg_lambda=0, reg_mu=0, min_samples=10).fit(x[:150], y[:150])
    held = VectorScaling(3, min_samples=10).fit(x[:150], y[:150])
    assert float(free.weight.max()) > 3 * float(held.weight.max())
    y_test = torch.where(
        torch.rand(150, generator=g) < 0.05, (y[150:] + 1) % 3, y[150:]
    )  # a few errors, as in real data
    assert _nll(held(x[150:]), y_test) < _nll(free(x[150:]), y_test)
    # the penalty, by formula: lambda / C sum (w - 1)^2 + mu / C sum b^2
    w, b = torch.tensor([2.0, 1.0, 0.5], dtype=torch.float64), torch.tensor([1.0, 0.0, -1.0], dtype=torch.float64)
    assert float(held._penalty(w, b)) == pytest.approx(0.1 / 3 * 1.25 + 0.1 / 3 * 2)
    ms = MatrixScaling(3)
    W = torch.tensor([[2.0, 1.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]], dtype=torch.float64)
    assert float(ms._penalty(W, torch.zeros(3, dtype=torch.float64))) == pytest.approx(0.1 / 3 * 1 + 0.1 / 6 * 1)


def test_dirichlet_is_matrix_scaling_of_log_probs_and_exact_across_kinds():
    x, y, _, _, _ = _miscalibrated()
    dc_logits = DirichletCalibration(4, kind="logits").fit(x, y)
    dc_probs = DirichletCalibration(4, kind="probs").fit(x.softmax(-1), y)
    assert torch.allclose(dc_logits.weight, dc_probs.weight, atol=1e-5)
    ms = MatrixScaling(4).fit(F.log_softmax(x, -1), y)  # matrix scaling on log p is the same map
    assert torch.allclose(ms.weight, dc_logits.weight, atol=1e-5)
    expected = F.log_softmax(F.log_softmax(x, -1) @ dc_logits.weight.double().T + dc_logits.bias.double(), -1)
    assert torch.allclose(dc_logits(x), expected)


def test_member_kind_maps_every_member_then_averages():
    g = torch.Generator().manual_seed(0)
    z = 2 * torch.randn(3, 500, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 4, (500,), generator=g)
    vs = VectorScaling(4, kind="member_logits").fit(z, y)
    w, b = vs.weight.double(), vs.bias.double()
    expected = F.softmax(z * w + b, -1).mean(0).log()
    assert torch.allclose(vs(z), expected)
    # with one member, member kind and logits kind are the same fit
    one = VectorScaling(4, kind="member_logits").fit(z[:1], y)
    single = VectorScaling(4, kind="logits").fit(z[0], y)
    assert torch.allclose(one.weight, single.weight, atol=1e-5)
    iso = IsotonicCalibration(4, kind="member_logits").fit(z, y)
    pooled = IsotonicCalibration(4, kind="logits").fit(z.reshape(-1, 4), y.repeat(3))
    assert torch.allclose(iso(z), torch.logsumexp(torch.stack([pooled(m) for m in z]), 0) - np.log(3))


def test_isotonic_matches_scikit_learn_per_class():
    from sklearn.isotonic import IsotonicRegression

    x, y, _, _, _ = _miscalibrated(n=1500)
    xt, _, _, _, _ = _miscalibrated(n=500, seed=3)
    iso = IsotonicCalibration(4, clip=1e-6).fit(x, y)
    p, pt = x.softmax(-1).numpy(), xt.softmax(-1).double()
    mapped = []
    for k in range(4):
        ref = IsotonicRegression(y_min=0, y_max=1, out_of_bounds="clip").fit(p[:, k], (y.numpy() == k).astype(float))
        mapped.append(np.clip(ref.predict(pt[:, k].numpy()), 1e-6, 1))
        assert np.allclose(iso._map_class(pt[:, k], k).numpy(), ref.predict(pt[:, k].numpy()), atol=1e-12)
    mapped = np.stack(mapped, -1)
    assert np.allclose(iso(xt).exp().numpy(), mapped / mapped.sum(-1, keepdims=True), atol=1e-10)


def test_interp_matches_numpy():
    xp, fp = (
        torch.tensor([0.1, 0.3, 0.3, 0.8], dtype=torch.float64),
        torch.tensor([0.0, 0.2, 0.4, 1.0], dtype=torch.float64),
    )
    x = torch.linspace(0, 1, 101, dtype=torch.float64)
    assert np.allclose(interp(x, xp, fp).numpy(), np.interp(x.numpy(), xp.numpy(), fp.numpy()))


def test_histogram_binning_values_are_bin_frequencies():
    # class 0 probability 0.05 (bin 0) for 4 samples, 1 of them class 0; 0.95 (last bin) for 2 samples, both class 0
    p0 = torch.tensor([0.05, 0.05, 0.05, 0.05, 0.95, 0.95], dtype=torch.float64)
    probs = torch.stack([p0, 1 - p0], -1)
    y = torch.tensor([0, 1, 1, 1, 0, 0])
    hb = HistogramBinning(2, kind="probs", n_bins=10, min_samples=1).fit(probs, y)
    assert hb.values[0, 0] == 0.25 and hb.values[0, 9] == 1.0 and hb.values[1, 9] == 0.75
    assert hb.values[0, 4] == pytest.approx(0.45)  # empty bin: its midpoint


@pytest.mark.parametrize("cls", ALL)
def test_fitted_state_round_trips_through_weights_only_load(cls):
    x, y, _, _, _ = _miscalibrated(n=800)
    cal = cls(4).fit(x, y)
    buf = io.BytesIO()
    torch.save(cal.state_dict(), buf)
    buf.seek(0)
    fresh = cls(4)
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    assert torch.equal(fresh(x), cal(x))


@pytest.mark.parametrize("cls", ALL)
def test_too_few_samples_keeps_the_identity_with_a_warning(cls):
    x, y, _, _, _ = _miscalibrated(n=30)
    with pytest.warns(CalibrationWarning, match="only 30 samples"):
        cal = cls(4).fit(x, y)
    if cls in (HistogramBinning, IsotonicCalibration):
        with pytest.raises(RuntimeError, match="not fitted"):
            cal(x)
    else:
        assert torch.allclose(cal(x), F.log_softmax(x, -1))


def test_bad_inputs_name_the_problem():
    with pytest.raises(ValueError, match=r"member_logits must have shape \(M, B, C\)"):
        VectorScaling(3, kind="member_logits").fit(torch.randn(10, 3), torch.zeros(10, dtype=torch.long))
    with pytest.raises(ValueError, match="built for 3 classes"):
        VectorScaling(3).fit(torch.randn(200, 4), torch.zeros(200, dtype=torch.long))
    with pytest.raises(ValueError, match="`kind`"):
        MatrixScaling(3, kind="logprobs")


@pytest.mark.parametrize("apply_to", ["ensemble", "members"])
@pytest.mark.parametrize("method", ["matrix", "isotonic"])
def test_callback_fits_applies_and_restores_from_a_weights_only_checkpoint(tmp_path, method, apply_to):
    torch.manual_seed(0)
    dm = DigitsDataModule(batch_size=64)
    model = EnsembleClassifier(
        backbone="mlp", num_members=2, lr=2e-2, backbone_kwargs={"in_features": 64, "out_features": 10}
    )
    cal = PosthocCalibration(method=method, apply_to=apply_to)
    trainer = quiet_trainer(max_epochs=3, num_sanity_val_steps=0, callbacks=[cal])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CalibrationWarning)
        trainer.fit(model, dm)
    assert (
        trainer.callback_metrics[f"val/cal_{method}/nll_after"]
        <= trainer.callback_metrics[f"val/cal_{method}/nll_before"]
    )
    out = trainer.predict(model, dm.test_dataloader())
    # predict returns member probabilities: the map applies exactly where it was fitted on logits
    x, y = next(iter(dm.test_dataloader()))
    with torch.no_grad():
        z = model(x)
    values = z.softmax(-1).mean(0).double() if apply_to == "ensemble" else z.log_softmax(-1).double()
    assert torch.allclose(out[0]["calibrated_probs"].double(), cal.calibrator(values).exp(), atol=1e-5)
    path = tmp_path / "c.ckpt"
    trainer.save_checkpoint(path)
    ckpt = torch.load(path, weights_only=True)
    fresh = PosthocCalibration(method=method, apply_to=apply_to)
    fresh.load_state_dict(ckpt["callbacks"][cal.state_key])
    assert torch.allclose(fresh.calibrator(values).exp(), cal.calibrator(values).exp())
    with pytest.raises(ValueError, match="configure the callback as it was saved"):
        PosthocCalibration(method="vector", apply_to=apply_to).load_state_dict(ckpt["callbacks"][cal.state_key])
