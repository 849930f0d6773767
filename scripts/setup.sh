#!/usr/bin/env bash
# Create .venv (if missing) and install the project with its test extra. Idempotent; offline except
# for the package registry. torch comes first, pinned, so pip does not pick another build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip >/dev/null
if ! python -c "import torch, torchvision; assert torch.__version__.startswith('2.14.1')" 2>/dev/null; then
  python -m pip install -q torch==2.14.1 torchvision==0.29.1
fi
python -m pip install -q -e ".[test]"
