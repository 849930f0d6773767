"""Smoke test: every example script runs end to end (with --smoke: a few batches) and prints its result."""

import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = sorted((Path(__file__).parents[1] / "examples").glob("[a-z]_*.py"))
EXPECTED = {
    "a_plugin_callbacks": "ensemble (callback)",
    "b_packed_timm_cnn": "packed M=4 alpha=2",
    "c_lora_vit": "LoRA-Ensemble M=4",
    "d_swa_temperature_reliability": "fitted temperature",
    "e_regression_uncertainty": "regression_band.png",
    "f_ood_detection": "mutual information",
    "g_segmentation_multilabel": "multilabel: single model vs deep ensemble",
    "h_torch_uncertainty_interop": "same weights, EnsembleClassifier",
}


def test_every_example_is_covered():
    assert {p.stem for p in EXAMPLES} == set(EXPECTED)


@pytest.mark.parametrize("script", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_example_runs(script, tmp_path):
    proc = subprocess.run(
        [sys.executable, str(script), "--smoke", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=script.parent,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert EXPECTED[script.stem] in proc.stdout
    if script.stem == "e_regression_uncertainty":
        assert (tmp_path / "regression_band.png").stat().st_size > 10_000
    if script.stem == "h_torch_uncertainty_interop":  # one ensemble, two evaluators: the same numbers
        tu_row, ours_row = (
            next(line.split()[-5:-1] for line in proc.stdout.splitlines() if key in line)
            for key in ("in ClassificationRoutine", "same weights")
        )
        assert tu_row == ours_row
    if script.stem == "d_swa_temperature_reliability":
        assert any(tmp_path.rglob("reliability/test.png"))
