"""The scorer's fast lookups (serving/encoding.py KeyIndex, vocab_encoder, per_distinct)
against the straightforward Arrow ones, on random keys with repeats, unknowns and nulls;
list_elements against the table source's own split of delimited list cells."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from serving.encoding import (
    KeyIndex,
    bucket_ids,
    encode_ids,
    list_elements,
    per_distinct,
    vocab_encoder,
)


def _random_values(rng: np.random.Generator, keys: list[str], n: int) -> pa.Array:
    """Known keys (repeated), unknown keys and nulls, shuffled."""
    known = rng.choice(keys, n // 2).tolist()
    unknown = [f"unknown-{k}" for k in rng.integers(0, 50, n // 4)]
    values = known + unknown + [None] * (n - len(known) - len(unknown))
    return pa.array([values[i] for i in rng.permutation(n)], pa.large_string())


@pytest.mark.parametrize("n_values", [1, 7, 500])
def test_key_index_positions_equal_index_in(n_values):
    rng = np.random.default_rng(n_values)
    keys = [f"k{i}" for i in rng.permutation(2000)]
    index = KeyIndex(pa.array(keys))
    values = _random_values(rng, keys, n_values) if n_values > 1 else pa.array([keys[5]])
    want = pc.fill_null(pc.index_in(values, value_set=pa.array(keys, pa.large_string())), -1).to_numpy(
        zero_copy_only=False
    )
    np.testing.assert_array_equal(index.positions(values), want)
    np.testing.assert_array_equal(index.distinct_positions(values), want)


def test_key_index_integer_keys_match_their_text_and_empty_index_finds_nothing():
    index = KeyIndex(pa.array([3, 10, 7], pa.int64()))
    np.testing.assert_array_equal(index.positions(pa.array(["7", None, "3", "4"])), [2, -1, 0, -1])
    np.testing.assert_array_equal(index.positions(pa.array([10, 10, 8], pa.int32())), [1, 1, -1])
    assert KeyIndex(pa.array([], pa.large_string())).positions(pa.array(["a", None])).tolist() == [-1, -1]


def test_vocab_encoder_equals_encode_ids():
    rng = np.random.default_rng(0)
    keys = [f"user-{i}" for i in range(300)]
    indices = rng.permutation(300) + 1
    values = _random_values(rng, keys, 1000)
    encode = vocab_encoder(pa.array(keys), indices, capacity=400, oov_buckets=8)
    want = encode_ids(values, pa.array(keys), indices, 400, 8)
    np.testing.assert_array_equal(encode(values), want)
    np.testing.assert_array_equal(encode(values.slice(3, 1)), want[3:4])
    dictionary = values.dictionary_encode()  # a dictionary column gives the same ids
    np.testing.assert_array_equal(encode(dictionary), want)


def test_per_distinct_gathers_rows_of_a_matrix_result():
    values = pa.array(["b", "a", None, "b", "c", None])
    seen: list[int] = []

    def lengths_twice(distinct: pa.Array) -> np.ndarray:
        seen.append(len(distinct))
        n = pc.fill_null(pc.utf8_length(distinct), -1).to_numpy(zero_copy_only=False)
        return np.column_stack([n, 2 * n])

    out = per_distinct(lengths_twice, values)
    assert seen == [4]  # b, a, null, c: each evaluated once
    np.testing.assert_array_equal(out, [[1, 2], [1, 2], [-1, -2], [1, 2], [1, 2], [-1, -2]])


def test_list_elements_of_delimited_text_split_as_the_table_source_does():
    """A CSV-born list column ("3| 17||x"): the scorer's split equals features.table_source's."""
    import polars as pl

    from features.config import SparseFeature
    from features.table_source import LIST_DELIMITER, sparse_values

    cells = ["3| 17||x", "", None, " ", "a", "b|b|", "  c  |d"]
    lengths, elements = list_elements(pa.array(cells, pa.large_string()), LIST_DELIMITER)
    feature = SparseFeature(name="tags", table="table", column="tags", kind="list")
    want = sparse_values(feature, pl.DataFrame({"tags": cells}, schema={"tags": pl.String}))
    want_lengths = pc.fill_null(pc.list_value_length(want), 0).to_numpy(zero_copy_only=False)
    np.testing.assert_array_equal(lengths, want_lengths)
    assert elements.to_pylist() == want.flatten().to_pylist() == ["3", "17", "x", "a", "b", "b", "c", "d"]
    # a list column: its own lengths (a null list is empty) and elements
    lengths, elements = list_elements(pa.array([["a", None], None, []], pa.list_(pa.string())))
    assert lengths.tolist() == [2, 0, 0] and elements.to_pylist() == ["a", None]
    with pytest.raises(TypeError, match="expected a list column"):
        list_elements(pa.array(["a|b"]))  # text without a delimiter is not a list


def test_bucket_ids_put_a_boundary_in_the_bucket_above_and_nulls_in_padding():
    boundaries = [0.0, 10.0, 20.0]
    values = pa.array([-5.0, 0.0, 9.99, 10.0, 15.0, 20.0, 1e9, None, float("nan"), -np.inf, np.inf])
    assert bucket_ids(values, boundaries).tolist() == [1, 2, 2, 3, 3, 4, 4, 0, 0, 1, 4]
    assert bucket_ids(
        pa.chunked_array([pa.array([3, 25], pa.int64()), pa.array([None], pa.int64())]), boundaries
    ).tolist() == [2, 4, 0]
    with pytest.raises(TypeError, match="bucketised values must be numbers, got Arrow type string"):
        bucket_ids(pa.array(["a"]), boundaries)
