"""Optimisers and schedulers for the ensemble modules: short names or any torch class, LightningCLI-style.

``optimizer`` / ``scheduler`` take a short name (``"adam"``, ``"sgd"``, ``"cosine"``) or a callable as
LightningCLI documents them (``OptimizerCallable`` / ``LRSchedulerCallable``: in YAML a ``class_path``
with ``init_args``; in Python a class or ``functools.partial``). Checkpoints store a callable as plain
``{"class_path", "init_args"}`` data when it is a ``torch.optim`` class (or a partial of one with plain
arguments), rebuilt on load through an allowlist (``torch.optim`` and ``torch.optim.lr_scheduler``
classes); any other callable is stored as ``"custom"`` and must be passed again to resume training.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable, Iterable
from typing import Any, Union

import torch

OptimizerSpec = Union[str, Callable[[Iterable], torch.optim.Optimizer], dict]
SchedulerSpec = Union[str, Callable[[torch.optim.Optimizer], Any], dict]

OPTIMIZERS = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}
SCHEDULERS = ("none", "cosine")
CUSTOM = "custom"  # what a checkpoint stores for a callable it cannot describe as data
_PLAIN = (bool, int, float, str, type(None), tuple, list)
_ALLOWED_PACKAGES = {"torch.optim": torch.optim.Optimizer, "torch.optim.lr_scheduler": object}


def _allowed_class(path: str) -> type:
    module_name, _, name = path.rpartition(".")
    for package, base in _ALLOWED_PACKAGES.items():
        if module_name == package or module_name.startswith(package + "."):
            cls = getattr(importlib.import_module(module_name), name, None)
            if isinstance(cls, type) and issubclass(cls, base):
                return cls
    raise ValueError(
        f"`class_path`={path!r} is not allowed here: optimisers and schedulers given as data must be classes of "
        "torch.optim / torch.optim.lr_scheduler (nothing else is imported from a config or checkpoint). Pass "
        "your own callable in Python instead."
    )


def from_config(spec: Any) -> Any:
    """A ``{"class_path", "init_args"}`` dict as a callable (``functools.partial``); anything else unchanged."""
    if isinstance(spec, dict):
        if "class_path" not in spec:
            raise ValueError(f"an optimiser/scheduler dict needs `class_path` (and `init_args`), got {spec!r}.")
        return functools.partial(_allowed_class(spec["class_path"]), **dict(spec.get("init_args") or {}))
    return spec


def to_config(spec: Any) -> Any:
    """Plain data for a checkpoint: names and dicts as they are, torch classes/partials as dicts, else ``"custom"``."""
    if isinstance(spec, (str, dict)) or spec is None:
        return spec
    func, kwargs = (spec.func, dict(spec.keywords)) if isinstance(spec, functools.partial) else (spec, {})
    if isinstance(spec, functools.partial) and spec.args:
        return CUSTOM
    path = f"{getattr(func, '__module__', '')}.{getattr(func, '__qualname__', '')}"
    try:
        _allowed_class(path)
    except ValueError:
        return CUSTOM
    if not all(isinstance(v, _PLAIN) for v in kwargs.values()):
        return CUSTOM
    return {"class_path": path, "init_args": kwargs}


def check_specs(optimizer: Any, scheduler: Any) -> None:
    """``ValueError`` for an unknown short name (callables are checked when called)."""
    if isinstance(optimizer, str) and optimizer not in OPTIMIZERS and optimizer != CUSTOM:
        raise ValueError(
            f"`optimizer` must be one of {sorted(OPTIMIZERS)} or a callable (YAML: class_path/init_args of any "
            f"torch.optim class), got {optimizer!r}."
        )
    if isinstance(scheduler, str) and scheduler not in SCHEDULERS and scheduler != CUSTOM:
        raise ValueError(
            f"`scheduler` must be one of {SCHEDULERS} or a callable (YAML: class_path/init_args of any "
            f"torch.optim.lr_scheduler class), got {scheduler!r}."
        )


def build_optimizer(spec: Any, params: list, lr: float, weight_decay: float, momentum: float) -> torch.optim.Optimizer:
    """The optimiser: a short name uses ``lr`` / ``weight_decay`` (/ ``momentum`` for SGD); a callable its own."""
    if spec == CUSTOM:
        raise ValueError(
            "this module was built with an optimiser callable that a checkpoint cannot store; pass `optimizer=` "
            "again (e.g. `load_from_checkpoint(path, optimizer=...)`) to train it."
        )
    if isinstance(spec, str):
        kwargs: dict[str, Any] = {"lr": lr, "weight_decay": weight_decay}
        if spec == "sgd":
            kwargs["momentum"] = momentum
        return OPTIMIZERS[spec](params, **kwargs)
    opt = from_config(spec)(params)
    if not isinstance(opt, torch.optim.Optimizer):
        raise ValueError(f"`optimizer` returned {type(opt).__name__}, not a torch.optim.Optimizer.")
    return opt


def build_scheduler(spec: Any, opt: torch.optim.Optimizer, total_steps: float, monitor: str) -> dict | None:
    """Lightning's ``lr_scheduler`` config for ``spec``, or ``None``."""
    if spec == "none" or spec is None:
        return None
    if spec == "cosine":
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, int(total_steps)))
        return {"scheduler": sched, "interval": "step"}
    if spec == CUSTOM:
        raise ValueError(
            "this module was built with a scheduler callable a checkpoint cannot store; pass `scheduler=`."
        )
    sched = from_config(spec)(opt)
    config: dict[str, Any] = {"scheduler": sched, "interval": "epoch"}
    if isinstance(sched, torch.optim.lr_scheduler.ReduceLROnPlateau):
        config["monitor"] = monitor
    return config
