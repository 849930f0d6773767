"""Interoperability with other uncertainty libraries (optional extra ``interop``).

:mod:`lightning_ensembles.interop.torch_uncertainty`: this library's ensembles in torch-uncertainty's
``ClassificationRoutine`` and its models, scalers and data modules here. The names below load it on
first use, so ``import lightning_ensembles.interop`` works without the extra and a name used without it
says ``pip install 'lightning-ensembles[interop]'``.
"""

from __future__ import annotations

import importlib
from typing import Any

from ._names import TU_NAMES as _TU_NAMES

__all__ = list(_TU_NAMES)


def __getattr__(name: str) -> Any:
    if name in _TU_NAMES:
        return getattr(importlib.import_module(f"{__name__}.torch_uncertainty"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
