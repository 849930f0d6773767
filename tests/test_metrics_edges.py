"""Metrics that do not depend on luck (issue 15, item 4): tied confidences, no data, bf16 inputs,
probabilities passed where logits are expected."""

from __future__ import annotations

import inspect
import math
import warnings

import lightning as L
import numpy as np
import pytest
import torch
from _metric_runs import run
from conftest import quiet_trainer
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics import Metric, MetricCollection

import lightning_ensembles.metrics as metrics_pkg
from lightning_ensembles.metrics import (
    AURC,
    FPR95,
    OODAUPR,
    OODAUROC,
    AdaptiveCalibrationError,
    BrierScore,
    ClassificationMetrics,
    ClasswiseCalibrationError,
    CoverageAtRisk,
    DenseMeanIoU,
    Disagreement,
    ExpectedCalibrationError,
    GaussianNLL,
    IntervalCoverage,
    MemberAccuracy,
    MultilabelCalibrationError,
    MutualInformation,
    NegativeLogLikelihood,
    PredictiveEntropy,
    QuantileCalibrationError,
    RegressionMetrics,
    SetCoverage,
    SetSize,
    TopLabelAccuracy,
)


# ================================================================== tied confidences
def same(a, b):
    """Bit-identical floats, NaN equal to NaN."""
    return (math.isnan(a) and math.isnan(b)) or a == b


def tied_preds(n=400, seed=0, levels=(0.55, 0.7, 0.8, 0.9, 1.0)):
    """Two-class probabilities whose confidences take only a few values (heavy ties), and targets."""
    g = torch.Generator().manual_seed(seed)
    conf = torch.tensor(levels, dtype=torch.float64)[torch.randint(0, len(levels), (n,), generator=g)]
    swap = torch.rand(n, generator=g) < 0.5
    p1 = torch.where(swap, conf, 1 - conf)
    probs = torch.stack([1 - p1, p1], -1)
    pred = probs.argmax(-1)
    # Right with probability ~conf (a roughly calibrated model), so every tie group mixes hits and misses.
    right = torch.rand(n, generator=g) < conf
    target = torch.where(right, pred, 1 - pred)
    return probs, target


def np_group_curve(conf, err):
    """Brute force, one threshold per distinct confidence: (coverage, risk) of ``conf >= t`` for t high to low."""
    cov, risk = [], []
    for t in np.sort(np.unique(conf))[::-1]:
        sel = conf >= t
        cov.append(sel.mean())
        risk.append(err[sel].mean())
    return np.array(cov), np.array(risk)


def np_aurc_groups(p, y):
    conf, err = p.max(1), (p.argmax(1) != y).astype(float)
    cov, risk = np_group_curve(conf, err)
    # Right-endpoint area over the achievable operating points: each tied group is one step.
    return float(np.sum(np.diff(np.concatenate([[0.0], cov])) * risk))


def np_coverage_at_risk_groups(p, y, level):
    conf, err = p.max(1), (p.argmax(1) != y).astype(float)
    cov, risk = np_group_curve(conf, err)
    ok = cov[risk <= level]
    return float(ok.max()) if ok.size else float("nan")


def np_ace_groups(conf, correct, n_bins):
    """Equal-mass bins over the sorted samples (``array_split`` rule); a tied group is one unit that is
    shared among the bins it straddles in proportion, carrying its mean accuracy into each."""
    n = len(conf)
    values, inverse = np.unique(conf, return_inverse=True)
    group_acc = np.array([correct[inverse == g].mean() for g in range(len(values))])
    group_n = np.array([(inverse == g).sum() for g in range(len(values))])
    group_start = np.concatenate([[0], np.cumsum(group_n)[:-1]])
    total, start = 0.0, 0
    for size in [len(c) for c in np.array_split(np.arange(n), n_bins)]:
        end = start + size
        if size:
            conf_sum = acc_sum = 0.0
            for g in range(len(values)):
                overlap = max(0, min(end, group_start[g] + group_n[g]) - max(start, group_start[g]))
                conf_sum += overlap * values[g]
                acc_sum += overlap * group_acc[g]
            total += size / n * abs(acc_sum / size - conf_sum / size)
        start = end
    return total


