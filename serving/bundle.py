"""Loading an exported bundle (pipeline/bundle.py writes it) with its checksums verified.

``manifest.json`` lists the sha256 of every other file of the bundle. A bundle is refused
(BundleError naming the file) when a listed file is missing or differs, when a file that
the manifest does not list is present, or when spec.json names a file (a vocabulary, a
snapshot, an aggregate table) that the manifest does not list: nothing unverified gets
served. Manifest entries are plain relative paths inside the folder (``vocab/x.parquet``:
no ``..``, no absolute path, no backslash, no empty part), and a bundle holds regular
files and folders only: a symbolic link anywhere inside is refused (export never writes
one; the bundle folder itself may be a link, e.g. ``current -> 2026-11-14-...``).

Every listed file is read once, into memory, and hashed; the scorer is built from those
bytes (``Bundle.data``, ``Bundle.table``), never from the folder again, so a file replaced
after the check cannot be served. The demo's bundles are about 8 MB (the ONNX model 5.4 MB
of it), which the Bundle keeps while it lives.

When ``FUNNELRANK_BUNDLE_KEY`` is set, ``manifest.sig`` must hold the HMAC-SHA256 (hex)
of manifest.json's bytes under that key (export writes it when the key is set): a bundle
without it or with another signature is refused. Without the key the signature is not
checked. ``spec.json`` is read as a typed ``serving.spec.BundleSpec``.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import stat
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from serving.encoding import bucket_ids, vocab_encoder
from serving.spec import SPEC_FILE, BundleError, BundleSpec, SparseInput

MANIFEST = "manifest.json"
SIGNATURE = "manifest.sig"  # HMAC-SHA256 of manifest.json, hex (written and checked when the key is set)
SIGNING_KEY_ENV = "FUNNELRANK_BUNDLE_KEY"
MODEL_FILE = "model.onnx"
SUPPORTED_FORMAT = 1
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class Bundle:
    path: Path
    manifest: dict
    spec: BundleSpec
    sha256: str  # of manifest.json: identifies this bundle (and so every file in it)
    contents: Mapping[str, bytes] = field(repr=False)  # each manifest entry's bytes, as read and hashed at load

    @property
    def version(self) -> str:
        """Short id shown by /metrics and logs."""
        return self.sha256[:12]

    def data(self, relative: str) -> bytes:
        """The verified bytes of the bundle's file ``relative`` (a manifest entry)."""
        if relative not in self.contents:
            raise BundleError(f"bundle {self.path}: {relative!r} is not a file listed in its {MANIFEST}")
        return self.contents[relative]

    def table(self, relative: str, columns: Sequence[str]) -> pa.Table:
        """``columns`` of the bundle's Parquet file ``relative``; BundleError naming the file
        when it is not Parquet or lacks one of them."""
        try:
            parquet = pq.ParquetFile(pa.BufferReader(self.data(relative)))
        except pa.ArrowException as err:
            raise BundleError(f"bundle {self.path}: {relative} is not a Parquet file: {err}") from None
        names = parquet.schema_arrow.names
        missing = [c for c in columns if c not in names]
        if missing:
            raise BundleError(f"bundle {self.path}: {relative} has no column {missing[0]!r} (columns: {names})")
        try:
            return parquet.read(columns=list(columns))
        except pa.ArrowException as err:
            raise BundleError(f"bundle {self.path}: {relative} is unreadable: {err}") from None

    def encoder(self, feature: SparseInput) -> Callable[[pa.Array], np.ndarray]:
        """The feature's bundled vocabulary as a function raw ids -> embedding rows (a bucket
        feature: its boundaries, raw numbers -> bucket rows)."""
        if feature.kind == "bucket":
            boundaries = np.asarray(feature.boundaries, np.float64)
            return lambda values: bucket_ids(values, boundaries)
        vocab = self.table(feature.vocab, ["key", "index"])
        admitted = pc.greater(vocab.column("index"), 0)
        return vocab_encoder(
            vocab.column("key").filter(admitted),
            vocab.column("index").filter(admitted).to_numpy(),
            feature.capacity,
            feature.oov_buckets,
        )


