"""`validate`: raw contract v1 checks on hand-built Parquet partitions.

A clean two-day warehouse is written with pyarrow; each test breaks it on purpose and
checks the exact counts, the quarantine and report files, and the error messages.
"""

from __future__ import annotations

import datetime as dt
import json
import re
import shutil
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from features.catalog import (
    quarantine_dir,
    raw_dir,
    report_path,
    scan_validated,
    validated_dir,
)
from features.contract import TS
from features.errors import DataContractError
from features.validate import validate_day
from pipeline.cli import main
from pipeline.config import load_config

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo.toml"
D_2, D0, D1 = dt.date(2026, 10, 31), dt.date(2026, 11, 1), dt.date(2026, 11, 2)
IMPS_PER_DAY = 20
CLICKED = (0, 4, 8, 12, 16)  # impressions clicked each day
CONVERTED = (0, 8)  # clicked impressions that convert the same day

SCHEMAS = {
    "impressions": pa.schema(
        [
            ("impression_id", pa.string()),
            ("ts", TS),
            ("user_id", pa.string()),
            ("item_id", pa.string()),
            ("device", pa.string()),
            ("slot", pa.int64()),
        ]
    ),
    "clicks": pa.schema([("impression_id", pa.string()), ("ts", TS)]),
    "conversions": pa.schema([("impression_id", pa.string()), ("ts", TS), ("value", pa.float64())]),
    "users": pa.schema(
        [
            ("user_id", pa.string()),
            ("age_bucket", pa.string()),
            ("gender", pa.string()),
            ("city", pa.string()),
            ("interests", pa.list_(pa.string())),
        ]
    ),
    "items": pa.schema(
        [
            ("item_id", pa.string()),
            ("category_id", pa.string()),
            ("brand_id", pa.string()),
            ("shop_id", pa.string()),
            ("price", pa.float64()),
        ]
    ),
}


def at(day: dt.date, minutes: int) -> dt.datetime:
    return dt.datetime.combine(day, dt.time(), tzinfo=dt.UTC) + dt.timedelta(minutes=minutes)


def imp_id(day: dt.date, k: int) -> str:
    return f"{day:%m%d}-i{k:02d}"


def imp_ts(day: dt.date, k: int) -> dt.datetime:
    return at(day, 10 + 75 * k)  # k = 19 is 23:55, so its click can land on the next day


def impression(day: dt.date, k: int, **over) -> dict:
    row = {
        "impression_id": imp_id(day, k),
        "ts": imp_ts(day, k),
        "user_id": f"u{k % 10}",
        "item_id": f"it{k % 8}",
        "device": ("ios", "android")[k % 2],
        "slot": k % 5,
    }
    return {**row, **over}


def write(
    warehouse: Path,
    table: str,
    rows: list[dict],
    day: dt.date | None = None,
    name: str = "part-0.parquet",
    schema: pa.Schema | None = None,
) -> Path:
    path = raw_dir(warehouse, table, day) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=schema or SCHEMAS[table]), path)
    return path


def clean_day(warehouse: Path, day: dt.date) -> None:
    prev = day - dt.timedelta(days=1)
    write(warehouse, "impressions", [impression(day, k) for k in range(IMPS_PER_DAY)], day)
    clicks = [{"impression_id": imp_id(day, k), "ts": imp_ts(day, k) + dt.timedelta(minutes=2)} for k in CLICKED]
    convs = [
        {"impression_id": imp_id(day, k), "ts": imp_ts(day, k) + dt.timedelta(hours=1), "value": 9.5} for k in CONVERTED
    ]
    if day == D1:  # the previous day's last impression clicked after midnight; a late conversion
        clicks.append({"impression_id": imp_id(prev, 19), "ts": at(day, 10)})
        convs.append({"impression_id": imp_id(prev, 16), "ts": at(day, 30), "value": None})
    write(warehouse, "clicks", clicks, day)
    write(warehouse, "conversions", convs, day)


