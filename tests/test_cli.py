import subprocess
import sys
from pathlib import Path

import pytest
from _trainer import cli_fit_args

from lightning_ensembles.cli import run_cli

CONFIG = Path(__file__).parents[1] / "examples" / "configs" / "digits_deep.yaml"


def test_fit_then_test_prints_the_member_table(tmp_path, capsys):
    cli = run_cli(
        [
            "fit",
            "--config",
            str(CONFIG),
            "--trainer.max_epochs=2",
            f"--trainer.default_root_dir={tmp_path}",
            "--model.init_args.num_members=3",
        ]
    )
    out = capsys.readouterr().out
    assert "ensemble vs members" in out
    for row in ("ensemble", "member 0", "member 2", "member mean"):
        assert row in out
    res = cli.model.last_test_results[0]
    assert res["nll"] <= sum(res[f"member_nll/{i}"] for i in range(3)) / 3 + 1e-6
    # The best checkpoint was written and tested.
    assert cli.trainer.checkpoint_callback.best_model_path


def test_print_config_and_console_script(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "lightning_ensembles.cli", "fit", "--config", str(CONFIG), "--print_config"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "lightning_ensembles.EnsembleClassifier" in proc.stdout
    assert "num_members: 4" in proc.stdout


def test_cli_takes_a_timm_backbone_by_name(tmp_path):
    cli = run_cli(
        cli_fit_args(
            CONFIG,
            tmp_path,
            "--model.init_args.backbone=resnet10t",
            "--model.init_args.num_members=2",
            '--model.init_args.backbone_kwargs={"num_classes": 10, "in_chans": 1}',
        )
    )
    assert type(cli.model.ensemble.template).__name__ == "ResNet"


def test_cli_bad_value_fails_with_message(tmp_path):
    with pytest.raises(SystemExit):
        run_cli(["fit", "--config", str(CONFIG), "--model.init_args.num_members=zero"])
