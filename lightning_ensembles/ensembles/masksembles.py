"""Masksembles (Durasov et al., CVPR 2021): fixed binary channel masks, one per member, in any backbone.

Each member owns a fixed binary mask over the channels of chosen layers; member ``i`` is the backbone
with channels outside mask ``i`` switched off (no rescaling, as in the paper's code). The overlap of
the masks is set by ``scale``: ``1`` gives identical all-ones masks (one model), larger values masks that
overlap less (towards a deep ensemble of thinner networks). Masks are generated as in the paper
(nikitadurasov/masksembles): each of the M masks has ``m`` ones among ``int(m * s)`` positions, unused
positions are dropped, and ``m`` and ``s`` are searched so that exactly ``C`` channels remain
(``m = int(C / (s * (1 - (1 - 1/s) ** M)))``, ``s`` bisected within ``[0.8, 1.2] x scale``).

The members run as one batched pass: the batch is repeated member-major ``(M * B, ...)`` and every
mask layer multiplies rows of member ``i`` by mask ``i``. Masks are buffers (in the checkpoint).
All weights are shared, including BatchNorm statistics (as in the paper's code).
"""

from __future__ import annotations

import copy
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from .._checks import check_choice
from ._member_major import member_major_targets, run_member_major
from ._members_check import verify_shared_members
from .base import Ensemble
from .registry import register_method
from .surgery import ConversionError, match_paths, replace_modules
from .verify import VerificationReport

__all__ = ["Masksembles", "MaskedOutput", "generate_masks"]

_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _masks_once(ones: int, num: int, scale: float, gen: torch.Generator) -> Tensor:
    total = int(ones * scale)
    masks = torch.zeros(num, total)
    for row in masks:
        row[torch.randperm(total, generator=gen)[:ones]] = 1.0
    return masks[:, masks.any(0)]  # drop positions no mask uses


def generate_masks(
    channels: int, num_masks: int, scale: float, generator: torch.Generator | None = None, max_tries: int = 2000
) -> Tensor:
    """``(num_masks, channels)`` binary masks with the paper's size and overlap for ``scale``.

    Raises ``ValueError`` where the paper's procedure does (fewer than 10 channels, ``scale`` above 6)
    or cannot reach exactly ``channels`` columns.

    Example:
        >>> masks = generate_masks(32, 4, 2.0, torch.Generator().manual_seed(0))
        >>> masks.shape, bool((masks.sum(0) > 0).all())
        (torch.Size([4, 32]), True)
        >>> generate_masks(16, 3, 1.0).sum().item()  # scale 1: every mask keeps every channel
        48.0
    """
    if channels < 10:
        raise ValueError(f"Masksembles needs at least 10 channels to draw distinct masks, got {channels}.")
    if not 1.0 <= scale <= 6.0:
        raise ValueError(f"`scale` must be in [1, 6] (the paper's range), got {scale}.")
    gen = generator or torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, ())))
    if scale == 1.0:
        return torch.ones(num_masks, channels)
    ones = int(channels / (scale * (1 - (1 - 1 / scale) ** num_masks)))
    lo, hi = 0.8 * scale, 1.2 * scale
    tries = 0
    while tries < max_tries:
        s = max((lo + hi) / 2, 1.0)
        expected = int(ones * s * (1 - (1 - 1 / s) ** num_masks))
        masks = _masks_once(ones, num_masks, s, gen)
        tries += 1
        while masks.shape[1] != expected and tries < max_tries:  # the paper redraws until the size is typical
            masks = _masks_once(ones, num_masks, s, gen)
            tries += 1
        if masks.shape[1] == channels:
            return masks
        if masks.shape[1] > channels:
            hi = s
        else:
            lo = s
    raise ValueError(
        f"could not draw {num_masks} masks over exactly {channels} channels at scale={scale}; "
        "try a slightly different scale."
    )


