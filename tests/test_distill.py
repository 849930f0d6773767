"""Ensemble distillation: Hinton and Hydra objectives, the multi-head student's member-axis contract, checkpoints."""

from __future__ import annotations

import pytest
import torch
from conftest import quiet_trainer

from lightning_ensembles import MLP, DeepEnsemble, EnsembleClassifier, aggregate_probs
from lightning_ensembles.data import DigitsDataModule
from lightning_ensembles.inference import EnsembleCascade
from lightning_ensembles.inference.distill import DistillationModule, MultiHeadStudent, distillation_loss


def _digits():
    dm = DigitsDataModule(batch_size=64)
    dm.setup()
    (x, y) = dm.build()["train"]
    return x, y


def _teacher(x, y, members: int = 3, steps: int = 60) -> DeepEnsemble:
    ens = DeepEnsemble(MLP(64, 10, hidden=(32,)), num_members=members)
    opt = torch.optim.Adam(ens.parameters(), lr=3e-3)
    for _ in range(steps):
        idx = torch.randint(0, len(y), (64,))
        out = ens(x[idx])
        loss = torch.nn.functional.cross_entropy(out.flatten(0, 1), y[idx].repeat(members))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return ens.eval()


def test_multi_head_student_member_axis_contract():
    student = MultiHeadStudent(MLP(64, 10, hidden=(32, 16)), num_heads=5)
    x = torch.randn(7, 1, 8, 8)
    out = student(x)
    assert out.shape == (5, 7, 10)
    for i in range(5):
        torch.testing.assert_close(student.member(i)(x), out[i])
    # Body shared, heads one Linear: parameters = body + 5 heads.
    body = 64 * 32 + 32 + 32 * 16 + 16
    assert sum(p.numel() for p in student.parameters()) == body + 5 * (16 * 10 + 10)
    # Usable wherever an ensemble is: aggregation and cascades.
    assert aggregate_probs(out).shape == (7, 10)
    y = torch.randint(0, 10, (7,))
    casc = EnsembleCascade(student, width=float("inf")).fit(x, y)
    torch.testing.assert_close(casc(x).probs, aggregate_probs(out))


def test_hydra_heads_follow_their_members_and_loss_goes_down():
    torch.manual_seed(0)
    x, y = _digits()
    teacher = _teacher(x, y)
    module = DistillationModule(student=MLP(64, 10, hidden=(32,)), mode="hydra", teacher=teacher, temperature=2.0)
    assert module.student.num_members == 3
    opt = module.configure_optimizers()
    losses = []
    for step in range(150):
        idx = torch.randint(0, len(y), (64,))
        loss = module.training_step((x[idx], y[idx]), step)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert sum(losses[-10:]) / 10 < 0.5 * sum(losses[:10]) / 10
    with torch.no_grad():
        heads, members = module(x).softmax(-1), teacher(x).softmax(-1)
    # Head i is closer to member i than to the other members.
    dist = torch.cdist(heads.flatten(1), members.flatten(1))
    assert torch.equal(dist.argmin(1), torch.arange(3))


def test_hinton_matches_mean_and_hydra_matches_members():
    t = torch.randn(4, 6, 5)
    mean_logits = aggregate_probs(t).log()
    # The ensemble mean is the Hinton optimum at T = 1: its loss is smaller than any single member's.
    best = float(distillation_loss(mean_logits, t, mode="hinton"))
    assert all(best < float(distillation_loss(t[i], t, mode="hinton")) for i in range(4))
    assert float(distillation_loss(t, t, mode="hydra")) == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="num_heads=4"):
        distillation_loss(t[:2], t, mode="hydra")
    with pytest.raises(ValueError, match="target"):
        distillation_loss(t, t, alpha=0.5)


def test_distil_from_checkpoint_with_weights_only(tmp_path):
    teacher_module = EnsembleClassifier(
        backbone="mlp", num_members=2, backbone_kwargs={"in_features": 64, "out_features": 10, "hidden": (32,)}
    )
    trainer = quiet_trainer(max_epochs=8)
    trainer.fit(teacher_module, DigitsDataModule(batch_size=64))
    ckpt = tmp_path / "teacher.ckpt"
    trainer.save_checkpoint(ckpt)

    student = DistillationModule(
        teacher_checkpoint=str(ckpt),
        student="mlp",
        mode="hydra",
        student_kwargs={"in_features": 64, "out_features": 10, "hidden": (32,)},
    )
    assert student.hparams.num_heads == 2  # read from the checkpoint with weights_only=True
    trainer = quiet_trainer(max_epochs=8)
    trainer.fit(student, DigitsDataModule(batch_size=64))
    assert float(trainer.callback_metrics["val/acc"]) > 0.5
    # The teacher is not part of the student's checkpoint, which loads with weights_only=True.
    trainer.save_checkpoint(tmp_path / "student.ckpt")
    state = torch.load(tmp_path / "student.ckpt", weights_only=True)
    assert not any(k.startswith("teacher") for k in state["state_dict"])
    ckpt.unlink()  # loading a trained student needs no teacher
    again = DistillationModule.load_from_checkpoint(tmp_path / "student.ckpt", weights_only=True)
    x = torch.randn(3, 1, 8, 8)
    torch.testing.assert_close(again(x), student(x))


def test_bad_student_and_teacher_are_refused():
    teacher = DeepEnsemble(MLP(4, 3), num_members=2)
    with pytest.raises(ValueError, match="ends in nn.Linear"):
        MultiHeadStudent(torch.nn.Sequential(torch.nn.ReLU()), num_heads=2)
    with pytest.raises(ValueError, match="exactly one"):
        DistillationModule(student=MLP(4, 3))
    with pytest.raises(ValueError, match="one head per member"):
        DistillationModule(student=MLP(4, 3), mode="hydra", num_heads=3, teacher=teacher)


def test_expand_heads_starts_every_head_from_the_first():
    single = MultiHeadStudent(MLP(8, 3, hidden=(16,)), num_heads=1)
    multi = single.expand_heads(4)
    x = torch.randn(5, 8)
    out = multi(x)
    assert out.shape == (4, 5, 3)
    for i in range(4):
        torch.testing.assert_close(out[i], single(x)[0])
    multi.heads.weight.data[3:6] += 1.0  # heads are independent copies, the body is not shared with `single`
    assert not torch.allclose(multi(x)[1], single(x)[0]) and torch.allclose(multi(x)[0], single(x)[0])


def test_mixup_transfer_set_and_label_term():
    from lightning_ensembles.inference import mixup_inputs

    torch.manual_seed(0)
    x = torch.rand(64, 5)
    mixed = mixup_inputs(x, 1.0)
    assert mixed.shape == x.shape and not torch.equal(mixed, x)
    assert (mixed >= x.min() - 1e-6).all() and (mixed <= x.max() + 1e-6).all()  # convex mixes stay in range
    assert torch.equal(mixup_inputs(x, 0.0), x)
    teacher = DeepEnsemble(MLP(5, 3, hidden=(8,)), num_members=2)
    module = DistillationModule(student=MLP(5, 3, hidden=(8,)), mode="hydra", teacher=teacher, mixup=1.0, alpha=0.5)
    y = torch.randint(0, 3, (64,))
    loss = module.training_step((x, y), 0)
    assert torch.isfinite(loss) and loss.requires_grad
    with pytest.raises(ValueError, match="mixup"):
        DistillationModule(student=MLP(5, 3), teacher=teacher, mixup=-1.0)