TIE_METRICS = {
    "aurc": AURC,
    "coverage_at_risk_0.1": lambda: CoverageAtRisk(0.1),
    "coverage_at_risk_0.2": lambda: CoverageAtRisk(0.2),
    "ace": lambda: AdaptiveCalibrationError(n_bins=7),
    "ace_classwise": lambda: AdaptiveCalibrationError(n_bins=7, top_label=False),
}


def test_issue_example_three_orders_one_value():
    """All samples share one confidence: only the order of hits and misses differed (0.052 / 0.658 / 0.375)."""
    errors_last = torch.tensor([0] * 16 + [1] * 4)
    orders = [
        errors_last,
        errors_last.flip(0),
        errors_last[torch.randperm(20, generator=torch.Generator().manual_seed(1))],
    ]
    values = {name: [] for name in TIE_METRICS}
    for err in orders:
        probs = torch.tensor([[0.8, 0.2]]).repeat(20, 1)
        target = err.long()  # predicted class 0; target 1 is a miss
        for name, factory in TIE_METRICS.items():
            values[name].append(run(factory(), probs, target))
    for name, vals in values.items():
        assert same(vals[0], vals[1]) and same(vals[0], vals[2]), (name, vals)
    # Accepting the one tied group is the only operating point: risk 4/20 at full coverage.
    assert values["aurc"][0] == pytest.approx(0.2)
    assert math.isnan(values["coverage_at_risk_0.1"][0]) and values["coverage_at_risk_0.2"][0] == 1.0
    assert values["ace"][0] == pytest.approx(0.0, abs=1e-7)  # conf 0.8, accuracy 0.8 in every bin


def test_hand_value_with_a_tie():
    # conf .9 right; a tie at .8 with one miss. Operating points (1/3, 0) and (1, 1/3): 2/3 * 1/3 = 2/9.
    probs = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.8, 0.2]])
    for target in ([0, 0, 1], [0, 1, 0]):
        assert run(AURC(), probs, torch.tensor(target)) == pytest.approx(2 / 9)


@pytest.mark.parametrize("name", list(TIE_METRICS))
def test_shuffling_tied_samples_gives_identical_values(name):
    probs, target = tied_preds()
    ref = run(TIE_METRICS[name](), probs, target)
    assert not math.isnan(ref)
    g = torch.Generator().manual_seed(2)
    for batches in (1, 3, 11):
        perm = torch.randperm(len(target), generator=g)
        assert same(run(TIE_METRICS[name](), probs[perm], target[perm], batches=batches), ref)


@pytest.mark.parametrize("seed", range(4))
def test_aurc_and_coverage_match_group_threshold_reference(seed):
    probs, target = tied_preds(seed=seed, n=300 + 37 * seed)
    p, y = probs.numpy(), target.numpy()
    assert run(AURC(), probs, target, batches=4) == pytest.approx(np_aurc_groups(p, y), abs=1e-6)
    for level in (0.05, 0.1, 0.15, 0.2, 0.3):
        ours = run(CoverageAtRisk(level), probs, target, batches=4)
        ref = np_coverage_at_risk_groups(p, y, level)
        assert (math.isnan(ours) and math.isnan(ref)) or ours == pytest.approx(ref, abs=1e-6), level


@pytest.mark.parametrize("seed", range(4))
def test_adaptive_ece_matches_tie_group_reference(seed):
    probs, target = tied_preds(seed=seed, n=250 + 31 * seed)
    conf, pred = probs.max(1)
    correct = (pred == target).double().numpy()
    for n_bins in (3, 7, 15):
        ours = run(AdaptiveCalibrationError(n_bins=n_bins), probs, target, batches=3)
        assert ours == pytest.approx(np_ace_groups(conf.numpy(), correct, n_bins), abs=1e-6)
    # Classwise (Nixon): the same rule on every class's probability, averaged over classes.
    onehot = np.eye(2)[target.numpy()]
    ref = np.mean([np_ace_groups(probs[:, k].numpy(), onehot[:, k], 5) for k in range(2)])
    assert run(AdaptiveCalibrationError(n_bins=5, top_label=False), probs, target) == pytest.approx(ref, abs=1e-6)


