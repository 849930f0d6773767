"""Deep ensembles of any backbone, with members stored as stacked tensors and run in one call."""

from __future__ import annotations

import copy
import time
import warnings
from collections.abc import Sequence
from typing import Any, Literal, cast

import torch
from torch import Tensor, nn
from torch.func import stack_module_state, vmap

from .._checks import check_choice
from ..backbones import resolve_backbone
from ._member_views import GradBuffers, Scratch, member_views
from .base import Ensemble
from .dataflow import clear_caches
from .registry import register_method
from .reinit import reinitialize
from .surgery import set_unregistered

__all__ = ["DeepEnsemble"]

_SEP = "-"  # "." is not allowed in parameter names; "-" never occurs in Python attribute names.
_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
# glibc's largest mmap threshold (DEFAULT_MMAP_THRESHOLD_MAX on 64-bit). CPU tensors above it are mapped
# and unmapped at every allocation, so a stacked parameter above it makes every step pay page faults
# for its gradient and for the optimiser's temporaries (Adam's sqrt/denominator): measured on 2 cores,
# ResNet-18 x 8 trained 0.76-0.82x as fast as torch-uncertainty's loop over separate models.
_MMAP_CEILING = 32 * 2**20


def _accelerator_available() -> bool:
    accel = getattr(torch, "accelerator", None)
    if accel is not None and hasattr(accel, "is_available"):
        return bool(accel.is_available())
    return torch.cuda.is_available()


def _auto_storage(stacked: dict[str, Tensor]) -> str:
    """``"per_member"`` for a CPU-only machine and a parameter whose stacked size exceeds the mmap ceiling."""
    largest = max(p.numel() * p.element_size() for p in stacked.values())
    return "per_member" if largest > _MMAP_CEILING and not _accelerator_available() else "stacked"


def _set_tensor(module: nn.Module, dotted: str, value: Tensor, parameter: bool) -> None:
    *path, leaf = dotted.split(".")
    owner = module.get_submodule(".".join(path)) if path else module
    if parameter:
        owner._parameters[leaf] = nn.Parameter(value, requires_grad=value.is_floating_point())
    else:
        owner._buffers[leaf] = value


_Slot = tuple[dict, str, int, Tensor]  # (owner's _parameters or _buffers dict, key, index into names, own tensor)


