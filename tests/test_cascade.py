"""EnsembleCascade: window/confidence exit rules, equivalence at the extremes, counted MACs."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

from lightning_ensembles import MLP, DeepEnsemble, aggregate_probs
from lightning_ensembles.ensembles.packed import PackedEnsemble
from lightning_ensembles.inference import EnsembleCascade, count_macs, evaluate_cascade
from lightning_ensembles.inference.cascade import simulate_cascade, uncertainty


def _ensemble(m: int = 4) -> DeepEnsemble:
    return DeepEnsemble("mlp", num_members=m, backbone_kwargs={"in_features": 6, "out_features": 5, "hidden": (16,)})


def _data(n: int = 200):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 6, generator=g), torch.randint(0, 5, (n,), generator=g)


@pytest.mark.parametrize("rule", ["window", "confidence"])
def test_zero_width_equals_first_member(rule):
    ens = _ensemble()
    x, y = _data()
    out = EnsembleCascade(ens, exit_rule=rule, width=0.0).fit(x, y)(x)
    assert (out.members_used == 1).all()
    torch.testing.assert_close(out.probs, ens.member(0)(x).softmax(-1))
    torch.testing.assert_close(out.score, uncertainty(out.probs))


@pytest.mark.parametrize("rule", ["window", "confidence"])
@pytest.mark.parametrize("decision", ["selective", "ood"])
def test_infinite_width_equals_full_ensemble(rule, decision):
    ens = _ensemble()
    x, y = _data()
    out = EnsembleCascade(ens, exit_rule=rule, decision=decision, width=float("inf")).fit(x, y)(x)
    assert (out.members_used == 4).all()
    torch.testing.assert_close(out.probs, aggregate_probs(ens(x)))
    assert torch.equal(out.prediction, aggregate_probs(ens(x)).argmax(-1))


@pytest.mark.parametrize("rule", ["window", "confidence"])
def test_batched_forward_equals_simulation_and_exits_early(rule):
    ens = _ensemble()
    x, y = _data(300)
    cascade = EnsembleCascade(ens, exit_rule=rule, width=0.15).fit(x, y)
    out = cascade(x)
    ref = simulate_cascade(cascade.member_probs(x), cascade.lower, cascade.upper)
    assert torch.equal(out.members_used, ref.members_used)
    torch.testing.assert_close(out.probs, ref.probs)
    # Some samples stop after the first member, some run further.
    assert (out.members_used == 1).any() and (out.members_used > 1).any()
    # Each sample's probabilities are the mean over exactly the members it used.
    members = torch.stack([ens.member(i)(x).softmax(-1) for i in range(4)])
    for k in range(1, 5):
        rows = out.members_used == k
        torch.testing.assert_close(out.probs[rows], members[:k, rows].mean(0))


def test_window_surrounds_threshold_and_confidence_keeps_most_uncertain():
    ens = _ensemble()
    x, y = _data(400)
    window = EnsembleCascade(ens, exit_rule="window", width=0.1).fit(x, y)
    assert window.lower[0] < window.thresholds[0] < window.upper[0]
    u1 = uncertainty(ens.member(0)(x).softmax(-1))
    cont = window(x).members_used > 1
    assert ((u1[cont] > window.lower[0]) & (u1[cont] < window.upper[0])).all()
    conf = EnsembleCascade(ens, exit_rule="confidence", width=0.25).fit(x, y)
    cont = conf(x).members_used > 1
    assert u1[cont].min() > u1[~cont].max()  # exactly the most uncertain samples go on
    assert abs(float(cont.double().mean()) - 0.25) < 0.02


def test_ood_threshold_is_the_tpr_quantile():
    ens = _ensemble(2)
    x, _ = _data(500)
    cascade = EnsembleCascade(ens, decision="ood", target_tpr=0.9, width=0.05).fit(x)
    u1 = uncertainty(ens.member(0)(x).softmax(-1))
    assert abs(float((u1 <= cascade.thresholds[0]).double().mean()) - 0.9) < 0.01


def test_mlp_macs_equal_analytic_count():
    mlp = MLP(6, 5, hidden=(16, 8))
    per_sample = 6 * 16 + 16 * 8 + 8 * 5
    assert count_macs(mlp, torch.randn(7, 6)) == 7 * per_sample
    ens = DeepEnsemble(mlp, num_members=3)
    x, y = _data(50)
    full = evaluate_cascade(EnsembleCascade(ens, width=float("inf")).fit(x, y), x, y)
    first = evaluate_cascade(EnsembleCascade(ens, width=0.0).fit(x, y), x, y)
    assert full["macs_per_sample"] == 3 * per_sample
    assert first["macs_per_sample"] == per_sample
    cascade = EnsembleCascade(ens, width=0.2).fit(x, y)
    res = evaluate_cascade(cascade, x, y)
    used = cascade(x).members_used
    assert res["macs_per_sample"] == pytest.approx(float(used.double().mean()) * per_sample)


def test_models_of_different_sizes_ordered_by_cost():
    big, small = MLP(6, 5, hidden=(64, 64)), MLP(6, 5, hidden=(4,))
    x, y = _data()
    cascade = EnsembleCascade([big, small], order="cost", width=0.1).fit(x, y)
    assert cascade.order == [1, 0] and cascade.members[0] is small
    assert cascade.member_macs[0] == 6 * 4 + 4 * 5
    explicit = EnsembleCascade([big, small], order=[1, 0], width=0.0).fit(x, y)
    torch.testing.assert_close(explicit(x).probs, small(x).softmax(-1))


@pytest.mark.parametrize("family", ["packed", "batch", "mc_dropout"])
def test_other_ensemble_families(family):
    from lightning_ensembles import BatchEnsemble, MCDropout

    if family == "packed":
        ens = PackedEnsemble(MLP(6, 5, hidden=(16,)), num_members=2, alpha=2)
    elif family == "batch":
        ens = BatchEnsemble(MLP(6, 5, hidden=(16,)), num_members=3)
    else:
        ens = MCDropout(MLP(6, 5, hidden=(16,), dropout=0.2), num_members=3)
    ens.eval()
    x, y = _data()
    out = EnsembleCascade(ens, width=float("inf")).fit(x, y)(x)
    torch.testing.assert_close(out.probs, aggregate_probs(ens(x)), atol=1e-5, rtol=1e-4)


def test_fit_width_picks_cheapest_width_within_tolerance():
    ens = _ensemble()
    x, y = _data(400)
    cascade = EnsembleCascade(ens, target_risk=0.75)  # untrained members on 5 classes: ~20% accuracy
    res = cascade.fit_width(x, y, accuracy_tolerance=0.01, coverage_tolerance=0.02)
    assert res["accuracy"] >= res["full_accuracy"] - 0.01 - 1e-9
    assert res["coverage"] >= res["full_coverage"] - 0.02 - 1e-9
    cheaper = [r for r in res["table"] if r["macs_per_sample"] < res["macs_per_sample"]]
    assert all(
        r["accuracy"] < res["full_accuracy"] - 0.01 or r["coverage"] < res["full_coverage"] - 0.02 for r in cheaper
    )
    assert cascade.width == res["width"]


def test_state_saves_and_loads_weights_only():
    ens = _ensemble(3)
    x, y = _data()
    cascade = EnsembleCascade(ens, width=0.2).fit(x, y)
    buf = io.BytesIO()
    torch.save(cascade.state_dict(), buf)
    buf.seek(0)
    fresh = EnsembleCascade(_ensemble(3), width=0.2)
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    a, b = cascade(x), fresh(x)
    assert torch.equal(a.members_used, b.members_used)
    torch.testing.assert_close(a.probs, b.probs)


def test_errors_name_the_fix():
    ens = _ensemble(2)
    x, y = _data()
    with pytest.raises(RuntimeError, match="fit"):
        EnsembleCascade(ens)(x)
    with pytest.raises(ValueError, match="width"):
        EnsembleCascade(ens, width=-1)
    with pytest.raises(ValueError, match="permutation"):
        EnsembleCascade(ens, order=[0, 0])
    with pytest.raises(ValueError, match="labels"):
        EnsembleCascade(ens, decision="selective").fit(x)
    with pytest.raises(ValueError, match="Ensemble or a list"):
        EnsembleCascade(nn.Linear(2, 2))


def test_callback_test_and_predict():
    from conftest import quiet_trainer

    from lightning_ensembles import EnsembleClassifier
    from lightning_ensembles.callbacks import CascadeEvaluation
    from lightning_ensembles.data import DigitsDataModule

    model = EnsembleClassifier(
        backbone="mlp", num_members=3, backbone_kwargs={"in_features": 64, "out_features": 10, "hidden": (32,)}
    )
    quiet_trainer(max_epochs=3).fit(model, DigitsDataModule())
    per_member = 64 * 32 + 32 * 10
    full = CascadeEvaluation(width=float("inf"))
    trainer = quiet_trainer(callbacks=[full])
    trainer.test(model, DigitsDataModule(ood_classes=(8, 9)), verbose=False)
    assert full.results["members_per_sample"] == 3.0
    assert full.results["macs_per_sample"] == 3 * per_member
    assert full.results["acc"] == pytest.approx(model.last_test_results[0]["acc"], abs=1e-6)
    assert full.results["ood_auroc"] == pytest.approx(model.last_test_results[0]["ood_auroc_msp"], abs=1e-6)
    assert float(trainer.callback_metrics["test/cascade_macs_per_sample"]) == 3 * per_member

    auto = CascadeEvaluation(exit_rule="confidence")
    trainer = quiet_trainer(callbacks=[auto])
    trainer.test(model, DigitsDataModule(), verbose=False)
    assert 1.0 <= auto.results["members_per_sample"] <= 3.0
    assert auto.results["macs_per_sample"] == pytest.approx(auto.results["members_per_sample"] * per_member)
    preds = quiet_trainer(callbacks=[auto]).predict(model, datamodule=DigitsDataModule())
    assert preds[0]["cascade_probs"].shape == preds[0]["probs"].shape
    assert preds[0]["cascade_members_used"].max() <= 3
