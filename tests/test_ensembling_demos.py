"""Lightning's own demo modules and other modules as users write them train with only `Ensembling` added.

Covers the calling conventions the callback must fit: bare tensor batches without targets
(``BoringModel``, ``DemoModel``), a submodule called with several inputs (``Transformer.forward(inputs,
target)``), an inner submodule (a decoder fed by other layers), a decoder input that must stay aligned
with the encoder input, randomness drawn in ``training_step`` before the forward (mixup), manual
optimisation, and one member. WikiText2 (the transformer demo's data) downloads: random tokens here.
"""

import random

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from _ensembling import ensembled_for_training
from conftest import quiet_trainer
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.demos import BoringModel, DemoModel, LightningTransformer
from lightning.pytorch.demos.boring_classes import ManualOptimBoringModel, RandomDataset
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from user_project.classifier import LitClassifier
from user_project.seq2seq import (
    DictOutputClassifier,
    KeywordSeq2SeqTagger,
    MixupClassifier,
    Seq2SeqTagger,
    seq2seq_data,
)

from lightning_ensembles.callbacks import CalibrationMetrics, EnsembledModel, Ensembling
from lightning_ensembles.data import DigitsDataModule
from lightning_ensembles.metrics import ClassificationMetrics


class _Record(Callback):
    """Keeps each evaluation batch with what the step returned, and member copies at the start of training."""

    def __init__(self, attribute: str):
        self.attribute = attribute
        self.steps = {"validate": [], "test": []}
        self.initial_members = []

    def on_train_start(self, trainer, pl_module):
        ens = pl_module.get_submodule(self.attribute).ensemble
        self.initial_members = [ens.member(i) for i in range(ens.num_members)]

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        if not trainer.sanity_checking:
            self.steps["validate"].append((batch.clone(), outputs))

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        self.steps["test"].append((batch.clone(), outputs))


def _members(module, attribute):
    ens = module.get_submodule(attribute).ensemble
    return [ens.member(i).eval() for i in range(ens.num_members)]


def _all_differ(stacked):
    return all(
        not torch.allclose(stacked[i], stacked[j]) for i in range(len(stacked)) for j in range(i + 1, len(stacked))
    )


def test_boring_model_trains_on_bare_tensor_batches_and_evaluates_the_member_mean():
    L.seed_everything(0)
    module = BoringModel()
    record = _Record("layer")
    trainer = quiet_trainer(
        max_epochs=2,
        limit_val_batches=4,
        limit_test_batches=4,
        callbacks=[Ensembling(num_members=3, attribute="layer", task="regression"), record],
    )
    trainer.fit(module)  # batches are bare (1, 32) tensors; the loss makes its own targets
    assert isinstance(module.layer, EnsembledModel) and module.layer.num_members == 3
    assert _all_differ(module.layer.ensemble.stacked_parameters()["weight"])

    # Every member was trained by its own loss: each one's loss fell from its value at the start.
    x = torch.randn(64, 32)
    members = _members(module, "layer")
    with torch.no_grad():
        before = [F.mse_loss(m(x), torch.ones(64, 2)) for m in record.initial_members]
        after = [F.mse_loss(m(x), torch.ones(64, 2)) for m in members]
    assert all(a < 0.5 * b for a, b in zip(after, before)), (before, after)

    # validate / test / predict: the user's steps see the mean of the member outputs.
    record.steps["validate"].clear()  # the fit's own validation
    trainer.validate(module, verbose=False)
    trainer.test(module, verbose=False)
    for stage, key in (("validate", "x"), ("test", "y")):
        assert len(record.steps[stage]) == 4
        for batch, out in record.steps[stage]:
            with torch.no_grad():
                mean = torch.stack([m(batch) for m in members]).mean(0)
            torch.testing.assert_close(out[key], F.mse_loss(mean, torch.ones_like(mean)))
    data = torch.randn(6, 32)
    predicted = torch.cat(trainer.predict(module, DataLoader(data)))  # the default predict_step: self(batch)
    with torch.no_grad():
        torch.testing.assert_close(predicted, torch.stack([m(data) for m in members]).mean(0))


