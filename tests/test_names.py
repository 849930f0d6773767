"""No name of ours shadows a Lightning callback or a torchmetrics metric (issue 17, item 1).

LightningCLI resolves ``--trainer.callbacks+=Name`` among every imported ``Callback`` subclass; two
classes with one name make it fail ("Multiple subclasses with name ..."), which is what our
``WeightAveraging`` did next to Lightning 2.6's. Both sides are enumerated here, so a clash added on
either side later fails this test.
"""

import importlib
import inspect
import pkgutil
import re
from pathlib import Path

import lightning.pytorch as pl
import lightning.pytorch.callbacks as pl_callbacks
import pytest
import torch
import torchmetrics
from lightning.pytorch.callbacks import Callback
from torchmetrics import Metric

import lightning_ensembles
import lightning_ensembles.callbacks
import lightning_ensembles.metrics
from lightning_ensembles.callbacks.weight_averaging import MemberWeightAveraging
from lightning_ensembles.cli import run_cli

ROOT = Path(__file__).parents[1]
CONFIG = ROOT / "examples" / "configs" / "digits_deep.yaml"
PUBLIC_NAMESPACES = (lightning_ensembles, lightning_ensembles.callbacks, lightning_ensembles.metrics)


def _modules(package):
    """``package`` and every importable submodule (ImportErrors from missing optional extras skipped)."""
    out = [package]
    for info in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
        try:
            out.append(importlib.import_module(info.name))
        except ImportError:  # an optional dependency this environment lacks (its classes are not importable here)
            continue
    return out


def _classes(package, base):
    """``{name: {modules}}`` of the public subclasses of ``base`` defined in ``package``'s modules."""
    found: dict[str, set[str]] = {}
    for mod in _modules(package):
        for name, obj in vars(mod).items():
            if (
                inspect.isclass(obj)
                and issubclass(obj, base)
                and not name.startswith("_")
                and obj.__module__.startswith(package.__name__)
            ):
                found.setdefault(name, set()).add(obj.__module__)
    return found


@pytest.fixture(scope="module")
def lightning_callback_names():
    names = set(pl_callbacks.__all__) | set(_classes(pl, Callback))
    assert {"ModelCheckpoint", "StochasticWeightAveraging", "Callback"} <= names  # the enumeration works
    return names


@pytest.fixture(scope="module")
def torchmetrics_names():
    names = set(torchmetrics.__all__) | set(_classes(torchmetrics, Metric))
    for mod in _modules(torchmetrics):
        names |= set(getattr(mod, "__all__", ()))
    assert {"Accuracy", "MeanSquaredError", "MulticlassCalibrationError"} <= names  # subpackages were walked
    return names


def _our_callbacks():
    names = set(_classes(lightning_ensembles, Callback))
    for ns in PUBLIC_NAMESPACES:
        names |= {n for n in ns.__all__ if inspect.isclass(getattr(ns, n)) and issubclass(getattr(ns, n), Callback)}
    return names


def _our_metrics():
    names = set(_classes(lightning_ensembles, Metric))
    for ns in PUBLIC_NAMESPACES:
        names |= {n for n in ns.__all__ if inspect.isclass(getattr(ns, n)) and issubclass(getattr(ns, n), Metric)}
    return names


def test_no_callback_of_ours_is_named_like_a_lightning_callback(lightning_callback_names):
    ours = _our_callbacks()
    assert {"MemberWeightAveraging", "Ensembling", "ReliabilityDiagram"} <= ours
    assert not ours & lightning_callback_names, f"rename these callbacks: {sorted(ours & lightning_callback_names)}"


def test_no_metric_of_ours_is_named_like_a_torchmetrics_metric(torchmetrics_names):
    ours = _our_metrics()
    assert {"ExpectedCalibrationError", "TopLabelAccuracy", "DenseMeanIoU"} <= ours
    assert not ours & torchmetrics_names, f"rename these metrics: {sorted(ours & torchmetrics_names)}"


def test_no_exported_name_is_a_lightning_or_torchmetrics_class(lightning_callback_names, torchmetrics_names):
    # Functions and modules too: `from lightning_ensembles.metrics import *` must not shadow a torchmetrics import.
    for ns in PUBLIC_NAMESPACES:
        clash = set(ns.__all__) & (lightning_callback_names | torchmetrics_names)
        assert not clash, f"{ns.__name__} exports {sorted(clash)}, names Lightning / torchmetrics already use"


def test_one_class_per_name_inside_the_library():
    for base in (Callback, Metric):
        dup = {n: m for n, m in _classes(lightning_ensembles, base).items() if len(m) > 1}
        assert not dup, f"two {base.__name__} classes share a name: {dup}"


