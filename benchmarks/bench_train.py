"""Training throughput: the torchrec model (one sharded EBC, fused row-wise Adagrad in the
backward) beside an otherwise identical model that uses one ``torch.nn.Embedding`` per
feature (the way most multi-task libraries embed: multi-hot features as padded ids with
masked pooling, dense gradients, ``torch.optim.Adagrad`` for the tables and AdamW for the
dense layers), on one synthetic training table.

    python -m benchmarks.bench_train [--rows 400000] [--batch-size 4096] [--config configs/demo.toml]
        [--capacity-scale 1]
    python -m benchmarks.bench_train --sequence-length 50 [--sequence-encoders mean,din,attention]
        [--rounds 2] [--threads 0] [--rows ...] [--lengths-from TRAINING_TABLE.parquet]

The second form measures what a behaviour sequence costs in training instead (see
``sequence_cost``).

Prints samples/s of each and the ratio, and the samples/s of the dense layers alone (the
pooled embeddings precomputed): any embedding implementation adds its time to theirs, so
per-feature / dense-only is the highest ratio the model allows. Also home of ``write_synthetic_day``, the small
learnable training tables the tests use.
"""

from __future__ import annotations

import argparse
import datetime as dt
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from features.config import FeaturesConfig
from models.loader import USER_COLUMN
from serving.spec import sequence_age_column, sequence_column


def write_synthetic_day(
    spec: FeaturesConfig,
    folder: Path,
    rows: int,
    seed: int,
    row_group_rows: int = 65_536,
    history_lengths: np.ndarray | None = None,
) -> Path:
    """A training table day (``folder/part-0.parquet``) whose labels are a known logistic
    function of the first dense column, the first sparse feature (a random effect per id)
    and the first list feature (mean of per-id effects), so a model can learn them.

    Ids use at most 1000 rows of each table (index 0 = padding appears too).
    """
    rng = np.random.default_rng(seed)
    effects_rng = np.random.default_rng(12345)  # the same "truth" for every day
    cols: dict[str, pa.Array] = {}
    click_logit = np.full(rows, -1.5)
    cvr_logit = np.full(rows, -1.0)
    first_id, first_list = True, True
    for f in spec.sparse:
        high = min(f.num_embeddings, 1000)
        effect = effects_rng.normal(0, 1.0, high)
        if f.kind == "id":
            ids = rng.integers(0, high, rows)
            cols[f.name] = pa.array(ids, pa.int64())
            if first_id:
                click_logit += 1.5 * effect[ids]
                cvr_logit += 1.0 * effect[ids]
                first_id = False
        else:
            lengths = rng.integers(0, 5, rows)
            offsets = np.zeros(rows + 1, np.int64)
            np.cumsum(lengths, out=offsets[1:])
            values = rng.integers(1, high, offsets[-1])
            cols[f.name] = pa.LargeListArray.from_arrays(pa.array(offsets), pa.array(values, pa.int64()))
            if first_list:
                sums = np.add.reduceat(np.r_[effect[values], 0.0], offsets[:-1]) if offsets[-1] else np.zeros(rows)
                mean_effect = np.where(lengths > 0, sums / np.maximum(lengths, 1), 0.0)
                cvr_logit += 1.5 * mean_effect
                first_list = False
    for seq in spec.sequences:  # lengths uniform in 0..N, or drawn from history_lengths; ids of the carried tables
        if history_lengths is None:
            lengths = rng.integers(0, seq.max_length + 1, rows)
        else:
            lengths = np.minimum(rng.choice(history_lengths, rows), seq.max_length)
        offsets = np.zeros(rows + 1, np.int64)
        np.cumsum(lengths, out=offsets[1:])
        sizes = {f.name: min(f.num_embeddings, 1000) for f in spec.sparse}
        for name in seq.items:
            values = pa.array(rng.integers(1, sizes[name], offsets[-1]), pa.int64())
            cols[sequence_column(seq.name, name)] = pa.LargeListArray.from_arrays(pa.array(offsets), values)
        ages = pa.array(rng.integers(1, 60, offsets[-1]), pa.int64())
        cols[sequence_age_column(seq.name)] = pa.LargeListArray.from_arrays(pa.array(offsets), ages)
    dense_names = spec.dense_names()
    dense = rng.normal(2.0, 3.0, (rows, len(dense_names))).astype(np.float32)
    for j, name in enumerate(dense_names):
        cols[name] = pa.array(dense[:, j])
    if dense_names:
        click_logit += 0.5 * (dense[:, 0] - 2.0)
    click = rng.random(rows) < 1 / (1 + np.exp(-click_logit))
    conversion = click & (rng.random(rows) < 1 / (1 + np.exp(-cvr_logit)))
    cols["click"] = pa.array(click.astype(np.int8))
    cols["conversion"] = pa.array(conversion.astype(np.int8))
    cols[USER_COLUMN] = pa.array(np.char.add("u", rng.integers(0, 200, rows).astype(str)))  # for GAUC
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "part-0.parquet"
    pq.write_table(pa.table(cols), path, row_group_size=row_group_rows)
    return path