@pytest.mark.parametrize("num_members", [3, 1])
def test_demo_model_trains_each_member_on_bare_tensor_batches(num_members):
    L.seed_everything(0)
    module = DemoModel()
    record = _Record("l1")
    cb = Ensembling(num_members=num_members, attribute=None, task="regression")  # finds the demo's only layer
    trainer = quiet_trainer(max_epochs=2, callbacks=[cb, record])
    trainer.fit(module, DataLoader(RandomDataset(32, 64), batch_size=8))
    assert cb.chosen_attribute == "l1" and module.l1.num_members == num_members
    if num_members > 1:
        assert _all_differ(module.l1.ensemble.stacked_parameters()["weight"])
    x = torch.randn(16, 32)
    members = _members(module, "l1")
    with torch.no_grad():
        # The demo's loss is the sum of its ReLU outputs: every member drove its own down.
        before = [torch.relu(m(x)).sum() for m in record.initial_members]
        after = [torch.relu(m(x)).sum() for m in members]
        assert all(a < 0.5 * b for a, b in zip(after, before)), (before, after)
        torch.testing.assert_close(module.eval()(x), torch.relu(torch.stack([m(x) for m in members]).mean(0)))


def _token_data(vocab=16, n=64, length=8):
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, vocab, (n, length + 1), generator=g)
    return TensorDataset(tokens[:, :-1], tokens[:, 1:])


def _transformer(vocab):
    module = LightningTransformer(vocab_size=vocab)
    module.prepare_data = lambda: None  # the demo downloads WikiText2 here; these tests bring their own tokens
    return module


def _log_mean_prob(member_log_probs):
    return torch.logsumexp(torch.stack(member_log_probs).log_softmax(-1), 0) - np.log(len(member_log_probs))


def test_transformer_with_two_inputs_trains_and_evaluates_the_ensemble():
    L.seed_everything(0)
    vocab = 16
    data = _token_data(vocab)
    module = _transformer(vocab)
    cb = Ensembling(num_members=2)
    nll = lambda m, a, b: F.nll_loss(m(a, b), b.reshape(-1))  # noqa: E731
    inputs, target = data.tensors
    start = {}
    trainer = quiet_trainer(
        max_epochs=3,
        callbacks=[
            cb,
            _OnTrainStart(lambda pl: start.update(nll=[nll(m, inputs, target) for m in _members(pl, "model")])),
        ],
    )
    trainer.fit(module, DataLoader(data, batch_size=8))
    assert cb.probed_call == "model(Tensor[2, 8], Tensor[2, 8])"  # how training_step really calls it
    assert module.model.num_members == 2
    assert _all_differ(module.model.ensemble.stacked_parameters()["decoder.weight"])
    members = _members(module, "model")
    with torch.no_grad():
        after = [nll(m, inputs, target) for m in members]
        assert all(a < b - 0.3 for a, b in zip(after, start["nll"])), (start["nll"], after)
        expected = _log_mean_prob([m(inputs, target) for m in members])
        torch.testing.assert_close(module.eval()(inputs, target), expected, atol=1e-5, rtol=1e-5)


class _OnTrainStart(Callback):
    def __init__(self, fn):
        self.fn = fn

    def on_train_start(self, trainer, pl_module):
        with torch.no_grad():
            self.fn(pl_module.eval())
        pl_module.train()


def test_an_inner_decoder_is_ensembled_where_it_is_called():
    L.seed_everything(0)
    vocab = 16
    data = _token_data(vocab)
    module = _transformer(vocab)
    cb = Ensembling(num_members=3, attribute="model.decoder")
    quiet_trainer(max_epochs=1, callbacks=[cb]).fit(module, DataLoader(data, batch_size=8))
    assert cb.probed_call == "model.decoder(Tensor[2, 8, 200])"  # fed by the transformer body, not the batch
    assert isinstance(module.model.decoder, EnsembledModel) and module.model.decoder.num_members == 3
    assert _all_differ(module.model.decoder.ensemble.stacked_parameters()["weight"])
    seen = {}
    module.model.decoder.register_forward_pre_hook(lambda mod, args: seen.update(h=args[0]))
    inputs, target = data.tensors[0][:4], data.tensors[1][:4]
    with torch.no_grad():
        out = module.eval()(inputs, target)
        expected = _log_mean_prob([m(seen["h"]).log_softmax(-1) for m in _members(module, "model.decoder")])
    torch.testing.assert_close(out, expected.reshape(-1, vocab), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("method", "attribute", "user_module"),
    [
        ("deep", "model", Seq2SeqTagger),
        ("deep", "model.head", Seq2SeqTagger),
        ("batch", "model", Seq2SeqTagger),
        ("deep", "model", KeywordSeq2SeqTagger),
        ("batch", "model", KeywordSeq2SeqTagger),
    ],
)
def test_decoder_input_stays_aligned_and_the_users_metric_measures_the_ensemble(method, attribute, user_module):
    L.seed_everything(0)
    src, dec, labels = seq2seq_data()
    train = DataLoader(TensorDataset(src[:192], dec[:192], labels[:192]), batch_size=32, shuffle=True)
    val = DataLoader(TensorDataset(src[192:], dec[192:], labels[192:]), batch_size=64)
    module = user_module()
    trainer = quiet_trainer(max_epochs=6, callbacks=[Ensembling(method, num_members=3, attribute=attribute)])
    trainer.fit(module, train, val)
    members = _members(module, attribute)
    with torch.no_grad():
        if attribute == "model":
            logits = [m(src[192:], dec[192:]) for m in members]
        else:  # the head gets the two embeddings, computed once outside it
            body = module.model
            h = torch.cat([body.src_embedding(src[192:]), body.tgt_embedding(dec[192:])], dim=-1)
            logits = [m(h) for m in members]
        probs = torch.stack(logits).softmax(-1).mean(0)
    acc = (probs.argmax(-1) == labels[192:]).float().mean()
    assert float(trainer.callback_metrics["val_acc"]) == pytest.approx(float(acc), abs=1e-6)
    assert acc > 0.5  # chance is 1/8


