"""``funnelrank validate --date D``: check a day's raw partitions against contract v1.

Two kinds of trouble, handled differently:

* a partition or file that cannot be used at all (missing, unreadable, a required column
  absent or of the wrong type, impressions with no rows) raises DataContractError naming
  the file and the column, and leaves no validated output for the day;
* rows that break the contract (null keys, timestamps outside the partition's UTC day,
  duplicate keys, clicks on unknown impressions, conversions without a click) are moved
  to quarantine with a ``reason`` code and counted. When a table's share of such rows is
  above ``validate.max_bad_row_share`` (and they are at least ``validate.min_bad_rows``,
  so one bad row of a tiny table does not fail the night) the quarantine and the report
  are still written (so the cause can be read), but not the validated rows, and the stage
  fails.

Types are checked strictly but representation is tolerated: string, large_string and
string_view are all strings; a UTC timestamp of any unit is normalised to
``timestamp[us, UTC]``. Columns other than the contract's (required + optional) ones are
not carried into the outputs.

Reference checks look back over earlier days' *raw* partitions (the impressions a click
may point at, the clicks a conversion may follow) and apply the same row checks to them,
so a day's result never depends on the order in which days were validated. Earlier
partitions that do not exist are the start of history, not an error.
"""

from __future__ import annotations

import datetime as dt
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from features.catalog import quarantine_dir, raw_dir, report_path, validated_dir
from features.config import DataConfig, FeaturesConfig
from features.contract import (
    DAILY_TABLES,
    KEYS,
    OPTIONAL,
    REQUIRED,
    SNAPSHOT_TABLES,
    TS,
    day_str,
    in_day,
    required_columns,
)
from features.errors import DataContractError, StageError
from features.io import atomic_write_json, write_parquet_dir

TABLES = (*DAILY_TABLES, *SNAPSHOT_TABLES)
UTC_ZONES = frozenset({"UTC", "Etc/UTC", "+00:00"})
REASON = "reason"
ROW = "_row"  # input order (file order, then row order): the tie-breaker for duplicates
# Files Spark / Hadoop / Parquet writers leave in a partition that hold no rows: a job's
# success flag and the Parquet summary files (footers of the data files, no data pages).
WRITER_MARKERS = ("_SUCCESS", "_metadata", "_common_metadata")

# A row of `table` must point at a valid key of `parent` from the same day or a few days before.
REFERENCES: dict[str, tuple[str, str]] = {
    "clicks": ("impressions", "unknown_impression"),
    "conversions": ("clicks", "conversion_without_click"),
}


@dataclass
class TableReport:
    """What validation did to one table's rows for one day."""

    table: str
    files: list[str]
    input_rows: int
    valid_rows: int
    quarantined_rows: int
    reasons: dict[str, int]
    seconds: float

    @property
    def bad_row_share(self) -> float:
        return self.quarantined_rows / self.input_rows if self.input_rows else 0.0

    def to_dict(self) -> dict:
        return {
            "files": self.files,
            "input_rows": self.input_rows,
            "valid_rows": self.valid_rows,
            "quarantined_rows": self.quarantined_rows,
            "bad_row_share": self.bad_row_share,
            "reasons": self.reasons,
            "seconds": round(self.seconds, 4),
        }


@dataclass
class ValidationReport:
    day: dt.date
    tables: dict[str, TableReport]
    thresholds: dict[str, float | int]
    seconds: float = 0.0
    failed_tables: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.failed_tables

    def to_dict(self) -> dict:
        return {
            "stage": "validate",
            "date": day_str(self.day),
            "status": "ok" if self.passed else "failed",
            "failed_tables": self.failed_tables,
            "thresholds": self.thresholds,
            "seconds": round(self.seconds, 4),
            "tables": {name: t.to_dict() for name, t in self.tables.items()},
        }

    def describe(self) -> str:
        status = "ok" if self.passed else f"FAILED ({', '.join(self.failed_tables)})"
        lines = [
            f"validate {day_str(self.day)}: {status} in {self.seconds:.2f} s "
            f"(max bad-row share {self.thresholds['max_bad_row_share']:.2%})"
        ]
        for t in self.tables.values():
            reasons = ", ".join(f"{r} {n:,}" for r, n in t.reasons.items())
            lines.append(
                f"  {t.table:<12} {t.input_rows:>10,} rows in {len(t.files)} file(s): {t.valid_rows:,} valid, "
                f"{t.quarantined_rows:,} quarantined ({t.bad_row_share:.2%})" + (f": {reasons}" if reasons else "")
            )
        return "\n".join(lines)


