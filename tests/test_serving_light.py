"""`serving` must work with only onnxruntime, numpy and pyarrow: no torch, torchrec,
polars or mlflow. A subprocess blocks those imports and imports every serving module."""

import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BLOCKED = ("torch", "torchrec", "fbgemm_gpu", "polars", "mlflow", "pydantic")

PROBE = textwrap.dedent(
    """
    import importlib, importlib.abc, pkgutil, sys

    BLOCKED = {blocked!r}

    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ImportError(f"blocked import of {{name}} (serving must stay light)")
            return None

    sys.meta_path.insert(0, Block())
    import serving
    names = [m.name for m in pkgutil.walk_packages(serving.__path__, "serving.")]
    for name in names:
        importlib.import_module(name)
    leaked = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
    assert not leaked, leaked
    {extra}
    print("ok", len(names))
    """
)


def run_probe(extra: str = "") -> subprocess.CompletedProcess:
    code = PROBE.format(blocked=BLOCKED, extra=extra)
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_blocker_really_blocks():
    # The probe is only meaningful if importing a blocked package fails inside it.
    res = run_probe("import polars")
    assert res.returncode != 0
    assert "blocked import of polars" in res.stderr


def test_serving_imports_without_heavy_dependencies():
    res = run_probe()
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("ok")