def test_no_old_name_is_kept_as_an_alias():
    for ns in PUBLIC_NAMESPACES:
        assert not hasattr(ns, "WeightAveraging") and not hasattr(ns, "Accuracy")
    assert not hasattr(importlib.import_module("lightning_ensembles.metrics.dense"), "MeanIoU")


def test_configs_name_our_classes_by_full_path():
    """Short names that torch-uncertainty (or Lightning / torchmetrics) also use are ambiguous in a config."""
    paths = list((ROOT / "examples" / "configs").glob("*.yaml")) + list((ROOT / "docs").glob("*.md"))
    assert paths
    for path in paths:
        for value in re.findall(r"class_path:\s*([\w.]+)", path.read_text()):
            assert "." in value, f"{path.name}: `class_path: {value}`; write the full path (lightning_ensembles....)"


# Every callback of ours by its short name on the command line: init args that a bare instance lacks.
_REQUIRED = {"PredictionWriter": ["path=preds.pt"]}


@pytest.mark.parametrize(
    "name",
    sorted(
        n
        for n in lightning_ensembles.callbacks.__all__
        if issubclass(getattr(lightning_ensembles.callbacks, n), Callback)
    ),
)
def test_cli_resolves_every_callback_by_short_name(name, tmp_path):
    args = ["--config", str(CONFIG), f"--trainer.default_root_dir={tmp_path}", f"--trainer.callbacks+={name}"]
    args += [f"--trainer.callbacks.{a}" for a in _REQUIRED.get(name, [])]
    cli = run_cli(args, run=False)
    assert any(type(cb) is getattr(lightning_ensembles.callbacks, name) for cb in cli.trainer.callbacks)


def test_cli_trains_with_member_weight_averaging_by_short_name(tmp_path):
    # Lightning's own WeightAveraging is imported alongside: the short names must not collide.
    assert "WeightAveraging" in pl_callbacks.__all__
    cli = run_cli(
        [
            "fit",
            "--config",
            str(CONFIG),
            f"--trainer.default_root_dir={tmp_path}",
            "--trainer.max_epochs=2",
            "--trainer.limit_train_batches=4",
            "--trainer.limit_val_batches=2",
            "--trainer.limit_test_batches=2",
            "--model.init_args.num_members=2",
            "--test_after_fit=false",
            "--trainer.callbacks+=MemberWeightAveraging",
            "--trainer.callbacks.method=ema",
            "--trainer.callbacks.attribute=ensemble",
            "--trainer.callbacks.interval=step",
        ]
    )
    avg = [cb for cb in cli.trainer.callbacks if isinstance(cb, MemberWeightAveraging)]
    assert len(avg) == 1 and avg[0].method == "ema"
    assert avg[0].averager.n_averaged == 8  # one EMA update per optimiser step: 2 epochs x 4 batches


def test_checkpoint_written_under_the_old_name_still_resumes(tmp_path):
    """A checkpoint from before the rename keeps the averages under 'WeightAveraging{...}'."""
    from conftest import quiet_trainer

    from lightning_ensembles import EnsembleClassifier
    from lightning_ensembles.data import DigitsDataModule

    def run(max_epochs, ckpt_path=None):
        model = EnsembleClassifier(
            backbone="mlp", num_members=2, backbone_kwargs={"in_features": 64, "out_features": 10}
        )
        cb = MemberWeightAveraging("swa", attribute="ensemble", start_epoch=0, update_bn=False)
        trainer = quiet_trainer(max_epochs=max_epochs, limit_train_batches=3, limit_val_batches=1, callbacks=[cb])
        trainer.fit(model, DigitsDataModule(), ckpt_path=ckpt_path)
        return trainer, cb

    trainer, cb = run(2)
    ckpt = tmp_path / "old.ckpt"
    trainer.save_checkpoint(ckpt)
    state = torch.load(ckpt, weights_only=True)
    assert cb.state_key in state["callbacks"] and cb.state_key.startswith("MemberWeightAveraging{")
    state["callbacks"] = {
        k.replace("MemberWeightAveraging", "WeightAveraging", 1): v for k, v in state["callbacks"].items()
    }
    torch.save(state, ckpt)
    with pytest.warns(UserWarning, match="callbacks used to create the checkpoint"):
        _, resumed = run(3, ckpt_path=str(ckpt))
    assert resumed.averager.n_averaged == cb.averager.n_averaged + 1  # 2 epochs restored, 1 more update
