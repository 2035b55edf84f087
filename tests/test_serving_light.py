"""`serving` must work with only onnxruntime, numpy and pyarrow: no torch, torchrec,
polars or mlflow. A subprocess blocks those imports and imports every serving module but
serving.mlflow_model, the pyfunc model that MLflow hosts: it imports mlflow, and nothing
heavier (tests/test_mlflow_model.py runs it with torch, torchrec, fbgemm and polars blocked)."""

from import_blocker import run_blocked

IMPORT_ALL = """
import importlib, pkgutil
import serving
names = [m.name for m in pkgutil.walk_packages(serving.__path__, "serving.") if m.name != "serving.mlflow_model"]
for name in names:
    importlib.import_module(name)
assert not leaked_modules(), leaked_modules()
{extra}
print("ok", len(names))
"""


def test_blocker_really_blocks():
    # The probe is only meaningful if importing a blocked package fails inside it.
    res = run_blocked(IMPORT_ALL.format(extra="import polars"))
    assert res.returncode != 0
    assert "blocked import of polars" in res.stderr


def test_serving_imports_without_heavy_dependencies():
    res = run_blocked(IMPORT_ALL.format(extra=""))
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("ok")