def test_split_mode_gives_each_sample_to_one_member_also_for_flattened_token_outputs():
    torch.manual_seed(0)
    vocab, length = 16, 8
    module = _transformer(vocab)
    for mod in module.modules():  # no dropout, so that the members' outputs can be recomputed
        if isinstance(mod, nn.Dropout):
            mod.p = 0.0
        if isinstance(mod, nn.MultiheadAttention):
            mod.dropout = 0.0
    Ensembling(num_members=2, batch="split").apply(module)
    inputs, target = _token_data(vocab).tensors
    inputs, target = inputs[:5], target[:5]
    out = module.train()(inputs, target)  # (B * T, V): T rows per sample
    ens = module.model.ensemble
    owner = [0, 0, 0, 1, 1]  # chunk i -> member i
    with torch.no_grad():
        for b in range(5):
            expected = ens.member(owner[b]).train()(inputs[b : b + 1], target[b : b + 1])
            torch.testing.assert_close(out[b * length : (b + 1) * length], expected, atol=1e-5, rtol=1e-5)


def test_randomness_before_the_forward_is_replayed_for_every_member():
    module = MixupClassifier()
    cb = ensembled_for_training(module, num_members=3)
    x, y = torch.randn(16, 1, 8, 8), torch.randint(0, 10, (16,))
    for step in range(3):  # the first step finds out that NumPy is used, the second knows,
        if step == 2:  # the third starts drawing from NumPy after steps that did not
            module.model.__dict__["_host_random"] = False
        torch.manual_seed(step)
        np.random.seed(step)
        loss = module.training_step((x, y), step)
        torch.manual_seed(step)
        np.random.seed(step)
        perm, lam = torch.randperm(16), float(np.random.beta(0.4, 0.4))
        members = module.model.ensemble(lam * x + (1 - lam) * x[perm])
        expected = torch.stack(
            [lam * F.cross_entropy(m, y) + (1 - lam) * F.cross_entropy(m, y[perm]) for m in members]
        ).mean()
        torch.testing.assert_close(loss, expected)
    with pytest.raises(RuntimeError, match="same calls for every member"):

        def twice_for_member_0(batch, batch_idx):
            n = 2 if module.model._passes.member == 0 else 1
            return sum(F.cross_entropy(module(batch[0]), batch[1]) for _ in range(n))

        _patched_with(module, cb, twice_for_member_0).training_step((x, y), 0)


def _patched_with(module, cb, step):
    module.training_step = step
    cb._original_training_step = None
    cb._patch_training_step(module)
    return module


class _LoggedLoss(Callback):
    def __init__(self):
        self.pairs = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.pairs.append((float(outputs["loss"]), float(trainer.callback_metrics["train_loss"])))


def test_a_logged_value_is_logged_once_as_the_member_mean():
    L.seed_everything(0)
    logged = _LoggedLoss()
    trainer = quiet_trainer(
        max_epochs=1, limit_train_batches=3, limit_val_batches=0, callbacks=[Ensembling(num_members=3), logged]
    )
    trainer.fit(MixupClassifier(), DigitsDataModule(batch_size=32))
    assert len(logged.pairs) == 3
    for returned, shown in logged.pairs:  # the step returned the member mean, and logged the same
        assert shown == pytest.approx(returned, rel=1e-6)


