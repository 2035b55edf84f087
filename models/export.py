"""ONNX export of a trained MultiTaskNet and its parity check.

The torchrec embedding modules cannot be exported (KJT inputs), and nn.EmbeddingBag
exports as a slow ONNX Loop, so each table is copied into a plain ``nn.Embedding`` and
pooled with a masked sum over padded ids (Gather + ReduceSum; exact and fast with
``dynamo=True``). ONNX inputs:

* ``dense``: float32 [B, n_dense], raw (the model normalises inside);
* per sparse feature, named after it: kind="id" int64 [B] (0 is the padding row and is
  looked up like the EBC's length-1 bag does); kind="list" int64 [B, L] padded with -1
  after the real ids. Padding is -1, not 0, because a list may hold an explicit 0 (a null
  element) that the EBC does look up; an empty list pools to zeros;
* per behaviour sequence S, per carried feature F: ``S__F`` int64 [B, L] (newest first,
  padded with -1 after the real elements: the mask is ``S__<first item> >= 0``) and
  ``S__age_days`` int64 [B, L] aligned with them; L is the longest history of the batch
  (at least 1), one dynamic length per sequence. The encoders count masked-in elements
  only, so the result does not depend on L.

Outputs: ``p_<view>`` for every task view of ``cfg.tasks`` (``features.config.task_views``;
the default funnel: ``p_click``, ``p_ctcvr``, ``p_cvr``), ``e_<task>`` for every value task
(its E[value | after], ``serving.spec.value_output``) and ``score``, the ranking score =
product over the binary tasks of p[served view] ** score_exponent times the product over the
value tasks of E[value] ** score_exponent (e.g. p_click^a * p_ctcvr^b * e_revenue^c).

A model becomes a serving bundle in ``pipeline.bundle``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

from features.config import FeaturesConfig, TaskConfig, task_views
from features.errors import StageError
from models.config import TrainingConfig
from models.loader import Batch, table_loader
from models.metrics import view_metrics
from models.nets import ModelOutput, MultiTaskNet
from models.quiet import library_noise_silenced
from models.sequence_encoders import History
from serving.encoding import pad_jagged
from serving.spec import SCORE, probability_output, value_output

PARITY_TOLERANCE = 1e-5
PARITY_BATCH_SIZES = (1, 7, 1000, 4096)
PARITY_MIN_ROWS = 10_000


def output_names(tasks: Sequence[TaskConfig]) -> list[str]:
    """The ONNX model's outputs: ``p_<view>`` per task view, ``e_<task>`` per value task, then ``score``."""
    values = [value_output(t.name) for t in tasks if t.is_value]
    return [probability_output(view) for view in task_views(list(tasks))] + values + [SCORE]


def blend(out: ModelOutput, tasks: Sequence[TaskConfig]) -> torch.Tensor:
    """The ranking score: product over ``tasks`` of p[served view] ** score_exponent, a
    value task's factor being E[value | after] ** score_exponent."""
    factors = [(out.values if t.is_value else out.probs)[t.served_name] ** t.score_exponent for t in tasks]
    score = factors[0]
    for factor in factors[1:]:
        score = score * factor
    return score


def named_outputs(out: ModelOutput, tasks: Sequence[TaskConfig]) -> dict[str, torch.Tensor]:
    """``out`` by ONNX output name (``output_names``)."""
    return (
        {probability_output(view): p for view, p in out.probs.items()}
        | {value_output(task): e for task, e in out.values.items()}
        | {SCORE: blend(out, tasks)}
    )


