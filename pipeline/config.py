"""The run config: one TOML file drives a whole run (generator, contract, features,
model, training, export, scoring, nightly runs, promotion).

``FunnelConfig`` composes the packages' own sections (``features.config.DataConfig``,
``models.config.TrainingConfig``) with the pipeline's: export, scoring, nightly and promotion.
Validated at load time: an unknown key, a wrong type or a missing required value is
reported by its dotted name (``features.sparse[2].dim``), never as a traceback.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationError, model_validator

from features.config import ConfigError, _Section
from models.config import TrainingConfig
from serving.spec import ScoringLimits

DEFAULT_CONFIG = Path("configs/demo.toml")
_LIMITS = ScoringLimits()  # the defaults of [scoring]


class ScoringConfig(_Section):
    """The scorer's limits (the blended score's exponents are ``tasks[].score_exponent``):
    what one HTTP client may hold. Exported into the bundle as serving.spec.ScoringLimits,
    which defines the defaults (a bundle without a key gets the same); ``funnelrank serve
    --config`` overrides them."""

    max_candidates: int = Field(
        _LIMITS.max_candidates, ge=1, le=1_000_000, description="HTTP: candidates per request at most"
    )
    max_body_bytes: int = Field(
        _LIMITS.max_body_bytes, ge=1024, le=1 << 30, description="HTTP: request body size limit"
    )
    max_context_value_chars: int = Field(
        _LIMITS.max_context_value_chars, ge=1, le=65_536, description="HTTP: a longer context value is a 400 naming it"
    )
    header_timeout_s: float = Field(
        _LIMITS.header_timeout_s,
        gt=0.0,
        le=3600.0,
        description="HTTP: from a request's first byte to the end of its headers (408, closed)",
    )
    body_timeout_s: float = Field(
        _LIMITS.body_timeout_s,
        gt=0.0,
        le=3600.0,
        description="HTTP: to receive a "
        "request's body after its headers (408, closed), and for the client to take the "
        "response",
    )
    idle_timeout_s: float = Field(
        _LIMITS.idle_timeout_s,
        gt=0.0,
        le=3600.0,
        description="HTTP: a keep-alive connection waiting this long for a request is closed",
    )
    max_connections: int = Field(
        _LIMITS.max_connections,
        ge=1,
        le=100_000,
        description="HTTP: open connections at most; over it the longest idle one is closed, or the new one gets 503",
    )
    drain_timeout_s: float = Field(
        _LIMITS.drain_timeout_s,
        ge=0.0,
        le=3600.0,
        description="HTTP: on SIGTERM, how long the requests in flight get to be answered",
    )
    max_recent_events: int = Field(
        _LIMITS.max_recent_events,
        ge=0,
        le=10_000,
        description="HTTP: a rank request's recent events at most (413 above; 0: none accepted)",
    )


class ExportConfig(_Section):
    """``export``: what precision the bundle's model has, and how much an int8 model may lose."""

    quantize: Literal["none", "int8"] = Field(
        "none",
        description="int8: onnxruntime dynamic quantisation of the dense layers (MatMul, Gemm; embeddings stay "
        "float32), measured against the float32 model on the validation day and refused beyond the bounds below; "
        "the bundle goes to bundles/<run key>-int8 and the MLflow artifacts bundle-int8",
    )
    max_auc_drop: float = Field(
        0.001, ge=0.0, lt=1.0, description="int8: refuse the export when any task view's AUC falls more than this"
    )
    max_calibration_change: float = Field(
        0.01,
        ge=0.0,
        lt=1.0,
        description="int8: refuse the export when any task view's calibration (mean predicted / observed) moves "
        "by more than this share of the float32 model's",
    )


class NightlyConfig(_Section):
    """``funnelrank nightly``: how each night's model starts and what it trains on."""

    warm_start: bool = Field(
        True,
        description="start from the champion's weights when the architecture matches; "
        "false = full retrain over train.window_days",
    )
    fine_tune_days: int = Field(
        1, ge=1, le=3650, description="warm start: train on this many newest mature days (plus the validation day)"
    )
    freeze_shared: bool = Field(
        False,
        description="warm start: train only the task towers, heads and gates; embeddings and shared layers stay frozen",
    )


