"""Test-time augmentation ensembles: members are augmentations of one model, or of every member of an ensemble.

``TTAEnsemble(model, transforms=[...])`` runs the model on A augmented copies of the batch in one
call and returns ``(A, B, ...)``. Around an :class:`~lightning_ensembles.Ensemble` of M members (built
here with ``inner_method=`` or passed in) it returns ``(M * A, B, ...)``, member ``m * A + a`` being
inner member ``m`` on augmentation ``a``: TTA composes with every other method.

Transforms are names (YAML-friendly) or any ``nn.Module``/callable mapping a batch to a batch of the
same shape: ``identity``, ``hflip`` (last axis: images and 1-D signals), ``vflip`` (axis -2),
``rot90`` / ``rot180`` / ``rot270`` (last two axes), ``rotate_<degrees>`` (bilinear, zero fill),
``crop_<k>_<c|tl|tr|bl|br>`` (the centre or a corner crop, ``2k`` pixels smaller, resized back: the
five-crop TTA),
``shift_<d>`` (last axis) and ``shift_<dy>_<dx>`` (last two axes): a translation by whole pixels with
the border replicated, i.e. a crop of the edge-padded input at an offset.
"""

from __future__ import annotations

import copy
import math
import re
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import Ensemble
from .registry import build_ensemble, register_method

__all__ = ["TTAEnsemble", "Augmentation"]

_FIXED = ("identity", "hflip", "vflip", "rot90", "rot180", "rot270")
_FORMS = (
    "identity, hflip, vflip, rot90, rot180, rot270, rotate_<degrees>, crop_<k>_<c|tl|tr|bl|br>, shift_<d>, "
    "shift_<dy>_<dx>"
)


def _shift(x: Tensor, offsets: tuple[int, ...]) -> Tensor:
    """Translate the last ``len(offsets)`` axes by whole pixels (positive: content moves right/down), edges replicated."""
    k = len(offsets)
    if x.dim() < k + 1:
        raise ValueError(
            f"shift over {k} axes needs an input with a batch axis and {k} spatial axes, got {tuple(x.shape)}."
        )
    pad = []
    for d in reversed(offsets):  # F.pad lists the last axis first
        pad += [max(d, 0), max(-d, 0)]
    lead = x.shape[:-k]
    flat = x.reshape(-1, 1, *x.shape[-k:])  # replicate padding wants (N, C, *spatial)
    padded = F.pad(flat, pad, mode="replicate")
    index = tuple(slice(max(-d, 0), max(-d, 0) + n) for d, n in zip(offsets, x.shape[-k:]))
    key: tuple[Any, ...] = (..., *index)
    return padded[key].reshape(*lead, *x.shape[-k:])


def _crop(x: Tensor, border: int, where: str) -> Tensor:
    """Crop ``2 * border`` pixels off each spatial side in total (centre or a corner), resize back (bilinear)."""
    if x.dim() < 3:
        raise ValueError(f"crop needs images (B, [C,] H, W), got shape {tuple(x.shape)}.")
    h, w = x.shape[-2:]
    if 2 * border >= min(h, w):
        raise ValueError(f"crop_{border}: a border of {border} leaves nothing of a {h}x{w} image.")
    top = {"c": border, "tl": 0, "tr": 0, "bl": 2 * border, "br": 2 * border}[where]
    left = {"c": border, "tl": 0, "tr": 2 * border, "bl": 0, "br": 2 * border}[where]
    patch = x[..., top : top + h - 2 * border, left : left + w - 2 * border]
    img = patch.reshape(-1, 1, *patch.shape[-2:])
    return F.interpolate(img, size=(h, w), mode="bilinear", align_corners=False).reshape(x.shape)


def _rotate(x: Tensor, degrees: float) -> Tensor:
    if x.dim() < 3:
        raise ValueError(f"rotate needs images (B, [C,] H, W), got shape {tuple(x.shape)}.")
    img = x.reshape(-1, 1, *x.shape[-2:]) if x.dim() != 4 else x
    t = math.radians(degrees)
    theta = torch.tensor(
        [[math.cos(t), -math.sin(t), 0.0], [math.sin(t), math.cos(t), 0.0]], dtype=x.dtype, device=x.device
    )
    grid = F.affine_grid(theta.expand(img.shape[0], 2, 3), list(img.shape), align_corners=False)
    return F.grid_sample(img, grid, mode="bilinear", padding_mode="zeros", align_corners=False).reshape(x.shape)


