"""Backbones by name: timm model names, dotted import paths, and a small built-in MLP.

``resolve_backbone`` is what lets a YAML config say ``backbone: resnet18``.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from typing import Any

from torch import nn

__all__ = ["MLP", "resolve_backbone"]


class MLP(nn.Module):
    """Plain multilayer perceptron that flattens its input: ``(B, ...) -> (B, out_features)``.

    Example:
        >>> import torch
        >>> MLP(64, 10, hidden=(128, 128))(torch.randn(2, 1, 8, 8)).shape
        torch.Size([2, 10])
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        hidden: Sequence[int] = (128, 128),
        dropout: float = 0.0,
        activation: str = "relu",
    ) -> None:
        super().__init__()
        acts = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh, "silu": nn.SiLU}
        if activation not in acts:
            raise ValueError(f"`activation` must be one of {sorted(acts)}, got {activation!r}.")
        layers: list[nn.Module] = [nn.Flatten()]
        width = in_features
        for h in hidden:
            layers += [nn.Linear(width, h), acts[activation]()]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            width = h
        layers.append(nn.Linear(width, out_features))
        self.net = nn.Sequential(*layers)

    def forward(self, x):  # noqa: D102
        return self.net(x)


_BUILTIN = {"mlp": MLP}


def resolve_backbone(backbone: nn.Module | str, kwargs: dict[str, Any] | None = None) -> nn.Module:
    """Build a backbone from a module, a built-in name (``"mlp"``), a dotted path or a timm name.

    Dotted paths (``"torchvision.models.resnet18"``) are imported and called with ``kwargs``.
    timm names are created with ``timm.create_model(name, pretrained=False, **kwargs)`` unless
    ``kwargs`` says ``pretrained=True`` (which downloads weights: never done in tests).
    """
    kwargs = dict(kwargs or {})
    if isinstance(backbone, nn.Module):
        if kwargs:
            raise ValueError("`backbone_kwargs` only applies when `backbone` is a name; got a built module.")
        return backbone
    if not isinstance(backbone, str):
        raise ValueError(f"`backbone` must be an nn.Module or a name, got {type(backbone).__name__}.")
    if backbone in _BUILTIN:
        return _BUILTIN[backbone](**kwargs)
    if "." in backbone:
        module_name, _, attr = backbone.rpartition(".")
        try:
            factory = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as err:
            raise ValueError(f"`backbone`={backbone!r}: cannot import {attr!r} from {module_name!r} ({err}).") from err
        model = factory(**kwargs)
        if not isinstance(model, nn.Module):
            raise ValueError(f"`backbone`={backbone!r} returned {type(model).__name__}, not an nn.Module.")
        return model
    import timm

    if not timm.is_model(backbone):
        close = timm.list_models(f"*{backbone}*")[:8]
        hint = f" Similar timm names: {close}." if close else ""
        raise ValueError(
            f"`backbone`={backbone!r} is not a timm model name, a built-in ({sorted(_BUILTIN)}) or a dotted "
            f"import path.{hint} See `timm.list_models()`."
        )
    kwargs.setdefault("pretrained", False)
    return timm.create_model(backbone, **kwargs)
