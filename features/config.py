"""The data half of the run config: generator, contract, validation, feature spec, tasks.

Each package owns the sections it reads: this module the ones the feature jobs need
(``DataConfig``), ``models.config`` adds the model and training sections
(``TrainingConfig``), ``pipeline.config`` the scoring, nightly and promotion ones and
loads the one TOML file of a run (``FunnelConfig``). Validated with pydantic: an unknown
key, a wrong type or a missing required value is reported by its dotted name
(``features.sparse[2].dim``), never as a traceback. ``serving`` never imports this module
(the exported bundle carries a plain-JSON copy of the spec it needs).
"""

from __future__ import annotations

import datetime as dt
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    field_validator,
    model_validator,
)

from serving.encoding import NumericTransform
from serving.spec import aggregate_feature_names, sequence_age_column, sequence_column

# the label columns of the event logs' training tables (features.examples): binary, numeric
EVENT_LABELS = ("click", "conversion")
EVENT_VALUE_LABELS = ("conversion_value",)

# TOML has no path type: paths arrive as strings (the one lax coercion allowed).
TomlPath = Annotated[Path, BeforeValidator(lambda v: Path(v) if isinstance(v, str) else v)]


def repeated(values: Sequence[str]) -> list[str]:
    """The values that occur more than once, sorted."""
    return sorted(v for v, n in Counter(values).items() if n > 1)


class ConfigError(ValueError):
    """A config file that cannot be used; the message names the file and the key."""


class _Section(BaseModel):
    # strict: "16" is not an int, 1 is not a float-free bool; extra keys are typos.
    # allow_inf_nan=False: TOML spells inf and nan, and no key of a run means either (an
    # infinite rate or weight trains a NaN model, an infinite tolerance turns a gate off).
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, allow_inf_nan=False)


# Upper bounds on sizes: generous, but a value beyond one can only be a typo that would
# allocate for hours (or fail deep inside torch) instead of failing at load.
MAX_DAYS = 3650  # ten years of daily partitions
MAX_ROWS = 1_000_000_000


class GenerateConfig(_Section):
    """Synthetic raw logs (``funnelrank generate``); CLI flags override these."""

    start_date: dt.date = dt.date(2026, 11, 1)
    days: int = Field(14, ge=1, le=MAX_DAYS)
    users: int = Field(20_000, ge=10, le=MAX_ROWS)
    items: int = Field(5_000, ge=10, le=MAX_ROWS)
    impressions_per_day: int = Field(100_000, ge=100, le=MAX_ROWS)
    task_correlation: float = Field(0.5, ge=-1.0, le=1.0)
    categories: int = Field(40, ge=2, le=MAX_ROWS)
    brands: int = Field(300, ge=2, le=MAX_ROWS)
    shops: int = Field(600, ge=2, le=MAX_ROWS)
    cities: int = Field(60, ge=2, le=MAX_ROWS)
    slots: int = Field(10, ge=1, le=1000)
    latent_dim: int = Field(8, ge=1, le=1024)
    user_activity_exponent: float = Field(1.1, gt=0.0, le=10.0, description="Zipf exponent of user activity")
    item_popularity_exponent: float = Field(1.05, gt=0.0, le=10.0, description="Zipf exponent of item popularity")
    daily_drift: float = Field(0.03, ge=0.0, le=10.0, description="per-day random-walk step of the latent factors")
    target_ctr: float = Field(0.04, gt=0.0, lt=1.0)
    target_cvr: float = Field(0.10, gt=0.0, lt=1.0, description="conversion rate given click")
    noise: float = Field(0.3, ge=0.0, le=100.0, description="std of the per-impression logit noise (unobservable)")
    latent_match_scale: float = Field(
        1.0,
        ge=0.0,
        le=100.0,
        description="scales the user x item latent factor products (the latent match term and the MMoE "
        "x's product block); 0 leaves a world without dot-product interactions",
    )