def _slot_table(template: nn.Module, names: list[str]) -> list[_Slot]:
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
            members), or ``"auto"``: vmap on accelerators; on CPU the loop for ``storage="per_member"``
            (members run like separate models), otherwise vmap for training and, for inference (eval
            mode, no grad), the loop for convolutional backbones (batched convolutions are slower
            there, ``benchmarks/deep_ensemble.py``) and, for other backbones, whichever of the two a
            one-off timing on the first batch finds faster (vmap's fixed per-call cost outweighs its
            gain for small models with few members). Under autocast (e.g. ``precision="bf16-mixed"``)
            that timing is skipped and vmap runs: vmap decomposes ``linear``, convolutions and norms
            into ops that autocast leaves in float32, so the two executions give different dtypes and
            values there, and a timing must never change a prediction. If vmap cannot run the
            backbone, the ensemble falls back to the loop and warns once with the reason.
        backbone_kwargs: keyword arguments when ``backbone`` is a name (e.g. ``{"num_classes": 10}``).
        storage: how parameters are kept. ``"stacked"``: one ``(M, ...)`` tensor per parameter
            (state-dict key ``params.<path-with-dashes>``), which vmap runs without copying.
            ``"per_member"``: one tensor per member (keys ``params.<path-with-dashes>.<i>``), so every
            tensor, its gradient and the optimiser's temporaries have the size they have in a single
            model. ``"auto"``: per member when the machine has no accelerator and a stacked parameter
            would exceed 32 MiB (glibc maps and unmaps CPU tensors that large at every allocation,
            which made ResNet-18 x 8 training 20% slower than a loop over separate models), stacked
            otherwise. Buffers are always stacked. Results do not depend on the storage, and
            ``load_state_dict`` accepts either layout.

    Members are kept as parameters with a leading member axis (or one per member, see ``storage``),
    and buffers with a leading member axis, so BatchNorm running statistics are per member and
    optimisers, weight averaging and checkpoints see every member. Each member sees the whole batch.
    Dropout masks differ between members (``randomness="different"``).

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

    # Set in __init__; the first three outside the module tree (`set_unregistered`).
    _template: nn.Module
    _grad_buffers: GradBuffers
    _scratch: Scratch
    params: nn.Module
    buffers_: nn.Module

    def __init__(
        self,
        backbone: nn.Module | str,
        num_members: int = 4,
        init: Literal["reinit", "copy"] = "reinit",
        execution: Literal["auto", "vmap", "loop"] = "auto",
        backbone_kwargs: dict[str, Any] | None = None,
        storage: Literal["auto", "stacked", "per_member"] = "auto",
    ) -> None:
        super().__init__(num_members)
        check_choice("init", init, ("reinit", "copy"))
        check_choice("execution", execution, ("auto", "vmap", "loop"))
        check_choice("storage", storage, ("auto", "stacked", "per_member"))
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
        self.requested_storage = storage
        self.storage = _auto_storage(params) if storage == "auto" else storage
        self.params = nn.Module()
        self.buffers_ = nn.Module()
        self._param_names = list(params)
        self._buffer_names = list(buffers)
        self._register_params({n: v.detach().clone() for n, v in params.items()})
        persistent = set(members[0].state_dict())  # non-persistent buffers are not in the state dict
        for name, value in buffers.items():
            self.buffers_.register_buffer(name.replace(".", _SEP), value.clone(), persistent=name in persistent)
        # The template holds no data (meta device); it only supplies the computation (`_call_member`).
        # Kept out of the module tree so its (empty) tensors are not parameters of the ensemble.
        set_unregistered(self, "_template", copy.deepcopy(members[0]).to("meta"))
        self._vmap_failed: str | None = None
        set_unregistered(self, "_grad_buffers", GradBuffers())
        set_unregistered(self, "_scratch", Scratch())

    def _register_params(self, stacked: dict[str, Tensor], requires_grad: dict[str, bool] | None = None) -> None:
        """Register ``{name: (M, ...)}`` as this ensemble's parameters, in its ``storage`` layout."""
        for name, value in stacked.items():
            grad = True if requires_grad is None else requires_grad[name]
            if self.storage == "stacked":
                self.params.register_parameter(name.replace(".", _SEP), nn.Parameter(value, requires_grad=grad))
            else:
                per_member = nn.ParameterList([nn.Parameter(v.clone(), requires_grad=grad) for v in value.unbind(0)])
                self.params.register_module(name.replace(".", _SEP), per_member)

    def _set_storage(self, storage: str) -> None:
        """Keep the same values in ``storage``. Creates new parameter objects: only before an optimiser holds them."""
        if storage == self.storage:
            return
        containers = self._stacked_params() or [ps[0] for ps in self._per_member_params()]
        grad = {n: bool(p.requires_grad) for n, p in zip(self._param_names, containers)}
        stacked = {n: p.detach().clone() for n, p in self.stacked_parameters().items()}
        self.storage = storage
        self.params = nn.Module()
        self._register_params(stacked, grad)
        self._grad_buffers.clear()
        self._scratch.clear()

    def with_members(
        self, params: dict[str, Tensor], buffers: dict[str, Tensor], storage: str | None = None
    ) -> DeepEnsemble:
        """A copy of this ensemble holding the given stacked tensors ``(M', ...)`` (any member count M').

        ``params``/``buffers`` are keyed like :meth:`stacked_parameters`/:meth:`stacked_buffers`;
        ``storage`` defaults to this ensemble's. Used to slice and gather members across processes.
        """
        own = self._modules["params"], self._modules["buffers_"]
        self._modules["params"], self._modules["buffers_"] = nn.Module(), nn.Module()
        try:  # copy everything but the tensors, which are replaced
            out = copy.deepcopy(self)
        finally:
            self._modules["params"], self._modules["buffers_"] = own
        out.storage = storage or self.storage
        out.num_members = int(next(iter(params.values())).shape[0])
        out._register_params(
            {n: params[n].detach().contiguous() for n in self._param_names},
            {n: params[n].requires_grad for n in self._param_names},
        )
        persistent = set(self.buffers_.state_dict())
        for n in self._buffer_names:
            key = n.replace(".", _SEP)
            out.buffers_.register_buffer(key, buffers[n].detach().contiguous(), persistent=key in persistent)
        return out

    # ------------------------------------------------------------------ state access
    def stacked_parameters(self) -> dict[str, Tensor]:
        """Parameters of all members, ``{backbone_name: tensor (M, ...)}``.

        With ``storage="per_member"`` these are ``torch.stack`` of the member tensors: differentiable
        copies (write through :meth:`load_member` or ``load_state_dict``, not into them).
        """
        if self.storage == "stacked":
            return {n: getattr(self.params, n.replace(".", _SEP)) for n in self._param_names}
        return {n: torch.stack(list(getattr(self.params, n.replace(".", _SEP)))) for n in self._param_names}

    def stacked_state_dict(self, state: dict[str, Tensor] | None = None, prefix: str = "") -> dict[str, Tensor]:
        """``state`` (default: this ensemble's ``state_dict()``) in the ``"stacked"`` layout.

        Per-member parameter keys ``{prefix}params.<name>.<i>`` become one stacked ``{prefix}params.<name>``;
        other keys pass through unchanged.
        """
        return stack_member_keys(self.state_dict() if state is None else state, prefix)

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
        if device.type != "cpu":
            return "vmap"
        if self.storage == "per_member":  # vmap would copy every member's tensors into stacked ones per call
            return "loop"
        if grad or self.training:
            return "vmap"
        if self._convolutional:
            return "loop"
        if torch.is_autocast_enabled(device.type):
            # Under autocast vmap's decompositions keep bias adds and norms in float32 while the loop
            # follows autocast (bfloat16 out): results would depend on which one a timing picked.
            return "vmap"
        return self.__dict__.get("_measured_inference", "measure")

    def compiled_execution(self, device: torch.device, grad: bool | None = None) -> str:
        """What ``forward`` traces under ``torch.compile`` on ``device``: ``"vmap"`` or ``"unrolled"``.

        ``grad`` is whether autograd records the call (default: ``torch.is_grad_enabled()``).
        ``"unrolled"`` is every member called one after another on views of the stored tensors, all in
        one graph. It is taken for ``execution="loop"``, per-member storage, a backbone vmap cannot run,
        and, for ``execution="auto"`` on CPU, when autograd records the call or the backbone is
        convolutional (batched convolutions are slower there). Why not vmap for training on CPU: its
        batched matmuls reach each activation through a broadcasting view, so AOTAutograd's partitioner
        saves ReLU's backward mask as a bool tensor instead of reusing the saved activation, and
        inductor's CPU kernels write bool tensors element by element (about 20x slower than eager at
        2**18 elements): a compiled ``DeepEnsemble(mlp, 8)`` training step took 1.4-1.9x its eager time
        with vmap, 0.8-1.0x unrolled (``benchmarks/compile.py``, 1 thread). On accelerators vmap is kept.
        """
        if self.storage != "stacked" or self._vmap_failed is not None or self.execution == "loop":
            return "unrolled"
        if self.execution == "vmap" or device.type != "cpu":
            return "vmap"
        grad = torch.is_grad_enabled() if grad is None else grad
        return "unrolled" if grad or self._convolutional else "vmap"

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
        choice = min(best, key=lambda name: best[name])
        set_unregistered(self, "_measured_inference", choice)
        return choice

    def _slots(self) -> list[tuple[dict, str, int, Tensor]]:
        cached = self.__dict__.get("_slot_cache")
        if cached is None or cached[0] is not self._template:
            cached = (self._template, _slot_table(self._template, self._param_names + self._buffer_names))
            set_unregistered(self, "_slot_cache", cached)
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

    # Registration order is stacking order (replacing an entry keeps its place in the dict).
    def _stacked_params(self) -> list[Tensor]:
        """The stacked ``(M, ...)`` parameters (``storage="stacked"``; empty for per-member storage)."""
        return cast(list[Tensor], list(self.params._parameters.values()))

    def _per_member_params(self) -> list[nn.ParameterList]:
        """One ``ParameterList`` of M tensors per parameter (``storage="per_member"``; else empty)."""
        return cast(list[nn.ParameterList], list(self.params._modules.values()))

    def _stacked_buffers(self) -> list[Tensor]:
        return cast(list[Tensor], list(self.buffers_._buffers.values()))

    def _stacked_lists(self) -> tuple[list[Tensor], list[Tensor]]:
        # Registration order is stacking order (replacing an entry keeps its place in the dict).
        if self.storage == "stacked":
            return self._stacked_params(), self._stacked_buffers()
        params = [torch.stack(list(per_member)) for per_member in self._per_member_params()]
        return params, self._stacked_buffers()

    def _member_param_lists(self) -> list[list[Tensor]]:
        """``result[i]`` is member ``i``'s own parameters (``storage="per_member"``), in stacking order."""
        per_tensor = [list(per_member) for per_member in self._per_member_params()]
        return [list(ps) for ps in zip(*per_tensor)]

    def _own_tensors(self) -> list[Tensor]:
        """Every tensor the ensemble stores: stacked or per-member parameters, then stacked buffers."""
        if self.storage == "stacked":
            params = self._stacked_params()
        else:
            params = [p for per_member in self._per_member_params() for p in per_member]
        return params + self._stacked_buffers()

    def _member_tensors(self, i: int) -> list[Tensor]:
        """Member ``i``'s parameters then buffers (views of the stacked storage, or its own tensors)."""
        if self.storage == "stacked":
            params = [p[i] for p in self._stacked_params()]
        else:
            params = [per_member[i] for per_member in self._per_member_params()]
        return params + [b[i] for b in self._stacked_buffers()]

    @torch.no_grad()
    def _inference_members(self) -> list[nn.Module]:
        """Member modules (eval mode) on the ensemble's own tensors (views for stacked storage), for inference.

        Built once and kept while the storage stays in place (optimiser steps and ``load_state_dict``
        write into it, so the modules see them); moving or re-creating a tensor rebuilds them.
        """
        key = (*(t.data_ptr() for t in self._own_tensors()), id(self._template))
        cached = self._scratch.get("inference_members")
        if cached is None or cached[0] != key:
            names = self._param_names + self._buffer_names
            modules = []
            for i in range(self.num_members):
                module = copy.deepcopy(self._template)
                tensors = self._member_tensors(i)
                for store, name, j, _ in _slot_table(module, names):
                    store[name] = tensors[j]
                modules.append(module.eval())
            cached = self._scratch["inference_members"] = (key, modules)
        return cached[1]

    def _forward_loop(self, x: Tensor) -> Tensor:
        buffers = self._stacked_buffers()
        if self.storage == "stacked":
            params = self._stacked_params()
            recorded = torch.is_grad_enabled() and any(p.requires_grad for p in params)
            member_params: list[Sequence[Tensor]] = []
            if recorded:
                member_params = list(member_views(params, self._grad_buffers))
        else:  # every member has its own parameters: run them as they are, like separate models
            member_params = list(self._member_param_lists())
            recorded = torch.is_grad_enabled() and any(p.requires_grad for p in member_params[0])
        if not recorded and not self.training:
            return torch.stack([m(x) for m in self._inference_members()])
        if not recorded:  # train mode without autograd (e.g. update_bn): the template, with its current settings
            member_params = [self._member_tensors(i)[: len(self._param_names)] for i in range(self.num_members)]
        buffer_views = list(zip(*(b.unbind(0) for b in buffers))) or [()] * self.num_members
        return torch.stack([self._call_member([*p, *b], x) for p, b in zip(member_params, buffer_views)])

    def _forward_unrolled(self, x: Tensor) -> Tensor:
        return torch.stack([self._call_member(self._member_tensors(i), x) for i in range(self.num_members)])

    def _forward_vmap(self, x: Tensor) -> Tensor:
        def one_member(params: list[Tensor], buffers: list[Tensor], inputs: Tensor) -> Tensor:
            return self._call_member(params + buffers, inputs)

        params, buffers = self._stacked_lists()
        return vmap(one_member, in_dims=(0, 0, None), randomness="different")(params, buffers, x)

    def train(self, mode: bool = True) -> DeepEnsemble:
        if not mode:  # the loop's gradient buffers are only needed while training
            self._grad_buffers.clear()
        cached = self._scratch.get("inference_members")
        if cached is not None:  # timm's eval caches (LeViT/EfficientViT attention biases) go stale across steps
            for module in cached[1]:
                clear_caches(module)
        return super().train(mode)

    def _apply(self, fn, recurse: bool = True):  # .to() / .half() / ...: drop views of the old storage
        self._grad_buffers.clear()
        self._scratch.clear()
        return super()._apply(fn, recurse)

    def forward(self, x: Tensor) -> Tensor:
        """Member outputs ``(M, B, ...)``; every member sees the whole batch ``x``."""
        if self._template.training != self.training:
            self._template.train(self.training)
        if torch.compiler.is_exporting():
            # torch.export: members one after another on views of the stored tensors. A plain graph
            # (no vmap operators, which ONNX cannot convert), and no timing or caches in the trace.
            return self._forward_unrolled(x)
        if torch.compiler.is_compiling():
            # Inside torch.compile: no one-off timing and no caches keyed on storage addresses (both
            # break the graph). See `compiled_execution` for which of vmap and the unrolled members.
            if self.compiled_execution(x.device) == "vmap":
                return self._forward_vmap(x)
            return self._forward_unrolled(x)
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
        tensors = self._member_tensors(index)
        for name, t in zip(self._param_names, tensors):
            _set_tensor(module, name, t.detach().clone(), parameter=True)
        for name, t in zip(self._buffer_names, tensors[len(self._param_names) :]):
            _set_tensor(module, name, t.detach().clone(), parameter=False)
        module.train(self.training)
        return module

    def load_member(self, index: int, module: nn.Module) -> None:
        """Copy the weights of ``module`` (same architecture as the backbone) into member ``index``."""
        index = self._check_index(index)
        params, buffers = dict(module.named_parameters()), dict(module.named_buffers())
        missing = [n for n in self._param_names if n not in params] + [
            n for n in self._buffer_names if n not in buffers
        ]
        if missing:
            raise ValueError(f"`module` does not match the backbone: missing tensors {missing[:5]}.")
        with torch.no_grad():
            for n, t in zip(self._param_names + self._buffer_names, self._member_tensors(index)):
                t.copy_(params[n] if n in params else buffers[n])

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # noqa: ANN001
        _to_own_layout(self, state_dict, prefix)  # runs before the parameter containers load
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return (
            f"num_members={self.num_members}, backbone={type(self._template).__name__}, init={self.init!r}, "
            f"execution={self.execution!r}, storage={self.storage!r}"
        )