def per_feature_embedding_model(spec: FeaturesConfig, cfg, tasks, dense_mean: np.ndarray, dense_std: np.ndarray):
    """``MultiTaskNet`` with its torchrec EBC swapped for one ``nn.Embedding`` per feature,
    the way most multi-task libraries embed: a single id looks up one row; a multi-hot
    feature arrives as padded ids [B, L] with a mask and is pooled by a masked sum (or
    mean). Normaliser, backbone and heads are ``MultiTaskNet``'s own modules."""
    import torch
    from torch import nn

    from models.calibration import ServedProbabilities
    from models.nets import (
        BACKBONES,
        CrossNetwork,
        DenseNormalizer,
        ModelOutput,
        TaskHeads,
    )

    class PerFeatureEmbeddingNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.features = list(spec.sparse)
            self.tables = nn.ModuleDict({f.name: nn.Embedding(f.num_embeddings, f.dim) for f in spec.sparse})
            self.normalizer = DenseNormalizer(dense_mean, dense_std)
            in_dim = sum(f.dim for f in spec.sparse) + len(dense_mean)
            self.cross = CrossNetwork(in_dim, cfg.cross_layers)
            self.backbone = BACKBONES[cfg.backbone](in_dim, cfg, [t.name for t in tasks])
            self.heads = TaskHeads(self.backbone.out_dim, tasks)
            self.served = ServedProbabilities(tasks, cfg.calibration, cfg.calibration_segments)

        def backbone_input(
            self, dense: torch.Tensor, ids: dict[str, torch.Tensor], masks: dict[str, torch.Tensor]
        ) -> torch.Tensor:
            """The pooled embeddings and the normalised dense features, side by side."""
            pooled = []
            for f in self.features:
                rows = self.tables[f.name](ids[f.name])  # [B, D], or [B, L, D] for a multi-hot feature
                if f.name in masks:
                    mask = masks[f.name].unsqueeze(-1)
                    rows = (rows * mask).sum(1)
                    if f.pooling == "mean":
                        rows = rows / mask.sum(1).clamp(min=1.0)
                pooled.append(rows)
            return torch.cat([*pooled, self.normalizer(dense)], dim=1)

        def from_backbone_input(self, x: torch.Tensor) -> ModelOutput:
            """Cross layers, backbone and heads on ``backbone_input``'s output."""
            features = self.cross(x)
            hidden, gates = self.backbone(features)
            logits = self.heads(hidden)
            return ModelOutput(logits, self.served(logits), features, gates)

        def forward(
            self, dense: torch.Tensor, ids: dict[str, torch.Tensor], masks: dict[str, torch.Tensor]
        ) -> ModelOutput:
            return self.from_backbone_input(self.backbone_input(dense, ids, masks))

    return PerFeatureEmbeddingNet()