class OnnxRanker(nn.Module):
    """MultiTaskNet with plain embeddings and padded-id inputs (see the module docstring)."""

    def __init__(self, model: MultiTaskNet, spec: FeaturesConfig, tasks: Sequence[TaskConfig]) -> None:
        super().__init__()
        by_name = {f.name: f for f in spec.sparse}
        if [f.name for f in spec.sparse] != model.sparse_names:
            raise StageError(
                f"model sparse features {model.sparse_names} differ from the spec's {[f.name for f in spec.sparse]}"
            )
        if [s.name for s in spec.sequences] != [s.name for s in model.sequences]:
            raise StageError(
                f"model sequences {[s.name for s in model.sequences]} differ from the spec's "
                f"{[s.name for s in spec.sequences]}"
            )
        if list(model.heads) != [t.name for t in tasks]:
            raise StageError(
                f"model task heads {list(model.heads)} differ from the config's tasks {[t.name for t in tasks]}"
            )
        self.kinds = [by_name[n].kind for n in model.sparse_names]
        self.means = [by_name[n].pooling == "mean" for n in model.sparse_names]
        weights = {n: w.detach().clone().cpu() for n, w in model.tables().items()}
        self.tables = nn.ModuleList(nn.Embedding.from_pretrained(weights[n], freeze=True) for n in model.sparse_names)
        self.table_index = {n: i for i, n in enumerate(model.sparse_names)}
        self.sequences = list(spec.sequences)
        self.net = model  # its layers after the embeddings (its torchrec tables are not called)
        self.tasks = list(tasks)
        self.outputs = output_names(self.tasks)

    def forward(
        self, dense: torch.Tensor, sparse: list[torch.Tensor], histories: list[list[torch.Tensor]]
    ) -> tuple[torch.Tensor, ...]:
        pooled = []
        for table, kind, mean, ids in zip(self.tables, self.kinds, self.means, sparse, strict=True):
            if kind != "list":  # one id per row: id, bucket
                pooled.append(table(ids))
                continue
            mask = (ids >= 0).to(torch.float32).unsqueeze(-1)  # [B, L, 1]
            summed = (table(ids.clamp(min=0)) * mask).sum(dim=1)
            pooled.append(summed / mask.sum(dim=1).clamp(min=1.0) if mean else summed)
        encoded = []
        for seq, (*element_ids, ages) in zip(self.sequences, histories, strict=True):
            # flattened [B * L]; padding (-1) looks up row 0 and is marked, so it counts for nothing
            b, length = ages.shape
            looked_up = [
                self.tables[self.table_index[f]](ids.clamp(min=0).reshape(-1))
                for f, ids in zip(seq.items, element_ids, strict=True)
            ]
            rows = torch.arange(b).unsqueeze(1).expand(b, length).reshape(-1)
            real = (element_ids[0] >= 0).reshape(-1)
            encoded.append(History(torch.cat(looked_up, dim=-1), rows, ages.reshape(-1), real))
        named = named_outputs(self.net.forward_from_embeddings(dense, pooled, encoded), self.tasks)
        return tuple(named[name] for name in self.outputs)


def to_onnx_module(model: MultiTaskNet, spec: FeaturesConfig, tasks: Sequence[TaskConfig]) -> OnnxRanker:
    """The exportable copy of a plain (not DMP-wrapped) model, in eval mode.

    A DistributedModelParallel model: load its plain state_dict (models.distributed.plain_state)
    into a fresh MultiTaskNet first; training already returns such a plain model.
    """
    if not isinstance(model, MultiTaskNet):
        raise StageError(
            f"export needs a plain MultiTaskNet, got {type(model).__name__}: load its plain state_dict into one"
        )
    return OnnxRanker(model, spec, tasks).eval()


def input_names(spec: FeaturesConfig) -> list[str]:
    return ["dense", *[f.name for f in spec.sparse], *spec.sequence_columns()]


def export_onnx(model: MultiTaskNet, spec: FeaturesConfig, tasks: Sequence[TaskConfig], path: Path) -> Path:
    """Write ``model`` as one self-contained ONNX file with dynamic batch, list and history length."""
    module = to_onnx_module(model, spec, tasks)
    batch = torch.export.Dim("batch", min=1)
    n = 4
    dense = torch.zeros(n, len(model.normalizer.mean))
    sparse = [
        torch.zeros(n, 3, dtype=torch.int64) if f.kind == "list" else torch.zeros(n, dtype=torch.int64)
        for f in spec.sparse
    ]
    dims = [
        {0: batch, 1: torch.export.Dim(f"{f.name}_len", min=1)} if f.kind == "list" else {0: batch} for f in spec.sparse
    ]
    # one length per sequence, shared by its columns (elements and ages are aligned)
    histories = [[torch.zeros(n, 3, dtype=torch.int64) for _ in seq.column_names] for seq in spec.sequences]
    history_dims = [
        [{0: batch, 1: length} for _ in seq.column_names]
        for seq, length in ((s, torch.export.Dim(f"{s.name}_len", min=1)) for s in spec.sequences)
    ]
    # The exporter warns about operators this model never uses (torchvision's) and about
    # its own deprecations: noise in every nightly log. Parity (below) checks the result.
    with library_noise_silenced("torch.onnx._internal.exporter._registration"):
        program = torch.onnx.export(
            module,
            (dense, sparse, histories),
            dynamo=True,
            input_names=input_names(spec),
            output_names=output_names(tasks),
            dynamic_shapes=({0: batch}, dims, history_dims),
            optimize=True,
            verbose=False,
        )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(program.model_proto, str(path), save_as_external_data=False)
    return path


