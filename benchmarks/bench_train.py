"""Training throughput: the torchrec model (one sharded EBC, fused sparse optimiser in the
backward) beside the same network with one ``nn.EmbeddingBag`` per feature and dense
gradients (how most multi-task libraries embed), on one synthetic training table.

    python -m benchmarks.bench_train [--rows 400000] [--batch-size 4096] [--config configs/demo.toml] [--capacity-scale 1]

Prints samples/s of each and the ratio. Also home of ``write_synthetic_day``, the small
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


def write_synthetic_day(spec: FeaturesConfig, folder: Path, rows: int, seed: int, row_group_rows: int = 65_536) -> Path:
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


def _per_feature_model(spec: FeaturesConfig, cfg, n_dense: int):
    """The same backbone and heads, embeddings as one nn.EmbeddingBag per feature."""
    import torch
    from torch import nn

    from models.nets import BACKBONES, TASKS

    class PerFeatureNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.names = [f.name for f in spec.sparse]
            self.bags = nn.ModuleDict({f.name: nn.EmbeddingBag(f.num_embeddings, f.dim, mode=f.pooling, include_last_offset=True) for f in spec.sparse})
            self.backbone = BACKBONES[cfg.backbone](sum(f.dim for f in spec.sparse) + n_dense, cfg)
            self.heads = nn.ModuleDict({t: nn.Linear(self.backbone.out_dim, 1) for t in TASKS})

        def forward(self, dense, sparse):
            jt = sparse.to_dict()
            emb = [self.bags[n](jt[n].values(), jt[n].offsets()) for n in self.names]
            hidden, _ = self.backbone(torch.cat([*emb, dense], 1))
            return [self.heads[t](hidden[t]).squeeze(-1) for t in TASKS]

    return PerFeatureNet()


def main(argv: list[str] | None = None) -> None:
    import os

    import torch
    import torch.nn.functional as F

    from features.config import load_config, parse_config
    from models.loader import TrainingTableLoader
    from models.losses import LossWeighting, training_loss
    from models.nets import MultiTaskNet, dense_stats
    from models.train import _init_process_group, distribute

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=400_000)
    p.add_argument("--batch-size", type=int, default=4096)
    p.add_argument("--config", type=Path, default=Path("configs/demo.toml"))
    p.add_argument("--capacity-scale", type=int, default=1,
                   help="multiply every vocabulary's capacity (dense embedding gradients cost grows with table size)")
    args = p.parse_args(argv)
    cfg = load_config(args.config)
    if args.capacity_scale != 1:
        data = cfg.model_dump(by_alias=True)
        for f in data["features"]["sparse"]:
            f["capacity"] *= args.capacity_scale
        cfg = parse_config(data)
    spec, mcfg = cfg.features, cfg.model
    torch.set_num_threads(os.cpu_count() or 1)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        path = write_synthetic_day(spec, Path(tmp) / "day", args.rows, seed=0)
        loader = TrainingTableLoader([path], spec.sparse, spec.dense_names(), args.batch_size, shuffle=False, seed=0)
        batches = list(loader)  # in memory: time the model, not the Parquet reads
        mean, std = dense_stats([path], spec.dense_names())
        _init_process_group(Path(tmp), torch.device("cpu"))
        net = MultiTaskNet(spec, mcfg, mean, std)
        model = distribute(net, cfg.train, torch.device("cpu"))
        from torchrec.optim.optimizers import in_backward_optimizer_filter

        weighting = LossWeighting(mcfg)
        opt = torch.optim.AdamW([p for _, p in in_backward_optimizer_filter(model.named_parameters())], lr=1e-3)

        def torchrec_step(b) -> None:
            out = model(b.dense, b.sparse)
            loss, _ = training_loss(out, b.click, b.conversion, mcfg.conversion_head, weighting, net.backbone.penalty(), 0.0)
            opt.zero_grad()
            loss.backward()
            opt.step()

        baseline = _per_feature_model(spec, mcfg, len(mean))
        sparse_params = list(baseline.bags.parameters())
        dense_params = [p for n, p in baseline.named_parameters() if not n.startswith("bags.")]
        base_opts = [torch.optim.Adagrad(sparse_params, lr=cfg.train.sparse_lr), torch.optim.AdamW(dense_params, lr=1e-3)]
        dense_mean, dense_std = torch.from_numpy(mean), torch.from_numpy(std)

        def baseline_step(b) -> None:
            click_logit, cvr_logit = baseline((b.dense - dense_mean) / dense_std, b.sparse)
            log_ctcvr = F.logsigmoid(click_logit) + F.logsigmoid(cvr_logit)
            p = torch.exp(log_ctcvr).clamp(max=1 - 1e-7)
            loss = F.binary_cross_entropy_with_logits(click_logit, b.click) - (
                b.conversion * log_ctcvr + (1 - b.conversion) * torch.log1p(-p)).mean()
            for o in base_opts:
                o.zero_grad()
            loss.backward()
            for o in base_opts:
                o.step()

        print(f"rows {args.rows:,}  batch {args.batch_size}  backbone {mcfg.backbone}  head {mcfg.conversion_head}  "
              f"sparse features {len(spec.sparse)} ({sum(f.num_embeddings * f.dim for f in spec.sparse):,} embedding params)  dense {len(mean)}  threads {torch.get_num_threads()}  "
              f"load avg {os.getloadavg()[0]:.2f}")
        rates = {}
        for name, step in (("torchrec DMP + fused rowwise Adagrad", torchrec_step), ("nn.EmbeddingBag per feature + dense grads", baseline_step)):
            for b in batches[:3]:  # warm-up
                step(b)
            started = time.perf_counter()
            for b in batches:
                step(b)
            rates[name] = sum(len(b) for b in batches) / (time.perf_counter() - started)
            print(f"{name:45s} {rates[name]:>10,.0f} samples/s")
        values = list(rates.values())
        print(f"ratio {values[0] / values[1]:.2f}x   ({dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC)")


if __name__ == "__main__":
    main()
