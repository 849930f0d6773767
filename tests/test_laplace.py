"""Last-layer Laplace per member on laplace-torch: agreement with laplace-torch for M = 1, state, samples, callback."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import quiet_trainer
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_ensembles import DeepEnsemble, EnsembleClassifier, build_ensemble
from lightning_ensembles.calibration.laplace import fit_laplace, load_laplace_ensemble
from lightning_ensembles.callbacks.laplace import LastLayerLaplace
from lightning_ensembles.data import DigitsDataModule

laplace = pytest.importorskip("laplace")  # the `test` extra installs it: this runs in CI


def _data(n=300, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).long() + (x[:, 2] > 1).long()
    return x, y


def _net():
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Dropout(0.1), nn.Linear(16, 3))


def _trained(method="deep", members=1, **kw):
    torch.manual_seed(0)
    x, y = _data()
    ens = build_ensemble(method, _net(), members, **kw)
    opt = torch.optim.Adam(ens.parameters(), lr=1e-2)
    for _ in range(100):
        opt.zero_grad()
        nn.functional.cross_entropy(ens(x).flatten(0, 1), y.repeat(ens.num_members)).backward()
        opt.step()
    return ens.eval()


def _loaders():
    x, y = _data()
    xv, yv = _data(200, seed=1)
    return DataLoader(TensorDataset(x, y), batch_size=64), DataLoader(TensorDataset(xv, yv), batch_size=64)


@pytest.mark.parametrize("structure", ["kron", "diag"])
def test_one_member_equals_laplace_torch_single_model(structure):
    ens = _trained()
    train, val = _loaders()
    ours = fit_laplace(ens, train, val, hessian_structure=structure, grid_size=11)
    ref = laplace.Laplace(
        copy.deepcopy(ens.member(0)), "classification", subset_of_weights="last_layer", hessian_structure=structure
    )
    ref.fit(train)
    ref.optimize_prior_precision(
        pred_type="glm", method="gridsearch", val_loader=val, grid_size=11, link_approx="probit"
    )
    x, _ = _data(50, seed=2)
    assert float(ours.laplaces[0].prior_precision) == pytest.approx(float(ref.prior_precision))
    assert torch.allclose(ours(x)[0].exp(), ref(x, pred_type="glm", link_approx="probit"), atol=1e-6)
    # a single model (not an Ensemble) is an ensemble of one
    single = fit_laplace(ens.member(0), train, val, hessian_structure=structure, grid_size=11)
    assert torch.allclose(single(x), ours(x), atol=1e-6)


def test_members_get_their_own_posterior_and_the_mixture_contract():
    ens = _trained(members=3)
    train, val = _loaders()
    la = fit_laplace(ens, train, val, grid_size=11)
    x, _ = _data(20, seed=3)
    out = la(x)
    assert out.shape == (3, 20, 3) and la.num_members == 3
    assert torch.allclose(out.exp().sum(-1), torch.ones(3, 20), atol=1e-5)
    assert not torch.allclose(out[0], out[1])
    for i in range(3):
        assert torch.allclose(la.member(i)(x), out[i])
    # the Laplace predictive is softer than the MAP member (probit shrinks logits by its variance)
    with torch.no_grad():
        map_conf = ens(x).softmax(-1).amax(-1)
    assert bool((out.exp().amax(-1) <= map_conf + 1e-6).all())


def test_samples_contract_is_member_major_and_reproducible():
    ens = _trained(members=2)
    train, val = _loaders()
    la = fit_laplace(ens, train, val, grid_size=5, num_samples=4, prior_method="gridsearch")
    x, _ = _data(10, seed=4)
    out = la(x)
    assert out.shape == (8, 10, 3) and la.num_members == 8
    assert torch.equal(out, la(x))
    assert torch.allclose(la.member(5)(x), out[5])
    assert torch.allclose(
        la.laplaces[1]
        .predictive_samples(x, pred_type="glm", n_samples=4, generator=torch.Generator().manual_seed(1))
        .log(),
        out[4:],
        atol=1e-6,
    )


def test_state_round_trips_through_weights_only_load(tmp_path):
    ens = _trained(members=2)
    train, val = _loaders()
    la = fit_laplace(ens, train, val, grid_size=5)
    path = tmp_path / "la.pt"
    torch.save({"state": la.laplace_state(), "config": la.config}, path)
    saved = torch.load(path, weights_only=True)
    again = load_laplace_ensemble(ens, saved["state"], saved["config"])
    x, _ = _data(10, seed=5)
    assert torch.allclose(again(x), la(x), atol=1e-6)
    with pytest.raises(ValueError, match="2 members, the ensemble 3"):
        load_laplace_ensemble(_trained(members=3), saved["state"], saved["config"])


@pytest.mark.parametrize("method,kwargs", [("packed", {"alpha": 2}), ("batch", {}), ("mc_dropout", {})])
def test_other_ensemble_methods(method, kwargs):
    ens = _trained(method, members=2, **kwargs)
    train, val = _loaders()
    la = fit_laplace(ens, train, val, grid_size=5)
    x, _ = _data(10, seed=6)
    assert la(x).shape == (2, 10, 3)


def test_refusals_name_the_fix():
    train, _ = _loaders()
    with pytest.raises(ValueError, match="pass `val_loader`"):
        fit_laplace(_trained(), train)
    with pytest.raises(ValueError, match="share a widened output layer"):
        fit_laplace(_trained("mimo", members=2), train, train, grid_size=3)


def test_callback_fits_after_fit_tests_with_laplace_and_restores_from_checkpoint(tmp_path):
    torch.manual_seed(0)
    dm = DigitsDataModule(batch_size=64)
    model = EnsembleClassifier(
        backbone="mlp", num_members=2, lr=1e-2, backbone_kwargs={"in_features": 64, "out_features": 10}
    )
    cb = LastLayerLaplace(grid_size=9)
    trainer = quiet_trainer(max_epochs=3, num_sanity_val_steps=0, callbacks=[cb])
    trainer.fit(model, dm)
    assert cb.laplace is not None and len(cb.laplace.prior_precisions) == 2
    plain = quiet_trainer().test(model, dm, verbose=False)[0]
    trainer.test(model, dm, verbose=False)
    with_la = dict(trainer.callback_metrics)
    assert isinstance(model.ensemble, DeepEnsemble)  # put back after test
    assert float(with_la["test/nll"]) != pytest.approx(plain["test/nll"])
    path = tmp_path / "la.ckpt"
    trainer.save_checkpoint(path)
    torch.load(path, weights_only=True)  # plain data only
    fresh_cb = LastLayerLaplace(grid_size=9)
    fresh = EnsembleClassifier(backbone="mlp", num_members=2, backbone_kwargs={"in_features": 64, "out_features": 10})
    t2 = quiet_trainer(callbacks=[fresh_cb])
    res = t2.test(fresh, dm, ckpt_path=str(path), verbose=False)[0]
    assert res["test/nll"] == pytest.approx(float(with_la["test/nll"]), abs=1e-5)