@dataclass
class CheckedTable:
    valid: pl.DataFrame  # contract columns
    quarantined: pl.DataFrame  # contract columns + reason
    report: TableReport


def validate_day(cfg: DataConfig, warehouse: Path, day: dt.date) -> ValidationReport:
    """Validate raw impressions, clicks and conversions of ``day`` and the user/item snapshots.

    Writes validated rows, quarantined rows (always a file, empty when no row is bad) and
    a JSON report; a rerun replaces all three. Raises DataContractError on a hard failure
    or a bad-row share above the threshold.
    """
    warehouse = Path(warehouse)
    started = time.perf_counter()
    thresholds = {
        "max_bad_row_share": cfg.validate_.max_bad_row_share,
        "min_bad_rows": cfg.validate_.min_bad_rows,
        "click_window_minutes": cfg.contract.click_window_minutes,
        "attribution_window_hours": cfg.contract.attribution_window_hours,
        "click_lookback_days": cfg.contract.click_lag_days,
        "conversion_lookback_days": cfg.contract.maturity_lag_days,
    }
    lookback = {"clicks": thresholds["click_lookback_days"], "conversions": thresholds["conversion_lookback_days"]}
    try:
        checked = _check_all_tables(cfg, warehouse, day, lookback)
    except DataContractError as err:
        # The day's earlier outputs describe other raw data: nothing downstream may use them.
        _remove_outputs(warehouse, day)
        atomic_write_json(
            report_path(warehouse, "validate", day),
            {"stage": "validate", "date": day_str(day), "status": "error", "error": str(err), "thresholds": thresholds},
        )
        raise

    report = ValidationReport(day, {name: c.report for name, c in checked.items()}, thresholds)
    report.failed_tables = [
        n
        for n, t in report.tables.items()
        if t.bad_row_share > thresholds["max_bad_row_share"] and t.quarantined_rows >= thresholds["min_bad_rows"]
    ]
    for name, c in checked.items():
        write_parquet_dir(quarantine_dir(warehouse, name, day), _to_arrow(c.quarantined, name))
    if report.passed:
        for name, c in checked.items():
            write_parquet_dir(validated_dir(warehouse, name, day), _to_arrow(c.valid, name))
    else:
        for name in TABLES:
            shutil.rmtree(validated_dir(warehouse, name, day), ignore_errors=True)
    report.seconds = time.perf_counter() - started
    atomic_write_json(report_path(warehouse, "validate", day), report.to_dict())
    if not report.passed:
        raise DataContractError(_share_message(report, warehouse))
    return report


def _check_all_tables(
    cfg: DataConfig, warehouse: Path, day: dt.date, lookback: dict[str, int]
) -> dict[str, CheckedTable]:
    """Read and check every table of ``day``, splitting its rows into valid and quarantined."""
    keys = _ValidKeys(warehouse, lookback)
    checked: dict[str, CheckedTable] = {}
    for name in TABLES:
        started = time.perf_counter()
        files = _partition_files(warehouse, name, day)
        if not files:
            folder = raw_dir(warehouse, name, day)
            why = "folder does not exist" if not folder.is_dir() else "no .parquet files in it"
            raise DataContractError(f"missing required {name} partition {folder}: {why}")
        frame = _read_partition(name, files, required_columns(name, cfg.features), _spec_needs(cfg.features, name))
        if name == "impressions" and frame.height == 0:
            raise DataContractError(f"impressions partition {files[0].parent} has no rows (files: {_names(files)})")
        frame = _find_faults(frame, name, day, keys)
        if name in DAILY_TABLES:
            keys.remember(name, day, frame)
        frame = frame.drop(ROW)
        valid = frame.filter(pl.col(REASON).is_null()).drop(REASON)
        quarantined = frame.filter(pl.col(REASON).is_not_null())
        counts = quarantined.get_column(REASON).value_counts()
        reasons = dict(
            sorted(
                zip(counts[REASON].to_list(), counts["count"].to_list(), strict=True), key=lambda rc: (-rc[1], rc[0])
            )
        )
        # Every input row must land in exactly one output.
        if valid.height + quarantined.height != frame.height or sum(reasons.values()) != quarantined.height:
            raise StageError(
                f"validate {name}: {valid.height} valid + {quarantined.height} quarantined != {frame.height} input rows"
            )
        report = TableReport(
            name,
            [str(f) for f in files],
            frame.height,
            valid.height,
            quarantined.height,
            reasons,
            time.perf_counter() - started,
        )
        checked[name] = CheckedTable(valid, quarantined, report)
    return checked


