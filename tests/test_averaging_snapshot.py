"""SnapshotEnsemble: cyclic cosine schedule, one member per cycle, evaluation and resume."""

import math

import pytest
import torch
from conftest import quiet_trainer
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch import nn

from lightning_ensembles import DeepEnsemble, EnsembleClassifier
from lightning_ensembles.averaging.snapshot import cyclic_cosine_lr, snapshot_ensemble
from lightning_ensembles.callbacks.snapshot import SnapshotEnsemble
from lightning_ensembles.data import DigitsDataModule


class LRAndWeights(Callback):
    def __init__(self):
        self.lrs, self.weights = [], {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.weights[trainer.global_step] = {k: v.detach().clone() for k, v in pl_module.ensemble.state_dict().items()}


def _model():
    torch.manual_seed(0)
    return EnsembleClassifier(
        backbone="mlp",
        num_members=1,
        optimizer="sgd",
        lr=0.1,
        backbone_kwargs={"in_features": 64, "out_features": 10, "hidden": (32,)},
    )


class _DM(DigitsDataModule):
    def train_dataloader(self):  # fixed order: resumed and uninterrupted runs see the same batches
        return self._loader("train", shuffle=False)


def _fit(callbacks, max_epochs=3, ckpt_path=None, **kw):
    model = _model()
    trainer = quiet_trainer(
        max_epochs=max_epochs, callbacks=callbacks, limit_train_batches=4, limit_val_batches=1, **kw
    )
    trainer.fit(model, _DM(batch_size=32), ckpt_path=ckpt_path)
    return model, trainer


def test_cyclic_cosine_matches_huang_et_al():
    lr0, T, M = 0.2, 12, 3
    ceil = math.ceil(T / M)
    for t in range(1, T + 1):  # the paper's 1-based formula
        paper = lr0 / 2 * (math.cos(math.pi * ((t - 1) % ceil) / ceil) + 1)
        assert cyclic_cosine_lr(t - 1, ceil, lr0) == pytest.approx(paper)


def test_schedule_snapshots_and_evaluation():
    rec = LRAndWeights()
    snap = SnapshotEnsemble(num_cycles=3, attribute="ensemble", lr_min=0.01)
    model, trainer = _fit([snap, rec], max_epochs=3)  # 12 steps, 3 cycles of 4
    assert snap.steps_per_cycle == 4
    assert rec.lrs == pytest.approx([cyclic_cosine_lr(s, 4, 0.1, 0.01) for s in range(12)])
    assert len(snap.snapshots) == 3
    for k, step in enumerate((4, 8, 12)):  # each cycle's final weights
        for name, t in rec.weights[step].items():
            assert torch.equal(snap.snapshots[k][name], t)
    ens = snap.ensemble()
    assert isinstance(ens, DeepEnsemble) and ens.num_members == 3
    x = torch.randn(5, 1, 8, 8)
    ref = model.ensemble.member(0)
    ref.load_state_dict({k.split(".", 1)[1].replace("-", "."): v[0] for k, v in snap.snapshots[1].items()})
    torch.testing.assert_close(ens.eval()(x)[1], ref.eval()(x), atol=1e-6, rtol=0)
    trainer.test(model, _DM(batch_size=32))
    assert "test/member_acc/2" in trainer.callback_metrics  # the 3 snapshots were evaluated as members
    assert model.ensemble.num_members == 1  # the trained model is restored after testing


def test_last_shorter_cycle_still_gives_a_snapshot():
    snap = SnapshotEnsemble(num_cycles=3, attribute="ensemble")
    _fit([snap], max_epochs=5)  # 20 steps -> cycles of 7, 7, 6
    assert snap.steps_per_cycle == 7 and len(snap.snapshots) == 3


class _Crash(Callback):
    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == 2:
            raise RuntimeError("simulated crash")


def test_resume_gives_the_same_snapshots(tmp_path):
    # 2 cycles of 6 steps over 3 epochs of 4 steps; the crash comes after step 8, in the middle of cycle 2.
    full = SnapshotEnsemble(num_cycles=2, attribute="ensemble")
    _fit([full], max_epochs=3)
    part = SnapshotEnsemble(num_cycles=2, attribute="ensemble")
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    with pytest.raises(RuntimeError, match="simulated crash"):
        _fit([part, ckpt, _Crash()], max_epochs=3, enable_checkpointing=True)
    assert len(part.snapshots) == 1
    resumed = SnapshotEnsemble(num_cycles=2, attribute="ensemble")
    _fit(
        [resumed, ModelCheckpoint(dirpath=tmp_path)],
        max_epochs=3,
        ckpt_path=tmp_path / "last.ckpt",
        enable_checkpointing=True,
    )
    assert len(resumed.snapshots) == len(full.snapshots) == 2
    for a, b in zip(full.snapshots, resumed.snapshots):
        for k in a:
            torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=0)


def test_snapshot_ensemble_of_plain_models_and_errors():
    net = nn.Linear(3, 2)
    snaps = [{"weight": torch.full((2, 3), float(k)), "bias": torch.zeros(2)} for k in range(2)]
    ens = snapshot_ensemble(net, snaps)
    torch.testing.assert_close(ens(torch.ones(1, 3))[:, 0, 0], torch.tensor([0.0, 3.0]))
    with pytest.raises(ValueError, match="no snapshots"):
        snapshot_ensemble(net, [])
    with pytest.raises(ValueError, match="num_cycles"):
        SnapshotEnsemble(num_cycles=0)