class PromoteConfig(_Section):
    """The promotion gate: when the candidate becomes the ``champion`` alias."""

    model_name: str = Field("funnelrank", min_length=1, description="registered model name in the MLflow registry")
    auc_tolerance: float = Field(
        0.005, ge=0.0, lt=1.0, description="largest AUC drop vs the champion allowed on any task"
    )
    rule: Literal["point", "non_inferiority", "not_worse"] = Field(
        "point",
        description="against a champion: point = refuse when a gate metric's change (candidate - champion) is "
        "below -auc_tolerance; non_inferiority = promote only when the lower bound of the change's one-sided "
        "confidence interval is above -auc_tolerance for every gate metric; not_worse = refuse only when the "
        "upper bound is below -auc_tolerance (a significant drop). The bounds use the change's paired standard "
        "error from evaluate",
    )
    confidence: float = Field(
        0.95, ge=0.5, lt=1.0, description="non_inferiority, not_worse: one-sided confidence of the bounds"
    )
    gate_metrics: list[str] | None = Field(
        None,
        min_length=1,
        description="<task view>_<auc|gauc> or <value task>_<gini|rmse|mae>; default: every task view's auc",
    )
    min_auc: float = Field(0.55, ge=0.0, le=1.0, description="first model: every auc / gauc gate metric at least this")
    min_gini: float = Field(
        0.0, ge=-1.0, le=1.0, description="first model: every <value task>_gini gate metric at least this"
    )
    value_error_tolerance: float = Field(
        0.05,
        ge=0.0,
        le=10.0,
        description="largest relative rise of a <value task>_<rmse|mae> gate metric over the champion's allowed "
        "(0.05 = 5%); a gini gate metric has auc_tolerance",
    )
    calibration_min: float = Field(
        0.8,
        gt=0.0,
        description="mean predicted / observed rate of every served probability (and mean predicted / observed "
        "value of every value task)",
    )
    calibration_max: float = Field(1.25, gt=0.0)

    @model_validator(mode="after")
    def _bounds_ordered(self) -> PromoteConfig:
        if self.calibration_min >= self.calibration_max:
            raise ValueError(
                f"calibration_min ({self.calibration_min}) must be below calibration_max ({self.calibration_max})"
            )
        return self


class FunnelConfig(TrainingConfig):
    """Everything a run reads: the training config, the scorer's limits, the nightly runs
    and the promotion gate."""

    scoring: ScoringConfig = ScoringConfig()
    export: ExportConfig = ExportConfig()
    nightly: NightlyConfig = NightlyConfig()
    promote: PromoteConfig = PromoteConfig()

    @model_validator(mode="after")
    def _known_gate_metrics(self) -> FunnelConfig:
        self.check_view_metrics("promote.gate_metrics", self.promote.gate_metrics or [], "auc|gauc", "gini|rmse|mae")
        if self.promote.rule != "point" and (no_se := [m for m in self.gate_metrics if not m.endswith("_auc")]):
            raise ValueError(
                f"promote.rule = {self.promote.rule!r} bounds each gate metric's change with its standard error, "
                f"which only AUCs have: {', '.join(no_se)} has none; use <view>_auc or rule 'point'"
            )
        return self

    def run_identity(self) -> dict:
        """The config a training run is identified by: all but ``export``, which shapes the
        bundle and not the model (one trained run exports a float32 and an int8 bundle)."""
        return self.model_dump(mode="json", exclude={"export"})

    @property
    def gate_metrics(self) -> list[str]:
        return self.promote.gate_metrics or [f"{v}_auc" for v in self.views()]


def _format_errors(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        key = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in e["loc"]).lstrip(".") or "<root>"
        key = key.replace("validate_", "validate")
        if e["type"] == "extra_forbidden":
            lines.append(f"  {key}: unknown key")
        elif e["type"] == "missing":
            lines.append(f"  {key}: required value missing")
        else:
            got = e.get("input")
            shown = "" if isinstance(got, dict | list) else f" (got {got!r})"
            lines.append(f"  {key}: {e['msg']}{shown}")
    return "\n".join(lines)


def parse_config(data: dict, source: str = "<dict>") -> FunnelConfig:
    """Validate a config mapping; raise ConfigError naming every bad key."""
    try:
        return FunnelConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(f"invalid config {source}:\n{_format_errors(err)}") from None


def load_config(path: str | Path = DEFAULT_CONFIG, overrides: dict | None = None) -> FunnelConfig:
    """Read and validate a TOML config. ``overrides`` is a nested dict merged on top."""
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as err:
        raise ConfigError(f"cannot read config {path}: {err.strerror}") from None
    except UnicodeDecodeError as err:
        raise ConfigError(
            f"config {path} is not UTF-8 text (TOML is): byte {err.object[err.start]:#04x} at offset {err.start}"
        ) from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"config {path} is not valid TOML: {err}") from None
    return parse_config(_merge(data, overrides or {}), str(path))


def _merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for k, v in top.items():
        out[k] = _merge(out.get(k, {}), v) if isinstance(v, dict) else v
    return out