class ContractConfig(_Section):
    """Raw data contract v1: label windows."""

    click_window_minutes: int = Field(30, ge=1, le=10_080, description="at most a week")
    attribution_window_hours: int = Field(24, ge=1, le=2_160, description="at most 90 days")

    @property
    def click_window(self) -> dt.timedelta:
        return dt.timedelta(minutes=self.click_window_minutes)

    @property
    def attribution_window(self) -> dt.timedelta:
        return dt.timedelta(hours=self.attribution_window_hours)

    @property
    def click_lag_days(self) -> int:
        """Days after an impression's day that can still hold its clicks."""
        return math.ceil(self.click_window / dt.timedelta(days=1))

    @property
    def maturity_lag_days(self) -> int:
        """Days after which a day's labels are final.

        The nightly run for D builds day D - lag. The click window is included because a
        conversion's attribution clock starts at the click, which may itself be late.
        """
        return math.ceil((self.click_window + self.attribution_window) / dt.timedelta(days=1))


class ValidateConfig(_Section):
    max_bad_row_share: float = Field(0.01, ge=0.0, le=1.0)
    min_bad_rows: int = Field(
        10,
        ge=0,
        le=1_000_000_000,
        description="a table with fewer bad rows never fails the day on max_bad_row_share (tiny tables: "
        "one bad row of 76 is 1.3%); the rows are still quarantined and counted",
    )


class SparseFeature(_Section):
    """One sparse feature: a raw column encoded through an append-only vocabulary (kind
    ``id``, ``list``), or a numeric column cut into buckets at fixed ``boundaries`` (kind
    ``bucket``: one embedding row per bucket, so the model learns any shape of response to
    the number, as feature-column APIs' bucketized columns do).

    Mirrors torchrec's ``EmbeddingBagConfig``: every knob has a name.
    """

    name: str
    # "table": a column of the user's own feature table ([table] section)
    table: Literal["impressions", "users", "items", "table"]
    column: str
    kind: Literal["id", "list", "bucket"] = "id"
    # kind = "bucket": ascending cut points; bucket 1 holds values below the first, a value
    # equal to a boundary goes to the bucket above it; null or NaN is padding (row 0)
    boundaries: list[float] = Field(default_factory=list)
    # FBGEMM's table-batched kernels need embedding dims in multiples of 4.
    dim: int = Field(16, ge=4, le=4096, multiple_of=4, description="embedding width, 4 to 4096")
    capacity: int = Field(
        100_000, ge=1, le=MAX_ROWS, description="max in-vocabulary ids (excl. padding and OOV), at most 1e9"
    )
    min_count: int = Field(1, ge=1, description="ids seen fewer times go to OOV buckets")
    oov_buckets: int = Field(8, ge=1, le=1_000_000)
    pooling: Literal["sum", "mean"] = "sum"

    @model_validator(mode="after")
    def _boundaries_for_buckets(self) -> SparseFeature:
        if self.kind != "bucket":
            if self.boundaries:
                raise ValueError(f"feature {self.name!r}: boundaries are for kind = 'bucket', not {self.kind!r}")
            return self
        b = self.boundaries
        if not b:
            raise ValueError(f"feature {self.name!r}: kind = 'bucket' needs boundaries (ascending cut points)")
        if any(x >= y for x, y in zip(b, b[1:], strict=False)):  # finite already: _Section refuses inf and nan
            raise ValueError(f"feature {self.name!r}: boundaries must be strictly ascending, got {b}")
        return self

    @property
    def num_embeddings(self) -> int:
        """Rows of the embedding table: padding (0) + capacity + OOV buckets; for a bucket
        feature padding + one row per bucket."""
        if self.kind == "bucket":
            return len(self.boundaries) + 2
        return 1 + self.capacity + self.oov_buckets


class NumericFeature(_Section):
    """A raw numeric column used as a dense feature."""

    name: str
    table: Literal["impressions", "users", "items", "table"]
    column: str
    transform: NumericTransform = "none"


class AggregateKey(_Section):
    """Point-in-time counters are kept per value of these columns (e.g. user x category)."""

    name: str
    columns: list[str] = Field(min_length=1)


