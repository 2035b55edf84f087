"""A bundle serves only what its manifest verifies: plain relative manifest entries, no
symbolic links, every file spec.json names listed, the scorer built from the bytes that
were hashed (a file swapped after the check is not served), malformed bundles refused in
one line at `score` and `serve` and counted as failed reloads (SIGHUP and admin) while the
old model keeps serving, and the optional HMAC signature of the manifest."""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import http.client
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from bundle_fixture import ROOT, START, small_model, users_and_items

from features.catalog import validated_dir
from features.io import sha256_file
from pipeline.bundle import export_bundle
from pipeline.cli import main
from serving.bundle import SIGNATURE, SIGNING_KEY_ENV, BundleError, load_bundle
from serving.http import ADMIN_TOKEN_ENV
from serving.scorer import Scorer

KEY = "correct horse battery staple"
ADMIN_TOKEN = "integrity-test-token"


@pytest.fixture(scope="module")
def bundles(tiny_warehouse, tmp_path_factory):
    """Two bundles of the same model with features as of different days, and one signed."""
    cfg, files = tiny_warehouse
    tmp = tmp_path_factory.mktemp("integrity")
    model = small_model(cfg, files)
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv(SIGNING_KEY_ENV, raising=False)
        a = export_bundle(cfg, cfg.warehouse, model, tmp / "a", files)
        b = export_bundle(cfg, cfg.warehouse, model, tmp / "b", files, as_of=START + dt.timedelta(days=2))
        patch.setenv(SIGNING_KEY_ENV, KEY)
        signed = export_bundle(cfg, cfg.warehouse, model, tmp / "signed", files)
    return cfg, a, b, signed


@pytest.fixture(autouse=True)
def no_signing_key(monkeypatch):
    monkeypatch.delenv(SIGNING_KEY_ENV, raising=False)


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _rehash(folder: Path) -> None:
    """Make the manifest's checksums match the (edited) files again."""
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["files"] = {name: sha256_file(folder / name) for name in manifest["files"]}
    (folder / "manifest.json").write_text(json.dumps(manifest))


def _edit_spec(folder: Path, change) -> Path:
    spec = json.loads((folder / "spec.json").read_text())
    change(spec)
    (folder / "spec.json").write_text(json.dumps(spec))
    _rehash(folder)
    return folder


def _add_entry(folder: Path, name: str, digest: str) -> None:
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["files"][name] = digest
    (folder / "manifest.json").write_text(json.dumps(manifest))


def _sparse_index(spec: dict, name: str) -> int:
    return next(i for i, f in enumerate(spec["sparse"]) if f["name"] == name)


# ---- manifest entries and links -------------------------------------------------------


@pytest.mark.parametrize(
    "entry",
    ["../outside.parquet", "ABSOLUTE", "./spec.json", "vocab//device.parquet", "vocab\\device.parquet", "vocab/."],
)
def test_manifest_entries_must_be_plain_relative_paths_inside_the_bundle(bundles, tmp_path, entry):
    """Each entry names a file whose digest is right: only the path itself is wrong."""
    _, a, _, _ = bundles
    copy = _copy(a, tmp_path / "bundle")
    outside = tmp_path / "outside.parquet"
    shutil.copy(copy / "vocab" / "device.parquet", outside)
    entry = str(outside) if entry == "ABSOLUTE" else entry
    _add_entry(copy, entry, sha256_file(outside))
    with pytest.raises(BundleError, match=r"entry .* is not a plain relative path inside the bundle"):
        load_bundle(copy)


def test_manifest_digests_must_be_sha256(bundles, tmp_path):
    _, a, _, _ = bundles
    copy = _copy(a, tmp_path / "bundle")
    _add_entry(copy, "spec.json", 12)
    with pytest.raises(BundleError, match=r"entry 'spec.json' must map to a sha256 hex digest, got 12"):
        load_bundle(copy)


