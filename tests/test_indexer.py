"""The batch indexer: inputs, bad inputs, exactly-once resume after SIGKILL, shards, incremental
mode, verification before activation. Tiny preset, tiny images, tmp_path indexes."""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from typer.testing import CliRunner

from indexer.decode import image_id
from indexer.pipeline import IndexerError, build
from indexer.sources import SourceError, parse_shard, read_source, shard_of
from tests.helpers import bad_inputs, write_images
from tests.helpers.indexing import build_config

REPO = Path(__file__).resolve().parents[1]
PAYLOAD_KEYS = {"path", "relpath", "sha256", "width", "height", "bytes", "mime", "thumbnail"}


def cfg(source: Path, index: Path, **kw: Any) -> Any:
    return build_config(source, index, **kw)


def open_g(index: Path, **kw: Any) -> Any:
    from retrieval.index import open_index

    return open_index(f"edge:{index}", "g", **kw)


def all_records(index: Path) -> dict[str, dict[str, Any]]:

    idx = open_g(index)
    try:
        return {r.id: r.payload for r in idx.iter_records()}
    finally:
        idx.close()


def ids_of(paths: list[Path]) -> set[str]:
    import hashlib

    return {image_id(hashlib.sha256(p.read_bytes()).hexdigest()) for p in paths}


# --------------------------------------------------------------------------------- inputs
def test_folder_input_payload_and_info(tmp_path: Path, enc: Any) -> None:
    src = tmp_path / "imgs"
    paths = write_images(src, 12, sub=3)
    (src / "d0" / "zcopy.png").write_bytes(paths[0].read_bytes())  # duplicate content
    (src / "README.txt").write_text("not an image")
    rep = build(cfg(src, tmp_path / "ix", workers=1, calibrate_min_points=1), encoder=enc)
    assert (rep.indexed, rep.duplicates, rep.skipped, rep.ignored_files) == (12, 1, [], 1)
    assert rep.verified and rep.activated and rep.count == 12
    assert set(rep.stage_seconds) >= {"read", "encode", "write", "decode_wait", "verify"}
    # fast-mode calibration ran on the new version and is recorded in its metadata
    assert rep.calibration is not None and rep.calibration["n"] == 12
    assert rep.calibration["L"] is None  # every ladder L >= 12 points: `fast` is `exact` here
    idx = open_g(tmp_path / "ix")
    try:
        assert idx.meta.extra["fast_calibration"]["n"] == 12
    finally:
        idx.close()
    recs = all_records(tmp_path / "ix")
    assert set(recs) == ids_of(paths)
    p = recs[next(iter(ids_of(paths[:1])))]
    assert set(p) >= PAYLOAD_KEYS
    assert p["relpath"] == "d0/img0000.png"  # first in sorted order wins over d0/zcopy.png
    assert p["path"] == str((src / "d0" / "img0000.png").resolve())
    assert p["mime"] == "image/png" and p["bytes"] == paths[0].stat().st_size
    thumb = Image.open(io.BytesIO(base64.b64decode(p["thumbnail"])))
    assert thumb.format == "JPEG" and max(thumb.size) <= 128
    assert (thumb.size, (p["width"], p["height"])) == (Image.open(paths[0]).size,) * 2

    from typer import Typer

    from indexer.cli import register

    app = Typer()
    register(app)
    res = CliRunner().invoke(
        app,
        ["index", "info", "--index", f"edge:{tmp_path / 'ix'}"]
        + [
            "--name",
            "g",
            "--json",
        ],
    )
    assert res.exit_code == 0, res.output
    info = json.loads(res.stdout)
    assert info["count"] == 12 and info["active_version"] == rep.version
    assert info["encoder_fingerprint"] == enc.fingerprint
    res = CliRunner().invoke(
        app, ["index", "calibrate", "--index", f"edge:{tmp_path / 'ix'}", "--name", "g"]
    )
    assert res.exit_code == 0, res.output
    cal = json.loads(res.stdout)
    assert cal["version"] == rep.version and cal["recall_target"] == 0.99 and cal["n"] == 12
    res = CliRunner().invoke(
        app, ["index", "calibrate", "--index", f"edge:{tmp_path / 'none'}", "--name", "g"]
    )
    assert res.exit_code != 0 and "no active version" in res.output
    # real query vectors from a file; a file that is not an array is a one-line error
    np.save(tmp_path / "q.npy", enc.encode_texts(["a red circle", "remove the square"]))
    res = CliRunner().invoke(
        app,
        ["index", "calibrate", "--index", f"edge:{tmp_path / 'ix'}", "--name", "g"]
        + ["--queries", str(tmp_path / "q.npy")],
    )
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["source"] == "queries"
    (tmp_path / "bad.npy").write_text("not an array")
    res = CliRunner().invoke(
        app,
        ["index", "calibrate", "--index", f"edge:{tmp_path / 'ix'}", "--name", "g"]
        + ["--queries", str(tmp_path / "bad.npy")],
    )
    assert res.exit_code != 0 and "cannot read query vectors" in res.output
    assert "Traceback" not in res.output