class SequenceFeature(_Section):
    """A behaviour sequence: per row of day L, the ``key``'s (the user's) last ``max_length``
    events of kind ``event`` strictly before L, newest first (features.sequences).

    Each element carries the sparse features named in ``items``, encoded with their own
    vocabularies: the first is the candidate item's id feature (column ``item_id``), so a
    history item and a candidate item share one embedding row; the others are ``kind = "id"``
    features of table ``items`` (the item's attribute in the snapshot of the row's day, as
    the candidate gets it) or ``impressions`` (the value on the impression that was clicked
    or converted). ``encoder`` and ``attention_heads`` are read by the model only.
    """

    name: str = Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    event: Literal["click", "conversion"] = "click"
    key: str = Field("user_id", min_length=1, description="the impressions column whose value owns the history")
    items: list[str] = Field(min_length=1, description="sparse features carried per element; the first: the item id")
    max_length: int = Field(50, ge=1, le=1000, description="N: the newest N events are kept")
    max_age_days: int = Field(0, ge=0, description="0: no limit; else older events (as of the row's day) drop out")
    encoder: Literal["mean", "din", "attention"] = "din"
    attention_heads: int = Field(
        1, ge=1, description="encoder = 'attention': heads, dividing the carried features' dims side by side"
    )

    @property
    def column_names(self) -> list[str]:
        """Its training-table columns: one list per carried feature, then the ages."""
        return [sequence_column(self.name, f) for f in self.items] + [sequence_age_column(self.name)]


class FeaturesConfig(_Section):
    windows_days: list[int] = Field(
        default_factory=lambda: [1, 7, 28], min_length=1, description=f"counter windows in days, each 1 to {MAX_DAYS}"
    )
    prior_strength: float = Field(20.0, ge=0.0, le=1e9, description="pseudo-impressions behind smoothed rates")
    aggregate_keys: list[AggregateKey] = Field(default_factory=list)
    sparse: list[SparseFeature] = Field(min_length=1)
    numeric: list[NumericFeature] = Field(default_factory=list)
    sequences: list[SequenceFeature] = Field(default_factory=list)

    @field_validator("windows_days")
    @classmethod
    def _positive_sorted_windows(cls, v: list[int]) -> list[int]:
        if any(not 1 <= w <= MAX_DAYS for w in v) or sorted(set(v)) != v:
            raise ValueError(f"must be distinct day counts from 1 to {MAX_DAYS} in increasing order")
        return v

    @model_validator(mode="after")
    def _unique_names(self) -> FeaturesConfig:
        names = [f.name for f in self.sparse] + [f.name for f in self.numeric] + [k.name for k in self.aggregate_keys]
        if dupes := repeated(names):
            raise ValueError(f"feature names must be unique; repeated: {', '.join(dupes)}")
        return self

    @model_validator(mode="after")
    def _sequences_carry_item_features(self) -> FeaturesConfig:
        sparse = {f.name: f for f in self.sparse}
        features = (*self.sparse, *self.numeric)
        impressions_columns = {"user_id", *(f.column for f in features if f.table == "impressions")}
        taken = {*sparse, *(f.name for f in self.numeric), *(k.name for k in self.aggregate_keys), *self.dense_names()}
        for i, seq in enumerate(self.sequences):
            at = f"features.sequences[{i}]"
            if seq.name in taken:
                raise ValueError(f"{at}.name: {seq.name!r} is already a feature or column name")
            if seq.key not in impressions_columns:
                raise ValueError(
                    f"{at}.key: {seq.key!r} must be user_id or the column of a feature of table "
                    f"'impressions' ({', '.join(sorted(impressions_columns))})"
                )
            if dupes := repeated(seq.items):
                raise ValueError(f"{at}.items: repeated {', '.join(dupes)}")
            for j, name in enumerate(seq.items):
                feature = sparse.get(name)
                if feature is None:
                    raise ValueError(f"{at}.items[{j}]: {name!r} is not a sparse feature ({', '.join(sparse)})")
                if feature.kind != "id" or feature.table not in ("items", "impressions"):
                    raise ValueError(
                        f"{at}.items[{j}]: {name!r} is a kind {feature.kind!r} feature of table "
                        f"{feature.table!r}; a sequence carries kind 'id' features of table items or "
                        "impressions"
                    )
            item = sparse[seq.items[0]]
            if item.column != "item_id":
                raise ValueError(
                    f"{at}.items[0]: {item.name!r} reads column {item.column!r}; the first carried "
                    "feature must be the candidate item's id (column 'item_id'), whose embedding rows the "
                    "history shares"
                )
            element_dim = sum(sparse[name].dim for name in seq.items)
            if element_dim % seq.attention_heads:
                raise ValueError(
                    f"{at}.attention_heads: {seq.attention_heads} does not divide {element_dim}, the carried "
                    "features' dims side by side"
                )
            if clash := sorted(taken & set(seq.column_names)):
                raise ValueError(f"{at}: its column {clash[0]!r} is already a feature or column name")
            taken |= {seq.name, *seq.column_names}
        return self

    def dense_names(self) -> list[str]:
        """Names of the dense columns of the training table, in model input order.

        Per aggregate key and window: impressions, clicks, conversions (log1p counts) and
        the smoothed click-through and conversion rates; then the numeric features.
        """
        rolled = [name for key in self.aggregate_keys for name in aggregate_feature_names(key.name, self.windows_days)]
        return rolled + [f.name for f in self.numeric]

    def sequence_columns(self) -> list[str]:
        """The training table's list columns of every behaviour sequence (elements, ages)."""
        return [column for seq in self.sequences for column in seq.column_names]

    def columns_of(self, table: str) -> list[str]:
        """Raw columns of ``table`` that the spec reads (the contract's extra required columns)."""
        cols = [f.column for f in (*self.sparse, *self.numeric) if f.table == table]
        return list(dict.fromkeys(cols))