@pytest.mark.parametrize("link", ["file", "folder"])
def test_symbolic_links_inside_a_bundle_are_refused(bundles, tmp_path, link):
    """Export writes none; a link could lead anywhere (the checksums would still match here)."""
    _, a, _, _ = bundles
    copy = _copy(a, tmp_path / "bundle")
    if link == "file":
        target = tmp_path / "device.parquet"
        shutil.move(copy / "vocab" / "device.parquet", target)
        (copy / "vocab" / "device.parquet").symlink_to(target)
        linked = copy / "vocab" / "device.parquet"
    else:
        target = tmp_path / "vocab"
        shutil.move(copy / "vocab", target)
        (copy / "vocab").symlink_to(target, target_is_directory=True)
        linked = copy / "vocab"
    with pytest.raises(BundleError, match=rf"{linked} is a symbolic link"):
        load_bundle(copy)


def test_the_bundle_folder_itself_may_be_a_link(bundles, tmp_path):
    _, a, _, _ = bundles
    (tmp_path / "current").symlink_to(a, target_is_directory=True)
    assert load_bundle(tmp_path / "current").sha256 == load_bundle(a).sha256


# ---- spec.json names only files of the manifest ----------------------------------------


@pytest.mark.parametrize("where", ["vocab", "snapshot", "aggregate"])
def test_every_file_spec_json_names_must_be_listed_in_the_manifest(bundles, tmp_path, where):
    """A vocabulary outside the bundle (and unlisted) was loaded and served before."""
    _, a, _, _ = bundles
    copy = _copy(a, tmp_path / "bundle")
    spec = json.loads((copy / "spec.json").read_text())
    if where == "vocab":
        outside = shutil.copy(copy / "vocab" / "device.parquet", tmp_path / "device.parquet")
        key, name = f"sparse[{_sparse_index(spec, 'device')}].vocab", str(outside)
        spec["sparse"][_sparse_index(spec, "device")]["vocab"] = name
    elif where == "snapshot":
        key, name = "snapshots.users.file", "features/../features/users.parquet"
        spec["snapshots"]["users"]["file"] = name
    else:
        key, name = "aggregate_keys[0].file", "features/aggregates/other.parquet"
        spec["aggregate_keys"][0]["file"] = name
    _edit_spec(copy, lambda s: s.update(spec))
    message = f"spec.json: key {key!r} names {name!r}, which is not a file listed in manifest.json"
    with pytest.raises(BundleError, match=re.escape(message)):
        load_bundle(copy)


# ---- the scorer is built from the verified bytes -----------------------------------------


def test_files_swapped_after_the_check_are_not_served(bundles, tmp_path):
    """load_bundle reads each file once, hashes those bytes and keeps them: replacing the
    whole folder between load_bundle and the Scorer (or deleting it) changes nothing."""
    cfg, a, b, _ = bundles
    copy = _copy(a, tmp_path / "bundle")
    rows = pq.read_table(
        validated_dir(cfg.warehouse, "impressions", START + dt.timedelta(days=3)),
        columns=["user_id", "item_id", "device", "slot"],
    )
    want = Scorer(load_bundle(a)).score_table(rows).column("score")
    swapped = Scorer(load_bundle(b)).score_table(rows).column("score")
    assert not want.equals(swapped)  # b's features differ: serving b's files would show

    checked = load_bundle(copy)
    shutil.rmtree(copy)
    shutil.copytree(b, copy)  # every file replaced by a valid file of another bundle
    assert Scorer(checked).score_table(rows).column("score").equals(want)
    shutil.rmtree(copy)
    assert Scorer(checked).score_table(rows).column("score").equals(want)


# ---- malformed bundles with correct checksums -----------------------------------------


def _empty_model(folder: Path) -> None:
    (folder / "model.onnx").write_bytes(b"")
    _rehash(folder)


def _empty_vocab(folder: Path) -> None:
    (folder / "vocab" / "device.parquet").write_bytes(b"")
    _rehash(folder)


def _snapshot_without_a_column(folder: Path) -> None:
    users = pq.read_table(folder / "features" / "users.parquet")
    pq.write_table(users.drop_columns(["sparse:gender"]), folder / "features" / "users.parquet")
    _rehash(folder)