def test_manifest_inputs_jsonl_csv_parquet(tmp_path: Path, enc: Any) -> None:
    from retrieval.index import open_index

    src = tmp_path / "imgs"
    paths = write_images(src, 6)
    rows = [
        {
            "path": f"imgs/{p.name}",
            "category": ["bag", "shoe"][i % 2],
            "price": i * 1.5,
            "in_stock": i % 3 == 0,
            "year": 2000 + i,
            "title": f"item {i}",
        }
        for i, p in enumerate(paths)
    ]
    rows.append(
        {
            "path": "imgs/missing.png",
            "category": "bag",
            "price": 1,
            "in_stock": True,
            "year": 1,
            "title": "gone",
        }
    )
    rows.append(
        {
            "path": "https://example.com/x.jpg",
            "category": "bag",
            "price": 1,
            "in_stock": True,
            "year": 1,
            "title": "remote",
        }
    )
    decl = {"category": "keyword", "price": "float", "in_stock": "bool", "year": "integer"}
    # JSONL with a header line declaring the fields
    jl = tmp_path / "m.jsonl"
    jl.write_text("\n".join(json.dumps(r) for r in [{"_fields": decl}, *rows]) + "\n")
    # CSV: typed header cells
    cs = tmp_path / "m.csv"
    lines = ["path,category:keyword,price:float,in_stock:bool,year:integer,title"]
    lines += [
        f"{r['path']},{r['category']},{r['price']},{str(r['in_stock']).lower()},"
        f"{r['year']},{r['title']}"
        for r in rows
    ]
    cs.write_text("\n".join(lines) + "\n")
    # Parquet: fields on the command line, path column named "file"
    pqf = tmp_path / "m.parquet"
    table = pa.Table.from_pylist(
        [{"file": r["path"], **{k: v for k, v in r.items() if k != "path"}} for r in rows]
    )
    pq.write_table(table, pqf)

    for man, extra in ((jl, {}), (cs, {}), (pqf, {"path_column": "file", "fields": decl})):
        ix = tmp_path / f"ix-{man.suffix[1:]}"
        rep = build(cfg(man, ix, **extra), encoder=enc)
        assert rep.indexed == 6, man
        assert {(s["path"], s["reason"]) for s in rep.skipped} == {
            ("imgs/missing.png", "unreadable"),
            ("https://example.com/x.jpg", "unsupported-uri"),
        }
        idx = open_index(f"edge:{ix}", "g")
        try:
            assert idx.declared_fields() == decl
            assert idx.count({"category": "bag"}) == 3
            assert idx.count({"price": {"gte": 3.0}}) == 4
            assert idx.count({"in_stock": True}) == 2
            assert idx.count({"year": {"lt": 2002}}) == 2
            recs = {r.payload["relpath"]: r.payload for r in idx.get(sorted(ids_of(paths)))}
        finally:
            idx.close()
        assert recs["imgs/img0001.png"]["title"] == "item 1"
        assert recs["imgs/img0001.png"]["year"] == 2001
        assert recs["imgs/img0001.png"]["in_stock"] is False
        assert recs["imgs/img0001.png"]["path"] == "imgs/img0001.png"