@pytest.fixture
def warehouse(tmp_path: Path) -> Path:
    wh = tmp_path / "wh"
    clean_day(wh, D0)
    clean_day(wh, D1)
    write(
        wh,
        "users",
        [
            {
                "user_id": f"u{i}",
                "age_bucket": f"a{i % 4}",
                "gender": "fm"[i % 2],
                "city": f"c{i % 3}",
                "interests": [f"t{i % 5}", f"t{(i + 1) % 5}"],
            }
            for i in range(10)
        ],
    )
    write(
        wh,
        "items",
        [
            {
                "item_id": f"it{i}",
                "category_id": f"cat{i % 3}",
                "brand_id": f"b{i % 4}",
                "shop_id": f"s{i % 2}",
                "price": 10.0 + i,
            }
            for i in range(8)
        ],
    )
    return wh


@pytest.fixture
def cfg():
    return load_config(CONFIG)


@pytest.fixture
def lenient_cfg():
    """The demo config with a bad-row threshold that a few dozen rows with faults pass."""
    return load_config(CONFIG, {"validate": {"max_bad_row_share": 0.9}})


def counts(report) -> dict[str, tuple[int, int, int]]:
    return {n: (t.input_rows, t.valid_rows, t.quarantined_rows) for n, t in report.tables.items()}


def test_clean_day_is_all_valid_and_readable_downstream(warehouse, cfg):
    report = validate_day(cfg, warehouse, D1)
    assert counts(report) == {
        "impressions": (20, 20, 0),
        "clicks": (6, 6, 0),
        "conversions": (3, 3, 0),
        "users": (10, 10, 0),
        "items": (8, 8, 0),
    }
    assert report.passed and all(not t.reasons for t in report.tables.values())
    clicks = scan_validated(warehouse, "clicks", D1).collect()
    assert imp_id(D0, 19) in clicks["impression_id"].to_list()  # impression on the previous day
    convs = scan_validated(warehouse, "conversions", D1).collect()
    assert imp_id(D0, 16) in convs["impression_id"].to_list()  # click on the previous day
    assert convs["value"].null_count() == 1
    imps = pq.read_table(validated_dir(warehouse, "impressions", D1) / "part-0.parquet")
    assert imps.schema.field("ts").type == TS and imps.schema.field("user_id").type == pa.string()
    assert set(imps.column_names) == {"impression_id", "ts", "user_id", "item_id", "device", "slot"}
    users = scan_validated(warehouse, "users", D1).collect()
    assert users.height == 10 and users["interests"].to_list()[0] == ["t0", "t1"]
    # no bad rows: an empty but typed quarantine file
    quarantined = pq.read_table(quarantine_dir(warehouse, "clicks", D1) / "part-0.parquet")
    assert quarantined.num_rows == 0 and quarantined.column_names == ["impression_id", "ts", "reason"]
    assert "validate 2026-11-02: ok" in report.describe()


def test_first_day_without_earlier_partitions(warehouse, cfg):
    assert counts(validate_day(cfg, warehouse, D0))["clicks"] == (5, 5, 0)
    assert counts(validate_day(cfg, warehouse, D0))["conversions"] == (2, 2, 0)


