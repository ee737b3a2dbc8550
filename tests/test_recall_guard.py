"""Issue 22 item 2: the live recall guard (server/recall_guard.py).

* a version calibrated on misleading queries is caught under real queries and corrected (L
  raised, or exact search), recorded in the version's metadata through the index API;
* the traffic reservoir is written for `cir index calibrate --queries`;
* in a served index, the guard is reported by Info and the metrics, and the request path's p50
  with the guard on matches the one without it (two servers, requests interleaved).
"""

from __future__ import annotations

import json
import shutil
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from retrieval.index import open_index
from retrieval.index.calibrate import calibrate_fast
from retrieval.index.policy import CALIBRATION_KEY, resolve_mode
from server.engine import Query
from server.metrics import Metrics
from server.recall_guard import RecallGuard, wilson_lower


def test_wilson_lower_bound() -> None:
    assert wilson_lower(0, 0) == 0.0
    assert wilson_lower(100, 100) < 1.0  # never certain from a sample
    assert wilson_lower(500, 500) > 0.99 > wilson_lower(50, 50)  # it grows with the sample
    assert wilson_lower(9_000, 10_000) < 0.9 < wilson_lower(9_100, 10_000)
    assert wilson_lower(990, 1000, 0.99) < wilson_lower(990, 1000, 0.9)


def clustered(n: int, q: int, d: int, seed: int) -> np.ndarray:
    """Images = a topic + their own direction; tokens = image + token noise (far from their
    mean: a poor pooled proxy for MaxSim), as benchmarks/index.py's synthetic set."""
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((60, d)).astype(np.float32)
    centers /= np.linalg.norm(centers, axis=1, keepdims=True)
    img = centers[rng.integers(0, 60, n)] + rng.standard_normal((n, d)).astype(np.float32) / d**0.5
    img /= np.linalg.norm(img, axis=1, keepdims=True)
    toks = img[:, None, :] + 1.3 * rng.standard_normal((n, q, d)).astype(np.float32) / d**0.5
    return toks / np.linalg.norm(toks, axis=-1, keepdims=True)


def real_queries(toks: np.ndarray, m: int, seed: int) -> np.ndarray:
    """Queries near one token of an image (cosine ~0.7)."""
    rng = np.random.default_rng(seed)
    n, q, d = toks.shape
    base = toks[rng.integers(0, n, m), rng.integers(0, q, m)]
    qs = base + rng.standard_normal((m, d)).astype(np.float32) / d**0.5
    return (qs / np.linalg.norm(qs, axis=1, keepdims=True)).astype(np.float32)


def run_mode(idx: Any, mode: str) -> str:
    meta = idx.meta
    return resolve_mode(mode, 10, 0, idx.count(), {}, meta.extra.get(CALIBRATION_KEY))[0]


def fast_recall(idx: Any, qs: np.ndarray) -> float:
    got = [[h.id for h in hs] for hs in idx.search_batch(qs, 10, mode="fast")]
    want = [[h.id for h in hs] for hs in idx.search_batch(qs, 10, mode="exact")]
    return float(np.mean([len(set(g) & set(w)) / 10 for g, w in zip(got, want, strict=True)]))


