"""Values of the diversity and repulsion losses against independent numpy / closed-form computations,
and their input checks."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from lightning_ensembles import DeepEnsemble
from lightning_ensembles.losses import (
    FunctionSpaceRepulsion,
    InputGradientRepulsion,
    JensenGap,
    JensenGapLoss,
    JensenShannon,
    NegativeCorrelation,
    PairwiseKL,
    Regularizer,
    SoftDisagreement,
    WeightSpaceRepulsion,
    forde_repulsion,
    member_input_gradients,
)

# A tiny hand-made case: 3 members, 2 samples, 3 classes.
LOGITS = torch.tensor(
    [
        [[2.0, 0.0, -1.0], [0.5, 0.5, 0.0]],
        [[0.0, 1.0, 0.0], [-1.0, 2.0, 1.0]],
        [[1.0, -2.0, 3.0], [0.0, 0.0, 0.0]],
    ],
    dtype=torch.float64,
)
TARGET = torch.tensor([0, 1])


def np_softmax(z):
    z = np.asarray(z, dtype=np.float64)
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def np_entropy(p):
    return -(p * np.log(p)).sum(-1)


P = np_softmax(LOGITS.numpy())
M, B, C = P.shape


# ------------------------------------------------------------------------------------- output-space diversity
def test_pairwise_kl_matches_numpy_loop():
    ref = np.mean(
        [
            np.mean([(P[i, b] * np.log(P[i, b] / P[j, b])).sum() for b in range(B)])
            for i in range(M)
            for j in range(M)
            if i != j
        ]
    )
    assert PairwiseKL(weight=1.0)(LOGITS, TARGET).item() == pytest.approx(-ref, rel=1e-10)


def test_jensen_shannon_generalised_and_pairwise_match_numpy():
    pbar = P.mean(0)
    generalised = np.mean(np_entropy(pbar) - np_entropy(P).mean(0))
    pairs = []
    for i in range(M):
        for j in range(i + 1, M):
            mix = 0.5 * (P[i] + P[j])
            kl_i = (P[i] * np.log(P[i] / mix)).sum(-1)
            kl_j = (P[j] * np.log(P[j] / mix)).sum(-1)
            pairs.append(np.mean(0.5 * kl_i + 0.5 * kl_j))  # JS as the mean KL to the midpoint
    assert JensenShannon(weight=1.0)(LOGITS, TARGET).item() == pytest.approx(-generalised, rel=1e-10)
    assert JensenShannon(weight=1.0, pairwise=True)(LOGITS, TARGET).item() == pytest.approx(-np.mean(pairs), rel=1e-10)


def test_jensen_shannon_two_members_pairwise_equals_generalised_and_is_finite_for_certain_members():
    two = torch.tensor([[[30.0, -30.0]], [[-30.0, 30.0]]])
    for pairwise in (False, True):
        value = JensenShannon(pairwise=pairwise)(two, None)
        assert torch.isfinite(value) and value.item() == pytest.approx(-math.log(2), abs=1e-6)


def test_soft_disagreement_is_half_squared_distance_and_sampling_disagreement_beyond_chance():
    ref = np.mean(
        [
            np.mean([0.5 * ((P[i, b] - P[j, b]) ** 2).sum() for b in range(B)])
            for i in range(M)
            for j in range(M)
            if i != j
        ]
    )

    # Same number from its other reading: the chance two members' sampled classes differ, minus the chance
    # each member disagrees with itself (enumerating class pairs, independent of the formula above).
    def differ(p, q):
        return sum(p[c] * q[d] for c in range(C) for d in range(C) if c != d)

    beyond_chance = np.mean(
        [
            np.mean(
                [
                    differ(P[i, b], P[j, b]) - 0.5 * differ(P[i, b], P[i, b]) - 0.5 * differ(P[j, b], P[j, b])
                    for b in range(B)
                ]
            )
            for i in range(M)
            for j in range(M)
            if i != j
        ]
    )
    assert ref == pytest.approx(beyond_chance, rel=1e-12)
    assert SoftDisagreement(weight=1.0)(LOGITS, TARGET).item() == pytest.approx(-ref, rel=1e-10)


def test_soft_disagreement_equals_argmax_disagreement_for_confident_members():
    classes = torch.tensor([[0, 1, 2, 2], [0, 2, 2, 1], [1, 1, 2, 0]])  # (M, B)
    logits = 50.0 * torch.nn.functional.one_hot(classes, 3).double()
    argmax = np.mean([(classes[i] != classes[j]).double().mean() for i in range(3) for j in range(3) if i != j])
    assert -SoftDisagreement()(logits, None).item() == pytest.approx(argmax, abs=1e-12)


def test_negative_correlation_is_ambiguity_and_completes_the_decomposition():
    preds = torch.tensor([[[1.0], [2.0]], [[3.0], [0.0]], [[2.0], [4.0]]], dtype=torch.float64)
    y = torch.tensor([[2.5], [1.0]], dtype=torch.float64)
    f = preds.numpy()[..., 0]
    fbar = f.mean(0)
    amb = ((f - fbar) ** 2).mean()
    value = NegativeCorrelation(weight=1.0)(preds, y)
    assert value.item() == pytest.approx(-amb, rel=1e-12)
    # Krogh-Vedelsby: MSE of the mean = mean member MSE - ambiguity.
    mse_mean = ((fbar - y.numpy()[:, 0]) ** 2).mean()
    mean_mse = ((f - y.numpy()[:, 0]) ** 2).mean()
    assert mean_mse + value.item() == pytest.approx(mse_mean, rel=1e-12)


def test_negative_correlation_gaussian_uses_the_mean_half():
    means = torch.tensor([[[1.0]], [[3.0]]])
    raw_var = torch.tensor([[[5.0]], [[-5.0]]])  # wildly different variances must not count
    value = NegativeCorrelation(output="gaussian")(torch.cat([means, raw_var], -1), torch.zeros(1, 1))
    assert value.item() == pytest.approx(-1.0)


def np_jensen_gap_parts():
    member_ce = np.mean([-np.log(P[i, b, TARGET[b]]) for i in range(M) for b in range(B)])
    ens_nll = np.mean([-np.log(P[:, b, TARGET[b]].mean()) for b in range(B)])
    return member_ce, ens_nll


def test_jensen_gap_loss_endpoints_and_mixture():
    member_ce, ens_nll = np_jensen_gap_parts()
    assert JensenGapLoss(gamma=1.0)(LOGITS, TARGET).item() == pytest.approx(member_ce, rel=1e-10)
    assert JensenGapLoss(gamma=0.0)(LOGITS, TARGET).item() == pytest.approx(ens_nll, rel=1e-10)
    assert JensenGapLoss(gamma=0.3)(LOGITS, TARGET).item() == pytest.approx(0.3 * member_ce + 0.7 * ens_nll, rel=1e-10)
    assert ens_nll < member_ce  # Jensen: the averaged prediction is never worse in NLL


def test_jensen_gap_regularizer_reproduces_the_mixture_with_weight_one_minus_gamma():
    member_ce, ens_nll = np_jensen_gap_parts()
    for gamma in (1.0, 0.0, 0.4, 1.5):
        reg = JensenGap(gamma=gamma)
        assert reg.weight == pytest.approx(1 - gamma)
        total = member_ce + reg.weight * reg(LOGITS, TARGET).item()  # what EnsembleClassifier adds
        assert total == pytest.approx(gamma * member_ce + (1 - gamma) * ens_nll, rel=1e-10)
    assert JensenGap(gamma=0.4).gamma == pytest.approx(0.4)


# ------------------------------------------------------------------------------------- repulsion
def np_kde_terms(w):
    """Median-heuristic RBF KDE of rows of w: log-density per row and its repulsion gradient."""
    w = np.asarray(w, dtype=np.float64)
    n = w.shape[0]
    d2 = ((w[:, None, :] - w[None, :, :]) ** 2).sum(-1)
    sigma = np.median(d2) / (2 * np.log(n + 1))
    k = np.exp(-d2 / (2 * sigma))
    grad_k = -k[:, :, None] * (w[:, None, :] - w[None, :, :]) / sigma  # d k(w_i, w_j) / d w_i
    return np.log(k.sum(1)), grad_k.sum(1) / k.sum(1, keepdims=True)


def test_function_space_repulsion_value_and_update_match_the_kde_rule():
    outputs = LOGITS.clone().requires_grad_(True)
    value = FunctionSpaceRepulsion(weight=1.0)(outputs, TARGET)
    log_density, repulsion = np_kde_terms(LOGITS.reshape(M, -1).numpy())
    assert value.item() == pytest.approx(log_density.mean(), rel=1e-10)
    # The modules minimise M * (loss + weight * value): member i's function moves by -(sum_j grad k / sum_j k).
    (M * value).backward()
    np.testing.assert_allclose(outputs.grad.reshape(M, -1).numpy(), repulsion, rtol=1e-8, atol=1e-12)


def test_function_space_repulsion_on_probabilities():
    value = FunctionSpaceRepulsion(space="probs")(LOGITS, TARGET)
    assert value.item() == pytest.approx(np_kde_terms(P.reshape(M, -1))[0].mean(), rel=1e-10)


def test_weight_space_repulsion_gradient_is_the_papers_repulsive_force():
    torch.manual_seed(0)
    ens = DeepEnsemble(nn.Linear(3, 2), num_members=4)
    stacked = ens.stacked_parameters()
    w = torch.cat([stacked["weight"].reshape(4, -1), stacked["bias"].reshape(4, -1)], 1).detach().double().numpy()
    reg = WeightSpaceRepulsion(weight=1.0)
    value = reg(ens(torch.randn(5, 3)), None, ensemble=ens)
    log_density, repulsion = np_kde_terms(w)
    assert value.item() == pytest.approx(log_density.mean(), rel=1e-6)
    (4 * value).backward()
    grads = torch.cat([stacked["weight"].grad.reshape(4, -1), stacked["bias"].grad.reshape(4, -1)], 1).numpy()
    np.testing.assert_allclose(grads, repulsion, rtol=1e-5, atol=1e-7)


def test_fixed_bandwidth_is_sigma_of_exp_minus_d2_over_two_sigma():
    value = FunctionSpaceRepulsion(bandwidth=0.7)(LOGITS, TARGET)
    f = LOGITS.reshape(M, -1).numpy()
    d2 = ((f[:, None] - f[None]) ** 2).sum(-1)
    assert value.item() == pytest.approx(np.log(np.exp(-d2 / 1.4).sum(1)).mean(), rel=1e-10)


def np_forde(g):
    """FoRDE repulsion from input gradients (M, B, D), written as loops over the paper's formula."""
    g = np.asarray(g, dtype=np.float64)
    m, b, _ = g.shape
    g = g / np.sqrt((g**2).sum(-1, keepdims=True) + 1e-12)
    d2 = np.array([[[((g[i, k] - g[j, k]) ** 2).sum() for k in range(b)] for j in range(m)] for i in range(m)])
    h = np.median(d2, axis=0) / np.log(m) + 1e-12  # (j, b)
    total = 0.0
    for i in range(m):
        total += np.log(np.exp(-d2[i] / h).sum() / b)
    return total / b


