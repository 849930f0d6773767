"""Evidential heads and losses: closed forms against torch.distributions, published formulas, every ensemble method."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.distributions import Dirichlet, StudentT, kl_divergence

from lightning_ensembles import build_ensemble
from lightning_ensembles.ensembles.evidential import DirichletHead, NIGHead, evidential_head
from lightning_ensembles.losses.evidential import (
    EvidentialClassificationLoss,
    annealing_coefficient,
    dirichlet_kl_uniform,
    dirichlet_uncertainty,
    evidential_classification_loss,
    evidential_regression_loss,
    nig_nll,
    nig_regularizer,
    nig_uncertainty,
)


def _alpha(b=6, c=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return 1 + 5 * torch.rand(b, c, generator=g, dtype=torch.float64), torch.randint(0, c, (b,), generator=g)


def test_kl_to_uniform_dirichlet_matches_torch_distributions():
    alpha, _ = _alpha()
    ref = kl_divergence(Dirichlet(alpha), Dirichlet(torch.ones_like(alpha)))
    assert torch.allclose(dirichlet_kl_uniform(alpha), ref)
    assert torch.allclose(
        dirichlet_kl_uniform(torch.ones(3, 5, dtype=torch.float64)), torch.zeros(3, dtype=torch.float64)
    )


def test_mse_risk_is_expected_squared_error_under_the_dirichlet():
    # Sensoy et al. eq. 5: E||y - p||^2 = sum_j (y_j - E p_j)^2 + Var p_j
    alpha, y = _alpha()
    d = Dirichlet(alpha)
    onehot = torch.nn.functional.one_hot(y, 4).double()
    ref = ((onehot - d.mean) ** 2 + d.variance).sum(-1).mean()
    assert float(evidential_classification_loss(alpha, y)) == pytest.approx(float(ref), rel=1e-12)
    # published-formula value by hand: alpha = (9, 1), y = 0 -> 2 * 0.1^2 + 2 * 0.9 * 0.1 / 11
    assert float(evidential_classification_loss(torch.tensor([[9.0, 1.0]]), torch.tensor([0]))) == pytest.approx(
        0.02 + 0.18 / 11, rel=1e-6
    )


def test_digamma_and_log_risks():
    alpha, y = _alpha(b=3)
    samples = Dirichlet(alpha).sample((200_000,))  # E[-log p_y] = psi(S) - psi(alpha_y)
    mc = -samples.gather(-1, y.expand(200_000, -1).unsqueeze(-1)).log().mean(0).squeeze(-1).mean()
    assert float(evidential_classification_loss(alpha, y, risk="digamma")) == pytest.approx(float(mc), abs=5e-3)
    s = alpha.sum(-1)
    ref = (s.log() - alpha.gather(-1, y[:, None]).squeeze(-1).log()).mean()
    assert float(evidential_classification_loss(alpha, y, risk="log")) == pytest.approx(float(ref))


def test_annealed_kl_on_misleading_evidence():
    alpha, y = _alpha()
    assert [annealing_coefficient(t) for t in (0, 5, 10, 30)] == [0.0, 0.5, 1.0, 1.0]
    onehot = torch.nn.functional.one_hot(y, 4).double()
    tilde = onehot + (1 - onehot) * alpha  # the evidence for the true class is removed
    ref = evidential_classification_loss(alpha, y) + 0.5 * dirichlet_kl_uniform(tilde).mean()
    assert torch.allclose(evidential_classification_loss(alpha, y, kl_weight=0.5), ref)
    loss = EvidentialClassificationLoss(annealing_epochs=10)
    assert torch.allclose(loss(alpha.log()[None], y[None], epoch=5), ref)
    with pytest.raises(ValueError, match=">= 1"):
        evidential_classification_loss(alpha - 1, y)


def test_nig_nll_is_the_student_t_marginal():
    g = torch.Generator().manual_seed(0)
    gamma, y = torch.randn(50, generator=g, dtype=torch.float64), torch.randn(50, generator=g, dtype=torch.float64)
    nu, beta = (
        0.1 + torch.rand(50, generator=g, dtype=torch.float64),
        0.1 + torch.rand(50, generator=g, dtype=torch.float64),
    )
    alpha = 1.1 + 3 * torch.rand(50, generator=g, dtype=torch.float64)
    ref = -StudentT(2 * alpha, gamma, torch.sqrt(beta * (1 + nu) / (nu * alpha))).log_prob(y)
    assert torch.allclose(nig_nll(y, gamma, nu, alpha, beta), ref)
    # Amini et al. eq. 9 by hand: |y - gamma| (2 nu + alpha)
    assert float(nig_regularizer(torch.tensor(1.5), torch.tensor(0.5), torch.tensor(2.0), torch.tensor(3.0))) == 7.0
    out = torch.stack([gamma, nu, alpha, beta], -1)
    total = evidential_regression_loss(out, y[:, None], coeff=0.01)
    assert float(total) == pytest.approx(float((ref + 0.01 * (y - gamma).abs() * (2 * nu + alpha)).mean()))


def test_uncertainty_outputs():
    out = torch.tensor([[0.5, 2.0, 3.0, 4.0]])
    u = nig_uncertainty(out)
    assert float(u["aleatoric"]) == 2.0 and float(u["epistemic"]) == 1.0 and float(u["mean"]) == 0.5
    d = dirichlet_uncertainty(torch.log(torch.tensor([[8.0, 1.0, 1.0]])))
    assert float(d["vacuity"]) == pytest.approx(0.3) and torch.allclose(d["probs"], torch.tensor([[0.8, 0.1, 0.1]]))


def _net(out):
    return nn.Sequential(
        nn.Linear(16, 32), nn.ReLU(), nn.Dropout(0.1), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, out)
    )


@pytest.mark.parametrize(
    "method,kwargs", [("deep", {}), ("packed", {"alpha": 2}), ("batch", {}), ("mc_dropout", {}), ("mimo", {})]
)
def test_heads_work_with_every_ensemble_method(method, kwargs):
    x = torch.randn(5, 16)
    for kind, out in (("dirichlet", 3), ("nig", 1)):
        ens = build_ensemble(method, evidential_head(_net(out), kind), 4, **kwargs).eval()
        y = ens(x)
        assert y.shape == (4, 5, 3 if kind == "dirichlet" else 4)
        assert torch.allclose(ens.member(1)(x), y[1], atol=1e-5)
        if kind == "dirichlet":
            assert bool((y >= 0).all())
        else:
            _, nu, alpha, beta = y.chunk(4, -1)
            assert bool((nu > 0).all() and (alpha > 1).all() and (beta > 0).all())


def test_nig_head_keeps_the_original_head_as_gamma_and_refuses_non_linear_heads():
    net = _net(2)
    x = torch.randn(7, 16)
    ref = net.eval()(x)
    head = NIGHead(net).eval()
    assert head.head == "5" and head.num_targets == 2
    assert torch.allclose(head(x)[:, :2], ref)
    with pytest.raises(ValueError, match="not an nn.Linear"):
        NIGHead(_net(2), head="1")
    with pytest.raises(ValueError, match="`activation`"):
        DirichletHead(_net(3), activation="tanh")


def test_exp_evidence_is_softplus_of_logits():
    net = _net(3)
    x = torch.randn(4, 16)
    assert torch.allclose(DirichletHead(net, "exp").eval()(x), torch.log(net.eval()(x).exp() + 1), atol=1e-6)


def test_evidential_training_learns_and_flags_unseen_inputs_by_vacuity():
    torch.manual_seed(0)
    centers = torch.tensor([[3.0, 0.0], [-3.0, 0.0], [0.0, 3.0]])
    y = torch.randint(0, 3, (600,))
    x = centers[y] + 0.5 * torch.randn(600, 2)
    ens = build_ensemble("deep", DirichletHead(nn.Sequential(nn.Linear(2, 32), nn.ReLU(), nn.Linear(32, 3))), 3)
    loss_fn = EvidentialClassificationLoss(annealing_epochs=10)
    opt = torch.optim.Adam(ens.parameters(), lr=1e-2)
    for epoch in range(40):
        opt.zero_grad()
        loss = loss_fn(ens(x), y.expand(3, -1), epoch=epoch)
        loss.backward()
        opt.step()
    with torch.no_grad():
        out = ens(x)
        acc = (out.softmax(-1).mean(0).argmax(-1) == y).float().mean()
        vac_in = dirichlet_uncertainty(out)["vacuity"].mean()
        between = torch.zeros(100, 2) + 0.1 * torch.randn(100, 2)  # the middle: between all classes
        vac_mid = dirichlet_uncertainty(ens(between))["vacuity"].mean()
    assert acc > 0.95 and vac_mid > vac_in + 0.2, (acc, vac_in, vac_mid)


# ---------------------------------------------------------------- through the modules
def test_evidential_classifier_trains_reports_vacuity_and_reloads(tmp_path):
    from _models import mlp_classifier
    from conftest import quiet_trainer

    from lightning_ensembles import EnsembleClassifier
    from lightning_ensembles.data import DigitsDataModule

    torch.manual_seed(0)
    dm = DigitsDataModule(batch_size=64)
    model = mlp_classifier(2, loss="evidential", lr=3e-3)
    assert isinstance(model.ensemble.member(0), DirichletHead)
    trainer = quiet_trainer(max_epochs=4, num_sanity_val_steps=0)
    trainer.fit(model, dm)
    assert float(trainer.callback_metrics["val/acc"]) > 0.8
    assert 0 < float(trainer.callback_metrics["val/vacuity"]) < 1
    out = trainer.predict(model, dm.test_dataloader())[0]
    log_alpha = model.ensemble(next(iter(dm.test_dataloader()))[0])
    assert torch.allclose(out["vacuity"], (10 / log_alpha.exp().sum(-1)).mean(0), atol=1e-5)
    path = tmp_path / "ev.ckpt"
    trainer.save_checkpoint(path)
    again = EnsembleClassifier.load_from_checkpoint(path, weights_only=True)
    x = next(iter(dm.test_dataloader()))[0]
    assert torch.allclose(again.eval()(x), model.eval()(x))
    with pytest.raises(ValueError, match="needs task='multiclass'"):
        EnsembleClassifier(
            backbone="mlp", loss="evidential", task="multilabel", backbone_kwargs={"in_features": 4, "out_features": 3}
        )


@pytest.mark.parametrize("method", ["deep", "packed"])
def test_evidential_regressor_trains_and_reports_aleatoric_and_epistemic(method):
    from conftest import quiet_trainer

    from lightning_ensembles import EnsembleRegressor
    from lightning_ensembles.data import ToyRegressionDataModule

    torch.manual_seed(0)
    dm = ToyRegressionDataModule()
    kwargs = {"alpha": 2} if method == "packed" else {}
    model = EnsembleRegressor(
        backbone="mlp",
        num_members=3,
        method=method,
        loss="evidential",
        lr=5e-3,
        ensemble_kwargs=kwargs,
        backbone_kwargs={"in_features": 1, "out_features": 1},
    )
    trainer = quiet_trainer(max_epochs=15, num_sanity_val_steps=0)
    trainer.fit(model, dm)
    assert torch.isfinite(trainer.callback_metrics["val/nll"]) and "val/coverage90" in trainer.callback_metrics
    out = trainer.predict(model, dm.test_dataloader())[0]
    assert set(out) == {"mean", "aleatoric", "epistemic", "variance"}
    assert bool((out["aleatoric"] > 0).all() and (out["epistemic"] > 0).all())
    x = next(iter(dm.test_dataloader()))[0]
    u = nig_uncertainty(model.ensemble(x))
    assert torch.allclose(out["aleatoric"], u["aleatoric"].mean(0))
    assert torch.allclose(out["variance"], out["aleatoric"] + out["epistemic"])
