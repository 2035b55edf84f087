"""The MLflow model registry side of the nightly run: who the champion is, its weights,
logging a bundle to its training run, registering a candidate, and the promotion gate.

A registered model version's source is the serving bundle logged to its training run as
an MLflow pyfunc model (``runs:/<run id>/bundle``: serving.mlflow_model, the bundle folder
its artifact), so ``models:/<name>@champion`` is a model ``mlflow.pyfunc.load_model`` and
``mlflow models serve`` run, and a bundle the torch-free scorer loads
(serving.bundle.load_bundle_from_mlflow finds its one manifest). The torch weights (for
warm starts and for evaluating the champion on new days) are the ``checkpoint/best.pt``
artifact of the same run, with the run's ``config.toml`` saying which architecture they
belong to.
"""

from __future__ import annotations

import importlib.metadata
import math
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from statistics import NormalDist
from typing import TYPE_CHECKING, get_args

import mlflow.pyfunc
import pyarrow as pa
import torch
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature, infer_signature
from mlflow.tracking import MlflowClient
from mlflow.types import ColSpec, Schema
from packaging.requirements import Requirement

import serving
from features.config import ConfigError
from features.errors import StageError
from models.quiet import library_noise_silenced
from models.tracking import tracking_uri
from pipeline.config import FunnelConfig, PromoteConfig, load_config
from serving.bundle import load_bundle
from serving.histories import RECENT
from serving.mlflow_model import BUNDLE_ARTIFACT, BundleModel
from serving.scorer import Scorer

if TYPE_CHECKING:
    import pandas as pd

CHAMPION = "champion"
EXAMPLE_ROWS = 3  # rows of a logged model's input example
VALUE_ERRORS = ("_rmse", "_mae")  # gate metric suffixes where lower is better (value tasks)


@dataclass(frozen=True)
class Champion:
    version: int
    run_id: str


@dataclass(frozen=True)
class MetricCheck:
    """One gate metric against the champion's: the change (candidate - champion), its paired
    standard error (None where there is none: a GAUC, an older evaluation), the one-sided
    bounds of the change at ``promote.confidence`` (None under the point rule or without a
    standard error) and whether it passes the rule it was judged by."""

    change: float
    se: float | None
    lower: float | None
    upper: float | None
    rule: str  # the rule it was judged by: promote.rule, or point where there is no standard error
    passed: bool


@dataclass(frozen=True)
class GateDecision:
    promote: bool
    reason: str
    rule: str = "point"
    checks: dict[str, MetricCheck] = field(default_factory=dict)  # gate metric -> its check (against a champion)

    def tags(self) -> dict[str, str]:
        """The registry tags of the decision: the rule, and per gate metric its change,
        standard error, bounds and verdict."""
        tags = {"promotion_rule": self.rule}
        for metric, check in self.checks.items():
            for name in ("change", "se", "lower", "upper"):
                if (value := getattr(check, name)) is not None:
                    tags[f"gate.{metric}.{name}"] = f"{value:.6f}"
            tags[f"gate.{metric}.rule"] = check.rule
            tags[f"gate.{metric}.passed"] = str(check.passed).lower()
        return tags


def registry_client(cfg: FunnelConfig) -> MlflowClient:
    return MlflowClient(tracking_uri=tracking_uri(cfg.state_dir), registry_uri=tracking_uri(cfg.state_dir))


def current_champion(cfg: FunnelConfig) -> Champion | None:
    """The version behind the ``champion`` alias, or None before the first promotion."""
    client = registry_client(cfg)
    try:
        version = client.get_model_version_by_alias(cfg.promote.model_name, CHAMPION)
    except MlflowException:
        return None
    return Champion(int(version.version), version.run_id)


def champion_weights(cfg: FunnelConfig, champion: Champion) -> tuple[FunnelConfig | None, dict[str, torch.Tensor]]:
    """The config the champion was trained with (None when it no longer validates: a
    champion of an older funnelrank, whose weights then fit no model of this one) and its
    best epoch's plain state_dict."""
    client = registry_client(cfg)
    with tempfile.TemporaryDirectory(prefix="funnelrank-champion-") as tmp:
        config_path = client.download_artifacts(champion.run_id, "config.toml", tmp)
        checkpoint = client.download_artifacts(champion.run_id, "checkpoint/best.pt", tmp)
        try:
            champion_cfg = load_config(Path(config_path))
        except ConfigError:
            champion_cfg = None
        state = torch.load(checkpoint, weights_only=False)["model"]
    return champion_cfg, state


