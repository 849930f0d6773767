"""Optional dependencies: import on use, and say which extra installs them when they are missing."""

from __future__ import annotations

import importlib
from types import ModuleType


def require(module: str, extra: str, feature: str) -> ModuleType:
    """``importlib.import_module(module)``, or an ``ImportError`` naming the ``pip install`` that provides it.

    Example:
        >>> require("math", "none", "arithmetic").sqrt(4.0)
        2.0
    """
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ImportError(
            f"{feature} needs `{module.split('.')[0]}`, which the core install does not include: "
            f"pip install 'lightning-ensembles[{extra}]'."
        ) from err