class Augmentation(nn.Module):
    """A named, parameter-free test-time augmentation (see the module docstring for the names).

    Example:
        >>> import torch
        >>> x = torch.arange(4.0).view(1, 1, 4)
        >>> Augmentation("hflip")(x).tolist(), Augmentation("shift_1")(x).tolist()
        ([[[3.0, 2.0, 1.0, 0.0]]], [[[0.0, 0.0, 1.0, 2.0]]])

    Args:
        name: one of the names in the module docstring (``"hflip"``, ``"rot90"``, ``"shift_1"``, ...).
    """

    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name
        self._fn = self._parse(name)

    @staticmethod
    def _parse(name: str) -> Callable[[Tensor], Tensor]:
        if not isinstance(name, str):
            raise ValueError(f"a transform name must be a string, got {type(name).__name__}.")
        if name == "identity":
            return lambda x: x
        if name == "hflip":
            return lambda x: x.flip(-1)
        if name == "vflip":
            return lambda x: x.flip(-2)
        if name in ("rot90", "rot180", "rot270"):
            k = int(name[3:]) // 90
            return lambda x: torch.rot90(x, k, dims=(-2, -1))
        if m := re.fullmatch(r"rotate_(-?\d+(?:\.\d+)?)", name):
            degrees = float(m.group(1))
            return lambda x: _rotate(x, degrees)
        if m := re.fullmatch(r"crop_(\d+)_(c|tl|tr|bl|br)", name):
            border, where = int(m.group(1)), m.group(2)
            return lambda x: _crop(x, border, where)
        if m := re.fullmatch(r"shift_(-?\d+)(?:_(-?\d+))?", name):
            offsets = tuple(int(g) for g in m.groups() if g is not None)
            return lambda x: _shift(x, offsets)
        raise ValueError(f"unknown transform {name!r}; use one of: {_FORMS}, or pass an nn.Module / callable.")

    def forward(self, x: Tensor) -> Tensor:
        return self._fn(x)

    def __getstate__(self) -> dict[str, Any]:  # the parsed lambda is rebuilt from the name (deepcopy, pickle)
        state = self.__dict__.copy()
        state.pop("_fn", None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._fn = self._parse(self.name)

    def extra_repr(self) -> str:
        return repr(self.name)


class _Callable(nn.Module):
    def __init__(self, fn: Callable[[Tensor], Tensor]) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x: Tensor) -> Tensor:
        return self.fn(x)


def _as_module(t: str | nn.Module | Callable) -> nn.Module:
    if isinstance(t, nn.Module):
        return t
    if isinstance(t, str):
        return Augmentation(t)
    if callable(t):
        return _Callable(t)
    raise ValueError(f"a transform must be a name ({_FORMS}), an nn.Module or a callable; got {type(t).__name__}.")