def test_tie_free_values_agree_with_torch_uncertainty():
    from torch_uncertainty.metrics.classification import AURC as TUAURC
    from torch_uncertainty.metrics.classification import AdaptiveCalibrationError as TUACE
    from torch_uncertainty.metrics.classification import CovAtxRisk

    g = torch.Generator().manual_seed(5)
    logits = torch.randn(1500, 10, generator=g, dtype=torch.float64) * 3
    target = torch.where(
        torch.rand(1500, generator=g) < 0.6, logits.argmax(-1), torch.randint(0, 10, (1500,), generator=g)
    )
    probs = logits.softmax(-1)
    conf = probs.max(-1).values
    assert conf.unique().numel() == conf.numel()
    ours = run(AURC(), probs, target, batches=3)
    tu = TUAURC()
    tu.update(probs, target)
    err = (probs.argmax(-1) != target).double()[conf.argsort(descending=True)]
    risk = err.cumsum(0) / torch.arange(1, 1501)
    assert ours == pytest.approx(float(risk.mean()), abs=1e-6)
    documented = (1500 * ours - (float(risk[0]) + float(risk[-1])) / 2) / 1499  # the formula in AURC's docstring
    assert float(tu.compute()) == pytest.approx(documented, abs=1e-6)
    for level in (0.1, 0.2, 0.4):
        cov = CovAtxRisk(risk_threshold=level)
        cov.update(probs, target)
        assert run(CoverageAtRisk(level), probs, target, batches=3) == pytest.approx(float(cov.compute()), abs=1e-6)
    ace = TUACE(task="multiclass", num_classes=10, num_bins=15)
    ace.update(probs, target)
    assert run(AdaptiveCalibrationError(n_bins=15), probs, target, batches=5) == pytest.approx(
        float(ace.compute()), abs=1e-6
    )


# ================================================================== no data
def _cls(b=0, c=3):
    return torch.rand(b, c).softmax(-1), torch.zeros(b, dtype=torch.long)


def _members(b=0, m=2, c=3):
    return (torch.rand(m, b, c).softmax(-1),)


def _ood(b=0):
    return torch.rand(b), torch.zeros(b, dtype=torch.long)


def _gauss(b=0):
    return torch.zeros(b), torch.ones(b), torch.zeros(b)


def _sets(b=0):
    return torch.zeros(b, 3, dtype=torch.bool), torch.zeros(b, dtype=torch.long)


#: Every metric the package exports, with the (empty) input of one update.
EVERY_METRIC = {
    "ExpectedCalibrationError": (ExpectedCalibrationError, _cls),
    "AdaptiveCalibrationError": (AdaptiveCalibrationError, _cls),
    "ClasswiseCalibrationError": (lambda: ClasswiseCalibrationError(3), _cls),
    "NegativeLogLikelihood": (NegativeLogLikelihood, _cls),
    "BrierScore": (BrierScore, _cls),
    "AURC": (AURC, _cls),
    "CoverageAtRisk": (CoverageAtRisk, _cls),
    "TopLabelAccuracy": (TopLabelAccuracy, _cls),
    "MemberAccuracy": (MemberAccuracy, lambda: (*_members(), torch.zeros(0, dtype=torch.long))),
    "MutualInformation": (MutualInformation, _members),
    "Disagreement": (Disagreement, _members),
    "PredictiveEntropy": (PredictiveEntropy, _members),
    "OODAUROC": (OODAUROC, _ood),
    "OODAUPR": (OODAUPR, _ood),
    "FPR95": (FPR95, _ood),
    "GaussianNLL": (GaussianNLL, _gauss),
    "IntervalCoverage": (IntervalCoverage, _gauss),
    "QuantileCalibrationError": (QuantileCalibrationError, _gauss),
    "SetCoverage": (SetCoverage, _sets),
    "SetSize": (SetSize, _sets),
    "DenseMeanIoU": (lambda: DenseMeanIoU(num_classes=3), lambda: (torch.zeros(0, 4, dtype=torch.long),) * 2),
    "MultilabelCalibrationError": (
        lambda: MultilabelCalibrationError(num_labels=3),
        lambda: (torch.zeros(0, 3), torch.zeros(0, 3, dtype=torch.long)),
    ),
    "ClassificationMetrics": (
        lambda: ClassificationMetrics(3),
        lambda: (torch.randn(2, 0, 3), torch.zeros(0, dtype=torch.long)),
    ),
    "RegressionMetrics": (RegressionMetrics, lambda: (torch.zeros(2, 0, 1), torch.ones(2, 0, 1), torch.zeros(0))),
}


