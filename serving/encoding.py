"""Id encoding shared by training (features/vocab.py) and the scorer: one code path, so
offline and online encodings cannot differ. Numeric columns bucketised into embedding rows
(``bucket_ids``) and numeric columns transformed into dense inputs (``numeric_values``) share
it too.

Only numpy and pyarrow are imported here (the scorer runs without torch or polars).

Layout of an embedding table with ``capacity`` and ``oov_buckets``::

    0                                  padding (null values)
    1 .. capacity                      in-vocabulary ids (the vocabulary's indices)
    capacity+1 .. capacity+oov_buckets unknown, rare or overflow ids, by stable_hash

Values are keyed as strings: integer columns are cast to their decimal text first, so a
slot 3 and a slot "3" are the same key in training and in serving.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

# Polynomial hash over the UTF-8 bytes, then the splitmix64 finaliser so that the low bits
# (used by ``% oov_buckets``) depend on every byte. All arithmetic is modulo 2**64.
HASH_BASE = np.uint64(0x100000001B3)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)
_LEN_SALT = np.uint64(0x9E3779B97F4A7C15)


def as_strings(values: pa.Array | pa.ChunkedArray) -> pa.LargeStringArray:
    """The keys of ``values`` as one large_string array (ints as decimal text)."""
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks()
    t = values.type
    if t == pa.large_string():  # already keys: skip the cast (called many times per request)
        return values
    if pa.types.is_dictionary(t):
        values = values.cast(t.value_type)
        t = values.type
    if not (
        pa.types.is_integer(t) or pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t)
    ):
        raise TypeError(f"ids must be strings or integers, got Arrow type {t}")
    return values.cast(pa.large_string())


def _mix64(z: np.ndarray) -> np.ndarray:
    z = z ^ (z >> np.uint64(30))
    z = z * _MIX1
    z = z ^ (z >> np.uint64(27))
    z = z * _MIX2
    return z ^ (z >> np.uint64(31))


def stable_hash(strings: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """A 64-bit hash per string, identical on every machine and in every process.

    h = mix64((sum_i (byte_i + 1) * BASE**(i+1)) XOR (len * SALT)), computed over the Arrow
    offsets and data buffers with a cumulative sum (no per-row Python). Nulls hash as "".
    """
    arr = as_strings(strings)
    n = len(arr)
    if n == 0:
        return np.zeros(0, dtype=np.uint64)
    offsets = np.frombuffer(arr.buffers()[1], dtype=np.int64)[arr.offset : arr.offset + n + 1]
    data_buf = arr.buffers()[2]
    data = np.frombuffer(data_buf, dtype=np.uint8) if data_buf is not None else np.zeros(0, np.uint8)
    data = data[offsets[0] : offsets[-1]]
    starts = offsets[:-1] - offsets[0]
    lengths = np.diff(offsets)
    if arr.null_count:
        lengths = np.where(arr.is_null().to_numpy(zero_copy_only=False), 0, lengths)
    max_len = int(lengths.max()) if n else 0
    # powers[k] = BASE**(k+1); np.cumprod wraps modulo 2**64 like the arithmetic wants.
    powers = np.cumprod(np.full(max(max_len, 1), HASH_BASE, dtype=np.uint64))
    row_of_byte = np.repeat(np.arange(n), np.diff(offsets))
    pos_in_row = np.arange(len(data), dtype=np.int64) - starts[row_of_byte]
    contrib = (data.astype(np.uint64) + np.uint64(1)) * powers[pos_in_row]
    csum = np.concatenate([np.zeros(1, np.uint64), np.cumsum(contrib, dtype=np.uint64)])
    poly = csum[starts + lengths] - csum[starts]
    return _mix64(poly ^ (lengths.astype(np.uint64) * _LEN_SALT))


def oov_index(hashes: np.ndarray, capacity: int, oov_buckets: int) -> np.ndarray:
    """The OOV row of each hash: capacity+1 .. capacity+oov_buckets."""
    return (hashes % np.uint64(oov_buckets)).astype(np.int64) + (capacity + 1)


def encode_ids(
    values: pa.Array | pa.ChunkedArray, keys: pa.Array, indices: np.ndarray, capacity: int, oov_buckets: int
) -> np.ndarray:
    """Embedding rows (int64) of ``values``: ``indices[j]`` where the value equals
    ``keys[j]``, an OOV bucket by stable_hash otherwise, 0 for null.

    A dictionary-encoded column is encoded once per distinct value, then gathered."""
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks()
    if pa.types.is_dictionary(values.type):
        per_value = encode_ids(values.dictionary, keys, indices, capacity, oov_buckets)
        codes = pc.fill_null(values.indices, 0).to_numpy(zero_copy_only=False)
        valid = values.is_valid().to_numpy(zero_copy_only=False)
        return np.where(valid, per_value[codes] if len(per_value) else 0, 0).astype(np.int64)
    vals = as_strings(values)
    pos = pc.index_in(vals, value_set=as_strings(keys))
    out = np.zeros(len(vals), dtype=np.int64)
    found = pos.is_valid().to_numpy(zero_copy_only=False)
    if found.any():
        out[found] = np.asarray(indices, dtype=np.int64)[pos.drop_null().to_numpy()]
    unknown = ~found & vals.is_valid().to_numpy(zero_copy_only=False)
    if unknown.any():
        missed = vals.filter(pa.array(unknown))
        out[unknown] = oov_index(stable_hash(missed), capacity, oov_buckets)
    return out


def float_values(values: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """A numeric column as float64, null as NaN (ArrowInvalid / ArrowNotImplementedError
    for values that are not numbers)."""
    return pc.cast(values, pa.float64()).to_numpy(zero_copy_only=False)


NumericTransform = Literal["none", "log1p"]
# float64 -> float64, NaN stays NaN. log1p clips negatives to 0 first; ``x < 0`` (not
# np.maximum) keeps a -0.0 as -0.0, as the training tables always had it.
NUMERIC_TRANSFORMS: dict[NumericTransform, Callable[[np.ndarray], np.ndarray]] = {
    "none": lambda x: x,
    "log1p": lambda x: np.log1p(np.where(x < 0.0, 0.0, x)),
}


def numeric_values(values: pa.Array | pa.ChunkedArray, transform: NumericTransform) -> np.ndarray:
    """A raw numeric column as the model's dense input, float32: ``transform`` of its
    values, null/NaN -> 0.0, beyond float32's range -> +-inf. The training tables
    (features.examples, features.table_source) and the scorer both use it."""
    x = NUMERIC_TRANSFORMS[transform](float_values(values))
    with np.errstate(over="ignore"):  # the cast of a float64 beyond float32's range gives inf, as intended
        return np.where(np.isnan(x), 0.0, x).astype(np.float32)


def finite_numeric_values(values: pa.Array | pa.ChunkedArray, transform: NumericTransform, what: str) -> np.ndarray:
    """``numeric_values`` of a column the scorer was given: a value that is not finite as a
    model input (inf, or beyond float32's range) never reaches the model; ValueError naming
    ``what`` (the training tables refuse such values too, in features.examples)."""
    x = numeric_values(values, transform)
    finite = np.isfinite(x)
    if not finite.all():
        raise ValueError(
            f"{what} is not finite as a model input (inf, or beyond float32's range) in "
            f"{int((~finite).sum())} of {len(x)} rows"
        )
    return x


def bucket_ids(values: pa.Array | pa.ChunkedArray, boundaries) -> np.ndarray:
    """Embedding rows (int64) of a bucketised numeric column: 1 + the number of
    ``boundaries`` (ascending) at or below the value, so buckets are 1 .. len(boundaries) + 1
    and a value equal to a boundary falls in the bucket above it; 0 (padding) for null or NaN."""
    try:
        x = float_values(values)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as err:
        raise TypeError(f"bucketised values must be numbers, got Arrow type {values.type}: {err}") from None
    ids = np.searchsorted(np.asarray(boundaries, dtype=np.float64), x, side="right").astype(np.int64) + 1
    ids[np.isnan(x)] = 0
    return ids


def list_elements(values: pa.Array | pa.ChunkedArray, delimiter: str | None = None) -> tuple[np.ndarray, pa.Array]:
    """(length per row int64, the elements flat) of a list column; a null list is empty.

    With ``delimiter``, a string column is read as delimited ids, the way
    features.table_source reads a CSV list cell: split, each id's surrounding whitespace
    trimmed, empty ids dropped (a null or empty cell is an empty list)."""
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks()
    if delimiter is not None and (pa.types.is_string(values.type) or pa.types.is_large_string(values.type)):
        split = pc.split_pattern(values, delimiter)
        split_lengths = pc.fill_null(pc.list_value_length(split), 0).to_numpy(zero_copy_only=False).astype(np.int64)
        elements = pc.utf8_trim_whitespace(split.flatten())
        keep = pc.not_equal(elements, "").to_numpy(zero_copy_only=False)
        row_of_element = np.repeat(np.arange(len(values)), split_lengths)
        return np.bincount(row_of_element[keep], minlength=len(values)).astype(np.int64), elements.filter(
            pa.array(keep)
        )
    if not (pa.types.is_list(values.type) or pa.types.is_large_list(values.type) or pa.types.is_list_view(values.type)):
        raise TypeError(f"expected a list column, got Arrow type {values.type}")
    lengths = pc.fill_null(pc.list_value_length(values), 0).to_numpy(zero_copy_only=False).astype(np.int64)
    return lengths, values.flatten()


def encode_list_ids(
    values: pa.Array | pa.ChunkedArray, keys: pa.Array, indices: np.ndarray, capacity: int, oov_buckets: int
) -> pa.LargeListArray:
    """encode_ids applied to the elements of a list column, keeping its offsets.

    A null list becomes an empty list; a null element becomes 0 (padding)."""
    lengths, elements = list_elements(values)
    offsets = np.concatenate([np.zeros(1, np.int64), np.cumsum(lengths)])
    flat = encode_ids(elements, keys, indices, capacity, oov_buckets)
    return pa.LargeListArray.from_arrays(pa.array(offsets, pa.int64()), pa.array(flat, pa.int64()))


def join_key_columns(columns: list[pa.Array | pa.ChunkedArray]) -> pa.LargeStringArray:
    """One string key per row of several key columns (an aggregate key like user x category):
    their texts joined by the unit separator; null when any part is null."""
    parts = [as_strings(c) for c in columns]
    if len(parts) == 1:
        return parts[0]
    return pc.binary_join_element_wise(*parts, pa.scalar("\x1f", pa.large_string()))


def pad_jagged(lengths: np.ndarray, values: np.ndarray, pad: int = -1) -> np.ndarray:
    """A jagged int64 column (lengths, flat values) as a [rows, max(1, longest)] matrix
    filled with ``pad`` after each row's values (the ONNX model's list-feature input)."""
    lengths = np.asarray(lengths, dtype=np.int64)
    width = max(1, int(lengths.max()) if len(lengths) else 1)
    out = np.full((len(lengths), width), pad, dtype=np.int64)
    starts = np.concatenate([np.zeros(1, np.int64), np.cumsum(lengths)[:-1]])
    rows = np.repeat(np.arange(len(lengths)), lengths)
    cols = np.arange(len(values), dtype=np.int64) - np.repeat(starts, lengths)
    out[rows, cols] = values
    return out


def per_distinct(fn, values: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """``fn(values)`` evaluated once per distinct value (null included) and gathered back per
    row: a request repeats its user and context 200 times, a batch repeats users and items."""
    encoded = pc.dictionary_encode(as_strings(values), null_encoding="encode")
    return fn(encoded.dictionary)[encoded.indices.to_numpy(zero_copy_only=False)]


class KeyIndex:
    """A reusable hash index over string keys: ``positions(values)`` finds each value's
    row among ``keys`` (-1 when absent), vectorised, without rebuilding a hash table per
    call (``pc.index_in`` would hash the whole key set on every request).

    Sorted stable_hash values are searched, then the keys are compared, so a hash
    collision can never return a wrong row. Keys whose hashes collide (practically never
    with 64 bits) make it fall back to ``pc.index_in``.
    """

    def __init__(self, keys: pa.Array | pa.ChunkedArray) -> None:
        self.keys = as_strings(keys)
        hashes = stable_hash(self.keys)
        self._order = np.argsort(hashes, kind="stable")
        self._sorted = hashes[self._order]
        self._collisions = bool(len(self._sorted) > 1 and (np.diff(self._sorted) == 0).any())

    def __len__(self) -> int:
        return len(self.keys)

    def positions(self, values: pa.Array | pa.ChunkedArray) -> np.ndarray:
        return per_distinct(self.distinct_positions, values)

    def distinct_positions(self, values: pa.Array | pa.ChunkedArray) -> np.ndarray:
        """``positions`` without first reducing ``values`` to their distinct values."""
        vals = as_strings(values)
        if self._collisions or len(self.keys) == 0:
            found = pc.index_in(vals, value_set=self.keys)
            return pc.fill_null(found, -1).to_numpy(zero_copy_only=False).astype(np.int64)
        at = np.minimum(np.searchsorted(self._sorted, stable_hash(vals)), len(self._sorted) - 1)
        rows = self._order[at]
        same = pc.equal(self.keys.take(rows), vals)
        hit = pc.fill_null(same, False).to_numpy(zero_copy_only=False)
        return np.where(hit, rows, -1).astype(np.int64)


def vocab_encoder(keys: pa.Array, indices: np.ndarray, capacity: int, oov_buckets: int):
    """``encode_ids`` with the key set indexed once: a function values -> embedding rows,
    evaluated once per distinct value."""
    index = KeyIndex(keys)
    rows = np.asarray(indices, dtype=np.int64)

    def encode_distinct(vals: pa.Array) -> np.ndarray:
        pos = index.distinct_positions(vals)
        out = np.where(pos >= 0, rows[np.maximum(pos, 0)] if len(rows) else 0, 0).astype(np.int64)
        unknown = (pos < 0) & vals.is_valid().to_numpy(zero_copy_only=False)
        if unknown.any():
            out[unknown] = oov_index(stable_hash(vals.filter(pa.array(unknown))), capacity, oov_buckets)
        return out

    return lambda values: per_distinct(encode_distinct, values)
