"""Which tensors of a model are averaged, and which of them carry a member axis."""

from __future__ import annotations

from torch import Tensor, nn


def tracked_tensors(module: nn.Module, buffers: bool) -> dict[str, Tensor]:
    """Floating-point parameters (and floating persistent buffers if ``buffers``) by state-dict name.

    Integer buffers such as BatchNorm's ``num_batches_tracked`` are never averaged: an average of
    counters means nothing, so evaluation keeps the model's own.
    """
    out = {n: p for n, p in module.named_parameters() if p.is_floating_point()}
    if buffers:
        state_keys = set(module.state_dict(keep_vars=True))  # persistent buffers only
        out.update({n: b for n, b in module.named_buffers() if b.is_floating_point() and n in state_keys})
    return out


def member_groups(module: nn.Module) -> dict[str, str]:
    """Map each tensor name stored with a leading member axis to its ensemble's name (its group).

    A :class:`~lightning_ensembles.DeepEnsemble` stores member ``i`` at index ``i`` of every tensor,
    so elementwise averaging is already per member; SWAG's low-rank part additionally needs to know
    which tensors share a member axis so that each member draws its own low-rank noise.
    Tensors outside any such ensemble (a plain model, a PackedEnsemble) form one joint group ``""``.
    """
    from ..ensembles.deep import DeepEnsemble

    groups: dict[str, str] = {}
    for prefix, sub in module.named_modules():
        if isinstance(sub, DeepEnsemble):
            dot = f"{prefix}." if prefix else ""
            for n, _ in sub.named_parameters():
                groups[dot + n] = prefix or "<root>"
            for n, _ in sub.named_buffers():
                groups[dot + n] = prefix or "<root>"
    return groups


