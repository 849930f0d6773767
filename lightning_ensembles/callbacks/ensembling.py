"""Ensembling: turn a submodule of an unchanged LightningModule into an ensemble, from the Trainer."""

from __future__ import annotations

import ctypes
import inspect
import random
import types
from collections.abc import Mapping
from contextvars import ContextVar
from typing import Any, Literal

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import CombinedLoader, rank_zero_info
from lightning_utilities import apply_to_collection
from torch import Tensor, nn
from torchmetrics import Metric

from .._checks import check_choice
from ..ensembles.base import (
    Ensemble,
    aggregate_gaussian,
    aggregate_log_probs,
    split_gaussian,
)
from ..ensembles.deep import DeepEnsemble, adopt_checkpoint_storage
from ..ensembles.registry import ENSEMBLE_METHODS, _load_builtin_methods, build_ensemble
from ..ensembles.surgery import set_submodule, set_unregistered
from ._predictions import find_target

__all__ = ["Ensembling", "EnsembledModel"]

# The inputs of the submodule's call other than the first, while an EnsembledModel runs its ensemble:
# (rows of the first input, extra positional inputs, keyword inputs, keyword name of the first input or None).
_EXTRA_INPUTS: ContextVar[tuple[int, tuple, dict, str | None] | None] = ContextVar(
    "_ensembling_extra_inputs", default=None
)