def same_architecture(a: FunnelConfig | None, b: FunnelConfig) -> str | None:
    """None when weights of a model trained with ``a`` fit ``b``'s model, else why not.

    Vocabulary capacities may grow (append-only vocabularies keep old rows' meaning);
    everything else that shapes a tensor must be equal. ``a`` None: a config this version
    of funnelrank cannot read.
    """
    if a is None:
        return "its training config does not validate in this version of funnelrank (an older config schema)"
    # the calibrators are fitted afresh by every run (models.calibration): their method is no shape of the weights
    calibration = {"calibration", "calibration_segments"}
    if a.model.model_dump(exclude=calibration) != b.model.model_dump(exclude=calibration):
        return "the [model] section differs"
    if [(t.name, t.after, t.kind, t.value_loss) for t in a.tasks] != [
        (t.name, t.after, t.kind, t.value_loss) for t in b.tasks
    ]:
        return "the tasks differ"
    if a.features.dense_names() != b.features.dense_names():
        return "the dense features differ"
    shape = [(f.name, f.kind, f.dim, f.pooling, f.boundaries) for f in a.features.sparse]  # new boundaries: new buckets
    if shape != [(f.name, f.kind, f.dim, f.pooling, f.boundaries) for f in b.features.sparse]:
        return "the sparse features (names, kinds, dims, pooling or bucket boundaries) differ"
    # max_length, max_age_days, event and key change the data, not a tensor's shape
    encoded = [(s.name, s.items, s.encoder, s.attention_heads) for s in a.features.sequences]
    if encoded != [(s.name, s.items, s.encoder, s.attention_heads) for s in b.features.sequences]:
        return "the sequences (names, carried features, encoders or attention heads) differ"
    return None


def serving_requirements() -> list[str]:
    """The pip requirements of the serving extra (pyproject's ``[project.optional-dependencies]
    serving``, read from the installed funnelrank's metadata): all a logged model needs."""
    wanted = []
    for line in importlib.metadata.requires("funnelrank") or []:
        req = Requirement(line)
        if req.marker is not None and req.marker.evaluate({"extra": "serving"}):
            wanted.append(f"{req.name}{req.specifier}")
    if not wanted:
        raise StageError("the installed funnelrank's metadata lists no serving extra: reinstall it (`make venv`)")
    return wanted


def example_rows(scorer: Scorer, rows: pa.Table, n: int = EXAMPLE_ROWS) -> pd.DataFrame:
    """The pyfunc model's input example: ``n`` of ``rows`` (raw rows the scorer takes) with
    the columns it reads; an events bundle with a behaviour sequence also gets a ``recent``
    event per row (a click on another row's item at the start of the bundle's as-of day)."""
    events = scorer.spec.events
    columns = list(scorer.required_columns)
    if events is not None:
        columns += [c for c in scorer.inputs.context_columns if c in rows.column_names]
    example = rows.select(columns).slice(0, n)
    if events is not None and events.sequences:
        ts = f"{events.features_as_of.isoformat()}T00:00:00Z"
        items = example.column("item_id").to_pylist()
        recent = [[{"item_id": items[(i + 1) % len(items)], "event": "click", "ts": ts}] for i in range(len(items))]
        example = example.append_column(RECENT, pa.array(recent))
    return example.to_pandas()


def model_signature(scorer: Scorer, example: pd.DataFrame) -> ModelSignature:
    """Inputs: the example's columns and types, those the scorer can do without (context,
    ``recent``) optional; outputs: the scorer's (``p_<task>`` per task of the bundle's spec,
    then ``score``), float32."""
    required = set(scorer.required_columns)
    inferred = infer_signature(example).inputs.inputs
    inputs = Schema([ColSpec(c.type, c.name, required=c.name in required) for c in inferred])
    return ModelSignature(inputs, Schema([ColSpec("float", name) for name in scorer.result_names]))