def test_row_faults_are_quarantined_with_exact_counts(warehouse, lenient_cfg):
    write(
        warehouse,
        "impressions",
        [
            impression(D1, 0, impression_id=None),  # null_key
            impression(D1, 3, ts=imp_ts(D1, 3) + dt.timedelta(seconds=1)),  # later copy: duplicate_key
            impression(D1, 5, ts=at(D1, 0)),  # earlier copy: kept, the part-0 original is the duplicate
            impression(D1, 0, impression_id="x-outside", ts=at(D0, 600)),  # ts_outside_partition
            impression(D1, 0, impression_id="x-midnight", ts=at(D1 + dt.timedelta(days=1), 0)),  # end is exclusive
            impression(D1, 0, impression_id="x-start", ts=at(D1, 0)),  # start is inclusive: valid
            impression(D1, 0, impression_id="x-nullts", ts=None),  # null_ts
            impression(D1, 0, impression_id="x-nulluser", user_id=None),  # null_user_id
        ],
        D1,
        "part-1.parquet",
    )
    write(
        warehouse,
        "clicks",
        [
            {"impression_id": "nope", "ts": at(D1, 100)},  # unknown_impression
            {"impression_id": "x-outside", "ts": at(D1, 100)},  # its impression is quarantined
            {"impression_id": imp_id(D1, 4), "ts": imp_ts(D1, 4) + dt.timedelta(minutes=5)},  # duplicate_key
            {"impression_id": None, "ts": at(D1, 100)},  # null_key
            {"impression_id": "x-start", "ts": at(D1, 3)},  # valid
            {"impression_id": imp_id(D_2, 0), "ts": at(D1, 1)},  # impression too old: unknown
        ],
        D1,
        "part-1.parquet",
    )
    write(warehouse, "clicks", [{"impression_id": "ghost", "ts": at(D0, 50)}], D0, "part-1.parquet")
    # two days back: beyond the click lookback (1 day), within the conversion lookback (2 days)
    write(warehouse, "impressions", [impression(D_2, 0)], D_2)
    write(warehouse, "clicks", [{"impression_id": imp_id(D_2, 0), "ts": imp_ts(D_2, 0) + dt.timedelta(minutes=1)}], D_2)
    write(
        warehouse,
        "conversions",
        [
            {"impression_id": imp_id(D1, 1), "ts": at(D1, 500), "value": 1.0},  # impression never clicked
            {"impression_id": "nope", "ts": at(D1, 500), "value": 1.0},  # its click is quarantined
            {"impression_id": "ghost", "ts": at(D1, 500), "value": 1.0},  # its D0 click is invalid on D0
            {"impression_id": imp_id(D1, 4), "ts": at(D0, 500), "value": 1.0},  # ts_outside_partition
            {"impression_id": imp_id(D1, 0), "ts": at(D1, 900), "value": 2.0},  # duplicate_key
            {"impression_id": imp_id(D_2, 0), "ts": at(D1, 5), "value": 3.0},  # click two days back: valid
        ],
        D1,
        "part-1.parquet",
    )
    write(warehouse, "users", [{"user_id": None}, {"user_id": "u0", "city": "elsewhere"}], name="part-1.parquet")
    write(warehouse, "items", [{"item_id": "it1", "price": 1.0}], name="part-1.parquet")

    report = validate_day(lenient_cfg, warehouse, D1)
    assert counts(report) == {
        "impressions": (28, 21, 7),
        "clicks": (12, 7, 5),
        "conversions": (9, 4, 5),
        "users": (12, 10, 2),
        "items": (9, 8, 1),
    }
    reasons = {n: t.reasons for n, t in report.tables.items()}
    assert reasons == {
        "impressions": {"duplicate_key": 2, "ts_outside_partition": 2, "null_key": 1, "null_ts": 1, "null_user_id": 1},
        "clicks": {"unknown_impression": 3, "duplicate_key": 1, "null_key": 1},
        "conversions": {"conversion_without_click": 3, "duplicate_key": 1, "ts_outside_partition": 1},
        "users": {"duplicate_key": 1, "null_key": 1},
        "items": {"duplicate_key": 1},
    }

    valid_imps = scan_validated(warehouse, "impressions", D1).collect()
    assert valid_imps["impression_id"].is_unique().all() and "x-start" in valid_imps["impression_id"].to_list()
    kept_5 = valid_imps.filter(pl.col("impression_id") == imp_id(D1, 5))["ts"].to_list()
    assert kept_5 == [at(D1, 0)]  # the earliest occurrence wins, whatever the file order
    bad_imps = pl.read_parquet(quarantine_dir(warehouse, "impressions", D1) / "part-0.parquet")
    dup_5 = bad_imps.filter(pl.col("impression_id") == imp_id(D1, 5))
    assert dup_5["reason"].to_list() == ["duplicate_key"] and dup_5["ts"].to_list() == [imp_ts(D1, 5)]
    assert bad_imps.columns == ["impression_id", "ts", "user_id", "item_id", "device", "slot", "reason"]
    bad_users = pl.read_parquet(quarantine_dir(warehouse, "users", D1) / "part-0.parquet")
    assert bad_users.filter(pl.col("reason") == "duplicate_key")["city"].to_list() == ["elsewhere"]  # first file wins

    for name, table in report.tables.items():
        valid = scan_validated(warehouse, name, D1).collect().height
        bad = pq.read_metadata(quarantine_dir(warehouse, name, D1) / "part-0.parquet").num_rows
        assert valid + bad == table.input_rows

    saved = json.loads(report_path(warehouse, "validate", D1).read_text())
    assert saved["status"] == "ok" and saved["date"] == "2026-11-02"
    assert saved["thresholds"]["max_bad_row_share"] == 0.9
    assert saved["thresholds"]["click_lookback_days"] == 1 and saved["thresholds"]["conversion_lookback_days"] == 2
    assert saved["tables"]["clicks"]["reasons"] == reasons["clicks"]
    assert saved["tables"]["impressions"]["input_rows"] == 28 and saved["tables"]["impressions"]["valid_rows"] == 21
    assert [Path(f).name for f in saved["tables"]["clicks"]["files"]] == ["part-0.parquet", "part-1.parquet"]