def signing_key() -> bytes | None:
    """The bundle signing key: ``FUNNELRANK_BUNDLE_KEY`` as UTF-8 bytes, None when unset or empty."""
    key = os.environ.get(SIGNING_KEY_ENV, "")
    return key.encode() if key else None


def manifest_signature(manifest: bytes, key: bytes) -> bytes:
    """The content of manifest.sig: the hex HMAC-SHA256 of manifest.json's bytes under ``key``."""
    return hmac.new(key, manifest, hashlib.sha256).hexdigest().encode()


def _files_under(root: Path) -> set[str]:
    """The relative paths of the files under ``root``; BundleError for a symbolic link or
    anything else that is neither a regular file nor a folder."""
    files = set()
    for folder, dirs, names in os.walk(root):
        for name in dirs + names:
            entry = Path(folder) / name
            try:
                mode = entry.lstat().st_mode
            except OSError as err:  # e.g. removed while we looked
                raise BundleError(f"bundle {root}: cannot read {entry}: {err}") from None
            if stat.S_ISLNK(mode):
                raise BundleError(
                    f"bundle {root}: {entry} is a symbolic link; a bundle holds plain files and folders only"
                )
            if stat.S_ISREG(mode):
                files.add(entry.relative_to(root).as_posix())
            elif not stat.S_ISDIR(mode):
                raise BundleError(f"bundle {root}: {entry} is not a regular file")
    return files


def _read(file: Path) -> bytes:
    """The bytes of a bundle file, never through a link swapped in after ``_files_under`` looked."""
    try:
        with open(os.open(file, os.O_RDONLY | os.O_NOFOLLOW), "rb") as fh:
            return fh.read()
    except FileNotFoundError:
        raise BundleError(f"bundle file missing: {file}") from None
    except OSError as err:
        raise BundleError(f"bundle file {file} is unreadable: {err}") from None


def _parse_json(data: bytes, file: Path) -> object:
    try:
        return json.loads(data)
    except ValueError as err:  # bad UTF-8 too
        raise BundleError(f"bundle file {file} is not valid JSON: {err}") from None


def _check_entry(root: Path, name: str, digest: object) -> None:
    """A manifest entry: a plain relative path inside the bundle and a sha256 hex digest."""
    if any(c in name for c in "\\\x00") or any(part in ("", ".", "..") for part in name.split("/")):
        raise BundleError(
            f"{root / MANIFEST}: entry {name!r} is not a plain relative path inside the bundle "
            "(parts separated by '/', none empty, '.' or '..'; no leading '/', no backslash)"
        )
    if not (isinstance(digest, str) and _SHA256_HEX.fullmatch(digest)):
        raise BundleError(f"{root / MANIFEST}: entry {name!r} must map to a sha256 hex digest, got {digest!r}")


def _check_signature(root: Path, manifest: bytes, present: set[str]) -> None:
    """With a signing key set: manifest.sig must be the manifest's HMAC under it."""
    key = signing_key()
    if key is None:
        return
    if SIGNATURE not in present:
        raise BundleError(
            f"bundle {root} has no {SIGNATURE}: {SIGNING_KEY_ENV} is set, so only bundles signed "
            "with that key are loaded"
        )
    if not hmac.compare_digest(_read(root / SIGNATURE).strip(), manifest_signature(manifest, key)):
        raise BundleError(
            f"bundle {root}: {SIGNATURE} does not match {MANIFEST} under the key in {SIGNING_KEY_ENV} "
            "(signed with another key, or the manifest was changed)"
        )