def test_source_errors(tmp_path: Path) -> None:
    with pytest.raises(SourceError):
        read_source(tmp_path / "nope")
    bad = tmp_path / "m.jsonl"
    bad.write_text(json.dumps({"path": "a.png", "sha256": "x"}) + "\n")
    with pytest.raises(SourceError, match="sha256"):
        read_source(bad)
    with pytest.raises(SourceError):
        parse_shard("2/2")
    assert parse_shard("1/3") == (1, 3)
    assert shard_of("a/b.png", 7) == shard_of("a/b.png", 7)  # stable (sha256, not hash())


# --------------------------------------------------------------------------------- bad input
def test_every_bad_input_class_in_one_run(tmp_path: Path, enc: Any) -> None:
    src = tmp_path / "bad"
    expect = bad_inputs(src)
    rep = build(cfg(src, tmp_path / "ix", workers=1), encoder=enc)
    skipped = {Path(s["path"]).name: s["reason"] for s in rep.skipped}
    assert skipped == {k: v for k, v in expect.items() if v is not None}
    good = sorted(k for k, v in expect.items() if v is None)
    assert rep.indexed == len(good) == 7 and rep.activated
    recs = all_records(tmp_path / "ix")
    assert sorted(p["relpath"] for p in recs.values()) == good
    mimes = {p["relpath"]: p["mime"] for p in recs.values()}
    assert mimes["anim.gif"] == "image/gif" and mimes["cmyk.jpg"] == "image/jpeg"
    assert rep.to_json()["skipped_by_reason"]["truncated"] == 2


# --------------------------------------------------------------------------------- exactly once
def test_sigkill_mid_run_then_resume_is_exactly_once(tmp_path: Path) -> None:
    src = tmp_path / "imgs"
    paths = write_images(src, 100, sub=4)
    ix = tmp_path / "ix"
    prog = tmp_path / "progress.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", CIR_LOG_LEVEL="WARNING")
    cmd = [
        sys.executable,
        "-m",
        "indexer",
        "build",
        str(src),
        "--index",
        f"edge:{ix}",
        "--name",
        "g",
        "--model",
        "tiny",
        "--allow-untrained",
        "--batch-size",
        "4",
        "--workers",
        "0",
        "--num-threads",
        "1",
        "--verify-sample",
        "8",
        "--no-progress",
    ]
    proc = subprocess.Popen([*cmd, "--progress-file", str(prog)], cwd=REPO, env=env)
    deadline = time.time() + 120
    written = 0
    while time.time() < deadline and proc.poll() is None:
        try:
            written = json.loads(prog.read_text())["written"]
        except (OSError, ValueError):
            written = 0
        if written >= 8:
            break
        time.sleep(0.01)
    assert proc.poll() is None, "the build finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert 8 <= written < 100
    rep_path = tmp_path / "rep.json"
    res = subprocess.run([*cmd, "--report", str(rep_path)], cwd=REPO, env=env, timeout=300)
    assert res.returncode == 0
    rep = json.loads(rep_path.read_text())
    assert rep["mode"] == "resume" and rep["activated"] and rep["verified"]
    assert rep["already_present"] >= 8 and rep["already_present"] + rep["indexed"] == 100
    recs = all_records(ix)
    assert set(recs) == ids_of(paths) and len(recs) == 100
    assert len({p["relpath"] for p in recs.values()}) == 100
    idx = open_g(ix)
    try:
        assert [v.version for v in idx.versions()] == [rep["version"]]  # no second version
        assert idx.count() == 100
    finally:
        idx.close()


