"""Save every stateful module/callback after a short fit, then reload it in a *fresh process* with
``weights_only=True`` and compare predictions exactly.

    python state_roundtrip.py save DIR     # trains, writes DIR/<case>.ckpt and DIR/<case>.ref.pt
    python state_roundtrip.py load DIR     # fresh process: rebuilds, loads, compares; prints "ok <case>"
"""

from __future__ import annotations

import sys
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _trainer import quiet_trainer  # noqa: E402

from lightning_ensembles import (
    ConformalPrediction,
    EnsembleClassifier,
    MemberWeightAveraging,
    SnapshotEnsemble,
    TemperatureScaling,
)
from lightning_ensembles.averaging import CombinatorialEnsemble, DCAConsistency
from lightning_ensembles.backbones import MLP
from lightning_ensembles.data import DigitsDataModule
from lightning_ensembles.losses import JensenShannon

MLP_KW = {"in_features": 64, "out_features": 10, "hidden": [16]}
VIT_KW = {"img_size": 8, "patch_size": 2, "in_chans": 1, "embed_dim": 16, "depth": 1, "num_heads": 2, "num_classes": 10}


def mlp_module(method: str, **kw) -> EnsembleClassifier:
    return EnsembleClassifier(backbone="mlp", method=method, num_members=2, backbone_kwargs=MLP_KW, **kw)


def dca_module() -> EnsembleClassifier:
    dca = CombinatorialEnsemble(MLP(64, 10, hidden=(16,)), components=2, num_instances=2, eval_mode="all")
    # A built ensemble is not stored in hyper-parameters: loading passes it again (documented).
    return EnsembleClassifier(ensemble=dca, regularizers=[DCAConsistency(weight=1.0)])


# case -> (module factory, callbacks factory, max_epochs)
CASES = {
    "deep": (lambda: mlp_module("deep", regularizers=[JensenShannon(weight=0.1)]), list, 1),
    "packed": (lambda: mlp_module("packed", ensemble_kwargs={"alpha": 2}), list, 1),
    "batch": (lambda: mlp_module("batch"), list, 1),
    "lora": (
        lambda: EnsembleClassifier(
            backbone="vit_tiny_patch16_224",
            method="lora",
            num_members=2,
            backbone_kwargs=VIT_KW,
            ensemble_kwargs={"rank": 2},
        ),
        list,
        1,
    ),
    "symmetry": (lambda: mlp_module("symmetry", ensemble_kwargs={"symmetries": ["invariant-hflip", "plain"]}), list, 1),
    "swa": (
        lambda: mlp_module("deep"),
        lambda: [MemberWeightAveraging("swa", attribute="ensemble", update_bn=False)],
        2,
    ),
    "ema": (
        lambda: mlp_module("deep"),
        lambda: [MemberWeightAveraging("ema", attribute="ensemble", interval="step")],
        1,
    ),
    "swag": (
        lambda: mlp_module("deep"),
        lambda: [MemberWeightAveraging("swag", attribute="ensemble", num_samples=3, update_bn=False)],
        3,
    ),
    "snapshot": (lambda: mlp_module("deep"), lambda: [SnapshotEnsemble(num_cycles=2, attribute="ensemble")], 2),
    "temperature": (lambda: mlp_module("deep"), lambda: [TemperatureScaling()], 1),
    "conformal": (lambda: mlp_module("deep"), lambda: [ConformalPrediction(alpha=0.1)], 1),
    "dca": (lambda: dca_module(), list, 1),
}


def trainer(callbacks, max_epochs: int, root: Path) -> L.Trainer:
    return quiet_trainer(
        callbacks=callbacks,
        max_epochs=max_epochs,
        default_root_dir=root,
        limit_train_batches=4,
        limit_val_batches=3,
        num_sanity_val_steps=0,
    )


def predict_loader() -> DataLoader:
    dm = DigitsDataModule(batch_size=32)
    dm.setup()
    x, y = dm.splits["test"].tensors
    return DataLoader(TensorDataset(x[:64], y[:64]), batch_size=32)


def outputs(trainer_: L.Trainer, module, ckpt: str | None = None) -> list[dict[str, torch.Tensor]]:
    preds = trainer_.predict(module, dataloaders=predict_loader(), ckpt_path=ckpt, weights_only=True)
    return [{k: v for k, v in p.items() if isinstance(v, torch.Tensor)} for p in preds]


def save(out: Path) -> None:
    for case, (make, callbacks, epochs) in CASES.items():
        L.seed_everything(0)
        module, cbs = make(), callbacks()
        t = trainer(cbs, epochs, out)
        t.fit(module, DigitsDataModule(batch_size=32))
        t.save_checkpoint(out / f"{case}.ckpt")
        torch.save(outputs(t, module), out / f"{case}.ref.pt")


def load(out: Path) -> None:
    for case, (make, callbacks, epochs) in CASES.items():
        ckpt = out / f"{case}.ckpt"
        torch.load(ckpt, weights_only=True)  # the whole file is plain data
        L.seed_everything(123)  # a fresh process with other random state: only the checkpoint may matter
        if case == "dca":
            module = EnsembleClassifier.load_from_checkpoint(ckpt, weights_only=True, ensemble=dca_module().ensemble)
        else:
            module = EnsembleClassifier.load_from_checkpoint(ckpt, weights_only=True)
        got = outputs(trainer(callbacks(), epochs, out), module, ckpt=str(ckpt))
        ref = torch.load(out / f"{case}.ref.pt", weights_only=True)
        assert len(got) == len(ref), case
        for g, r in zip(got, ref):
            assert g.keys() == r.keys(), (case, sorted(g), sorted(r))
            for k in r:
                torch.testing.assert_close(g[k], r[k], rtol=0, atol=0, msg=lambda m, c=case, k=k: f"{c}/{k}: {m}")
        print(f"ok {case}", flush=True)


if __name__ == "__main__":
    torch.set_num_threads(1)
    {"save": save, "load": load}[sys.argv[1]](Path(sys.argv[2]))
