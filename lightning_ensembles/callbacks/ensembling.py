"""Ensembling: turn a submodule of an unchanged LightningModule into an ensemble, from the Trainer."""

from __future__ import annotations

import types
from collections.abc import Mapping
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn
from torchmetrics import Metric

from ..ensembles.base import (
    Ensemble,
    aggregate_gaussian,
    aggregate_log_probs,
    split_gaussian,
)
from ..ensembles.deep import adopt_checkpoint_storage
from ..ensembles.registry import build_ensemble
from ..ensembles.surgery import set_submodule

__all__ = ["Ensembling", "EnsembledModel"]

_TARGET_KEYS = ("y", "target", "targets", "label", "labels")
_INPUT_KEYS = ("x", "input", "inputs", "image", "images", "features")


class EnsembledModel(nn.Module):
    """What the user's module sees in place of its submodule after :class:`Ensembling` converts it.

    * training, ``batch="repeat"``: member outputs stacked member-major, ``(M * B, ...)``; the callback
      repeats the targets to match, so the user's own loss is the mean of the member losses;
    * training, ``batch="split"``: member ``i`` computes chunk ``i`` of the batch; outputs ``(B, ...)``
      in batch order, targets unchanged;
    * evaluation and prediction: the ensemble prediction in the shape of one model's output: the log of
      the mean member probability (classification: a user's ``cross_entropy``/``argmax`` measure the
      ensemble) or the mixture mean (regression).

    The member outputs of the last evaluation forward are kept in ``last_member_outputs`` ``(M, B, ...)``.
    """

    def __init__(self, ensemble: Ensemble, task: str, batch: str) -> None:
        super().__init__()
        self.ensemble = ensemble
        self.task = task
        self.batch = batch
        self.last_member_outputs: Tensor | None = None

    @property
    def num_members(self) -> int:
        return self.ensemble.num_members

    def get_extra_state(self) -> dict[str, Any]:
        return {"num_members": self.num_members, "ensemble": type(self.ensemble).__name__}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        pass  # checked before any tensor is loaded, in _load_from_state_dict

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # noqa: ANN001
        saved = state_dict.get(prefix + "_extra_state")
        if isinstance(saved, dict) and (
            saved.get("num_members") != self.num_members or saved.get("ensemble") != type(self.ensemble).__name__
        ):
            raise ValueError(
                f"the checkpoint holds a {saved.get('ensemble')} of {saved.get('num_members')} members, but the "
                f"Ensembling callback built a {type(self.ensemble).__name__} of {self.num_members}: configure "
                "Ensembling with the method and num_members the checkpoint was written with."
            )
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _split_forward(self, x: Tensor) -> Tensor:
        m, b = self.num_members, x.shape[0]
        if b < m:
            raise ValueError(f"Ensembling(batch='split') needs a batch of at least num_members={m} samples, got {b}.")
        outputs = self.ensemble(x)  # (M, B, ...); every member on every sample, then keep member i's chunk
        owner = torch.arange(b, device=x.device) * m // b  # chunk i -> member i, sizes differ by at most 1
        return outputs[owner, torch.arange(b, device=x.device)]

    def forward(self, x: Tensor) -> Tensor:
        if self.training:
            if self.batch == "split":
                return self._split_forward(x)
            return self.ensemble(x).flatten(0, 1)
        outputs = self.ensemble(x)
        self.last_member_outputs = outputs.detach()
        if self.task == "classification":
            return aggregate_log_probs(outputs)
        if self.task == "gaussian":
            mix = aggregate_gaussian(*split_gaussian(outputs))
            # Same layout as one member's output: means, then the raw value whose softplus is the variance.
            raw = torch.log(torch.expm1(mix.variance.clamp_min(1e-6)))
            return torch.cat([mix.mean, raw], dim=-1)
        return outputs.mean(0)


