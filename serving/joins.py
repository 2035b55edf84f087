"""The joins of an events bundle's scorer (serving.event_inputs): a request's user and
item found in the bundled users / items snapshots, and each aggregate key's rolling
features found in its bundled table, vectorised (hash indexes over the keys, integer codes
for multi-column keys).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from serving.encoding import KeyIndex, as_strings, pad_jagged


def column_positions(positions: list[int]) -> slice | list[int]:
    """Column positions as a slice when they are consecutive (an aggregate key's features
    are): writing into a slice of the dense matrix is several times faster than a list."""
    if positions and positions == list(range(positions[0], positions[-1] + 1)):
        return slice(positions[0], positions[-1] + 1)
    return positions


def cells(rows: np.ndarray, columns: slice | list[int]) -> tuple:
    """The index of ``columns`` (from ``column_positions``) of ``rows`` of a matrix."""
    return (rows, columns) if isinstance(columns, slice) else (rows[:, None], columns)


class LazyColumns(dict):
    """A dict that builds a missing column on first access (``make(name)``): a request's
    user and item ids as Arrow arrays are needed only when one is not in its snapshot."""

    def __init__(self, make) -> None:
        super().__init__()
        self.make = make

    def __missing__(self, name: str) -> pa.Array:
        value = self[name] = self.make(name)
        return value


def expand(values: np.ndarray, n: int) -> np.ndarray:
    """A per-row array of ``n`` rows from a per-row one or a constant (length 1)."""
    return np.repeat(values, n, axis=0) if len(values) == 1 and n != 1 else values


class SnapshotTable:
    """The users or items snapshot as per-row arrays; row ``n`` (one past the end) is the
    'not found' row (padding ids, empty lists, 0.0; its key-dependent values are filled
    per request by EventInputs._fill_misses)."""

    def __init__(self, table: pa.Table, key: str) -> None:
        keys = table.column(key).combine_chunks()
        self.index = KeyIndex(keys)  # vectorised lookup for batches
        # Request path: one dict lookup per candidate beats hashing 200 strings in numpy
        # (~15 us vs ~300 us); memory ~100 bytes per key.
        self.row_of: dict[str, int] = dict(zip(as_strings(keys).to_pylist(), range(len(keys)), strict=True))
        self.n = table.num_rows
        self.ids: dict[str, np.ndarray] = {}
        self.lists: dict[str, tuple[np.ndarray, np.ndarray]] = {}  # name -> (padded [n+1, L], lengths [n+1])
        self.dense: dict[str, np.ndarray] = {}
        self.raw: dict[str, pa.Array] = {}
        for name in table.column_names:
            column = table.column(name).combine_chunks()
            kind, _, feature = name.partition(":")
            if kind == "sparse" and (pa.types.is_list(column.type) or pa.types.is_large_list(column.type)):
                lengths = pc.fill_null(pc.list_value_length(column), 0).to_numpy(zero_copy_only=False).astype(np.int64)
                lengths = np.append(lengths, 0)
                values = column.flatten().to_numpy(zero_copy_only=False).astype(np.int64)
                self.lists[feature] = (pad_jagged(lengths, values), lengths)
            elif kind == "sparse":
                self.ids[feature] = np.append(column.to_numpy(zero_copy_only=False).astype(np.int64), 0)
            elif kind == "dense":
                values = column.to_numpy(zero_copy_only=False).astype(np.float32)
                self.dense[feature] = np.append(values, np.float32(0.0))
            elif kind == "raw":
                self.raw[feature] = column

    def rows(self, keys: pa.Array) -> np.ndarray:
        pos = self.index.positions(keys)
        return np.where(pos < 0, self.n, pos)

    def raw_values(self, column: str, rows: np.ndarray) -> pa.Array:
        """A raw attribute per row; null where the row was not found."""
        return self.raw[column].take(pa.array(np.minimum(rows, max(self.n - 1, 0)), mask=rows >= self.n))

    def raw_codes(self, column: str) -> tuple[np.ndarray, pa.Array]:
        """(code per snapshot row, -1 for null and for row n; the distinct values as key text)."""
        encoded = pc.dictionary_encode(as_strings(self.raw[column]))
        codes = pc.fill_null(encoded.indices, -1).to_numpy(zero_copy_only=False).astype(np.int64)
        return np.append(codes, -1), encoded.dictionary

    def list_ids(self, feature: str, rows: np.ndarray) -> np.ndarray:
        padded, lengths = self.lists[feature]
        width = max(1, int(lengths[rows].max(initial=0)))
        return np.ascontiguousarray(padded[rows, :width])


class AggregateTable:
    """One aggregate key's rolling features; the last matrix row holds the defaults."""

    def __init__(self, table: pa.Table, names: list[str], defaults: dict[str, float]) -> None:
        self.keys = table.column("key").combine_chunks()
        self.index = KeyIndex(self.keys)
        rows = [table.column(n).to_numpy().astype(np.float32) for n in names]
        self.matrix = np.vstack(
            [
                np.column_stack(rows) if rows else np.zeros((table.num_rows, 0), np.float32),
                np.array([[defaults[n] for n in names]], np.float32),
            ]
        )
        self.default_row = len(self.matrix) - 1

    def positions(self, keys: pa.Array) -> np.ndarray:
        pos = self.index.positions(keys)
        return np.where(pos < 0, self.default_row, pos)

    def features(self, keys: pa.Array) -> np.ndarray:
        return self.matrix[self.positions(keys)]