def _inject_extra_inputs(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
    """Forward pre-hook on the module an ensemble runs: hand it the call's other inputs too.

    Ensembles run their backbone with one input; a submodule called as ``model(inputs, target, mask=m)``
    gets ``target`` and ``mask`` from here. An ensemble that stacks the batch member-major (BatchEnsemble,
    LoRA: ``M * B`` rows) gets the other batch-sized inputs repeated the same way. Outside an
    EnsembledModel call (exported members) the hook does nothing.
    """
    context = _EXTRA_INPUTS.get()
    if context is None or not args:
        return None
    rows, extra_args, extra_kwargs, first_name = context
    got = args[0].shape[0] if isinstance(args[0], Tensor) and args[0].dim() else rows
    if got != rows:
        if got % rows:
            raise ValueError(
                f"Ensembling: the ensemble ran its backbone on {got} rows for a batch of {rows}; the submodule's other "
                "inputs cannot be matched to them. Use method='deep' for a submodule called with several inputs."
            )

        def tile(t: Any) -> Any:
            return (
                t.repeat(got // rows, *([1] * (t.dim() - 1)))
                if isinstance(t, Tensor) and t.dim() and t.shape[0] == rows
                else t
            )

        extra_args = tuple(tile(a) for a in extra_args)
        extra_kwargs = {k: tile(v) for k, v in extra_kwargs.items()}
    if first_name is not None:  # the submodule's input was given by keyword
        return (*args[1:], *extra_args), {**kwargs, first_name: args[0], **extra_kwargs}
    return (*args, *extra_args), {**kwargs, **extra_kwargs}


# Ensembles known to call one module with the batch as given (or repeated member-major), and where it is;
# others (MIMO's shuffled slots, augmented TTA inputs) could misalign a second input with the first.
_ENTRY_MODULES = {"PackedEnsemble": "model", "BatchEnsemble": "model", "LoRAEnsemble": "backbone"}


def _entry_module(ensemble: Ensemble) -> nn.Module | None:
    """The module an ensemble calls with the batch, where the submodule's other inputs are handed in."""
    if isinstance(ensemble, DeepEnsemble):
        return ensemble.template
    for cls in type(ensemble).__mro__:
        if cls.__name__ in _ENTRY_MODULES:
            module = getattr(ensemble, _ENTRY_MODULES[cls.__name__], None)
            return module if isinstance(module, nn.Module) else None
    return None


def _split_call(args: tuple, kwargs: dict) -> tuple[Any, str | None, tuple, dict]:
    """``(first input, its keyword name or None, other positional inputs, other keyword inputs)`` of a call.

    The first input is the batch the members share: the first positional one, or the first tensor given by
    keyword when there are no positional inputs.
    """
    if args:
        return args[0], None, tuple(args[1:]), dict(kwargs)
    first_name = next((k for k, v in kwargs.items() if isinstance(v, Tensor)), None)
    return (
        kwargs.get(first_name) if first_name else None,
        first_name,
        (),
        {k: v for k, v in kwargs.items() if k != first_name},
    )


def _takes_example_input(method: str) -> bool:
    """Whether the factory of ``method`` verifies its conversion on an ``example_input`` batch."""
    _load_builtin_methods()
    factory = ENSEMBLE_METHODS.get(method)
    try:
        return factory is not None and "example_input" in inspect.signature(factory).parameters
    except (TypeError, ValueError):
        return False


def _describe(value: Any) -> str:
    if isinstance(value, Tensor):
        return f"Tensor{list(value.shape)}"
    if isinstance(value, (tuple, list)):
        return f"a {type(value).__name__} of {len(value)} items"
    if isinstance(value, Mapping):
        return f"a {type(value).__name__} with keys {list(value)}"
    return type(value).__name__


def _numpy_state_bytes() -> bytes | None:
    """NumPy's global generator state (Mersenne Twister key and position) as raw bytes, in ~1 us.

    ``np.random.get_state()`` takes ~100 us, too slow to take at every training step; these bytes
    tell whether the state changed and put it back. ``None`` where that memory layout is unavailable.
    """
    try:
        address = np.random.mtrand._rand._bit_generator.ctypes.state_address
    except AttributeError:
        return None
    return ctypes.string_at(address, _MT19937_BYTES)


def _restore_numpy_state_bytes(saved: bytes) -> None:
    ctypes.memmove(np.random.mtrand._rand._bit_generator.ctypes.state_address, saved, _MT19937_BYTES)


_MT19937_BYTES = 624 * 4 + 4  # numpy's mt19937_state: uint32_t key[624]; int pos


class _RandomState:
    """The global random generators' states, to replay a stretch of code.

    torch (CPU and CUDA) always; NumPy's and Python's (slow to read) only with ``host=True``.
    """

    def __init__(self, host: bool = False) -> None:
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
        self.host = (np.random.get_state(), random.getstate()) if host else None

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state_all(self.cuda)
        if self.host is not None:
            np.random.set_state(self.host[0])
            random.setstate(self.host[1])


class _MemberPasses:
    """State of one ``training_step`` run once per member (``batch="repeat"``).

    Pass 0 runs the ensemble at each call of the submodule and keeps the member outputs ``(M, ...)``
    and the random state after the call; pass ``i`` returns member ``i``'s outputs of the same call and
    restores torch's random state after the call (the ensemble's dropout drew from it in pass 0 only),
    so the user's code around the call sees what it saw in pass 0.
    """

    def __init__(self) -> None:
        self.member = 0
        self.call = 0
        self.outputs: list[Tensor] = []
        self.states: list[_RandomState] = []


class EnsembledModel(nn.Module):
    """What the user's module sees in place of its submodule after :class:`Ensembling` converts it.

    It is called exactly as the submodule was (any positional and keyword inputs; the first input, or
    the first tensor given by keyword, is the batch the members share) and returns what one model returns:

    * training, ``batch="repeat"``: inside the user's ``training_step``, which :class:`Ensembling` runs
      once per member, member ``i``'s output in pass ``i`` (the ensemble runs once, in pass 0);
    * training, ``batch="split"``: member ``i`` computes chunk ``i`` of the batch; outputs in batch order
      (an output with ``k`` rows per sample, such as a ``(B * T, V)`` view, is split by sample);
    * evaluation and prediction (and training calls outside ``training_step``): the ensemble prediction
      in the shape of one model's output: the log of the mean member probability (classification: a
      user's ``cross_entropy``/``argmax`` measure the ensemble) or the mixture mean (regression).

    The member outputs of the last evaluation forward are kept in ``last_member_outputs`` ``(M, B, ...)``.

    Args:
        ensemble: the converted submodule.
        task: ``"classification"``, ``"regression"`` or ``"gaussian"``: how member outputs are combined.
        batch: ``"repeat"`` or ``"split"``: how the members share a training batch.
    """

    ensemble: Ensemble
    #: A _MemberPasses while training_step runs once per member (outside the module tree, as are the others).
    _passes: _MemberPasses | None
    _accepts_extra_inputs: bool

    def __init__(self, ensemble: Ensemble, task: str, batch: str) -> None:
        super().__init__()
        self.ensemble = ensemble
        self.task = task
        self.batch = batch
        self.last_member_outputs: Tensor | None = None
        set_unregistered(self, "_passes", None)
        entry = _entry_module(ensemble)
        if entry is not None and not any(h is _inject_extra_inputs for h in entry._forward_pre_hooks.values()):
            # Module-level function: exported members keep a hook that pickles and does nothing.
            entry.register_forward_pre_hook(_inject_extra_inputs, with_kwargs=True)
        set_unregistered(self, "_accepts_extra_inputs", entry is not None)

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

    # ---------------------------------------------------------------- running the members
    def member_outputs(self, *args: Any, **kwargs: Any) -> Tensor:
        """Every member's output ``(M, ...)`` for the submodule's inputs, as one call of the submodule would take them."""
        x, first_name, extra_args, extra_kwargs = _split_call(args, kwargs)
        if not isinstance(x, Tensor) or not x.dim():
            raise ValueError(
                f"Ensembling: the ensembled submodule was called with {_describe(x) if args else 'no tensor input'} as "
                "its first input; the members need a batch tensor (B, ...) there. Call the submodule with its "
                "batch first, or point `attribute` at a submodule that takes one."
            )
        if self.training:
            self._check_training_rows(x.shape[0])
        if not (extra_args or extra_kwargs or first_name):
            outputs = self.ensemble(x)
        else:
            if not self._accepts_extra_inputs:
                raise ValueError(
                    f"Ensembling: the submodule is called with several inputs, but {type(self.ensemble).__name__} "
                    "runs its backbone with one. Use method='deep', 'packed', 'batch' or 'lora'."
                )
            token = _EXTRA_INPUTS.set((x.shape[0], tuple(extra_args), dict(extra_kwargs), first_name))
            try:
                outputs = self.ensemble(x)
            finally:
                _EXTRA_INPUTS.reset(token)
        if not isinstance(outputs, Tensor):
            raise ValueError(
                f"Ensembling: the ensemble returned {_describe(outputs)}, not one tensor of member outputs. Point "
                "`attribute` at a submodule whose forward returns one tensor."
            )
        return outputs

    def _check_training_rows(self, rows: int) -> None:
        # Ensembles that build their own training batches (MIMO's batch_repetition, a split batch_mode)
        # predict other targets than the batch's; the user's loss only has the batch's.
        checked = self.__dict__.setdefault("_rows_checked", set())
        if rows in checked:
            return
        own = self.ensemble.member_targets(torch.empty(rows, device="meta")).shape[1]
        if own == rows:
            checked.add(rows)
        else:
            raise ValueError(
                f"Ensembling: in training, {type(self.ensemble).__name__} predicts {own} targets per member for a batch "
                f"of {rows} (it builds its own training batches), which the user's loss cannot match. Configure it to "
                "train on the batch as given (e.g. MIMO batch_repetition=1, batch_mode='repeat'), or use "
                "EnsembleClassifier / EnsembleRegressor, which use its member_targets."
            )

    def _split_forward(self, outputs: Tensor, rows: int) -> Tensor:
        m = self.num_members
        if rows < m:
            raise ValueError(
                f"Ensembling(batch='split') needs a batch of at least num_members={m} samples, got {rows}."
            )
        # Every member ran on every sample; keep member i's chunk (chunk sizes differ by at most 1).
        owner = torch.arange(rows, device=outputs.device) * m // rows
        out_rows = outputs.shape[1]
        if out_rows != rows:
            if out_rows % rows:
                raise ValueError(
                    f"Ensembling(batch='split'): the submodule returned {out_rows} rows for a batch of {rows}; "
                    "cannot tell which sample each row belongs to. Use batch='repeat'."
                )
            owner = owner.repeat_interleave(out_rows // rows)  # a (B * k, ...) view: k rows per sample, sample-major
        return outputs[owner, torch.arange(out_rows, device=outputs.device)]

    def combine(self, outputs: Tensor) -> Tensor:
        """The ensemble prediction of member outputs ``(M, ...)``, in the shape of one member's output."""
        if self.task == "classification":
            return aggregate_log_probs(outputs)
        if self.task == "gaussian":
            mix = aggregate_gaussian(*split_gaussian(outputs))
            # Same layout as one member's output: means, then the raw value whose softplus is the variance.
            raw = torch.log(torch.expm1(mix.variance.clamp_min(1e-6)))
            return torch.cat([mix.mean, raw], dim=-1)
        return outputs.mean(0)

    def forward(self, *args: Any, **kwargs: Any) -> Tensor:
        passes = self._passes
        if self.training and passes is not None and passes.member > 0:
            # A replayed pass of training_step: this call's member outputs were computed in pass 0.
            if passes.call >= len(passes.outputs):
                raise RuntimeError(
                    f"Ensembling(batch='repeat'): training_step called the ensembled submodule {passes.call + 1} "
                    f"times for member {passes.member} but {len(passes.outputs)} times for member 0; it must make "
                    "the same calls for every member (its random state is replayed). Use batch='split'."
                )
            out = passes.outputs[passes.call][passes.member]
            passes.states[passes.call].restore()
            passes.call += 1
            return out
        outputs = self.member_outputs(*args, **kwargs)
        if self.training:
            if outputs.shape[0] != self.num_members:
                # e.g. MCDropout(train_samples=1), TTAEnsemble(train_augment=False): one training output.
                raise ValueError(
                    f"Ensembling: in training, {type(self.ensemble).__name__} returns {outputs.shape[0]} member "
                    f"outputs for num_members={self.num_members}; every member needs its own output and loss. "
                    "Configure it to return one per member (MCDropout train_samples=None, TTAEnsemble "
                    "train_augment=True)."
                )
            if self.batch == "split":
                first = args[0] if args else next(v for v in kwargs.values() if isinstance(v, Tensor))
                return self._split_forward(outputs, first.shape[0])
            if passes is not None:
                passes.outputs.append(outputs)
                passes.states.append(_RandomState())
                passes.call += 1
                return outputs[0]
            if self.num_members == 1:
                return outputs[0]
            return self.combine(outputs)
        self.last_member_outputs = outputs.detach()
        return self.combine(outputs)


class _ProbeDone(Exception):
    """Stops the setup probe once the submodule has been called."""


class Ensembling(Callback):
    """Make an unchanged LightningModule train and evaluate an ensemble: add this callback, nothing else.

    At ``setup`` the submodule named ``attribute`` (default ``"model"``; ``None``: the child module
    with the most parameters, reported) is converted with ``method`` (``"deep"``, ``"packed"``,
    ``"batch"``, ``"lora"``, ...) into ``num_members`` members and replaced by an :class:`EnsembledModel`,
    which is called exactly as the submodule was: any batch structure (a bare tensor without targets,
    tuples, dicts), several inputs (``model(inputs, target, mask=m)``; methods ``"deep"``, ``"packed"``,
    ``"batch"``, ``"lora"``), an inner submodule (a decoder or head fed by other layers). Before
    converting, ``fit`` runs the user's ``training_step`` on (two rows of) the first training batch up
    to the submodule's call, with the random state and buffers restored after: it checks that the
    submodule is called and returns one tensor, and records the call in :attr:`probed_call`.

    Training: every member gets its own loss under the user's own ``training_step``.
    ``batch="repeat"`` (default) gives every member the whole batch: the callback runs
    ``training_step`` once per member, the ensemble runs once (first pass) and the submodule's call
    returns member ``i``'s output in pass ``i``; the random generators (torch, NumPy, Python) are
    replayed so that every pass sees the same augmentation. The step returns the mean of the member
    losses (of ``"loss"`` for a dict; other entries are member 0's), and a value the step logs is
    logged once, the mean of its member values (a torchmetrics object, updated by every member, once).
    The batch is never changed, so nothing has to be found in it. The user's code around the call runs
    once per member (layers outside the ensembled submodule, BatchNorm statistics included, see the
    batch M times per step). Manual optimisation cannot repeat its steps: it needs ``batch="split"``.
    ``batch="split"`` gives member ``i`` the ``i``-th chunk of the batch (outputs and targets keep
    shape ``(B, ...)``; ``training_step`` runs once).

    Evaluation and prediction: the user's module sees the ensemble prediction in the shape its code
    expects (log of the mean member probability for ``task="classification"``; the mixture mean for
    ``"regression"``; mean and softplus-inverse variance for ``"gaussian"`` outputs), so the user's own
    metrics measure the ensemble. Member outputs of each evaluation batch are offered to
    :class:`CalibrationMetrics`, :class:`ReliabilityDiagram` and :class:`TemperatureScaling` through
    :meth:`member_predictions` (targets: the second element of a tuple batch or a dict's ``y``,
    ``target``, ``targets``, ``label`` or ``labels``).

    A submodule whose forward returns a tuple or dict is refused at setup with an error naming what
    was found: point ``attribute`` at a submodule that returns one tensor. Checkpoints written with the callback hold every
    member; restore them with the same callback on the Trainer (``ckpt_path=...``) or call
    :meth:`apply` on a fresh module before ``load_state_dict``.

    Put ``Ensembling`` before other callbacks that read the model (it converts at ``setup``).

    Args:
        method: the ensemble method the submodule is converted with (a name of
            :data:`~lightning_ensembles.ensembles.registry.ENSEMBLE_METHODS`, e.g. ``"deep"``, ``"packed"``).
        num_members: the number of members.
        attribute: dotted path of the submodule to ensemble; ``None``: the child module with the most parameters.
        task: ``"classification"``, ``"regression"`` or ``"gaussian"``: how evaluation combines member outputs.
        batch: ``"repeat"`` (every member trains on the whole batch) or ``"split"`` (member ``i`` on chunk ``i``).
        method_kwargs: keyword arguments of the method's factory.

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
        self.task = check_choice("task", task, ("classification", "regression", "gaussian"))
        self.batch = check_choice("batch", batch, ("repeat", "split"))
        if not isinstance(num_members, int) or num_members < 1:
            raise ValueError(f"`num_members` must be an integer >= 1, got {num_members!r}.")
        self.method, self.num_members, self.method_kwargs = method, num_members, dict(method_kwargs or {})
        self.attribute = attribute
        self.chosen_attribute: str | None = None
        #: How the setup probe saw the submodule called, e.g. ``"model(Tensor[2, 8], Tensor[2, 8])"``.
        self.probed_call: str | None = None
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

    @staticmethod
    def _first_training_batch(trainer: L.Trainer) -> Any:
        try:
            # Private but the one place that knows the fit dataloader at setup time, whether it came
            # from a datamodule, the module's own `train_dataloader` or `trainer.fit(train_dataloaders=...)`.
            loader = trainer.fit_loop._data_source.dataloader()
        except Exception:
            return None
        if loader is None:
            return None
        if isinstance(loader, (Mapping, list, tuple)):  # several loaders: training_step gets them combined
            loader = CombinedLoader(loader, "max_size_cycle")
            return next(iter(loader))[0]
        return next(iter(loader))

    def _probe(
        self, trainer: L.Trainer, pl_module: L.LightningModule, backbone: nn.Module, path: str
    ) -> tuple[tuple, dict] | None:
        """Run the user's ``training_step`` on the first training batch up to the submodule's call.

        This finds how the submodule is really called (which inputs, from which layers) without
        guessing it from the batch, and checks that it returns one tensor. The call is stopped right
        after the submodule returns; buffers (BatchNorm statistics) and random states are restored.
        """
        if trainer.state.fn != "fit":
            return None
        seen: dict[str, Any] = {}

        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            seen.update(args=args, kwargs=kwargs, output=output)
            raise _ProbeDone

        # Everything the probe touches is put back (drawing the batch may draw from the generators too), so
        # that a seeded run gives the same results whether or not it was probed.
        state = _RandomState(host=True)
        buffers = {name: b.detach().clone() for name, b in pl_module.named_buffers()}
        handle = backbone.register_forward_hook(hook, with_kwargs=True)
        step = self._original_training_step or pl_module.training_step
        try:
            batch = self._first_training_batch(trainer)
            if batch is None:
                return None
            first = next(iter(t for t in _tensors(batch) if t.dim()), None)
            if first is not None and first.shape[0] > 2:  # two samples are enough to see the call
                rows = first.shape[0]
                batch = apply_to_collection(batch, Tensor, lambda t: t[:2] if t.dim() and t.shape[0] == rows else t)
            with torch.no_grad():
                step(batch, 0)
        except _ProbeDone:
            pass
        except Exception as err:
            if not seen:  # the step failed before calling the submodule: the real step will say why
                rank_zero_info(f"Ensembling: could not probe `{path}` at setup ({type(err).__name__}: {err}).")
                return None
        finally:
            handle.remove()
            state.restore()
            with torch.no_grad():
                for name, b in pl_module.named_buffers():
                    if name in buffers and b.shape == buffers[name].shape:
                        b.copy_(buffers[name])
        if not seen:
            raise ValueError(
                f"Ensembling: `training_step` of {type(pl_module).__name__} never called `{path}` on the first "
                "training batch, so its members would not be trained. Name the submodule training_step uses with "
                "`attribute='...'`."
            )
        inputs = [_describe(a) for a in seen["args"]] + [f"{k}={_describe(v)}" for k, v in seen["kwargs"].items()]
        self.probed_call = f"{path}({', '.join(inputs)})"
        out = seen["output"]
        if not isinstance(out, Tensor):
            keys = f" (keys {list(out)})" if isinstance(out, Mapping) else ""
            what = (
                f"a {type(out).__name__} of {len(out)} items"
                if isinstance(out, (tuple, list, Mapping))
                else type(out).__name__
            )
            raise ValueError(
                f"Ensembling cannot ensemble `{path}`: its forward returned {what}{keys}, not one tensor. "
                "Point `attribute` at a submodule whose forward returns the logits (classification) or the "
                "predictions (regression) as one tensor, wrapping the model in such a module if needed."
            )
        return seen["args"], seen["kwargs"]

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
            children = [n for n, c in pl_module.named_children() if not isinstance(c, Metric)]
            raise ValueError(
                f"Ensembling: `attribute`={path!r} is not a submodule of {type(pl_module).__name__} "
                f"(its children: {children}). Name the model to ensemble, or pass attribute=None."
            )
        backbone = getattr(parent, leaf)
        call = None
        if trainer is not None and isinstance(pl_module, L.LightningModule):
            call = self._probe(trainer, pl_module, backbone, path)
        ensemble = self._build(backbone, call)
        wrapped = EnsembledModel(ensemble, self.task, self.batch)
        set_submodule(pl_module, path, wrapped)
        return wrapped

    def _build(self, backbone: nn.Module, call: tuple[tuple, dict] | None) -> Ensemble:
        kwargs = dict(self.method_kwargs)
        split = _split_call(*call) if call is not None else None
        several_inputs = split is not None and bool(split[1] or split[2] or split[3])
        if split is None or not several_inputs or "example_input" in kwargs or not _takes_example_input(self.method):
            return build_ensemble(self.method, backbone, self.num_members, **kwargs)
        # A submodule called with several inputs: converters that verify themselves on a probe batch get
        # the probed call (first input as example_input, the others through the hook), as in training.
        x, first_name, extra_args, extra_kwargs = split
        kwargs["example_input"] = x
        if not any(h is _inject_extra_inputs for h in backbone._forward_pre_hooks.values()):
            backbone.register_forward_pre_hook(_inject_extra_inputs, with_kwargs=True)
        token = _EXTRA_INPUTS.set((x.shape[0], tuple(extra_args), dict(extra_kwargs), first_name))
        try:
            return build_ensemble(self.method, backbone, self.num_members, **kwargs)
        finally:
            _EXTRA_INPUTS.reset(token)

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
        if stage == "fit" and self.batch == "repeat" and self.num_members > 1 and not pl_module.automatic_optimization:
            raise ValueError(
                f"Ensembling(batch='repeat') runs training_step once per member, which under manual optimisation "
                f"({type(pl_module).__name__}.automatic_optimization is False) would step the optimisers once per "
                "member. Use Ensembling(batch='split'), or automatic optimisation."
            )
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
            pl_module.__dict__.pop("training_step", None)
            if pl_module.training_step != self._original_training_step:  # it was an instance attribute itself
                setattr(pl_module, "training_step", self._original_training_step)
            self._original_training_step = None

    # ---------------------------------------------------------------- batches
    def targets_of(self, batch: Any) -> Tensor | None:
        """The targets of an evaluation batch (second element of a tuple, or a dict's target key)."""
        if isinstance(batch, (tuple, list)) and len(batch) > 1 and isinstance(batch[1], Tensor):
            return batch[1]
        if isinstance(batch, Mapping):
            return find_target(batch)
        return None

    def _patch_training_step(self, pl_module: L.LightningModule) -> None:
        original = pl_module.training_step
        callback = self

        def training_step(module: L.LightningModule, *args: Any, **kwargs: Any) -> Any:
            model = callback._current(module)
            if model is None or model.num_members == 1:
                return original(*args, **kwargs)
            return _run_member_passes(module, model, original, args, kwargs)

        self._original_training_step = original
        # An instance attribute shadows the class method; DDP's wrapper calls it through the module too.
        setattr(pl_module, "training_step", types.MethodType(training_step, pl_module))

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


def _tensors(batch: Any) -> list[Tensor]:
    found: list[Tensor] = []
    apply_to_collection(batch, Tensor, found.append)
    return found


def _run_member_passes(module: L.LightningModule, model: EnsembledModel, step: Any, args: tuple, kwargs: dict) -> Any:
    """``training_step`` once per member (see :class:`Ensembling`): the mean loss, each logged value logged once."""
    passes = _MemberPasses()
    logged: dict[str, list[tuple[Any, tuple, dict]]] = {}

    def record(name: str, value: Any, *log_args: Any, **log_kwargs: Any) -> None:
        logged.setdefault(name, []).append((value, log_args, log_kwargs))

    # Every pass starts from the same random state. NumPy's and Python's generators (~100 us to read) are
    # saved in the first step and in steps of a module seen to draw from them in training_step; otherwise a
    # cheap fingerprint tells whether pass 0 drew from them, and only their raw states are put back (not
    # NumPy's cached second normal sample) in that step.
    uses_host = model.__dict__.get("_host_random")  # None: not known yet
    start = _RandomState(host=uses_host is not False)
    host_before = None if uses_host else (_numpy_state_bytes(), random.getstate())
    host_approximate = False
    results = []
    own_log = module.__dict__.get("log")
    set_unregistered(model, "_passes", passes)
    setattr(module, "log", record)  # an instance attribute shadows LightningModule.log while the passes run
    try:
        for member in range(model.num_members):
            if member:
                start.restore()
                if host_approximate and host_before is not None:
                    numpy_state, python_state = host_before
                    if numpy_state is not None:
                        _restore_numpy_state_bytes(numpy_state)
                    random.setstate(python_state)
            passes.member, passes.call = member, 0
            results.append(step(*args, **kwargs))
            if not member and host_before is not None:
                drew = (_numpy_state_bytes(), random.getstate()) != host_before
                set_unregistered(model, "_host_random", drew)
                host_approximate = drew and start.host is None
            if member and passes.call != len(passes.outputs):
                raise RuntimeError(
                    f"Ensembling(batch='repeat'): training_step called the ensembled submodule {passes.call} times for "
                    f"member {member} but {len(passes.outputs)} times for member 0; it must make the same calls for "
                    "every member (its random state is replayed). Use batch='split'."
                )
    finally:
        set_unregistered(model, "_passes", None)
        if own_log is None:
            module.__dict__.pop("log", None)
        else:
            setattr(module, "log", own_log)
    for name, calls in logged.items():
        value, log_args, log_kwargs = calls[-1]
        values = [v for v, _, _ in calls]
        if all(isinstance(v, (Tensor, int, float)) and not isinstance(v, bool) for v in values):
            value = sum(values) / len(values)
        module.log(name, value, *log_args, **log_kwargs)
    return _mean_result(results)


def _mean_result(results: list[Any]) -> Any:
    first = results[0]
    if all(r is None for r in results):
        return None
    if isinstance(first, Tensor) and all(isinstance(r, Tensor) for r in results):
        return sum(results) / len(results)
    if isinstance(first, Mapping) and all(
        isinstance(r, Mapping) and isinstance(r.get("loss"), Tensor) for r in results
    ):
        return {**first, "loss": sum(r["loss"] for r in results) / len(results)}
    raise ValueError(
        "Ensembling(batch='repeat'): training_step returned "
        f"{', '.join(_describe(r) for r in results)} for the members; it must return a loss tensor, a dict with "
        "'loss', or None, the same for every member."
    )
