import subprocess
import sys
import textwrap

import lightning as L
import pytest
import torch
from conftest import quiet_trainer
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_ensembles import MLP, DeepEnsemble, EnsembleClassifier, EnsembleRegressor
from lightning_ensembles.data import DigitsDataModule, ToyRegressionDataModule

MLP_KW = {"in_features": 64, "out_features": 10, "hidden": [64]}


def test_classifier_trains_and_logs_ensemble_and_member_metrics():
    L.seed_everything(0)
    dm = DigitsDataModule(batch_size=64)
    model = EnsembleClassifier(backbone="mlp", num_members=3, backbone_kwargs=MLP_KW, lr=3e-3)
    trainer = quiet_trainer(max_epochs=4)
    trainer.fit(model, dm)
    (res,) = trainer.test(model, dm, verbose=False)
    assert res["test/acc"] > 0.85
    for key in ("test/nll", "test/brier", "test/ece", "test/disagreement", "test/mutual_information"):
        assert key in res
    member_nll = [res[f"test/member_nll/{i}"] for i in range(3)]
    # Jensen: the NLL of the averaged prediction is at most the mean member NLL.
    assert res["test/nll"] <= sum(member_nll) / 3 + 1e-6
    # Independently recompute the ensemble accuracy from member outputs.
    x, y = dm.splits["test"].tensors
    model.eval()
    with torch.no_grad():
        acc = (model(x).softmax(-1).mean(0).argmax(-1) == y).float().mean().item()
    assert res["test/acc"] == pytest.approx(acc, abs=1e-6)


def test_training_loss_goes_down_and_members_end_different():
    L.seed_everything(0)
    ens = DeepEnsemble(MLP(64, 10, hidden=(64,)), num_members=2)
    model = EnsembleClassifier(ens, lr=3e-3)
    dm = DigitsDataModule(batch_size=128)
    dm.setup()
    x, y = dm.splits["train"].tensors
    before = model.member_loss(model(x), y).item()
    quiet_trainer(max_epochs=8, limit_val_batches=0).fit(model, dm)
    after = model.member_loss(model(x), y).item()
    assert after < 0.5 * before
    w = ens.stacked_parameters()["net.1.weight"]
    assert not torch.allclose(w[0], w[1])


def test_predict_step_returns_probabilities_and_uncertainty():
    model = EnsembleClassifier(backbone="mlp", num_members=3, backbone_kwargs=MLP_KW)
    x = torch.randn(5, 1, 8, 8)
    out = model.predict_step((x, torch.zeros(5, dtype=torch.long)), 0)
    assert out["probs"].shape == (5, 10) and out["member_probs"].shape == (3, 5, 10)
    torch.testing.assert_close(out["probs"].sum(-1), torch.ones(5))
    p, mp = out["probs"], out["member_probs"]
    h = lambda q: -(q * q.log()).sum(-1)  # noqa: E731
    torch.testing.assert_close(out["mutual_information"], h(p) - h(mp).mean(0), atol=1e-5, rtol=1e-4)
    assert (out["mutual_information"] >= -1e-6).all()


def test_two_test_dataloaders_second_is_ood():
    L.seed_everything(0)
    dm = DigitsDataModule(batch_size=128, ood_classes=(8, 9))
    model = EnsembleClassifier(backbone="mlp", num_members=2, backbone_kwargs=MLP_KW, lr=3e-3)
    trainer = quiet_trainer(max_epochs=3)
    trainer.fit(model, dm)
    results = trainer.test(model, dm, verbose=False)
    assert len(results) == 2
    for score in ("msp", "entropy", "mi"):
        assert 0.0 <= results[0][f"test/ood_auroc_{score}"] <= 1.0
    assert results[0]["test/ood_auroc_msp"] > 0.6  # held-out digits are less confident