class TaskConfig(_Section):
    """One task: the label it learns, its place in a funnel, its weights.

    ``kind = "binary"`` (the default) learns a 0/1 label. A binary task with ``after`` is a
    funnel step that can only happen after the other task's positive (a conversion after a
    click): its head learns P(task | after), served as ``conditional_name`` and measured on
    the rows where ``after``'s label is 1, and P(after and task) = P(after) x P(task |
    after), served as ``joint_name`` and measured on every row. ``model.conversion_head``
    says how it trains (direct or ESMM). A binary task without ``after`` is served and
    measured under its own name.

    ``kind = "value"`` is a regression on a numeric label (e.g. ``conversion_value``),
    trained on the rows where its ``after`` task (a binary task, e.g. conversion) is 1: its
    head predicts E[value | after], served as the output ``e_<name>``
    (``serving.spec.value_output``), with the loss ``value_loss``. It multiplies the ranking
    score with its own ``score_exponent``.
    """

    name: str = Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    kind: Literal["binary", "value"] = Field(
        "binary", description="binary: a 0/1 label; value: a regression on a numeric label after a binary task"
    )
    label: str | None = Field(
        None, description="column with the 0/1 label (a value task: the numeric label); default: the task's name"
    )
    after: str | None = Field(None, description="the task whose positives this one follows (funnel step)")
    joint_name: str | None = Field(
        None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$", description="funnel step: name of P(after and task), e.g. ctcvr"
    )
    conditional_name: str | None = Field(
        None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$", description="funnel step: name of P(task | after), e.g. cvr"
    )
    loss_weight: float = Field(
        1.0,
        ge=0.0,
        le=1000.0,
        description="its weight in the total loss under model.loss_weighting fixed, dwa and pcgrad",
    )
    score_exponent: float = Field(
        1.0,
        ge=0.0,
        le=100.0,
        description="ranking score = product of p ** score_exponent over the binary tasks, times E[value] ** "
        "score_exponent over the value tasks",
    )
    value_loss: Literal["log_mse", "tweedie"] = Field(
        "log_mse",
        description="kind = 'value': log_mse = squared error of log1p(value) (the head predicts log1p); tweedie = "
        "Tweedie deviance with power tweedie_power (the head predicts log E[value]; for zero-heavy values)",
    )
    tweedie_power: float = Field(1.5, gt=1.0, lt=2.0, description="value_loss = 'tweedie': the power, in (1, 2)")

    @property
    def label_column(self) -> str:
        return self.label or self.name

    @property
    def served_name(self) -> str:
        """The output and metric name of the probability the ranking score uses (a value
        task: its own name; its output is ``e_<name>``)."""
        return self.joint_name or self.name

    @property
    def is_value(self) -> bool:
        return self.kind == "value"

    @model_validator(mode="after")
    def _funnel_names(self) -> TaskConfig:
        if self.is_value:
            if self.after is None:
                raise ValueError(
                    f"task {self.name!r}: kind = 'value' needs after = <a binary task> (e.g. conversion): its value "
                    "is learned on the rows where that task's label is 1"
                )
            if self.joint_name or self.conditional_name:
                raise ValueError(f"task {self.name!r}: a value task has no joint_name or conditional_name")
            return self
        # set to its default it passes: a dumped config (MLflow's config.toml) writes every key
        value_keys = [k for k in ("value_loss", "tweedie_power") if getattr(self, k) != _TASK_DEFAULTS[k]]
        if value_keys:
            raise ValueError(f"task {self.name!r}: {', '.join(value_keys)} are for kind = 'value'")
        named = self.joint_name is not None and self.conditional_name is not None
        if self.after is not None and not named:
            raise ValueError(f"task {self.name!r} follows {self.after!r}: give joint_name and conditional_name")
        if self.after is None and (self.joint_name or self.conditional_name):
            raise ValueError(f"task {self.name!r}: joint_name and conditional_name need 'after'")
        return self