def test_rerun_replaces_outputs(warehouse, lenient_cfg):
    extra = write(warehouse, "clicks", [{"impression_id": "nope", "ts": at(D1, 100)}], D1, "part-1.parquet")
    first = validate_day(lenient_cfg, warehouse, D1)
    again = validate_day(lenient_cfg, warehouse, D1)
    assert again.to_dict()["tables"]["clicks"]["reasons"] == first.to_dict()["tables"]["clicks"]["reasons"]
    assert pl.read_parquet(quarantine_dir(warehouse, "clicks", D1)).height == 1
    extra.unlink()
    validate_day(lenient_cfg, warehouse, D1)
    assert pl.read_parquet(quarantine_dir(warehouse, "clicks", D1)).height == 0
    assert scan_validated(warehouse, "clicks", D1).collect().height == 6
    assert len(list(validated_dir(warehouse, "clicks", D1).iterdir())) == 1


def test_representation_variants_are_accepted(warehouse, cfg):
    schema = SCHEMAS["impressions"]
    variants = (
        schema.set(0, pa.field("impression_id", pa.large_string()))
        .set(1, pa.field("ts", pa.timestamp("ns", tz="UTC")))
        .set(2, pa.field("user_id", pa.string_view()))
    )
    write(warehouse, "impressions", [impression(D1, k) for k in range(IMPS_PER_DAY)], D1, schema=variants)
    table = pq.read_table(raw_dir(warehouse, "clicks", D1))
    table = table.set_column(1, "ts", table.column("ts").cast(pa.timestamp("s", tz="UTC")))
    table = table.set_column(0, "impression_id", table.column("impression_id").dictionary_encode())
    shutil.rmtree(raw_dir(warehouse, "clicks", D1))
    raw_dir(warehouse, "clicks", D1).mkdir()
    pq.write_table(table, raw_dir(warehouse, "clicks", D1) / "part-0.parquet")

    report = validate_day(cfg, warehouse, D1)
    assert counts(report)["impressions"] == (20, 20, 0) and counts(report)["clicks"] == (6, 6, 0)
    out = pq.read_schema(validated_dir(warehouse, "impressions", D1) / "part-0.parquet")
    assert out.field("impression_id").type == pa.string() and out.field("ts").type == TS


def test_empty_click_and_conversion_partitions_are_fine(warehouse, cfg):
    write(warehouse, "clicks", [], D1)
    write(warehouse, "conversions", [], D1)
    report = validate_day(cfg, warehouse, D1)
    assert counts(report)["clicks"] == (0, 0, 0) and counts(report)["conversions"] == (0, 0, 0)
    assert scan_validated(warehouse, "clicks", D1).collect().height == 0


def _drop_column(wh: Path) -> tuple[Path, str]:
    path = raw_dir(wh, "impressions", D1) / "part-0.parquet"
    pq.write_table(pq.read_table(path).drop_columns(["device"]), path)
    return path, "device"