def test_every_exported_metric_is_covered():
    exported = {
        name
        for name in metrics_pkg.__all__
        if inspect.isclass(getattr(metrics_pkg, name))
        and issubclass(getattr(metrics_pkg, name), (Metric, MetricCollection))
    }
    assert exported == set(EVERY_METRIC)


def _compute_recording(metric):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        value = metric.compute()
    return value, [w for w in caught if not issubclass(w.category, DeprecationWarning)]


def _all_nan(value):
    values = value.values() if isinstance(value, dict) else [value]
    return all(bool(torch.isnan(v).all()) for v in values)


@pytest.mark.parametrize("name", list(EVERY_METRIC))
@pytest.mark.parametrize("how", ["no update", "empty batches"])
def test_compute_without_samples_is_nan_with_one_warning(name, how):
    factory, empty_input = EVERY_METRIC[name]
    metric = factory()
    if how == "empty batches":
        metric.update(*empty_input())
        metric.update(*empty_input())
    value, caught = _compute_recording(metric)
    assert _all_nan(value), value
    assert len(caught) == 1, [str(w.message) for w in caught]
    message = str(caught[0].message)
    assert name in message and "no samples were passed to update()" in message
    assert issubclass(caught[0].category, UserWarning)


def test_no_samples_warning_is_a_documented_category():
    from lightning_ensembles.metrics import NoSamplesWarning

    assert issubclass(NoSamplesWarning, UserWarning)
    assert "NoSamplesWarning" in metrics_pkg.__doc__
    metric = ExpectedCalibrationError()
    with pytest.warns(NoSamplesWarning, match="ExpectedCalibrationError"):
        assert math.isnan(float(metric.compute()))


def test_metrics_with_data_do_not_warn():
    probs, target = _cls(50)
    for name, factory in (("ece", ExpectedCalibrationError), ("aurc", AURC), ("nll", NegativeLogLikelihood)):
        metric = factory()
        metric.update(probs, target)
        value, caught = _compute_recording(metric)
        assert not math.isnan(float(value)) and not caught, name


class _LogsAnEmptyMetric(L.LightningModule):
    """Logs the value of a metric that got no samples, as a user's epoch-end hook would."""

    def __init__(self):
        super().__init__()
        self.layer = nn.Linear(2, 2)
        self.ece = ExpectedCalibrationError()
        self.aurc = AURC()

    def validation_step(self, batch, batch_idx):
        pass

    def on_validation_epoch_end(self):
        self.log("val/ece", self.ece.compute())
        self.log("val/aurc", self.aurc.compute())


def test_nan_of_an_empty_metric_logs_in_lightning():
    trainer = quiet_trainer()
    loader = DataLoader(TensorDataset(torch.zeros(4, 2)), batch_size=2)
    with pytest.warns(UserWarning, match="no samples were passed to update"):
        trainer.validate(_LogsAnEmptyMetric(), loader, verbose=False)
    assert math.isnan(float(trainer.callback_metrics["val/ece"]))
    assert math.isnan(float(trainer.callback_metrics["val/aurc"]))


# ================================================================== bf16 probabilities
PROB_METRICS = {
    "ece": ExpectedCalibrationError,
    "ace": AdaptiveCalibrationError,
    "classwise": lambda **kw: ClasswiseCalibrationError(10, **kw),
    "nll": NegativeLogLikelihood,
    "brier": BrierScore,
    "aurc": AURC,
    "coverage": lambda **kw: CoverageAtRisk(0.3, **kw),
}


def _bf16_softmax(n=2000, c=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, c, generator=g) * 3
    target = torch.where(torch.rand(n, generator=g) < 0.7, logits.argmax(-1), torch.randint(0, c, (n,), generator=g))
    return logits, logits.bfloat16().softmax(-1), target


@pytest.mark.parametrize("name", list(PROB_METRICS))
def test_bf16_softmax_rows_are_accepted(name):
    _, probs, target = _bf16_softmax()
    deviation = float((probs.double().sum(-1) - 1).abs().max())
    assert 1e-3 < deviation < 1e-2  # bf16 rounding: beyond the old fixed 1e-3 tolerance
    value = run(PROB_METRICS[name](), probs, target, batches=4)
    # The same bf16 values in float32 (the arithmetic the metric does) give the same result; as float32
    # they would not pass the check (float32 rows must sum to 1 within 1e-3), hence validate_args=False.
    same_in_float32 = run(PROB_METRICS[name](validate_args=False), probs.float(), target, batches=4)
    assert value == pytest.approx(same_in_float32, abs=1e-6)
    assert not math.isnan(value)


