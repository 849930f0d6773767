"""Temperature scaling and split-conformal prediction sets (functions and modules, no Trainer)."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from _models import fit_digits_mlp

from lightning_ensembles.calibration import (
    MIN_SAMPLES,
    TEMPERATURE_BOUNDS,
    CalibrationWarning,
    ConformalClassifier,
    TemperatureScaler,
    conformal_quantile,
    conformal_scores,
    fit_temperature,
    member_log_probs,
    safe_fit_temperature,
    scaled_log_probs,
)
from lightning_ensembles.calibration.conformal import min_calibration_samples
from lightning_ensembles.metrics import ExpectedCalibrationError


def _calibrated_logits(n=20000, c=10, m=None, seed=0):
    """Logits whose softmax is the true label distribution (T = 1 is optimal)."""
    g = torch.Generator().manual_seed(seed)
    shape = (n, c) if m is None else (m, n, c)
    z = torch.randn(*shape, generator=g) * 1.5
    probs = z.softmax(-1) if m is None else z.softmax(-1).mean(0)
    y = torch.multinomial(probs, 1, generator=g).squeeze(1)
    return z, y


@pytest.mark.parametrize("kind", ["logits", "member_logits", "probs"])
def test_temperature_recovers_five(kind):
    z, y = _calibrated_logits(m=3 if kind == "member_logits" else None)
    x = (5 * z).softmax(-1) if kind == "probs" else 5 * z
    t = fit_temperature(x, y, kind)
    assert abs(t - 5.0) / 5.0 < 0.05, t


def test_temperature_is_the_nll_minimiser():
    z, y = _calibrated_logits(4000, seed=1)
    x = 2.5 * z
    t = fit_temperature(x, y)
    grid = torch.linspace(1.0, 5.0, 801, dtype=torch.float64)
    lp = torch.log_softmax(x.double()[None] / grid[:, None, None], -1)
    nll = -lp.gather(2, y[None, :, None].expand(len(grid), -1, 1)).mean((1, 2))
    assert t == pytest.approx(float(grid[nll.argmin()]), abs=0.01)


def test_scaled_log_probs_members_match_manual_average():
    z = torch.randn(3, 7, 4)
    manual = (z / 2.0).softmax(-1).mean(0).log()
    assert torch.allclose(scaled_log_probs(z, 2.0, "member_logits"), manual, atol=1e-6)
    p = torch.randn(7, 4).softmax(-1)
    manual = p**0.5 / (p**0.5).sum(-1, keepdim=True)
    assert torch.allclose(scaled_log_probs(p, 2.0, "probs").exp(), manual, atol=1e-6)


@pytest.fixture(scope="module")
def digits_probs():
    """An overfitted digits MLP: logits on the train/val/test split used below."""
    from lightning_ensembles.data import load_digits_tensors

    torch.manual_seed(0)
    x, y = load_digits_tensors()
    x = x.flatten(1)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    tr, held = perm[:900], perm[900:]
    net = fit_digits_mlp(x[tr], y[tr], hidden=128, steps=200)
    with torch.no_grad():
        return net(x[held]), y[held]


def test_temperature_scaling_lowers_test_ece_of_overconfident_digits_model(digits_probs):
    logits, y = digits_probs
    val, test = slice(0, 450), slice(450, None)
    scaler = TemperatureScaler().fit(logits[val], y[val])
    assert float(scaler.temperature) > 1.0  # overconfident -> soften
    before, after = ExpectedCalibrationError(), ExpectedCalibrationError()
    before.update(logits[test].softmax(-1), y[test])
    after.update(scaler(logits[test]).exp(), y[test])
    assert float(after.compute()) < float(before.compute())
    assert "temperature" in scaler.state_dict()


# ------------------------------------------------------------------ conformal
def test_scores_match_torch_uncertainty():
    from torch_uncertainty.post_processing.conformal import ConformalClsAPS, ConformalClsRAPS

    p = (torch.randn(50, 6) * 2).softmax(-1)
    aps = ConformalClsAPS(alpha=0.1, model=None, randomized=False)
    raps = ConformalClsRAPS(alpha=0.1, model=None, randomized=False, penalty=0.2, regularization_rank=2)
    assert torch.allclose(conformal_scores(p, "aps", randomized=False), aps._calculate_all_labels(p), atol=1e-6)
    ours = conformal_scores(p, "raps", randomized=False, penalty=0.2, k_reg=2)
    assert torch.allclose(ours, raps._calculate_all_labels(p), atol=1e-6)
    assert torch.allclose(conformal_scores(p, "thr"), 1 - p)


def test_aps_scores_textbook():
    p = torch.tensor([[0.5, 0.2, 0.3]])
    # Classes ranked 0 (0.5), 2 (0.3), 1 (0.2): cumulative mass up to each class.
    assert torch.allclose(conformal_scores(p, "aps", randomized=False), torch.tensor([[0.5, 1.0, 0.8]]))
    assert torch.allclose(
        conformal_scores(p, "raps", randomized=False, penalty=0.1, k_reg=1), torch.tensor([[0.5, 1.2, 0.9]])
    )


def test_quantile_is_the_finite_sample_order_statistic():
    scores = torch.rand(99)
    k = math.ceil(100 * 0.9)
    assert conformal_quantile(scores, 0.1) == pytest.approx(float(np.sort(scores.numpy())[k - 1]))
    assert conformal_quantile(torch.rand(5), 0.1) == math.inf  # too few points for 90%


@pytest.mark.parametrize("method", ["thr", "aps", "raps"])
def test_conformal_coverage_on_held_out_digits(digits_probs, method):
    logits, y = digits_probs
    probs = logits.double().softmax(-1)
    n = len(y)
    g = torch.Generator().manual_seed(1)
    coverages, sizes = [], []
    for _ in range(100):  # marginal coverage is an average over calibration/test splits
        perm = torch.randperm(n, generator=g)
        cal, test = perm[: n // 2], perm[n // 2 :]
        cp = ConformalClassifier(alpha=0.1, method=method).fit(probs[cal], y[cal])
        sets = cp.predict_sets(probs[test])
        coverages.append(float(sets.gather(1, y[test, None]).double().mean()))
        sizes.append(float(sets.sum(1).double().mean()))
    assert abs(np.mean(coverages) - 0.9) <= 0.03, np.mean(coverages)
    assert 0.5 < np.mean(sizes) < 10


def test_bad_inputs():
    with pytest.raises(ValueError, match="alpha"):
        ConformalClassifier(alpha=1.5)
    with pytest.raises(ValueError, match="method"):
        ConformalClassifier(method="lac")
    with pytest.raises(RuntimeError, match="fit"):
        ConformalClassifier().predict_sets(torch.rand(3, 2).softmax(-1))
    with pytest.raises(ValueError, match="sum to 1"):
        ConformalClassifier().fit(torch.rand(4, 3), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="kind"):
        fit_temperature(torch.randn(4, 3), torch.zeros(4, dtype=torch.long), kind="log_probs")
    with pytest.raises(ValueError, match=r"\(M, B, C\)"):
        fit_temperature(torch.randn(4, 3), torch.zeros(4, dtype=torch.long), kind="member_logits")
    with pytest.raises(ValueError, match="NaN"):
        fit_temperature(torch.tensor([[0.0, float("nan")]]), torch.zeros(1, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\[0, 2\]"):
        fit_temperature(torch.randn(4, 3), torch.full((4,), 3))


# ------------------------------------------------------------------ ill-posed temperature fits
def _separable(n=200, c=5, seed=0):
    """Logits that classify every sample correctly: the NLL keeps falling as T -> 0."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, c, (n,), generator=g)
    z = 0.05 * torch.randn(n, c, generator=g) + 0.5 * torch.nn.functional.one_hot(y, c)
    assert bool((z.argmax(-1) == y).all())
    return z, y