def test_forde_repulsion_matches_loops():
    torch.manual_seed(1)
    g = torch.randn(4, 3, 5, dtype=torch.float64)
    assert forde_repulsion(g).item() == pytest.approx(np_forde(g.numpy()), rel=1e-10)


def test_forde_on_a_linear_ensemble_equals_the_closed_form_and_its_second_order_gradient():
    # For logits W x + b the input gradient of the true-class logit is the row W[y]: R is a function of W
    # alone, so autograd through the input gradients must give the gradient of that closed form.
    torch.manual_seed(2)
    ens = DeepEnsemble(nn.Linear(5, 3), num_members=3).double()
    x, y = torch.randn(4, 5, dtype=torch.float64), torch.tensor([0, 2, 1, 2])
    _, grads = member_input_gradients(ens, x, y)
    weight = ens.stacked_parameters()["weight"]  # (M, C, D)
    np.testing.assert_allclose(grads.detach().numpy(), weight[:, y].detach().numpy(), rtol=1e-12)

    value = InputGradientRepulsion(weight=1.0)(ens(x), y, inputs=x, ensemble=ens)
    assert value.item() == pytest.approx(np_forde(weight[:, y].detach().numpy()) / 3, rel=1e-10)
    (got,) = torch.autograd.grad(value, weight)
    w = weight.detach().clone().requires_grad_(True)
    (want,) = torch.autograd.grad(forde_repulsion(w[:, y]) / 3, w)
    assert got.abs().sum() > 0
    torch.testing.assert_close(got, want)