def _retype(table: str, column: str, dtype: pa.DataType):
    def break_it(wh: Path) -> tuple[Path, str]:
        path = raw_dir(wh, table, D1) / "part-0.parquet"
        data = pq.read_table(path)
        i = data.schema.get_field_index(column)
        values = data.column(column)
        values = pa.array(range(len(values)), dtype) if pa.types.is_integer(dtype) else values.cast(dtype)
        pq.write_table(data.set_column(i, column, values), path)
        return path, column

    return break_it


def _write_bytes(content: bytes | None):
    def break_it(wh: Path) -> tuple[Path, None]:
        path = raw_dir(wh, "clicks", D1) / "part-1.parquet"
        good = (raw_dir(wh, "clicks", D1) / "part-0.parquet").read_bytes()
        path.write_bytes(good[: len(good) // 2] if content is None else content)
        return path, None

    return break_it


def _remove(table: str):
    def break_it(wh: Path) -> tuple[Path, None]:
        folder = raw_dir(wh, table, D1)
        shutil.rmtree(folder)
        return folder, None

    return break_it


def _empty_folder(wh: Path) -> tuple[Path, None]:
    folder = raw_dir(wh, "conversions", D1)
    for f in folder.iterdir():
        f.unlink()
    return folder, None


def _no_impressions(wh: Path) -> tuple[Path, None]:
    return write(wh, "impressions", [], D1), None


def _stray(name: str, folder: bool = False):
    """A data file the contract does not read: in a sub-folder, or under a name it skips."""

    def break_it(wh: Path) -> tuple[Path, str]:
        partition = raw_dir(wh, "impressions", D1)
        path = partition / name / "part-0.parquet" if folder else partition / name
        path.parent.mkdir(exist_ok=True)
        pq.write_table(pq.read_table(partition / "part-0.parquet"), path)
        return partition, name

    return break_it


def _interests_as_text(wh: Path) -> tuple[Path, str]:
    path = raw_dir(wh, "users") / "part-0.parquet"
    data = pq.read_table(path)
    text = pa.array(["|".join(v) for v in data.column("interests").to_pylist()])
    pq.write_table(data.set_column(data.schema.get_field_index("interests"), "interests", text), path)
    return path, "interests"


HARD_FAULTS = {
    "missing partition": _remove("clicks"),
    "partition without files": _empty_folder,
    "missing snapshot": _remove("items"),
    "missing column": _drop_column,
    "int where a string is required": _retype("impressions", "user_id", pa.int64()),
    "naive timestamp": _retype("clicks", "ts", pa.timestamp("us")),
    "non-UTC timestamp": _retype("clicks", "ts", pa.timestamp("us", tz="Europe/Berlin")),
    "optional value of the wrong type": _retype("conversions", "value", pa.string()),
    "not a Parquet file": _write_bytes(b"impression_id,ts\nabc,2026-11-02\n"),
    "empty 0-byte file": _write_bytes(b""),
    "truncated file": _write_bytes(None),
    "impressions without rows": _no_impressions,
    # the feature spec's attribute and context columns: of a type their features read
    "numeric attribute as text": _retype("items", "price", pa.string()),
    "id context column as float": _retype("impressions", "slot", pa.float64()),
    "list attribute as text": _interests_as_text,
    # rows the contract would not read are not skipped: the day stops, naming them
    "rows in an hour=23 sub-folder": _stray("hour=23", folder=True),
    "rows in an underscore file": _stray("_late.parquet"),
    "rows in a hidden file": _stray(".late.parquet"),
    "rows in a file of another type": _stray("part-1.parq"),
}


@pytest.mark.parametrize("fault", sorted(HARD_FAULTS))
def test_hard_faults_raise_naming_file_and_column(warehouse, cfg, fault):
    validate_day(cfg, warehouse, D1)  # an earlier good run: its outputs must not survive the failure
    where, column = HARD_FAULTS[fault](warehouse)
    with pytest.raises(DataContractError) as err:
        validate_day(cfg, warehouse, D1)
    assert str(where) in str(err.value)
    if column:
        assert column in str(err.value)
    assert not validated_dir(warehouse, "impressions", D1).exists()
    saved = json.loads(report_path(warehouse, "validate", D1).read_text())
    assert saved["status"] == "error" and str(where) in saved["error"]


def test_upper_case_suffix_is_read_and_writer_markers_are_passed_over(warehouse, cfg):
    extra = [impression(D1, k, impression_id=f"late-{k}") for k in range(3)]
    write(warehouse, "impressions", extra, D1, "part-1.PARQUET")
    for marker in ("_SUCCESS", "_metadata", ".part-0.parquet.crc"):
        (raw_dir(warehouse, "impressions", D1) / marker).write_bytes(b"")
    report = validate_day(cfg, warehouse, D1)
    assert counts(report)["impressions"] == (23, 23, 0)  # every row of the folder, counted
    assert [Path(f).name for f in report.tables["impressions"].files] == ["part-0.parquet", "part-1.PARQUET"]


def test_integer_ids_and_float_numbers_are_accepted(warehouse, cfg):
    _retype("items", "category_id", pa.int32())(warehouse)  # a sparse id may be an integer
    _retype("items", "price", pa.float32())(warehouse)
    assert counts(validate_day(cfg, warehouse, D1))["items"] == (8, 8, 0)


def test_a_few_bad_rows_of_a_tiny_table_do_not_fail_the_day(warehouse, cfg):
    # 1 bad row of 21 is above max_bad_row_share (1%) but below min_bad_rows (10): quarantined, counted, day passes
    write(warehouse, "impressions", [impression(D1, 0, impression_id=None)], D1, "part-1.parquet")
    report = validate_day(cfg, warehouse, D1)
    assert report.passed and counts(report)["impressions"] == (21, 20, 1)
    assert pl.read_parquet(quarantine_dir(warehouse, "impressions", D1))["reason"].to_list() == ["null_key"]
    assert scan_validated(warehouse, "impressions", D1).collect().height == 20
    strict = load_config(CONFIG, {"validate": {"min_bad_rows": 1}})
    with pytest.raises(DataContractError, match="min_bad_rows 1"):
        validate_day(strict, warehouse, D1)


def test_unreadable_earlier_partition_that_a_lookup_needs(warehouse, cfg):
    broken = raw_dir(warehouse, "clicks", D0) / "part-1.parquet"
    broken.write_bytes(b"not parquet")
    with pytest.raises(DataContractError, match=re.escape(str(broken))):
        validate_day(cfg, warehouse, D1)


def test_bad_share_above_threshold_writes_quarantine_not_validated(warehouse):
    cfg = load_config(CONFIG, {"validate": {"min_bad_rows": 1}})  # the share rule alone, on a tiny table
    validate_day(cfg, warehouse, D1)
    path = write(warehouse, "impressions", [impression(D1, 0, impression_id=None)], D1, "part-1.parquet")
    with pytest.raises(DataContractError) as err:
        validate_day(cfg, warehouse, D1)
    message = str(err.value)
    assert "impressions" in message and "null_key 1" in message and str(path) in message and "1.00%" in message
    assert pl.read_parquet(quarantine_dir(warehouse, "impressions", D1))["reason"].to_list() == ["null_key"]
    saved = json.loads(report_path(warehouse, "validate", D1).read_text())
    assert saved["status"] == "failed" and saved["failed_tables"] == ["impressions"]
    assert saved["tables"]["impressions"]["quarantined_rows"] == 1
    for table in ("impressions", "clicks", "users"):
        assert not validated_dir(warehouse, table, D1).exists()
    with pytest.raises(DataContractError, match="run `funnelrank validate"):
        scan_validated(warehouse, "impressions", D1)


def test_cli_exit_codes(warehouse, capsys):
    args = ["validate", "--config", str(CONFIG), "--warehouse", str(warehouse), "--date", "2026-11-02"]
    assert main(args) == 0
    assert "validate 2026-11-02: ok" in capsys.readouterr().out
    path, column = _drop_column(warehouse)
    assert main(args) == 4
    err = capsys.readouterr().err
    assert str(path) in err and column in err and err.startswith("funnelrank validate:")