class Ensembling(Callback):
    """Make an unchanged LightningModule train and evaluate an ensemble: add this callback, nothing else.

    At ``setup`` the submodule named ``attribute`` (default ``"model"``; ``None``: the child module
    with the most parameters, reported) is converted with ``method`` (``"deep"``, ``"packed"``,
    ``"batch"``, ``"lora"``) into ``num_members`` members and replaced by an :class:`EnsembledModel`.

    Training: every member gets its own loss under the user's own ``training_step``.
    ``batch="repeat"`` (default) gives every member the whole batch: the user's forward returns
    ``(M * B, ...)`` member outputs and the callback repeats the targets of the batch ``M`` times before
    ``training_step`` sees it, so ``F.cross_entropy(self(x), y)`` is the mean member loss.
    ``batch="split"`` gives member ``i`` the ``i``-th chunk of the batch (outputs and targets keep
    shape ``(B, ...)``). Targets are found in ``(x, y, ...)`` tuples (everything after the first
    element) and in dict batches (keys ``y``, ``target``, ``targets``, ``label``, ``labels``); for
    other batch structures subclass and override :meth:`repeat_targets`.

    Evaluation and prediction: the user's module sees the ensemble prediction in the shape its code
    expects (log of the mean member probability for ``task="classification"``; the mixture mean for
    ``"regression"``; mean and softplus-inverse variance for ``"gaussian"`` outputs), so the user's own
    metrics measure the ensemble. Member outputs of each evaluation batch are offered to
    :class:`CalibrationMetrics`, :class:`ReliabilityDiagram` and :class:`TemperatureScaling` through
    :meth:`member_predictions`.

    A submodule whose forward returns a tuple or dict is refused at setup with an error naming what
    was found: point ``attribute`` at a submodule that returns one tensor. Checkpoints written with the callback hold every
    member; restore them with the same callback on the Trainer (``ckpt_path=...``) or call
    :meth:`apply` on a fresh module before ``load_state_dict``.

    Put ``Ensembling`` before other callbacks that read the model (it converts at ``setup``).

    Example:
        >>> import lightning as L, torch
        >>> import torch.nn.functional as F
        >>> from lightning_ensembles.callbacks import Ensembling
        >>> class Classifier(L.LightningModule):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
        ...     def forward(self, x):
        ...         return self.model(x)
        ...     def training_step(self, batch, batch_idx):
        ...         x, y = batch
        ...         return F.cross_entropy(self(x), y)
        ...     def configure_optimizers(self):
        ...         return torch.optim.Adam(self.parameters(), lr=1e-2)
        >>> from lightning_ensembles.data import DigitsDataModule
        >>> module = Classifier()
        >>> trainer = L.Trainer(max_epochs=1, callbacks=[Ensembling(num_members=3)], logger=False,
        ...                     enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
        >>> trainer.fit(module, DigitsDataModule())
        >>> module.model.num_members, module.eval()(torch.zeros(2, 1, 8, 8)).shape
        (3, torch.Size([2, 10]))
    """

    def __init__(
        self,
        method: str = "deep",
        num_members: int = 4,
        attribute: str | None = "model",
        task: Literal["classification", "regression", "gaussian"] = "classification",
        batch: Literal["repeat", "split"] = "repeat",
        method_kwargs: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if task not in ("classification", "regression", "gaussian"):
            raise ValueError(f"`task` must be 'classification', 'regression' or 'gaussian', got {task!r}.")
        if batch not in ("repeat", "split"):
            raise ValueError(f"`batch` must be 'repeat' or 'split', got {batch!r}.")
        if not isinstance(num_members, int) or num_members < 1:
            raise ValueError(f"`num_members` must be an integer >= 1, got {num_members!r}.")
        self.method = method
        self.num_members = num_members
        self.attribute = attribute
        self.task = task
        self.batch = batch
        self.method_kwargs = dict(method_kwargs or {})
        self.chosen_attribute: str | None = None
        self._original_training_step: Any = None

    # ---------------------------------------------------------------- conversion
    @staticmethod
    def _find_backbone(pl_module: nn.Module) -> str:
        candidates = [
            (sum(p.numel() for p in child.parameters()), name)
            for name, child in pl_module.named_children()
            if not isinstance(child, Metric) and any(True for _ in child.parameters())
        ]
        if not candidates:
            raise ValueError(
                f"Ensembling found no submodule with parameters in {type(pl_module).__name__}; "
                "name the model to ensemble with `attribute='...'`."
            )
        return max(candidates)[1]

    def _probe(self, trainer: L.Trainer, backbone: nn.Module, path: str) -> None:
        """Run the single backbone on one training batch to check that it returns one tensor."""
        try:
            # Private but the one place that knows the fit dataloader at setup time, whether it came
            # from a datamodule, the module's own `train_dataloader` or `trainer.fit(train_dataloaders=...)`.
            loader = trainer.fit_loop._data_source.dataloader()
        except Exception:
            loader = None
        if isinstance(loader, (list, tuple)):
            loader = loader[0] if loader else None
        if loader is None:
            return
        batch = next(iter(loader))
        x = self.inputs_of(batch)
        if x is None:
            return
        was_training = backbone.training
        backbone.eval()
        with torch.no_grad():
            out = backbone(x[:2])
        backbone.train(was_training)
        if not isinstance(out, Tensor):
            what = (
                f"a {type(out).__name__} of {len(out)} items" if isinstance(out, (tuple, list, Mapping)) else type(out).__name__
            )
            keys = f" (keys {list(out)})" if isinstance(out, Mapping) else ""
            raise ValueError(
                f"Ensembling cannot ensemble `{path}`: its forward returned {what}{keys}, not one tensor. "
                "Point `attribute` at a submodule whose forward returns the logits (classification) or the "
                "predictions (regression) as one tensor, wrapping the model in such a module if needed."
            )

    def apply(self, pl_module: nn.Module, trainer: L.Trainer | None = None) -> EnsembledModel:
        """Convert ``pl_module``'s submodule in place (also for loading checkpoints outside a Trainer)."""
        existing = self._current(pl_module)
        if existing is not None:
            return existing
        path = self.attribute or self._find_backbone(pl_module)
        if self.attribute is None:
            rank_zero_info(f"Ensembling: ensembling `{path}` (the submodule with the most parameters).")
        self.chosen_attribute = path
        parent_path, _, leaf = path.rpartition(".")
        parent = pl_module.get_submodule(parent_path) if parent_path else pl_module
        if not hasattr(parent, leaf) or not isinstance(getattr(parent, leaf), nn.Module):
            children = [n for n, _ in pl_module.named_children()]
            raise ValueError(
                f"Ensembling: `attribute`={path!r} is not a submodule of {type(pl_module).__name__} "
                f"(its children: {children}). Name the model to ensemble, or pass attribute=None."
            )
        backbone = getattr(parent, leaf)
        if trainer is not None:
            self._probe(trainer, backbone, path)
        kwargs = dict(self.method_kwargs)
        ensemble = build_ensemble(self.method, backbone, self.num_members, **kwargs)
        wrapped = EnsembledModel(ensemble, self.task, self.batch)
        set_submodule(pl_module, path, wrapped)
        return wrapped

    def _current(self, pl_module: nn.Module) -> EnsembledModel | None:
        path = self.chosen_attribute or self.attribute
        if path is None:
            return None
        try:
            module = pl_module.get_submodule(path)
        except AttributeError:
            return None
        return module if isinstance(module, EnsembledModel) else None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.apply(pl_module, trainer)
        if self.batch == "repeat" and self._original_training_step is None:
            self._patch_training_step(pl_module)

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        # Lightning restores callbacks before configure_optimizers: take the checkpoint's DeepEnsemble
        # storage so that its optimiser and averaging states match (see adopt_checkpoint_storage).
        if not trainer.optimizers:
            adopt_checkpoint_storage(pl_module, checkpoint.get("state_dict", {}))

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self._original_training_step is not None:
            pl_module.training_step = self._original_training_step
            self._original_training_step = None

    # ---------------------------------------------------------------- batches
    def inputs_of(self, batch: Any) -> Tensor | None:
        """The model input of a batch: first element of a tuple/list, or a dict's ``x``/``input``/... entry."""
        if isinstance(batch, Tensor):
            return batch
        if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], Tensor):
            return batch[0]
        if isinstance(batch, Mapping):
            for key in _INPUT_KEYS:
                if isinstance(batch.get(key), Tensor):
                    return batch[key]
        return None

    def targets_of(self, batch: Any) -> Tensor | None:
        """The targets of a batch (second element of a tuple, or a dict's target key)."""
        if isinstance(batch, (tuple, list)) and len(batch) > 1 and isinstance(batch[1], Tensor):
            return batch[1]
        if isinstance(batch, Mapping):
            for key in _TARGET_KEYS:
                if isinstance(batch.get(key), Tensor):
                    return batch[key]
        return None

    def repeat_targets(self, batch: Any, num_members: int) -> Any:
        """The batch with its targets repeated ``num_members`` times along dim 0 (``batch="repeat"``).

        Override for batch structures other than ``(x, y, ...)`` tuples and dicts with target keys.
        """
        if isinstance(batch, (tuple, list)):
            if len(batch) < 2:
                raise ValueError(
                    "Ensembling(batch='repeat') found no targets in a batch of one element; "
                    "subclass Ensembling and override `repeat_targets`."
                )
            rest = [t.repeat(num_members, *([1] * (t.dim() - 1))) if isinstance(t, Tensor) else t for t in batch[1:]]
            return type(batch)([batch[0], *rest]) if isinstance(batch, tuple) else [batch[0], *rest]
        if isinstance(batch, Mapping):
            keys = [k for k in _TARGET_KEYS if isinstance(batch.get(k), Tensor)]
            if not keys:
                raise ValueError(
                    f"Ensembling(batch='repeat') found no target in a dict batch with keys {sorted(batch)}; "
                    f"use one of {_TARGET_KEYS} or override `repeat_targets`."
                )
            out = dict(batch)
            for k in keys:
                t = batch[k]
                out[k] = t.repeat(num_members, *([1] * (t.dim() - 1)))
            return out
        raise ValueError(
            f"Ensembling(batch='repeat') cannot find targets in a batch of type {type(batch).__name__}; "
            "subclass Ensembling and override `repeat_targets`, or use batch='split'."
        )

    def _patch_training_step(self, pl_module: L.LightningModule) -> None:
        original = pl_module.training_step
        callback = self

        def training_step(module: L.LightningModule, batch: Any, *args: Any, **kwargs: Any) -> Any:
            return original(callback.repeat_targets(batch, callback.num_members), *args, **kwargs)

        self._original_training_step = original
        # An instance attribute shadows the class method; DDP's wrapper calls it through the module too.
        pl_module.training_step = types.MethodType(training_step, pl_module)

    # ---------------------------------------------------------------- member outputs for other callbacks
    def member_predictions(self, pl_module: nn.Module, batch: Any) -> dict[str, Tensor] | None:
        """``{"member_logits" or "member_outputs": (M, B, ...), "target": (B,)}`` of the last evaluation batch."""
        model = self._current(pl_module)
        if model is None or model.last_member_outputs is None:
            return None
        key = "member_logits" if self.task == "classification" else "member_outputs"
        out = {key: model.last_member_outputs}
        target = self.targets_of(batch)
        if target is not None:
            out["target"] = target
        return out