@register_method("tta")
class TTAEnsemble(Ensemble):
    """Test-time augmentation: ``(B, ...) -> (M * A, B, ...)``, members = (inner member, augmentation) pairs.

    Args:
        model: a plain model (M = 1), an :class:`Ensemble` (its M members are augmented), or a backbone
            for ``inner_method``.
        num_members: with ``inner_method``: the inner ensemble's M. Otherwise ``None`` or the total
            number of members (checked), so configs that always give ``num_members`` stay valid.
        transforms: the A augmentations (names or modules/callables, see the module docstring).
        inner_method: build the inner ensemble from ``model`` with this registered method
            (``"deep"``, ``"mc_dropout"``, ``"mimo"`` ...) and ``inner_kwargs``.
        train_augment: ``False`` (TTA proper): training runs the inner model on the plain batch
            (``forward`` returns the inner outputs, :meth:`member_targets` matches them); ``True``: training
            also runs every augmentation (every member gets its loss; needed by the ``Ensembling``
            callback around a plain model).
        backbone_kwargs: arguments building ``model`` when it is a backbone name.

    Example:
        >>> import torch
        >>> from lightning_ensembles import DeepEnsemble
        >>> from lightning_ensembles.backbones import MLP
        >>> tta = TTAEnsemble(DeepEnsemble(MLP(8, 3), num_members=2), transforms=["identity", "hflip", "shift_1"]).eval()
        >>> tta(torch.randn(5, 8)).shape
        torch.Size([6, 5, 3])
        >>> x = torch.randn(2, 8)
        >>> torch.allclose(tta.member(4)(x), tta(x)[4])  # inner member 1, augmentation 1
        True
    """

    def __init__(
        self,
        model: nn.Module | str,
        num_members: int | None = None,
        transforms: list[str | nn.Module] | tuple = ("identity", "hflip"),
        inner_method: str | None = None,
        inner_kwargs: dict[str, Any] | None = None,
        train_augment: bool = False,
        backbone_kwargs: dict[str, Any] | None = None,
    ) -> None:
        if isinstance(model, str):
            model = self.build_backbone(model, backbone_kwargs)
        elif backbone_kwargs:
            raise ValueError("`backbone_kwargs` only applies when `model` is a name; got a built module.")
        if not isinstance(model, nn.Module):
            raise ValueError(f"`model` must be an nn.Module, got {type(model).__name__}.")
        if not transforms:
            raise ValueError("`transforms` must list at least one augmentation, e.g. ['identity', 'hflip'].")
        augs = [_as_module(t) for t in transforms]
        inner: nn.Module
        if inner_method is not None:
            if isinstance(model, Ensemble):
                raise ValueError("`inner_method` builds the inner ensemble from a backbone; got an Ensemble already.")
            inner = build_ensemble(inner_method, model, num_members=num_members or 4, **(inner_kwargs or {}))
        else:
            if inner_kwargs:
                raise ValueError("`inner_kwargs` only applies with `inner_method`.")
            inner = model
        inner_m = inner.num_members if isinstance(inner, Ensemble) else 1
        total = inner_m * len(augs)
        if inner_method is None and num_members is not None and num_members != total:
            raise ValueError(
                f"`num_members`={num_members} but {len(augs)} transforms x {inner_m} inner members give {total} "
                f"members. Set num_members={total} (or None), or build an inner ensemble with inner_method='deep'."
            )
        super().__init__(total)
        self.inner = inner
        self.transforms = nn.ModuleList(augs)
        self.inner_members = inner_m
        self.train_augment = bool(train_augment)
        self.train(model.training)

    @property
    def num_augmentations(self) -> int:
        """A, the number of augmentations."""
        return len(self.transforms)

    def _augment(self, x: Tensor) -> Tensor:
        views = [t(x) for t in self.transforms]
        for t, v in zip(self.transforms, views):
            if v.shape != x.shape:
                raise ValueError(
                    f"transform {t!r} changed the input shape {tuple(x.shape)} to {tuple(v.shape)}; "
                    "TTA members must see inputs of the model's shape (rot90/rot270 need square images)."
                )
        return torch.cat(views)

    def _inner(self, x: Tensor) -> Tensor:
        return self.inner(x) if isinstance(self.inner, Ensemble) else self.inner(x).unsqueeze(0)

    def _inner_targets(self, target: Tensor) -> Tensor:
        if isinstance(self.inner, Ensemble):
            return self.inner.member_targets(target)
        return target.unsqueeze(0)

    def _augmenting(self) -> bool:
        return not self.training or self.train_augment

    def forward(self, x: Tensor) -> Tensor:
        """``(M * A, B, ...)``: member ``m * A + a`` = inner member ``m`` on augmentation ``a``."""
        if not self._augmenting():
            return self._inner(x)
        a, b = self.num_augmentations, x.shape[0]
        out = self._inner(self._augment(x))  # (M, A * B, ...) for inner ensembles that see every example
        if out.shape[1] == a * b:
            return out.unflatten(1, (a, b)).flatten(0, 1)
        return out  # training of an inner ensemble that splits or tiles the batch: matched by member_targets

    def member_targets(self, target: Tensor) -> Tensor:
        """Targets matching :meth:`forward`."""
        if not self._augmenting():
            return self._inner_targets(target)
        a, b = self.num_augmentations, target.shape[0]
        t = self._inner_targets(target.repeat(a, *([1] * (target.dim() - 1))))
        if t.shape[1] == a * b:
            return t.unflatten(1, (a, b)).flatten(0, 1)
        return t

    def member(self, index: int) -> nn.Module:
        """Member ``index = m * A + a``: augmentation ``a`` followed by inner member ``m``."""
        index = self._check_index(index)
        m, a = divmod(index, self.num_augmentations)
        inner = self.inner.member(m) if isinstance(self.inner, Ensemble) else copy.deepcopy(self.inner)
        return nn.Sequential(copy.deepcopy(self.transforms[a]), inner).train(self.training)

    def extra_repr(self) -> str:
        return f"num_members={self.num_members} ({self.inner_members} x {self.num_augmentations} augmentations)"