def test_five_samples_keep_the_previous_temperature_with_a_warning():
    z, y = _separable(5)
    assert fit_temperature(z, y) < 1e-3  # the bare minimiser runs off towards 0 (the reported collapse)
    with pytest.warns(CalibrationWarning, match=r"only 5 samples.*min_samples=100"):
        fit = safe_fit_temperature(z, y)
    assert fit.temperature == 1.0 and not fit.accepted and math.isnan(fit.optimum)
    scaler = TemperatureScaler()
    scaler.temperature.fill_(2.0)  # a previous fit
    with pytest.warns(CalibrationWarning, match="only 5 samples"):
        scaler.fit(z, y)
    assert float(scaler.temperature) == 2.0
    assert MIN_SAMPLES == 100 and TEMPERATURE_BOUNDS == (0.05, 20.0)  # the documented defaults


def test_optimum_outside_the_bounds_keeps_a_safe_value():
    z, y = _separable(300)
    with pytest.warns(CalibrationWarning, match=r"outside the bounds \[0.05, 20\]"):
        fit = safe_fit_temperature(z, y, fallback=0.5)
    assert fit.optimum < 0.05 and fit.temperature == 0.5  # the previous value (better than 1 here)
    assert fit.nll < fit.nll_identity
    # Uninformative logits: T -> infinity. A previous T = 0.5 would sharpen noise: worse than T = 1, so 1.
    g = torch.Generator().manual_seed(1)
    noise, y = torch.randn(300, 5, generator=g), torch.randint(0, 5, (300,), generator=g)
    with pytest.warns(CalibrationWarning, match="outside the bounds"):
        fit = safe_fit_temperature(noise, y, fallback=0.5)
    assert fit.optimum > 20 and fit.temperature == 1.0 and fit.nll == fit.nll_identity
    # Wider bounds accept it.
    assert safe_fit_temperature(*_separable(300), bounds=(1e-4, 1e4)).accepted


