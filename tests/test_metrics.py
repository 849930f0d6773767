"""Metrics against torchmetrics / torch-uncertainty and against numpy textbook definitions written here."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from _metric_runs import run
from _models import fit_digits_mlp
from scipy.stats import norm as scipy_norm
from sklearn.metrics import average_precision_score, roc_auc_score

from lightning_ensembles.metrics.calibration import (
    AdaptiveCalibrationError,
    ClasswiseCalibrationError,
    ExpectedCalibrationError,
)
from lightning_ensembles.metrics.diversity import Disagreement, MutualInformation, PredictiveEntropy
from lightning_ensembles.metrics.ood import FPR95, OODAUPR, OODAUROC
from lightning_ensembles.metrics.presets import ClassificationMetrics, RegressionMetrics
from lightning_ensembles.metrics.regression import GaussianNLL, IntervalCoverage, QuantileCalibrationError
from lightning_ensembles.metrics.scoring import BrierScore, NegativeLogLikelihood
from lightning_ensembles.metrics.selective import AURC, CoverageAtRisk

TOL = 1e-6


# ------------------------------------------------------------------ prediction sets
def _random_preds(n=3000, c=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, c, generator=g) * 3
    target = torch.randint(0, c, (n,), generator=g)
    # Make it better than chance so accuracy varies across bins.
    target = torch.where(torch.rand(n, generator=g) < 0.5, logits.argmax(-1), target)
    return logits.softmax(-1), target


@pytest.fixture(scope="module")
def trained_members():
    """Held-out digits member probabilities (M=3, B, 10) of small, deliberately overfitted MLPs, and labels."""
    from lightning_ensembles.data import load_digits_tensors

    x, y = load_digits_tensors()
    x = x.flatten(1)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    tr, te = perm[:1200], perm[1200:]
    members = []
    for seed in range(3):
        torch.manual_seed(seed)
        net = fit_digits_mlp(x[tr], y[tr], hidden=64, steps=120)
        with torch.no_grad():
            members.append(net(x[te]).softmax(-1))
    return torch.stack(members), y[te]


@pytest.fixture(scope="module")
def trained(trained_members):
    """Ensemble probabilities of the trained members (overconfident, with tied confidences)."""
    member_probs, y = trained_members
    return member_probs.mean(0), y


@pytest.fixture(params=["random", "trained"])
def preds(request, trained):
    return _random_preds() if request.param == "random" else trained


def _members(m=4, n=500, c=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(m, n, c, generator=g) * 2).softmax(-1)


# ------------------------------------------------------------------ numpy textbook references
def np_bins(conf, n_bins):
    """Equal-width bins [lo, hi) with confidence 1.0 in an extra top bin (documented convention)."""
    edges = np.linspace(0, 1, n_bins + 1, dtype=np.float32)
    return np.searchsorted(edges, conf, side="right") - 1


def np_ce(conf, correct, idx, nbins_total, norm):
    n = len(conf)
    vals, weights = [], []
    for b in range(nbins_total):
        sel = idx == b
        if sel.any():
            vals.append(abs(correct[sel].mean() - conf[sel].mean()))
            weights.append(sel.sum() / n)
    vals, weights = np.array(vals), np.array(weights)
    return {"l1": (vals * weights).sum(), "l2": math.sqrt((vals**2 * weights).sum()), "max": vals.max()}[norm]


def np_ece(p, y, n_bins=15, norm="l1"):
    conf, pred = p.max(1), p.argmax(1)
    return np_ce(conf.astype(np.float64), (pred == y).astype(np.float64), np_bins(conf, n_bins), n_bins + 1, norm)


def np_ace(conf, correct, n_bins):
    order = np.argsort(conf, kind="stable")
    conf, correct = conf[order], correct[order]
    # Tied confidences share their group's accuracy (documented: the value ignores the order of ties).
    _, group = np.unique(conf, return_inverse=True)
    correct = (np.bincount(group, weights=correct) / np.bincount(group))[group]
    total = 0.0
    for chunk in np.array_split(np.arange(len(conf)), n_bins):
        total += len(chunk) / len(conf) * abs(correct[chunk].mean() - conf[chunk].mean())
    return total


def np_aurc(p, y):
    """Right-endpoint area over the operating points ``conf >= t``, one per distinct confidence t."""
    conf, err = p.max(1), (p.argmax(1) != y).astype(float)
    area, covered = 0.0, 0.0
    for t in np.sort(np.unique(conf))[::-1]:
        sel = conf >= t
        area += (sel.mean() - covered) * err[sel].mean()
        covered = sel.mean()
    return area


def np_fpr_at(scores, labels, recall=0.95):
    # Scan thresholds t over the distinct scores from high to low; predict OOD when score >= t.
    for t in np.sort(np.unique(scores))[::-1]:
        flagged = scores >= t
        if flagged[labels == 1].mean() >= recall:
            return flagged[labels == 0].mean()
    return float("nan")


def np_entropy(p):
    with np.errstate(divide="ignore", invalid="ignore"):
        return -np.nansum(np.where(p > 0, p * np.log(p), 0.0), axis=-1)


# ------------------------------------------------------------------ hand-checkable values (REFERENCES.md)
def test_hand_values():
    t = torch.tensor
    assert run(BrierScore(), t([[0.8, 0.2], [0.3, 0.7]]), t([0, 1])) == pytest.approx(0.13, abs=1e-6)
    assert run(NegativeLogLikelihood(), t([[0.7, 0.3], [0.4, 0.6]]), t([0, 1])) == pytest.approx(0.4338, abs=1e-4)
    assert run(AURC(), t([[0.7, 0.3], [0.6, 0.4], [0.8, 0.2]]), t([0, 1, 0])) == pytest.approx(1 / 9, abs=1e-6)
    assert run(FPR95(), t([0.9, 0.8, 0.7, 0.6, 0.4, 0.2, 0.1]), t([1, 0, 1, 0, 0, 1, 0])) == pytest.approx(0.75)
    p = t([[0.95, 0.05], [0.85, 0.15], [0.65, 0.35], [0.55, 0.45], [0.25, 0.75], [0.15, 0.85]])
    for bins in (10, 15):
        assert run(ExpectedCalibrationError(n_bins=bins), p, t([0, 1, 0, 0, 1, 0])) == pytest.approx(0.4667, abs=1e-4)


# ------------------------------------------------------------------ calibration errors
@pytest.mark.parametrize("norm", ["l1", "l2", "max"])
def test_ece_matches_torchmetrics_and_numpy(preds, norm):
    from torchmetrics.classification import MulticlassCalibrationError

    p, y = preds
    ours = run(ExpectedCalibrationError(10, n_bins=15, norm=norm), p, y)
    ref = MulticlassCalibrationError(10, n_bins=15, norm=norm)
    ref.update(p, y)
    assert ours == pytest.approx(float(ref.compute()), abs=TOL)
    assert ours == pytest.approx(np_ece(p.numpy(), y.numpy(), 15, norm), abs=TOL)
    assert 0 < ours < 1


def test_ece_keeps_constant_memory():
    m = ExpectedCalibrationError(n_bins=15)
    sizes = {name: getattr(m, name).numel() for name in ("count", "conf_sum", "acc_sum")}
    p, y = _random_preds(5000)
    m.update(p, y)
    assert {name: getattr(m, name).numel() for name in sizes} == sizes == {"count": 16, "conf_sum": 16, "acc_sum": 16}


def test_adaptive_matches_torch_uncertainty_and_numpy(preds):
    from torch_uncertainty.metrics.classification import AdaptiveCalibrationError as TUACE

    p, y = preds
    ours = run(AdaptiveCalibrationError(10, n_bins=15), p, y, batches=7)
    ref = TUACE(task="multiclass", num_classes=10, num_bins=15)
    ref.update(p, y)
    conf, pred = p.max(1)
    assert ours == pytest.approx(np_ace(conf.double().numpy(), (pred == y).double().numpy(), 15), abs=TOL)
    if conf.unique().numel() == conf.numel():  # torch-uncertainty splits tied groups in input order
        assert ours == pytest.approx(float(ref.compute()), abs=TOL)


def test_adaptive_classwise_is_nixon_ace():
    p, y = _random_preds(1000, 5)
    ours = run(AdaptiveCalibrationError(n_bins=10, top_label=False), p, y, batches=3)
    onehot = np.eye(5)[y.numpy()]
    ref = np.mean([np_ace(p[:, k].double().numpy(), onehot[:, k], 10) for k in range(5)])
    assert ours == pytest.approx(ref, abs=TOL)


def test_classwise_matches_torch_uncertainty_and_numpy(preds):
    from torch_uncertainty.metrics.classification import ClasswiseCalibrationError as TUCW

    p, y = preds
    ours = run(ClasswiseCalibrationError(10, n_bins=15), p, y, batches=5)
    ref = TUCW(num_classes=10, num_bins=15)
    ref.update(p, y)
    assert ours == pytest.approx(float(ref.compute()), abs=TOL)
    onehot = np.eye(10)[y.numpy()]
    pn = p.numpy()
    per_class = [np_ce(pn[:, k].astype(np.float64), onehot[:, k], np_bins(pn[:, k], 15), 16, "l1") for k in range(10)]
    assert ours == pytest.approx(np.mean(per_class), abs=TOL)


# ------------------------------------------------------------------ scoring rules and selective prediction
def test_nll_brier_match_torch_uncertainty_and_numpy(preds):
    from torch_uncertainty.metrics.classification import BrierScore as TUBrier
    from torch_uncertainty.metrics.classification import CategoricalNLL

    p, y = preds
    pn, yn = p.double().numpy(), y.numpy()
    nll = run(NegativeLogLikelihood(), p, y, batches=4)
    brier = run(BrierScore(), p, y, batches=4)
    assert nll == pytest.approx(np.mean(-np.log(np.maximum(pn[np.arange(len(yn)), yn], 1e-12))), abs=TOL)
    assert brier == pytest.approx(np.mean(((pn - np.eye(10)[yn]) ** 2).sum(1)), abs=TOL)
    tu_brier = TUBrier(num_classes=10)
    tu_brier.update(p.double(), y)
    assert brier == pytest.approx(float(tu_brier.compute()), abs=TOL)
    if bool((p.gather(1, y[:, None]) > 1e-12).all()):  # torch-uncertainty does not clamp before the log
        tu_nll = CategoricalNLL()
        tu_nll.update(p.double(), y)
        assert nll == pytest.approx(float(tu_nll.compute()), abs=TOL)


def test_aurc_and_coverage_at_risk(preds):
    from torch_uncertainty.metrics.classification import AURC as TUAURC
    from torch_uncertainty.metrics.classification import CovAtxRisk

    p, y = preds
    p = p.double()
    ours = run(AURC(), p, y, batches=6)
    assert ours == pytest.approx(np_aurc(p.numpy(), y.numpy()), abs=TOL)
    conf = p.max(1).values
    if conf.unique().numel() == conf.numel():  # torch-uncertainty counts tied samples in input order
        tu = TUAURC()
        tu.update(p, y)
        risk = AURC()
        risk.update(p, y)
        r = risk.risks()
        n = len(r)
        documented = (n * ours - (float(r[0]) + float(r[-1])) / 2) / (n - 1)
        assert float(tu.compute()) == pytest.approx(documented, abs=TOL)
        for level in (0.02, 0.1, 0.3):
            cov = CovAtxRisk(risk_threshold=level)
            cov.update(p, y)
            ours_cov = run(CoverageAtRisk(level), p, y, batches=3)
            ref = float(cov.compute())
            assert (math.isnan(ours_cov) and math.isnan(ref)) or ours_cov == pytest.approx(ref, abs=TOL)


# ------------------------------------------------------------------ OOD detection
@pytest.mark.parametrize("source", ["random", "tied", "trained"])
def test_ood_metrics(source, trained):
    from torch_uncertainty.metrics.classification import FPR95 as TUFPR95

    g = torch.Generator().manual_seed(3)
    labels = (torch.rand(800, generator=g) < 0.3).long()
    scores = torch.randn(800, generator=g) + 1.2 * labels
    if source == "tied":
        scores = (scores * 4).round() / 4
    if source == "trained":  # detect the trained model's mistakes from its predictive entropy
        probs, y = trained
        scores = torch.special.entr(probs).sum(-1)
        labels = (probs.argmax(-1) != y).long()
    sn, ln = scores.numpy(), labels.numpy()
    assert run(OODAUROC(), scores, labels, batches=5) == pytest.approx(roc_auc_score(ln, sn), abs=TOL)
    assert run(OODAUPR(), scores, labels, batches=5) == pytest.approx(average_precision_score(ln, sn), abs=TOL)
    fpr = run(FPR95(), scores, labels, batches=5)
    assert fpr == pytest.approx(np_fpr_at(sn, ln), abs=TOL)
    tu = TUFPR95(pos_label=1)
    tu.update(scores, labels)
    assert fpr == pytest.approx(float(tu.compute()), abs=TOL)


# ------------------------------------------------------------------ diversity
@pytest.mark.parametrize("source", ["random", "trained"])
def test_diversity_matches_torch_uncertainty_and_numpy(source, trained_members):
    from torch_uncertainty.metrics.classification import Disagreement as TUDis
    from torch_uncertainty.metrics.classification import MutualInformation as TUMI

    mp = _members() if source == "random" else trained_members[0]
    pn = mp.double().numpy()
    mean = pn.mean(0)
    mi = run(MutualInformation(), mp, batches=4)
    assert mi == pytest.approx(np.mean(np_entropy(mean) - np_entropy(pn).mean(0)), abs=TOL)
    assert run(PredictiveEntropy(), mp, batches=4) == pytest.approx(np.mean(np_entropy(mean)), abs=TOL)
    votes = pn.argmax(-1)  # (M, N)
    m = votes.shape[0]
    pairs = [(i, j) for i in range(m) for j in range(m) if i != j]
    dis_np = np.mean([np.mean([votes[i, n] != votes[j, n] for i, j in pairs]) for n in range(votes.shape[1])])
    dis = run(Disagreement(), mp, batches=4)
    assert dis == pytest.approx(dis_np, abs=TOL)
    tu_mi, tu_dis = TUMI(), TUDis()
    tu_mi.update(mp.transpose(0, 1).double())
    assert mi > 0 and 0 < dis < 1
    tu_dis.update(mp.transpose(0, 1))
    assert mi == pytest.approx(float(tu_mi.compute()), abs=TOL)
    assert dis == pytest.approx(float(tu_dis.compute()), abs=TOL)


def test_diversity_of_identical_members_is_zero():
    p = _members(m=1).repeat(3, 1, 1)
    assert run(MutualInformation(), p) == pytest.approx(0.0, abs=1e-7)
    assert run(Disagreement(), p) == 0.0


# ------------------------------------------------------------------ regression
def _gaussian(n=2000, seed=4):
    g = torch.Generator().manual_seed(seed)
    mean = torch.randn(n, generator=g)
    var = torch.rand(n, generator=g) + 0.2
    target = mean + torch.randn(n, generator=g) * (var.sqrt() * 1.3)  # under-dispersed predictions
    return mean, var, target


def test_regression_metrics_match_references():
    from torch_uncertainty.metrics.regression import QuantileCalibrationError as TUQCE

    mean, var, target = _gaussian()
    mn, vn, tn = mean.double().numpy(), var.double().numpy(), target.double().numpy()
    nll = run(GaussianNLL(), mean, var, target, batches=3)
    assert nll == pytest.approx(np.mean(0.5 * np.log(2 * np.pi * vn) + 0.5 * (tn - mn) ** 2 / vn), abs=TOL)
    ref = torch.nn.functional.gaussian_nll_loss(mean.double(), target.double(), var.double(), full=True, eps=1e-12)
    assert nll == pytest.approx(float(ref), abs=TOL)
    cov = run(IntervalCoverage(0.9), mean, var, target, batches=3)
    z = scipy_norm.ppf(0.95)
    assert cov == pytest.approx(np.mean(np.abs(tn - mn) <= z * np.sqrt(vn)), abs=TOL)
    assert cov < 0.9  # under-dispersed
    qce = run(QuantileCalibrationError(15), mean, var, target, batches=3)
    levels = np.linspace(0.05, 0.95, 15)
    covs = [np.mean(np.abs(tn - mn) <= scipy_norm.ppf(0.5 + lv / 2) * np.sqrt(vn)) for lv in levels]
    assert qce == pytest.approx(np.mean(np.abs(np.array(covs) - levels)), abs=TOL)
    tu = TUQCE(num_bins=15)
    tu.update(torch.distributions.Normal(mean.double(), var.double().sqrt()), target.double())
    assert qce == pytest.approx(float(tu.compute()), abs=1e-5)


def test_regression_metrics_bundle():
    g = torch.Generator().manual_seed(5)
    mean = torch.randn(3, 200, 1, generator=g)
    var = torch.rand(3, 200, 1, generator=g) + 0.1
    target = torch.randn(200, generator=g)
    metrics = RegressionMetrics(prefix="val/")
    metrics.update(mean[:, :120], var[:, :120], target[:120])
    metrics.update(mean[:, 120:], var[:, 120:], target[120:])
    out = metrics.compute()
    mn, vn, tn = mean.double().numpy()[..., 0], var.double().numpy()[..., 0], target.double().numpy()
    mix_mean = mn.mean(0)
    mix_var = vn.mean(0) + mn.var(0)
    assert float(out["val/rmse"]) == pytest.approx(np.sqrt(np.mean((mix_mean - tn) ** 2)), abs=1e-5)
    nll = np.mean(0.5 * np.log(2 * np.pi * mix_var) + 0.5 * (tn - mix_mean) ** 2 / mix_var)
    assert float(out["val/nll"]) == pytest.approx(nll, abs=1e-5)
    cov = np.mean(np.abs(tn - mix_mean) <= scipy_norm.ppf(0.95) * np.sqrt(mix_var))
    assert float(out["val/coverage90"]) == pytest.approx(cov, abs=1e-6)


# ------------------------------------------------------------------ ClassificationMetrics bundle
def test_classification_metrics_bundle():
    g = torch.Generator().manual_seed(6)
    logits = torch.randn(3, 300, 5, generator=g) * 2
    target = torch.randint(0, 5, (300,), generator=g)
    metrics = ClassificationMetrics(num_classes=5, prefix="test/")
    for lo in range(0, 300, 64):
        metrics.update(logits[:, lo : lo + 64], target[lo : lo + 64])
    out = metrics.compute()
    pm = logits.double().softmax(-1).numpy()
    p, yn = pm.mean(0), target.numpy()
    expected = {
        "test/acc": np.mean(p.argmax(1) == yn),
        "test/nll": np.mean(-np.log(p[np.arange(300), yn])),
        "test/brier": np.mean(((p - np.eye(5)[yn]) ** 2).sum(1)),
        "test/ece": np_ece(p.astype(np.float32), yn, 15),
        "test/mutual_information": np.mean(np_entropy(p) - np_entropy(pm).mean(0)),
    }
    for i in range(3):
        expected[f"test/member_acc/{i}"] = np.mean(pm[i].argmax(1) == yn)
    for key, value in expected.items():
        assert float(out[key]) == pytest.approx(value, abs=1e-5), key
    assert 0 < float(out["test/disagreement"]) < 1
    assert set(out) == set(expected) | {"test/disagreement"}
    metrics.reset()
    with pytest.raises(ValueError, match="member axis first"):
        metrics.update(logits[0], target)


# ------------------------------------------------------------------ batching invariance
CLASSIFICATION = [
    lambda: ExpectedCalibrationError(n_bins=15),
    lambda: ExpectedCalibrationError(n_bins=10, norm="max"),
    lambda: AdaptiveCalibrationError(n_bins=15),
    lambda: ClasswiseCalibrationError(10),
    NegativeLogLikelihood,
    BrierScore,
    AURC,
    lambda: CoverageAtRisk(0.6),
]


@pytest.mark.parametrize("factory", CLASSIFICATION)
def test_one_pass_equals_many_batches(factory):
    p, y = _random_preds(1000)
    one = run(factory(), p, y)
    many = run(factory(), p, y, batches=37)
    assert not math.isnan(one)
    assert one == pytest.approx(many, abs=1e-7)
    metric = factory()
    run(metric, p[:100], y[:100])
    metric.reset()
    assert run(metric, p, y) == pytest.approx(one, abs=1e-7)  # reset forgets everything


# ------------------------------------------------------------------ bad input
BAD = {
    "not normalised": (lambda p, y: (p * 0.9, y), "sum to 1"),
    "logits": (lambda p, y: (p.log(), y), r"\[0, 1\]"),
    "nan": (lambda p, y: (torch.where(torch.arange(p.shape[0])[:, None] == 3, float("nan"), p), y), "NaN"),
    "target out of range": (lambda p, y: (p, y + 10), r"\[0, 9\]"),
    "negative target": (lambda p, y: (p, y - 20), r"\[0, 9\]"),
    "float target": (lambda p, y: (p, y.float()), "integer"),
    "batch mismatch": (lambda p, y: (p, y[:-1]), "shape"),
    "1-d probs": (lambda p, y: (p[:, 0], y), "shape"),
}


@pytest.mark.parametrize("factory", CLASSIFICATION[:7])
@pytest.mark.parametrize("case", list(BAD))
def test_bad_classification_input(factory, case):
    p, y = _random_preds(50)
    make, message = BAD[case]
    with pytest.raises(ValueError, match=message):
        factory().update(*make(p, y))


def test_bad_inputs_other_families():
    mp = _members()
    with pytest.raises(ValueError, match="member probabilities"):
        MutualInformation().update(mp[0])
    with pytest.raises(ValueError, match="sum to 1"):
        Disagreement().update(mp * 0.5)
    with pytest.raises(ValueError, match="same shape"):
        GaussianNLL().update(torch.zeros(3), torch.ones(3), torch.zeros(4))
    with pytest.raises(ValueError, match="strictly positive"):
        IntervalCoverage().update(torch.zeros(3), -torch.ones(3), torch.zeros(3))
    with pytest.raises(ValueError, match="NaN"):
        GaussianNLL().update(torch.zeros(3), torch.ones(3), torch.tensor([0.0, float("nan"), 1.0]))
    with pytest.raises(ValueError, match="0/1"):
        FPR95().update(torch.rand(4), torch.tensor([0, 2, 1, 0]))
    with pytest.raises(ValueError, match=r"shape \(B,\)"):
        OODAUROC().update(torch.rand(4), torch.tensor([0, 1, 1]))
    with pytest.raises(ValueError, match="NaN"):
        OODAUPR().update(torch.tensor([0.1, float("nan")]), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="num_classes=10"):
        ExpectedCalibrationError(num_classes=10).update(*_random_preds(20, 4))
    with pytest.raises(ValueError, match="n_bins"):
        ExpectedCalibrationError(n_bins=0)
    with pytest.raises(ValueError, match="norm"):
        ExpectedCalibrationError(norm="l3")
