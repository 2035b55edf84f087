"""The registered bundle as an MLflow pyfunc model, on the tiny warehouse's trained run (a
real sqlite store): ``mlflow.pyfunc.load_model("models:/funnelrank@champion").predict``
in a process where torch cannot be imported gives ``funnelrank score``'s scores; ``mlflow
models serve`` answers /invocations with them; ``funnelrank serve`` and ``score`` take a
``models:/`` URI. And the int8 export: measured against float32, recorded, refused
beyond its bounds."""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from bundle_fixture import DAYS, START
from import_blocker import run_blocked
from serve_fixture import call, free_port, start_server, stop_server

from features.catalog import scan_validated
from features.config import ConfigError
from features.errors import StageError
from models.export import check_quantization
from models.tracking import to_toml, tracking_uri
from pipeline.cli import main
from pipeline.config import load_config
from pipeline.export_stage import export_run
from pipeline.registry import register_candidate, serving_requirements, set_champion
from pipeline.train_stage import train_run
from serving.bundle import load_bundle, load_bundle_from_mlflow
from serving.scorer import Scorer

RUN_DATE = START + dt.timedelta(days=DAYS - 1)
VAL_DAY = RUN_DATE - dt.timedelta(days=1)
ROOT = Path(__file__).resolve().parents[1]
CHAMPION = "models:/funnelrank@champion"
# the pyfunc model runs where torch and its kin cannot be imported (mlflow and pydantic can: MLflow hosts it)
TORCH_FREE = ("torch", "torchrec", "fbgemm_gpu", "polars")


@pytest.fixture(scope="module")
def champion(tiny_run, tmp_path_factory):
    """The tiny run trained, exported (logged as a pyfunc model) and registered as the
    champion; rows to score (200 impressions of the validation day, every other one with a
    fresh click in ``recent``) and ``funnelrank score``'s output for them."""
    cfg, config = tiny_run
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    train_run(cfg, cfg.warehouse, RUN_DATE, progress=False)  # skips when another test trained it
    summary = export_run(cfg, cfg.warehouse, RUN_DATE)
    version = register_candidate(cfg, summary["mlflow_run_id"], summary["artifact_uri"], {})
    set_champion(cfg, version)

    tmp = tmp_path_factory.mktemp("pyfunc")
    rows = scan_validated(cfg.warehouse, "impressions", VAL_DAY).head(200).collect().to_arrow()
    rows = rows.select(["user_id", "item_id", "device", "slot"])
    as_of = load_bundle(summary["bundle"]).spec.events.features_as_of
    items = rows.column("item_id").to_pylist()
    recent = [
        [{"item_id": items[-1 - i], "event": "click", "ts": f"{as_of}T00:{i % 60:02d}:00Z"}] if i % 2 else None
        for i in range(rows.num_rows)
    ]
    rows = rows.append_column("recent", pa.array(recent))
    pq.write_table(rows, tmp / "rows.parquet")
    assert main(["score", "--config", str(config), "--bundle", summary["bundle"], "--input", str(tmp / "rows.parquet"),
                 "--output", str(tmp / "scored.parquet")]) == 0  # fmt: skip
    return cfg, config, summary, tmp


def _scores(frame: pd.DataFrame, names: tuple[str, ...]) -> np.ndarray:
    return frame[list(names)].to_numpy(np.float32)


