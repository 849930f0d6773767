"""Which tensors of a model are averaged, and which of them carry a member axis."""

from __future__ import annotations

from torch import Tensor, nn


def tracked_tensors(module: nn.Module, buffers: bool) -> dict[str, Tensor]:
    """Floating-point parameters (and floating persistent buffers if ``buffers``) by state-dict name.

    Integer buffers such as BatchNorm's ``num_batches_tracked`` are never averaged: an average of
    counters means nothing, so evaluation keeps the model's own.
    """
    out: dict[str, Tensor] = {n: p for n, p in module.named_parameters() if p.is_floating_point()}
    if buffers:
        state_keys = set(module.state_dict(keep_vars=True))  # persistent buffers only
        out.update({n: b for n, b in module.named_buffers() if b.is_floating_point() and n in state_keys})
    return out


def member_groups(module: nn.Module) -> dict[str, tuple[str, bool]]:
    """Map each tensor name of a DeepEnsemble to ``(group, has_member_axis)``.

    A :class:`~lightning_ensembles.DeepEnsemble` stores member ``i`` at index ``i`` of every stacked
    tensor (``has_member_axis``), or, with ``storage="per_member"``, in a parameter of its own (group
    ``"<ensemble>[i]"``), so elementwise averaging is already per member; SWAG's low-rank part
    additionally needs to know which tensors belong to one member so that each member draws its own
    low-rank noise. Tensors outside any such ensemble (a plain model, a PackedEnsemble) are not listed:
    they form one joint group.
    """
    from ..ensembles.deep import DeepEnsemble

    groups: dict[str, tuple[str, bool]] = {}
    for prefix, sub in module.named_modules():
        if isinstance(sub, DeepEnsemble):
            dot, group = (f"{prefix}." if prefix else ""), prefix or "<root>"
            for n, _ in sub.named_parameters():
                if sub.storage == "per_member":  # params.<name>.<member>
                    groups[dot + n] = (f"{group}[{n.rpartition('.')[2]}]", False)
                else:
                    groups[dot + n] = (group, True)
            for n, _ in sub.named_buffers():
                groups[dot + n] = (group, True)
    return groups
