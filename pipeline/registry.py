"""The MLflow model registry side of the nightly run: who the champion is, its weights,
logging a bundle to its training run, registering a candidate, and the promotion gate.

A registered model version's source is the serving bundle logged to its training run
(``runs:/<run id>/bundle``), so ``models:/<name>@champion`` downloads a bundle the
torch-free scorer loads. The torch weights (for warm starts and for evaluating the
champion on new days) are the ``checkpoint/best.pt`` artifact of the same run, with the
run's ``config.toml`` saying which architecture they belong to.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from features.config import ConfigError
from features.errors import StageError
from models.tracking import tracking_uri
from pipeline.config import FunnelConfig, load_config

CHAMPION = "champion"


@dataclass(frozen=True)
class Champion:
    version: int
    run_id: str


@dataclass(frozen=True)
class GateDecision:
    promote: bool
    reason: str


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
    if [(t.name, t.after) for t in a.tasks] != [(t.name, t.after) for t in b.tasks]:
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


def log_bundle_to_mlflow(state_dir: Path, run_id: str, folder: Path, bundle_sha256: str) -> str:
    """Log the bundle folder as the artifacts ``bundle/`` of MLflow run ``run_id`` (once per
    bundle: the run's ``bundle.sha256`` tag records what was logged) and return its URI."""
    client = MlflowClient(tracking_uri(state_dir))
    try:
        run = client.get_run(run_id)
        if run.data.tags.get("bundle.sha256") != bundle_sha256:
            client.log_artifacts(run_id, str(folder), "bundle")
            client.set_tag(run_id, "bundle.sha256", bundle_sha256)
    except MlflowException as err:
        raise StageError(
            f"cannot log bundle {folder} to MLflow run {run_id} at {tracking_uri(state_dir)}: {err}"
        ) from None
    return f"runs:/{run_id}/bundle"


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
    """Promote when the calibration of every served probability (click, ctcvr) is within
    bounds and, against a champion, no gate metric falls by more than the tolerance; the
    first model must clear ``min_auc`` instead. ``change_se`` (view -> standard error of the
    AUC's change, from evaluate) only annotates the reason, so a reader sees whether a
    change stands out of the evaluation day's noise; it does not decide."""
    rules, problems = cfg.promote, []

    def noise(metric: str) -> str:
        se = (change_se or {}).get(metric.removesuffix("_auc")) if metric.endswith("_auc") else None
        return f" ± {se:.4f}" if se is not None else ""

    for view in gate_calibrations(cfg):
        value = candidate.get(view, float("nan"))
        if not rules.calibration_min <= value <= rules.calibration_max:
            problems.append(f"{view} {value:.3f} outside [{rules.calibration_min}, {rules.calibration_max}]")
    for metric in cfg.gate_metrics:
        value = candidate.get(metric, float("nan"))
        if champion is None:
            if not value >= rules.min_auc:
                problems.append(f"{metric} {value:.4f} below the first model's bound {rules.min_auc}")
        elif not value >= champion[metric] - rules.auc_tolerance:
            problems.append(
                f"{metric} {value:.4f} fell {champion[metric] - value:.4f}{noise(metric)} below the champion's "
                f"{champion[metric]:.4f} (tolerance {rules.auc_tolerance})"
            )
    if problems:
        return GateDecision(False, "; ".join(problems))
    if champion is None:
        return GateDecision(True, "first model: passes the absolute bounds")
    gains = ", ".join(f"{m} {candidate[m] - champion[m]:+.4f}{noise(m)}" for m in cfg.gate_metrics)
    return GateDecision(True, f"no gate metric regressed beyond {rules.auc_tolerance} ({gains})")


def gate_calibrations(cfg: FunnelConfig) -> list[str]:
    """The calibration metrics the gate bounds: one per served probability."""
    return [f"{t.served_name}_calibration" for t in cfg.tasks]


def set_champion(cfg: FunnelConfig, version: int) -> None:
    registry_client(cfg).set_registered_model_alias(cfg.promote.model_name, CHAMPION, str(version))


def tag_version(cfg: FunnelConfig, version: int, tags: dict[str, str]) -> None:
    client = registry_client(cfg)
    for key, value in tags.items():
        client.set_model_version_tag(cfg.promote.model_name, str(version), key, value)
