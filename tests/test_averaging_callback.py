"""The MemberWeightAveraging callback on a tiny LightningModule (the "any LightningModule" case) and EnsembleClassifier."""

import copy

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from conftest import quiet_trainer
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch import nn
from torch.optim.swa_utils import update_bn as torch_update_bn
from torch.utils.data import DataLoader, TensorDataset

from lightning_ensembles import DeepEnsemble
from lightning_ensembles.averaging import SWAGEnsemble
from lightning_ensembles.callbacks.weight_averaging import MemberWeightAveraging


def _data(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 5, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
    return TensorDataset(x, y)


class TinyModule(L.LightningModule):
    """A user's own LightningModule: averaging must work without any library base class."""

    def __init__(self, lr=0.1, optimizer="sgd", scheduler=False, storage="auto"):
        super().__init__()
        torch.manual_seed(0)
        self.net = DeepEnsemble(
            nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3)), 2, storage=storage
        )
        self.lr, self.optimizer, self.scheduler = lr, optimizer, scheduler
        self.val_weights = []  # (epoch, weights seen by validation)

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        out = self(x)
        return F.cross_entropy(out.flatten(0, 1), y.repeat(out.shape[0]))

    def validation_step(self, batch, batch_idx):
        x, y = batch
        out = self(x)
        self.log("val_loss", F.cross_entropy(out.flatten(0, 1), y.repeat(out.shape[0])))

    def on_validation_epoch_start(self):  # runs after the callbacks' hook, so it sees swapped weights
        if not self.trainer.sanity_checking:
            self.val_weights.append((self.current_epoch, _params(self.net)))

    def configure_optimizers(self):
        opt = (
            torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)
            if self.optimizer == "sgd"
            else torch.optim.Adam(self.parameters(), lr=self.lr)
        )
        if self.scheduler:
            return [opt], [torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.5)]
        return opt

    def train_dataloader(self):
        return DataLoader(_data(), batch_size=16)  # no shuffling: runs are exactly reproducible

    def val_dataloader(self):
        return DataLoader(_data(32, seed=1), batch_size=16)


class Recorder(Callback):
    """Records the trained weights at the end of each epoch (independent of MemberWeightAveraging)."""

    def __init__(self):
        self.epoch_end = []
        self.step_end = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.step_end.append((trainer.global_step, _params(pl_module.net)))

    def on_train_epoch_end(self, trainer, pl_module):
        self.epoch_end.append(_params(pl_module.net))


def _params(module):
    return {n: p.detach().clone() for n, p in module.named_parameters()}


def _mean(snapshots):
    return {n: torch.stack([s[n] for s in snapshots]).mean(0) for n in snapshots[0]}


def _assert_params(a, b, atol=1e-6):
    for n in a:
        torch.testing.assert_close(a[n], b[n], atol=atol, rtol=0, msg=n)


def test_swa_callback_averages_epoch_ends_and_never_evaluates_an_empty_average():
    model, rec = TinyModule(), Recorder()
    cb = MemberWeightAveraging("swa", attribute="net", start_epoch=2, update_bn=False)
    quiet_trainer(max_epochs=4, callbacks=[cb, rec]).fit(model)
    assert cb.averager.n_averaged == 2
    expected = _mean(rec.epoch_end[2:])
    _assert_params(_params(model.net), expected)  # averaged weights written into the model at the end
    for epoch, seen in model.val_weights:
        if epoch < 2:  # nothing averaged yet: validation runs on the trained weights
            _assert_params(seen, rec.epoch_end[epoch], atol=0)
        else:  # validation of epoch e runs on the mean of epoch ends 2..e
            _assert_params(seen, _mean(rec.epoch_end[2 : epoch + 1]))


def test_step_interval_updates_every_n_steps():
    model, rec = TinyModule(optimizer="adam", lr=1e-2), Recorder()
    cb = MemberWeightAveraging("ema", attribute="net", interval="step", every_n=3, decay=0.8)
    quiet_trainer(max_epochs=2, callbacks=[cb, rec]).fit(model)
    snaps = [w for step, w in rec.step_end if step % 3 == 0]
    assert cb.averager.n_averaged == len(snaps) == 8 // 3
    expected = snaps[0]
    for s in snaps[1:]:
        expected = {n: 0.8 * expected[n] + 0.2 * s[n] for n in s}
    _assert_params(_params(model.net), expected)


@pytest.mark.parametrize("storage", ["stacked", "per_member"])
def test_batchnorm_recomputed_per_member_after_fit(storage):
    model = TinyModule(storage=storage)
    cb = MemberWeightAveraging("swa", attribute="net", start_epoch=1)
    quiet_trainer(max_epochs=3, callbacks=[cb]).fit(model)
    loader = model.train_dataloader()
    for i in range(2):
        member = model.net.member(i)
        ref = copy.deepcopy(member)
        torch_update_bn(loader, ref)
        for b, r in zip(member.buffers(), ref.buffers()):
            torch.testing.assert_close(b, r, atol=1e-6, rtol=1e-6)


def _run(tmp_path, cb_kwargs, max_epochs, ckpt_path=None, name="a", storage="auto"):
    model = TinyModule(optimizer="sgd", lr=0.1, scheduler=True, storage=storage)
    cb = MemberWeightAveraging(attribute="net", **cb_kwargs)
    ckpt = ModelCheckpoint(dirpath=tmp_path / name, save_last=True, every_n_epochs=1, save_top_k=-1)
    trainer = quiet_trainer(max_epochs=max_epochs, callbacks=[cb, ckpt], enable_checkpointing=True)
    trainer.fit(model, ckpt_path=ckpt_path)
    return model, cb, trainer