MALFORMED = {
    "empty model": (_empty_model, r"model.onnx \(0 bytes\) is not a model onnxruntime can load"),
    "missing key": (lambda f: _edit_spec(f, lambda s: s.pop("scoring")), r"spec.json: key 'scoring' is missing"),
    "wrong type": (
        lambda f: _edit_spec(f, lambda s: s["sparse"][0].update(capacity="100")),
        r"key 'sparse\[0\].capacity' must be an integer, got '100'",
    ),
    "zero OOV buckets": (
        lambda f: _edit_spec(f, lambda s: s["sparse"][0].update(oov_buckets=0)),
        r"key 'sparse\[0\].oov_buckets' must be at least 1, got 0",
    ),
    "unknown table": (
        lambda f: _edit_spec(f, lambda s: s["sparse"][0].update(table="sessions")),
        r"key 'sparse\[0\].table' must be one of \['impressions', 'users', 'items'\]",
    ),
    "spec not JSON": (lambda f: ((f / "spec.json").write_text("{"), _rehash(f)), r"spec.json is not valid JSON"),
    "empty vocabulary": (_empty_vocab, r"vocab/device.parquet is not a Parquet file"),
    "snapshot lacks a column": (_snapshot_without_a_column, r"features/users.parquet has no column 'sparse:gender'"),
    "inputs differ from the model's": (
        lambda f: _edit_spec(f, lambda s: s["sparse"].pop()),
        r"model.onnx takes the inputs .*, but spec.json's sparse and dense keys give",
    ),
    "dense width differs from the model's": (
        lambda f: _edit_spec(f, lambda s: s["dense"].pop()),
        r"model.onnx takes 31 dense features, spec.json's key 'dense' lists 30",
    ),
    "an output the model lacks": (
        lambda f: _edit_spec(f, lambda s: s["tasks"][0].update(served="ctr")),
        r"model.onnx has no output 'p_ctr'",
    ),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_a_malformed_bundle_is_one_line_and_exit_3_at_score(bundles, tmp_path, capsys, case):
    cfg, a, _, _ = bundles
    break_it, message = MALFORMED[case]
    copy = _copy(a, tmp_path / "bundle")
    break_it(copy)
    rows = tmp_path / "rows.parquet"
    pq.write_table(
        pq.read_table(validated_dir(cfg.warehouse, "impressions", START), columns=["user_id", "item_id"]), rows
    )
    assert main(["score", "--bundle", str(copy), "--input", str(rows), "--output", str(tmp_path / "out.parquet")]) == 3
    err = capsys.readouterr().err
    assert err.startswith("funnelrank score: ") and err.count("\n") == 1, err
    assert re.search(message, err), err


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _call(port: int, method: str, path: str, body: bytes = b"", headers: dict | None = None) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def _serve(bundle: Path, port: int, env: dict | None = None) -> subprocess.Popen:
    command = [sys.executable, "-m", "pipeline.cli", "serve", "--bundle", str(bundle), "--port", str(port)]
    return subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


@pytest.mark.parametrize("case", ["empty model", "missing key", "snapshot lacks a column"])
def test_serve_refuses_a_malformed_bundle_at_start_in_one_line(bundles, tmp_path, case):
    _, a, _, _ = bundles
    break_it, message = MALFORMED[case]
    copy = _copy(a, tmp_path / "bundle")
    break_it(copy)
    proc = _serve(copy, _free_port())
    try:
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 3, err
    assert err.startswith("funnelrank serve: ") and err.count("\n") == 1 and "Traceback" not in err, err
    assert re.search(message, err), err


def _reloads(port: int, result: str) -> int:
    metrics = _call(port, "GET", "/metrics")[1].decode()
    counter = f'funnelrank_reloads_total{{result="{result}"}} '
    line = next((x for x in metrics.splitlines() if x.startswith(counter)), None)
    return int(line.rsplit(" ", 1)[1]) if line else 0


def test_failed_reloads_are_counted_and_the_old_model_keeps_serving(bundles, tmp_path):
    """SIGHUP and the admin route with a bundle whose checksums are right but whose model
    or spec is broken: each a counted failed reload, no traceback, the old model serving."""
    cfg, a, b, _ = bundles
    served = _copy(a, tmp_path / "served")
    version = load_bundle(a).version
    users, items = users_and_items(cfg)
    rank = json.dumps({"user_id": str(users[0]), "candidates": [{"item_id": str(i)} for i in items[:20]]}).encode()
    port = _free_port()
    proc = _serve(served, port, env=os.environ | {ADMIN_TOKEN_ENV: ADMIN_TOKEN})
    try:
        deadline = time.monotonic() + 60
        while True:  # poll until ready
            try:
                if _call(port, "GET", "/healthz")[0] == 200:
                    break
            except OSError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, "server did not start"
            time.sleep(0.05)

        def replace_served(break_it) -> None:
            shutil.rmtree(served)
            _copy(b, served)
            break_it(served)

        def wait_for_errors(n: int) -> None:
            deadline = time.monotonic() + 30
            while _reloads(port, "error") < n:
                assert time.monotonic() < deadline, f"no failed reload counted (expected {n})"
                time.sleep(0.05)

        for n, case in enumerate(["empty model", "missing key", "inputs differ from the model's"], start=1):
            replace_served(MALFORMED[case][0])
            proc.send_signal(signal.SIGHUP)
            wait_for_errors(n)
            assert json.loads(_call(port, "GET", "/readyz")[1])["model_version"] == version
            status, data = _call(port, "POST", "/v1/rank", rank, {"Content-Type": "application/json"})
            assert status == 200 and json.loads(data)["model_version"] == version

        status, data = _call(port, "POST", "/admin/reload", b"", {"Authorization": f"Bearer {ADMIN_TOKEN}"})
        assert status == 500 and f"reload failed, still serving {version}" in json.loads(data)["error"]
        assert _reloads(port, "error") == 4 and _reloads(port, "ok") == 0

        replace_served(lambda folder: None)  # a good bundle again
        proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 30
        while _reloads(port, "ok") < 1:
            assert time.monotonic() < deadline, "the good bundle was not reloaded"
            time.sleep(0.05)
        assert json.loads(_call(port, "GET", "/readyz")[1])["model_version"] == load_bundle(b).version
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=30)
    assert "Traceback" not in err, err
    assert err.count(f"reload failed, still serving {version}") == 3, err  # the three SIGHUPs, one line each