def test_regularizers_are_regularizers_with_default_weight_zero():
    for cls in (
        PairwiseKL,
        JensenShannon,
        SoftDisagreement,
        NegativeCorrelation,
        JensenGap,
        WeightSpaceRepulsion,
        FunctionSpaceRepulsion,
        InputGradientRepulsion,
    ):
        reg = cls()
        assert isinstance(reg, Regularizer) and reg.weight == 0.0 and reg.name


# ------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "reg",
    [
        PairwiseKL(),
        JensenShannon(),
        JensenShannon(pairwise=True),
        SoftDisagreement(),
        JensenGap(),
        FunctionSpaceRepulsion(),
        NegativeCorrelation(),
    ],
    ids=lambda r: type(r).__name__,
)
def test_pairwise_terms_refuse_a_single_member(reg):
    with pytest.raises(ValueError, match="at least 2 members"):
        reg(torch.randn(1, 4, 3), torch.zeros(4, dtype=torch.long))


@pytest.mark.parametrize(
    "reg", [PairwiseKL(), JensenShannon(), SoftDisagreement(), JensenGap()], ids=lambda r: type(r).__name__
)
def test_classification_terms_refuse_outputs_without_member_and_class_axes(reg):
    with pytest.raises(ValueError, match=r"\(M, B"):
        reg(torch.randn(4, 3), torch.zeros(4, dtype=torch.long))


