"""Scoring speed of the exported bundle, float32 and int8 side by side, beside PyTorch eager
on the same model and features.

    .venv/bin/python benchmarks/bench_scoring.py [--requests 2000] [--http-requests 10000]
        [--http-rates 100,200,400,600,800,1000,1200] [--http-seconds 8] [--sequence-length 50] [--in-process-only]

Builds a small synthetic warehouse (demo spec and model sizes, 4 days, with a click
sequence of ``--sequence-length`` N items and their categories) in a temporary folder,
two demo-sized MMoEs with random (default-init) weights, one without sequences and the same with the
click sequence (the demo's sequence and encoder if configs/demo.toml has one, else DIN),
and their bundles, each exported twice: float32 and int8 (``export.quantize = "int8"``,
onnxruntime's dynamic quantisation of the dense layers); then measures
1. in-process: 1 user x 200 candidates per request (features + model), p50/p99, the
   model without sequences (target p99 <= 3 ms) and with the sequence (users whose
   bundled history is full, N elements; target p99 <= 5 ms), request by request in
   turns, then the sequence model with 10 recent events per request; and where one HTTP
   request's time goes, phase by phase (parse JSON + validate, encode features,
   onnxruntime, rank + serialise JSON), for both;
2. batch (the model without sequences): rows/s through ``Scorer.score_table`` with one worker thread per core (each
   encodes and scores its chunks of rows with one onnxruntime thread)
   (target >= 300,000 rows/s);
3. HTTP (the model without sequences): ``funnelrank serve`` in one process, a load generator in another (loopback),
   20 concurrent keep-alive clients in a closed loop (each sends again as soon as it is
   answered: the saturation throughput), p50/p99 and errors (target p99 <= 20 ms, 0
   errors), and the server's own mean time per request (from /metrics); then the same
   clients in an open loop at each of ``--http-rates`` requests/s in turn (``--http-seconds`` of
   load each), up to the first whose p99 exceeds 20 ms: the highest rate within it is the
   server's capacity at that latency. The load generator is asyncio over raw sockets with
   prebuilt requests, so it takes little of the 2 cores.
1-3 run for the float32 and the int8 bundles alike, in turns (request by request in-process,
run by run in batch, load by load over HTTP with a server of each), so both see the same
background load; a closing Markdown table puts them side by side.
PyTorch eager gets the scorer's feature arrays (so only the model differs) for 1 and 2,
on the model without sequences. ``--in-process-only``: 1 alone.
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def _percentiles(ms: list[float]) -> str:
    a = np.asarray(ms)
    return f"p50 {np.percentile(a, 50):.3f} ms, p99 {np.percentile(a, 99):.3f} ms"


def http_client(port: int, requests: int, clients: int, payload_file: str, rate: float = 0.0) -> None:
    """The load generator (runs in its own process): prints a JSON summary.

    ``rate`` 0: closed loop, each client sends its next request when the last answer
    arrives (the server's saturation throughput; latency = clients / throughput). ``rate``
    > 0: open loop, request j is due at start + j / rate (spread over the clients) and its
    latency counts from when it was due, so a server falling behind is not hidden by
    clients that wait (no coordinated omission)."""
    payloads = [p.encode() for p in json.loads(Path(payload_file).read_text())]
    per_client = requests // clients
    latencies: list[float] = []
    errors = [0]
    length_re = re.compile(rb"(?i)\r\ncontent-length: *(\d+)")

    async def one(reader, writer, body: bytes) -> bool:
        writer.write(
            b"POST /v1/rank HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
            % (len(body), body)
        )
        head = await reader.readuntil(b"\r\n\r\n")
        await reader.readexactly(int(length_re.search(head).group(1)))
        return head.startswith(b"HTTP/1.1 200 ")

    async def client(k: int) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        await one(reader, writer, payloads[k % len(payloads)])  # warm the connection up
        for i in range(per_client):
            t = time.perf_counter()
            if rate:
                t = started + (i * clients + k) / rate
                await asyncio.sleep(max(0.0, t - time.perf_counter()))
            try:
                ok = await one(reader, writer, payloads[(k * per_client + i) % len(payloads)])
            except (OSError, asyncio.IncompleteReadError):
                ok = False
                writer.close()
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
            latencies.append((time.perf_counter() - t) * 1000)
            errors[0] += not ok
        writer.close()

    async def run_all() -> float:
        begun = time.perf_counter()
        await asyncio.gather(*(client(k) for k in range(clients)))
        return time.perf_counter() - (started if rate else begun)

    cpu = time.process_time()
    started = time.perf_counter() + 0.5  # the open loop's clock starts once every connection is warm
    wall = asyncio.run(run_all())
    print(
        json.dumps(
            {
                "requests": len(latencies),
                "errors": errors[0],
                "wall_s": wall,
                "cpu_s": time.process_time() - cpu,
                "p50_ms": float(np.percentile(latencies, 50)),
                "p99_ms": float(np.percentile(latencies, 99)),
            }
        )
    )


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of a running process (Linux /proc; all its threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _server_mean_ms(port: int) -> float:
    """Mean time the server spent per /v1/rank request (its own histogram in /metrics)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("GET", "/metrics")
    text = conn.getresponse().read().decode()
    value = {
        line.split("{")[0]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("funnelrank_request_duration_seconds_")
        and 'route="/v1/rank"' in line
        and "_bucket" not in line
    }
    return (
        1000
        * value["funnelrank_request_duration_seconds_sum"]
        / max(value["funnelrank_request_duration_seconds_count"], 1)
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--candidates", type=int, default=200)
    parser.add_argument("--http-requests", type=int, default=10_000)
    parser.add_argument("--http-clients", type=int, default=20)
    parser.add_argument(
        "--http-rates",
        type=lambda text: [float(r) for r in text.split(",") if r],
        default=[100.0, 200.0, 400.0, 600.0, 800.0, 1000.0, 1200.0],
        help="offered requests/s of the open-loop HTTP runs, ascending, comma-separated; they stop at the first "
        "whose p99 exceeds 20 ms (default 100,200,400,600,800,1000,1200)",
    )
    parser.add_argument(
        "--http-seconds",
        type=float,
        default=8.0,
        help="seconds of load per open-loop rate (at least 1,000 requests; default %(default)s)",
    )
    parser.add_argument("--sequence-length", type=int, default=50, help="N of the click sequence (default %(default)s)")
    parser.add_argument("--in-process-only", action="store_true", help="measure 1 alone (no batch, no HTTP)")
    parser.add_argument("--http-client", nargs=3, metavar=("PORT", "PAYLOADS", "RATE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.http_client:
        http_client(
            int(args.http_client[0]),
            args.http_requests,
            args.http_clients,
            args.http_client[1],
            float(args.http_client[2]),
        )
        return

    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq
    import torch
    from torchrec import KeyedJaggedTensor

    sys.path.insert(0, str(ROOT / "tests"))
    from bundle_fixture import build_warehouse

    from features.catalog import raw_dir, validated_root
    from features.config import SequenceFeature
    from models.nets import MultiTaskNet, dense_stats
    from pipeline.bundle import export_bundle
    from pipeline.config import ExportConfig, load_config
    from serving.bundle import load_bundle
    from serving.rank_api import parse_rank_request, rank_response
    from serving.scorer import Scorer
    from serving.spec import ScoringLimits

    torch.set_num_threads(1)
    tmp = Path(tempfile.mkdtemp(prefix="bench-scoring-"))
    cfg = load_config(
        ROOT / "configs" / "demo.toml",
        {
            "generate": {"days": 4, "impressions_per_day": 50_000},
            "contract": {"attribution_window_hours": 1},
        },
    )
    cfg = cfg.model_copy(update={"warehouse": tmp / "warehouse", "state_dir": tmp / "state"})
    demo_sequence = cfg.features.sequences[:1] or [SequenceFeature(name="clicked", items=["item_id", "category_id"])]
    sequence = demo_sequence[0].model_copy(update={"max_length": args.sequence_length})
    cfg_seq, cfg = (
        cfg.model_copy(update={"features": cfg.features.model_copy(update={"sequences": sequences})})
        for sequences in ([sequence], [])
    )
    t = time.perf_counter()
    files = build_warehouse(cfg_seq)

    def untrained(c):
        # torch / torchrec default init: the tests' widened weights (bundle_fixture.small_model)
        # put a 50-long DIN model's ONNX parity at ~4e-5, above the 1e-5 export demands; the
        # time a model takes does not depend on its weights.
        torch.manual_seed(c.seed)
        return MultiTaskNet(c.features, c.model, c.tasks, *dense_stats(files, c.features.dense_names())).eval()

    def int8(c):
        # the same export with export.quantize = "int8", its AUC and calibration bounds open: these
        # untrained models are only timed (`funnelrank export --quantize int8` measures a trained one)
        return c.model_copy(
            update={"export": ExportConfig(quantize="int8", max_auc_drop=0.99, max_calibration_change=0.99)}
        )

    model = untrained(cfg)
    bundle_path = export_bundle(cfg, cfg.warehouse, model, tmp / "bundle", files)
    seq_bundle_path = export_bundle(cfg_seq, cfg.warehouse, untrained(cfg_seq), tmp / "bundle-seq", files)
    int8_path = export_bundle(int8(cfg), cfg.warehouse, model, tmp / "bundle-int8", files)
    int8_seq_path = export_bundle(int8(cfg_seq), cfg.warehouse, untrained(cfg_seq), tmp / "bundle-seq-int8", files)
    print(
        f"setup (warehouse + 4 exports): {time.perf_counter() - t:.1f} s; model {cfg.model.backbone} "
        f"{cfg.model.expert_dims} x{cfg.model.n_experts}; sequence {sequence.name!r}: {sequence.event}s of "
        f"{sequence.items}, N = {sequence.max_length}, encoder {sequence.encoder}"
    )
    scorer = Scorer(load_bundle(bundle_path), intra_op_threads=1)
    seq_scorer = Scorer(load_bundle(seq_bundle_path), intra_op_threads=1)
    int8_scorer = Scorer(load_bundle(int8_path), intra_op_threads=1)
    int8_seq_scorer = Scorer(load_bundle(int8_seq_path), intra_op_threads=1)
    table: dict[str, dict[str, str]] = {"float32": {}, "int8": {}}  # the closing float32 / int8 table
    history = pq.read_table(seq_bundle_path / "features" / "sequences" / f"{sequence.name}.parquet", columns=["key"])
    counts = pc.value_counts(history.column("key")).to_pylist()
    users = sorted(c["values"] for c in counts if c["counts"] == sequence.max_length)  # full histories
    if not users:
        raise SystemExit(f"no user has {sequence.max_length} bundled elements: lower --sequence-length")
    items = pq.read_table(raw_dir(cfg.warehouse, "items")).column("item_id").to_pylist()
    as_of = seq_scorer.spec.events.features_as_of
    rng = np.random.default_rng(0)

    def request(k: int) -> dict:
        picked = rng.choice(len(items), args.candidates, replace=False)
        return {
            "user_id": users[k % len(users)],
            "context": {"device": "ios", "slot": int(k % 10)},
            "candidates": [{"item_id": items[i]} for i in picked],
        }

    def recent(k: int) -> list[dict]:
        """10 clicks of the as-of day (fresh events in front of the bundled history)."""
        picked = rng.choice(len(items), 10, replace=False)
        return [
            {"item_id": items[i], "event": "click", "ts": f"{as_of.isoformat()}T{j:02d}:{k % 60:02d}:00Z"}
            for j, i in enumerate(picked)
        ]

    def torch_score(feeds: dict[str, np.ndarray]) -> np.ndarray:
        values, lengths = [], []
        for f in cfg.features.sparse:
            ids = feeds[f.name]
            if f.kind == "list":
                keep = ids >= 0
                values.append(ids[keep])
                lengths.append(keep.sum(1))
            else:
                values.append(ids)
                lengths.append(np.ones(len(ids), np.int64))
        kjt = KeyedJaggedTensor(
            keys=model.sparse_names,
            values=torch.from_numpy(np.concatenate(values)),
            lengths=torch.from_numpy(np.concatenate(lengths)),
        )
        with torch.no_grad():
            out = model(torch.from_numpy(feeds["dense"]), kjt)
        return (out.probs["click"] * out.probs["ctcvr"]).numpy()

    requests = [request(k) for k in range(args.requests)]
    with_recent = [r | {"recent": recent(k)} for k, r in enumerate(requests)]
    for r in requests[:50]:  # warm up all
        scorer.score(r)
        seq_scorer.score(r)
        int8_scorer.score(r)
        int8_seq_scorer.score(r)
        torch_score(scorer.feeds(scorer.request_table(r)))
    onnx_ms, torch_ms, onnx_cpu_ms, seq_ms, seq_cpu_ms, recent_ms = [], [], [], [], [], []
    int8_ms, int8_seq_ms = [], []
    for r, fresh in zip(requests, with_recent, strict=True):  # in turns: all see the same load
        t = time.perf_counter()
        int8_scorer.score(r)
        int8_ms.append((time.perf_counter() - t) * 1000)
        t = time.perf_counter()
        int8_seq_scorer.score(r)
        int8_seq_ms.append((time.perf_counter() - t) * 1000)
        t, c = time.perf_counter(), time.thread_time()
        scorer.score(r)
        onnx_ms.append((time.perf_counter() - t) * 1000)
        onnx_cpu_ms.append((time.thread_time() - c) * 1000)
        t, c = time.perf_counter(), time.thread_time()
        seq_scorer.score(r)
        seq_ms.append((time.perf_counter() - t) * 1000)
        seq_cpu_ms.append((time.thread_time() - c) * 1000)
        t = time.perf_counter()
        seq_scorer.score(fresh)
        recent_ms.append((time.perf_counter() - t) * 1000)
        t = time.perf_counter()
        torch_score(scorer.feeds(scorer.request_table(r)))
        torch_ms.append((time.perf_counter() - t) * 1000)
    print(f"in-process 1 user x {args.candidates} candidates, {len(requests)} requests, 1 thread:")
    print(
        f"  onnxruntime scorer, no sequences   {_percentiles(onnx_ms)}   (target p99 <= 3 ms); CPU time per "
        f"request: {_percentiles(onnx_cpu_ms)}"
    )
    print(
        f"  onnxruntime scorer, N = {sequence.max_length:<3} history {_percentiles(seq_ms)}   (target p99 <= 5 ms); "
        f"CPU time per request: {_percentiles(seq_cpu_ms)}; {len(users)} users with full histories"
    )
    print(f"    + 10 recent events in front     {_percentiles(recent_ms)}")
    print(f"  int8 scorer, no sequences         {_percentiles(int8_ms)}")
    print(f"  int8 scorer, N = {sequence.max_length:<3} history      {_percentiles(int8_seq_ms)}")
    for precision, no_seq, seq in (("float32", onnx_ms, seq_ms), ("int8", int8_ms, int8_seq_ms)):
        table[precision]["in-process, no sequences: p50 / p99 ms"] = _p50_p99(no_seq)
        table[precision][f"in-process, N = {sequence.max_length} history: p50 / p99 ms"] = _p50_p99(seq)
    print(
        f"  PyTorch eager, no sequences        {_percentiles(torch_ms)}   ratio p50 torch/onnx "
        f"{np.median(torch_ms) / np.median(onnx_ms):.2f}x"
    )
    for label, served in (
        ("no sequences", scorer),
        (f"N = {sequence.max_length} history", seq_scorer),
        ("no sequences, int8", int8_scorer),
    ):
        phases: dict[str, list[float]] = {
            "parse JSON + validate": [],
            "encode features": [],
            "onnxruntime": [],
            "rank + serialise JSON": [],
        }
        for r in requests:
            body = json.dumps(r).encode()
            t0 = time.thread_time()
            parsed = parse_rank_request(body, ScoringLimits())
            t1 = time.thread_time()
            item_ids, feeds = served.request_feeds(parsed)
            t2 = time.thread_time()
            outputs = served.run(feeds, len(item_ids))
            t3 = time.thread_time()
            rank_response(served.version, item_ids, served.result_names, outputs)
            t4 = time.thread_time()
            for name, a, b in zip(phases, (t0, t1, t2, t3), (t1, t2, t3, t4), strict=True):
                phases[name].append((b - a) * 1000)
        # CPU time (not wall time): what each phase costs, whatever else shares the cores.
        print(
            f"  CPU time per phase of one HTTP request's work ({label}, in-process, p50): "
            + ", ".join(f"{name} {np.median(ms):.3f} ms" for name, ms in phases.items())
        )
    if args.in_process_only:
        _print_table(table)
        shutil.rmtree(tmp, ignore_errors=True)
        return

    # batch: a day of impressions as the input table
    rows = pq.read_table(validated_root(cfg.warehouse, "impressions")).select(["user_id", "item_id", "device", "slot"])
    rows = pa.concat_tables([rows] * 4)
    cores = os.cpu_count() or 1
    scorer = Scorer(load_bundle(bundle_path), intra_op_threads=1)
    torch.set_num_threads(cores)
    scorer.score_table(rows.slice(0, 1000))
    t, c = time.perf_counter(), time.process_time()
    scorer.score_table(rows, workers=cores)
    onnx_s, onnx_cpu_s = time.perf_counter() - t, time.process_time() - c
    feeds = scorer.feeds(rows)
    t = time.perf_counter()
    scorer.feeds(rows)
    feature_s = time.perf_counter() - t
    t = time.perf_counter()
    torch_score(feeds)
    torch_s = time.perf_counter() - t + feature_s
    # float32 and int8 in turns, 3 runs each, the best of each: both see the same load
    int8_batch = Scorer(load_bundle(int8_path), intra_op_threads=1)
    int8_batch.score_table(rows.slice(0, 1000))
    turns: dict[str, list[float]] = {"float32": [], "int8": []}
    for _ in range(3):
        for precision, served in (("float32", scorer), ("int8", int8_batch)):
            t = time.perf_counter()
            served.score_table(rows, workers=cores)
            turns[precision].append(rows.num_rows / (time.perf_counter() - t))
    for precision, rates in turns.items():
        table[precision]["batch score_table: rows/s (best of 3 in turns)"] = f"{max(rates):,.0f}"
        print(f"batch score_table, {precision}, 3 runs in turns: " + ", ".join(f"{r:,.0f}" for r in rates) + " rows/s")
    print(
        f"batch score_table, {rows.num_rows:,} rows, {cores} threads: {rows.num_rows / onnx_s:,.0f} rows/s (target "
        ">= 300,000); "
        f"PyTorch eager on the same features {rows.num_rows / torch_s:,.0f} rows/s; ratio {torch_s / onnx_s:.2f}x; "
        f"scorer CPU time {onnx_cpu_s:.2f} s = {rows.num_rows / onnx_cpu_s:,.0f} rows per CPU-second"
    )

    # HTTP: a server process per precision, one load-generator process at a time, in turns
    payloads = tmp / "payloads.json"
    payloads.write_text(json.dumps([json.dumps(request(k)) for k in range(500)]))
    try:
        for precision, rows in _http(args, {"float32": bundle_path, "int8": int8_path}, payloads).items():
            table[precision].update(rows)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _print_table(table)
    print(f"load average during the run: {os.getloadavg()}; cores: {os.cpu_count()}")


def _p50_p99(ms: list[float]) -> str:
    return f"{np.percentile(ms, 50):.3f} / {np.percentile(ms, 99):.3f}"


def _print_table(table: dict[str, dict[str, str]]) -> None:
    """The float32 and int8 figures side by side (Markdown)."""
    print("\n| measure | float32 | int8 |\n|---|---|---|")
    for measure in table["float32"]:
        print(f"| {measure} | {table['float32'][measure]} | {table['int8'].get(measure, '')} |")


def _start_server(bundle_path: Path) -> tuple[subprocess.Popen, int]:
    """``funnelrank serve --bundle B`` on a free loopback port, once /healthz answers."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, "-m", "pipeline.cli", "serve", "--bundle", str(bundle_path), "--port", str(port)],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 60
    while True:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            conn.request("GET", "/healthz")
            if conn.getresponse().status == 200:
                return server, port
        except OSError:
            pass
        if time.monotonic() > deadline or server.poll() is not None:
            server.kill()
            raise SystemExit(f"server did not start: {server.stderr.read().decode()}")
        time.sleep(0.05)


def _http(args: argparse.Namespace, bundles: dict[str, Path], payloads: Path) -> dict[str, dict[str, str]]:
    """A ``funnelrank serve`` per bundle (precision -> folder), loaded in turns (so every
    precision sees the same background load): the closed loop, then the open loop at each of
    ``--http-rates`` until every server's p99 has exceeded 20 ms. Per precision, the table's
    rows: the saturation throughput, and the highest offered rate whose p99 stayed within 20 ms."""
    servers = {}
    try:
        for precision, path in bundles.items():
            servers[precision] = _start_server(path)

        def load(precision: str, rate: float, requests: int) -> tuple[dict, float]:
            server, port = servers[precision]
            cpu = _cpu_seconds(server.pid)
            client = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--http-requests",
                    str(requests),
                    "--http-clients",
                    str(args.http_clients),
                    "--http-client",
                    str(port),
                    str(payloads),
                    str(rate),
                ],
                capture_output=True,
                text=True,
                check=True,
            )
            return json.loads(client.stdout.strip().splitlines()[-1]), _cpu_seconds(server.pid) - cpu

        rows: dict[str, dict[str, str]] = {p: {} for p in servers}
        for precision, (_, port) in servers.items():
            result, server_cpu = load(precision, 0.0, args.http_requests)
            print(
                f"HTTP loopback ({precision}), {args.http_clients} concurrent clients, {result['requests']:,} "
                f"requests of {args.candidates} candidates: "
                f"p50 {result['p50_ms']:.2f} ms, p99 {result['p99_ms']:.2f} ms, "
                f"{result['requests'] / result['wall_s']:,.0f} req/s, "
                f"errors {result['errors']} (target p99 <= 20 ms, 0 errors)"
            )
            print(
                f"  server's own mean time per request {_server_mean_ms(port):.2f} ms (queueing included); CPU time "
                "per request: "
                f"server {1000 * server_cpu / result['requests']:.3f} ms, load generator "
                f"{1000 * result['cpu_s'] / result['requests']:.3f} ms "
                f"(so {os.cpu_count()} cores serve at most "
                f"~{result['requests'] * os.cpu_count() / (server_cpu + result['cpu_s']):,.0f} req/s)"
            )
            rows[precision]["HTTP closed loop: req/s (p99 ms)"] = (
                f"{result['requests'] / result['wall_s']:,.0f} ({result['p99_ms']:.1f})"
            )
        best: dict[str, tuple[float, dict] | None] = dict.fromkeys(servers)
        within = set(servers)  # the precisions whose p99 has stayed within 20 ms so far
        for rate in args.http_rates:
            for precision in [p for p in servers if p in within]:
                # each step offers about the same seconds of load: enough requests for a p99
                result, _ = load(precision, rate, max(1000, int(rate * args.http_seconds)))
                ok = result["p99_ms"] <= 20.0 and result["errors"] == 0
                print(
                    f"HTTP open loop ({precision}), {rate:,.0f} req/s offered over {args.http_clients} connections, "
                    f"{result['requests']:,} requests: p50 {result['p50_ms']:.2f} ms, p99 {result['p99_ms']:.2f} ms "
                    f"(from each request's due time), {result['requests'] / result['wall_s']:,.0f} req/s served, "
                    f"errors {result['errors']}" + ("" if ok else "  <- over p99 20 ms")
                )
                if ok:
                    best[precision] = (rate, result)
                else:
                    within.discard(precision)
            if not within:
                break
        for precision, found in best.items():
            rows[precision]["HTTP open loop: highest offered req/s with p99 <= 20 ms (p99 ms)"] = (
                f"{found[0]:,.0f} ({found[1]['p99_ms']:.1f})" if found else f"< {args.http_rates[0]:,.0f}"
            )
        return rows
    finally:
        for server, _ in servers.values():
            server.terminate()
            server.wait(timeout=10)


if __name__ == "__main__":
    main()
