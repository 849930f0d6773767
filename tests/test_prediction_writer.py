"""PredictionWriter: streamed per-sample predictions in dataset order, CSV and npy, one process and DDP."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import quiet_trainer
from torch.utils.data import DataLoader, TensorDataset

from lightning_ensembles import EnsembleClassifier, EnsembleRegressor
from lightning_ensembles.callbacks import PredictionWriter
from lightning_ensembles.callbacks.prediction_writer import read_predictions_file

CONFIG = Path(__file__).parents[1] / "examples" / "configs" / "digits_deep.yaml"


def _reference(model, x):
    model.eval()
    with torch.no_grad():
        member_probs = model(x).softmax(-1)
    probs = member_probs.mean(0)
    ent = -(probs * probs.log()).sum(-1)
    mi = ent - (-(member_probs * member_probs.log()).sum(-1)).mean(0)
    return member_probs.double(), probs.double(), ent.double(), mi.double()


@pytest.mark.parametrize("suffix", [".csv", ".npy"])
def test_classification_columns_match_the_model(tmp_path, suffix):
    model = EnsembleClassifier(backbone="mlp", num_members=3, backbone_kwargs={"in_features": 8, "out_features": 4})
    x = torch.randn(37, 8)
    path = tmp_path / f"p{suffix}"
    trainer = quiet_trainer(callbacks=[PredictionWriter(path, members=True)])
    trainer.predict(model, DataLoader(TensorDataset(x), batch_size=10), return_predictions=False)
    cols, values = read_predictions_file(path)
    get = {c: values[:, k] for k, c in enumerate(cols)}
    member_probs, probs, ent, mi = _reference(model, x)
    if suffix == ".csv":
        assert np.array_equal(get["index"], np.arange(37))
    np.testing.assert_allclose(np.stack([get[f"prob_{c}"] for c in range(4)], 1), probs, rtol=0, atol=1e-6)
    np.testing.assert_allclose(get["member2_prob_1"], member_probs[2, :, 1], rtol=0, atol=1e-6)
    np.testing.assert_allclose(get["entropy"], ent, rtol=0, atol=1e-5)
    np.testing.assert_allclose(get["mutual_information"], mi, rtol=0, atol=1e-5)
    assert np.array_equal(get["pred"], probs.argmax(-1).numpy())
    assert not list(tmp_path.glob("*.part"))  # parts merged and removed


def test_regression_columns(tmp_path):
    model = EnsembleRegressor(backbone="mlp", num_members=2, backbone_kwargs={"in_features": 1, "out_features": 2})
    x = torch.linspace(-3, 3, 25)[:, None]
    path = tmp_path / "r.csv"
    quiet_trainer(callbacks=[PredictionWriter(path)]).predict(
        model, DataLoader(TensorDataset(x), batch_size=8), return_predictions=False
    )
    cols, values = read_predictions_file(path)
    ref = model.predict_step((x,), 0)
    get = {c: values[:, k] for k, c in enumerate(cols)}
    for key in ("mean", "aleatoric", "epistemic", "variance"):
        np.testing.assert_allclose(get[f"{key}_0"], ref[key].detach().double().flatten(), rtol=0, atol=1e-6)


def test_cli_predict_writes_the_file(tmp_path):
    from lightning_ensembles.cli import run_cli

    out = tmp_path / "preds.csv"
    run_cli(
        [
            "predict",
            "--config",
            str(CONFIG),
            f"--trainer.default_root_dir={tmp_path}",
            "--trainer.callbacks+=lightning_ensembles.callbacks.PredictionWriter",
            f"--trainer.callbacks.path={out}",
            "--return_predictions=false",
        ]
    )
    cols, values = read_predictions_file(out)
    assert values.shape == (360, len(cols)) and "mutual_information" in cols


@pytest.mark.slow
def test_ddp_writes_one_ordered_file_without_padding_duplicates(tmp_path):
    script = Path(__file__).parent / "_ddp_scripts" / "prediction_writer.py"
    proc = subprocess.run(
        [sys.executable, str(script), str(tmp_path)], capture_output=True, text=True, timeout=600, cwd=script.parent
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    model = EnsembleClassifier(backbone="mlp", num_members=2, backbone_kwargs={"in_features": 8, "out_features": 3})
    model.load_state_dict(torch.load(tmp_path / "weights.pt", weights_only=True))
    x = torch.randn(101, 8, generator=torch.Generator().manual_seed(1))
    _, probs, _, _ = _reference(model, x)
    cols, values = read_predictions_file(tmp_path / "ddp.csv")
    assert np.array_equal(values[:, 0], np.arange(101))
    np.testing.assert_allclose(values[:, [cols.index(f"prob_{c}") for c in range(3)]], probs, rtol=0, atol=1e-6)
    npy_cols, npy = read_predictions_file(tmp_path / "ddp.npy")
    assert npy_cols == cols[1:]
    np.testing.assert_allclose(npy, values[:, 1:], rtol=0, atol=1e-12)
