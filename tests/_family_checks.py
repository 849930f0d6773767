"""Checks every ensemble family must pass: YAML construction, checkpoint round trip, Ensembling callback."""

from __future__ import annotations

import textwrap
from typing import Any

import torch
import yaml
from conftest import quiet_trainer

DIGITS_MLP = {"in_features": 64, "out_features": 10, "hidden": [32]}


def classifier_from_yaml(
    method: str, ensemble_kwargs: dict[str, Any], num_members: int = 3, backbone_kwargs: dict[str, Any] | None = None
):
    """Build ``EnsembleClassifier(method=...)`` from a YAML string through jsonargparse (as LightningCLI does)."""
    from jsonargparse import ArgumentParser

    from lightning_ensembles import EnsembleClassifier

    text = textwrap.dedent(
        f"""
        model:
          backbone: mlp
          method: {method}
          num_members: {num_members}
          backbone_kwargs: {yaml.safe_dump(backbone_kwargs or DIGITS_MLP, default_flow_style=True).strip()}
          ensemble_kwargs: {yaml.safe_dump(ensemble_kwargs, default_flow_style=True).strip()}
        """
    )
    parser = ArgumentParser()
    parser.add_class_arguments(EnsembleClassifier, "model")
    cfg = parser.instantiate_classes(parser.parse_string(text))
    return cfg.model


def checkpoint_round_trip(tmp_path, model, fresh, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Train ``model`` two steps on digits, save a Lightning checkpoint, load it with ``weights_only=True``
    into ``fresh`` (built differently seeded) and assert identical evaluation outputs. Returns the state dict."""
    from lightning_ensembles.data import DigitsDataModule

    trainer = quiet_trainer(max_steps=2, limit_val_batches=1)
    trainer.fit(model, DigitsDataModule(batch_size=32))
    trainer.save_checkpoint(tmp_path / "family.ckpt")
    ckpt = torch.load(tmp_path / "family.ckpt", weights_only=True)
    with torch.no_grad():
        expected = model.eval()(x)
        before = fresh.eval()(x)
    assert not torch.allclose(before, expected), (
        "the fresh model must differ before loading, or the test proves nothing"
    )
    fresh.load_state_dict(ckpt["state_dict"])
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(x), expected)
    return ckpt["state_dict"]


def ensembling_callback_fit(method: str, num_members: int, method_kwargs: dict[str, Any]) -> float:
    """Fit an unchanged user module with ``Ensembling(method=...)`` on digits for one epoch; return val accuracy."""
    import lightning as L
    import torch.nn.functional as F
    from torch import nn

    from lightning_ensembles.callbacks import CalibrationMetrics, Ensembling
    from lightning_ensembles.data import DigitsDataModule

    class User(L.LightningModule):
        def __init__(self, model: nn.Module) -> None:
            super().__init__()
            self.model = model

        def forward(self, x):
            return self.model(x)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return F.cross_entropy(self(x), y)

        def validation_step(self, batch, batch_idx):
            x, y = batch
            self.log("val_acc", (self(x).argmax(-1) == y).float().mean())

        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=1e-2)

    module = User(nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Dropout(0.2), nn.Linear(32, 10)))
    cb = Ensembling(method=method, num_members=num_members, method_kwargs=method_kwargs)
    trainer = quiet_trainer(max_epochs=1, callbacks=[cb, CalibrationMetrics()])
    trainer.fit(module, DigitsDataModule(batch_size=64))
    assert "val/calibration/ece" in trainer.callback_metrics
    return float(trainer.callback_metrics["val_acc"])


def cli_fit_with_diversity_averaging_and_calibration(
    tmp_path, method: str, ensemble_kwargs: dict[str, Any], num_members: int = 3
) -> Any:
    """``lightning-ensembles fit`` from YAML with a diversity term, EMA weight averaging, calibration metrics and
    temperature scaling."""
    from lightning_ensembles.cli import run_cli

    config = tmp_path / "family.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "model": {
                    "class_path": "lightning_ensembles.EnsembleClassifier",
                    "init_args": {
                        "backbone": "mlp",
                        "method": method,
                        "num_members": num_members,
                        "backbone_kwargs": DIGITS_MLP,
                        "ensemble_kwargs": ensemble_kwargs,
                        "regularizers": [
                            {"class_path": "lightning_ensembles.losses.JensenShannon", "init_args": {"weight": 0.1}}
                        ],
                    },
                },
                "data": {"class_path": "lightning_ensembles.data.DigitsDataModule", "init_args": {"batch_size": 32}},
                "trainer": {
                    "max_epochs": 1,
                    "limit_train_batches": 4,
                    "limit_val_batches": 2,
                    "logger": False,
                    "enable_checkpointing": False,
                    "enable_progress_bar": False,
                    "enable_model_summary": False,
                    "callbacks": [
                        {
                            "class_path": "lightning_ensembles.callbacks.MemberWeightAveraging",
                            "init_args": {"method": "ema", "attribute": "ensemble", "interval": "step", "decay": 0.5},
                        },
                        {"class_path": "lightning_ensembles.callbacks.CalibrationMetrics"},
                        {"class_path": "lightning_ensembles.callbacks.TemperatureScaling"},
                    ],
                },
            }
        )
    )
    cli = run_cli(["fit", "--config", str(config), "--test_after_fit=false", f"--trainer.default_root_dir={tmp_path}"])
    metrics = cli.trainer.callback_metrics
    assert torch.isfinite(metrics["train/neg_jensen_shannon"])
    assert "val/calibration/ece" in metrics and "val/acc" in metrics, sorted(metrics)
    averager = next(cb for cb in cli.trainer.callbacks if type(cb).__name__ == "MemberWeightAveraging").averager
    assert averager.n_averaged >= 3
    ts = next(cb for cb in cli.trainer.callbacks if type(cb).__name__ == "TemperatureScaling")
    assert ts.is_fitted and ts.temperature > 0
    return cli
