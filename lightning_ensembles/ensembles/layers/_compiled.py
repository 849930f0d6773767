"""Batched matmuls of the ensemble layers as opaque custom ops, for ``torch.compile`` on CPU.

A layer that reshapes its input before a batched matmul (grouped, member-major) makes a preceding ReLU's
output reach the matmul through views only. AOTAutograd's partitioner counts such an output as not
materialised and saves ReLU's backward mask as a bool tensor instead of the activation, and inductor's
CPU kernels write bool tensors element by element: a compiled ``PackedEnsemble(mlp, 4)`` training step
took 1.4-1.9x its eager time, LoRA 1.4x (with GELU, which saves no mask, both gained like the single model).
Behind a custom op the matmul takes the activation itself, which is then saved and the mask recomputed
in the backward. The ops run the same eager code, so results do not change.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["grouped_matmul", "member_linear", "use_custom_ops"]


def use_custom_ops(x: Tensor) -> bool:
    """True while ``torch.compile`` traces a CPU call that autograd records.

    Not for ``torch.export`` (its graphs stay plain ATen) nor for inference (no masks are saved there,
    and inductor fuses the plain ops better).
    """
    return (
        x.device.type == "cpu"
        and torch.is_grad_enabled()
        and torch.compiler.is_compiling()
        and not torch.compiler.is_exporting()
    )


def _grouped_matmul(x: Tensor, weight: Tensor) -> Tensor:
    groups, out_g, in_g = weight.shape
    xg = x.reshape(-1, groups, in_g).transpose(0, 1)  # (G, N, in_g)
    return torch.bmm(xg, weight.transpose(1, 2)).transpose(0, 1).reshape(*x.shape[:-1], groups * out_g)


@torch.library.custom_op("lightning_ensembles::grouped_matmul", mutates_args=())
def _grouped_matmul_op(x: Tensor, weight: Tensor) -> Tensor:
    return _grouped_matmul(x, weight)


@_grouped_matmul_op.register_fake
def _(x: Tensor, weight: Tensor) -> Tensor:
    return x.new_empty((*x.shape[:-1], weight.shape[0] * weight.shape[1]))


def _setup_context(ctx, inputs, output) -> None:  # noqa: ANN001
    ctx.save_for_backward(*inputs)


def _backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None]:  # noqa: ANN001
    x, weight = ctx.saved_tensors
    groups, out_g, in_g = weight.shape
    gg = grad.reshape(-1, groups, out_g).transpose(0, 1)  # (G, N, out_g)
    grad_x = torch.bmm(gg, weight).transpose(0, 1).reshape(x.shape) if ctx.needs_input_grad[0] else None
    grad_w = None
    if ctx.needs_input_grad[1]:
        grad_w = torch.bmm(gg.transpose(1, 2), x.reshape(-1, groups, in_g).transpose(0, 1))
    return grad_x, grad_w


_grouped_matmul_op.register_autograd(_backward, setup_context=_setup_context)


def grouped_matmul(x: Tensor, weight: Tensor) -> Tensor:
    """``x (..., G * in_g)`` through each block ``weight[g] (out_g, in_g)``: ``(..., G * out_g)``, no bias."""
    return _grouped_matmul_op(x, weight) if use_custom_ops(x) else _grouped_matmul(x, weight)


def _member_linear(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    members, out_features, in_features = weight.shape
    xm = x.reshape(members, -1, in_features)  # member i owns rows [i * N, (i + 1) * N)
    if bias is None:
        out = torch.bmm(xm, weight.transpose(1, 2))
    else:
        out = torch.baddbmm(bias.unsqueeze(1), xm, weight.transpose(1, 2))
    return out.reshape(*x.shape[:-1], out_features)


@torch.library.custom_op("lightning_ensembles::member_linear", mutates_args=())
def _member_linear_op(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    return _member_linear(x, weight, bias)  # a new tensor (bmm's output), never a view of an input


@_member_linear_op.register_fake
def _(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    return x.new_empty((*x.shape[:-1], weight.shape[1]))


def _member_setup_context(ctx, inputs, output) -> None:  # noqa: ANN001
    x, weight, _ = inputs
    ctx.save_for_backward(x, weight)


def _member_backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor | None]:  # noqa: ANN001
    x, weight = ctx.saved_tensors
    members, out_features, in_features = weight.shape
    gm = grad.reshape(members, -1, out_features)  # (M, N, out)
    grad_x = torch.bmm(gm, weight).reshape(x.shape) if ctx.needs_input_grad[0] else None
    grad_w = torch.bmm(gm.transpose(1, 2), x.reshape(members, -1, in_features)) if ctx.needs_input_grad[1] else None
    grad_b = gm.sum(1) if ctx.needs_input_grad[2] else None
    return grad_x, grad_w, grad_b


_member_linear_op.register_autograd(_member_backward, setup_context=_member_setup_context)


def member_linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """Member ``i``'s ``Linear`` (``weight[i] (out, in)``, ``bias[i]``) on its block of member-major rows of ``x``.

    ``x (M * N, ..., in) -> (M * N, ..., out)``.
    """
    return _member_linear_op(x, weight, bias) if use_custom_ops(x) else _member_linear(x, weight, bias)