def test_champion_loads_with_pyfunc_without_torch_and_scores_as_funnelrank_score(champion):
    cfg, config, summary, tmp = champion
    store = tracking_uri(cfg.state_dir)
    names = Scorer(load_bundle(summary["bundle"])).result_names
    res = run_blocked(
        f"""
        import mlflow.pyfunc, pandas as pd
        model = mlflow.pyfunc.load_model({CHAMPION!r})
        out = model.predict(pd.read_parquet({str(tmp / "rows.parquet")!r}))
        out.to_parquet({str(tmp / "pyfunc.parquet")!r})
        assert not leaked_modules(), leaked_modules()
        print("ok", list(out.columns))
        """,
        timeout=300,
        blocked=TORCH_FREE,
        env={**os.environ, "MLFLOW_TRACKING_URI": store},
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.strip().splitlines()[-1] == f"ok {list(names)}"
    want = _scores(pd.read_parquet(tmp / "scored.parquet"), names)
    np.testing.assert_allclose(_scores(pd.read_parquet(tmp / "pyfunc.parquet"), names), want, rtol=1e-6, atol=1e-7)

    # the logged model: the bundle as its artifact, the serving package its only code, the
    # serving extra its requirements, a signature of the spec's outputs and an input example
    model_dir = load_bundle_from_mlflow(CHAMPION, tmp / "download", store).path.parents[1]
    assert (model_dir / "MLmodel").is_file()
    assert sorted(p.name for p in (model_dir / "code").iterdir()) == ["serving"]
    assert not list((model_dir / "code").rglob("*.pyc"))
    import mlflow

    # MLflow pins itself (the host); the rest is the serving extra
    assert (model_dir / "requirements.txt").read_text().split() == [
        f"mlflow=={mlflow.__version__}"
    ] + serving_requirements()
    assert {re.split("[=<>]", r)[0] for r in serving_requirements()} == {"onnxruntime", "numpy", "pyarrow"}
    from mlflow.models import Model

    logged = Model.load(model_dir)
    assert [c.name for c in logged.signature.outputs.inputs] == list(names)
    inputs = {c.name: c.required for c in logged.signature.inputs.inputs}
    assert inputs == {"user_id": True, "item_id": True, "device": False, "slot": False, "recent": False}
    example = json.loads((model_dir / "serving_input_example.json").read_text())
    assert example["dataframe_split"]["columns"] == list(inputs)

    # the scorer's own loader and `funnelrank score` take the same URI
    assert load_bundle_from_mlflow(CHAMPION, tmp / "again", store).sha256 == summary["bundle_sha256"]
    out = tmp / "by-uri.parquet"
    assert main(["score", "--config", str(config), "--bundle", CHAMPION, "--input", str(tmp / "rows.parquet"),
                 "--output", str(out)]) == 0  # fmt: skip
    np.testing.assert_array_equal(_scores(pd.read_parquet(out), names), want)


def test_mlflow_models_serve_answers_invocations_with_the_same_scores(champion):
    cfg, _, summary, tmp = champion
    names = Scorer(load_bundle(summary["bundle"])).result_names
    rows = pd.read_parquet(tmp / "rows.parquet").head(50)
    port = free_port()
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "models",
            "serve",
            "-m",
            CHAMPION,
            "--env-manager",
            "local",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
        ],  # fmt: skip
        cwd=tmp,
        # it runs `uvicorn` from PATH: this interpreter's (the venv's, which `make test` does not put on PATH)
        env={
            **os.environ,
            "MLFLOW_TRACKING_URI": tracking_uri(cfg.state_dir),
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        },
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group: the workers it starts stop with it
    )
    try:
        deadline = time.monotonic() + 180
        while True:  # poll until ready, never a fixed sleep
            try:
                if call(port, "GET", "/ping")[0] == 200:
                    break
            except OSError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                _stop(server, signal.SIGKILL)
                pytest.fail(f"mlflow models serve did not start: {server.communicate()[1][-3000:]}")
            time.sleep(0.2)
        body = json.dumps({"dataframe_split": json.loads(rows.to_json(orient="split", index=False))}).encode()
        status, answer = call(port, "POST", "/invocations", body, {"Content-Type": "application/json"})
        assert status == 200, answer[:2000]
        got = pd.DataFrame(json.loads(answer)["predictions"])
        want = pd.read_parquet(tmp / "scored.parquet").head(50)
        np.testing.assert_allclose(_scores(got, names), _scores(want, names), rtol=1e-6, atol=1e-7)
        status, answer = call(port, "POST", "/invocations", b'{"dataframe_split": {"columns": ["item_id"], '
                              b'"data": [["x"]]}}', {"Content-Type": "application/json"})  # fmt: skip
        assert status == 400 and b"user_id" in answer  # the signature's required column, named
    finally:
        _stop(server, signal.SIGTERM)


def _stop(server: subprocess.Popen, sig: int) -> None:
    """Signal the server's process group (it and the workers it started), SIGKILL after 30 s."""
    for attempt in (sig, signal.SIGKILL):
        try:
            os.killpg(server.pid, attempt)
        except ProcessLookupError:  # the group is gone
            break
        try:
            server.wait(timeout=30)
            break
        except subprocess.TimeoutExpired:
            continue


def test_funnelrank_serve_takes_the_champion_uri(champion):
    cfg, config, summary, _ = champion
    local = Scorer(load_bundle(summary["bundle"]))
    rows = pd.read_parquet(champion[3] / "rows.parquet")
    request = {
        "user_id": rows["user_id"][0],
        "context": {"device": rows["device"][0], "slot": int(rows["slot"][0])},
        "candidates": [{"item_id": i} for i in rows["item_id"][:20]],
    }
    proc, port = start_server(CHAMPION, "--config", str(config))
    try:
        status, body = call(port, "POST", "/v1/rank", json.dumps(request).encode())
        assert status == 200
        answer = json.loads(body)
        assert answer["model_version"] == local.version
        np.testing.assert_allclose(
            [c["score"] for c in answer["items"]], [c["score"] for c in local.score(request)], rtol=1e-6
        )
    finally:
        stop_server(proc)

    # an unknown model: one line naming it, exit 3
    assert main(["serve", "--config", str(config), "--bundle", "models:/nope@champion", "--port", "0"]) == 3


