"""Per-member views of stacked parameters whose gradients go straight into one stacked buffer.

The member loop runs member ``i`` on ``p[i]`` of every stacked parameter ``p`` ``(M, ...)``. With
``p.unbind(0)`` autograd keeps every member's gradient until the end of the backward pass and then
stacks them into a freshly allocated ``(M, ...)`` tensor. For a large backbone on CPU that costs
twice: the stacked gradient exceeds glibc's mmap threshold (32 MB: one 512x512x3x3 ResNet-18 weight x 8
members is 75 MB), so it is mapped, faulted in and unmapped at every step, and the M member gradients
are all alive at once. Measured on 2 cores: ResNet-18 x 8 training 20% slower than torch-uncertainty's
loop over separate models.

Here each member's backward copies its gradients into its slice of one buffer per parameter as soon as
they are computed (freeing them for the next member), and the member that completes the buffer hands
autograd an alias of it, which ``AccumulateGrad`` adopts as ``.grad`` without copying. Gradients still
arrive through ``AccumulateGrad`` exactly once per backward, so DDP/FSDP hooks, gradient accumulation
and ``zero_grad`` behave as with any parameter. A buffer is reused only while nothing else references
it (after ``zero_grad(set_to_none=True)``); otherwise a new one is allocated, so results never depend on
the reuse.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["GradBuffers", "Scratch", "member_views"]

_use_count = getattr(torch._C, "_storage_Use_Count", None)


def _unshared(buf: Tensor) -> bool:
    """True when no tensor but ``buf`` references its storage."""
    if _use_count is None:  # private API gone: never reuse (always correct, only slower)
        return False
    # 2 = ``buf`` itself + the temporary storage object that ``untyped_storage()`` creates.
    return _use_count(buf.untyped_storage()._cdata) <= 2


class GradBuffers:
    """Stacked gradient buffers kept across steps, one per parameter (not part of any state dict)."""

    def __init__(self) -> None:
        self._bufs: dict[int, Tensor] = {}

    def clear(self) -> None:
        self._bufs.clear()

    def take(self, index: int, like: Tensor) -> Tensor:
        """A buffer shaped like ``like`` that nothing else references (reused when possible)."""
        buf = self._bufs.get(index)
        if (
            buf is None
            or buf.shape != like.shape
            or buf.dtype != like.dtype
            or buf.device != like.device
            or not _unshared(buf)
        ):
            buf = torch.empty_like(like, memory_format=torch.contiguous_format)
            self._bufs[index] = buf
        return buf

    # Copies (AveragedModel deep-copies the ensemble) and pickles (DDP spawn) start empty: a buffer is
    # scratch memory, and two models sharing one would overwrite each other's gradients.
    def __deepcopy__(self, memo: dict) -> GradBuffers:
        return GradBuffers()

    def __getstate__(self) -> dict:
        return {"_bufs": {}}


class _Step:
    """What the M member views of one forward share: the buffers and how many members are still due."""

    def __init__(self, buffers: GradBuffers, stacked: tuple[Tensor, ...], num_members: int) -> None:
        self.buffers = buffers
        self.stacked = stacked
        self.pending = num_members
        self.bufs: list[Tensor | None] | None = None


class _MemberView(torch.autograd.Function):
    @staticmethod
    def forward(ctx, step: _Step, index: int, *stacked: Tensor) -> tuple[Tensor, ...]:
        ctx.step, ctx.index = step, index
        ctx.set_materialize_grads(False)
        return tuple(p[index] for p in stacked)

    @staticmethod
    def backward(ctx, *grads: Tensor | None) -> tuple[Tensor | None, ...]:
        step, i = ctx.step, ctx.index
        if torch.is_grad_enabled():  # create_graph=True through the weights: plain differentiable path
            out = []
            for p, g in zip(step.stacked, grads):
                index = torch.tensor([i], device=p.device)
                out.append(None if g is None else torch.zeros_like(p).index_copy(0, index, g.unsqueeze(0)))
            return (None, None, *out)
        if step.bufs is None:  # first member of this backward: pick the buffers
            step.bufs = [
                step.buffers.take(j, p) if ctx.needs_input_grad[j + 2] else None for j, p in enumerate(step.stacked)
            ]
        for buf, g in zip(step.bufs, grads):
            if buf is not None:
                if g is None:
                    buf[i].zero_()
                else:
                    buf[i].copy_(g)
        step.pending -= 1
        if step.pending:
            return (None, None, *([None] * len(grads)))
        bufs, step.bufs = step.bufs, None
        step.pending = step.stacked[0].shape[0]  # ready for another backward through the same graph
        # A fresh alias per buffer: AccumulateGrad adopts it as .grad without copying.
        return (None, None, *(None if b is None else b.detach() for b in bufs))


def member_views(stacked: list[Tensor], buffers: GradBuffers) -> list[tuple[Tensor, ...]]:
    """``result[i][j]`` is member ``i``'s slice of ``stacked[j]`` for a call autograd records; gradients go through ``buffers``.

    Every member's views must feed the output that is differentiated (the ensemble stacks all member
    outputs, so any loss on it reaches every member); a member whose backward never runs would hold
    back the gradient of the others.
    """
    m = stacked[0].shape[0]
    step = _Step(buffers, tuple(stacked), m)
    return [_MemberView.apply(step, i, *stacked) for i in range(m)]


class Scratch(dict):
    """A dict of caches that copies and pickles as empty (scratch state must never be shared or saved)."""

    def __deepcopy__(self, memo: dict) -> Scratch:
        return Scratch()

    def __reduce__(self):
        return (Scratch, ())