def test_bf16_member_probs_are_accepted():
    g = torch.Generator().manual_seed(1)
    member_probs = (torch.randn(4, 1000, 10, generator=g) * 3).bfloat16().softmax(-1)
    assert float((member_probs.double().sum(-1) - 1).abs().max()) > 1e-3
    for factory in (MutualInformation, Disagreement, PredictiveEntropy):
        assert run(factory(), member_probs) == pytest.approx(
            run(factory(validate_args=False), member_probs.float()), abs=1e-6
        )


def test_rows_off_by_more_than_the_dtype_allows_are_still_rejected():
    logits, _, target = _bf16_softmax(200)
    p32 = logits.softmax(-1)
    off = p32.clone()
    off[7] *= 1 + 1e-2  # float32 row off by 1e-2
    for factory in PROB_METRICS.values():
        with pytest.raises(ValueError, match="sum to 1"):
            factory().update(off, target)
    bf_off = logits.softmax(-1)
    bf_off[3] *= 1.1
    for factory in PROB_METRICS.values():
        with pytest.raises(ValueError, match="sum to 1"):
            factory().update(bf_off.bfloat16(), target)


def test_sum_tolerance_follows_the_dtype():
    from lightning_ensembles._checks import sum_tolerance

    assert sum_tolerance(torch.float32, 10) == sum_tolerance(torch.float64, 10) == 1e-3
    assert sum_tolerance(torch.bfloat16, 10) == pytest.approx(4 * 2**-7)
    assert sum_tolerance(torch.float16, 10) == pytest.approx(4 * 2**-10)
    assert sum_tolerance(torch.float32, 21841) == pytest.approx(21841 * 2**-23)  # ImageNet-21k


class _ReturnsProbs(L.LightningModule):
    """A user's module whose eval step returns ``logits.softmax(-1)`` (bf16 under bf16-mixed on CPU)."""

    def __init__(self, key="probs"):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Linear(16, 10)
        self.key = key
        self.seen_dtypes = set()

    def test_step(self, batch, batch_idx):
        x, y = batch
        logits = self.net(x) * 8
        if self.key == "member_probs":
            out = torch.stack([logits, logits.flip(-1)]).softmax(-1)
        else:
            out = logits.softmax(-1)
        self.seen_dtypes.add(out.dtype)
        return {self.key: out, "target": y}


@pytest.mark.parametrize("key", ["probs", "member_probs"])
def test_calibration_metrics_callback_accepts_bf16_mixed_softmax(key):
    from lightning_ensembles.callbacks import CalibrationMetrics

    g = torch.Generator().manual_seed(3)
    x = torch.randn(512, 16, generator=g)
    y = torch.randint(0, 10, (512,), generator=g)
    loader = DataLoader(TensorDataset(x, y), batch_size=128)
    names = ["ece", "ace", "classwise_ece", "nll", "brier", "aurc"] + (
        ["mutual_information"] if key == "member_probs" else []
    )
    results = {}
    for precision in ("bf16-mixed", "32-true"):
        cb = CalibrationMetrics(metrics=names)
        model = _ReturnsProbs(key)
        quiet_trainer(precision=precision, callbacks=[cb]).test(model, loader, verbose=False)
        results[precision] = cb.last_results["test"]
        if precision == "bf16-mixed":
            assert model.seen_dtypes == {torch.bfloat16}  # the case of the issue: bf16 softmax rows
    for name in names:
        assert results["bf16-mixed"][name] == pytest.approx(results["32-true"][name], abs=0.05), name


# ================================================================== probabilities passed as logits
def _member_logits(m=3, b=200, c=5, seed=7):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(m, b, c, generator=g) * 3
    target = torch.where(
        torch.rand(b, generator=g) < 0.8, logits.mean(0).argmax(-1), torch.randint(0, c, (b,), generator=g)
    )
    return logits, target


def test_classification_metrics_refuse_probabilities():
    logits, target = _member_logits()
    with pytest.raises(ValueError, match=r"look like probabilities.*inputs='probs'"):
        ClassificationMetrics(5).update(logits.softmax(-1), target)
    with pytest.raises(ValueError, match="look like probabilities"):
        ClassificationMetrics(5).update(logits.softmax(-1).bfloat16(), target)
    # Logits that happen to lie in [0, 1] are fine: their rows do not sum to 1.
    ClassificationMetrics(5).update(torch.rand(3, 200, 5), target)