def _channels(module: nn.Module) -> tuple[int, int] | None:
    """``(channels, axis)`` of ``module``'s output, or ``None`` if it cannot be told from the module."""
    if isinstance(module, nn.Linear):
        return module.out_features, -1
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return module.out_channels, 1
    if isinstance(module, _BatchNorm):
        return module.num_features, 1
    if isinstance(module, nn.GroupNorm):
        return module.num_channels, 1
    if isinstance(module, nn.LayerNorm) and len(module.normalized_shape) == 1:
        return module.normalized_shape[0], -1
    return None


class MaskedOutput(nn.Module):
    """``module`` followed by per-member channel masks on member-major ``(M * B, ...)`` outputs.

    Example:
        >>> import torch
        >>> layer = MaskedOutput(nn.Linear(4, 12), torch.eye(3).repeat_interleave(4, dim=1), channel_dim=-1)
        >>> y = layer(torch.randn(3 * 2, 4)).view(3, 2, 12)
        >>> bool((y[0, :, 4:] == 0).all() and (y[1, :, :4] == 0).all())
        True

    Args:
        module: the layer whose output is masked.
        masks: ``(M, C)`` binary masks, one row per member (see :func:`generate_masks`).
        channel_dim: the channel axis of ``module``'s output for one member, ``-1`` or ``1``.
    """

    masks: Tensor  # registered buffer, (M, C)

    def __init__(self, module: nn.Module, masks: Tensor, channel_dim: int) -> None:
        super().__init__()
        self.module, self.channel_dim = module, channel_dim
        self.register_buffer("masks", masks.clone())

    def forward(self, *args, **kwargs) -> Tensor:
        y = self.module(*args, **kwargs)
        m, c = self.masks.shape
        if y.shape[0] % m:
            raise ValueError(
                f"Masksembles layer got {y.shape[0]} rows, not a multiple of num_members={m}; call "
                "the Masksembles ensemble (it repeats the batch per member), not its inner model."
            )
        ym = y.unflatten(0, (m, -1))
        axis = ym.dim() - 1 if self.channel_dim == -1 else self.channel_dim + 1
        shape = [1] * ym.dim()
        shape[0], shape[axis] = m, c
        return (ym * self.masks.to(ym.dtype).view(shape)).flatten(0, 1)


def _default_positions(model: nn.Module) -> list[str]:
    """After every hidden Linear/Conv, or after the norm layer that directly follows it (registration order)."""
    leaves = [
        (p, m) for p, m in model.named_modules() if isinstance(m, (*_LAYERS, _BatchNorm, nn.GroupNorm, nn.LayerNorm))
    ]
    layer_idx = [k for k, (_, m) in enumerate(leaves) if isinstance(m, _LAYERS)]
    out = []
    for k in layer_idx[:-1]:  # the output layer is never masked
        path, mod = leaves[k]
        nxt = leaves[k + 1] if k + 1 < len(leaves) else None
        if nxt is not None and not isinstance(nxt[1], _LAYERS) and _channels(nxt[1]) == _channels(mod):
            path = nxt[0]  # mask after the norm, so the norm does not undo it
        out.append(path)
    return out


