"""Plots where people look (issue 17, item 7): the metrics' ``plot()`` and the member table.

Every figure is read back from its Axes artists and compared with values computed here from the
raw inputs (not with the metric's own helpers), then saved as a PNG.
"""

import statistics
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("matplotlib")
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_curve  # noqa: E402

from lightning_ensembles.metrics import (  # noqa: E402
    FPR95,
    OODAUPR,
    OODAUROC,
    AdaptiveCalibrationError,
    ClasswiseCalibrationError,
    ExpectedCalibrationError,
    IntervalCoverage,
    QuantileCalibrationError,
)
from lightning_ensembles.metrics.multilabel import MultilabelCalibrationError  # noqa: E402
from lightning_ensembles.modules import format_report  # noqa: E402

N_BINS = 10


def _save(fig, tmp_path, name):
    path = tmp_path / f"{name}.png"
    fig.savefig(path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return path


def _bars(container):
    return (
        np.array([r.get_x() + r.get_width() / 2 for r in container]),
        np.array([r.get_height() for r in container]),
        np.array([r.get_y() for r in container]),
    )


def _expected_bins(p, hit, n_bins=N_BINS):
    """Per equal-width bin (the confidence-1 bin folded into the top one): count, mean p, mean hit, from numpy."""
    p, hit = np.asarray(p, dtype=np.float64).ravel(), np.asarray(hit, dtype=np.float64).ravel()
    idx = np.minimum(np.floor(p * n_bins).astype(int), n_bins - 1)
    count = np.bincount(idx, minlength=n_bins).astype(float)
    safe = np.maximum(count, 1)
    return count, np.bincount(idx, p, n_bins) / safe, np.bincount(idx, hit, n_bins) / safe


def _probs(n=600, c=4, seed=0, temperature=2.0):
    g = torch.Generator().manual_seed(seed)
    probs = torch.softmax(torch.randn(n, c, generator=g, dtype=torch.float64) * temperature, -1)
    target = torch.randint(0, c, (n,), generator=g)
    return probs, target


def test_ece_plot_draws_the_reliability_diagram_of_its_bins(tmp_path):
    probs, target = _probs()
    probs[:5] = torch.nn.functional.one_hot(target[:5], 4).double()  # confidences of exactly 1: the extra top bin
    ece = ExpectedCalibrationError(n_bins=N_BINS)
    ece.update(probs, target)
    fig, ax = ece.plot()
    conf, pred = probs.max(-1)
    count, mean_conf, acc = _expected_bins(conf, pred == target)
    seen = count > 0
    x, heights, _ = _bars(ax.containers[0])
    np.testing.assert_allclose(heights, acc[seen], atol=1e-12)
    np.testing.assert_allclose(x, ((np.arange(N_BINS) + 0.5) / N_BINS)[seen], atol=1e-12)
    _, gaps, bottoms = _bars(ax.containers[1])
    np.testing.assert_allclose(gaps, np.abs(acc - mean_conf)[seen], atol=1e-12)
    np.testing.assert_allclose(bottoms, np.minimum(acc, mean_conf)[seen], atol=1e-12)
    # The histogram below: fraction of samples per bin.
    hist = next(a for a in fig.axes if a is not ax)
    np.testing.assert_allclose(_bars(hist.containers[0])[1], count / count.sum(), atol=1e-12)
    assert f"{100 * float(ece.compute()):.2f}%" in ax.get_title()
    _save(fig, tmp_path, "ece")


def test_plot_into_given_axes_and_title_from_val(tmp_path):
    from matplotlib.figure import Figure

    probs, target = _probs(seed=1)
    ece = ExpectedCalibrationError(n_bins=N_BINS)
    ece.update(probs, target)
    fig = Figure()
    ax = fig.subplots()
    got_fig, got_ax = ece.plot(val=torch.tensor(0.1234), ax=ax)
    assert got_fig is fig and got_ax is ax and len(fig.axes) == 1  # no histogram added to the user's figure
    assert "12.34%" in ax.get_title()
    _save(fig, tmp_path, "ece_ax")


def test_classwise_and_multilabel_plots_pool_the_per_class_bins(tmp_path):
    probs, target = _probs(seed=2)
    cw = ClasswiseCalibrationError(num_classes=4, n_bins=N_BINS)
    cw.update(probs, target)
    fig, ax = cw.plot()
    count, _, freq = _expected_bins(probs, torch.nn.functional.one_hot(target, 4))
    np.testing.assert_allclose(_bars(ax.containers[0])[1], freq[count > 0], atol=1e-12)
    _save(fig, tmp_path, "classwise")

    g = torch.Generator().manual_seed(3)
    p = torch.rand(300, 3, generator=g, dtype=torch.float64)
    y = (torch.rand(300, 3, generator=g, dtype=torch.float64) < p**2).long()
    ml = MultilabelCalibrationError(num_labels=3, n_bins=N_BINS)
    ml.update(p, y)
    fig, ax = ml.plot()
    count, _, freq = _expected_bins(p, y)
    np.testing.assert_allclose(_bars(ax.containers[0])[1], freq[count > 0], atol=1e-12)
    _save(fig, tmp_path, "multilabel")


@pytest.mark.parametrize("top_label", [True, False])
def test_adaptive_plot_draws_one_point_per_equal_mass_bin(tmp_path, top_label):
    probs, target = _probs(n=500, c=3, seed=4)
    m = AdaptiveCalibrationError(n_bins=N_BINS, top_label=top_label)
    m.update(probs, target)
    fig, ax = m.plot()
    if top_label:
        conf, pred = probs.max(-1)
        columns = [(conf, (pred == target).double())]
    else:
        onehot = torch.nn.functional.one_hot(target, 3).double()
        columns = [(probs[:, k], onehot[:, k]) for k in range(3)]
    for line, (c, a) in zip(ax.lines, columns):
        order = c.argsort()
        chunks = np.array_split(np.arange(len(c)), N_BINS)  # random confidences: no ties
        np.testing.assert_allclose(line.get_xdata(), [float(c[order][i].mean()) for i in chunks], atol=1e-6)
        np.testing.assert_allclose(line.get_ydata(), [float(a[order][i].mean()) for i in chunks], atol=1e-6)
    assert len(ax.lines) == len(columns) + 1  # plus the diagonal
    _save(fig, tmp_path, f"adaptive_{top_label}")


def test_quantile_calibration_plot_is_the_coverage_curve(tmp_path):
    g = torch.Generator().manual_seed(5)
    target = torch.randn(2000, generator=g, dtype=torch.float64) * 1.5  # wider than predicted: under-coverage
    m = QuantileCalibrationError(num_levels=7)
    m.update(torch.zeros(2000, dtype=torch.float64), torch.ones(2000, dtype=torch.float64), target)
    fig, ax = m.plot()
    levels = np.linspace(0.05, 0.95, 7)
    observed = [float((target.abs() <= statistics.NormalDist().inv_cdf((1 + lv) / 2)).double().mean()) for lv in levels]
    line = ax.lines[0]
    np.testing.assert_allclose(line.get_xdata(), levels, atol=1e-12)
    np.testing.assert_allclose(line.get_ydata(), observed, atol=1e-12)
    assert all(o < lv for o, lv in zip(observed, levels))  # the curve lies below the diagonal, as drawn
    _save(fig, tmp_path, "qce")

    cov = IntervalCoverage(level=0.8)
    cov.update(torch.zeros(2000, dtype=torch.float64), torch.ones(2000, dtype=torch.float64), target)
    fig, ax = cov.plot()
    expected = float((target.abs() <= statistics.NormalDist().inv_cdf(0.9)).double().mean())
    assert list(ax.lines[0].get_xdata()) == [0.8]
    assert ax.lines[0].get_ydata()[0] == pytest.approx(expected, abs=1e-6)
    _save(fig, tmp_path, "coverage")


def _ood(n=400, seed=6):
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(n, generator=g, dtype=torch.float64).round(decimals=1)  # ties too
    is_ood = (torch.rand(n, generator=g, dtype=torch.float64) < torch.sigmoid(2 * scores)).long()
    return scores, is_ood


def test_ood_plots_are_the_roc_and_pr_curves_of_the_stored_scores(tmp_path):
    scores, is_ood = _ood()
    auroc = OODAUROC()
    auroc.update(scores, is_ood)
    fig, ax = auroc.plot()
    fpr, tpr, _ = roc_curve(is_ood.numpy(), scores.numpy(), drop_intermediate=False)
    line = ax.lines[0]
    np.testing.assert_allclose(line.get_xdata(), fpr, atol=1e-12)
    np.testing.assert_allclose(line.get_ydata(), tpr, atol=1e-12)
    assert np.trapezoid(line.get_ydata(), line.get_xdata()) == pytest.approx(float(auroc.compute()), abs=1e-6)
    _save(fig, tmp_path, "roc")

    aupr = OODAUPR()
    aupr.update(scores, is_ood)
    fig, ax = aupr.plot()
    precision, recall, _ = precision_recall_curve(is_ood.numpy(), scores.numpy(), drop_intermediate=False)
    line = ax.lines[0]
    assert line.get_drawstyle() == "steps-pre"
    x, y = line.get_xdata(), line.get_ydata()
    np.testing.assert_allclose(x[1:], recall[::-1][1:], atol=1e-12)  # sklearn: recall decreasing, ending at 0
    np.testing.assert_allclose(y[1:], precision[::-1][1:], atol=1e-12)
    step_area = float(np.sum(np.diff(x) * y[1:]))  # steps-pre: each y holds on the interval left of its x
    assert step_area == pytest.approx(average_precision_score(is_ood.numpy(), scores.numpy()), abs=1e-9)
    assert step_area == pytest.approx(float(aupr.compute()), abs=1e-6)
    _save(fig, tmp_path, "pr")

    fpr95 = FPR95()
    fpr95.update(scores, is_ood)
    fig, ax = fpr95.plot()
    point = ax.lines[-1]
    first = np.nonzero(tpr >= 0.95 - 1e-12)[0][0]
    assert (
        point.get_xdata()[0] == pytest.approx(fpr[first], abs=1e-9) == pytest.approx(float(fpr95.compute()), abs=1e-6)
    )
    assert point.get_ydata()[0] == pytest.approx(tpr[first], abs=1e-9)
    _save(fig, tmp_path, "fpr95")


def test_plot_refuses_what_it_cannot_draw():
    with pytest.raises(ValueError, match=r"no samples were passed to update\(\).*call update\(\)"):
        ExpectedCalibrationError().plot()
    with pytest.raises(ValueError, match="no samples"):
        QuantileCalibrationError().plot()
    one_kind = OODAUROC()
    one_kind.update(torch.tensor([0.1, 0.2]), torch.tensor([1, 1]))
    with pytest.raises(ValueError, match="both OOD .* and in-distribution"):
        one_kind.plot()


def test_plot_without_matplotlib_names_the_extra(monkeypatch):
    probs, target = _probs(n=50)
    ece = ExpectedCalibrationError()
    ece.update(probs, target)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # import fails as if not installed
    with pytest.raises(ImportError, match=r"lightning-ensembles\[plots\]"):
        ece.plot()


def test_member_table_is_an_aligned_markdown_table():
    results = {"acc": 0.975, "nll": 0.0812, "brier": 0.04, "ece": 0.0123}
    for i, acc in enumerate([0.95, 0.9611]):
        results.update(
            {f"member_acc/{i}": acc, f"member_nll/{i}": 0.15 + i, f"member_brier/{i}": 0.07, f"member_ece/{i}": 0.02}
        )
    text = format_report(results, title="test")
    title, header, rule, *rows = text.splitlines()
    assert title == "test: ensemble vs members"
    assert [c.strip() for c in header.strip("|").split("|")] == ["model", "acc", "nll", "brier", "ece"]
    assert set(rule) <= set("|:-") and rule.count("|") == 6  # the header rule, right-aligned numbers
    assert len({len(line) for line in (header, rule, *rows)}) == 1  # every line the same width: aligned columns
    cells = {r.split("|")[1].strip(): [float(c) for c in r.split("|")[2:-1]] for r in rows}
    assert list(cells) == ["ensemble", "member 0", "member 1", "member mean"]
    assert cells["ensemble"] == [0.975, 0.0812, 0.04, 0.0123]
    assert cells["member mean"][:2] == [pytest.approx((0.95 + 0.9611) / 2, abs=1e-4), pytest.approx(0.65, abs=1e-4)]
    # Each value sits in its column: the header's '|' positions are the rows' '|' positions.
    bars = [i for i, ch in enumerate(header) if ch == "|"]
    assert all([i for i, ch in enumerate(r) if ch == "|"] == bars for r in rows)


def test_selective_plots_are_the_risk_coverage_curve(tmp_path):
    from lightning_ensembles.metrics import AURC, CoverageAtRisk

    probs, _ = _probs(n=300, c=3, seed=7, temperature=3.0)
    g = torch.Generator().manual_seed(8)
    conf, pred = probs.max(-1)
    # Confidence is informative: the top class is right with probability `conf`, else the next class.
    target = torch.where(torch.rand(300, generator=g, dtype=torch.float64) < conf, pred, (pred + 1) % 3)
    aurc = AURC()
    aurc.update(probs, target)
    fig, ax = aurc.plot()
    errors = (pred != target).double()[conf.argsort(descending=True)].numpy()  # random confidences: no ties
    k = np.arange(1, len(errors) + 1)
    line = ax.lines[0]
    assert line.get_drawstyle() == "steps-pre"
    np.testing.assert_allclose(line.get_xdata()[1:], k / len(k), atol=1e-12)
    np.testing.assert_allclose(line.get_ydata()[1:], np.cumsum(errors) / k, atol=1e-12)
    x, y = line.get_xdata(), line.get_ydata()
    assert float(np.sum(np.diff(x) * y[1:])) == pytest.approx(float(aurc.compute()), abs=1e-6)  # area = AURC
    _save(fig, tmp_path, "aurc")

    car = CoverageAtRisk(risk=0.1)
    car.update(probs, target)
    fig, ax = car.plot()
    risk = np.cumsum(errors) / k
    chosen = ax.lines[-1]
    assert 0 < (risk <= 0.1).sum() < len(k)  # a limit the curve crosses
    assert chosen.get_xdata()[0] == pytest.approx(k[risk <= 0.1][-1] / len(k)) == pytest.approx(float(car.compute()))
    _save(fig, tmp_path, "coverage_at_risk")