def log_bundle_to_mlflow(
    state_dir: Path, run_id: str, folder: Path, bundle_sha256: str, rows: pa.Table, artifact: str = "bundle"
) -> str:
    """Log the bundle folder as an MLflow pyfunc model at the artifacts ``artifact`` of MLflow
    run ``run_id`` (once per bundle: the run's ``<artifact>.sha256`` tag records what was
    logged) and return its URI. The model (serving.mlflow_model.BundleModel): the bundle as
    its artifact, the ``serving`` package as its code, the serving extra as its pip
    requirements, a signature and an input example from ``rows`` (raw rows the scorer takes)."""
    client = MlflowClient(tracking_uri(state_dir))
    try:
        run = client.get_run(run_id)
        if run.data.tags.get(f"{artifact}.sha256") != bundle_sha256:
            scorer = Scorer(load_bundle(folder))
            example = example_rows(scorer, rows)
            # MLflow warns, every night: that the python model is pickled (the pickle holds a
            # reference to serving.mlflow_model.BundleModel, no state), that integer columns
            # cannot be null (the context's ids are integers or absent), and says it checks
            # the example against the signature
            quiet = library_noise_silenced("mlflow")
            with tempfile.TemporaryDirectory(prefix="funnelrank-pyfunc-") as tmp, quiet:
                model_dir, code = Path(tmp) / artifact, Path(tmp) / "serving"
                code.mkdir()
                for module in Path(serving.__file__).parent.glob("*.py"):  # the sources, no caches
                    shutil.copy2(module, code)
                mlflow.pyfunc.save_model(
                    str(model_dir),
                    python_model=BundleModel(),
                    artifacts={BUNDLE_ARTIFACT: str(folder)},
                    code_paths=[str(code)],
                    pip_requirements=serving_requirements(),
                    signature=model_signature(scorer, example),
                    input_example=example,
                )
                client.log_artifacts(run_id, str(model_dir), artifact)
            client.set_tag(run_id, f"{artifact}.sha256", bundle_sha256)
    except MlflowException as err:
        raise StageError(
            f"cannot log bundle {folder} to MLflow run {run_id} at {tracking_uri(state_dir)}: {err}"
        ) from None
    return f"runs:/{run_id}/{artifact}"


def register_candidate(cfg: FunnelConfig, train_run_id: str, bundle_uri: str, tags: dict[str, str]) -> int:
    """Register the candidate's bundle as a model version (once per training run)."""
    client = registry_client(cfg)
    name = cfg.promote.model_name
    try:
        client.get_registered_model(name)
    except MlflowException:
        client.create_registered_model(name, description="funnelrank click -> conversion ranker (serving bundle)")
    existing = client.search_model_versions(f"name='{name}' and run_id='{train_run_id}'")
    if existing:
        return int(existing[0].version)
    version = client.create_model_version(name, bundle_uri, run_id=train_run_id, tags=tags)
    return int(version.version)


def gate(
    candidate: dict[str, float],
    champion: dict[str, float] | None,
    cfg: FunnelConfig,
    change_se: dict[str, float] | None = None,
) -> GateDecision:
    """Promote when the calibration of every served probability (click, ctcvr) and value
    task is within bounds and, against a champion, every gate metric passes ``promote.rule``
    (see ``check_change``); the first model must clear ``min_auc`` (a gini: ``min_gini``; an
    rmse or mae has no absolute bound) instead. ``change_se``: task view -> the paired
    standard error of its AUC's change, from evaluate.

    A value task's rmse or mae (lower is better) is judged by its relative fall
    (champion - candidate) / champion against ``value_error_tolerance``, by the point rule."""
    rules, problems, checks = cfg.promote, [], {}
    for view in gate_calibrations(cfg):
        value = candidate.get(view, float("nan"))
        if not rules.calibration_min <= value <= rules.calibration_max:
            problems.append(f"{view} {value:.3f} outside [{rules.calibration_min}, {rules.calibration_max}]")
    for metric in cfg.gate_metrics:
        value = candidate.get(metric, float("nan"))
        error = metric.endswith(VALUE_ERRORS)
        if champion is None:
            bound = rules.min_gini if metric.endswith("_gini") else rules.min_auc
            if not error and not value >= bound:
                problems.append(f"{metric} {value:.4f} below the first model's bound {bound}")
            continue
        if error:
            old = champion[metric]
            checks[metric] = check = check_change((old - value) / old, None, cfg, rules.value_error_tolerance)
            if not check.passed:
                problems.append(
                    f"{metric} {value:.4f} rose {-check.change:.1%} above the champion's {old:.4f} (tolerance "
                    f"{rules.value_error_tolerance:.1%}: {_FAILS[check.rule]})"
                )
            continue
        se = (change_se or {}).get(metric.removesuffix("_auc")) if metric.endswith("_auc") else None
        checks[metric] = check = check_change(value - champion[metric], se, cfg)
        if not check.passed:
            moved = "fell" if check.change < 0 else "rose"
            noise = f" ± {se:.4f}" if se is not None else ""
            bounds = f", bounds {check.lower:+.4f}, {check.upper:+.4f}" if check.lower is not None else ""
            problems.append(
                f"{metric} {value:.4f} {moved} {abs(check.change):.4f}{noise} "
                f"{'below' if check.change < 0 else 'above'} the champion's {champion[metric]:.4f} "
                f"(tolerance {rules.auc_tolerance}{bounds}: {_FAILS[check.rule]})"
            )
    rule = f"rule {rules.rule}" + (f" ({rules.confidence:.0%} one-sided bounds)" if rules.rule != "point" else "")
    if problems:
        return GateDecision(False, f"{rule}: " + "; ".join(problems), rules.rule, checks)
    if champion is None:
        return GateDecision(True, "first model: passes the absolute bounds", rules.rule, checks)
    changes = ", ".join(f"{m} {_change(c)}" for m, c in checks.items())
    passes = _PASSES[rules.rule].format(tolerance=rules.auc_tolerance)
    return GateDecision(True, f"{rule}: {passes} ({changes})", rules.rule, checks)


