"""Atomic writes: a stage's output appears whole or not at all.

Everything is written to a temporary sibling (``.tmp-<name>-<pid>``) and renamed into
place, so a killed stage leaves no half-written partition for a reader to trust.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq


@contextlib.contextmanager
def atomic_dir(target: Path) -> Iterator[Path]:
    """Yield a temporary folder; on success it replaces ``target`` in one rename."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
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
    tmp = target.parent / f".tmp-{target.name}-{os.getpid()}"
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, target)


def atomic_write_json(target: Path, obj: object) -> None:
    atomic_write_bytes(target, (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode())


def write_parquet_dir(target: Path, table: pa.Table | pl.DataFrame, row_group_size: int = 1 << 20) -> Path:
    """Write ``table`` as ``target/part-0.parquet`` atomically (replacing the folder), with
    its recorded sha256 (``record_sha256``). A polars frame is written by polars, which
    encodes the columns in parallel (about twice as fast as pyarrow's writer)."""
    with atomic_dir(target) as tmp:
        if isinstance(table, pl.DataFrame):
            table.write_parquet(tmp / "part-0.parquet", compression="zstd", row_group_size=row_group_size)
        else:
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