def test_shards_equal_one_unsharded_run(tmp_path: Path, enc: Any) -> None:
    from typer import Typer

    from indexer.cli import register

    src = tmp_path / "imgs"
    paths = write_images(src, 20, sub=2)
    (src / "dup.png").write_bytes(paths[3].read_bytes())
    full = build(cfg(src, tmp_path / "one"), encoder=enc)
    r0 = build(cfg(src, tmp_path / "sh", shard="0/2"), encoder=enc)
    r1 = build(cfg(src, tmp_path / "sh", shard="1/2"), encoder=enc)
    assert r0.version == r1.version and not r0.activated and not r1.activated
    assert r0.total + r1.total == 21 and 0 < r0.total < 21
    idx = open_g(tmp_path / "sh")
    assert idx.active_version is None
    idx.close()
    app = Typer()
    register(app)
    res = CliRunner().invoke(
        app,
        [
            "index",
            "activate",
            r0.version or "",
            "--index",
            f"edge:{tmp_path / 'sh'}",
            "--name",
            "g",
            "--sample",
            "8",
            "--expect-count",
            "20",
        ],
    )
    assert res.exit_code == 0, res.output
    one, two = all_records(tmp_path / "one"), all_records(tmp_path / "sh")
    assert set(one) == set(two) == ids_of(paths) and full.count == 20
    strip = {
        k: {x: y for x, y in v.items() if x not in ("path", "relpath")} for k, v in one.items()
    }
    assert strip == {
        k: {x: y for x, y in v.items() if x not in ("path", "relpath")} for k, v in two.items()
    }


# --------------------------------------------------------------------------------- incremental
def test_incremental_add_change_delete(tmp_path: Path, enc: Any) -> None:
    src = tmp_path / "imgs"
    paths = write_images(src, 10)
    ix = tmp_path / "ix"
    first = build(cfg(src, ix), encoder=enc)
    assert first.count == 10
    paths[0].unlink()  # vanished
    paths[1].unlink()
    paths[2].rename(src / "moved.png")  # same content, new path
    from tests.helpers import random_image

    random_image(999, (20, 20)).save(paths[3])  # changed in place
    added = write_images(src, 3, start=100)
    rep = build(cfg(src, ix, incremental=True), encoder=enc)
    assert rep.mode == "incremental" and rep.version == first.version
    assert (rep.indexed, rep.deleted, rep.moved) == (4, 3, 1)
    assert rep.already_present == 7 and rep.count == 11 and rep.verified
    now = [p for p in src.glob("*.png")]
    recs = all_records(ix)
    assert set(recs) == ids_of(now)
    assert sorted(p["relpath"] for p in recs.values()) == sorted(p.name for p in now)
    assert added[0].name in {p["relpath"] for p in recs.values()}
    again = build(cfg(src, ix, incremental=True), encoder=enc)
    assert (again.indexed, again.deleted, again.moved, again.already_present) == (0, 0, 0, 11)


def test_incremental_refused_while_a_server_owns_the_index(tmp_path: Path, enc: Any) -> None:
    src = tmp_path / "imgs"
    write_images(src, 6)
    ix = tmp_path / "ix"
    first = build(cfg(src, ix), encoder=enc)
    server = open_g(ix, read_only=True)  # what the gRPC server does: owns the active shard
    try:
        write_images(src, 2, start=50)
        with pytest.raises(IndexerError, match="rebuild"):
            build(cfg(src, ix, incremental=True), encoder=enc)
        rebuilt = build(cfg(src, ix, fresh=True), encoder=enc)  # a new version still works
        assert rebuilt.activated and rebuilt.version != first.version and rebuilt.count == 8
        assert server.refresh() and server.active_version == rebuilt.version
        assert server.count() == 8
    finally:
        server.close()