def test_int8_export_is_measured_recorded_and_logged_beside_float32(champion, tmp_path, capsys):
    cfg, config, summary, rows = champion
    date = RUN_DATE.isoformat()
    # the tiny model is barely trained (AUC ~0.52): int8 moves its click AUC by ~0.005, refused by default
    assert main(["export", "--config", str(config), "--date", date, "--quantize", "int8"]) == 3
    err = capsys.readouterr().err
    assert "funnelrank export: int8 export refused on 5,008 rows: click AUC fell" in err
    assert "export.max_auc_drop 0.001" in err
    folder = Path(summary["bundle"] + "-int8")
    assert not folder.exists() and not list(folder.parent.glob(".tmp-*"))

    loose = tmp_path / "config.toml"  # the same run (export settings are no part of its key), wider bounds
    export = {"quantize": "int8", "max_auc_drop": 0.05, "max_calibration_change": 0.05}
    loose.write_text(to_toml(cfg.model_dump(by_alias=True) | {"export": export}))
    assert main(["export", "--config", str(loose), "--date", date]) == 0
    out = capsys.readouterr().out
    assert f"bundle {folder} written" in out
    assert f"MLflow artifacts runs:/{summary['mlflow_run_id']}/bundle-int8" in out
    assert "int8 against float32 on 5,008 rows of 2026-11-03:" in out
    for view in ("click", "ctcvr", "cvr"):
        assert f"  {view:8s} AUC " in out
    bundle = load_bundle(folder)
    q = bundle.manifest["quantization"]
    assert q["precision"] == "int8" and q["ops"] == ["MatMul", "Gemm"]
    assert q["rows"] == 5008  # every row of the validation day
    assert set(q["max_abs_diff"]) == {"p_click", "p_cvr", "p_ctcvr", "score"}
    assert 0 < q["max_abs_diff"]["p_click"] < 0.05  # quantised, and close
    assert q["bounds"] == {"max_auc_drop": 0.05, "max_calibration_change": 0.05}
    for m in q["views"].values():
        assert m["auc_change"] >= -0.05 and abs(m["calibration_change"]) <= 0.05
    float32 = load_bundle(summary["bundle"])
    assert float32.manifest["quantization"] is None  # the float32 bundle is untouched
    assert len(bundle.data("model.onnx")) < len(float32.data("model.onnx"))
    scored = Scorer(bundle).score_table(pq.read_table(rows / "rows.parquet"))  # the light scorer runs it
    assert np.isfinite(scored.column("score").to_numpy()).all()
    logged = f"runs:/{summary['mlflow_run_id']}/bundle-int8"
    assert load_bundle_from_mlflow(logged, tmp_path / "int8", tracking_uri(cfg.state_dir)).sha256 == bundle.sha256


def test_check_quantization_names_each_view_beyond_the_bounds():
    views = {
        "click": {"auc_float32": 0.7, "auc_int8": 0.698, "auc_change": -0.002, "calibration_float32": 1.0,
                  "calibration_int8": 1.0, "calibration_change": 0.0},
        "ctcvr": {"auc_float32": 0.7, "auc_int8": 0.7, "auc_change": 0.0, "calibration_float32": 1.0,
                  "calibration_int8": 1.02, "calibration_change": 0.02},
        "cvr": {"auc_float32": 0.7, "auc_int8": 0.6995, "auc_change": -0.0005, "calibration_float32": 1.0,
                "calibration_int8": 0.995, "calibration_change": -0.005},
    }  # fmt: skip
    with pytest.raises(StageError) as err:
        check_quantization({"rows": 10, "views": views}, 0.001, 0.01)
    assert "click AUC fell 0.00200" in str(err.value) and "ctcvr calibration moved +2.00%" in str(err.value)
    assert "cvr" not in str(err.value).replace("ctcvr", "")
    check_quantization({"rows": 10, "views": views}, 0.003, 0.03)  # within wider bounds


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("quantize", "int4", r"export\.quantize: Input should be 'none' or 'int8'"),
        ("max_auc_drop", -0.1, r"export\.max_auc_drop: Input should be greater than or equal to 0"),
        ("max_calibration_change", 1.5, r"export\.max_calibration_change: Input should be less than 1"),
    ],
)
def test_bad_export_keys_are_named(key, value, message):
    with pytest.raises(ConfigError, match=message):
        load_config(ROOT / "configs" / "demo.toml", {"export": {key: value}})
