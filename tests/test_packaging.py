"""The core install is what the package imports; optional features name the extra that brings them."""

from __future__ import annotations

import ast
import sys

import tomllib
from _fresh_python import ROOT, import_error_output

# matplotlib and rich are extras too, but torchmetrics / Lightning import them whenever their distribution
# metadata is present, so they cannot be hidden from an environment that has them installed.
EXTRAS_ONLY = ("sklearn", "mnist1d", "torch_uncertainty", "laplace")
# Import names of the core distributions.
CORE = {
    "torch": "torch",
    "lightning": "lightning",
    "lightning_utilities": "lightning",
    "torchmetrics": "torchmetrics",
    "timm": "timm",
    "numpy": "numpy",
    "jsonargparse": "jsonargparse",
}


def _module_level_imports() -> set[str]:
    """Top-level package names imported at module level (not inside functions) anywhere in the package."""
    names: set[str] = set()
    for path in (ROOT / "lightning_ensembles").rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in tree.body:
            if isinstance(node, ast.Import):
                names |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    return names - set(sys.stdlib_module_names) - {"lightning_ensembles"}


def test_core_dependencies_are_exactly_what_is_imported_at_module_level():
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    declared = {d.split("[")[0].split(">")[0].split("=")[0].strip() for d in deps}
    imported = _module_level_imports()
    assert imported <= set(CORE), f"imported at module level but not core: {imported - set(CORE)}"
    # jsonargparse (LightningCLI) and timm (model names) are imported where used, yet core features.
    assert {CORE[n] for n in imported} | {"jsonargparse", "timm"} == declared


def test_the_package_imports_without_any_extra_and_names_the_extra_on_use():
    blocker = (
        "import sys\n"
        f"sys.modules.update(dict.fromkeys({EXTRAS_ONLY!r}))\n"  # None in sys.modules: import fails
        "import pkgutil, importlib, lightning_ensembles\n"
        "for m in pkgutil.walk_packages(lightning_ensembles.__path__, 'lightning_ensembles.'):\n"
        "    if m.name.split('.')[1] not in ('interop',):\n"
        "        importlib.import_module(m.name)\n"
        "from lightning_ensembles.data import DigitsDataModule\n"
    )
    assert "pip install 'lightning-ensembles[data]'" in import_error_output(blocker, "DigitsDataModule().setup()")
