"""Loading an exported bundle (pipeline/bundle.py writes it) with its checksums verified.

``manifest.json`` lists the sha256 of every other file of the bundle. A bundle is refused
(BundleError naming the file) when a listed file is missing or differs, or when a file
that the manifest does not list is present: nothing unverified gets served. Its
``spec.json`` is read as a typed ``serving.spec.BundleSpec``.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from serving.encoding import bucket_ids, vocab_encoder
from serving.spec import SPEC_FILE, BundleError, BundleSpec, SparseInput

MANIFEST = "manifest.json"
SUPPORTED_FORMAT = 1


@dataclass(frozen=True)
class Bundle:
    path: Path
    manifest: dict
    spec: BundleSpec
    sha256: str  # of manifest.json: identifies this bundle (and so every file in it)

    def file(self, relative: str) -> Path:
        return self.path / relative

    @property
    def version(self) -> str:
        """Short id shown by /metrics and logs."""
        return self.sha256[:12]

    def encoder(self, feature: SparseInput) -> Callable[[pa.Array], np.ndarray]:
        """The feature's bundled vocabulary as a function raw ids -> embedding rows (a bucket
        feature: its boundaries, raw numbers -> bucket rows)."""
        if feature.kind == "bucket":
            boundaries = np.asarray(feature.boundaries, np.float64)
            return lambda values: bucket_ids(values, boundaries)
        vocab = pq.read_table(self.file(feature.vocab), columns=["key", "index"])
        admitted = pc.greater(vocab.column("index"), 0)
        return vocab_encoder(vocab.column("key").filter(admitted), vocab.column("index").filter(admitted).to_numpy(),
                             feature.capacity, feature.oov_buckets)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise BundleError(f"bundle file missing: {path}") from None
    except (OSError, ValueError) as err:
        raise BundleError(f"bundle file {path} is unreadable: {err}") from None


def load_bundle(path: str | Path) -> Bundle:
    """Verify every file of the bundle at ``path`` against its manifest and return it."""
    root = Path(path)
    if not root.is_dir():
        raise BundleError(f"bundle folder not found: {root}")
    manifest_path = root / MANIFEST
    manifest = _read_json(manifest_path)
    if manifest.get("format") != SUPPORTED_FORMAT or not isinstance(manifest.get("files"), dict):
        raise BundleError(f"{manifest_path}: not a format-{SUPPORTED_FORMAT} bundle manifest")
    listed: dict[str, str] = manifest["files"]
    present = {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()} - {MANIFEST}
    extra = sorted(present - set(listed))
    if extra:
        raise BundleError(f"bundle {root}: file {root / extra[0]} is not listed in {MANIFEST}")
    for name, digest in sorted(listed.items()):
        file = root / name
        if not file.is_file():
            raise BundleError(f"bundle {root}: file {file} listed in {MANIFEST} is missing")
        if _sha256(file) != digest:
            raise BundleError(f"bundle {root}: checksum mismatch for {file} (expected sha256 {digest})")
    if SPEC_FILE not in listed or "model.onnx" not in listed:
        raise BundleError(f"bundle {root}: {MANIFEST} lists no {SPEC_FILE} or model.onnx")
    spec = BundleSpec.from_dict(_read_json(root / SPEC_FILE), str(root / SPEC_FILE))
    return Bundle(root, manifest, spec, _sha256(manifest_path))


def load_bundle_from_mlflow(uri: str, dst: str | Path | None = None, tracking_uri: str | None = None) -> Bundle:
    """Download a bundle logged to MLflow (e.g. ``models:/funnelrank@champion`` or
    ``runs:/<run_id>/bundle``) and load it. ``tracking_uri`` (also the registry's) defaults
    to MLflow's own (``MLFLOW_TRACKING_URI``).

    The bundle is the artifact folder at ``uri`` itself, or its one sub-folder holding a
    manifest.json. mlflow is imported here only, so serving runs without it otherwise.
    """
    import mlflow  # noqa: PLC0415 - optional dependency of this one function

    if uri.startswith("models:/") and tracking_uri is not None:
        uri = _model_version_source(uri, tracking_uri)
    target = Path(dst) if dst is not None else Path(tempfile.mkdtemp(prefix="funnelrank-bundle-"))
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(target), tracking_uri=tracking_uri,
                                                     registry_uri=tracking_uri))
    if (local / MANIFEST).is_file():
        return load_bundle(local)
    found = sorted(p.parent for p in local.rglob(MANIFEST))
    if len(found) != 1:
        raise BundleError(f"MLflow artifacts of {uri} hold {len(found)} bundle manifests, expected 1")
    return load_bundle(found[0])


def _model_version_source(uri: str, tracking_uri: str) -> str:
    """``models:/<name>@<alias>`` or ``models:/<name>/<version>`` as the version's artifact
    URI, looked up in the registry at ``tracking_uri`` (MLflow itself resolves ``models:/``
    against its global registry URI, whatever store the caller names)."""
    from mlflow.exceptions import MlflowException  # noqa: PLC0415
    from mlflow.tracking import MlflowClient  # noqa: PLC0415

    reference = uri.removeprefix("models:/")
    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    try:
        if "@" in reference.split("/", 1)[0]:
            name, alias = reference.split("/", 1)[0].split("@", 1)
            version = client.get_model_version_by_alias(name, alias).version
        else:
            name, version = reference.split("/", 2)[:2]
        return client.get_model_version_download_uri(name, version)
    except (MlflowException, ValueError) as err:
        raise BundleError(f"cannot resolve {uri} in the MLflow registry at {tracking_uri}: {err}") from None
