"""Adapters: other sources written as raw data contract v1 (features.contract).

Ali-CCP (``aliccp_to_raw``)
---------------------------
The Ali-CCP samples in ``../shared/data/ali-ccp`` (Taobao click + purchase logs, ESMM
paper; see that folder's README) are one CSV row per impression with label-encoded sparse
fields, dense ``D*`` columns and the labels ``click`` and ``purchase``. The adapter turns
each row into an impression and its labels into events, so the ordinary stages derive the
labels again from the event log:

* impression: ``impression_id`` = ``aliccp-YYYYMMDD-NNNNNN`` (day, row), ``ts`` a seeded
  uniform instant in the day's first 12 hours, ``user_id`` = field 101, ``item_id`` =
  field 205, the context / user x item fields 301, 508, 509, 702, 853 as strings
  ``f301`` ... and the dense ``D109_14`` ... ``D853`` as float64 under their own names;
* click = 1: a click 1 s .. min(click window, 10 min) after the impression;
  purchase = 1: a conversion 1 s .. min(attribution window, 2 h) after that click (no
  ``value``: Ali-CCP has none). Everything stays on the impression's day. A purchase
  without a click is written as such and quarantined by ``validate``, never dropped here;
* users snapshot: ``user_id`` + user fields 121..129, 109_14..150_14 (``f121`` ...);
  items snapshot: ``item_id`` + item fields 206, 207, 210, 216. The CSVs repeat these per
  row; an id seen with different attributes keeps its first row's (by day, then row
  order) and the summary counts such ids (in the stored sample: 2 items, 0 users). The
  snapshots span all days, as a "latest snapshot" does.

Field names carry an ``f`` prefix because a leading digit is awkward in expressions and
TOML keys; ``configs/aliccp.toml`` maps every one of them to a named feature.

Days: train, val and test samples become three consecutive days from the config's
``generate.start_date`` (``aliccp_sample_days``). A day's labels are mature only when the
clicks / conversions partitions of the following ``contract.maturity_lag_days`` days are
validated, and ``validate`` refuses a day without impressions. So after the last day the
adapter writes ``maturity_lag_days`` closing days, each holding one copy of the last
day's first impression (new id, no click, no conversion): they exist only to close the
label windows, are validated like any day, and never enter training (train on run date
day 4 uses days 1-3). Events all fall on their impression's day, so the closing days'
clicks and conversions are empty and the labels equal the CSVs' click and purchase.

Command sequence (from the repo root; 2026-11-01 is ``generate.start_date``)::

    W=state/aliccp/warehouse
    funnelrank adapt-aliccp --config configs/aliccp.toml --warehouse $W --data-dir ../shared/data/ali-ccp
    for d in 2026-11-01 2026-11-02 2026-11-03 2026-11-04; do
        funnelrank validate --config configs/aliccp.toml --warehouse $W --date $d
    done
    for d in 2026-11-01 2026-11-02 2026-11-03; do
        funnelrank features --config configs/aliccp.toml --warehouse $W --date $d
    done
    for d in 2026-11-02 2026-11-03 2026-11-04; do   # run date D builds day D - 1
        funnelrank examples --config configs/aliccp.toml --warehouse $W --date $d
    done
    # trains on 11-01..02, validates on 11-03
    funnelrank train --config configs/aliccp.toml --warehouse $W --date 2026-11-04
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa

from features.catalog import raw_dir
from features.config import ContractConfig
from features.contract import TS, day_str
from features.errors import DataContractError
from features.io import write_parquet_dir

ALICCP_SAMPLES = ("ali_ccp_train_sample.csv", "ali_ccp_val_sample.csv", "ali_ccp_test_sample.csv")
ALICCP_LABELS = ("click", "purchase")
ALICCP_USER_ID = "101"
ALICCP_ITEM_ID = "205"
ALICCP_USER_FIELDS = ("121", "122", "124", "125", "126", "127", "128", "129", "109_14", "110_14", "127_14", "150_14")
ALICCP_ITEM_FIELDS = ("206", "207", "210", "216")
ALICCP_CONTEXT_FIELDS = ("301", "508", "509", "702", "853")
ALICCP_DENSE = ("D109_14", "D110_14", "D127_14", "D150_14", "D508", "D509", "D702", "D853")
ALICCP_SPARSE = (ALICCP_USER_ID, ALICCP_ITEM_ID, *ALICCP_USER_FIELDS, *ALICCP_ITEM_FIELDS, *ALICCP_CONTEXT_FIELDS)

IMPRESSION_SPREAD = dt.timedelta(hours=12)
MAX_CLICK_DELAY = dt.timedelta(minutes=10)
MAX_CONVERSION_DELAY = dt.timedelta(hours=2)


def aliccp_column(field: str) -> str:
    """Raw column name of an Ali-CCP sparse field: ``"205"`` -> ``"f205"``."""
    return f"f{field}"


def aliccp_sample_days(data_dir: Path, start: dt.date) -> dict[dt.date, Path]:
    """The train, val and test samples on ``start`` and the two days after it."""
    paths = [Path(data_dir) / name for name in ALICCP_SAMPLES]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise DataContractError(f"Ali-CCP sample file(s) not found: {', '.join(missing)}")
    return {start + dt.timedelta(days=i): path for i, path in enumerate(paths)}


def _read_sample(path: Path) -> pl.DataFrame:
    """The CSV with sparse fields as strings, dense as float64, labels checked to be 0/1."""
    try:
        header = pl.read_csv(path, n_rows=0).columns
    except (pl.exceptions.PolarsError, OSError) as err:
        raise DataContractError(f"cannot read Ali-CCP sample {path}: {err}") from None
    missing = [c for c in (*ALICCP_LABELS, *ALICCP_SPARSE, *ALICCP_DENSE) if c not in header]
    if missing:
        raise DataContractError(
            f"Ali-CCP sample {path} lacks column(s) {', '.join(missing)} (it has: {', '.join(header)})"
        )
    types = (
        {c: pl.Int8 for c in ALICCP_LABELS}
        | {c: pl.String for c in ALICCP_SPARSE}
        | {c: pl.Float64 for c in ALICCP_DENSE}
    )
    try:
        frame = pl.read_csv(path, schema_overrides=types, columns=list(types))
    except (pl.exceptions.PolarsError, OSError) as err:
        raise DataContractError(f"cannot read Ali-CCP sample {path}: {err}") from None
    for label in ALICCP_LABELS:
        bad = frame.filter(~pl.col(label).is_in([0, 1]) | pl.col(label).is_null()).height
        if bad:
            raise DataContractError(f"Ali-CCP sample {path}: column {label!r} has {bad} value(s) other than 0 or 1")
    return frame


def _day_events(frame: pl.DataFrame, day: dt.date, contract: ContractConfig, seed: int) -> pl.DataFrame:
    """Add impression_id and the impression / click / conversion timestamps of ``day``."""
    rng = np.random.default_rng([seed, day.toordinal()])  # per day: a day's rows do not depend on the others
    n = frame.height
    longest_click = min(contract.click_window, MAX_CLICK_DELAY).total_seconds()
    longest_conversion = min(contract.attribution_window, MAX_CONVERSION_DELAY).total_seconds()
    seconds = {
        "_imp_s": rng.integers(0, int(IMPRESSION_SPREAD.total_seconds()), n),
        "_click_s": rng.integers(1, int(longest_click) + 1, n),
        "_conv_s": rng.integers(1, int(longest_conversion) + 1, n),
    }
    start = dt.datetime.combine(day, dt.time(), tzinfo=dt.UTC)
    ts = pl.lit(start).dt.cast_time_unit("us") + pl.duration(seconds=pl.col("_imp_s"))
    click_ts = ts + pl.duration(seconds=pl.col("_click_s"))
    return (
        frame.with_row_index("_row")
        .with_columns(*(pl.Series(name, values) for name, values in seconds.items()))
        .with_columns(
            pl.format(
                "aliccp-{}-{}", pl.lit(day.strftime("%Y%m%d")), pl.col("_row").cast(pl.String).str.zfill(6)
            ).alias("impression_id"),
            ts.alias("ts"),
            click_ts.alias("click_ts"),
            (click_ts + pl.duration(seconds=pl.col("_conv_s"))).alias("conversion_ts"),
        )
        .drop("_row", *seconds)
    )


def _arrow(frame: pl.DataFrame) -> pa.Table:
    """Arrow table in the contract's representation: plain strings, timestamp[us, UTC]."""
    table = frame.to_arrow()
    fields = []
    for f in table.schema:
        if pa.types.is_large_string(f.type) or pa.types.is_string_view(f.type):
            f = f.with_type(pa.string())
        elif pa.types.is_timestamp(f.type):
            f = f.with_type(TS)
        fields.append(f)
    return table.cast(pa.schema(fields))


