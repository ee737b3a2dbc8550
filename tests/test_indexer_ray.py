"""`cir index build --executor ray` (issue 20) on a local Ray cluster the tests start (2 CPUs):
the same points and payloads as the in-process executor (bad-file zoo and duplicates
included), an encoder actor SIGKILLed mid-run retried by Ray with the exact count, a killed
driver resumed by the same command, a worker that cannot load the model failing the build
with its error, and the parallel writer (Qdrant) at the level of its class."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import pytest

from indexer.decode import Decoded, image_id
from indexer.pipeline import IndexerError, build
from tests.helpers import bad_inputs, write_images
from tests.helpers.indexing import build_config

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cluster() -> Any:
    """A local Ray cluster of 2 CPUs for this module; its GCS address for other drivers."""
    import ray

    ray.init(
        num_cpus=2,
        include_dashboard=False,
        object_store_memory=500 * 1024 * 1024,
        logging_level="WARNING",
    )
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()


def cfg(source: Path, index: Path, **kw: Any) -> Any:
    return build_config(source, index, **{"num_threads": 1, **kw})


def points(index: Path) -> dict[str, tuple[dict[str, Any], np.ndarray]]:
    from retrieval.index import open_index

    idx = open_index(f"edge:{index}", "g")
    try:
        ids = [r.id for r in idx.iter_records()]
        return {r.id: (r.payload, np.asarray(r.tokens)) for r in idx.get(ids, with_vectors=True)}
    finally:
        idx.close()


def ids_of(paths: list[Path]) -> set[str]:
    return {image_id(hashlib.sha256(p.read_bytes()).hexdigest()) for p in paths}


def encoder_pids() -> list[int]:
    """Encoder actors of the cluster this test process started (its descendants only)."""
    out = []
    for p in psutil.Process(os.getpid()).children(recursive=True):
        try:
            if "EncodeActor" in " ".join(p.cmdline()):
                out.append(p.pid)
        except psutil.Error:
            continue
    return out


def read_written(progress: Path) -> int:
    try:
        return int(json.loads(progress.read_text())["written"])
    except (OSError, ValueError, KeyError):
        return 0


# --------------------------------------------------------------------------------- same result
def test_ray_and_inprocess_build_the_same_points(tmp_path: Path, cluster: str, enc: Any) -> None:
    src = tmp_path / "imgs"
    paths = write_images(src, 300, sub=4)
    zoo = bad_inputs(src / "zoo")
    for k in (0, 7, 150):  # duplicates (sorting after their originals)
        (src / "d3" / f"zz-copy{k}.png").write_bytes(paths[k].read_bytes())
    one = build(cfg(src, tmp_path / "one", workers=1), encoder=enc)
    two = build(cfg(src, tmp_path / "two", executor="ray"), encoder=enc)
    good = sum(1 for v in zoo.values() if v is None)
    assert one.indexed == two.indexed == 300 + good
    assert (one.duplicates, two.duplicates) == (3, 3)
    assert sorted(map(str, one.duplicate_files)) == sorted(map(str, two.duplicate_files))
    assert sorted(map(str, one.skipped)) == sorted(map(str, two.skipped))
    assert len(two.skipped) == sum(1 for v in zoo.values() if v is not None)
    for r in (one, two):
        assert r.verified and r.activated and r.count == 300 + good and r.mode == "rebuild"
    assert set(one.stage_seconds) == set(two.stage_seconds)
    assert {"decode_wait", "encode", "write", "pipeline", "worker_decode"} <= set(two.stage_seconds)
    a, b = points(tmp_path / "one"), points(tmp_path / "two")
    assert set(a) == set(b) and ids_of(paths) <= set(a)
    assert {k: v[0] for k, v in a.items()} == {k: v[0] for k, v in b.items()}  # payloads
    for k in a:  # the same model (seeded preset) in the actor: the same tokens
        assert np.allclose(a[k][1], b[k][1], atol=1e-3), k


# --------------------------------------------------------------------------------- faults
def test_encoder_actor_killed_mid_run_is_retried_with_the_exact_count(
    tmp_path: Path, cluster: str, enc: Any
) -> None:
    src = tmp_path / "imgs"
    paths = write_images(src, 300, sub=3)
    prog = tmp_path / "progress.json"
    result: dict[str, Any] = {}

    def run() -> None:
        try:
            result["report"] = build(
                cfg(src, tmp_path / "ix", executor="ray", batch_size=2, progress_file=prog),
                encoder=enc,
            )
        except BaseException as exc:  # re-raised below
            result["error"] = exc

    t = threading.Thread(target=run, daemon=True)
    t.start()
    deadline = time.time() + 300
    while time.time() < deadline and t.is_alive() and read_written(prog) < 8:
        time.sleep(0.01)
    pids = encoder_pids()
    written_at_kill = read_written(prog)
    assert t.is_alive() and pids, "the build finished (or never started) before the kill"
    os.kill(pids[0], signal.SIGKILL)  # an actor of this test's own cluster
    t.join(timeout=600)
    assert not t.is_alive()
    if "error" in result:
        raise result["error"]
    rep = result["report"]
    assert 8 <= written_at_kill < 300
    assert pids[0] not in encoder_pids()  # that process is gone; Ray restarted the actor
    assert rep.indexed == 300 and rep.count == 300 and rep.verified and rep.activated
    assert rep.duplicates == 0 and rep.skipped == []
    assert set(points(tmp_path / "ix")) == ids_of(paths)


def test_killed_driver_is_resumed_by_the_same_command(tmp_path: Path, cluster: str) -> None:
    src = tmp_path / "imgs"
    paths = write_images(src, 200, sub=4)
    ix = tmp_path / "ix"
    prog = tmp_path / "progress.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", CIR_LOG_LEVEL="WARNING")
    cmd = [
        sys.executable, "-m", "indexer", "build", str(src), "--index", f"edge:{ix}",
        "--name", "g", "--model", "tiny", "--allow-untrained", "--batch-size", "2",
        "--num-threads", "1", "--verify-sample", "8", "--no-progress",
        "--executor", "ray", "--ray-address", cluster,
    ]  # fmt: skip
    proc = subprocess.Popen([*cmd, "--progress-file", str(prog)], cwd=REPO, env=env)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and read_written(prog) < 8:
        time.sleep(0.01)
    written = read_written(prog)
    assert proc.poll() is None, "the build finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)  # the driver; the cluster drops its job's actors
    proc.wait()
    assert 8 <= written < 200
    rep_path = tmp_path / "rep.json"
    res = subprocess.run([*cmd, "--report", str(rep_path)], cwd=REPO, env=env, timeout=600)
    assert res.returncode == 0
    rep = json.loads(rep_path.read_text())
    assert rep["mode"] == "resume" and rep["activated"] and rep["verified"]
    assert rep["already_present"] >= 8 and rep["already_present"] + rep["indexed"] == 200
    recs = points(ix)
    assert set(recs) == ids_of(paths) and len(recs) == 200
    from retrieval.index import open_index

    idx = open_index(f"edge:{ix}", "g")
    try:
        assert [v.version for v in idx.versions()] == [rep["version"]]  # no second version
    finally:
        idx.close()


def test_worker_that_cannot_load_the_model_fails_the_build(
    tmp_path: Path, cluster: str, enc: Any
) -> None:
    src = tmp_path / "imgs"
    write_images(src, 12)
    broken = tmp_path / "broken-model"
    broken.mkdir()  # a folder without config.json / weights: the actors cannot load it
    t0 = time.time()
    with pytest.raises(IndexerError, match="cannot load the model") as info:
        build(cfg(src, tmp_path / "ix", executor="ray", model=str(broken)), encoder=enc)
    assert "config.json is missing" in str(info.value)  # the worker's own error
    assert time.time() - t0 < 300  # failed, not hung
    from retrieval.index import open_index

    idx = open_index(f"edge:{tmp_path / 'ix'}", "g")
    try:
        assert idx.active_version is None
    finally:
        idx.close()


# --------------------------------------------------------------------------------- writers
class FakeView:
    """An in-memory multi-writer index view (what a Qdrant version is to a worker)."""

    def __init__(self) -> None:
        self.points: dict[str, tuple[np.ndarray, dict[str, Any]]] = {}
        self.flushes = 0

    def upsert(self, ids: list[str], tokens: np.ndarray, payloads: list[dict[str, Any]]) -> None:
        for i, t, p in zip(ids, tokens, payloads, strict=True):
            self.points[i] = (t, p)

    def flush(self) -> None:
        self.flushes += 1


def test_parallel_upsert_worker_writes_encoded_rows_and_drops_tokens() -> None:
    from indexer.executors.ray_executor import EncodedBatch, UpsertWorker

    view = FakeView()
    w = UpsertWorker(lambda: view, flush_every=2)
    items = [
        Decoded(0, id="a", payload={"path": "a.png"}),
        Decoded(1, reason="corrupt"),
        Decoded(2, id="b", payload={"path": "b.png"}),
        Decoded(3, id="c", payload={"path": "c.png"}),
    ]
    tokens = np.ones((3, 2, 4), np.float32)
    eb = EncodedBatch(items, [0, 2, 3], tokens, [True, True, False], ["", "", "x"], 0.1, "f", "w")
    rows = {"batch": np.array([pickle.dumps(eb), pickle.dumps(eb)], dtype=object)}
    out = w(rows)
    assert sorted(view.points) == ["a", "b"]  # the non-finite row is not written
    assert view.points["b"][1] == {"path": "b.png"}
    assert view.flushes == 1  # every 2 written batches
    back = [pickle.loads(b) for b in out["batch"]]
    assert len(back) == 2 and all(b.tokens is None for b in back)  # the driver gets no tokens
    assert [d.id for d in back[0].items] == ["a", None, "b", "c"]