class _ValidKeys:
    """Keys of valid rows of a daily table on a day, read from raw partitions on demand.

    The day being validated is remembered from the main pass; earlier days are read (key
    columns only) and checked with the same rules, recursively for their own references.
    """

    def __init__(self, warehouse: Path, lookback: dict[str, int]) -> None:
        self.warehouse = warehouse
        self.lookback = lookback
        self._known: dict[tuple[str, dt.date], pl.Series] = {}

    def remember(self, table: str, day: dt.date, checked: pl.DataFrame) -> None:
        self._known[(table, day)] = checked.filter(pl.col(REASON).is_null()).get_column(KEYS[table])

    def of(self, table: str, day: dt.date) -> pl.Series:
        if (table, day) not in self._known:
            files = _partition_files(self.warehouse, table, day)
            if files:
                self.remember(
                    table, day, _find_faults(_read_partition(table, files, list(REQUIRED[table])), table, day, self)
                )
            else:  # before the start of history
                self._known[(table, day)] = pl.Series(KEYS[table], [], dtype=pl.String)
        return self._known[(table, day)]

    def window(self, table: str, day: dt.date, days_back: int) -> pl.Series:
        """Valid keys of ``table`` on days [day - days_back, day]."""
        return pl.concat([self.of(table, day - dt.timedelta(days=k)) for k in range(days_back + 1)])


def _partition_files(warehouse: Path, table: str, day: dt.date) -> list[Path]:
    """The data files of a raw partition: every ``*.parquet`` (any case) directly in it.

    Anything else that could hold rows stops the day, named: a sub-folder (``hour=23/``),
    a file of another type, a hidden or ``_``-prefixed Parquet file. Only the markers that
    writers leave beside their data and that hold no rows of their own are passed over
    (``WRITER_MARKERS``, Hadoop's ``.<file>.crc`` checksums), so the report counts every
    row of the folder."""
    folder = raw_dir(warehouse, table, day)
    if not folder.is_dir():
        return []
    data, unknown = [], []
    for p in sorted(folder.iterdir()):
        if p.is_file() and p.suffix.lower() == ".parquet" and not p.name.startswith((".", "_")):
            data.append(p)
        elif not (p.is_file() and (p.name in WRITER_MARKERS or (p.name.startswith(".") and p.name.endswith(".crc")))):
            unknown.append(f"{p.name}/ (a folder)" if p.is_dir() else p.name)
    if unknown:
        raise DataContractError(
            f"{table}: {folder} holds {', '.join(unknown)}, which validate does not read: the contract's data files "
            f"are *.parquet directly in the partition folder (besides them only the writer markers "
            f"{', '.join(WRITER_MARKERS)} and .*.crc checksums); move their rows into such files, or remove them"
        )
    return data


def _names(files: list[Path]) -> str:
    shown = ", ".join(str(f) for f in files[:3])
    return shown + (f" and {len(files) - 3} more" if len(files) > 3 else "")


def _read_partition(
    table: str, files: list[Path], columns: list[str], spec_needs: dict[str, list[tuple[str, str]]] | None = None
) -> pl.DataFrame:
    """Read ``columns`` (+ the optional contract columns) of every file, types normalised;
    the feature spec's columns (``spec_needs``) must have types their features can read."""
    parts = [pl.from_arrow(_read_file(path, table, columns, spec_needs or {})) for path in files]
    try:
        frame = pl.concat(parts, how="vertical_relaxed")
    except pl.exceptions.PolarsError as err:
        raise DataContractError(f"{table}: files {_names(files)} disagree on column types: {err}") from None
    return frame.with_row_index(ROW)


