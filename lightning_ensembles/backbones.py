"""Backbones by name: timm model names, dotted import paths, and a small built-in MLP.

``resolve_backbone`` is what lets a YAML config say ``backbone: resnet18``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from typing import Any

from torch import nn

from ._checks import check_choice

__all__ = ["MLP", "CNN1D", "register_backbone", "resolve_backbone"]


class MLP(nn.Module):
    """Plain multilayer perceptron that flattens its input: ``(B, ...) -> (B, out_features)``.

    Args:
        in_features: size of the flattened input.
        out_features: size of the output (e.g. the number of classes).
        hidden: widths of the hidden layers.
        dropout: dropout probability after every hidden activation (0: none).
        activation: ``"relu"``, ``"gelu"``, ``"tanh"`` or ``"silu"``.

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
        check_choice("activation", activation, sorted(acts))
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


class CNN1D(nn.Module):
    """A small 1-D CNN for signals ``(B, in_channels, input_length) -> (B, out_features)``.

    Each block is ``Conv1d(kernel, padding="same") -> BatchNorm1d -> ReLU -> MaxPool1d(2)``; the
    features are flattened into a linear ``head``. The defaults (3 blocks of 32 channels, kernels 5, 3, 3;
    8,202 parameters for MNIST-1D) reach about 97% test accuracy on MNIST-1D, above the 94% of the
    MNIST-1D paper's CNN (Greydanus, 2020): max-pooling after "same" convolutions keeps more of the
    translated signal than the paper's strided convolutions. ``dropout > 0`` adds ``nn.Dropout`` before
    the head. ``norm=False`` drops the BatchNorm layers.

    Args:
        in_channels: channels of the input signal.
        out_features: size of the output (e.g. the number of classes).
        input_length: length of the input signal (sizes the head).
        channels: output channels of each convolution block.
        kernel_sizes: kernel size of each block (as many as ``channels``).
        norm: BatchNorm after every convolution.
        dropout: dropout probability before the head (0: none).

    Example:
        >>> import torch
        >>> net = CNN1D(in_channels=1, out_features=10, input_length=40)
        >>> net(torch.randn(2, 1, 40)).shape, sum(p.numel() for p in net.parameters())
        (torch.Size([2, 10]), 8202)
    """

    def __init__(
        self,
        in_channels: int = 1,
        out_features: int = 10,
        input_length: int = 40,
        channels: Sequence[int] = (32, 32, 32),
        kernel_sizes: Sequence[int] = (5, 3, 3),
        norm: bool = True,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if len(channels) != len(kernel_sizes) or not channels:
            raise ValueError(
                f"`channels` and `kernel_sizes` need one entry per block, got {len(channels)} and {len(kernel_sizes)}."
            )
        if input_length < 2 ** len(channels):
            raise ValueError(
                f"`input_length`={input_length} is too short for {len(channels)} blocks (each halves the length); "
                f"use at least {2 ** len(channels)} or fewer `channels`."
            )
        layers: list[nn.Module] = []
        width, length = in_channels, input_length
        for ch, k in zip(channels, kernel_sizes):
            layers.append(nn.Conv1d(width, ch, k, padding="same"))
            if norm:
                layers.append(nn.BatchNorm1d(ch))
            layers += [nn.ReLU(), nn.MaxPool1d(2)]
            width, length = ch, length // 2
        layers.append(nn.Flatten())
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(width * length, out_features)

    def forward(self, x):  # noqa: D102
        return self.head(self.features(x))


_BUILTIN = {"mlp": MLP, "cnn1d": CNN1D}

# Names and dotted paths a user allowed with `register_backbone`: the only way code outside the
# allowlisted packages gets built from a name in a config or a checkpoint.
_REGISTERED: dict[str, Callable[..., nn.Module]] = {}

# Packages whose modules may be imported to resolve a dotted path to an nn.Module class. Importing a
# module runs its code, so a path is checked against this list *before* anything is imported.
_CLASS_PACKAGES = ("lightning_ensembles.", "torch.nn.")


def register_backbone(factory: Callable[..., nn.Module] | None = None, *, name: str | None = None):
    """Allow ``factory`` (an ``nn.Module`` class or a function returning one) to be built by name.

    Configs and checkpoints name their backbone as a string; only allowlisted names are ever built
    (see :func:`resolve_backbone`). Register your own model in *your* code, before building or loading:
    it becomes available under its dotted path (``"mypkg.models.MyNet"``) and under ``name`` if given.
    Works as a plain call or as a decorator, with or without ``name``.

    Example:
        >>> from torch import nn
        >>> @register_backbone(name="tiny_linear")
        ... class TinyLinear(nn.Linear):
        ...     pass
        >>> resolve_backbone("tiny_linear", {"in_features": 3, "out_features": 2})
        TinyLinear(in_features=3, out_features=2, bias=True)
    """

    def add(f: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if not callable(f):
            raise ValueError(f"register_backbone needs a class or function, got {type(f).__name__}.")
        keys = [f"{f.__module__}.{f.__qualname__}"]
        if name is not None:
            if name in _BUILTIN:
                raise ValueError(f"`name`={name!r} is a built-in backbone; choose another name.")
            keys.append(name)
        for key in keys:
            _REGISTERED[key] = f
        return f

    return add if factory is None else add(factory)


def _allowed_factory(path: str) -> Callable[..., nn.Module]:
    """The builder a dotted path names, if the allowlist admits it; else a ``ValueError`` saying how to allow it."""
    if path in _REGISTERED:
        return _REGISTERED[path]
    refusal = (
        f"`backbone`={path!r} is not an allowed backbone. A name in a config or checkpoint may only build a timm "
        f"model name, a built-in ({sorted(_BUILTIN)}), an nn.Module class of lightning_ensembles or torch.nn, a "
        "torchvision.models builder, or a name registered with `lightning_ensembles.register_backbone(...)`: "
        "loading a file never imports or calls anything else. If you trust this code, call "
        "`register_backbone(<the class or function>)` in your own code before building or loading, or pass the "
        "built module as `backbone=`."
    )
    module_name, _, attr = path.rpartition(".")
    if path.startswith("torchvision.models."):
        from torchvision import models  # a trusted package: its builders only construct networks

        if attr not in models.list_models():
            raise ValueError(refusal)
        builder = models.get_model_builder(attr)
        if not (builder.__module__ + ".").startswith("torchvision.models."):
            raise ValueError(refusal)
        return builder
    if not path.startswith(_CLASS_PACKAGES):
        raise ValueError(refusal)
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"`backbone`={path!r}: cannot import {attr!r} from {module_name!r} ({err}).") from err
    # Only classes: a function of these packages could do anything with its arguments.
    if not (isinstance(factory, type) and issubclass(factory, nn.Module)):
        raise ValueError(refusal)
    return factory


def resolve_backbone(backbone: nn.Module | str, kwargs: dict[str, Any] | None = None) -> nn.Module:
    """Build a backbone from a module, a built-in name (``"mlp"``), a timm name or an allowed dotted path.

    A string comes from configs and checkpoints, so it is resolved only through an allowlist and
    nothing else is imported or called: timm model names (created with ``pretrained=False`` unless
    ``kwargs`` says ``pretrained=True``, which downloads weights: never done in tests), the built-in
    ``"mlp"``, ``nn.Module`` classes of ``lightning_ensembles`` and ``torch.nn``, ``torchvision.models``
    builders (``"torchvision.models.resnet18"``), and names registered with :func:`register_backbone`.
    Anything else raises a ``ValueError`` that names the path and how to register it.
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
    if backbone in _REGISTERED or "." in backbone:
        model = _allowed_factory(backbone)(**kwargs)
        if not isinstance(model, nn.Module):
            raise ValueError(f"`backbone`={backbone!r} returned {type(model).__name__}, not an nn.Module.")
        return model
    import timm

    if not timm.is_model(backbone):
        close = timm.list_models(f"*{backbone}*")[:8]
        hint = f" Similar timm names: {close}." if close else ""
        raise ValueError(
            f"`backbone`={backbone!r} is not a timm model name, a built-in ({sorted(_BUILTIN)}), a registered name "
            f"({sorted(k for k in _REGISTERED if '.' not in k)}) or an allowed dotted path.{hint} See "
            "`timm.list_models()` and `lightning_ensembles.register_backbone`."
        )
    kwargs.setdefault("pretrained", False)
    return timm.create_model(backbone, **kwargs)