@pytest.mark.parametrize(
    "cb_kwargs",
    [
        dict(method="swa", start_epoch=1, swa_lr=0.02, annealing_epochs=2),
        dict(method="ema", interval="step", every_n=2, decay=0.7),
        dict(method="swag", start_epoch=1, max_rank=2, num_samples=0),
        dict(method="swag", start_epoch=1, max_rank=2, num_samples=0, storage="per_member"),
    ],
    ids=["swa+swalr", "ema-steps", "swag", "swag-per-member"],
)
def test_interrupt_and_resume_gives_the_same_average(tmp_path, cb_kwargs):
    cb_kwargs = dict(cb_kwargs)
    storage = cb_kwargs.pop("storage", "auto")
    full_model, full_cb, full_trainer = _run(tmp_path, cb_kwargs, max_epochs=4, name="full", storage=storage)
    _run(tmp_path, cb_kwargs, max_epochs=2, name="part", storage=storage)  # stopped mid-averaging
    ckpt = tmp_path / "part" / "last.ckpt"
    resumed_model, resumed_cb, resumed_trainer = _run(
        tmp_path, cb_kwargs, max_epochs=4, ckpt_path=ckpt, name="res", storage=storage
    )
    assert resumed_cb.averager.n_averaged == full_cb.averager.n_averaged > 1
    _assert_params(_params(resumed_model.net), _params(full_model.net), atol=1e-6)
    for n in full_cb.averager.average:
        torch.testing.assert_close(resumed_cb.averager.average[n], full_cb.averager.average[n], atol=1e-6, rtol=0)
    if cb_kwargs["method"] == "swag":
        for n in full_cb.averager.sq_mean:
            torch.testing.assert_close(resumed_cb.averager.sq_mean[n], full_cb.averager.sq_mean[n], atol=1e-6, rtol=0)
            torch.testing.assert_close(
                resumed_cb.averager.deviations[n], full_cb.averager.deviations[n], atol=1e-6, rtol=0
            )
    lr_full = full_trainer.optimizers[0].param_groups[0]["lr"]
    assert resumed_trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(lr_full)
    if "swa_lr" in cb_kwargs:
        assert lr_full == pytest.approx(cb_kwargs["swa_lr"])  # annealed to the SWA lr, StepLR stopped


class TwoOptimizers(TinyModule):
    """Manual optimisation with two optimisers: Lightning's own StochasticWeightAveraging refuses this."""

    def __init__(self):
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        opt_a, opt_b = self.optimizers()
        loss = super().training_step(batch, batch_idx)
        opt_a.zero_grad()
        opt_b.zero_grad()
        self.manual_backward(loss)
        opt_a.step()
        opt_b.step()

    def configure_optimizers(self):
        params = list(self.parameters())
        return [torch.optim.SGD(params[:2], lr=0.1), torch.optim.SGD(params[2:], lr=0.2)]


def test_several_optimizers_with_swa_schedule():
    model, rec = TwoOptimizers(), Recorder()
    cb = MemberWeightAveraging("swa", attribute="net", start_epoch=1, swa_lr=0.01, annealing_epochs=1, update_bn=False)
    trainer = quiet_trainer(max_epochs=3, callbacks=[cb, rec])
    trainer.fit(model)
    assert [opt.param_groups[0]["lr"] for opt in trainer.optimizers] == pytest.approx([0.01, 0.01])
    _assert_params(_params(model.net), _mean(rec.epoch_end[1:]))


def test_whole_module_is_averaged_by_default():
    model, rec = TinyModule(), Recorder()
    cb = MemberWeightAveraging("swa", start_epoch=0, update_bn=False)
    quiet_trainer(max_epochs=2, callbacks=[cb, rec]).fit(model)
    assert set(cb.averager.average) == {f"net.{n}" for n in rec.epoch_end[0]}
    _assert_params(_params(model.net), _mean(rec.epoch_end))


def test_swag_evaluates_an_ensemble_of_draws_per_member():
    from lightning_ensembles import EnsembleClassifier
    from lightning_ensembles.data import DigitsDataModule

    model = EnsembleClassifier(
        backbone="mlp", num_members=2, backbone_kwargs={"in_features": 64, "out_features": 10, "hidden": (32,)}
    )
    cb = MemberWeightAveraging("swag", attribute="ensemble", start_epoch=0, max_rank=3, num_samples=3)
    trainer = quiet_trainer(
        max_epochs=3, callbacks=[cb], limit_train_batches=5, limit_val_batches=1, limit_test_batches=2
    )
    trainer.fit(model, DigitsDataModule(batch_size=32))
    assert isinstance(cb.swag_ensemble, SWAGEnsemble) and cb.swag_ensemble.num_members == 6
    trainer.test(model, DigitsDataModule(batch_size=32))
    assert "test/member_acc/5" in trainer.callback_metrics  # 3 draws x 2 members were evaluated
    assert isinstance(model.ensemble, DeepEnsemble)  # restored after testing


def test_bad_arguments():
    with pytest.raises(ValueError, match="method"):
        MemberWeightAveraging("polyak")
    with pytest.raises(ValueError, match="start_epoch"):
        MemberWeightAveraging(start_epoch=1.5)
    with pytest.raises(ValueError, match="every_n"):
        MemberWeightAveraging(every_n=0)
    with pytest.raises(ValueError, match="attribute"):
        quiet_trainer(max_epochs=1, callbacks=[MemberWeightAveraging(attribute="nope")]).fit(TinyModule())
