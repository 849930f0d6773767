"""Deep ensembles of any backbone, with members stored as stacked tensors and run in one call."""

from __future__ import annotations

import copy
import time
import warnings
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.func import vmap

from ..backbones import resolve_backbone
from .base import Ensemble
from .registry import register_method
from .reinit import reinitialize

__all__ = ["DeepEnsemble"]

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


def _slot_table(module: nn.Module, names: list[str]) -> list[tuple[dict, str, int, Tensor]]:
    """Where each of ``names`` (parameters, then buffers) lives in ``module``, tied copies included.

    Entries are ``(owner's _parameters or _buffers dict, key, index into names, module's own tensor)``.
    """
    index = {n: i for i, n in enumerate(names)}
    canonical = {id(t): n for n, t in [*module.named_parameters(), *module.named_buffers()]}
    slots = []
    for store, items in (
        ("_parameters", module.named_parameters(remove_duplicate=False)),
        ("_buffers", module.named_buffers(remove_duplicate=False)),
    ):
        for path, tensor in items:
            *owner_path, leaf = path.split(".")
            owner = module.get_submodule(".".join(owner_path))
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
        execution: ``"vmap"`` (``torch.func.vmap`` over the backbone with the members' tensors stacked),
            ``"loop"`` (a Python loop over the member modules), or ``"auto"``: vmap on accelerators;
            on CPU the loop for convolutional backbones (batched convolutions are slower there,
            ``benchmarks/deep_ensemble.py``), vmap for training other backbones, and for their
            inference (eval mode, no grad) whichever of the two a one-off timing on the first batch
            finds faster (vmap's fixed per-call cost outweighs its gain for small models and few
            members). If vmap cannot run the backbone, the ensemble falls back to the loop and warns
            once with the reason.
        backbone_kwargs: keyword arguments when ``backbone`` is a name (e.g. ``{"num_classes": 10}``).

    Each member is a full copy of the backbone in ``members`` (state-dict keys ``members.<i>.<path>``),
    so BatchNorm running statistics are per member and optimisers, weight averaging and checkpoints
    see every member. ``vmap`` stacks the members' parameters and buffers along a leading member axis
    for each call (``torch.stack``: differentiable, so every member gets its gradient; buffers that train
    mode updates in place, such as BatchNorm statistics, are written back); :meth:`stacked_parameters` gives that
    view. Why members are not *stored* stacked: an optimiser then works on ``(M, ...)`` tensors, whose
    temporaries (Adam's, autograd's) exceed glibc's mmap threshold for a large backbone and are mapped
    and unmapped at every step; on 2 CPU cores that made ResNet-18 x 8 training 20% slower than a plain
    member loop (``benchmarks/deep_ensemble.py``). Each member sees the whole batch. Dropout masks
    differ between members (``randomness="different"``).

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
        self.members = nn.ModuleList(members)
        self._param_names = [n for n, _ in members[0].named_parameters()]
        self._buffer_names = [n for n, _ in members[0].named_buffers()]
        self._vmap_failed: str | None = None

    # ------------------------------------------------------------------ state access
    def _member_tensors(self) -> tuple[list[list[Tensor]], list[list[Tensor]]]:
        """``(params, buffers)``: ``params[j][i]`` is member ``i``'s ``j``-th parameter (same for buffers)."""
        params = [list(t) for t in zip(*(m.parameters() for m in self.members))]
        buffers = [list(t) for t in zip(*(m.buffers() for m in self.members))]
        return params, buffers

    def stacked_parameters(self) -> dict[str, Tensor]:
        """Parameters of all members stacked along a new member axis, ``{backbone_name: (M, ...)}``.

        A differentiable ``torch.stack`` (gradients reach every member: weight-space losses use it),
        so writing into the result does not change the members.
        """
        params, _ = self._member_tensors()
        return {n: torch.stack(ts) for n, ts in zip(self._param_names, params)}

    def stacked_buffers(self) -> dict[str, Tensor]:
        """Buffers of all members stacked along a new member axis (a copy), ``{backbone_name: (M, ...)}``."""
        _, buffers = self._member_tensors()
        return {n: torch.stack(ts) for n, ts in zip(self._buffer_names, buffers)}

    @torch.no_grad()
    def load_stacked(self, params: dict[str, Tensor], buffers: dict[str, Tensor] | None = None) -> None:
        """Copy stacked tensors ``{backbone_name: (M, ...)}`` (as from :meth:`stacked_parameters`) into the members."""
        own_params, own_buffers = self._member_tensors()
        for names, own, given in ((self._param_names, own_params, params), (self._buffer_names, own_buffers, buffers or {})):
            for n, ts in zip(names, own):
                if n in given:
                    if given[n].shape != (self.num_members, *ts[0].shape):
                        raise ValueError(
                            f"stacked tensor {n!r} has shape {tuple(given[n].shape)}; expected "
                            f"{(self.num_members, *ts[0].shape)} (members first)."
                        )
                    torch._foreach_copy_(ts, list(given[n].unbind(0)))

    @property
    def template(self) -> nn.Module:
        """Member 0: the module whose structure every member shares (``vmap`` runs it with stacked tensors)."""
        return self.members[0]

    # ------------------------------------------------------------------ execution
    def resolved_execution(self, device: torch.device | None = None, grad: bool | None = None) -> str:
        """The execution ``forward`` uses on ``device``: ``"vmap"``, ``"loop"`` or (not decided yet) ``"measure"``.

        ``grad`` is whether autograd records the call (default: ``torch.is_grad_enabled()``).
        """
        if self._vmap_failed is not None or self.execution == "loop":
            return "loop"
        if self.execution == "vmap":
            return "vmap"
        device = device or next(self.parameters()).device
        if device.type != "cpu":
            return "vmap"
        if self._convolutional:
            return "loop"
        grad = torch.is_grad_enabled() if grad is None else grad
        if grad or self.training:
            return "vmap"
        return self.__dict__.get("_measured_inference", "measure")

    @torch.no_grad()
    def _measure_inference(self, x: Tensor) -> str:
        """Time both executions on ``x`` once (eval mode, no grad: no side effects) and keep the faster."""
        times = {}
        for name, run in (("loop", self._forward_loop), ("vmap", self._forward_vmap)):
            try:
                run(x)  # warm-up
                samples = []
                for _ in range(3):
                    t0 = time.perf_counter()
                    run(x)
                    samples.append(time.perf_counter() - t0)
                times[name] = min(samples)
            except Exception:  # noqa: BLE001 - vmap cannot run this backbone: the loop it is
                if name == "loop":
                    raise
        choice = min(times, key=times.get)
        self.__dict__["_measured_inference"] = choice
        return choice

    def _slots(self) -> list[tuple[dict, str, int, Tensor]]:
        cached = self.__dict__.get("_slot_cache")
        template = self.members[0]
        if cached is None or cached[0] is not template or any(own is not store.get(key) for store, key, _, own in cached[1]):
            cached = (template, _slot_table(template, self._param_names + self._buffer_names))
            self.__dict__["_slot_cache"] = cached
        return cached[1]

    def _call_with(self, tensors: list[Tensor], x: Tensor) -> Tensor:
        """Run member 0's module with ``tensors`` (parameters then buffers, in ``named_*`` order) as its state.

        What ``torch.func.functional_call`` does (tied tensors included) without its per-call bookkeeping,
        which costs a sub-millisecond backbone more than its own compute: the tensors are put into the
        module's ``_parameters``/``_buffers`` dicts and its own put back afterwards.
        """
        slots = self._slots()
        for store, key, i, _ in slots:
            store[key] = tensors[i]
        try:
            return self.members[0](x)
        finally:
            for store, key, _, own in slots:
                store[key] = own

    def _forward_loop(self, x: Tensor) -> Tensor:
        return torch.stack([m(x) for m in self.members])

    def _forward_vmap(self, x: Tensor) -> Tensor:
        params, buffers = self._member_tensors()
        stacked_params = [torch.stack(ts) for ts in params]
        stacked_buffers = [torch.stack(ts) for ts in buffers]

        def one_member(p: list[Tensor], b: list[Tensor], inputs: Tensor) -> Tensor:
            return self._call_with(p + b, inputs)

        out = vmap(one_member, in_dims=(0, 0, None), randomness="different")(stacked_params, stacked_buffers, x)
        if self.training and buffers:  # write back what train mode updates in place (BatchNorm statistics)
            with torch.no_grad():
                for stacked, own in zip(stacked_buffers, buffers):
                    torch._foreach_copy_(own, list(stacked.unbind(0)))
        return out

    def forward(self, x: Tensor) -> Tensor:
        """Member outputs ``(M, B, ...)``; every member sees the whole batch ``x``."""
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
        return copy.deepcopy(self.members[index])

    def load_member(self, index: int, module: nn.Module) -> None:
        """Copy the weights of ``module`` (same architecture as the backbone) into member ``index``."""
        index = self._check_index(index)
        params, buffers = dict(module.named_parameters()), dict(module.named_buffers())
        missing = [n for n in self._param_names if n not in params] + [n for n in self._buffer_names if n not in buffers]
        if missing:
            raise ValueError(f"`module` does not match the backbone: missing tensors {missing[:5]}.")
        target = self.members[index]
        with torch.no_grad():
            for n, p in target.named_parameters():
                p.copy_(params[n])
            for n, b in target.named_buffers():
                b.copy_(buffers[n])

    def extra_repr(self) -> str:
        return f"num_members={self.num_members}, init={self.init!r}, execution={self.execution!r}"
