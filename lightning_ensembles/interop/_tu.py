"""The one place torch-uncertainty is imported (optional extra ``interop``)."""

from __future__ import annotations

from types import ModuleType

from .._optional import require

FEATURE = "lightning_ensembles.interop (torch-uncertainty interoperability)"


def tu(module: str = "torch_uncertainty") -> ModuleType:
    """``torch_uncertainty`` (or one of its submodules), or an ``ImportError`` naming the extra to install."""
    return require(module, "interop", FEATURE)