def _read_file(path: Path, table: str, columns: list[str], spec_needs: dict[str, list[tuple[str, str]]]) -> pa.Table:
    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as err:
        raise DataContractError(f"{table}: cannot read {path} as Parquet: {err}") from None
    schema = parquet.schema_arrow
    missing = [c for c in columns if c not in schema.names]
    if missing:
        raise DataContractError(
            f"{table}: {path} lacks required column(s) {', '.join(missing)} (it has: {', '.join(schema.names)})"
        )
    optional = OPTIONAL.get(table, {})
    read = [*columns, *(c for c in optional if c in schema.names and c not in columns)]
    try:
        data = parquet.read(columns=read)
    except (pa.ArrowException, OSError) as err:
        raise DataContractError(f"{table}: cannot read {path} as Parquet: {err}") from None
    expected = {**REQUIRED[table], **optional}
    for column, needs in spec_needs.items():
        if column not in expected:
            _check_spec_type(schema.field(column).type, needs, table, path, column)
    arrays = {c: _normalise(data.column(c), expected[c], path, c) if c in expected else data.column(c) for c in read}
    for c, dtype in optional.items():
        if c not in arrays:  # absent optional column: null everywhere, so every output has it
            arrays[c] = pa.nulls(data.num_rows, dtype)
    return pa.table(arrays)


def _spec_needs(spec: FeaturesConfig, table: str) -> dict[str, list[tuple[str, str]]]:
    """Raw column of ``table`` -> (feature name, what it reads the column as: a key of
    SPEC_KINDS) for every feature of the spec that reads it."""
    needs: dict[str, list[tuple[str, str]]] = {}
    for f in spec.sparse:
        if f.table == table:
            needs.setdefault(f.column, []).append((f.name, "number" if f.kind == "bucket" else f.kind))
    for f in spec.numeric:
        if f.table == table:
            needs.setdefault(f.column, []).append((f.name, "number"))
    return needs


def _plain(dtype: pa.DataType) -> pa.DataType:
    return dtype.value_type if pa.types.is_dictionary(dtype) else dtype


def _is_id(dtype: pa.DataType) -> bool:
    dtype = _plain(dtype)
    return (
        pa.types.is_integer(dtype)
        or pa.types.is_string(dtype)
        or pa.types.is_large_string(dtype)
        or (pa.types.is_string_view(dtype))
    )


def _is_id_list(dtype: pa.DataType) -> bool:
    dtype = _plain(dtype)
    return (pa.types.is_list(dtype) or pa.types.is_large_list(dtype)) and _is_id(dtype.value_type)


def _is_number(dtype: pa.DataType) -> bool:
    dtype = _plain(dtype)
    return pa.types.is_integer(dtype) or pa.types.is_floating(dtype)


# What a feature reads a raw column as: sparse ids (kind id), id lists (kind list), numbers
# (numeric features and kind bucket).
SPEC_KINDS = {
    "id": (_is_id, "string or integer ids"),
    "list": (_is_id_list, "lists of string or integer ids"),
    "number": (_is_number, "numbers (integer or floating point)"),
}


def _check_spec_type(dtype: pa.DataType, needs: list[tuple[str, str]], table: str, path: Path, column: str) -> None:
    for feature, kind in needs:
        accepts, wanted = SPEC_KINDS[kind]
        if not accepts(dtype):
            raise DataContractError(
                f"{table}: column {column!r} in {path} has type {dtype}, but feature {feature!r} "
                f"of the spec reads it as {wanted}"
            )