@register_method("masksembles")
class Masksembles(Ensemble):
    """Masksembles of any backbone: fixed binary channel masks inserted after chosen layers.

    Args:
        backbone: any ``nn.Module`` (timm included); a copy is converted, its weights are kept.
        num_members: number of masks M.
        scale: overlap control ``s`` in [1, 6] (paper: 1 = one model, larger = less overlap); the paper's
            experiments use about 2.
        after: module-path patterns (``fnmatch``) after which masks go. Each must be a ``Linear``,
            ``Conv``, ``BatchNorm``, ``GroupNorm`` or ``LayerNorm`` (whose channel count is known).
            Default: after every Linear/Conv but the last, or after the norm layer that follows it.
        batch_mode: ``"repeat"``: every member sees the whole batch (``forward`` gives ``(M, B, ...)``);
            ``"split"`` (the paper's training): in training member ``i`` sees the ``i``-th of M chunks
            (``(M, B // M, ...)``, use :meth:`member_targets`). Evaluation always repeats.
        seed: seed of the mask generator (``None``: drawn from torch's global generator).
        verify: after conversion, run the ensemble and every ``member(i)`` on a probe batch (``example_input``,
            else ``randn(2, *input_shape)``, else inferred); ``verification`` holds the report.
        backbone_kwargs: arguments building ``backbone`` when it is a name (see ``build_backbone``).

    Example:
        >>> import torch
        >>> from lightning_ensembles.backbones import MLP
        >>> ens = Masksembles(MLP(4, 3, hidden=(32,)), num_members=4, scale=2.0, seed=0)
        >>> ens.converted
        ['net.1']
        >>> ens(torch.randn(5, 4)).shape
        torch.Size([4, 5, 3])
        >>> torch.allclose(ens.member(2)(torch.ones(1, 4)), ens(torch.ones(1, 4))[2])
        True
    """

    def __init__(
        self,
        backbone: nn.Module | str,
        num_members: int = 4,
        scale: float = 2.0,
        after: list[str] | None = None,
        batch_mode: Literal["repeat", "split"] = "repeat",
        seed: int | None = None,
        verify: bool = True,
        example_input: Tensor | None = None,
        input_shape: list[int] | None = None,
        backbone_kwargs: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(num_members)
        backbone = self.build_backbone(backbone, backbone_kwargs)
        check_choice("batch_mode", batch_mode, ("repeat", "split"))
        if not (isinstance(scale, (int, float)) and 1.0 <= scale <= 6.0):
            raise ValueError(f"`scale` must be a number in [1, 6], got {scale!r}.")
        self.scale, self.batch_mode = float(scale), batch_mode
        names = [p for p, _ in backbone.named_modules() if p]
        if after is None:
            targets = _default_positions(backbone)
            if not targets:
                raise ConversionError("", "no hidden Linear/Conv layer to mask; name layers with `after=[...]`.")
        else:
            targets = match_paths(names, after, "after")
        gen = torch.Generator().manual_seed(seed if seed is not None else int(torch.randint(0, 2**31 - 1, ())))

        def build(path: str, mod: nn.Module) -> nn.Module:
            spec = _channels(mod)
            if spec is None:
                raise ConversionError(
                    path,
                    f"cannot tell the channel count of a {type(mod).__name__}'s output; put "
                    "masks after a Linear, Conv, BatchNorm, GroupNorm or LayerNorm layer.",
                )
            try:
                masks = generate_masks(spec[0], num_members, self.scale, gen)
            except ValueError as err:
                raise ConversionError(path, f"{err} Leave this layer out of `after`.") from err
            return MaskedOutput(mod, masks.to(next(mod.parameters(), torch.empty(0)).device), spec[1])

        self.model = copy.deepcopy(backbone)
        self.converted = replace_modules(self.model, lambda p, mod: p in targets, build)
        self.train(backbone.training)
        self.verification = (
            verify_shared_members(self, backbone, example_input, input_shape, "Choose other layers with after=[...].")
            if verify
            else VerificationReport(ran=False)
        )

    _inner_prefix = "model."

    def forward(self, x: Tensor) -> Tensor:
        """Member outputs ``(M, B, ...)`` (``(M, B // M, ...)`` for ``batch_mode="split"`` in training)."""
        return run_member_major(self.model, x, self.num_members, self.training and self.batch_mode == "split")

    def member_targets(self, target: Tensor) -> Tensor:
        """Targets matching :meth:`forward`: repeated, or split in training with ``batch_mode="split"``."""
        return member_major_targets(target, self.num_members, self.training and self.batch_mode == "split")

    def masks(self) -> dict[str, Tensor]:
        """``{module path: (M, C) masks}`` of every mask layer."""
        return {p: m.masks for p, m in self.model.named_modules() if isinstance(m, MaskedOutput)}

    def member(self, index: int) -> nn.Module:
        """A copy of the backbone with only member ``index``'s masks: ``(B, ...) -> (B, ...)``."""
        index = self._check_index(index)
        model = copy.deepcopy(self.model)
        for mod in model.modules():
            if isinstance(mod, MaskedOutput):
                mod.masks = mod.masks[index : index + 1].clone()
        return model.train(self.training)

    def extra_repr(self) -> str:
        return f"num_members={self.num_members}, scale={self.scale}, batch_mode={self.batch_mode!r}, converted={self.converted}"
