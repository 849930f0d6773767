"""Deep ensembles of any backbone, with members stored as stacked tensors and run in one call."""

from __future__ import annotations

import copy
import time
import warnings
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.func import stack_module_state, vmap

from ..backbones import resolve_backbone
from ._member_views import GradBuffers, Scratch, member_views
from .base import Ensemble
from .registry import register_method
from .reinit import reinitialize

__all__ = ["DeepEnsemble"]

_SEP = "-"  # "." is not allowed in parameter names; "-" never occurs in Python attribute names.
_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


def _set_tensor(module: nn.Module, dotted: str, value: Tensor, parameter: bool) -> None:
    *path, leaf = dotted.split(".")
    owner = module.get_submodule(".".join(path)) if path else module
    if parameter:
        owner._parameters[leaf] = nn.Parameter(value, requires_grad=value.is_floating_point())
    else:
        owner._buffers[leaf] = value


def _slot_table(template: nn.Module, names: list[str]) -> list[tuple[dict, str, int, Tensor]]:
    """Where each of ``names`` (parameters, then buffers) lives in ``template``, tied copies included.

    Entries are ``(owner's _parameters or _buffers dict, key, index into names, template's own tensor)``.
    """
    index = {n: i for i, n in enumerate(names)}
    canonical = {id(t): n for n, t in [*template.named_parameters(), *template.named_buffers()]}
    slots = []
    for store, items in (
        ("_parameters", template.named_parameters(remove_duplicate=False)),
        ("_buffers", template.named_buffers(remove_duplicate=False)),
    ):
        for path, tensor in items:
            *owner_path, leaf = path.split(".")
            owner = template.get_submodule(".".join(owner_path))
            slots.append((getattr(owner, store), leaf, index[canonical[id(tensor)]], tensor))
    return slots


