"""Temperature scaling and split-conformal prediction sets (functions and modules, no Trainer)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lightning_ensembles.calibration import (
    ConformalClassifier,
    TemperatureScaler,
    conformal_quantile,
    conformal_scores,
    fit_temperature,
    scaled_log_probs,
)
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
    net = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10))
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(200):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(net(x[tr]), y[tr]).backward()
        opt.step()
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
