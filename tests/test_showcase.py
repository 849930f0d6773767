"""The main job (`lightning-ensembles showcase`), CNN1D, and MNIST-1D's OOD and shifted test sets."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("mnist1d")

from lightning_ensembles.backbones import CNN1D, resolve_backbone  # noqa: E402
from lightning_ensembles.data import MNIST1DDataModule  # noqa: E402
from lightning_ensembles.data.mnist1d import DEFAULT_SHIFT, generate_mnist1d  # noqa: E402

CONFIG = Path(__file__).resolve().parents[1] / "examples" / "configs" / "mnist1d_showcase.yaml"


def test_cnn1d_parameter_count_matches_the_formula():
    channels, kernels, length, classes = (8, 16), (5, 3), 24, 7
    net = CNN1D(2, classes, length, channels=channels, kernel_sizes=kernels)
    conv = (2 * 8 * 5 + 8) + (8 * 16 * 3 + 16)
    bn = 2 * (8 + 16)
    head = 16 * (length // 4) * classes + classes
    assert sum(p.numel() for p in net.parameters()) == conv + bn + head
    assert net(torch.randn(3, 2, length)).shape == (3, classes)
    assert isinstance(resolve_backbone("lightning_ensembles.backbones.CNN1D"), CNN1D)  # allowlisted by path
    with pytest.raises(ValueError, match="too short"):
        CNN1D(input_length=4)


def test_shift_changes_the_signals_not_the_labels():
    x, y = generate_mnist1d(200, 5)
    xs, ys = generate_mnist1d(200, 5, shift=DEFAULT_SHIFT)
    assert torch.equal(y, ys)  # same seed: the same class sequence
    assert (x - xs).abs().mean() > 0.1
    with pytest.raises(ValueError, match="not generator knobs"):
        generate_mnist1d(200, 5, shift={"noise": 1.0})


def test_extra_test_sets_in_order():
    dm = MNIST1DDataModule(num_samples=300, ood="waves", shift_test=True)
    dm.setup()
    assert dm.test_sets == ("test", "ood", "shift")
    loaders = dm.test_dataloader()
    sizes = [len(loader.dataset) for loader in loaders]
    assert sizes == [len(dm.splits["test"])] * 3
    x_test, x_ood = dm.splits["test"].tensors[0], dm.splits["ood"].tensors[0]
    assert x_ood.shape[1:] == x_test.shape[1:] == (1, 40)
    only_shift = MNIST1DDataModule(num_samples=300, shift_test=True)
    assert only_shift.test_sets == ("test", "shift")


def test_held_out_classes_are_only_in_the_ood_set():
    dm = MNIST1DDataModule(num_samples=500, ood="classes", ood_classes=[8, 9])
    dm.setup()
    for split in ("train", "val", "test"):
        assert not torch.isin(dm.splits[split].tensors[1], torch.tensor([8, 9])).any()
    ood_labels = dm.splits["ood"].tensors[1]
    assert len(ood_labels) > 0 and torch.isin(ood_labels, torch.tensor([8, 9])).all()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"ood": "noise"}, "'waves' or 'classes'"),
        ({"ood": "classes"}, "ood_classes"),
        ({"shift": {"iid_noise_scale": 0.1}}, "shift_test=True"),
    ],
)
def test_bad_arguments_name_the_fix(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MNIST1DDataModule(**kwargs)


def test_showcase_command_trains_both_and_writes_table_and_diagram(tmp_path, monkeypatch, capsys):
    pytest.importorskip("matplotlib")
    from lightning_ensembles import cli

    root = tmp_path / "run"
    monkeypatch.setattr(
        sys,
        "argv",
        [
            "lightning-ensembles",
            "showcase",
            "--config",
            str(CONFIG),
            "--trainer.max_epochs",
            "1",
            "--trainer.enable_progress_bar",
            "false",
            "--data.init_args.num_samples",
            "300",
            "--trainer.default_root_dir",
            str(root),
        ],
    )
    cli.main()
    out = capsys.readouterr().out
    assert "single model" in out and "deep ensemble (4)" in out and "OOD AUROC" in out
    results = json.loads((root / "showcase.json").read_text())["results"]
    single, ensemble = results["single model"], results["deep ensemble (4)"]
    assert ensemble["params"] == 4 * single["params"] == 4 * 8202
    for r in (single, ensemble):
        assert 0.0 <= r["acc"] <= 1.0 and 0.0 <= r["ood_auroc"] <= 1.0 and 0.0 <= r["shift_acc"] <= 1.0
    assert (root / "reliability.png").read_bytes()[:4] == b"\x89PNG"
    ckpts = sorted((root / "ensemble").rglob("*.ckpt"))
    assert ckpts
    state = torch.load(ckpts[0], weights_only=True)  # checkpoints hold tensors and plain data only
    assert any(k.startswith("ensemble.") for k in state["state_dict"])