@register_method("deep")
class DeepEnsemble(Ensemble):
    """M independent copies of any backbone, run as one vectorized call.

    Args:
        backbone: an ``nn.Module``, a timm model name (``"resnet18"``), ``"mlp"`` or a dotted import
            path to a model factory (``"torchvision.models.resnet18"``).
        num_members: number of members M (>= 1).
        init: ``"reinit"`` re-initialises every parameter of every member (a timm *name* creates M
            fresh models, so each member gets the model's own initialiser; a built module is
            re-initialised by :func:`~lightning_ensembles.ensembles.reinit.reinitialize`, which also
            re-draws tensors no layer owns such as a ViT's ``cls_token`` and ``pos_embed``).
            ``"copy"`` starts every member from the given (e.g. pretrained) weights.
        execution: ``"vmap"`` (``torch.func.vmap`` over the backbone), ``"loop"`` (a Python loop over
            members), or ``"auto"``: vmap for training and on accelerators; for inference on CPU (eval
            mode, no grad) the loop for convolutional backbones (batched convolutions are slower
            there, ``benchmarks/deep_ensemble.py``) and, for other backbones, whichever of the two a
            one-off timing on the first batch finds faster (vmap's fixed per-call cost outweighs its
            gain for small models with few members). If vmap cannot run the backbone, the ensemble
            falls back to the loop and warns once with the reason.
        backbone_kwargs: keyword arguments when ``backbone`` is a name (e.g. ``{"num_classes": 10}``).

    Members are kept as stacked parameters and buffers with a leading member axis (state-dict keys
    ``params.<path-with-dashes>``), so BatchNorm running statistics are per member and optimisers,
    weight averaging and checkpoints see every member. Each member sees the whole batch. Dropout
    masks differ between members (``randomness="different"``).

    Example:
        >>> import torch
        >>> from lightning_ensembles import DeepEnsemble
        >>> ens = DeepEnsemble("mlp", num_members=3, backbone_kwargs={"in_features": 4, "out_features": 2})
        >>> out = ens(torch.randn(8, 4))
        >>> out.shape
        torch.Size([3, 8, 2])
        >>> torch.allclose(ens.member(1)(torch.zeros(1, 4)), ens(torch.zeros(1, 4))[1])
        True
    """

    def __init__(
        self,
        backbone: nn.Module | str,
        num_members: int = 4,
        init: Literal["reinit", "copy"] = "reinit",
        execution: Literal["auto", "vmap", "loop"] = "auto",
        backbone_kwargs: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(num_members)
        if init not in ("reinit", "copy"):
            raise ValueError(f"`init` must be 'reinit' or 'copy', got {init!r}.")
        if execution not in ("auto", "vmap", "loop"):
            raise ValueError(f"`execution` must be 'auto', 'vmap' or 'loop', got {execution!r}.")
        self.init = init
        self.execution = execution
        self.reinit_redrawn: list[str] = []

        if isinstance(backbone, str) and init == "reinit":
            members = [resolve_backbone(backbone, backbone_kwargs) for _ in range(num_members)]
        else:
            base = resolve_backbone(backbone, backbone_kwargs)
            members = [copy.deepcopy(base) for _ in range(num_members)]
            if init == "reinit":
                for m in members:
                    self.reinit_redrawn = reinitialize(m)
                if self.reinit_redrawn:
                    warnings.warn(
                        f"DeepEnsemble(init='reinit'): no layer or model initialiser owns {self.reinit_redrawn}; "
                        "re-drew them from a normal with each tensor's own mean and std.",
                        stacklevel=2,
                    )
        if not any(True for _ in members[0].parameters()):
            raise ValueError(
                "`backbone` has no parameters, so there is nothing to ensemble. Pass a model with trainable layers."
            )
        self._convolutional = any(isinstance(m, _CONV) for m in members[0].modules())
        for name, _ in list(members[0].named_parameters()) + list(members[0].named_buffers()):
            if _SEP in name:
                raise ValueError(f"DeepEnsemble cannot store tensor {name!r}: its name contains {_SEP!r}.")

        params, buffers = stack_module_state(members)
        self.params = nn.Module()
        self.buffers_ = nn.Module()
        self._param_names = list(params)
        self._buffer_names = list(buffers)
        for name, value in params.items():
            self.params.register_parameter(name.replace(".", _SEP), nn.Parameter(value.detach().clone()))
        persistent = set(members[0].state_dict())  # non-persistent buffers are not in the state dict
        for name, value in buffers.items():
            self.buffers_.register_buffer(name.replace(".", _SEP), value.clone(), persistent=name in persistent)
        # The template holds no data (meta device); it only supplies the computation (`_call_member`).
        # Kept out of the module tree so its (empty) tensors are not parameters of the ensemble.
        self.__dict__["_template"] = copy.deepcopy(members[0]).to("meta")
        self._vmap_failed: str | None = None
        self.__dict__["_grad_buffers"] = GradBuffers()
        self.__dict__["_scratch"] = Scratch()

    # ------------------------------------------------------------------ state access
    def stacked_parameters(self) -> dict[str, Tensor]:
        """Parameters of all members, ``{backbone_name: tensor (M, ...)}``."""
        return {n: getattr(self.params, n.replace(".", _SEP)) for n in self._param_names}

    def stacked_buffers(self) -> dict[str, Tensor]:
        """Buffers of all members, ``{backbone_name: tensor (M, ...)}``."""
        return {n: getattr(self.buffers_, n.replace(".", _SEP)) for n in self._buffer_names}

    @property
    def template(self) -> nn.Module:
        """The backbone's structure on the meta device (no data); run with each member's tensors."""
        return self._template

    # ------------------------------------------------------------------ execution
    def resolved_execution(self, device: torch.device | None = None, grad: bool | None = None) -> str:
        """The execution ``forward`` uses on ``device``: ``"vmap"``, ``"loop"`` or (not decided yet) ``"measure"``.

        ``grad`` is whether autograd records the call (default: ``torch.is_grad_enabled()``).
        """
        if self._vmap_failed is not None or self.execution == "loop":
            return "loop"
        if self.execution == "vmap":
            return "vmap"
        device = device or next(self.params.parameters()).device
        grad = torch.is_grad_enabled() if grad is None else grad
        if device.type != "cpu" or grad or self.training:
            return "vmap"
        if self._convolutional:
            return "loop"
        return self.__dict__.get("_measured_inference", "measure")

    @torch.no_grad()
    def _measure_inference(self, x: Tensor) -> str:
        """Time both executions on ``x`` once (eval mode, no grad: no side effects) and keep the faster.

        Five alternating rounds, each timing a block of calls of about 5 ms (one call for a slow model);
        the faster minimum wins.
        """
        runs = {"loop": self._forward_loop, "vmap": self._forward_vmap}
        block: dict[str, int] = {}
        for name, run in list(runs.items()):
            try:
                t0 = time.perf_counter()
                run(x)  # warm-up
                block[name] = max(1, min(100, round(0.005 / max(time.perf_counter() - t0, 1e-6))))
            except Exception:  # vmap cannot run this backbone: the loop it is (forward() warns if forced)
                if name == "loop":
                    raise
                del runs[name]
        best = dict.fromkeys(runs, float("inf"))
        for _ in range(5):
            for name, run in runs.items():
                t0 = time.perf_counter()
                for _ in range(block[name]):
                    run(x)
                best[name] = min(best[name], (time.perf_counter() - t0) / block[name])
        choice = min(best, key=best.get)
        self.__dict__["_measured_inference"] = choice
        return choice

    def _slots(self) -> list[tuple[dict, str, int, Tensor]]:
        cached = self.__dict__.get("_slot_cache")
        if cached is None or cached[0] is not self._template:
            cached = (self._template, _slot_table(self._template, self._param_names + self._buffer_names))
            self.__dict__["_slot_cache"] = cached
        return cached[1]

    def _call_member(self, tensors: list[Tensor], x: Tensor) -> Tensor:
        """Run the template with ``tensors`` (parameters then buffers, in stacking order) as its state.

        What ``torch.func.functional_call`` does (tied tensors included) without its per-call
        bookkeeping, which costs a sub-millisecond backbone more than its own compute: the tensors are
        put into the template's ``_parameters``/``_buffers`` dicts and its (data-less) own put back after.
        """
        slots = self._slots()
        for store, key, i, _ in slots:
            store[key] = tensors[i]
        try:
            return self._template(x)
        finally:
            for store, key, _, own in slots:
                store[key] = own

    def _stacked_lists(self) -> tuple[list[Tensor], list[Tensor]]:
        # Registration order is stacking order (replacing an entry keeps its place in the dict).
        return list(self.params._parameters.values()), list(self.buffers_._buffers.values())

    @torch.no_grad()
    def _inference_members(self, params: list[Tensor], buffers: list[Tensor]) -> list[nn.Module]:
        """Member modules whose tensors are views of the stacked storage, for calls without autograd.

        Built once and kept while the storage stays in place (optimiser steps and ``load_state_dict``
        write into it, so the views see them); moving or re-creating a tensor rebuilds them.
        """
        key = tuple(t.data_ptr() for t in params) + tuple(t.data_ptr() for t in buffers) + (id(self._template),)
        cached = self._scratch.get("inference_members")
        if cached is None or cached[0] != key:
            names = self._param_names + self._buffer_names
            modules = []
            for i in range(self.num_members):
                module = copy.deepcopy(self._template)
                tensors = [t[i] for t in params] + [t[i] for t in buffers]
                for store, name, j, _ in _slot_table(module, names):
                    store[name] = tensors[j]
                modules.append(module)
            cached = self._scratch["inference_members"] = (key, modules)
        for module in cached[1]:
            if module.training != self.training:
                module.train(self.training)
        return cached[1]

    def _forward_loop(self, x: Tensor) -> Tensor:
        params, buffers = self._stacked_lists()
        if not (torch.is_grad_enabled() and any(p.requires_grad for p in params)):
            return torch.stack([m(x) for m in self._inference_members(params, buffers)])
        param_views = member_views(params, self._grad_buffers)
        buffer_views = list(zip(*(b.unbind(0) for b in buffers))) or [()] * self.num_members
        return torch.stack([self._call_member([*p, *b], x) for p, b in zip(param_views, buffer_views)])

    def _forward_vmap(self, x: Tensor) -> Tensor:
        def one_member(params: list[Tensor], buffers: list[Tensor], inputs: Tensor) -> Tensor:
            return self._call_member(params + buffers, inputs)

        params, buffers = self._stacked_lists()
        return vmap(one_member, in_dims=(0, 0, None), randomness="different")(params, buffers, x)

    def train(self, mode: bool = True) -> DeepEnsemble:
        if not mode:  # the loop's gradient buffers are only needed while training
            self._grad_buffers.clear()
        return super().train(mode)

    def _apply(self, fn, recurse: bool = True):  # .to() / .half() / ...: drop views of the old storage
        self._grad_buffers.clear()
        self._scratch.clear()
        return super()._apply(fn, recurse)

    def forward(self, x: Tensor) -> Tensor:
        """Member outputs ``(M, B, ...)``; every member sees the whole batch ``x``."""
        if self._template.training != self.training:
            self._template.train(self.training)
        execution = self.resolved_execution(x.device)
        if execution == "measure":
            execution = self._measure_inference(x)
        if execution == "loop":
            return self._forward_loop(x)
        try:
            return self._forward_vmap(x)
        except Exception as err:  # vmap lacks batching rules for some ops; the loop runs anything.
            out = self._forward_loop(x)  # re-raises genuine errors (bad input shape and the like)
            self._vmap_failed = f"{type(err).__name__}: {err}"
            warnings.warn(
                f"DeepEnsemble: torch.func.vmap cannot run this backbone ({self._vmap_failed}); "
                "running members in a loop from now on (same results, slower on GPU). "
                "Pass execution='loop' to silence this.",
                stacklevel=2,
            )
            return out

    # ------------------------------------------------------------------ members
    def member(self, index: int) -> nn.Module:
        """A standalone copy of member ``index`` (its own tensors; edits do not affect the ensemble)."""
        index = self._check_index(index)
        module = copy.deepcopy(self._template)
        for name, p in self.stacked_parameters().items():
            _set_tensor(module, name, p[index].detach().clone(), parameter=True)
        for name, b in self.stacked_buffers().items():
            _set_tensor(module, name, b[index].detach().clone(), parameter=False)
        module.train(self.training)
        return module

    def load_member(self, index: int, module: nn.Module) -> None:
        """Copy the weights of ``module`` (same architecture as the backbone) into member ``index``."""
        index = self._check_index(index)
        params, buffers = dict(module.named_parameters()), dict(module.named_buffers())
        missing = [n for n in self._param_names if n not in params] + [n for n in self._buffer_names if n not in buffers]
        if missing:
            raise ValueError(f"`module` does not match the backbone: missing tensors {missing[:5]}.")
        with torch.no_grad():
            for n, p in self.stacked_parameters().items():
                p[index].copy_(params[n])
            for n, b in self.stacked_buffers().items():
                b[index].copy_(buffers[n])

    def extra_repr(self) -> str:
        return (
            f"num_members={self.num_members}, backbone={type(self._template).__name__}, init={self.init!r}, "
            f"execution={self.execution!r}"
        )