def test_guard_catches_and_corrects_a_misleading_calibration(tmp_path: Path) -> None:
    n, q, d = 6000, 16, 64
    toks = clustered(n, q, d, seed=3)
    uri = f"edge:{tmp_path / 'ix'}"
    # misleading calibration queries: each image's own mean token, which the pooled first
    # stage finds at once; real queries sit near ONE token
    mis = toks.mean(1)[np.random.default_rng(9).integers(0, n, 200)]
    with open_index(uri, "g", encoder_fingerprint="e", preset="t") as idx:
        idx.upsert([f"p{i}" for i in range(n)], toks)
        version = idx.active_version
        cal = calibrate_fast(idx, 0.99, query_vectors=mis)
        idx.update_version_meta(version, {CALIBRATION_KEY: cal})
    idx = open_index(uri, "g", read_only=True)  # as a server opens it
    try:
        start_l = idx.meta.extra[CALIBRATION_KEY]["L"]
        assert start_l is not None and start_l <= 500
        assert fast_recall(idx, real_queries(toks, 60, seed=1)) < 0.95  # silently lost recall

        metrics = Metrics()
        guard = RecallGuard(
            idx,
            rate=1.0,
            max_per_s=1000,
            min_samples=30,
            window=200,
            reservoir=100,
            reservoir_file=tmp_path / "ix" / "g" / "traffic_queries.npy",
            fingerprint="e",
            metrics=metrics,
            seed=0,
        )
        guard.start()
        live = real_queries(toks, 600, seed=2)
        for s in range(0, len(live), 10):
            batch = live[s : s + 10]
            mode = run_mode(idx, "fast")
            hits = idx.search_batch(batch, 10, mode=mode)
            qs = [Query(text="live", top_k=10, mode="fast") for _ in batch]
            guard.observe(version, batch, qs, hits, [mode] * len(batch))
            assert guard.wait_idle(60)
            if run_mode(idx, "fast") == "exact":
                break
        guard.stop()
        final = idx.meta.extra[CALIBRATION_KEY]
        assert final["guard"]["previous_L"] >= start_l and len(final["guard_history"]) >= 1
        assert final["L"] is None or final["L"] > start_l
        # corrected: fast (or the exact search it became) keeps its promise on fresh queries
        fresh = real_queries(toks, 60, seed=7)
        if final["L"] is None:
            assert run_mode(idx, "fast") == "exact"
        else:
            assert fast_recall(idx, fresh) >= 0.98
        snap = guard.snapshot(version)
        assert snap["last_action"]["action"] in ("raise-L", "exact")
        reg = metrics.registry
        assert reg.get_sample_value("cir_recall_guard_actions_total", {"action": "raise-L"}) or (
            reg.get_sample_value("cir_recall_guard_actions_total", {"action": "exact"})
        )
        assert reg.get_sample_value("cir_recall_guard_samples", {"version": version}) is not None
    finally:
        idx.close()
    # persisted through the index API: a new opener sees the guard's L
    with open_index(uri, "g", read_only=True) as again:
        assert again.meta.extra[CALIBRATION_KEY]["guard"] == final["guard"]
    # the traffic reservoir: the last 100 query vectors, with the encoder that made them
    arr = np.load(tmp_path / "ix" / "g" / "traffic_queries.npy")
    seen = s + len(batch)
    assert arr.shape == (min(100, seen), d) and np.allclose(arr[-1], live[seen - 1], atol=1e-6)
    side = json.loads((tmp_path / "ix" / "g" / "traffic_queries.json").read_text())
    assert side["encoder_fingerprint"] == "e" and side["version"] == version


