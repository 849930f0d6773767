"""The regulariser interface: extra training terms computed from member outputs."""

from __future__ import annotations

import functools
import inspect
import sys
from typing import Any

from torch import Tensor, nn

from .._checks import check_shared_examples
from ..ensembles.surgery import set_unregistered

__all__ = ["Regularizer", "Term", "regularizer_from_config"]

_PLAIN = (bool, int, float, str, type(None))


def _is_plain(value: Any) -> bool:
    if isinstance(value, (list, tuple)):
        return all(_is_plain(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _is_plain(v) for k, v in value.items())
    return isinstance(value, _PLAIN)


class Regularizer(nn.Module):
    """A term added to the member-averaged training loss: ``loss += weight * value``.

    Subclasses implement :meth:`forward` and return the *unweighted* scalar ``value``;
    ``EnsembleClassifier`` / ``EnsembleRegressor`` multiply by ``weight`` and log the value as
    ``train/<name>``. ``inputs`` and ``ensemble`` are passed for terms that need them (input
    gradients, weight-space repulsion).

    Args:
        weight: multiplier of the value in the training loss (``loss += weight * value``); 0 turns the term off.
        name: logged as ``train/<name>`` (default: the class name in lower case).

    Example:
        >>> import torch
        >>> class MeanLogit(Regularizer):
        ...     def forward(self, outputs, target, inputs=None, ensemble=None):
        ...         return outputs.mean()
        >>> MeanLogit(weight=0.1)(torch.ones(2, 3, 4), torch.zeros(3)).item()
        1.0
    """

    def __init_subclass__(cls, **kwargs: Any) -> None:
        # Record the arguments of the outermost __init__ call, so `config()` can describe the object
        # as plain data (checkpoint hyper-parameters must load with `weights_only=True`).
        super().__init_subclass__(**kwargs)
        init = cls.__dict__.get("__init__")
        if init is None:
            return

        @functools.wraps(init)
        def recording_init(self, *args: Any, **kw: Any) -> None:
            outermost = "_init_args" not in self.__dict__
            if outermost:
                bound = inspect.signature(init).bind(self, *args, **kw)
                bound.apply_defaults()
                args_ = dict(list(bound.arguments.items())[1:])
                set_unregistered(self, "_init_args", args_)
            init(self, *args, **kw)

        cls.__init__ = recording_init  # type: ignore[method-assign]

    def __init__(self, weight: float = 0.0, name: str | None = None) -> None:
        if "_init_args" not in self.__dict__:
            set_unregistered(self, "_init_args", {"weight": weight, "name": name})
        super().__init__()
        self.weight = float(weight)
        self.name = name or type(self).__name__.lower()

    def forward(
        self, outputs: Tensor, target: Tensor, inputs: Tensor | None = None, ensemble: nn.Module | None = None
    ) -> Tensor:  # pragma: no cover
        raise NotImplementedError

    def config(self) -> dict[str, Any]:
        """This regulariser as plain data, ``{"class_path": ..., "init_args": {...}}`` (LightningCLI's form).

        It is what the modules store in their checkpoint hyper-parameters instead of the object;
        :func:`regularizer_from_config` rebuilds it.
        """
        init_args = dict(self.__dict__.get("_init_args", {}))
        bad = [k for k, v in init_args.items() if not _is_plain(v)]
        if bad:
            raise ValueError(
                f"{type(self).__name__} argument(s) {bad} are not plain data (numbers, strings, lists, dicts), so the "
                "regulariser cannot be stored in a checkpoint that loads with `weights_only=True`. Give plain values."
            )
        cls = type(self)
        return {"class_path": f"{cls.__module__}.{cls.__qualname__}", "init_args": init_args}


class Term(Regularizer):
    """A :class:`Regularizer` written as :meth:`term`, which :meth:`forward` calls after checking the members.

    A term that compares members on the same example (``compares_examples = True``, the default) needs
    every member to have predicted the batch: :meth:`forward` refuses member outputs that do not cover
    ``inputs`` (an ensemble that splits the batch among its members) before calling :meth:`term`.

    Args:
        weight: multiplier of the value in the training loss (``loss += weight * value``); 0 turns the term off.
        name: logged as ``train/<name>`` (default: the class name in lower case).
    """

    compares_examples: bool = True

    def term(self, outputs: Tensor, target: Tensor | None, inputs: Tensor | None, ensemble: nn.Module | None) -> Tensor:
        """The unweighted value of member outputs ``(M, B, ...)`` (``target``, ``inputs``, ``ensemble``: as given)."""
        raise NotImplementedError  # pragma: no cover - abstract

    def forward(
        self,
        outputs: Tensor,
        target: Tensor | None = None,
        inputs: Tensor | None = None,
        ensemble: nn.Module | None = None,
    ) -> Tensor:
        if self.compares_examples:
            check_shared_examples(outputs, inputs, type(self).__name__)
        return self.term(outputs, target, inputs, ensemble)


def regularizer_from_config(config: dict[str, Any] | Regularizer) -> Regularizer:
    """Rebuild a :class:`Regularizer` from :meth:`Regularizer.config` data (a built one is returned as is).

    Nothing outside the library is imported: the class must be a ``Regularizer`` subclass of
    ``lightning_ensembles`` or of a module that is already imported (import your own module first), the
    rule Lightning applies to ``_class_path`` in checkpoints.

    Example:
        >>> from lightning_ensembles.losses import JensenShannon
        >>> r = regularizer_from_config(JensenShannon(weight=0.1).config())
        >>> type(r).__name__, r.weight
        ('JensenShannon', 0.1)
    """
    if isinstance(config, Regularizer):
        return config
    if not isinstance(config, dict) or "class_path" not in config:
        raise ValueError(
            f"a regulariser must be a Regularizer or a dict with `class_path` (and `init_args`), got {config!r}."
        )
    path = config["class_path"]
    module_name, _, name = str(path).rpartition(".")
    if module_name.startswith("lightning_ensembles."):  # the library's own modules are trusted
        import importlib

        try:
            importlib.import_module(module_name)
        except ImportError:
            pass
    cls = getattr(sys.modules.get(module_name), name, None) if module_name in sys.modules else None
    if not (isinstance(cls, type) and issubclass(cls, Regularizer)):
        raise ValueError(
            f"regulariser `class_path`={path!r} is not a Regularizer subclass of an already imported module; "
            "nothing is imported while loading a config or checkpoint. Import the module that defines it first."
        )
    return cls(**dict(config.get("init_args") or {}))