def test_bad_targets_and_arguments_raise_clear_errors():
    model = EnsembleClassifier(backbone="mlp", num_members=2, backbone_kwargs=MLP_KW)
    out = model(torch.randn(4, 64))
    with pytest.raises(ValueError, match="do not fit"):
        model.member_loss(out, torch.zeros(4, 10, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\[0, 9\]"):
        model.member_loss(out, torch.full((4,), 12))
    with pytest.raises(ValueError, match="exactly one"):
        EnsembleClassifier()
    with pytest.raises(ValueError, match="num_members"):
        EnsembleClassifier(backbone="mlp", num_members=0, backbone_kwargs=MLP_KW)
    with pytest.raises(ValueError, match="not a timm model name"):
        EnsembleClassifier(backbone="no_such_net", num_members=2)
    reg = EnsembleRegressor(backbone="mlp", num_members=2, backbone_kwargs={"in_features": 1, "out_features": 3})
    with pytest.raises(ValueError, match="needs 2"):
        reg.member_loss(reg(torch.randn(4, 1)), torch.randn(4, 1))
    reg = EnsembleRegressor(backbone="mlp", num_members=2, backbone_kwargs={"in_features": 1, "out_features": 2})
    with pytest.raises(ValueError, match="do not fit"):
        reg.member_loss(reg(torch.randn(4, 1)), torch.randn(3, 1))


def test_checkpoint_restores_in_a_fresh_process(tmp_path):
    L.seed_everything(0)
    dm = DigitsDataModule(batch_size=128)
    model = EnsembleClassifier(backbone="mlp", num_members=3, backbone_kwargs=MLP_KW)
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    quiet_trainer(max_epochs=2, enable_checkpointing=True, callbacks=[ckpt]).fit(model, dm)
    dm.setup()
    x = dm.splits["test"].tensors[0][:32]
    model.eval()
    with torch.no_grad():
        expected = model(x)
    torch.save(x, tmp_path / "x.pt")
    torch.save(expected, tmp_path / "expected.pt")
    script = textwrap.dedent(
        f"""
        import torch
        from lightning_ensembles import EnsembleClassifier
        m = EnsembleClassifier.load_from_checkpoint(r"{tmp_path / "last.ckpt"}", map_location="cpu").eval()
        with torch.no_grad():
            out = m(torch.load(r"{tmp_path / "x.pt"}"))
        assert torch.equal(out, torch.load(r"{tmp_path / "expected.pt"}")), (out - torch.load(r"{tmp_path / "expected.pt"}")).abs().max()
        print("IDENTICAL")
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "IDENTICAL" in proc.stdout


def test_module_backbone_checkpoint_needs_the_module_again(tmp_path):
    model = EnsembleClassifier(backbone=MLP(64, 10), num_members=2)
    trainer = quiet_trainer(max_epochs=1, limit_train_batches=2, limit_val_batches=1)
    trainer.fit(model, DigitsDataModule())
    trainer.save_checkpoint(tmp_path / "m.ckpt")
    assert "backbone" not in torch.load(tmp_path / "m.ckpt", weights_only=True)["hyper_parameters"]
    with pytest.raises(ValueError, match="exactly one"):
        EnsembleClassifier.load_from_checkpoint(tmp_path / "m.ckpt")
    again = EnsembleClassifier.load_from_checkpoint(tmp_path / "m.ckpt", backbone=MLP(64, 10))
    torch.testing.assert_close(
        again.ensemble.stacked_parameters()["net.1.weight"], model.ensemble.stacked_parameters()["net.1.weight"]
    )


def test_regressor_epistemic_variance_rises_in_the_gap():
    L.seed_everything(0)
    dm = ToyRegressionDataModule(num_train=512, batch_size=64)
    model = EnsembleRegressor(
        backbone="mlp",
        num_members=5,
        backbone_kwargs={"in_features": 1, "out_features": 2, "hidden": [64, 64]},
        lr=5e-3,
    )
    trainer = quiet_trainer(max_epochs=40, limit_val_batches=0)
    trainer.fit(model, dm)
    model.eval()
    x_train = dm.splits["train"].tensors[0]
    x_gap = torch.linspace(-1.5, 1.5, 50)[:, None]
    with torch.no_grad():
        ep_train = model.predict_step((x_train,), 0)["epistemic"].mean()
        ep_gap = model.predict_step((x_gap,), 0)["epistemic"].mean()
        ale = model.predict_step((torch.tensor([[-4.5], [4.5], [-2.5], [2.5]]),), 0)["aleatoric"]
    assert ep_gap > 2 * ep_train
    # Aleatoric noise grows with |x| in the toy: larger at |x| = 4.5 than at 2.5.
    assert ale[:2].mean() > ale[2:].mean()
    (res,) = trainer.test(model, dm, verbose=False)
    assert {"test/rmse", "test/nll", "test/coverage90"} <= set(res)
