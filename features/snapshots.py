"""Rows joined to the users / items snapshots by position, and columns as codes.

A day's impressions (the ``examples`` stage) or events (the ``features`` stage) name a user
and an item; their attributes live in the snapshots accepted that day. Copying each
attribute onto every row, then hashing it again to encode or group it, took more than
half of the examples stage's time. Here each row keeps its row number in the snapshot
instead, and a column is encoded once (a snapshot column once per snapshot row) as a
``CodedColumn``: each row's code into the column's distinct values, which vocabularies,
aggregate keys and rolling lookups all work from.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc

from features.catalog import scan_validated, validated_dir
from features.errors import StageError
from serving.encoding import as_strings, stable_hash

SNAPSHOT_JOIN_KEY = {"users": "user_id", "items": "item_id"}
# The key hash of a null value: distinct from the hash of "" (stable_hash's null).
NULL_HASH = np.uint64(0x6A09E667F3BCC909)


@dataclass(frozen=True)
class CodedColumn:
    """A column as each row's code into its distinct values (null: ``len(values)``)."""

    codes: np.ndarray
    values: pa.Array  # distinct, non-null

    @classmethod
    def encode(cls, column: pl.Series) -> CodedColumn:
        encoded = pc.dictionary_encode(column.rechunk().to_arrow())
        return cls(
            pc.fill_null(encoded.indices, len(encoded.dictionary)).to_numpy(zero_copy_only=False), encoded.dictionary
        )

    @property
    def null_code(self) -> int:
        return len(self.values)

    @cached_property
    def hashes(self) -> np.ndarray:
        """stable_hash of each distinct value (as its key text), then NULL_HASH for null."""
        return np.append(stable_hash(as_strings(self.values)), NULL_HASH)

    def values_at(self, rows: np.ndarray) -> pl.Series:
        """The column's values at ``rows``."""
        codes = self.codes[rows]
        return pl.Series(self.values.take(pa.array(codes, mask=codes == self.null_code)))

    def gathered(self, rows: np.ndarray) -> CodedColumn:
        """The column at ``rows`` (same distinct values)."""
        return CodedColumn(self.codes[rows], self.values)


@dataclass
class JoinedRows:
    """Rows, in order, and the snapshot row each one joins to.

    ``snapshots[t]`` holds table t's wanted columns plus one all-null row at the end, and
    ``snapshot_row[t][i]`` is row i's row there (the null row when the snapshot lacks its
    key). ``table_of`` says which table each column is read from.
    """

    rows: pl.DataFrame
    snapshots: dict[str, pl.DataFrame]
    snapshot_row: dict[str, np.ndarray]
    table_of: dict[str, str]
    _coded: dict[str, CodedColumn] = field(default_factory=dict)

    @property
    def height(self) -> int:
        return self.rows.height

    def source(self, column: str) -> tuple[pl.Series, np.ndarray | None]:
        """The column as stored in its table and each row's row in it (None: ``rows`` itself)."""
        table = self.table_of.get(column)
        if table in self.snapshots:
            return self.snapshots[table][column], self.snapshot_row[table]
        return self.rows[column], None

    def column(self, column: str) -> pl.Series:
        """The column's value per row."""
        values, at = self.source(column)
        return values if at is None else values.gather(at)

    def coded(self, column: str) -> CodedColumn:
        """The column's codes per row; encoded once per column (a snapshot column once per
        snapshot row, then gathered)."""
        if column not in self._coded:
            values, at = self.source(column)
            coded = CodedColumn.encode(values)
            self._coded[column] = coded if at is None else coded.gathered(at)
        return self._coded[column]


def snapshot_scans(warehouse: Path, day: dt.date, table_of: dict[str, str]) -> dict[str, pl.LazyFrame]:
    """The validated snapshots of ``day`` that ``table_of`` reads columns from: each one's
    join key and those columns."""
    return {
        table: scan_validated(warehouse, table, day).select(SNAPSHOT_JOIN_KEY[table], *columns)
        for table in SNAPSHOT_JOIN_KEY
        if (columns := [c for c, t in table_of.items() if t == table])
    }


def join_snapshots(
    rows: pl.DataFrame, table_of: dict[str, str], snapshots: dict[str, pl.DataFrame], warehouse: Path, day: dt.date
) -> JoinedRows:
    """``rows`` joined to each of ``snapshots`` (``snapshot_scans`` of ``day``, collected)
    on the table's join key, which ``rows`` must hold."""
    joined = JoinedRows(rows, {}, {}, table_of)
    for table, snapshot in snapshots.items():
        on = SNAPSHOT_JOIN_KEY[table]
        key = joined.coded(on)
        # Looked up once per distinct key of the rows, then gathered per row.
        found = pl.DataFrame({on: pl.Series(key.values)}).join(
            snapshot.select(on).with_row_index("row"), on=on, how="left", maintain_order="left"
        )
        if found.height != len(key.values):
            raise StageError(
                f"{validated_dir(warehouse, table, day)} holds some {on} more than once: a snapshot has one row per key"
            )
        joined.snapshot_row[table] = np.append(found["row"].fill_null(snapshot.height).to_numpy(), snapshot.height)[
            key.codes
        ]
        joined.snapshots[table] = pl.concat([snapshot, pl.DataFrame(schema=snapshot.schema).clear(1)])
    return joined
