"""The warehouse catalogue: where every dataset lives under a warehouse root, one function each.

Daily datasets are Hive-style partitions by UTC day (``date=YYYY-MM-DD`` folders), each
written atomically (features.io) and holding ``part-0.parquet`` (``DATA_FILE``) unless
said otherwise; a ``*_root`` function names the folder of all of a dataset's partitions.

    path under <warehouse>/               function                  what it holds (written by)
    raw/<daily table>/date=D/             raw_dir(wh, table, D)     impressions, clicks, conversions (your jobs)
    raw/{users,items}/                    raw_dir(wh, table)        the latest snapshot
    validated/<table>/date=D/             validated_dir             rows that passed (validate); users/items:
                                                                    the snapshot as accepted on D
    quarantine/<table>/date=D/            quarantine_dir            rows that broke the contract, with a `reason`
    reports/<stage>/date=D.json           report_path               a stage's report of D (validate)
    truth/impressions/date=D/             truth_dir                 the generator's true probabilities (synthetic
                                                                    data only; never under raw/)
    features/daily/<key>/date=D/          daily_dir                 an aggregate key's counters of D (features)
    features/rolling/<key>/date=D/        rolling_state_dir         its window counts as of the start of D
                                                                    (examples: state.arrow, manifest.json)
    features/sequences/<name>/date=D/     sequence_state_dir        a behaviour sequence's per-key elements as of
                                                                    the start of D (features: part-0.parquet,
                                                                    manifest.json; features.sequences)
    vocab/<feature>/v000001.parquet       vocab_version_path        a version of a feature's vocabulary (examples)
    vocab/<feature>/manifest.json         vocab_manifest_path       its versions and applied days
    training/date=L/                      training_dir              the training table of mature day L (examples)
    training/date=L/manifest.json         training_manifest_path    its inputs' and content's sha256
    table/{train,val,test}/               table_split_dir           a [table] source's prepared splits
    table/quarantine/<split>/             table_quarantine_dir      its rows with a null label
    table/source/<sha256>/                table_csv_dir             a CSV input converted once to Parquet
    table/manifest.json                   table_manifest_path       inputs, spec and content hashes of table/
    .funnelrank.lock                      lock_path                 the nightly run's exclusive lock
    state/                                default_state_dir         the run state when the config names no
                                                                    state_dir: MLflow store, checkpoints,
                                                                    bundles, nightly records

Manifests name the input partitions they hash by their warehouse-relative path
(``warehouse_relative``). Model checkpoints, bundles and nightly records live under the
config's ``state_dir`` (by default the warehouse's own ``state/``, so two warehouses never
share them).
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

from features.contract import DAILY_TABLES, SNAPSHOT_TABLES, day_str
from features.errors import DataContractError, StageError

DATA_FILE = "part-0.parquet"  # the one data file of a partition written by this project


def _partition(root: Path, day: dt.date) -> Path:
    return root / f"date={day_str(day)}"


# ---------------------------------------------------------------- contract v1 and its checks


def raw_dir(warehouse: Path, table: str, day: dt.date | None = None) -> Path:
    """The folder of a raw table (a day's partition for daily tables)."""
    if table in DAILY_TABLES:
        if day is None:
            raise ValueError(f"table {table!r} is partitioned by day: a date is required")
        return _partition(Path(warehouse) / "raw" / table, day)
    if table in SNAPSHOT_TABLES:
        return Path(warehouse) / "raw" / table
    raise ValueError(f"unknown raw table {table!r}; expected one of {DAILY_TABLES + SNAPSHOT_TABLES}")


def validated_root(warehouse: Path, table: str) -> Path:
    return Path(warehouse) / "validated" / table


def validated_dir(warehouse: Path, table: str, day: dt.date) -> Path:
    """Rows that passed ``validate`` for ``day`` (what downstream stages read).

    For users/items this is the snapshot as accepted on that day, so a rerun of an old
    day sees the attributes it saw then."""
    return _partition(validated_root(warehouse, table), day)


def quarantine_dir(warehouse: Path, table: str, day: dt.date) -> Path:
    return _partition(Path(warehouse) / "quarantine" / table, day)


def report_path(warehouse: Path, stage: str, day: dt.date) -> Path:
    return Path(warehouse) / "reports" / stage / f"date={day_str(day)}.json"


def truth_dir(warehouse: Path, day: dt.date) -> Path:
    return _partition(Path(warehouse) / "truth" / "impressions", day)


# ---------------------------------------------------------------- features and training tables


def daily_features_root(warehouse: Path) -> Path:
    """The folder of every aggregate key's daily counters."""
    return Path(warehouse) / "features" / "daily"


def daily_root(warehouse: Path, key_name: str) -> Path:
    return daily_features_root(warehouse) / key_name


def daily_dir(warehouse: Path, key_name: str, day: dt.date) -> Path:
    return _partition(daily_root(warehouse, key_name), day)


def rolling_state_root(warehouse: Path, key_name: str) -> Path:
    return Path(warehouse) / "features" / "rolling" / key_name


def rolling_state_dir(warehouse: Path, key_name: str, day: dt.date) -> Path:
    return _partition(rolling_state_root(warehouse, key_name), day)


def sequence_states_root(warehouse: Path) -> Path:
    return Path(warehouse) / "features" / "sequences"


def sequence_state_root(warehouse: Path, sequence: str) -> Path:
    return sequence_states_root(warehouse) / sequence


def sequence_state_dir(warehouse: Path, sequence: str, day: dt.date) -> Path:
    return _partition(sequence_state_root(warehouse, sequence), day)


def vocab_dir(warehouse: Path, feature: str) -> Path:
    return Path(warehouse) / "vocab" / feature


def vocab_version_path(warehouse: Path, feature: str, version: int) -> Path:
    return vocab_dir(warehouse, feature) / f"v{version:06d}.parquet"


def vocab_manifest_path(warehouse: Path, feature: str) -> Path:
    return vocab_dir(warehouse, feature) / "manifest.json"


def training_dir(warehouse: Path, day: dt.date) -> Path:
    return _partition(Path(warehouse) / "training", day)


def training_manifest_path(warehouse: Path, day: dt.date) -> Path:
    return training_dir(warehouse, day) / "manifest.json"


# ---------------------------------------------------------------- a [table] source


def table_dir(warehouse: Path) -> Path:
    """Everything prepared from a ``[table]`` source (features.table_source)."""
    return Path(warehouse) / "table"


def table_split_dir(warehouse: Path, split: str) -> Path:
    return table_dir(warehouse) / split


def table_quarantine_dir(warehouse: Path, split: str) -> Path:
    return table_dir(warehouse) / "quarantine" / split


def table_csv_dir(warehouse: Path, sha256: str) -> Path:
    """The Parquet copy of the CSV input whose content hashes to ``sha256``."""
    return table_dir(warehouse) / "source" / sha256


def table_manifest_path(warehouse: Path) -> Path:
    return table_dir(warehouse) / "manifest.json"


def lock_path(warehouse: Path) -> Path:
    return Path(warehouse) / ".funnelrank.lock"


def default_state_dir(warehouse: Path) -> Path:
    return Path(warehouse) / "state"


# ---------------------------------------------------------------- what is there


def warehouse_relative(warehouse: Path, path: Path) -> str:
    """``path`` relative to the warehouse, as manifests and input hashes record it."""
    return Path(path).relative_to(warehouse).as_posix()


def holds_data(folder: Path) -> bool:
    """Whether ``folder`` holds Parquet files (a folder never written does not)."""
    return any(Path(folder).glob("*.parquet"))


def partition_days(root: Path, pattern: str = "*.parquet") -> set[dt.date]:
    """Days of the ``date=YYYY-MM-DD`` folders under ``root`` that hold files matching
    ``pattern`` (half-written ``.tmp-`` folders are not partitions)."""
    if not root.is_dir():
        return set()
    return {
        dt.date.fromisoformat(p.name.removeprefix("date="))
        for p in root.iterdir()
        if p.name.startswith("date=") and any(p.glob(pattern))
    }


def newest_partition_day(root: Path, what: str, until: dt.date | None = None) -> dt.date:
    """The newest day with a partition under ``root`` (on or before ``until``); raises
    StageError naming ``what`` and the folder when there is none."""
    days = {d for d in partition_days(root) if until is None or d <= until}
    if not days:
        raise StageError(f"no {what} partitions in {root}" + (f" up to {day_str(until)}" if until else ""))
    return max(days)


def days_since_history_start(existing: set[dt.date], wanted: list[dt.date], what: str, root: Path) -> list[dt.date]:
    """The ``wanted`` days on or after the first existing day, all of which must exist.

    Days before history starts hold no events; a missing day after it is a gap (a stage
    did not run), which would silently turn into zeros, so it raises, naming the day.
    """
    if not existing:
        return []
    start = min(existing)
    days = sorted(d for d in wanted if d >= start)
    missing = [d for d in days if d not in existing]
    if missing:
        raise DataContractError(
            f"{what} for {day_str(missing[0])} missing in {root} while history starts on {day_str(start)}: "
            f"a stage did not run for that day"
        )
    return days


def scan_validated(warehouse: Path, table: str, day: dt.date):
    """Lazily read a table's validated partition for ``day`` (daily table or snapshot).

    Raises DataContractError naming the folder when ``validate`` has not run for that day.
    """
    import polars as pl

    folder = validated_dir(warehouse, table, day)
    files = sorted(folder.glob("*.parquet"))
    if not files:
        raise DataContractError(
            f"no validated {table} for {day_str(day)} in {folder}: "
            f"run `funnelrank validate --date {day_str(day)}` first"
        )
    return pl.scan_parquet(files)