def padded_inputs(spec: FeaturesConfig, sparse) -> tuple[dict, dict]:
    """A batch's KeyedJaggedTensor as per-feature tensors: ids [B] of single-id features;
    padded ids [B, L] and a float mask [B, L] of multi-hot ones (L = the batch's longest list)."""
    import torch

    by_name = sparse.to_dict()
    ids, masks = {}, {}
    for f in spec.sparse:
        jagged = by_name[f.name]
        if f.kind == "id":
            ids[f.name] = jagged.values()
        else:
            lengths = jagged.lengths()
            width = max(int(lengths.max()), 1)
            ids[f.name] = jagged.to_padded_dense(desired_length=width, padding_value=0)
            masks[f.name] = (torch.arange(width) < lengths[:, None]).float()
    return ids, masks


def check_same_function(net, baseline, batch, padded_batch) -> None:
    """Load ``net``'s weights into the per-feature model (in place) and check both compute
    the same outputs on ``batch``: the comparison is of two embeddings of one network."""
    import torch

    state = {}
    for key, value in net.state_dict().items():
        if key.startswith("ebc.embedding_bags."):
            key = "tables." + key.removeprefix("ebc.embedding_bags.")
        state[key] = value
    baseline.load_state_dict(state)
    with torch.no_grad():
        a, b = net(batch.dense, batch.sparse), baseline(batch.dense, *padded_batch)
    torch.testing.assert_close(a.features, b.features, rtol=1e-5, atol=1e-6)
    for view, p in a.probs.items():
        torch.testing.assert_close(p, b.probs[view], rtol=1e-5, atol=1e-7)


def sequence_cost(cfg, args) -> None:
    """Training samples/s of the torchrec model without and with a click sequence of
    ``--sequence-length`` elements (items: the item id and category; lengths uniform in
    0..N, or drawn from a real training table's with ``--lengths-from``) per encoder, on
    one table, rounds alternating so that a change of the machine's speed hits every model
    alike; the best round of each counts."""
    import os

    import torch
    from torchrec.optim.optimizers import in_backward_optimizer_filter

    from features.config import SequenceFeature
    from models.balancing import LossWeighting, training_loss
    from models.distributed import distribute, init_process_group
    from models.loader import table_loader
    from models.nets import MultiTaskNet, dense_stats
    from models.train import dense_optimizer

    def with_sequence(encoder: str | None):
        seq = SequenceFeature(
            name="clicked", items=["item_id", "category_id"], max_length=args.sequence_length, encoder=encoder or "mean"
        )
        features = cfg.features.model_copy(update={"sequences": [seq] if encoder else []})
        return cfg.model_copy(update={"features": features})

    variants = {"no sequence": with_sequence(None), **{e: with_sequence(e) for e in args.sequence_encoders}}
    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    with tempfile.TemporaryDirectory() as tmp:
        lengths = None
        if args.lengths_from is not None:
            column = pq.read_table(args.lengths_from, columns=["clicked__item_id"]).column(0).combine_chunks()
            lengths = column.value_lengths().to_numpy(zero_copy_only=False)
        path = write_synthetic_day(
            with_sequence("mean").features, Path(tmp) / "day", args.rows, seed=0, history_lengths=lengths
        )
        init_process_group(Path(tmp), torch.device("cpu"))
        steps = {}
        for name, vcfg in variants.items():
            batches = list(table_loader(vcfg, [path], args.batch_size, shuffle=False, prefetch=0))
            mean, std = dense_stats([path], vcfg.features.dense_names())
            torch.manual_seed(0)
            net = MultiTaskNet(vcfg.features, vcfg.model, vcfg.tasks, mean, std)
            model = distribute(net, vcfg.train, torch.device("cpu"))
            dense_opt = dense_optimizer(
                [q for _, q in in_backward_optimizer_filter(model.named_parameters())], vcfg.train
            )
            weighting = LossWeighting(vcfg.model, vcfg.tasks)

            def step(batch, model=model, net=net, dense_opt=dense_opt, weighting=weighting, vcfg=vcfg) -> None:
                out = model(batch.dense, batch.sparse)
                loss, _, _ = training_loss(
                    out, batch.labels, vcfg.tasks, vcfg.model.conversion_head, weighting, net.backbone.penalty(), 0.0
                )
                dense_opt.zero_grad()
                loss.backward()
                dense_opt.step()

            steps[name] = (step, batches)
        length_source = "uniform 0..N" if lengths is None else f"as in {args.lengths_from} (mean {lengths.mean():.1f})"
        print(
            f"rows {args.rows:,}  batch {args.batch_size}  backbone {cfg.model.backbone}  sequence: click, items "
            f"item_id + category_id, N = {args.sequence_length}, lengths {length_source}  threads "
            f"{torch.get_num_threads()}  load avg {os.getloadavg()[0]:.2f}"
        )
        best = dict.fromkeys(steps, 0.0)
        for _ in range(args.rounds):
            for name, (step, batches) in steps.items():
                for batch in batches[:3]:  # warm-up
                    step(batch)
                started = time.perf_counter()
                for batch in batches:
                    step(batch)
                best[name] = max(best[name], sum(len(b) for b in batches) / (time.perf_counter() - started))
        base = best["no sequence"]
        for name, rate in best.items():
            print(f"{name:12s} {rate:>10,.0f} samples/s  {100 * (rate / base - 1):+6.1f}%")
        print(f"load avg {os.getloadavg()[0]:.2f}  ({dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC)")