class CodedKey:
    """Integer lookup of a multi-column aggregate key (e.g. user x category) whose parts are
    all snapshot rows or snapshot attributes: each part is a small integer code per
    snapshot row (the row itself, or the attribute's dictionary code), so a row's key is
    one int64 found by ``searchsorted``; no strings are built per request. A row with an
    unknown part (user or item not in the snapshot, null attribute) returns -1 and is
    looked up by its joined string instead (EventInputs._fill_misses)."""

    def __init__(self, aggregate: AggregateTable, parts: list[tuple[str, np.ndarray, KeyIndex]]) -> None:
        # parts: (snapshot table, code per snapshot row (-1 unknown), index of the codes' key texts)
        self.tables = [t for t, _, _ in parts]
        self.codes = [c for _, c, _ in parts]
        sizes = np.array([len(index) for _, _, index in parts], np.int64)
        self.radix = np.concatenate([np.cumprod(sizes[::-1])[::-1][1:], [1]]).astype(np.int64)
        split = pc.split_pattern(aggregate.keys, "\x1f")
        whole = pc.equal(pc.list_value_length(split), len(parts)).to_numpy(zero_copy_only=False)
        composite = np.zeros(len(aggregate.keys), np.int64)
        for j, (_, _, index) in enumerate(parts):
            part = pc.list_element(pc.fill_null(split, pa.scalar([""] * len(parts), split.type)), j)
            code = index.distinct_positions(part)
            whole &= code >= 0
            composite += np.maximum(code, 0) * self.radix[j]
        rows = np.flatnonzero(whole)
        order = np.argsort(composite[rows], kind="stable")
        self.sorted = composite[rows][order]
        self.rows = rows[order]

    def positions(self, snapshot_rows: dict[str, np.ndarray], default_row: int) -> np.ndarray:
        """The aggregate row of each request row; default_row when absent; -1 when a part is unknown."""
        composite = 0
        known = True
        for table, codes, radix in zip(self.tables, self.codes, self.radix, strict=True):
            code = codes[snapshot_rows[table]]
            known = known & (code >= 0)
            composite = composite + np.maximum(code, 0) * radix
        at = np.minimum(np.searchsorted(self.sorted, composite), max(len(self.sorted) - 1, 0))
        hit = (self.sorted[at] == composite) if len(self.sorted) else np.zeros(np.shape(composite), bool)
        return np.where(known, np.where(hit, self.rows[at] if len(self.rows) else 0, default_row), -1)