def test_setup_errors_name_the_problem_and_the_fix():
    with pytest.raises(
        ValueError, match=r"returned a dict of 2 items \(keys \['logits', 'hidden'\]\).*Point `attribute`"
    ):
        quiet_trainer(max_epochs=1, callbacks=[Ensembling(num_members=2)]).fit(
            DictOutputClassifier(), DigitsDataModule(batch_size=32)
        )

    class Unused(BoringModel):
        def __init__(self):
            super().__init__()
            self.spare = nn.Linear(32, 2)

    with pytest.raises(ValueError, match=r"never called `spare`.*attribute="):
        quiet_trainer(max_epochs=1, callbacks=[Ensembling(num_members=2, attribute="spare")]).fit(Unused())

    # An ensemble that builds its own training batches predicts targets the user's loss does not have.
    with pytest.raises(ValueError, match=r"MIMO predicts 128 targets per member for a batch of 64.*batch_repetition=1"):
        quiet_trainer(
            max_epochs=1, callbacks=[Ensembling(method="mimo", num_members=2, method_kwargs={"batch_repetition": 2})]
        ).fit(LitClassifier(), DigitsDataModule(batch_size=64))

    loader = DataLoader(RandomDataset(32, 32), batch_size=8)
    with pytest.raises(ValueError, match=r"manual optimisation.*batch='split'"):
        quiet_trainer(max_epochs=1, callbacks=[Ensembling(num_members=2, attribute="layer")]).fit(
            ManualOptimBoringModel(), loader
        )
    module = ManualOptimBoringModel()
    quiet_trainer(max_epochs=1, callbacks=[Ensembling(num_members=2, attribute="layer", batch="split")]).fit(
        module, loader
    )
    assert module.layer.num_members == 2


def test_one_member_through_the_callback_keeps_the_member_axis_and_index():
    L.seed_everything(0)
    dm = DigitsDataModule(batch_size=64)
    module = LitClassifier()
    cb = Ensembling(num_members=1)
    cal = CalibrationMetrics(metrics=["nll", "disagreement"])
    trainer = quiet_trainer(max_epochs=2, callbacks=[cb, cal])
    trainer.fit(module, dm)
    assert module.model.num_members == 1 and cal.last_results["val"]["disagreement"] == 0.0
    x, y = dm.splits["val"].tensors
    (member,) = _members(module, "model")
    with torch.no_grad():
        torch.testing.assert_close(module.eval()(x).softmax(-1), member(x).softmax(-1))
        preds = cb.member_predictions(module, (x, y))
    assert preds["member_logits"].shape == (1, len(y), 10)
    metrics = ClassificationMetrics(num_classes=10, prefix="val/")
    metrics.update(preds["member_logits"], preds["target"])
    results = metrics.compute()
    assert float(results["val/member_acc/0"]) == pytest.approx(float(trainer.callback_metrics["val_acc"]), abs=1e-6)
    # Training with one member: the step sees the member's own output (no passes to average).
    fresh = LitClassifier()
    ensembled_for_training(fresh, num_members=1)
    torch.testing.assert_close(
        fresh.training_step((x[:8], y[:8]), 0), F.cross_entropy(fresh.model.ensemble(x[:8])[0], y[:8])
    )


class _RandomStateAtSetup(Callback):
    def setup(self, trainer, pl_module, stage):
        self.state = (torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate())


def test_the_setup_probe_leaves_the_random_state_as_it_found_it(monkeypatch):
    # The probe draws a shuffled batch and runs a training_step that draws from torch and NumPy; the
    # random state after setup (which also draws the members' weights) must be that of an unprobed setup.
    def setup_state(probe):
        L.seed_everything(0)
        after, cb = _RandomStateAtSetup(), Ensembling(num_members=2)
        if not probe:
            monkeypatch.setattr(cb, "_probe", lambda *args: None)
        quiet_trainer(max_epochs=1, limit_train_batches=1, limit_val_batches=0, callbacks=[cb, after]).fit(
            MixupClassifier(), DigitsDataModule(batch_size=32)
        )
        return cb.probed_call, after.state

    (call, probed), (_, unprobed) = setup_state(True), setup_state(False)
    assert call == "model(Tensor[2, 1, 8, 8])"
    assert torch.equal(probed[0], unprobed[0])
    assert np.array_equal(probed[1], unprobed[1]) and probed[2] == unprobed[2]
