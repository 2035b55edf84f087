"""The packages import one way, pipeline -> models -> features -> serving, and models take
from features only the run config's data sections (the feature spec), the IO helpers, the
error types and the warehouse catalogue. Read from the source (every import statement,
those inside functions too), so a new import that breaks the layering fails here."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("pipeline", "models", "features", "serving")
# each package and the packages of ours it may import (besides itself)
MAY_IMPORT = {
    "pipeline": {"models", "features", "serving"},
    "models": {"features", "serving"},
    "features": {"serving"},
    "serving": set(),
}
MODELS_FROM_FEATURES = {"features.config", "features.io", "features.errors", "features.catalog"}


def imported_modules(source: str, package: str) -> set[str]:
    """The modules of ours that ``source`` (a module of ``package``) imports: ``from
    features import io`` counts as ``features.io``, a relative import is resolved against
    ``package``."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            parts = package.split(".")
            base = (
                ".".join([*parts[: len(parts) - node.level + 1], *filter(None, [node.module])])
                if node.level
                else node.module
            )
            found |= {base} if "." in base else {f"{base}.{alias.name}" for alias in node.names}
    return {m for m in found if m.split(".")[0] in PACKAGES}


def imports(package: str) -> dict[str, set[str]]:
    """Source file (relative to the repository) -> the modules of ours it imports."""
    return {
        path.relative_to(ROOT).as_posix(): imported_modules(path.read_text(), package)
        for path in sorted((ROOT / package).rglob("*.py"))
    }


@pytest.mark.parametrize("package", PACKAGES)
def test_imports_run_one_way(package):
    wrong = [
        f"{path}: {module}"
        for path, modules in imports(package).items()
        for module in sorted(modules)
        if module.split(".")[0] not in MAY_IMPORT[package] | {package}
    ]
    assert not wrong, f"{package} may import only {sorted(MAY_IMPORT[package])} of ours: {wrong}"


def test_models_take_only_the_feature_spec_io_errors_and_catalogue_from_features():
    wrong = [
        f"{path}: {module}"
        for path, modules in imports("models").items()
        for module in sorted(modules)
        if module.startswith("features") and module not in MODELS_FROM_FEATURES
    ]
    assert not wrong, f"models may import only {sorted(MODELS_FROM_FEATURES)} of features: {wrong}"


def test_the_reader_sees_every_form_of_import():
    source = (
        "import features.examples\nimport numpy\nfrom features import vocab\nfrom .nets import MultiTaskNet\n"
        "from . import loader\n\ndef f():\n    from pipeline.cli import main\n"
    )
    assert imported_modules(source, "models") == {
        "features.examples",
        "features.vocab",
        "models.nets",
        "models.loader",
        "pipeline.cli",
    }