_TASK_DEFAULTS = {name: field.default for name, field in TaskConfig.model_fields.items()}


def _funnel_tasks() -> list[TaskConfig]:
    return [
        TaskConfig(name="click"),
        TaskConfig(name="conversion", after="click", joint_name="ctcvr", conditional_name="cvr"),
    ]


def task_views(tasks: list[TaskConfig]) -> dict[str, tuple[str, str | None]]:
    """Every measured / served probability: name -> (label column, mask label column or
    None). A funnel step gives two: its joint probability on all rows, its conditional one
    on the rows where the earlier task's label is 1. Value tasks are no probability: see
    ``value_views``."""
    labels = {t.name: t.label_column for t in tasks}
    views: dict[str, tuple[str, str | None]] = {}
    for t in tasks:
        if t.is_value:
            continue
        if t.after is None:
            views[t.name] = (t.label_column, None)
        else:
            views[t.joint_name] = (t.label_column, None)
            views[t.conditional_name] = (t.label_column, labels[t.after])
    return views


@dataclass(frozen=True)
class ValueView:
    """How a value task is measured: its numeric label, the label of its ``after`` task (the
    rows it is trained and measured on) and the served probability of that task (the
    expected revenue P(after) x E[value | after] ranks every row)."""

    label: str
    after_label: str
    after_view: str


# a value task's metrics (models.metrics.value_metrics): rmse, mae, mean predicted / observed
# value on its after task's positives; the normalised Gini of the expected revenue on every row
VALUE_METRICS = ("rmse", "mae", "calibration", "gini")


def value_views(tasks: list[TaskConfig]) -> dict[str, ValueView]:
    """Every value task: name -> its ValueView."""
    by_name = {t.name: t for t in tasks}
    return {
        t.name: ValueView(t.label_column, by_name[t.after].label_column, by_name[t.after].served_name)
        for t in tasks
        if t.is_value
    }


class TableSourceConfig(_Section):
    """The user's own feature table (instead of event logs): one row per example, label
    columns named by ``tasks``, feature columns named by the ``features`` spec (with
    ``table = "table"``). Parquet, or CSV (converted once to Parquet). The split is either
    three files, or one file (``path``) and a column whose values name the split."""

    train: TomlPath | None = None
    val: TomlPath | None = None
    test: TomlPath | None = None
    path: TomlPath | None = None
    split_column: str | None = None
    split_values: dict[Literal["train", "val", "test"], str] = Field(
        default_factory=lambda: {"train": "train", "val": "val", "test": "test"}
    )
    user_column: str | None = Field(None, description="groups rows for GAUC (per-user AUC); none: GAUC is nan")

    @model_validator(mode="after")
    def _one_layout(self) -> TableSourceConfig:
        files = (self.train, self.val, self.test)
        if self.path is not None:
            if any(f is not None for f in files) or self.split_column is None:
                raise ValueError("give either train/val/test files, or path and split_column")
        elif any(f is None for f in files):
            missing = [n for n, f in zip(("train", "val", "test"), files, strict=True) if f is None]
            raise ValueError(f"missing {', '.join(missing)}: give train, val and test files (or path and split_column)")
        return self