def _snapshot(rows: pl.DataFrame, key: str, fields: tuple[str, ...]) -> tuple[pl.DataFrame, int]:
    """One row per ``key`` (its first), and how many keys had differing attributes."""
    columns = [aliccp_column(f) for f in fields]
    conflicting = rows.group_by(key).agg(pl.any_horizontal(pl.col(c).n_unique() > 1 for c in columns).alias("differs"))
    snapshot = rows.select(key, *columns).unique(subset=key, keep="first", maintain_order=True)
    return snapshot, int(conflicting["differs"].sum())


def aliccp_to_raw(csv_paths_by_day: dict[dt.date, Path], warehouse: Path, contract: ContractConfig, seed: int) -> dict:
    """Write the Ali-CCP CSVs (one per consecutive day) as raw contract v1 tables, plus
    ``contract.maturity_lag_days`` closing days; return a summary of what was written.

    Rewrites the days' raw partitions and the users / items snapshots; the same inputs
    and ``seed`` give the same rows.
    """
    days = sorted(csv_paths_by_day)
    if not days:
        raise ValueError("aliccp_to_raw: no sample files given")
    if days != [days[0] + dt.timedelta(days=i) for i in range(len(days))]:
        raise ValueError(
            "aliccp_to_raw: days must be consecutive (label windows and history have no gaps), got "
            f"{', '.join(map(day_str, days))}"
        )

    impression_columns = [aliccp_column(f) for f in ALICCP_CONTEXT_FIELDS] + list(ALICCP_DENSE)
    renames = {f: aliccp_column(f) for f in ALICCP_SPARSE} | {ALICCP_USER_ID: "user_id", ALICCP_ITEM_ID: "item_id"}
    frames = {
        day: _day_events(_read_sample(csv_paths_by_day[day]).rename(renames), day, contract, seed) for day in days
    }
    last = frames[days[-1]]
    for k in range(1, contract.maturity_lag_days + 1):
        closing = days[-1] + dt.timedelta(days=k)
        copy = last.head(1).with_columns(pl.lit(0, pl.Int8).alias(label) for label in ALICCP_LABELS)
        frames[closing] = _day_events(
            copy.drop("impression_id", "ts", "click_ts", "conversion_ts"), closing, contract, seed
        )

    summary: dict = {"days": {}, "closing_days": []}
    for day, frame in frames.items():
        clicks = frame.filter(pl.col("click") == 1).select("impression_id", pl.col("click_ts").alias("ts"))
        conversions = frame.filter(pl.col("purchase") == 1).select("impression_id", pl.col("conversion_ts").alias("ts"))
        write_parquet_dir(
            raw_dir(warehouse, "impressions", day),
            _arrow(frame.select("impression_id", "ts", "user_id", "item_id", *impression_columns)),
        )
        write_parquet_dir(raw_dir(warehouse, "clicks", day), _arrow(clicks))
        write_parquet_dir(raw_dir(warehouse, "conversions", day), _arrow(conversions))
        counts = {"impressions": frame.height, "clicks": clicks.height, "conversions": conversions.height}
        if day in csv_paths_by_day:
            summary["days"][day_str(day)] = counts | {"source": str(csv_paths_by_day[day])}
        else:
            summary["closing_days"].append(day_str(day))

    rows = pl.concat([frames[day] for day in days])
    users, users_conflicting = _snapshot(rows, "user_id", ALICCP_USER_FIELDS)
    items, items_conflicting = _snapshot(rows, "item_id", ALICCP_ITEM_FIELDS)
    write_parquet_dir(raw_dir(warehouse, "users"), _arrow(users))
    write_parquet_dir(raw_dir(warehouse, "items"), _arrow(items))
    summary |= {
        "users": users.height,
        "items": items.height,
        "users_with_differing_attributes": users_conflicting,
        "items_with_differing_attributes": items_conflicting,
    }
    return summary


def describe_aliccp_summary(summary: dict) -> str:
    lines = [
        f"{day}: {c['impressions']} impressions, {c['clicks']} clicks, {c['conversions']} conversions <- {c['source']}"
        for day, c in summary["days"].items()
    ]
    lines.append(
        f"closing day(s) {', '.join(summary['closing_days'])}: 1 copied impression each, no events (label windows only)"
    )
    lines.append(
        f"users snapshot: {summary['users']} ids ({summary['users_with_differing_attributes']} with differing "
        "attributes, first kept); "
        f"items snapshot: {summary['items']} ids ({summary['items_with_differing_attributes']} with differing "
        "attributes, first kept)"
    )
    return "\n".join(lines)