def adopt_checkpoint_storage(module: nn.Module, state_dict: dict[str, Tensor]) -> list[str]:
    """Give every ``storage="auto"`` DeepEnsemble in ``module`` the storage its tensors have in ``state_dict``.

    A checkpoint written on a CPU-only machine (per-member storage for a large backbone) resumed on a
    GPU machine (stacked) would otherwise not match its optimiser and weight-averaging states, which
    follow the parameter layout. Re-creates parameters, so call it before any optimiser is built:
    the LightningModules and the ``Ensembling`` callback call it from ``on_load_checkpoint``, which
    Lightning runs before ``configure_optimizers``. An explicit ``storage`` is kept (the weights
    still load; a resumed optimiser state then needs the same layout). Returns the converted paths.
    """
    changed = []
    for path, ens in module.named_modules():
        if not isinstance(ens, DeepEnsemble) or ens.requested_storage != "auto":
            continue
        key = f"{path}.params." if path else "params."
        key += ens._param_names[0].replace(".", _SEP)
        saved = "stacked" if key in state_dict else "per_member" if f"{key}.0" in state_dict else None
        if saved is not None and saved != ens.storage:
            ens._set_storage(saved)
            changed.append(path)
    return changed


def stack_member_keys(state: dict[str, Tensor], prefix: str = "") -> dict[str, Tensor]:
    """A copy of ``state`` with a DeepEnsemble's per-member keys ``{prefix}params.<name>.<i>`` stacked."""
    head = f"{prefix}params."
    out: dict[str, Tensor] = {}
    groups: dict[str, dict[int, Tensor]] = {}
    for key, value in state.items():
        name, _, index = key[len(head) :].rpartition(".")
        if key.startswith(head) and name and "." not in name and index.isdigit():
            groups.setdefault(head + name, {})[int(index)] = value
            out.setdefault(head + name, cast(Tensor, None))  # keep the key order (filled in below)
        else:
            out[key] = value
    for key, members in groups.items():
        if sorted(members) != list(range(len(members))):
            raise ValueError(f"state dict holds members {sorted(members)} of {key!r}; expected 0..{len(members) - 1}.")
        out[key] = torch.stack([members[i] for i in range(len(members))])
    return out


def _to_own_layout(ens: DeepEnsemble, state: dict, prefix: str) -> None:
    """Convert ``ens``'s parameter keys in ``state`` (in place) to its storage, so either layout loads."""
    for name in ens._param_names:
        key = f"{prefix}params.{name.replace('.', _SEP)}"
        per_member = [f"{key}.{i}" for i in range(ens.num_members)]
        if ens.storage == "per_member" and key in state:
            if state[key].dim() and state[key].shape[0] == ens.num_members:  # else load_state_dict reports it
                for k, t in zip(per_member, state.pop(key).unbind(0)):
                    state[k] = t
        elif ens.storage == "stacked" and key not in state and all(k in state for k in per_member):
            # only this ensemble's own keys (M of them): anything else is reported by load_state_dict
            state[key] = torch.stack([state.pop(k) for k in per_member])