def onnx_inputs(batch: Batch, spec: FeaturesConfig) -> dict[str, np.ndarray]:
    """A loader batch as the ONNX model's feeds (lists and histories padded with -1)."""
    per_key = batch.sparse.to_dict()
    feeds = {"dense": batch.dense.numpy().astype(np.float32, copy=False)}
    lists = {f.name for f in spec.sparse if f.kind == "list"} | set(spec.sequence_columns())
    for name in input_names(spec)[1:]:
        jt = per_key[name]
        values = jt.values().numpy().astype(np.int64, copy=False)
        feeds[name] = pad_jagged(jt.lengths().numpy(), values) if name in lists else values
    return feeds


@torch.no_grad()
def check_parity(
    model: MultiTaskNet, onnx_path: Path, batches: Sequence[Batch], spec: FeaturesConfig, tasks: Sequence[TaskConfig]
) -> dict:
    """Max |PyTorch - onnxruntime| / max(1, |PyTorch|) per output over ``batches`` (``max_abs_diff``:
    the absolute difference of a probability; relative beyond 1, as an expected value of a
    few hundred carries float32 rounding of ~1e-5 in absolute terms); StageError above 1e-5,
    or naming every output that is inf or NaN on some row in either (equal NaNs are no
    parity: a NaN model must not pass with a difference of 0)."""
    model.eval()
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    names = output_names(tasks)
    worst = dict.fromkeys(names, 0.0)
    not_finite = {(name, runtime): 0 for name in names for runtime in ("PyTorch", "onnxruntime")}  # rows
    sizes = []
    for batch in batches:
        want = {name: value.numpy() for name, value in named_outputs(model(batch.dense, batch.sparse), tasks).items()}
        got = dict(zip(names, session.run(names, onnx_inputs(batch, spec)), strict=True))
        for name in names:
            for runtime, values in (("PyTorch", want[name]), ("onnxruntime", got[name])):
                not_finite[name, runtime] += int(np.count_nonzero(~np.isfinite(values)))
            diff = np.abs(got[name] - want[name]) / np.maximum(np.abs(want[name]), 1.0)
            worst[name] = max(worst[name], float(diff.max(initial=0.0)))
        sizes.append(len(batch))
    failed = [f"{name} in {runtime} ({n:,} of {sum(sizes):,} rows)" for (name, runtime), n in not_finite.items() if n]
    if failed:
        raise StageError(
            f"ONNX parity failed for {onnx_path}: outputs not finite: {', '.join(failed)}; the model "
            "has NaN or inf weights (or the parity rows inf values)"
        )
    bad = {k: v for k, v in worst.items() if not v <= PARITY_TOLERANCE}
    if bad:
        detail = ", ".join(f"{k} max abs diff {v:.3g}" for k, v in bad.items())
        raise StageError(
            f"ONNX parity failed for {onnx_path} (tolerance {PARITY_TOLERANCE}): {detail} over batch sizes "
            f"{sorted(set(sizes))}"
        )
    return {
        "max_abs_diff": worst,
        "rows": int(sum(sizes)),
        "batch_sizes": sorted(set(sizes)),
        "tolerance": PARITY_TOLERANCE,
    }


def parity_batches(cfg: TrainingConfig, files: Sequence[Path], min_rows: int = PARITY_MIN_ROWS) -> list[Batch]:
    """Real rows of ``files``: one batch of each size in PARITY_BATCH_SIZES, then batches
    of the largest size until ``min_rows`` rows (or the table's end)."""
    batches: list[Batch] = []
    for size in PARITY_BATCH_SIZES:
        loader = table_loader(cfg, files, batch_size=size, shuffle=False, prefetch=0)
        for batch in loader:
            batches.append(batch)
            if size != PARITY_BATCH_SIZES[-1] or sum(len(b) for b in batches) >= min_rows:
                break
    return batches