def test_fit_never_worse_than_identity(monkeypatch):
    import lightning_ensembles.calibration.temperature as temperature

    z, y = _calibrated_logits(2000)  # T = 1 is optimal
    monkeypatch.setattr(temperature, "fit_temperature", lambda *a, **k: 0.06)  # a failed optimisation
    with pytest.warns(CalibrationWarning, match="higher NLL"):
        fit = temperature.safe_fit_temperature(z, y, fallback=3.0)
    assert fit.temperature == 1.0 and fit.nll == fit.nll_identity


def test_empty_fit_set_keeps_the_fallback():
    with pytest.warns(CalibrationWarning, match="no samples"):
        fit = safe_fit_temperature(torch.empty(0, 3), torch.empty(0, dtype=torch.long), fallback=1.7)
    assert fit.temperature == 1.7 and fit.num_samples == 0


def test_well_posed_fit_is_accepted_silently_and_improves_nll():
    z, y = _calibrated_logits(2000)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fit = safe_fit_temperature(3 * z, y)
    assert fit.accepted and fit.temperature == pytest.approx(fit_temperature(3 * z, y))
    assert fit.nll < fit.nll_identity


@pytest.mark.parametrize("kind", ["logits", "member_logits", "probs"])
def test_fit_temperature_inside_inference_mode(kind):
    """Lightning's evaluation loops run under torch.inference_mode: the fit must still get gradients."""
    z, y = _calibrated_logits(2000, m=3 if kind == "member_logits" else None)
    x = (2 * z).softmax(-1) if kind == "probs" else 2 * z
    expected = fit_temperature(x, y, kind)
    with torch.inference_mode():
        xi, yi = x.clone(), y.clone()  # inference tensors
        assert xi.is_inference()
        got = fit_temperature(xi, yi, kind)
        scaler = TemperatureScaler(kind=kind).fit(xi, yi)
    assert got == pytest.approx(expected, rel=1e-9)
    assert float(scaler.temperature) == pytest.approx(expected, rel=1e-6)
    assert not scaler.temperature.is_inference()


def test_member_log_probs_scale_exactly_like_member_logits():
    z = torch.randn(4, 50, 7) * 5
    for t in (0.3, 1.0, 2.5, 19.0):
        from_logits = scaled_log_probs(z.double(), t, "member_logits")
        from_probs = scaled_log_probs(member_log_probs(z.double().softmax(-1)), t, "member_logits")
        torch.testing.assert_close(from_probs, from_logits, atol=1e-10, rtol=0)


def test_conformal_warns_when_the_threshold_is_infinite():
    assert min_calibration_samples(0.1) == 9 and min_calibration_samples(0.05) == 19
    p = torch.randn(8, 4).softmax(-1)
    with pytest.warns(CalibrationWarning, match="needs at least 9"):
        cp = ConformalClassifier(alpha=0.1, method="thr").fit(p, torch.zeros(8, dtype=torch.long))
    assert bool(cp.predict_sets(p).all())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ConformalClassifier(alpha=0.1, method="thr").fit(
            torch.randn(9, 4).softmax(-1), torch.zeros(9, dtype=torch.long)
        )