class DataConfig(_Section):
    """The sections the feature jobs read: where the data lives, its contract, the
    feature spec and the tasks' labels (a run's config holds more, see the module doc)."""

    seed: int = 0
    warehouse: TomlPath = Path("state/warehouse")
    generate: GenerateConfig = GenerateConfig()
    contract: ContractConfig = ContractConfig()
    validate_: ValidateConfig = Field(ValidateConfig(), alias="validate")
    table: TableSourceConfig | None = None
    features: FeaturesConfig
    tasks: list[TaskConfig] = Field(default_factory=_funnel_tasks, min_length=2)

    @model_validator(mode="after")
    def _tasks_and_source_agree(self) -> DataConfig:
        names = [t.name for t in self.tasks]
        views = [
            n for t in self.tasks for n in ((t.joint_name, t.conditional_name) if t.after and not t.is_value else ())
        ]
        if dupes := repeated(names + views):
            raise ValueError(f"task names and views must be unique; repeated: {', '.join(dupes)}")
        by_name = {t.name: t for t in self.tasks}
        if not [t for t in self.tasks if not t.is_value]:
            raise ValueError("tasks: at least one task must be binary (kind = 'binary')")
        if self.tasks[0].is_value:
            raise ValueError(f"tasks[0]: the first task {self.tasks[0].name!r} must be binary, not a value task")
        for i, t in enumerate(self.tasks):
            if t.after is not None and t.after not in names:
                raise ValueError(f"tasks[{i}].after: {t.after!r} is not a task ({', '.join(names)})")
            if t.after is None:
                continue
            after = by_name[t.after]
            if after.is_value:
                raise ValueError(f"tasks[{i}].after: {t.after!r} is a value task; 'after' names a binary task")
            if not t.is_value and after.after is not None:
                raise ValueError(f"task {t.name!r}: after = {t.after!r} must name a task without 'after'")
        if dupes := repeated(self.label_columns):
            raise ValueError(f"task labels must be unique; repeated: {', '.join(dupes)}")
        in_table = [f.name for f in (*self.features.sparse, *self.features.numeric) if f.table == "table"]
        if self.table is None:
            if in_table:
                raise ValueError(f"features {', '.join(in_table)} read table = 'table' but there is no [table] section")
            if bad := [t.label_column for t in self.tasks if not t.is_value and t.label_column not in EVENT_LABELS]:
                raise ValueError(f"event logs label click and conversion only; task labels {bad} need a [table] source")
            for i, t in enumerate(self.tasks):
                if t.is_value and t.label_column not in EVENT_VALUE_LABELS:
                    raise ValueError(
                        f"tasks[{i}].label: {t.label_column!r} is not a numeric column of the event logs' training "
                        f"table ({', '.join(EVENT_VALUE_LABELS)}); other value labels need a [table] source"
                    )
        else:
            others = [f.name for f in (*self.features.sparse, *self.features.numeric) if f.table != "table"]
            if others or self.features.aggregate_keys:
                raise ValueError(
                    "a [table] source reads every feature from the table: set table = 'table' on "
                    f"{', '.join(others) or 'every feature'} and drop aggregate_keys"
                )
        return self

    def check_view_metrics(
        self, key: str, chosen: Sequence[str | None], kinds: str, value_kinds: str | None = None
    ) -> None:
        """ValueError naming the config ``key`` when a metric of ``chosen`` is not
        ``<task view>_<kind>``, ``kinds`` being e.g. ``"auc|gauc"`` (None: the default), nor
        ``<value task>_<value kind>`` of ``value_kinds`` (e.g. ``"rmse|mae|gini"``)."""
        views, values = list(self.views()), list(self.value_views())
        known = {f"{v}_{m}" for v in views for m in kinds.split("|")}
        if value_kinds:
            known |= {f"{v}_{m}" for v in values for m in value_kinds.split("|")}
        if bad := [m for m in chosen if m is not None and m not in known]:
            choices = f"<view>_<{kinds}> with a view among {', '.join(views)}"
            if value_kinds and values:
                choices += f", or <value task>_<{value_kinds}> with a value task among {', '.join(values)}"
            raise ValueError(f"{key}: unknown metric {', '.join(bad)}; choose {choices}")

    def views(self) -> dict[str, tuple[str, str | None]]:
        return task_views(self.tasks)

    def value_views(self) -> dict[str, ValueView]:
        return value_views(self.tasks)

    @property
    def label_columns(self) -> list[str]:
        """The tasks' label columns (0/1, and a value task's numeric one), in task order
        (what the training tables hold)."""
        return [t.label_column for t in self.tasks]

    @property
    def value_label_columns(self) -> list[str]:
        """The value tasks' numeric label columns."""
        return [t.label_column for t in self.tasks if t.is_value]