# --------------------------------------------------------------------------------- verification
def test_version_activated_only_after_verification(
    tmp_path: Path, enc: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    import indexer.finish as pipeline  # the finishing step verifies (indexer/finish.py)

    src = tmp_path / "imgs"
    write_images(src, 8)
    ix = tmp_path / "ix"
    real = pipeline.verify_view

    def broken(view: Any, sample: list[str], expected: int | None, **kw: Any) -> dict[str, Any]:
        res = real(view, sample, None if expected is None else expected + 1, **kw)
        assert not res["ok"]
        return res

    monkeypatch.setattr(pipeline, "verify_view", broken)
    bad = build(cfg(src, ix), encoder=enc)
    assert bad.verified is False and not bad.activated
    assert any("NOT activated" in w for w in bad.warnings)
    idx = open_g(ix)
    assert idx.active_version is None
    idx.close()
    monkeypatch.setattr(pipeline, "verify_view", real)
    ok = build(cfg(src, ix), encoder=enc)  # resumes the unverified version, verifies, activates
    assert ok.mode == "resume" and ok.version == bad.version and ok.activated
    assert (ok.indexed, ok.already_present) == (0, 8)
    noact = build(cfg(src, ix, fresh=True, activate=False), encoder=enc)
    assert noact.verified and not noact.activated
    idx = open_g(ix)
    try:
        assert idx.active_version == ok.version
    finally:
        idx.close()


def test_build_calibrates_on_real_query_vectors(tmp_path: Path, enc: Any) -> None:
    """`cir index build --calibrate-queries Q.npy`: the new version's fast-mode L is measured on
    those queries; a bad file fails before anything is encoded or written."""
    src = tmp_path / "imgs"
    write_images(src, 12)
    np.save(tmp_path / "q.npy", enc.encode_texts(["a red circle", "remove the blue square"]))
    rep = build(
        cfg(
            src, tmp_path / "ix", calibrate_min_points=0, calibrate_queries=str(tmp_path / "q.npy")
        ),
        encoder=enc,
    )
    assert rep.verified and rep.calibration is not None
    assert rep.calibration["source"] == "queries" and rep.calibration["n"] == 12
    idx = open_g(tmp_path / "ix")
    try:
        from retrieval.index.policy import CALIBRATION_KEY

        assert idx.meta.extra[CALIBRATION_KEY]["source"] == "queries"
    finally:
        idx.close()
    # Without the file: the model's own composed queries (issue 22; proxies are a last resort).
    rep = build(cfg(src, tmp_path / "ix2", calibrate_min_points=0), encoder=enc)
    assert rep.calibration is not None and rep.calibration["source"] == "composed"

    from typer import Typer

    from indexer.cli import register

    app = Typer()
    register(app)
    (tmp_path / "bad.npy").write_text("not an array")
    np.save(tmp_path / "wrong_dim.npy", np.ones((3, 7), np.float32))
    np.save(tmp_path / "zero.npy", np.zeros((3, enc.dim), np.float32))
    for bad, message in [
        ("bad.npy", "cannot read query vectors"),
        ("missing.npy", "cannot read query vectors"),
        ("zero.npy", "finite and non-zero"),
        ("wrong_dim.npy", f"7-d; the model 'tiny' makes {enc.dim}-d"),
    ]:
        res = CliRunner().invoke(
            app,
            ["index", "build", str(src), "--index", f"edge:{tmp_path / 'ix3'}", "--name", "g"]
            + ["--model", "tiny", "--allow-untrained", "--workers", "0", "--no-progress"]
            + ["--calibrate-queries", str(tmp_path / bad)],
        )
        assert res.exit_code != 0 and message in res.output, (bad, res.output)
        assert "Traceback" not in res.output
        assert not (tmp_path / "ix3").exists() or not any((tmp_path / "ix3").rglob("*.json")), bad