def load_bundle(path: str | Path) -> Bundle:
    """Read and verify every file of the bundle at ``path`` against its manifest (and its
    signature when ``FUNNELRANK_BUNDLE_KEY`` is set) and return it, holding those bytes."""
    root = Path(path)
    if not root.is_dir():
        raise BundleError(f"bundle folder not found: {root}")
    present = _files_under(root)
    manifest_bytes = _read(root / MANIFEST)
    _check_signature(root, manifest_bytes, present)
    manifest = _parse_json(manifest_bytes, root / MANIFEST)
    if (
        not isinstance(manifest, dict)
        or manifest.get("format") != SUPPORTED_FORMAT
        or not isinstance(manifest.get("files"), dict)
    ):
        raise BundleError(f"{root / MANIFEST}: not a format-{SUPPORTED_FORMAT} bundle manifest")
    listed: dict[str, str] = manifest["files"]
    for name, digest in listed.items():
        _check_entry(root, name, digest)
    extra = sorted(present - set(listed) - {MANIFEST, SIGNATURE})
    if extra:
        raise BundleError(f"bundle {root}: file {root / extra[0]} is not listed in {MANIFEST}")
    missing = sorted(set(listed) - present)
    if missing:
        raise BundleError(f"bundle {root}: file {root / missing[0]} listed in {MANIFEST} is missing")
    contents = {}
    for name, digest in sorted(listed.items()):
        data = contents[name] = _read(root / name)
        if hashlib.sha256(data).hexdigest() != digest:
            raise BundleError(f"bundle {root}: checksum mismatch for {root / name} (expected sha256 {digest})")
    if SPEC_FILE not in listed or MODEL_FILE not in listed:
        raise BundleError(f"bundle {root}: {MANIFEST} lists no {SPEC_FILE} or {MODEL_FILE}")
    spec = BundleSpec.from_dict(_parse_json(contents[SPEC_FILE], root / SPEC_FILE), str(root / SPEC_FILE))
    for key, name in spec.files():
        if name not in listed:
            raise BundleError(
                f"{root / SPEC_FILE}: key {key!r} names {name!r}, which is not a file listed in {MANIFEST}"
            )
    return Bundle(root, manifest, spec, hashlib.sha256(manifest_bytes).hexdigest(), contents)


def load_bundle_from_mlflow(uri: str, dst: str | Path | None = None, tracking_uri: str | None = None) -> Bundle:
    """Download a bundle logged to MLflow (e.g. ``models:/funnelrank@champion`` or
    ``runs:/<run_id>/bundle``) and load it: ``load_bundle(download_bundle(...))``."""
    return load_bundle(download_bundle(uri, dst, tracking_uri))


def download_bundle(uri: str, dst: str | Path | None = None, tracking_uri: str | None = None) -> Path:
    """Download the artifacts at an MLflow ``uri`` into ``dst`` (a new temporary folder by
    default) and return the bundle folder among them. ``tracking_uri`` (also the
    registry's) defaults to MLflow's own (``MLFLOW_TRACKING_URI``).

    The bundle is the artifact folder at ``uri`` itself, or its one sub-folder holding a
    manifest.json (a model logged by pipeline.registry is an MLflow pyfunc model whose
    artifact ``bundle`` is the bundle). mlflow is imported here only, so serving runs
    without it otherwise.
    """
    import mlflow  # noqa: PLC0415 - optional dependency of this one function
    from mlflow.exceptions import MlflowException  # noqa: PLC0415

    if uri.startswith("models:/") and tracking_uri is not None:
        uri = _model_version_source(uri, tracking_uri)
    target = Path(dst) if dst is not None else Path(tempfile.mkdtemp(prefix="funnelrank-bundle-"))
    try:
        local = Path(
            mlflow.artifacts.download_artifacts(
                artifact_uri=uri, dst_path=str(target), tracking_uri=tracking_uri, registry_uri=tracking_uri
            )
        )
    except (MlflowException, OSError) as err:
        raise BundleError(f"cannot download {uri} from MLflow ({tracking_uri or 'its default store'}): {err}") from None
    if (local / MANIFEST).is_file():
        return local
    found = sorted(p.parent for p in local.rglob(MANIFEST))
    if len(found) != 1:
        raise BundleError(f"MLflow artifacts of {uri} hold {len(found)} bundle manifests, expected 1")
    return found[0]


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
