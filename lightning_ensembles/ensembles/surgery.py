"""Generic module surgery shared by the converters (packed, batch, LoRA).

Three small tools:

* :func:`find_modules` lists ``(path, module)`` pairs a predicate selects, outermost first (a selected
  module's children are not visited: the factory owns them).
* :func:`replace_modules` replaces them **atomically**: every replacement is built first, and the
  model is changed only if all of them succeed, so an error never leaves a half-converted model.
* :func:`convert` does the same on a deep copy and returns ``(new_model, converted_paths)``; the
  caller's model is never touched.

Errors are :class:`ConversionError` (a ``ValueError``) whose message starts with the module path.

Example:
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Sequential(nn.Linear(8, 2)))
    >>> new, paths = convert(net, lambda path, m: isinstance(m, nn.Linear),
    ...                      lambda path, m: nn.Linear(m.in_features, m.out_features, bias=False))
    >>> paths
    ['0', '2.0']
    >>> net[0].bias is not None, new[0].bias is None
    (True, True)
"""

from __future__ import annotations

import copy
import fnmatch
from collections.abc import Iterable, Sequence
from typing import Callable

from torch import nn

__all__ = [
    "ConversionError",
    "find_modules",
    "replace_modules",
    "convert",
    "set_submodule",
    "set_unregistered",
    "leaf_parameter_owners",
    "match_paths",
]

Predicate = Callable[[str, nn.Module], bool]
Factory = Callable[[str, nn.Module], nn.Module]


class ConversionError(ValueError):
    """A module cannot be converted; ``path`` names it ("" is the root model).

    Args:
        path: the module's dotted path in the model.
        reason: why it cannot be converted (and the fix).

    Example:
        >>> str(ConversionError("layer1.0.conv1", "width 3 is not divisible by 4"))
        "cannot convert module 'layer1.0.conv1': width 3 is not divisible by 4"
    """

    def __init__(self, path: str, reason: str) -> None:
        self.path = path
        self.reason = reason
        super().__init__(f"cannot convert module {path or '<root>'!r}: {reason}")


def find_modules(model: nn.Module, predicate: Predicate) -> list[tuple[str, nn.Module]]:
    """``(path, module)`` for every module ``predicate(path, module)`` selects, in registration order.

    A selected module's descendants are skipped (the replacement is responsible for them).
    """
    found: list[tuple[str, nn.Module]] = []

    def walk(prefix: str, module: nn.Module) -> None:
        if predicate(prefix, module):
            found.append((prefix, module))
            return
        # _modules, not named_children(): the latter skips a module met twice, which would leave the
        # second occurrence of a shared module unconverted.
        for name, child in module._modules.items():
            if child is None:
                continue
            walk(f"{prefix}.{name}" if prefix else name, child)

    walk("", model)
    return found


def set_submodule(model: nn.Module, path: str, new: nn.Module) -> None:
    """Put ``new`` at dotted ``path`` inside ``model`` (works for ``nn.Sequential``/``ModuleList`` indices)."""
    if not path:
        raise ConversionError(path, "the root module cannot be replaced in place; wrap it instead.")
    *parents, leaf = path.split(".")
    owner = model.get_submodule(".".join(parents)) if parents else model
    # setattr on nn.Module re-registers the child under the same name (also for Sequential "0", "1", ...).
    setattr(owner, leaf, new)


def set_unregistered(module: nn.Module, name: str, value: object) -> None:
    """Store ``value`` as ``module.<name>`` *outside* the module tree.

    ``nn.Module.__setattr__`` registers modules, parameters and tensors it is given, so they would show up
    in ``parameters()``, ``state_dict()``, ``.to()`` and ``repr``. Templates on the meta device, shared
    bookkeeping objects and caches must not: writing to the instance ``__dict__`` skips the registration,
    and attribute lookup still finds the value first.
    """
    module.__dict__[name] = value


def replace_modules(model: nn.Module, predicate: Predicate, factory: Factory) -> list[str]:
    """Replace, in place and atomically, every module ``predicate`` selects by ``factory(path, module)``.

    All replacements are built before any is installed; if ``factory`` raises, ``model`` is unchanged.
    A factory error that is not already a :class:`ConversionError` is wrapped into one naming the path.
    Returns the converted paths in registration order. Shared modules (the same object at two paths)
    are converted once and the replacement is installed at every path.
    """
    targets = find_modules(model, predicate)
    built: dict[int, nn.Module] = {}
    for path, module in targets:
        if id(module) in built:
            continue
        try:
            built[id(module)] = factory(path, module)
        except ConversionError:
            raise
        except (ValueError, TypeError, RuntimeError) as err:
            raise ConversionError(path, f"{type(err).__name__}: {err}") from err
    for path, module in targets:
        set_submodule(model, path, built[id(module)])
    return [path for path, _ in targets]


def convert(model: nn.Module, predicate: Predicate, factory: Factory) -> tuple[nn.Module, list[str]]:
    """:func:`replace_modules` on a deep copy: returns ``(converted_copy, converted_paths)``."""
    new = copy.deepcopy(model)
    return new, replace_modules(new, predicate, factory)


def match_paths(paths: Sequence[str], patterns: Iterable[str], argument: str, what: str = "module") -> list[str]:
    """The ``paths`` that ``fnmatch`` patterns select, in pattern order, each once.

    A pattern that selects nothing is a :class:`ConversionError` naming it, the ``argument`` it came from
    and a few of the ``paths`` (the ``what`` it may name).

    Example:
        >>> match_paths(["net.0", "net.1", "head"], ["net.*", "net.1"], "after")
        ['net.0', 'net.1']
    """
    found: list[str] = []
    for pattern in patterns:
        hits = [p for p in paths if fnmatch.fnmatchcase(p, pattern)]
        if not hits:
            raise ConversionError(pattern, f"`{argument}` pattern matches no {what}; those are e.g. {list(paths)[:8]}.")
        found += [h for h in hits if h not in found]
    return found


def leaf_parameter_owners(model: nn.Module) -> list[tuple[str, nn.Module, list[str]]]:
    """``(path, module, own_parameter_names)`` for every module that directly owns parameters.

    Converters use it to find tensors no known layer owns (a ViT ``cls_token``, a ConvNeXt layer
    scale) and to refuse unknown parametrised layers by path.
    """
    out = []
    for path, module in model.named_modules():
        names = [n for n, p in module._parameters.items() if p is not None]
        if names:
            out.append((path, module, names))
    return out
