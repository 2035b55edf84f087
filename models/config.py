"""The model and training sections of the run config (``TrainingConfig``): what
``models`` reads on top of the data sections of ``features.config``."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from features.catalog import default_state_dir
from features.config import DataConfig, FeaturesConfig, SequenceFeature, TomlPath, _Section

# Upper bounds on the network's sizes (generous: beyond them a value can only be a typo).
MAX_LAYER_SIZE = 65_536
MAX_LAYERS = 64
MAX_EXPERTS = 256


class ModelConfig(_Section):
    """The multi-task network (models/nets.py): backbone, conversion head, loss weighting."""

    backbone: Literal["single_task", "shared_bottom", "soft_sharing", "mmoe", "ple"] = "mmoe"
    conversion_head: Literal["direct", "esmm"] = Field(
        "esmm", description="direct: pCVR on clicked rows; esmm: pCTCVR = pCTR x pCVR on all impressions"
    )
    loss_weighting: Literal["fixed", "uncertainty", "dwa", "gradnorm", "pcgrad"] = Field(
        "fixed",
        description="fixed: tasks[].loss_weight; uncertainty: learned (Kendall et al. 2018); dwa: dynamic weight "
        "average (Liu et al. 2019); gradnorm: learned to balance gradient norms (Chen et al. 2018); pcgrad: fixed "
        "weights, conflicting gradients on the shared dense layers projected (Yu et al. 2020)",
    )
    dwa_temperature: float = Field(2.0, gt=0.0, le=100.0, description="dwa: softmax temperature T")
    # A nightly run takes a few hundred steps (the demo: 3 x 146), where the paper's one-epoch
    # window would change the weights once at most; 20 batches still average out their noise.
    dwa_window_steps: int = Field(
        20, ge=1, le=1_000_000, description="dwa: steps per window whose mean losses are compared"
    )
    gradnorm_alpha: float = Field(
        1.5, ge=0.0, le=10.0, description="gradnorm: asymmetry; how strongly slower tasks get larger gradients"
    )
    gradnorm_lr_scale: float = Field(
        10.0, gt=0.0, le=1e4, description="gradnorm: the weights' learning rate in units of train.dense_lr"
    )
    expert_dims: list[int] = Field(
        default_factory=lambda: [128, 64],
        min_length=1,
        max_length=MAX_LAYERS,
        description=f"hidden sizes of each expert (mmoe), the shared bottom, or each task's network; "
        f"each 1 to {MAX_LAYER_SIZE}",
    )
    tower_dims: list[int] = Field(
        default_factory=lambda: [32],
        max_length=MAX_LAYERS,
        description=f"hidden sizes of each task's tower, each 1 to {MAX_LAYER_SIZE}",
    )
    n_experts: int = Field(4, ge=1, le=MAX_EXPERTS, description=f"mmoe: experts, at most {MAX_EXPERTS}")
    ple_levels: int = Field(
        2, ge=1, le=MAX_LAYERS, description="ple: extraction (CGC) levels; 1 = a single customised gate control layer"
    )
    ple_shared_experts: int = Field(2, ge=1, le=MAX_EXPERTS, description="ple: shared experts per level")
    ple_task_experts: int = Field(1, ge=1, le=MAX_EXPERTS, description="ple: experts of each task per level")
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    soft_sharing_strength: float = Field(1e-3, ge=0.0, le=1e3, description="L2 pull between the task networks' weights")
    cross_layers: int = Field(
        0,
        ge=0,
        le=MAX_LAYERS,
        description="DCN-v2 cross layers on the backbone input (explicit feature crosses, e.g. user x item); 0 = none",
    )
    interaction: Literal["none", "dot"] = Field(
        "none",
        description="dot: pairwise dot products of the pooled embeddings (and sequence encodings) join the "
        "backbone input, as DLRM's interaction arch",
    )
    interaction_groups: list[list[str]] = Field(
        default_factory=list,
        max_length=MAX_LAYERS,
        description="interaction = 'dot': groups of sparse feature / sequence names; two or more groups: the "
        "products of every pair across groups (e.g. user side x item side); one: the pairs within it; "
        "none: every pair of all sparse features and sequences",
    )
    interaction_dim: int = Field(
        0,
        ge=0,
        le=MAX_LAYER_SIZE,
        description="interaction = 'dot': 0 = the members' common embedding dim (they must share one); else each "
        "member is projected (linear, no bias) to this dim first",
    )
    sequence_attention_dims: list[int] = Field(
        default_factory=lambda: [16],
        min_length=1,
        max_length=MAX_LAYERS,
        description="encoder = 'din': hidden sizes of the MLP that weighs each history element against the candidate",
    )
    calibration: Literal["none", "platt", "isotonic"] = Field(
        "platt",
        description="per-task calibrator fitted on the validation day after training, part of the exported graph "
        "(models/calibration.py): platt = slope and bias on the logit; isotonic = a monotone piecewise-linear "
        "map of the logit; none = identity",
    )
    calibration_segments: int = Field(
        32, ge=2, le=1024, description="isotonic: segments of the piecewise-linear map (between logit quantiles)"
    )

    @field_validator("expert_dims", "tower_dims", "sequence_attention_dims")
    @classmethod
    def _positive_dims(cls, v: list[int]) -> list[int]:
        if any(not 1 <= d <= MAX_LAYER_SIZE for d in v):
            raise ValueError(f"layer sizes must be from 1 to {MAX_LAYER_SIZE}")
        return v


def sequence_element_dim(spec: FeaturesConfig, sequence: SequenceFeature) -> int:
    """The size of one history element's vector (and of its encoding): the carried features'
    embedding dims side by side."""
    dims = {f.name: f.dim for f in spec.sparse}
    return sum(dims[name] for name in sequence.items)


class TrainConfig(_Section):
    """Training (models/train.py): the window of mature days, optimisers, early stopping."""

    window_days: int = Field(7, ge=2, le=3650, description="mature days used; the newest is the validation day")
    min_window_days: int = Field(
        3,
        ge=2,
        le=3650,
        description="a young warehouse (fewer mature days than window_days) trains on the days it has once "
        "there are this many; before that the nightly run skips train, evaluate, export and promote",
    )
    epochs: int = Field(3, ge=1, le=10_000, description="at most 10,000")
    # The global batch: a torchrun job of N ranks gives each rank batch_size / N rows per
    # step (batch_size must divide evenly), so steps per epoch, learning rates and results
    # stay comparable whatever the world size; raise it to scale per-GPU work.
    batch_size: int = Field(
        4096, ge=1, le=1 << 24, description="global batch, split evenly over the ranks of a torchrun job; at most 2**24"
    )
    sparse_optimizer: Literal["rowwise_adagrad", "adam"] = Field(
        "rowwise_adagrad", description="fused into the embedding backward; adam needs a CUDA device"
    )
    sparse_lr: float = Field(0.05, gt=0.0)
    dense_lr: float = Field(1e-3, gt=0.0)
    weight_decay: float = Field(1e-5, ge=0.0, description="AdamW, dense parameters only")
    lr_schedule: Literal["constant", "cosine"] = Field(
        "constant", description="dense learning rate: constant, or cosine decay from dense_lr to 0 over train.epochs"
    )
    early_stopping_metric: str | None = Field(
        None,
        description="<task view>_<auc|gauc|logloss|ece>, e.g. click_auc or ctcvr_logloss, or <value task>_<rmse|mae|"
        "gini>; default: the first task's auc",
    )
    patience: int = Field(2, ge=1, description="stop after this many epochs without improvement")
    shuffle_buffer_rows: int = Field(262_144, ge=1, le=1 << 30, description="at most 2**30")
    threads: int = Field(0, ge=0, le=1024, description="torch CPU threads; 0 = all cores; at most 1024")
    log_every_steps: int = Field(50, ge=1)
    relatedness_every_steps: int = Field(
        10,
        ge=0,
        le=1_000_000,
        description="every this many steps the tasks' gradients on the shared layers are compared (cosine, "
        "conflicts), reported per epoch; 0 = never",
    )
    sharding: Literal["auto", "table_wise", "row_wise", "column_wise", "data_parallel"] = Field(
        "table_wise",
        description="embedding tables over the ranks: auto = torchrec's planner picks among the sharded "
        "types; row_wise needs CUDA; data_parallel replicates the tables and trains them with the dense optimiser",
    )
    mixed_precision: bool = Field(True, description="bf16 autocast of the dense layers on CUDA; no effect on the CPU")
    negative_sampling_rate: float = Field(
        1.0,
        gt=0.0,
        le=1.0,
        description="r: training keeps every positive of the first task and a seeded fraction r of its negatives "
        "(the same rows every epoch); the model adds log r to that task's logit, so what it serves and "
        "validates is the unsampled rate; 1 = every row",
    )
    sample_weight: str | None = Field(
        None,
        min_length=1,
        description="a SQL expression over the training table's columns (a column name, or e.g. "
        "'1 + 4 * click') multiplying each training row's loss; none = 1",
    )

    @field_validator("sample_weight")
    @classmethod
    def _weight_parses(cls, v: str | None) -> str | None:
        if v is not None:
            sample_weight_expression(v)
        return v


def sample_weight_expression(text: str):
    """``train.sample_weight`` as a polars expression; ValueError when it does not parse."""
    import polars as pl

    try:
        expression = pl.sql_expr(text)
    except (pl.exceptions.PolarsError, ValueError) as err:
        raise ValueError(f"not a SQL expression over the training table's columns: {err}") from None
    if not expression.meta.root_names():
        raise ValueError("names no column of the training table (a constant weight changes nothing)")
    return expression


class TrainingConfig(DataConfig):
    """The data sections, where checkpoints and MLflow runs live, the network and its training."""

    # MLflow store, checkpoints, bundles, nightly records; default <warehouse>/state (see
    # features.catalog.default_state_dir), so the state of two warehouses never mixes
    state_dir: TomlPath
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()

    def run_identity(self) -> dict:
        """What identifies a training run's config (models.train.run_key hashes it): all of it.
        A config that adds settings of what happens after training excludes them."""
        return self.model_dump(mode="json")

    @model_validator(mode="before")
    @classmethod
    def _state_of_the_warehouse(cls, data: object) -> object:
        if isinstance(data, dict) and data.get("state_dir") is None:
            warehouse = data.get("warehouse", cls.model_fields["warehouse"].default)
            return {**data, "state_dir": default_state_dir(warehouse)}
        return data

    @model_validator(mode="after")
    def _known_early_stopping_metric(self) -> TrainingConfig:
        self.check_view_metrics(
            "train.early_stopping_metric", [self.train.early_stopping_metric], "auc|gauc|logloss|ece", "rmse|mae|gini"
        )
        return self

    @model_validator(mode="after")
    def _interaction_members_exist(self) -> TrainingConfig:
        mcfg, spec = self.model, self.features
        dims = {f.name: f.dim for f in spec.sparse} | {s.name: sequence_element_dim(spec, s) for s in spec.sequences}
        for i, group in enumerate(mcfg.interaction_groups):
            for j, name in enumerate(group):
                if name not in dims:
                    raise ValueError(
                        f"model.interaction_groups[{i}][{j}]: {name!r} is not a sparse feature or sequence "
                        f"({', '.join(dims)})"
                    )
        members = [n for g in mcfg.interaction_groups for n in g] or list(dims)
        if mcfg.interaction == "dot" and mcfg.interaction_dim == 0 and len({dims[n] for n in members}) > 1:
            sizes = ", ".join(f"{n} {dims[n]}" for n in members)
            raise ValueError(
                f"model.interaction_dim: 0 needs one embedding dim for every interaction member ({sizes}); "
                "set interaction_dim to project them to one"
            )
        return self

    @model_validator(mode="after")
    def _sampling_keeps_funnel_steps_exact(self) -> TrainingConfig:
        # Sampling the first task's negatives keeps every row a funnel step after it can be
        # positive on, so its conditional is unchanged; another task's rate would move by an
        # amount no offset undoes.
        # A value task learns on its after task's positives: all kept when that task is the
        # first or a step after it.
        first = self.tasks[0].name
        steps = {first, *(t.name for t in self.tasks if t.after == first and not t.is_value)}
        others = [t.name for t in self.tasks[1:] if not (t.after == first or (t.is_value and t.after in steps))]
        if self.train.negative_sampling_rate < 1.0 and others:
            raise ValueError(
                f"train.negative_sampling_rate = {self.train.negative_sampling_rate} samples the negatives of the "
                f"first task {first!r}, which shifts the rate of tasks {others} (not funnel steps after it) by an "
                "amount the model cannot correct; use 1 or make them steps after it"
            )
        return self

    @property
    def early_stopping_metric(self) -> str:
        return self.train.early_stopping_metric or f"{self.tasks[0].served_name}_auc"