def main(argv: list[str] | None = None) -> None:
    import os

    import torch
    from torchrec.optim.optimizers import in_backward_optimizer_filter

    from models.balancing import LossWeighting, training_loss
    from models.distributed import distribute, init_process_group
    from models.loader import TrainingTableLoader
    from models.nets import MultiTaskNet, dense_stats
    from models.train import dense_optimizer
    from pipeline.config import load_config, parse_config

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=400_000)
    p.add_argument("--batch-size", type=int, default=4096)
    p.add_argument("--config", type=Path, default=Path("configs/demo.toml"))
    p.add_argument(
        "--capacity-scale",
        type=int,
        default=1,
        help="multiply every vocabulary's capacity (dense embedding gradients cost grows with table size)",
    )
    p.add_argument(
        "--sequence-length",
        type=int,
        default=0,
        help="N > 0: instead, the model without a click sequence against it with one of N elements, per encoder",
    )
    p.add_argument("--sequence-encoders", default="mean,din,attention", type=lambda v: v.split(","))
    p.add_argument("--rounds", type=int, default=2, help="--sequence-length: alternating timing rounds")
    p.add_argument(
        "--lengths-from",
        type=Path,
        default=None,
        help="--sequence-length: draw the history lengths from this training table's clicked__item_id column "
        "(e.g. the demo's) instead of uniformly from 0..N",
    )
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads; 0 = all cores")
    args = p.parse_args(argv)
    cfg = load_config(args.config)
    if args.sequence_length:
        sequence_cost(cfg, args)
        return
    if args.capacity_scale != 1:
        data = cfg.model_dump(by_alias=True)
        for f in data["features"]["sparse"]:
            f["capacity"] *= args.capacity_scale
        cfg = parse_config(data)
    spec, mcfg, tcfg = cfg.features, cfg.model, cfg.train
    torch.set_num_threads(os.cpu_count() or 1)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        path = write_synthetic_day(spec, Path(tmp) / "day", args.rows, seed=0)
        loader = TrainingTableLoader([path], spec.sparse, spec.dense_names(), args.batch_size, shuffle=False, seed=0)
        batches = list(loader)  # in memory: time the model, not the Parquet reads
        padded = [padded_inputs(spec, b.sparse) for b in batches]  # what those libraries' loaders hand over
        mean, std = dense_stats([path], spec.dense_names())
        init_process_group(Path(tmp), torch.device("cpu"))

        # Both: the same optimiser family (Adagrad for the embeddings, AdamW for the dense
        # layers, the config's rates) and the same loss code.
        net = MultiTaskNet(spec, mcfg, cfg.tasks, mean, std)
        baseline = per_feature_embedding_model(spec, mcfg, cfg.tasks, mean, std)
        check_same_function(net, baseline, batches[0], padded[0])
        model = distribute(net, tcfg, torch.device("cpu"))
        dense_opt = dense_optimizer([q for _, q in in_backward_optimizer_filter(model.named_parameters())], tcfg)

        def stepper(forward, penalty, optimizers):
            """One training step on batch i: ``forward(i)``, the shared loss, backward, step."""
            weighting = LossWeighting(mcfg, cfg.tasks)

            def step(i: int) -> None:
                loss, _, _ = training_loss(
                    forward(i), batches[i].labels, cfg.tasks, mcfg.conversion_head, weighting, penalty(), 0.0
                )
                for o in optimizers:
                    o.zero_grad()
                loss.backward()  # torchrec: also updates the embedding rows (fused row-wise Adagrad)
                for o in optimizers:
                    o.step()

            return step

        def baseline_dense_optimizer() -> torch.optim.Optimizer:
            return dense_optimizer([q for n, q in baseline.named_parameters() if not n.startswith("tables.")], tcfg)

        torchrec_step = stepper(lambda i: model(batches[i].dense, batches[i].sparse), net.backbone.penalty, [dense_opt])
        baseline_step = stepper(
            lambda i: baseline(batches[i].dense, *padded[i]),
            baseline.backbone.penalty,
            [torch.optim.Adagrad(baseline.tables.parameters(), lr=tcfg.sparse_lr), baseline_dense_optimizer()],
        )

        # The dense layers alone, on the pooled embeddings precomputed (with a gradient, as
        # the embeddings would take it): what any embedding implementation, even a free one,
        # adds its own time to. baseline / this is the ceiling of the ratio for this model.
        with torch.no_grad():
            inputs = [baseline.backbone_input(b.dense, *padded[i]) for i, b in enumerate(batches)]
        dense_only_step = stepper(
            lambda i: baseline.from_backbone_input(inputs[i].clone().requires_grad_(True)),
            baseline.backbone.penalty,
            [baseline_dense_optimizer()],
        )

        print(
            f"rows {args.rows:,}  batch {args.batch_size}  backbone {mcfg.backbone}  head {mcfg.conversion_head}  "
            f"sparse features {len(spec.sparse)} ({sum(f.num_embeddings * f.dim for f in spec.sparse):,} embedding "
            "params)  "
            f"dense {len(mean)}  threads {torch.get_num_threads()}  load avg {os.getloadavg()[0]:.2f}"
        )
        rates = {}
        for name, step in (
            ("torchrec DMP + fused row-wise Adagrad", torchrec_step),
            ("nn.Embedding per feature + Adagrad (dense grads)", baseline_step),
            ("dense layers alone (embeddings precomputed)", dense_only_step),
        ):
            for i in range(min(3, len(batches))):  # warm-up
                step(i)
            started = time.perf_counter()
            for i in range(len(batches)):
                step(i)
            rates[name] = sum(len(b) for b in batches) / (time.perf_counter() - started)
            print(f"{name:50s} {rates[name]:>10,.0f} samples/s  (load avg {os.getloadavg()[0]:.2f})")
        torchrec, per_feature, dense_only = rates.values()
        print(
            f"ratio {torchrec / per_feature:.2f}x; ceiling for this model (embeddings free) "
            f"{dense_only / per_feature:.2f}x   "
            f"({dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC)"
        )


if __name__ == "__main__":
    main()