def _normalise(column: pa.ChunkedArray, expected: pa.DataType, path: Path, name: str) -> pa.ChunkedArray:
    """Cast representation variants to the contract's type; anything else is a wrong type."""
    found = column.type
    if pa.types.is_dictionary(found):
        found = found.value_type
        column = column.cast(found)
    if expected == pa.string() and (
        pa.types.is_string(found) or pa.types.is_large_string(found) or pa.types.is_string_view(found)
    ):
        return column.cast(pa.string())
    if pa.types.is_timestamp(expected) and pa.types.is_timestamp(found) and found.tz in UTC_ZONES:
        # ns -> us drops sub-microsecond digits, which the contract does not keep.
        return column.cast(TS, safe=found.unit != "ns")
    if found == expected:
        return column
    hint = ""
    if pa.types.is_timestamp(found):
        hint = (
            " (a naive timestamp: store UTC with tz='UTC')" if found.tz is None else f" (time zone {found.tz}, not UTC)"
        )
    raise DataContractError(f"column {name!r} in {path} has type {found}{hint}, expected {expected}")


def _find_faults(frame: pl.DataFrame, table: str, day: dt.date, keys: _ValidKeys) -> pl.DataFrame:
    """Add ``reason``: null for a valid row, else the first fault found, in this order:
    null key, null/out-of-day timestamp, other null required column, broken reference,
    duplicate key (the first valid occurrence by ts then input order is kept)."""
    key = KEYS[table]
    faults: list[tuple[pl.Expr, str]] = [(pl.col(key).is_null(), "null_key")]
    if table in DAILY_TABLES:
        faults += [(pl.col("ts").is_null(), "null_ts"), (~in_day(pl.col("ts"), day), "ts_outside_partition")]
    faults += [(pl.col(c).is_null(), f"null_{c}") for c in REQUIRED[table] if c not in (key, "ts")]
    reason = pl.lit(None, dtype=pl.String)
    for condition, code in reversed(faults):
        reason = pl.when(condition).then(pl.lit(code)).otherwise(reason)
    frame = frame.with_columns(reason.alias(REASON))

    if table in REFERENCES:
        parent, code = REFERENCES[table]
        known = keys.window(parent, day, keys.lookback[table])
        broken = pl.col(REASON).is_null() & ~pl.col(KEYS[parent]).is_in(known.implode())
        frame = frame.with_columns(pl.when(broken).then(pl.lit(code)).otherwise(pl.col(REASON)).alias(REASON))

    # Valid rows first, each in (ts, input) order: a key's first row is then the one to keep.
    ok = pl.col(REASON).is_null()
    order = [ok.not_(), *(["ts"] if table in DAILY_TABLES else []), pl.col(ROW)]
    later_copy = ok & pl.col(key).is_first_distinct().not_()
    return (
        frame.sort(order)
        .with_columns(pl.when(later_copy).then(pl.lit("duplicate_key")).otherwise(pl.col(REASON)).alias(REASON))
        .sort(ROW)
    )


def _to_arrow(frame: pl.DataFrame, table: str) -> pa.Table:
    """Arrow table with the contract's columns in their contract types (strings as string)."""
    data = frame.to_arrow()
    fixed = {**REQUIRED[table], **OPTIONAL.get(table, {}), REASON: pa.string()}
    schema = pa.schema([f.with_type(fixed[f.name]) if f.name in fixed else f for f in data.schema])
    return data.cast(schema)


def _remove_outputs(warehouse: Path, day: dt.date) -> None:
    for name in TABLES:
        shutil.rmtree(validated_dir(warehouse, name, day), ignore_errors=True)
        shutil.rmtree(quarantine_dir(warehouse, name, day), ignore_errors=True)


def _share_message(report: ValidationReport, warehouse: Path) -> str:
    parts = []
    for name in report.failed_tables:
        t = report.tables[name]
        top = ", ".join(f"{r} {n:,}" for r, n in list(t.reasons.items())[:3])
        parts.append(
            f"{name}: {t.quarantined_rows:,} of {t.input_rows:,} rows ({t.bad_row_share:.2%}) broke the contract, "
            f"above max_bad_row_share {report.thresholds['max_bad_row_share']:.2%} (and at least min_bad_rows "
            f"{report.thresholds['min_bad_rows']}); top reasons: {top}; "
            f"files: {_names([Path(f) for f in t.files])}; quarantined rows in "
            f"{quarantine_dir(warehouse, name, report.day)}"
        )
    return "; ".join(parts) + f". Report: {report_path(warehouse, 'validate', report.day)}"