def test_guard_leaves_a_good_version_alone_and_samples_at_its_rate(tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    n, q, d = 3000, 8, 32
    img = rng.standard_normal((n, 1, d)).astype(np.float32)
    toks = img + 0.05 * rng.standard_normal((n, q, d)).astype(np.float32)  # near their mean
    uri = f"edge:{tmp_path / 'ix'}"
    with open_index(uri, "g") as idx:
        idx.upsert([f"p{i}" for i in range(n)], toks)
        idx.update_version_meta(
            idx.active_version, {CALIBRATION_KEY: {"L": 100, "recall_target": 0.99}}
        )
    with open_index(uri, "g", read_only=True) as idx:
        guard = RecallGuard(idx, rate=0.25, max_per_s=1000, min_samples=20, seed=1)
        guard.start()
        qs = img[rng.integers(0, n, 400), 0] + 0.02 * rng.standard_normal((400, d))
        qs = qs.astype(np.float32)
        for s in range(0, 400, 20):
            hits = idx.search_batch(qs[s : s + 20], 10, mode="fast")
            queries = [Query(text="t", top_k=10, mode="fast") for _ in range(20)]
            guard.observe(idx.active_version, qs[s : s + 20], queries, hits, ["fast"] * 20)
        assert guard.wait_idle(60)
        guard.stop()
        snap = guard.snapshot(idx.active_version)
        assert 60 <= snap["total_checks"] <= 140  # about a quarter of 400
        assert snap["recall"] >= 0.99 and snap["last_action"] is None
        assert idx.meta.extra[CALIBRATION_KEY]["L"] == 100 and guard.current_l() == 100
        # exact searches and pages past the first are never sampled
        guard2 = RecallGuard(idx, rate=1.0, max_per_s=1000)
        page2 = [Query(text="t", top_k=10, offset=10, mode="fast")]
        guard2.observe(idx.active_version, qs[:1], page2, [hits[0]], ["fast"])
        guard2.observe(idx.active_version, qs[:1], [Query(text="t")], [hits[0]], ["exact"])
        assert guard2._queue.qsize() == 0


# ----------------------------------------------------------------------------- the server
torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def encoder() -> Any:
    from retrieval.encoder import Encoder

    torch.set_num_threads(1)
    return Encoder.from_pretrained("tiny")


def test_served_guard_info_metrics_and_p50(tmp_path: Path, encoder: Any) -> None:
    import grpc

    from server._generated.cir.v1 import search_pb2 as pb
    from server._generated.cir.v1 import search_pb2_grpc as pb_grpc
    from server.app import BackgroundServer
    from server.config import load_settings

    n = 1500
    rng = np.random.default_rng(0)
    toks = rng.standard_normal((n, encoder.num_queries, encoder.dim)).astype(np.float32)
    base = tmp_path / "a"
    with open_index(f"edge:{base}", "gallery", encoder_fingerprint=encoder.fingerprint) as idx:
        idx.upsert([f"p{i}" for i in range(n)], toks)
        idx.update_version_meta(
            idx.active_version,
            {CALIBRATION_KEY: {"L": 100, "recall_target": 0.99, "source": "composed"}},
        )
    shutil.copytree(base, tmp_path / "b")  # the same version, for the second server

    def settings(path: Path, **kw: Any) -> Any:
        return load_settings(
            None,
            index=f"edge:{path}",
            port=0,
            metrics_port=0,
            refresh_interval_s=0,
            grace_s=2.0,
            log_format="text",
            max_batch=1,
            **kw,
        )

    off = BackgroundServer(settings(base, recall_guard_rate=0.0), encoder=encoder).start()
    # 20 % sampled (20x the default), never acting: the request path is what is measured
    on = BackgroundServer(
        settings(
            tmp_path / "b",
            recall_guard_rate=0.2,
            recall_guard_max_per_s=1000,
            recall_guard_min_samples=10**6,
            recall_guard_window=10**6,
            query_reservoir_save_s=0,
        ),
        encoder=encoder,
    ).start()
    try:
        stubs = {}
        chans = []
        for key, srv in (("off", off), ("on", on)):
            ch = grpc.insecure_channel(srv.target)
            chans.append(ch)
            stubs[key] = pb_grpc.SearchServiceStub(ch)
        words = ["red", "blue", "big", "small", "left", "right", "round", "square"]
        lat: dict[str, list[float]] = {"off": [], "on": []}
        for i in range(160):
            text = f"make it {words[i % 8]} and {words[(i * 3) % 8]} {i}"
            for key in ("off", "on") if i % 2 else ("on", "off"):  # interleaved
                req = pb.SearchRequest(text=text, top_k=10, mode=pb.SEARCH_MODE_FAST)
                t0 = time.perf_counter()
                resp = stubs[key].Search(req, timeout=30)
                if i >= 10:  # warm-up excluded
                    lat[key].append(time.perf_counter() - t0)
                assert resp.searched_mode == pb.SEARCH_MODE_FAST and not resp.mode_note
        p50_off, p50_on = statistics.median(lat["off"]), statistics.median(lat["on"])
        assert p50_on <= 1.5 * p50_off + 0.005, (p50_on, p50_off)

        guard = on.server.service.engine.guard
        assert guard.wait_idle(60)
        info = stubs["on"].Info(pb.InfoRequest(), timeout=30).recall_guard
        assert info.enabled and info.sample_rate == pytest.approx(0.2)
        assert info.samples >= 10 and 0.0 <= info.recall <= 1.0  # random tokens, text queries
        assert info.fast_l == 100 and info.fast_l_source == "composed"
        assert info.reservoir_size == 160 and info.recall_target == pytest.approx(0.99)
        assert info.reservoir_file.endswith("traffic_queries.npy")
        version = on.server.service.engine.version
        reg = on.server.service.metrics.registry
        assert reg.get_sample_value("cir_recall_guard_samples", {"version": version}) >= 10
        assert stubs["off"].Info(pb.InfoRequest(), timeout=30).recall_guard.samples == 0

        # a version with no L meeting the target: an explicit fast runs exactly and says so
        engine = on.server.service.engine
        engine.index.set_fast_calibration(
            version, {"L": None, "recall_target": 0.99, "source": "composed", "reason": "test"}
        )
        time.sleep(engine.PLAN_TTL_S + 0.1)
        req = pb.SearchRequest(text="make it red", top_k=10, mode=pb.SEARCH_MODE_FAST)
        resp = stubs["on"].Search(req, timeout=30)
        assert resp.searched_mode == pb.SEARCH_MODE_EXACT
        assert "searched exactly" in resp.mode_note and "test" in resp.mode_note
        from server.client import CIRClient

        with CIRClient(on.target, timeout=30) as c:  # the typed client says so too
            typed = c.search("make it red", top_k=10, mode="fast")
        assert typed.searched_mode == "exact" and "searched exactly" in typed.mode_note
        assert stubs["on"].Info(pb.InfoRequest(), timeout=30).recall_guard.fast_l == 0
        for ch in chans:
            ch.close()
    finally:
        off.stop()
        on.stop()
    # written at shutdown: the traffic of the guarded server
    arr = np.load(tmp_path / "b" / "gallery" / "traffic_queries.npy")
    assert arr.shape == (162, encoder.dim)  # 161 raw searches + the typed client's one
