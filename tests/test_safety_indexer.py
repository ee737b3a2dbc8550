"""Issue 17, safe by default: a rebuild or an incremental run cannot empty or gut a live index,
`--dry-run` writes nothing, random-weight presets are refused unless `--allow-untrained`, the
default model is the committed demo model, progress lines in a log, `cir index info` on an index
a server owns or that does not exist, and the report names duplicate and ignored files."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from typer import Typer
from typer.testing import CliRunner

from indexer.cli import register
from indexer.pipeline import BuildConfig, IndexerError, build
from tests.helpers import random_image, write_images
from tests.helpers.indexing import build_config

REPO = Path(__file__).resolve().parents[1]
TINY = ["--model", "tiny", "--allow-untrained", "--workers", "0", "--no-progress"]
TINY += ["--batch-size", "16", "--verify-sample", "8"]


@pytest.fixture(scope="module")
def app() -> Typer:
    a = Typer()
    register(a)
    return a


def cfg(source: Path, index: Path, **kw: Any) -> Any:
    return build_config(source, index, **{"batch_size": 16, **kw})


def cli(app: Typer, *args: str) -> Any:
    return CliRunner().invoke(app, ["index", *args])


def state(index: Path) -> tuple[str | None, list[str], dict[str, Any]]:
    """(active version, versions, {id: (payload, tokens bytes)}) of index ``g``."""
    from retrieval.index import open_index

    idx = open_index(f"edge:{index}", "g")
    try:
        ids = [r.id for r in idx.iter_records()]
        pts = {
            r.id: (json.dumps(r.payload, sort_keys=True), r.tokens.tobytes())  # type: ignore[union-attr]
            for r in idx.get(ids, with_vectors=True)
        }
        return idx.active_version, [v.version for v in idx.versions()], pts
    finally:
        idx.close()


def file_digests(root: Path) -> dict[str, Any]:
    """Every file's bytes under ``root``; the Edge engine re-serialises its JSON files
    (edge_config.json, segment.json) when it opens a shard, as a server does (same JSON, in
    another key order), so those are compared as parsed JSON."""
    out: dict[str, Any] = {}
    for p in sorted(root.rglob("*")):
        if p.is_file():
            rel = p.relative_to(root).as_posix()
            if p.suffix == ".json":
                out[rel] = json.loads(p.read_text())
            else:
                out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


# --------------------------------------------------------------------------------- shrink guard
def test_rebuild_from_empty_folder_refused_80_image_index_keeps_serving(
    tmp_path: Path, enc: Any, app: Typer
) -> None:
    src, empty, ix = tmp_path / "imgs", tmp_path / "empty", tmp_path / "ix"
    write_images(src, 80, sub=4)
    empty.mkdir()
    first = build(cfg(src, ix), encoder=enc)
    assert first.activated and first.count == 80
    before = state(ix)
    res = cli(app, "build", str(empty), "--index", f"edge:{ix}", "--name", "g", *TINY)
    assert res.exit_code == 2, res.output
    assert "empty (0 points)" in res.output and "80 points" in res.output, res.output
    assert "Traceback" not in res.output
    assert state(ix) == before  # same active version, no new version, same points
    # the Python API refuses the same way, before a version is created
    with pytest.raises(IndexerError, match="empty"):
        build(cfg(empty, ix), encoder=enc)
    assert state(ix) == before
    # --allow-shrink: the user means it
    res = cli(
        app, "build", str(empty), "--index", f"edge:{ix}", "--name", "g", *TINY, "--allow-shrink"
    )
    assert res.exit_code == 0, res.output
    active, versions, pts = state(ix)
    assert active != first.version and len(versions) == 2 and pts == {}


def test_rebuild_that_shrinks_by_more_than_the_threshold_is_refused(
    tmp_path: Path, enc: Any, app: Typer
) -> None:
    src, ix = tmp_path / "imgs", tmp_path / "ix"
    paths = write_images(src, 40)
    first = build(cfg(src, ix), encoder=enc)
    assert first.count == 40
    for p in paths[:24]:  # 16 of 40 left: 60 % fewer
        p.unlink()
    res = cli(app, "build", str(src), "--index", f"edge:{ix}", "--name", "g", *TINY)
    assert res.exit_code == 2, res.output
    assert "16 points would replace the 40" in res.output and "60% fewer" in res.output
    assert state(ix)[0] == first.version
    # the threshold is a flag: 0.7 lets 60 % through
    ok = build(cfg(src, ix, max_shrink=0.7), encoder=enc)
    assert ok.activated and ok.count == 16 and ok.refused is None


def test_version_that_turns_out_smaller_is_kept_but_not_activated(
    tmp_path: Path, enc: Any, app: Typer
) -> None:
    """The source has enough files, but most cannot be decoded: the build finishes, verifies,
    and refuses to activate; the version can be activated later with --allow-shrink."""
    src, ix = tmp_path / "imgs", tmp_path / "ix"
    paths = write_images(src, 20)
    first = build(cfg(src, ix), encoder=enc)
    for p in paths[:14]:
        p.write_bytes(b"not an image at all")
    rep_path = tmp_path / "rep.json"
    res = cli(
        app, "build", str(src), "--index", f"edge:{ix}", "--name", "g", *TINY,
        "--report", str(rep_path),
    )  # fmt: skip
    assert res.exit_code == 2, res.output
    rep = json.loads(rep_path.read_text())
    assert rep["count"] == 6 and rep["verified"] and not rep["activated"]
    assert "6 points would replace the 20" in rep["refused"] and "--allow-shrink" in rep["refused"]
    active, versions, _ = state(ix)
    assert active == first.version and rep["version"] in versions
    # `cir index activate` applies the same guard
    res = cli(app, "activate", rep["version"], "--index", f"edge:{ix}", "--name", "g")
    assert res.exit_code == 2 and "6 points would replace the 20" in res.output, res.output
    res = cli(
        app, "activate", rep["version"], "--index", f"edge:{ix}", "--name", "g", "--allow-shrink"
    )
    assert res.exit_code == 0, res.output
    assert state(ix)[0] == rep["version"]


def test_incremental_from_empty_folder_deletes_nothing(
    tmp_path: Path, enc: Any, app: Typer
) -> None:
    src, empty, ix = tmp_path / "imgs", tmp_path / "empty", tmp_path / "ix"
    write_images(src, 30)
    empty.mkdir()
    build(cfg(src, ix), encoder=enc)
    before = state(ix)
    res = cli(
        app, "build", str(empty), "--index", f"edge:{ix}", "--name", "g", *TINY, "--incremental"
    )
    assert res.exit_code == 2, res.output
    assert "refusing to delete 30 of the 30 points" in res.output, res.output
    assert state(ix) == before
    res = cli(
        app, "build", str(empty), "--index", f"edge:{ix}", "--name", "g", *TINY,
        "--incremental", "--allow-shrink",
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    assert state(ix)[2] == {}


def test_incremental_refuses_mass_deletion_of_changed_files(tmp_path: Path, enc: Any) -> None:
    """Files rewritten in place keep their paths (nothing vanished), yet each changed file
    deletes its old point: past the threshold the additions are kept and nothing is deleted."""
    src, ix = tmp_path / "imgs", tmp_path / "ix"
    paths = write_images(src, 10)
    build(cfg(src, ix), encoder=enc)
    for i, p in enumerate(paths[:6]):
        random_image(500 + i, (20, 20)).save(p)
    rep = build(cfg(src, ix, incremental=True), encoder=enc)
    assert rep.refused and "refusing to delete 6 of the 10 points" in rep.refused
    assert (rep.indexed, rep.deleted, rep.count) == (6, 0, 16) and rep.verified
    ok = build(cfg(src, ix, incremental=True, allow_shrink=True), encoder=enc)
    assert (ok.indexed, ok.deleted, ok.count, ok.refused) == (0, 6, 10, None) and ok.verified


# --------------------------------------------------------------------------------- dry run
def test_dry_run_prints_the_plan_and_writes_nothing(tmp_path: Path, enc: Any, app: Typer) -> None:
    src, ix = tmp_path / "imgs", tmp_path / "ix"
    paths = write_images(src, 20)
    build(cfg(src, ix), encoder=enc)
    for p in paths[:3]:
        p.unlink()  # delete 3
    paths[3].rename(src / "moved.png")  # change (same content, new path)
    random_image(777, (20, 20)).save(paths[4])  # changed in place: add 1, delete 1
    write_images(src, 2, start=100)  # add 2
    (src / "broken.png").write_bytes(b"garbage")  # skip
    (src / "zcopy.png").write_bytes(paths[5].read_bytes())  # duplicate (sorts last): skip
    before_files, before = file_digests(ix), state(ix)
    for mode in (["--incremental"], []):
        res = cli(app, "build", str(src), "--index", f"edge:{ix}", "--name", "g", *TINY,
                  "--dry-run", *mode)  # fmt: skip
        assert res.exit_code == 0, res.output
        line = next(x for x in res.stdout.splitlines() if x.startswith("plan:"))
        assert line.startswith(
            "plan: add 3, change 1, delete 4, skip 2 (unchanged 15, encode "
            + ("3" if mode else "19")
        ), line
        assert "points 20 -> 19; nothing was written" in line
    assert file_digests(ix) == before_files  # byte for byte
    assert state(ix) == before  # point for point
    # a dry run of a rebuild that would be refused says so, with the exit code of the real run
    (tmp_path / "empty").mkdir()
    res = cli(app, "build", str(tmp_path / "empty"), "--index", f"edge:{ix}", "--name", "g",
              *TINY, "--dry-run")  # fmt: skip
    assert res.exit_code == 2 and "delete 20" in res.stdout and "empty" in res.output
    # and on a path with no index yet, it creates nothing
    rep = build(cfg(src, tmp_path / "new", dry_run=True), encoder=enc)
    assert rep.plan is not None and rep.plan["add"] == 19 and rep.plan["delete"] == 0
    assert not (tmp_path / "new").exists()
    assert file_digests(ix) == before_files


# --------------------------------------------------------------------------------- models
def test_untrained_presets_are_refused_unless_allowed(
    tmp_path: Path, enc: Any, app: Typer, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = tmp_path / "imgs"
    write_images(src, 4)
    for preset in ("tiny", "sprc-small", "blip2-vitg"):
        res = cli(app, "build", str(src), "--index", f"edge:{tmp_path / 'ix'}", "--name", "g",
                  "--model", preset, "--workers", "0", "--no-progress")  # fmt: skip
        assert res.exit_code == 2, (preset, res.output)
        assert "RANDOM weights" in res.output and "--allow-untrained" in res.output
    assert not (tmp_path / "ix").exists()
    with pytest.raises(IndexerError, match="RANDOM weights"):
        build(cfg(src, tmp_path / "ix", allow_untrained=False), encoder=enc)
    # a folder named like a preset is a checkpoint, not random weights
    from retrieval.model_source import check_trained, is_untrained_preset

    assert is_untrained_preset("tiny")
    enc.save_pretrained(tmp_path / "tiny")
    monkeypatch.chdir(tmp_path)
    assert not is_untrained_preset("tiny")
    check_trained("tiny", False, "cir index build")  # no error: ./tiny is a checkpoint
    assert BuildConfig(source=src, index="edge:x").model == "models/sprc-shapes"


def test_default_model_is_the_committed_demo_model_named_in_the_summary(tmp_path: Path) -> None:
    """No --model, run from another directory, stderr a pipe (a log): the demo model is used,
    named in the report and the summary, and progress lines appear in the log."""
    src = tmp_path / "imgs"
    write_images(src, 40)
    rep_path = tmp_path / "rep.json"
    env = dict(os.environ, CIR_LOG_LEVEL="WARNING", OMP_NUM_THREADS="1", COLUMNS="200")
    res = subprocess.run(
        [sys.executable, "-m", "indexer", "build", str(src), "--index",
         f"edge:{tmp_path / 'ix'}", "--name", "g", "--workers", "0", "--batch-size", "4",
         "--num-threads", "1", "--progress-every", "0.01", "--report", str(rep_path)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    rep = json.loads(rep_path.read_text())
    demo = str((REPO / "models" / "sprc-shapes").resolve())
    assert rep["model"] == demo and rep["untrained"] is False and rep["activated"]
    from retrieval import Encoder

    assert rep["encoder_fingerprint"] == Encoder.from_pretrained(demo).fingerprint
    assert "sprc-shapes" in res.stderr  # the summary names the folder
    progress = re.findall(r"^indexing: (\d+)/40 \(", res.stderr, re.M)
    assert len(progress) >= 2 and progress[-1] == "40", res.stderr[-3000:]
    assert "\r" not in res.stderr  # lines, not a redrawn bar


# --------------------------------------------------------------------------------- info, report
def test_info_on_a_served_index_and_on_a_missing_one(tmp_path: Path, enc: Any, app: Typer) -> None:
    from retrieval.index import open_index

    src, ix = tmp_path / "imgs", tmp_path / "ix"
    write_images(src, 8)
    build(cfg(src, ix), encoder=enc)
    server = open_index(f"edge:{ix}", "g", read_only=True)  # what `cir serve` does
    try:
        res = cli(app, "info", "--index", f"edge:{ix}", "--name", "g", "--json")
        assert res.exit_code == 0, res.output
        info = json.loads(res.stdout)
        assert info["count"] == 8 and info["count_source"] == "recorded" and info["in_use"]
        assert [v["count"] for v in info["versions"]] == [8]
        res = cli(app, "info", "--index", f"edge:{ix}", "--name", "g")
        assert res.exit_code == 0 and "count: 8 (recorded by its build" in res.stdout
        assert "None" not in res.stdout.split("shape:")[0], res.stdout
    finally:
        server.close()
    for missing in (tmp_path / "nothing", ix):
        res = cli(app, "info", "--index", f"edge:{missing}", "--name", "other")
        assert res.exit_code == 2, res.output
        assert "there is no index 'other'" in res.output and "Traceback" not in res.output
    assert not (tmp_path / "nothing").exists()


def test_report_names_duplicate_and_ignored_files(tmp_path: Path, enc: Any) -> None:
    src = tmp_path / "imgs"
    paths = write_images(src, 6, sub=2)
    (src / "d1" / "again.png").write_bytes(paths[0].read_bytes())
    (src / "notes.txt").write_text("x")
    (src / "d0" / "clip.mp4").write_bytes(b"\0")
    rep = build(cfg(src, tmp_path / "ix"), encoder=enc)
    assert rep.duplicates == 1 and rep.duplicate_files == [
        {"path": str((src / "d1" / "again.png").resolve()), "same_as": str(paths[0].resolve())}
    ]
    assert rep.ignored_files == 2 and rep.ignored_paths == ["d0/clip.mp4", "notes.txt"]
    out = tmp_path / "rep.json"
    rep.write(out)
    data = json.loads(out.read_text())
    assert data["duplicate_files"] == rep.duplicate_files
    assert data["ignored_paths"] == ["d0/clip.mp4", "notes.txt"]