# why every check passed, by promote.rule
_PASSES = {
    "point": "no gate metric regressed beyond {tolerance}",
    "non_inferiority": "every gate metric is shown to be within {tolerance} of the champion's or better",
    "not_worse": "no gate metric fell significantly more than {tolerance}",
}
# why a check failed, by the rule it was judged by
_FAILS = {
    "point": "a drop beyond the tolerance",
    "non_inferiority": "not shown to be within the tolerance",
    "not_worse": "a significant drop beyond the tolerance",
}


def check_change(change: float, se: float | None, cfg: FunnelConfig, tolerance: float | None = None) -> MetricCheck:
    """A gate metric's change (candidate - champion) judged by ``promote.rule`` with tolerance t
    (``promote.auc_tolerance`` unless given) and z the one-sided normal quantile of
    ``promote.confidence``:

    * point: passes when change >= -t (the standard error is not looked at);
    * non_inferiority: passes when the lower bound change - z se > -t (shown not worse than
      the tolerance: a noisy evaluation refuses);
    * not_worse: fails only when the upper bound change + z se < -t (a significant drop: a
      noisy evaluation promotes).

    Non-inferiority passing implies point passing implies not-worse passing. Without a finite
    standard error the change is judged by the point rule; a NaN change never passes."""
    rules = cfg.promote
    tolerance = rules.auc_tolerance if tolerance is None else tolerance
    if rules.rule == "point" or se is None or not math.isfinite(se):
        return MetricCheck(change, se, None, None, "point", change >= -tolerance)
    z = NormalDist().inv_cdf(rules.confidence)
    lower, upper = change - z * se, change + z * se
    passed = lower > -tolerance if rules.rule == "non_inferiority" else upper >= -tolerance
    return MetricCheck(change, se, lower, upper, rules.rule, passed)


def _change(check: MetricCheck) -> str:
    """'+0.0012 ± 0.0020', with the bounds where the rule used them: '... (bounds -0.0021, +0.0045)'."""
    text = f"{check.change:+.4f}" + (f" ± {check.se:.4f}" if check.se is not None else "")
    return text + (f" (bounds {check.lower:+.4f}, {check.upper:+.4f})" if check.lower is not None else "")


def rule_decisions(evaluation: dict, cfg: FunnelConfig) -> dict[str, GateDecision]:
    """What each promotion rule decides on one evaluation (evaluate's output): the rule in
    force and the others, for a comparison."""
    rules = get_args(PromoteConfig.model_fields["rule"].annotation)
    return {
        rule: gate(
            evaluation["candidate"],
            evaluation["champion"],
            cfg.model_copy(update={"promote": cfg.promote.model_copy(update={"rule": rule})}),
            evaluation.get("delta_auc_se"),
        )
        for rule in rules
    }


def gate_calibrations(cfg: FunnelConfig) -> list[str]:
    """The calibration metrics the gate bounds: one per served probability, one per value
    task (mean predicted / observed value, ``models.metrics.value_metrics``)."""
    return [f"{t.served_name}_calibration" for t in cfg.tasks]


def set_champion(cfg: FunnelConfig, version: int) -> None:
    registry_client(cfg).set_registered_model_alias(cfg.promote.model_name, CHAMPION, str(version))


def tag_version(cfg: FunnelConfig, version: int, tags: dict[str, str]) -> None:
    client = registry_client(cfg)
    for key, value in tags.items():
        client.set_model_version_tag(cfg.promote.model_name, str(version), key, value)
