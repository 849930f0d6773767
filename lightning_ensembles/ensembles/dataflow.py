"""Which layers read the model's input and which produce its output, from the data flow of a probe forward.

Converters need the layers at the two ends of a network: Packed-Ensembles makes the layers that read
the shared input dense and the layers that produce the output ``M * C_out`` wide; BatchEnsemble and
LoRA give the output layer per-member weights. Registration order is not data flow (a model may
register its head before its body, or feed its input to several layers), so :func:`trace_layers`
runs the model once on a probe with the input requiring gradients and reads the autograd graph:

* a layer is an **input layer** when the graph of its input reaches the model input without passing
  through the output of another layer (``Linear``/``Conv`` by default);
* a layer is an **output layer** when the graph of the model output reaches that layer's output
  without passing through another layer.

Forward hooks map each layer's output to its graph node; the model is run in evaluation mode and its
modes are restored.

Example:
    >>> import torch
    >>> from torch import nn
    >>> class HeadFirst(nn.Module):  # registers its output layer before its body
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.head = nn.Linear(8, 2)
    ...         self.body = nn.Linear(4, 8)
    ...     def forward(self, x):
    ...         return self.head(self.body(x).relu())
    >>> flow = trace_layers(HeadFirst(), torch.randn(2, 4))
    >>> flow.first, flow.last
    (['body'], ['head'])
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from torch import Tensor, nn
from torch.nn.modules.conv import _ConvNd

__all__ = ["LayerFlow", "trace_layers", "clear_caches"]


def clear_caches(model: nn.Module) -> None:
    """Drop timm's evaluation-mode caches of tensors computed from parameters (``attention_bias_cache`` of
    LeViT, EfficientViT, EfficientFormer): a probe run fills them with graph tensors that cannot be
    deep-copied and that go stale when the parameters change."""
    for m in model.modules():
        if isinstance(getattr(m, "attention_bias_cache", None), dict):
            cast(Any, m).attention_bias_cache = {}  # timm's own dict attribute


LAYERS = (nn.Linear, _ConvNd)


@dataclass
class LayerFlow:
    """Result of :func:`trace_layers` (layer paths in execution order)."""

    first: list[str] = field(default_factory=list)
    """Layers whose input comes from the model input through parameter-free operations only."""
    last: list[str] = field(default_factory=list)
    """Layers whose output reaches the model output without passing through another layer."""
    called: list[str] = field(default_factory=list)
    """Layers whose forward ran (a layer never called may have its weight read directly)."""
    mixed: list[str] = field(default_factory=list)
    """Layers whose input depends both on the model input directly and on another layer's output."""
    constant: list[str] = field(default_factory=list)
    """Layers whose input does not depend on the model input at all (computed from parameters or constants,
    such as a relative-position MLP); they do not see the batch."""
    input_reaches_output: bool = False
    """The output depends on the model input through a path without any layer (a global skip)."""
    output_shape: tuple[int, ...] | None = None


def _first_tensor(obj: Any) -> Tensor | None:
    if isinstance(obj, Tensor):
        return obj
    if isinstance(obj, (tuple, list)):
        for o in obj:
            t = _first_tensor(o)
            if t is not None:
                return t
    if isinstance(obj, dict):
        for o in obj.values():
            t = _first_tensor(o)
            if t is not None:
                return t
    return None


def _reach(start: Any, layer_nodes: dict[Any, str], raw: Any) -> tuple[bool, list[str]]:
    """Walk the graph back from ``start``; stop at layer outputs. Returns (reaches raw input, layers reached)."""
    seen, found, hit_raw = set(), [], False
    queue = deque([start] if start is not None else [])
    while queue:
        node = queue.popleft()
        if node is None or node in seen:
            continue
        seen.add(node)
        if node is raw:
            hit_raw = True
            continue
        if node in layer_nodes:
            if layer_nodes[node] not in found:
                found.append(layer_nodes[node])
            continue
        queue.extend(n for n, _ in node.next_functions)
    return hit_raw, found


def trace_layers(model: nn.Module, probe: Tensor, layer_types: tuple[type[nn.Module], ...] = LAYERS) -> LayerFlow:
    """Trace ``model(probe)`` and classify its ``layer_types`` layers by data flow (see the module docstring)."""
    modes = {m: m.training for m in model.modules()}
    layers = [(p, m) for p, m in model.named_modules() if isinstance(m, layer_types)]
    path_of = {id(m): p for p, m in layers}
    inputs: list[tuple[str, Tensor | None]] = []
    layer_nodes: dict[Any, str] = {}
    called: list[str] = []
    handles = []

    def pre(module: nn.Module, args: Any) -> None:
        path = path_of[id(module)]
        inputs.append((path, _first_tensor(args)))
        if path not in called:
            called.append(path)

    def post(module: nn.Module, args: Any, out: Any) -> None:
        t = _first_tensor(out)
        if t is not None and t.grad_fn is not None:
            layer_nodes.setdefault(t.grad_fn, path_of[id(module)])

    for _, m in layers:
        handles.append(m.register_forward_pre_hook(pre))
        handles.append(m.register_forward_hook(post))
    x = probe.detach().clone()
    if x.is_floating_point():
        x.requires_grad_(True)
    # Only the input requires gradients during the trace: a tensor has a graph iff it depends on the input.
    frozen = [p for p in model.parameters() if p.requires_grad]
    try:
        for p in frozen:
            p.requires_grad_(False)
        model.eval()
        with torch.enable_grad():
            raw = cast(Any, x.view_as(x).grad_fn).next_functions[0][0] if x.requires_grad else None
            out = model(x)
    finally:
        for p in frozen:
            p.requires_grad_(True)
        for h in handles:
            h.remove()
        for m, t in modes.items():
            m.training = t
        clear_caches(model)
    flow = LayerFlow(called=called)
    out_t = _first_tensor(out)
    if out_t is not None:
        flow.output_shape = tuple(out_t.shape)
    for path, inp in inputs:
        if inp is None or path in flow.first or path in flow.mixed:
            continue
        if x.requires_grad and not inp.requires_grad:
            if path not in flow.constant:
                flow.constant.append(path)
            continue
        found: list[str]
        if inp is x:
            hit_raw, found = True, []
        else:
            hit_raw, found = _reach(inp.grad_fn, layer_nodes, raw)
        if hit_raw:
            (flow.mixed if found else flow.first).append(path)
    if out_t is not None:
        if out_t.grad_fn in layer_nodes:
            flow.last = [layer_nodes[out_t.grad_fn]]
        else:
            hit_raw, flow.last = _reach(out_t.grad_fn, layer_nodes, raw)
            flow.input_reaches_output = hit_raw or out_t is x
    return flow