def test_classification_metrics_take_probabilities_when_asked():
    logits, target = _member_logits()
    from_logits = ClassificationMetrics(5)
    from_logits.update(logits, target)
    from_probs = ClassificationMetrics(5, inputs="probs")
    from_probs.update(logits.softmax(-1), target)
    a, b = from_logits.compute(), from_probs.compute()
    assert set(a) == set(b)
    for key in a:
        assert float(b[key]) == pytest.approx(float(a[key]), abs=1e-6), key
    with pytest.raises(ValueError, match=r"probabilities in \[0, 1\]"):
        from_probs.update(logits, target)  # logits into the probs-taking set
    with pytest.raises(ValueError, match="inputs"):
        ClassificationMetrics(5, inputs="scores")


def test_module_metric_sets_refuse_probabilities():
    from lightning_ensembles.modules._eval_metrics import EnsembleClassificationMetrics, OODMetrics

    logits, target = _member_logits()
    with pytest.raises(ValueError, match="look like probabilities"):
        EnsembleClassificationMetrics(5, 3).update(logits.softmax(-1), target)
    with pytest.raises(ValueError, match="look like probabilities"):
        OODMetrics().update(logits.softmax(-1), is_ood=False)
    EnsembleClassificationMetrics(5, 3).update(logits, target)
    OODMetrics().update(logits, is_ood=False)


class _LinearTestOutputs(L.LightningModule):
    """A 16 -> 10 linear layer; ``test_step`` returns ``self.outputs(logits, targets)``."""

    def __init__(self):
        super().__init__()
        self.net = nn.Linear(16, 10)

    def test_step(self, batch, batch_idx):
        x, y = batch
        return self.outputs(self.net(x), y)


def _random_loader() -> DataLoader:
    """Two batches of 32 random 16-feature inputs with targets among 10 classes."""
    return DataLoader(TensorDataset(torch.randn(64, 16), torch.randint(0, 10, (64,))), batch_size=32)


class _ProbsUnderLogitsKey(_LinearTestOutputs):
    def __init__(self, key):
        super().__init__()
        self.key = key

    def outputs(self, logits, y):
        probs = logits.softmax(-1)
        return {self.key: probs if self.key == "logits" else probs[None].repeat(2, 1, 1), "target": y}


@pytest.mark.parametrize("key", ["logits", "member_logits"])
def test_calibration_metrics_refuse_probabilities_under_a_logits_key(key):
    from lightning_ensembles.callbacks import CalibrationMetrics

    loader = _random_loader()
    trainer = quiet_trainer(callbacks=[CalibrationMetrics(metrics=["ece", "nll"])])
    with pytest.raises(ValueError, match="look like probabilities.*'(member_)?probs'"):
        trainer.test(_ProbsUnderLogitsKey(key), loader, verbose=False)


class _MaskedLogits(_LinearTestOutputs):
    """Logits with a masked class (-inf): valid logits, whose softmax gives that class probability 0."""

    def outputs(self, logits, y):
        logits[:, 9] = float("-inf")
        return {"logits": logits, "target": y % 9}


def test_calibration_metrics_take_logits_with_a_masked_class():
    from lightning_ensembles.callbacks import CalibrationMetrics

    loader = _random_loader()
    cb = CalibrationMetrics(metrics=["ece", "nll"])
    quiet_trainer(callbacks=[cb]).test(_MaskedLogits(), loader, verbose=False)
    assert all(math.isfinite(v) for v in cb.last_results["test"].values())


class _OffProbs(_LinearTestOutputs):
    def outputs(self, logits, y):
        return {"probs": logits.softmax(-1) * 1.01, "target": y}  # float32 rows off by 1e-2


def test_calibration_metrics_still_refuse_float32_rows_off_by_1e_2():
    from lightning_ensembles.callbacks import CalibrationMetrics

    loader = _random_loader()
    with pytest.raises(ValueError, match="sum to 1.*tolerance 0.001 for torch.float32"):
        quiet_trainer(callbacks=[CalibrationMetrics(metrics=["ece"])]).test(_OffProbs(), loader, verbose=False)
