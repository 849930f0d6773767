"""MultiSymmetryEnsemble: invariant / equivariant / plain members, greedy selection, on digits."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lightning_ensembles import MLP
from lightning_ensembles.data import DigitsDataModule
from lightning_ensembles.ensembles.registry import build_ensemble
from lightning_ensembles.ensembles.symmetry import (
    MultiSymmetryEnsemble,
    available_symmetries,
    greedy_member_selection,
    transform,
)


def mean_prob_nll(logits: torch.Tensor, y: torch.Tensor) -> float:
    """Independent reference: NLL of the mean of member softmax probabilities."""
    p = logits.softmax(-1).mean(0)
    return float(-p[torch.arange(len(y)), y].log().mean())


# ---------------------------------------------------------------------------- group actions
def test_transforms_against_hand_written_reference():
    x = torch.arange(9.0).view(1, 1, 3, 3)
    # 90 degrees counter-clockwise: the last column becomes the first row.
    assert transform(x, "rot90", 1)[0, 0].tolist() == [[2.0, 5.0, 8.0], [1.0, 4.0, 7.0], [0.0, 3.0, 6.0]]
    assert transform(x, "hflip", 1)[0, 0].tolist() == [[2.0, 1.0, 0.0], [5.0, 4.0, 3.0], [8.0, 7.0, 6.0]]
    r = x
    for _ in range(4):
        r = transform(r, "rot90", 1)
    assert torch.equal(r, x)  # rotation group has order 4
    images = {tuple(transform(x, "d4", e).flatten().tolist()) for e in range(8)}
    assert len(images) == 8  # the 8 dihedral elements give 8 different images of an asymmetric input
    batch = torch.randn(6, 1, 4, 4)
    g = torch.tensor([0, 1, 2, 3, 7, 5])
    out = transform(batch, "d4", g)
    for b in range(6):
        assert torch.equal(out[b], transform(batch[b : b + 1], "d4", int(g[b]))[0])


def test_training_outputs_losses_and_transform_probability():
    ens = MultiSymmetryEnsemble(
        MLP(64, 10, hidden=(16,)),
        num_members=3,
        symmetries=["invariant-rot90", "equivariant-hflip", "plain"],
        p_transform=0.0,
    )
    x, y = torch.rand(8, 1, 8, 8), torch.randint(0, 10, (8,))
    logits, extra, logs = ens.training_outputs(x, y)
    assert logits.shape == (3, 8, 10)
    torch.testing.assert_close(logits, ens(x))  # p_transform=0: invariant member sees x; others always do
    torch.testing.assert_close(extra, 0.4 * logs["aux_loss/1"] / 3)  # mean over members of their aux terms
    assert ens.members[1].aux_head.out_features == 2
    ce = F.cross_entropy(logits.reshape(-1, 10), y.repeat(3))
    torch.manual_seed(1)
    a = ens.training_loss(x, y)
    torch.manual_seed(1)
    _, e2, _ = ens.training_outputs(x, y)
    torch.testing.assert_close(a, ce + e2)

    ens.p_transform = 1.0  # every invariant input is rotated by a non-identity element
    rotated = torch.stack([transform(x, "rot90", k) for k in (1, 2, 3)])
    member0 = ens.members[0]
    got = ens.training_outputs(x, y)[0][0]
    cands = torch.stack([member0(r) for r in rotated])  # (3, B, C)
    match = (cands - got).abs().amax(-1) < 1e-5
    assert bool(match.any(0).all())


def test_consistency_term_is_kl_between_views():
    ens = MultiSymmetryEnsemble(
        MLP(64, 10, hidden=(16,)),
        num_members=1,
        symmetries=["invariant-hflip"],
        consistency_weight=2.0,
        p_transform=1.0,
    )
    x, y = torch.rand(5, 1, 8, 8), torch.randint(0, 10, (5,))
    _, extra, logs = ens.training_outputs(x, y)
    m = ens.members[0]
    p, q = m(x).softmax(-1), m(x.flip(-1)).softmax(-1)
    ref = (p * (p.log() - q.log())).sum(-1).mean()
    torch.testing.assert_close(logs["consistency/0"], ref.detach(), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(extra, 2.0 * ref, atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------------------- trained on digits
@pytest.fixture(scope="module")
def trained():
    torch.manual_seed(0)
    dm = DigitsDataModule()
    dm.setup()
    xtr, ytr = dm.splits["train"].tensors
    ens = MultiSymmetryEnsemble(
        MLP(64, 10, hidden=(128,)), num_members=2, symmetries=["invariant-rot90", "equivariant-rot90"]
    )
    opt = torch.optim.Adam(ens.parameters(), lr=3e-3)
    losses = []
    for _ in range(15):
        perm = torch.randperm(len(ytr))
        for i in range(0, len(ytr), 128):
            idx = perm[i : i + 128]
            loss = ens.training_loss(xtr[idx], ytr[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
    return ens.eval(), dm, losses


def test_invariant_member_changes_less_under_rotation(trained):
    ens, dm, losses = trained
    assert sum(losses[-5:]) < sum(losses[:5])
    x, y = dm.splits["test"].tensors
    with torch.no_grad():
        p0 = ens(x).softmax(-1)
        acc = (p0.argmax(-1) == y).float().mean(-1)
        tv = torch.stack(
            [0.5 * (p0 - ens(transform(x, "rot90", k)).softmax(-1)).abs().sum(-1).mean(-1) for k in (1, 2, 3)]
        ).mean(0)  # per member: mean total-variation change
    assert (acc > 0.85).all(), acc
    assert tv[0] < 0.5 * tv[1], tv  # invariant member (0) vs equivariant member (1)


def test_auxiliary_head_learns_rotation(trained):
    ens, dm, _ = trained
    x, _ = dm.splits["test"].tensors
    g = torch.randint(0, 4, (len(x),), generator=torch.Generator().manual_seed(0))
    pred = ens.predict_transformation(transform(x, "rot90", g), 1).argmax(-1)
    assert float((pred == g).float().mean()) > 0.6  # chance is 0.25
    with pytest.raises(ValueError, match="no auxiliary head; equivariant members: \\[1\\]"):
        ens.predict_transformation(x, 0)


def test_greedy_selection_on_validation_is_no_worse_than_full(trained):
    ens, dm, _ = trained
    x, y = dm.splits["val"].tensors
    chosen = ens.select_members(x, y, batch_size=100)
    with torch.no_grad():
        logits = ens(x)
    assert len(set(chosen)) == len(chosen) >= 1
    assert mean_prob_nll(logits[chosen], y) <= mean_prob_nll(logits, y) + 1e-6
    member = ens.member(chosen[0])
    assert isinstance(member, MLP)
    torch.testing.assert_close(member.eval()(x), logits[chosen[0]], atol=1e-5, rtol=1e-5)


def test_greedy_selection_against_brute_force_and_pruning():
    torch.manual_seed(3)
    y = torch.randint(0, 5, (200,))
    good = 3 * F.one_hot(y, 5).float()
    logits = torch.stack(
        [good + torch.randn(200, 5) * s for s in (1.5, 2.0, 2.5)] + [-8 * F.one_hot(y, 5).float()]
    )  # member 3 is confidently wrong
    chosen, path = greedy_member_selection(logits, y)
    assert 3 not in chosen
    assert path[0] == pytest.approx(min(mean_prob_nll(logits[[i]], y) for i in range(4)), rel=1e-5)
    assert path[-1] == pytest.approx(mean_prob_nll(logits, y), rel=1e-5)
    assert mean_prob_nll(logits[chosen], y) == pytest.approx(min(path), rel=1e-5)

    ens = MultiSymmetryEnsemble(
        MLP(64, 10, hidden=(8,)),
        num_members=4,
        symmetries=["plain", "invariant-hflip", "equivariant-rot90", "invariant-d4"],
    )
    ens.keep_members([2, 0])
    assert ens.num_members == 2 and ens.symmetries == ["equivariant-rot90", "plain"]
    assert ens(torch.rand(3, 1, 8, 8)).shape == (2, 3, 10)


# ---------------------------------------------------------------------------- construction
def test_registry_default_symmetries_and_errors():
    ens = build_ensemble(
        "symmetry", "mlp", num_members=4, backbone_kwargs={"in_features": 64, "out_features": 10, "hidden": [16]}
    )
    assert ens.symmetries == ["invariant-rot90", "equivariant-rot90"] * 2
    assert not torch.equal(ens.members[0].head.weight, ens.members[2].head.weight)  # re-initialised members
    with pytest.raises(ValueError, match=r"unknown `symmetries` \['invariant-rot45'\]; available: \['plain'"):
        MultiSymmetryEnsemble(MLP(64, 10), num_members=1, symmetries=["invariant-rot45"])
    with pytest.raises(ValueError, match="one per member"):
        MultiSymmetryEnsemble(MLP(64, 10), num_members=3, symmetries=["plain"])
    with pytest.raises(ValueError, match="unknown transformation group 'rot45'"):
        transform(torch.rand(1, 1, 4, 4), "rot45", 1)
    with pytest.raises(ValueError, match="square inputs"):
        transform(torch.rand(1, 1, 4, 5), "rot90", 1)
    assert "equivariant-d4" in available_symmetries()
