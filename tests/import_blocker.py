"""Run Python code in a subprocess where torch, torchrec, fbgemm, polars, mlflow and
pydantic cannot be imported: how tests prove that `serving` stays light."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BLOCKED = ("torch", "torchrec", "fbgemm_gpu", "polars", "mlflow", "pydantic")

BLOCKER = textwrap.dedent(
    """
    import importlib.abc, sys

    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in {blocked!r}:
                raise ImportError(f"blocked import of {{name}} (serving must stay light)")
            return None

    sys.meta_path.insert(0, Block())
    """
)


def run_blocked(
    code: str, timeout: float = 120, blocked: tuple[str, ...] = BLOCKED, env: dict | None = None
) -> subprocess.CompletedProcess:
    """Run ``code`` (dedented) after installing the import blocker of ``blocked`` (default:
    every heavy package; the MLflow pyfunc model's tests let mlflow and pydantic in); the
    code can check ``leaked_modules()`` to assert none of them was imported."""
    leaked = f"\ndef leaked_modules():\n    return sorted(m for m in sys.modules if m.split('.')[0] in {blocked!r})\n"
    program = BLOCKER.format(blocked=blocked) + leaked + textwrap.dedent(code)
    return subprocess.run(
        [sys.executable, "-c", program], cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env
    )
