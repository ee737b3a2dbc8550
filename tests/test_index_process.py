"""ProcessIndex: the served index in a child process gives the same answers and errors as the
in-process index, survives its child's death, follows version switches, and never outlives its
parent."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import pytest

from retrieval.index import (
    IndexInUseError,
    IndexNotFoundError,
    IndexUnavailableError,
    InvalidFilterError,
    InvalidQueryError,
    ModelMismatchError,
    VersionMeta,
    open_index,
)
from retrieval.index.process import ProcessIndex
from tests.test_index import FIELDS, OPTS, D, Q, make_data

REPO = Path(__file__).resolve().parents[1]


def _build(
    tmp_path: Path, backend: str = "edge", n: int = 120
) -> tuple[str, list[str], np.ndarray]:
    ids, toks, payloads = make_data(n)
    uri = f"{backend}:{tmp_path / 'idx'}"
    idx = open_index(uri, "g", encoder_fingerprint="enc-A", preset="t", fields=FIELDS, options=OPTS)
    idx.upsert(ids, toks, payloads)
    idx.close()
    return uri, ids, toks


def _snapshot(idx: Any, toks: np.ndarray) -> dict[str, Any]:
    """Everything the server asks of an index, as comparable plain values."""
    qs = toks[[3, 50, 99], 1]
    one = idx.search(qs[0], top_k=5, mode="exact")
    batch = idx.search_batch(qs, top_k=4, offset=2, mode="fast")
    flt = idx.search(qs[1], top_k=6, filter={"category": "bag", "price": {"gte": 10}})
    return {
        "one": [(h.id, round(h.score, 5), h.payload["title"]) for h in one],
        "batch": [[(h.id, round(h.score, 5)) for h in hits] for hits in batch],
        "filtered": [(h.id, h.payload["category"]) for h in flt],
        "count": idx.count(),
        "count_bag": idx.count({"category": "bag"}),
        "get": [(r.id, r.payload["price"]) for r in idx.get(["img-00007", "nope"])],
        "fields": idx.declared_fields(),
        "ids": sorted(r.id for r in idx.iter_records(batch=50, with_payload=False)),
        "version": idx.active_version,
        "fingerprint": idx.meta.encoder_fingerprint,
        "backend": idx.backend,
    }


@pytest.mark.parametrize("backend", ["edge", "local"])
def test_same_answers_as_in_process(tmp_path: Path, backend: str) -> None:
    uri, ids, toks = _build(tmp_path, backend)
    with ProcessIndex(uri, "g", encoder_fingerprint="enc-A", read_only=True, options=OPTS) as px:
        child = px.pid
        assert child is not None and child != os.getpid()
        assert psutil.Process(child).ppid() == os.getpid()
        remote = _snapshot(px, toks)
    assert not psutil.pid_exists(child) or psutil.Process(child).status() == "zombie"
    # closed: the lock is free again, so the same index opens in this process
    local = open_index(uri, "g", encoder_fingerprint="enc-A", read_only=True, options=OPTS)
    try:
        assert _snapshot(local, toks) == remote
    finally:
        local.close()
    assert remote["count"] == len(ids) and len(remote["one"]) == 5
    assert remote["one"][0][0] == ids[3]


def test_errors_cross_the_process_boundary(tmp_path: Path) -> None:
    uri, _, toks = _build(tmp_path)
    with pytest.raises(IndexNotFoundError, match="no active version"):
        ProcessIndex(uri, "other", read_only=True)
    with pytest.raises(ModelMismatchError):
        ProcessIndex(uri, "g", encoder_fingerprint="enc-B", read_only=True)
    with ProcessIndex(uri, "g", encoder_fingerprint="enc-A", read_only=True) as px:
        # Edge's one-opener rule: the child owns the shard and is named as its owner
        with pytest.raises(IndexInUseError, match=f"in use by process {px.pid}") as err:
            open_index(uri, "g", read_only=True)
        assert err.value.pid == px.pid
        # the whole process group gets Ctrl-C / a service manager's SIGTERM while the server
        # drains: the search process keeps serving until its parent closes it
        for sig in (signal.SIGINT, signal.SIGTERM):
            os.kill(px.pid, sig)
        time.sleep(0.3)
        assert px.search(toks[0, 0], top_k=2) and px.restarts == 0
        with pytest.raises(InvalidFilterError, match="colour"):
            px.search(toks[0, 0], filter={"colour": "red"})
        with pytest.raises(InvalidQueryError):
            px.search(np.ones(D + 1, np.float32))
        with pytest.raises(InvalidQueryError):
            px.search(toks[0, 0], top_k=0)
        assert len(px.search(toks[0, 0], top_k=3)) == 3  # still serving after the errors
    with pytest.raises(Exception, match="closed"):
        px.search(toks[0, 0])


def test_child_death_is_unavailable_then_restarted(tmp_path: Path) -> None:
    uri, ids, toks = _build(tmp_path)
    with ProcessIndex(uri, "g", encoder_fingerprint="enc-A", read_only=True) as px:
        first = px.pid
        assert first is not None
        os.kill(first, signal.SIGKILL)
        psutil.Process(first).wait(10)
        # a call already past the liveness check meets the dead pipe: a clear UNAVAILABLE
        ensure = px._ensure_child
        px._ensure_child = lambda: None
        with pytest.raises(IndexUnavailableError, match="died"):
            px.search(toks[3, 1], top_k=1)
        px._ensure_child = ensure
        # the next call starts a new child, which reopens the index (the lock died with the old)
        assert px.search(toks[3, 1], top_k=1)[0].id == ids[3]
        assert px.restarts == 1 and px.pid not in (None, first)
        # the same without help: a killed child is noticed before the call is sent
        os.kill(px.pid, signal.SIGKILL)
        psutil.Process(px.pid).wait(10)
        assert px.count() == len(ids) and px.restarts == 2


def test_refresh_follows_a_new_version_under_load(tmp_path: Path) -> None:
    uri, ids, toks = _build(tmp_path)
    with ProcessIndex(uri, "g", encoder_fingerprint="enc-A", read_only=True) as px:
        v1 = px.active_version
        errors: list[BaseException] = []
        stop = threading.Event()

        def reader() -> None:
            while not stop.is_set():
                try:
                    assert px.search(toks[5, 0], top_k=2)
                except BaseException as exc:  # noqa: BLE001 -- collected for the assertion
                    errors.append(exc)

        threads = [threading.Thread(target=reader) for _ in range(3)]
        for t in threads:
            t.start()
        writer = open_index(uri, "g", encoder_fingerprint="enc-A")
        with writer.create_version(VersionMeta("enc-A", "t", (Q, D), FIELDS)) as v:
            v.upsert(ids[:40], toks[:40], [{"category": "bag"}] * 40)
        writer.activate(v.version)
        writer.close()
        assert px.refresh() is True
        time.sleep(0.2)
        stop.set()
        for t in threads:
            t.join()
        assert not errors
        assert px.active_version == v.version != v1
        assert px.count() == 40 and px.refresh() is False


def test_child_exits_with_its_parent(tmp_path: Path) -> None:
    """A parent killed with SIGKILL (no cleanup runs) leaves no search process behind; the
    parent is a plain script without a ``__main__`` guard (a spawn-based child would fail)."""
    uri, _, _ = _build(tmp_path)
    script = textwrap.dedent(
        f"""
        import sys, time
        sys.path.insert(0, {str(REPO)!r})
        from retrieval.index.process import ProcessIndex
        px = ProcessIndex({uri!r}, "g", read_only=True)
        print(px.pid, px.count(), flush=True)
        time.sleep(60)
        """
    )
    parent = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        assert parent.stdout is not None
        line = parent.stdout.readline().split()
        assert len(line) == 2, parent.stderr.read() if parent.stderr else ""
        child, count = int(line[0]), int(line[1])
        assert count == 120 and psutil.pid_exists(child)
        parent.send_signal(signal.SIGKILL)
        parent.wait(10)
        deadline = time.monotonic() + 15
        while psutil.pid_exists(child) and time.monotonic() < deadline:
            try:
                if psutil.Process(child).status() == psutil.STATUS_ZOMBIE:
                    break
            except psutil.NoSuchProcess:
                break
            time.sleep(0.1)
        gone = not psutil.pid_exists(child) or psutil.Process(child).status() == "zombie"
        assert gone, "the search process outlived its parent"
        # and it released the shard: a new owner can open it
        open_index(uri, "g", read_only=True).close()
    finally:
        if parent.poll() is None:
            parent.kill()


def test_every_path_to_a_dead_child_is_unavailable(tmp_path: Path) -> None:
    """Reads of the version facts never reach the child; a replacement killed while it opens
    the index is IndexUnavailableError (the server's UNAVAILABLE), never another error; the
    next call after that starts one that serves."""
    uri, ids, toks = _build(tmp_path)
    with ProcessIndex(uri, "g", encoder_fingerprint="enc-A", read_only=True) as px:
        version, fields = px.active_version, px.declared_fields()
        os.kill(px.pid, signal.SIGKILL)
        psutil.Process(px.pid).wait(10)
        assert px.active_version == version and px.declared_fields() == fields  # no round trip
        real_start = px._start
        kills: list[int] = []

        def start_and_kill_while_opening() -> None:
            # the replacement dies while it opens the index (before its "opened" reply)
            watcher = threading.Thread(target=_kill_new_child, args=(os.getpid(), kills))
            watcher.start()
            try:
                real_start()
            finally:
                watcher.join()

        px._start = start_and_kill_while_opening  # type: ignore[method-assign]
        with pytest.raises(IndexUnavailableError, match="exited while opening"):
            px.search(toks[3, 1], top_k=1)
        assert kills, "the replacement was not killed while it started"
        px._start = real_start  # type: ignore[method-assign]
        assert px.search(toks[3, 1], top_k=1)[0].id == ids[3]  # the next call restarts it
        assert px.active_version == version and px.count() == len(ids)


def _kill_new_child(parent: int, kills: list[int]) -> None:
    """SIGKILL the first search process that appears under ``parent`` (within 10 s)."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        for c in psutil.Process(parent).children():
            try:
                if "retrieval.index.process" in " ".join(c.cmdline()) and c.is_running():
                    c.kill()
                    kills.append(c.pid)
                    return
            except psutil.Error:
                continue
        time.sleep(0.001)


def test_one_round_trip_per_search_with_the_version_searched(tmp_path: Path) -> None:
    """A search is one round trip and its Hits name the version the child searched; the
    version facts cost none; a refresh is one round trip that brings the new facts."""
    uri, ids, toks = _build(tmp_path)
    with ProcessIndex(uri, "g", encoder_fingerprint="enc-A", read_only=True, options=OPTS) as px:
        calls: list[str] = []
        real = px._call

        def counting(op: str, name: str, *args: Any, **kwargs: Any) -> Any:
            calls.append(name)
            return real(op, name, *args, **kwargs)

        px._call = counting  # type: ignore[method-assign]
        v1 = px.active_version
        assert px.meta.encoder_fingerprint == "enc-A" and px.declared_fields() == FIELDS
        assert px.backend == "edge" and px.options == OPTS and calls == []
        hits = px.search(toks[3, 1], top_k=3, mode="exact")
        assert calls == ["search"] and hits.version == v1 and hits.mode == "exact"
        assert hits[0].id == ids[3]
        batch = px.search_batch(toks[[3, 4], 1], top_k=2)
        assert calls == ["search", "search_batch"] and [h.version for h in batch] == [v1, v1]
        writer = open_index(uri, "g", encoder_fingerprint="enc-A")
        with writer.create_version(VersionMeta("enc-A", "t", (Q, D), FIELDS)) as v:
            v.upsert(["only"], toks[:1])
        writer.activate(v.version)
        writer.close()
        calls.clear()
        assert px.refresh() is True and calls == ["refresh"]
        assert px.active_version == v.version != v1 and px.meta is not None
        assert calls == ["refresh"]
        hits = px.search(toks[0, 0], top_k=1)
        assert hits.version == v.version and [h.id for h in hits] == ["only"]
