"""Rows joined to snapshots by position: the same values as a left join, encoded once."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from features.errors import StageError
from features.snapshots import CodedColumn, join_snapshots

ROWS = pl.DataFrame({"user_id": ["u2", "u9", None, "u1", "u2"], "imps": [1, 1, 1, 1, 1]})
USERS = pl.DataFrame({"user_id": ["u1", "u2", "u3"], "city": ["paris", None, "rome"], "age": [31, 42, 53]})


def joined(users: pl.DataFrame = USERS):
    return join_snapshots(ROWS, {"city": "users", "age": "users"}, {"users": users}, Path("wh"), dt.date(2026, 5, 1))


def test_columns_equal_a_left_join_and_codes_come_from_the_snapshot_rows():
    rows = joined()
    expected = ROWS.join(USERS, on="user_id", how="left", maintain_order="left")
    for column in ("city", "age", "user_id"):
        assert rows.column(column).to_list() == expected[column].to_list()
        coded = rows.coded(column)
        assert coded.values_at(np.arange(rows.height)).to_list() == expected[column].to_list()
    # The snapshot column is encoded per snapshot row: its distinct values are the
    # snapshot's, not only those the rows reach (u3's rome is among them).
    assert sorted(rows.coded("city").values.to_pylist()) == ["paris", "rome"]
    # a key missing from the snapshot (u9) and a null key join to the all-null row
    assert rows.snapshot_row["users"].tolist() == [1, 3, 3, 0, 1]


def test_coded_column_null_code_and_hashes():
    coded = CodedColumn.encode(pl.Series(["b", None, "a", "b"]))
    assert coded.null_code == 2 and coded.codes.tolist() == [0, 2, 1, 0]
    assert len(coded.hashes) == 3 and coded.hashes[0] != coded.hashes[2]


def test_a_snapshot_with_a_key_twice_is_refused_by_name():
    twice = pl.concat([USERS, USERS.head(1)])
    with pytest.raises(StageError, match=r"wh/validated/users/date=2026-05-01 holds some user_id more than once"):
        joined(twice)