# ---- the manifest signature -------------------------------------------------------------


def test_export_signs_the_manifest_when_a_key_is_set(bundles):
    _, a, _, signed = bundles
    assert not (a / SIGNATURE).exists()
    expected = hmac.new(KEY.encode(), (signed / "manifest.json").read_bytes(), hashlib.sha256).hexdigest()
    assert (signed / SIGNATURE).read_text().strip() == expected


def test_with_a_key_set_only_bundles_signed_with_it_load(bundles, tmp_path, monkeypatch):
    _, a, _, signed = bundles
    assert load_bundle(signed).sha256 == hashlib.sha256((signed / "manifest.json").read_bytes()).hexdigest()
    spec = load_bundle(a).spec  # no key set: the signature is not checked, unsigned bundles load

    monkeypatch.setenv(SIGNING_KEY_ENV, KEY)
    assert load_bundle(signed).spec == spec
    with pytest.raises(BundleError, match=rf"bundle {a} has no {SIGNATURE}: {SIGNING_KEY_ENV} is set"):
        load_bundle(a)
    tampered = _copy(signed, tmp_path / "tampered")
    _edit_spec(tampered, lambda s: s["scoring"].update(max_candidates=10_000_000))  # checksums right, manifest changed
    with pytest.raises(BundleError, match=rf"{SIGNATURE} does not match manifest.json"):
        load_bundle(tampered)
    monkeypatch.setenv(SIGNING_KEY_ENV, "another key")
    with pytest.raises(
        BundleError, match=f"{SIGNATURE} does not match manifest.json under the key in {SIGNING_KEY_ENV}"
    ):
        load_bundle(signed)


def test_serve_with_a_key_refuses_an_unsigned_bundle(bundles):
    _, a, _, _ = bundles
    proc = _serve(a, _free_port(), env=os.environ | {SIGNING_KEY_ENV: KEY})
    try:
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 3 and err.count("\n") == 1, err
    assert f"has no {SIGNATURE}" in err
