"""Code run in a fresh interpreter, for what a test cannot undo in its own process (blocked imports)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[1]


def import_error_output(prelude: str, statement: str) -> str:
    """Run ``prelude``, then ``statement`` under ``except ImportError as e: print('MSG', e)``, in a fresh interpreter
    from the repository root; assert that it exits 0 and return what it printed."""
    code = f"{prelude}try:\n    {statement}\nexcept ImportError as e:\n    print('MSG', e)\n"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout
