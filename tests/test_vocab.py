"""Append-only vocabularies (features/vocab.py) and the shared id encoding (serving/encoding.py)."""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import sys

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from features.catalog import vocab_version_path
from features.config import SparseFeature
from features.errors import StageError
from features.snapshots import CodedColumn
from features.vocab import load_vocabulary, read_manifest, update_vocabulary
from serving.encoding import encode_ids, encode_list_ids, stable_hash

DAY1, DAY2, DAY3 = dt.date(2026, 3, 1), dt.date(2026, 3, 2), dt.date(2026, 3, 3)
M64 = (1 << 64) - 1


def reference_hash(text: str) -> int:
    """The documented hash written the plain way: one byte at a time, Python ints."""
    data = text.encode()
    poly, power = 0, 1
    for b in data:
        power = (power * 0x100000001B3) & M64
        poly = (poly + (b + 1) * power) & M64
    z = poly ^ ((len(data) * 0x9E3779B97F4A7C15) & M64)
    z ^= z >> 30
    z = (z * 0xBF58476D1CE4E5B9) & M64
    z ^= z >> 27
    z = (z * 0x94D049BB133111EB) & M64
    return z ^ (z >> 31)


def feature(**kw) -> SparseFeature:
    base = {
        "name": "user_id",
        "table": "impressions",
        "column": "user_id",
        "capacity": 100,
        "min_count": 1,
        "oov_buckets": 4,
    }
    return SparseFeature(**(base | kw))


def as_dict(vocab) -> dict[str, tuple[int, int]]:
    t = vocab.table.to_pydict()
    return {k: (i, c) for k, i, c in zip(t["key"], t["index"], t["count"], strict=True)}


def test_stable_hash_matches_reference_and_handles_slices_and_unicode():
    words = ["", "a", "user_123", "Zürich", "x" * 300, "item_9"]
    got = stable_hash(pa.array(words))
    assert got.dtype == np.uint64
    assert [int(h) for h in got] == [reference_hash(w) for w in words]
    # a sliced array (non-zero Arrow offset) and a large_string array hash the same
    assert list(stable_hash(pa.array(words).slice(2, 3))) == list(got[2:5])
    assert list(stable_hash(pa.array(words, pa.large_string()))) == list(got)
    assert len(set(got.tolist())) == len(words)


