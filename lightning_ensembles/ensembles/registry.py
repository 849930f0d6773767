"""Ensemble methods by name, so configs can say ``method: packed``."""

from __future__ import annotations

from typing import Any, Callable

from torch import nn

from .base import Ensemble

__all__ = ["ENSEMBLE_METHODS", "register_method", "build_ensemble"]

#: name -> factory(backbone, num_members=..., backbone_kwargs=..., **kwargs) returning an :class:`Ensemble`.
ENSEMBLE_METHODS: dict[str, Callable[..., Ensemble]] = {}


def register_method(name: str) -> Callable[[Callable[..., Ensemble]], Callable[..., Ensemble]]:
    """Decorator registering an ensemble factory (usually the class itself) under ``name``.

    The factory is called as ``factory(backbone, num_members=..., backbone_kwargs=..., **kwargs)``: ``backbone``
    is a module or a name, built with ``backbone_kwargs`` (see :meth:`Ensemble.build_backbone`).
    """

    def deco(factory: Callable[..., Ensemble]) -> Callable[..., Ensemble]:
        ENSEMBLE_METHODS[name] = factory
        return factory

    return deco


def build_ensemble(
    method: str,
    backbone: nn.Module | str,
    num_members: int = 4,
    backbone_kwargs: dict[str, Any] | None = None,
    **kwargs: Any,
) -> Ensemble:
    """Build ``method`` (``"deep"``, ``"packed"``, ``"batch"``, ``"lora"``, ``"mc_dropout"``, ``"mimo"``,
    ``"masksembles"``, ``"tta"``, ``"asymmetric"``, ...) around ``backbone``.

    Example:
        >>> ens = build_ensemble("deep", "mlp", num_members=2, backbone_kwargs={"in_features": 4, "out_features": 3})
        >>> ens.num_members
        2
    """
    _load_builtin_methods()
    if method not in ENSEMBLE_METHODS:
        raise ValueError(f"unknown ensemble `method`={method!r}; available: {sorted(ENSEMBLE_METHODS)}.")
    return ENSEMBLE_METHODS[method](backbone, num_members=num_members, backbone_kwargs=backbone_kwargs, **kwargs)


def _load_builtin_methods() -> None:
    # Imported here, not at module import, so the registry has no import cycles with the methods.
    from . import deep  # noqa: F401

    for optional in ("packed", "batch", "lora", "symmetry", "mc_dropout", "mimo", "masksembles", "tta", "asymmetric"):
        try:
            __import__(f"{__package__}.{optional}")
        except ModuleNotFoundError as err:
            if err.name != f"{__package__}.{optional}":
                raise