# int8: onnxruntime's dynamic quantisation of the dense layers. The embedding tables
# (Gather) stay float32: quantising them saves memory, not time, at the cost of accuracy.
QUANTIZED_OPS = ("MatMul", "Gemm")


def quantize_int8(float_path: Path, path: Path) -> Path:
    """Write ``float_path``'s model with the weights of its MatMul and Gemm nodes as int8
    (per channel, symmetric) and their activations quantised on the fly (uint8, per
    batch): onnxruntime's dynamic quantisation. Runs on onnxruntime alone."""
    from onnxruntime.quantization import QuantType, quantize_dynamic  # noqa: PLC0415 - export-time only

    with library_noise_silenced("root"):  # it logs a warning per node it leaves in float32
        quantize_dynamic(
            Path(float_path),
            Path(path),
            op_types_to_quantize=list(QUANTIZED_OPS),
            per_channel=True,
            weight_type=QuantType.QInt8,
        )
    return Path(path)


def quantization_report(
    float_path: Path,
    int8_path: Path,
    batches: Sequence[Batch],
    spec: FeaturesConfig,
    tasks: Sequence[TaskConfig],
) -> dict:
    """The int8 model against the float32 one on the rows of ``batches``: per output, max and
    mean |int8 - float32|; per task view, both models' AUC and calibration (mean predicted /
    observed) and the changes (int8 - float32; calibration's relative to float32's)."""
    names = output_names(tasks)
    runs = {
        precision: ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        for precision, path in (("float32", float_path), ("int8", int8_path))
    }
    outputs = {p: {n: [] for n in names} for p in runs}
    labels: dict[str, list[np.ndarray]] = {}
    for batch in batches:
        feeds = onnx_inputs(batch, spec)
        for precision, session in runs.items():
            for name, values in zip(names, session.run(names, feeds), strict=True):
                outputs[precision][name].append(values)
        for name, values in batch.labels.items():
            labels.setdefault(name, []).append(values.numpy())
    got = {p: {n: np.concatenate(v).astype(np.float64) for n, v in out.items()} for p, out in outputs.items()}
    columns = {n: np.concatenate(v) for n, v in labels.items()}
    views = task_views(list(tasks))
    metrics = {p: view_metrics(views, columns, {v: got[p][f"p_{v}"] for v in views}, None) for p in runs}
    diff = {n: np.abs(got["int8"][n] - got["float32"][n]) for n in names}
    return {
        "rows": len(next(iter(diff.values()))),
        "max_abs_diff": {n: float(d.max(initial=0.0)) for n, d in diff.items()},
        "mean_abs_diff": {n: float(d.mean()) if len(d) else 0.0 for n, d in diff.items()},
        "views": {
            view: {
                "auc_float32": metrics["float32"][f"{view}_auc"],
                "auc_int8": metrics["int8"][f"{view}_auc"],
                "auc_change": metrics["int8"][f"{view}_auc"] - metrics["float32"][f"{view}_auc"],
                "calibration_float32": metrics["float32"][f"{view}_calibration"],
                "calibration_int8": metrics["int8"][f"{view}_calibration"],
                "calibration_change": metrics["int8"][f"{view}_calibration"] / metrics["float32"][f"{view}_calibration"]
                - 1.0,
            }
            for view in views
        },
    }


def check_quantization(report: dict, max_auc_drop: float, max_calibration_change: float) -> None:
    """StageError naming every task view whose AUC fell more than ``max_auc_drop`` or whose
    calibration moved more than ``max_calibration_change`` (a share) in ``report``
    (quantization_report's); a NaN change (no positives) is no failure, an infinite one is."""
    problems = []
    for view, m in report["views"].items():
        if m["auc_change"] < -max_auc_drop:
            problems.append(
                f"{view} AUC fell {-m['auc_change']:.5f} ({m['auc_float32']:.5f} -> {m['auc_int8']:.5f}; "
                f"export.max_auc_drop {max_auc_drop})"
            )
        if abs(m["calibration_change"]) > max_calibration_change:
            problems.append(
                f"{view} calibration moved {m['calibration_change']:+.2%} ({m['calibration_float32']:.4f} -> "
                f"{m['calibration_int8']:.4f}; export.max_calibration_change {max_calibration_change:.2%})"
            )
    if problems:
        raise StageError(
            f"int8 export refused on {report['rows']:,} rows: " + "; ".join(problems) + " (export.quantize = 'none' "
            "exports the float32 model)"
        )