def test_stable_hash_same_in_another_process():
    words = ["alpha", "beta", "gamma", "42"]
    code = (
        "import pyarrow as pa; from serving.encoding import stable_hash; "
        f"print(list(map(int, stable_hash(pa.array({words!r})))))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert json.loads(out) == [reference_hash(w) for w in words]


def test_encode_ids_known_unknown_null_and_ints():
    keys, indices = pa.array(["a", "b", "3"]), np.array([1, 2, 3])
    got = encode_ids(pa.array(["b", "zz", None, "a"]), keys, indices, capacity=10, oov_buckets=4)
    assert got.tolist() == [2, 11 + reference_hash("zz") % 4, 0, 1]
    # integer columns are keyed by their decimal text
    assert encode_ids(pa.array([3, 7, None]), keys, indices, 10, 4).tolist() == [3, 11 + reference_hash("7") % 4, 0]


def test_dictionary_encoded_and_coded_values_encode_and_count_like_plain_ones(tmp_path):
    keys, indices = pa.array(["a", "b"]), np.array([1, 2])
    plain = pa.array(["b", "zz", None, "a", "zz"])
    encoded = pc.dictionary_encode(plain)
    assert encode_ids(encoded, keys, indices, 10, 4).tolist() == encode_ids(plain, keys, indices, 10, 4).tolist()
    one = update_vocabulary(tmp_path / "one", feature(), DAY1, plain)
    two = update_vocabulary(tmp_path / "two", feature(), DAY1, encoded)
    coded = CodedColumn.encode(pl.Series(plain))
    three = update_vocabulary(tmp_path / "three", feature(), DAY1, coded)
    assert one.table.equals(two.table) and one.table.equals(three.table)
    assert three.encode(coded).tolist() == one.encode(plain).tolist()


def test_encode_list_ids_keeps_offsets():
    keys, indices = pa.array(["a", "b"]), np.array([1, 2])
    lists = pa.array([["a", "q"], None, [], ["b", None, "a"]])
    got = encode_list_ids(lists, keys, indices, capacity=5, oov_buckets=3)
    assert got.to_pylist() == [[1, 6 + reference_hash("q") % 3], [], [], [2, 0, 1]]
    assert encode_list_ids(lists.slice(3), keys, indices, 5, 3).to_pylist() == [[2, 0, 1]]


def test_two_nights_keep_indices_and_append(tmp_path):
    f = feature()
    v1 = update_vocabulary(tmp_path, f, DAY1, pa.array(["u2", "u1", "u2", None]))
    # admitted the same night: by count descending, then key
    assert as_dict(v1) == {"u2": (1, 2), "u1": (2, 1)}
    v2 = update_vocabulary(tmp_path, f, DAY2, pa.array(["u3", "u1", "u4", "u4"]))
    assert as_dict(v2) == {"u2": (1, 2), "u1": (2, 2), "u4": (3, 2), "u3": (4, 1)}
    assert (v1.version, v2.version) == (1, 2)
    assert v2.encode(pa.array(["u1", "u2", "u3", "u4", None])).tolist() == [2, 1, 4, 3, 0]
    # the old version stays readable with its own content
    assert as_dict(load_vocabulary(tmp_path, f, 1)) == as_dict(v1)
    assert load_vocabulary(tmp_path, f).version == 2


def test_min_count_over_cumulative_counts(tmp_path):
    f = feature(min_count=3, oov_buckets=5, capacity=10)
    v1 = update_vocabulary(tmp_path, f, DAY1, pa.array(["a", "a", "b", "c", "c", "c"]))
    assert as_dict(v1) == {"c": (1, 3), "a": (0, 2), "b": (0, 1)}
    assert v1.encode(pa.array(["a"])).tolist() == [11 + reference_hash("a") % 5]
    v2 = update_vocabulary(tmp_path, f, DAY2, pa.array(["a", "b"]))
    assert as_dict(v2) == {"c": (1, 3), "a": (2, 3), "b": (0, 2)}


def test_capacity_overflow_goes_to_oov(tmp_path):
    f = feature(capacity=2, oov_buckets=3)
    v = update_vocabulary(tmp_path, f, DAY1, pa.array(["x", "y", "y", "z", "z", "z"]))
    assert as_dict(v) == {"z": (1, 3), "y": (2, 2), "x": (0, 1)}
    assert v.size == 2 and v.num_embeddings == 6
    v = update_vocabulary(tmp_path, f, DAY2, pa.array(["w"] * 10))
    assert as_dict(v)["w"] == (0, 10)  # full: never admitted, still counted
    assert v.encode(pa.array(["w", "x"])).tolist() == [3 + reference_hash("w") % 3, 3 + reference_hash("x") % 3]
    with pytest.raises(StageError, match="capacity"):
        update_vocabulary(tmp_path, feature(capacity=1), DAY3, pa.array(["q"]))


def test_list_feature_counts_elements(tmp_path):
    f = feature(name="interests", column="interests", table="users", kind="list", min_count=2)
    v = update_vocabulary(tmp_path, f, DAY1, pa.array([["sport", "music"], None, ["sport"], ["art", None]]))
    assert as_dict(v) == {"sport": (1, 2), "art": (0, 1), "music": (0, 1)}
    got = v.encode_list(pa.array([["music", "sport"], []]))
    assert got.to_pylist() == [[101 + reference_hash("music") % 4, 1], []]


def test_versions_only_change_with_content_and_days_apply_once(tmp_path):
    f = feature()
    v1 = update_vocabulary(tmp_path, f, DAY1, pa.array(["a", "b"]))
    v2 = update_vocabulary(tmp_path, f, DAY2, pa.array([], pa.string()))  # nothing new
    assert v2.version == v1.version == 1
    # re-applying a night (a rerun) neither counts twice nor bumps the version
    again = update_vocabulary(tmp_path, f, DAY1, pa.array(["a", "b"]))
    assert again.version == 1 and as_dict(again) == {"a": (1, 1), "b": (2, 1)}
    v3 = update_vocabulary(tmp_path, f, DAY3, pa.array(["c"]))
    assert v3.version == 2
    # a rerun of DAY1 after DAY3 gets the vocabulary DAY1 produced
    assert as_dict(update_vocabulary(tmp_path, f, DAY1, pa.array(["zzz"]))) == {"a": (1, 1), "b": (2, 1)}
    manifest = read_manifest(tmp_path, "user_id")
    assert manifest["applied_days"] == {"2026-03-01": 1, "2026-03-02": 1, "2026-03-03": 2}
    assert [v["day"] for v in manifest["versions"]] == ["2026-03-01", "2026-03-03"]
    assert manifest["current_version"] == 2 and manifest["num_embeddings"] == 105
    assert vocab_version_path(tmp_path, "user_id", 1).exists() and vocab_version_path(tmp_path, "user_id", 2).exists()


def test_same_input_gives_same_bytes(tmp_path):
    f = feature(min_count=2)
    days = [pa.array(["b", "a", "c", "a", "b"]), pa.array(["d", "c", "d"])]
    for root in (tmp_path / "one", tmp_path / "two"):
        for day, values in zip((DAY1, DAY2), days, strict=True):
            update_vocabulary(root, f, day, values)
    one, two = read_manifest(tmp_path / "one", "user_id"), read_manifest(tmp_path / "two", "user_id")
    assert [v["sha256"] for v in one["versions"]] == [v["sha256"] for v in two["versions"]]


def test_missing_version_names_the_file(tmp_path):
    with pytest.raises(StageError, match="v000007.parquet"):
        load_vocabulary(tmp_path, feature(), 7)
