"""Atomic writes: a stage's output appears whole or not at all.

Everything is written to a temporary sibling (``.tmp-<name>-<pid>``) and renamed into
place, so a killed stage leaves no half-written partition for a reader to trust. What a
killed writer leaves behind is removed by the next write into the same folder
(``remove_stale_temporaries``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from collections.abc import Iterator, Mapping
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

TEMPORARY_PREFIXES = (".tmp-", ".old-")  # + "<name>-<pid>": a write in progress, a replaced folder


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` of this machine is running."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def remove_stale_temporaries(folder: Path) -> list[Path]:
    """Remove the ``.tmp-<name>-<pid>`` and ``.old-<name>-<pid>`` files and folders in
    ``folder`` whose process has ended (a writer killed mid-write, e.g. during export);
    those of a live process (this one, or another writer on this machine) are kept.
    Returns what it removed."""
    removed = []
    for path in Path(folder).iterdir():
        pid = path.name.rpartition("-")[2]
        if not path.name.startswith(TEMPORARY_PREFIXES) or not pid.isdigit() or process_alive(int(pid)):
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed.append(path)
    return removed


@contextlib.contextmanager
def atomic_dir(target: Path) -> Iterator[Path]:
    """Yield a temporary folder; on success it replaces ``target`` in one rename."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(target.parent)
    tmp = target.parent / f".tmp-{target.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = target.parent / f".old-{target.name}-{os.getpid()}"
    if target.exists():
        target.rename(old)
    tmp.rename(target)
    shutil.rmtree(old, ignore_errors=True)


def atomic_write_bytes(target: Path, data: bytes) -> None:
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(target.parent)
    tmp = target.parent / f".tmp-{target.name}-{os.getpid()}"
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, target)


def atomic_write_json(target: Path, obj: object) -> None:
    atomic_write_bytes(target, (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode())


def write_parquet_dir(
    target: Path,
    table: pa.Table | pl.DataFrame,
    row_group_size: int = 1 << 20,
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """Write ``table`` as ``target/part-0.parquet`` atomically (replacing the folder), with
    its recorded sha256 (``record_sha256``) and ``metadata`` as the file's key-value
    metadata. A polars frame is written by polars, which encodes the columns in parallel
    (about twice as fast as pyarrow's writer)."""
    with atomic_dir(target) as tmp:
        if isinstance(table, pl.DataFrame):
            table.write_parquet(
                tmp / "part-0.parquet",
                compression="zstd",
                row_group_size=row_group_size,
                metadata=dict(metadata) if metadata else None,
            )
        else:
            if metadata:
                table = table.replace_schema_metadata({**(table.schema.metadata or {}), **metadata})
            pq.write_table(table, tmp / "part-0.parquet", row_group_size=row_group_size, compression="zstd")
        record_sha256(tmp / "part-0.parquet")
    return Path(target)


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


# A file's sha256 recorded when it was written, in an extended attribute of the file with
# its size and mtime: the nightly stages hash the same partitions (a month of daily
# aggregates) every night, and re-reading them costs more than the work they skip. The
# record is trusted only while size and mtime_ns still match (as git trusts its index); a
# rewritten file, a copy without its attributes or a file system without them is hashed.
SHA256_XATTR = "user.funnelrank.sha256"


def record_sha256(path: Path) -> str:
    """Hash ``path`` and record the digest on it where the file system allows; return it."""
    digest, stat = sha256_file(path), path.stat()
    with contextlib.suppress(OSError, AttributeError):  # AttributeError: no xattrs on this OS
        os.setxattr(path, SHA256_XATTR, f"{digest} {stat.st_size} {stat.st_mtime_ns}".encode())
    return digest


def recorded_sha256(path: Path) -> str:
    """sha256 of ``path``: the recorded digest while it still describes the file, else computed."""
    with contextlib.suppress(OSError, AttributeError, ValueError):
        digest, size, mtime_ns = os.getxattr(path, SHA256_XATTR).decode().split()
        stat = path.stat()
        if (int(size), int(mtime_ns)) == (stat.st_size, stat.st_mtime_ns):
            return digest
    return sha256_file(path)


def sha256_dir(path: Path) -> str:
    """Content hash of every file under ``path`` (names and bytes, in sorted order)."""
    h = hashlib.sha256()
    for f in sorted(p for p in Path(path).rglob("*") if p.is_file()):
        h.update(f.relative_to(path).as_posix().encode())
        h.update(recorded_sha256(f).encode())
    return h.hexdigest()


def changed_folders(
    root: Path, recorded: Mapping[str, str], hashed: dict[str, str | None] | None = None
) -> dict[str, str]:
    """The folders of ``recorded`` (path relative to ``root`` -> the ``sha256_dir`` an output
    was built from) that changed since: path -> "changed" or "is gone". ``hashed`` caches
    the current hashes across calls (None: the folder is gone)."""
    hashed = {} if hashed is None else hashed
    changed = {}
    for rel, sha in recorded.items():
        if rel not in hashed:
            folder = Path(root) / rel
            hashed[rel] = sha256_dir(folder) if folder.is_dir() else None
        if hashed[rel] != sha:
            changed[rel] = "is gone" if hashed[rel] is None else "changed"
    return changed
