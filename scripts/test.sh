#!/usr/bin/env bash
# The whole check, in CI's order: lint and import order, format, types, then the test suite.
# Run after scripts/setup.sh (it installs ruff and mypy with the `test` extra, pinned).
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy            # files and settings: [tool.mypy] in pyproject.toml
.venv/bin/python -m pytest -q "$@"