def test_mismatched_targets_are_refused():
    logits = torch.randn(3, 4, 5)
    with pytest.raises(ValueError, match="expected class indices of shape"):
        JensenGap(gamma=0.5)(logits, torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="integer class indices"):
        JensenGapLoss()(logits, torch.zeros(4))
    with pytest.raises(ValueError, match=r"must lie in \[0, 4\]"):
        JensenGapLoss()(logits, torch.full((4,), 7))
    with pytest.raises(ValueError, match="batch of member outputs"):
        NegativeCorrelation()(torch.randn(3, 4, 1), torch.randn(5, 1))
    with pytest.raises(ValueError, match="output='gaussian'"):
        NegativeCorrelation()(torch.randn(3, 4, 2), torch.randn(4, 1))
    with pytest.raises(ValueError, match="the batch `inputs` has 5"):
        ens = DeepEnsemble(nn.Linear(2, 3), num_members=2)
        InputGradientRepulsion()(
            torch.randn(2, 4, 3), torch.zeros(4, dtype=torch.long), inputs=torch.randn(5, 2), ensemble=ens
        )


def test_other_bad_arguments_are_refused_with_the_fix():
    with pytest.raises(ValueError, match="stacked_parameters"):
        WeightSpaceRepulsion()(torch.randn(2, 3, 4), None, ensemble=nn.Linear(2, 2))
    with pytest.raises(ValueError, match="stacked_parameters"):
        WeightSpaceRepulsion()(torch.randn(2, 3, 4), None)
    with pytest.raises(ValueError, match="at least 2 members"):
        WeightSpaceRepulsion()(torch.randn(1, 3, 2), None, ensemble=DeepEnsemble(nn.Linear(2, 2), num_members=1))
    with pytest.raises(ValueError, match="needs `inputs`"):
        InputGradientRepulsion()(torch.randn(2, 3, 4), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="at least 2"):
        forde_repulsion(torch.randn(1, 3, 4))
    with pytest.raises(ValueError, match="weight = 1 - gamma"):
        JensenGap(weight=0.3, gamma=0.2)
    with pytest.raises(ValueError, match="`space`"):
        FunctionSpaceRepulsion(space="features")
    with pytest.raises(ValueError, match="`bandwidth`"):
        WeightSpaceRepulsion(bandwidth=0.0)
    with pytest.raises(ValueError, match="`output`"):
        NegativeCorrelation(output="mean")


@pytest.mark.parametrize("method", ["packed", "batch"])
def test_stacked_parameters_of_converted_ensembles_are_the_members_own_weights(method):
    from lightning_ensembles import build_ensemble

    torch.manual_seed(0)
    ens = build_ensemble(
        method, "mlp", num_members=3, backbone_kwargs={"in_features": 6, "out_features": 4, "hidden": (8,)}
    )
    stacked = ens.stacked_parameters()
    assert stacked and all(t.shape[0] == 3 for t in stacked.values())
    if method == "packed":
        # Each member's slice holds exactly that member's weights as member(i) exports them.
        for i in range(3):
            member = dict(ens.member(i).named_parameters())
            for name, t in stacked.items():
                torch.testing.assert_close(t[i].reshape(-1), member[name].reshape(-1))
    # The repulsion's gradient reaches exactly the tensors listed (views of the ensemble's parameters).
    value = WeightSpaceRepulsion(weight=1.0)(torch.zeros(3, 2, 4), None, ensemble=ens)
    value.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in ens.parameters())
    if method == "batch":
        shared = [m.layer.weight for m in ens.modules() if hasattr(m, "layer") and hasattr(m, "r")]
        assert shared and all(w.grad is None or w.grad.abs().sum() == 0 for w in shared)
