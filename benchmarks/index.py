"""Gallery index benchmark: Edge `exact`/`fast` vs numpy exact MaxSim vs qdrant-client local mode.

    python benchmarks/index.py --sizes 10000,100000 --json /tmp/index_bench.json
    python benchmarks/index.py --features feats.npy [--queries q.npy] --json out.json
    python benchmarks/index.py --features models/sprc-shapes --gallery data/shapes/gallery.jsonl
    python benchmarks/index.py --features models/sprc-shapes --render 100000  # 100k real features
    python benchmarks/index.py --sizes 30000 --sweep L=500,1000,2000,4000 --sweep-ef 1,exact

Synthetic data: clustered, normalised tokens [N, 32, 256]; queries are perturbed tokens of random
gallery images. Ground truth: numpy exact MaxSim. Reports build time, p50/p95 latency (one query
per call, one thread), recall@10/@50, RSS growth and disk, and each p50 as a ratio to numpy's.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import contextlib

from retrieval.index import VersionMeta, open_index  # noqa: E402
from retrieval.index.calibrate import calibrate_fast  # noqa: E402
from retrieval.index.policy import CALIBRATION_KEY  # noqa: E402

logger = logging.getLogger("bench.index")


def synth_chunks(n: int, q: int, d: int, seed: int, clusters: int = 1000, chunk: int = 5000) -> Any:
    """Clustered synthetic tokens chunk by chunk: yields ``(start, tokens [m, q, d])``."""
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((clusters, d)).astype(np.float32)
    centers /= np.linalg.norm(centers, axis=1, keepdims=True)
    for s in range(0, n, chunk):
        m = min(chunk, n - s)
        r = np.random.default_rng(seed + 1 + s)
        c = centers[r.integers(0, clusters, m)]  # image topic
        img = c + r.standard_normal((m, d)).astype(np.float32) / np.sqrt(d)  # image: topic + own
        img /= np.linalg.norm(img, axis=1, keepdims=True)
        # tokens: image + token noise (cos(token, image) ~ 0.6, like Q-Former query tokens)
        toks = img[:, None, :] + 1.3 * r.standard_normal((m, q, d)).astype(np.float32) / np.sqrt(d)
        toks /= np.linalg.norm(toks, axis=-1, keepdims=True)
        yield s, toks


def synth(n: int, q: int, d: int, seed: int, clusters: int = 1000, chunk: int = 5000) -> np.ndarray:
    """Clustered synthetic tokens, generated in chunks (100k x 32 x 256 is 3.3 GB)."""
    out = np.empty((n, q, d), np.float32)
    for s, toks in synth_chunks(n, q, d, seed, clusters, chunk):
        out[s : s + len(toks)] = toks
    return out


def curve_at(n: int, q: int, d: int, nq: int, seed: int = 7, target: float = 0.99) -> dict:
    """The calibration's measurement at ``n`` synthetic points without building an index (1M x
    16 x 256 is 16 GB of float32: streamed, never held): recall@10 of a perfect ``pooled``
    first stage at each L of the ladder, for ``nq`` queries (perturbed tokens of images of the
    first chunk: images are i.i.d.), L chosen on half and checked on the held-out half exactly
    as ``calibrate_fast`` does."""
    from retrieval.index.calibrate import LADDER, choose_l_heldout

    t0 = time.perf_counter()
    exact = np.empty((nq, n), np.float32)
    pooled = np.empty((nq, n), np.float32)
    qs: np.ndarray | None = None
    for s, toks in synth_chunks(n, q, d, seed, chunk=20000):
        if qs is None:
            qs = make_queries(toks, nq, seed=123)
        m = len(toks)
        exact[:, s : s + m] = (toks.reshape(m * q, d) @ qs.T).reshape(m, q, nq).max(1).T
        p = toks.mean(1)
        p /= np.linalg.norm(p, axis=1, keepdims=True)
        pooled[:, s : s + m] = (p @ qs.T).T
        if s % 200000 == 0:
            logger.info("curve: %d / %d points (%.0fs)", s + m, n, time.perf_counter() - t0)
    top = np.argpartition(-exact, 9, axis=1)[:, :10]
    thr = np.take_along_axis(pooled, top, axis=1)
    ranks = np.stack([(pooled[i][None, :] > thr[i][:, None]).sum(-1) for i in range(nq)])
    ladder = [x for x in LADDER if x < n]
    half = np.random.default_rng(1).permutation(nq)
    fit, held = ranks[half[nq // 2 :]], ranks[half[: nq // 2]]
    fit_c = {L: float((fit < L).mean()) for L in ladder}
    held_c = {L: float((held < L).mean()) for L in ladder}
    L = choose_l_heldout(fit_c, held_c, target)
    return {
        "n": n,
        "shape": [q, d],
        "queries": nq,
        "curve": {str(k): v for k, v in fit_c.items()},
        "heldout_curve": {str(k): v for k, v in held_c.items()},
        "L": L,
        "heldout_recall": held_c.get(L) if L else None,
        "seconds": round(time.perf_counter() - t0, 1),
        "peak_rss_mb": round(rss_mb(), 0),
    }


def make_queries(tokens: np.ndarray, nq: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    n, q, d = tokens.shape
    base = tokens[rng.integers(0, n, nq), rng.integers(0, q, nq)]
    qs = base + rng.standard_normal((nq, d)).astype(np.float32) / np.sqrt(d)  # cos ~0.7
    return (qs / np.linalg.norm(qs, axis=1, keepdims=True)).astype(np.float32)


def numpy_exact(tokens: np.ndarray, qs: np.ndarray, k: int) -> tuple[list[np.ndarray], list[float]]:
    n, q, d = tokens.shape
    flat = tokens.reshape(n * q, d)
    tops, times = [], []
    for v in qs:
        t0 = time.perf_counter()
        s = (flat @ v).reshape(n, q).max(axis=1)
        top = np.argpartition(-s, k)[:k]
        top = top[np.argsort(-s[top])]
        times.append(time.perf_counter() - t0)
        tops.append(top)
    return tops, times


def rss_mb() -> float:
    return psutil.Process().memory_info().rss / 2**20


def du_mb(path: Path) -> float:
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            with contextlib.suppress(OSError):
                total += os.path.getsize(os.path.join(root, f))
    return total / 2**20


def recall(got: list[list[str]], truth: list[np.ndarray], k: int) -> float:
    vals = []
    for g, t in zip(got, truth, strict=True):
        want = {f"i{j}" for j in t[:k]}
        vals.append(len(want & set(g[:k])) / k)
    return float(np.mean(vals))


def pct(times: list[float]) -> tuple[float, float]:
    ms = np.asarray(times) * 1000
    return float(np.percentile(ms, 50)), float(np.percentile(ms, 95))


def build(uri: str, tokens: np.ndarray, chunk: int = 2000) -> tuple[Any, float]:
    n, q, d = tokens.shape
    idx = open_index(uri, "bench", encoder_fingerprint="bench")
    t0 = time.perf_counter()
    meta = VersionMeta("bench", "synthetic", (q, d), {"bucket": "integer"})
    with idx.create_version(meta) as v:
        for s in range(0, n, chunk):
            e = min(n, s + chunk)
            v.upsert(
                [f"i{j}" for j in range(s, e)],
                tokens[s:e],
                [{"bucket": j % 10} for j in range(s, e)],
            )
    idx.activate(v.version)  # the handle is closed: flush + optimize (HNSW on pooled, int8)
    build_s = time.perf_counter() - t0
    if not uri.startswith("local"):
        if CALIBRATE["on"]:  # what `cir index build` does: measure this version's fast L
            t1 = time.perf_counter()
            real = CALIBRATE.get("queries")  # real query vectors, disjoint from the measured
            cal = (
                calibrate_fast(idx, query_vectors=real) if real is not None else calibrate_fast(idx)
            )
            idx.update_version_meta(str(idx.active_version), {CALIBRATION_KEY: cal})
            CALIBRATE["last"] = {**cal, "calibrate_s": time.perf_counter() - t1}
        idx.close()
        # the main rows use the fixed FAST_RECALL_TABLE; the "fast-cal" row the calibration
        idx = open_index(
            uri,
            "bench",
            encoder_fingerprint="bench",
            read_only=True,
            options={"fast_ignore_calibration": True},
        )
    return idx, build_s


def run_queries(idx: Any, qs: np.ndarray, k: int, mode: str) -> tuple[list[list[str]], list[float]]:
    ids, times = [], []
    for v in qs:
        t0 = time.perf_counter()
        hits = idx.search(v, top_k=k, mode=mode)
        times.append(time.perf_counter() - t0)
        ids.append([h.id for h in hits])
    return ids, times


def parse_sweep(spec: str | None) -> list[int]:
    """``"L=500,1000,2000"`` -> [500, 1000, 2000] (also accepts the bare list)."""
    if not spec:
        return []
    key, _, vals = spec.partition("=")
    if not vals:
        key, vals = "L", key
    if key.strip() != "L":
        raise SystemExit(f"--sweep wants L=500,1000,...; got {spec!r}")
    return [int(x) for x in vals.split(",") if x.strip()]


def oracle_recall(
    tokens: np.ndarray, pooled: np.ndarray, qs: np.ndarray, truth: list[np.ndarray], cands: int
) -> float:
    """recall@10 of a perfect two-stage search: EXACT top-L by `pooled`, then exact MaxSim.
    Separates what the `pooled` proxy loses from what HNSW loses."""
    vals = []
    for v, t in zip(qs, truth, strict=True):
        ps = pooled @ v
        cand = np.argpartition(-ps, min(cands, len(ps) - 1))[:cands]
        s = (tokens[cand] @ v).max(axis=1)
        top = cand[np.argsort(-s)[:10]]
        vals.append(len(set(top.tolist()) & set(t[:10].tolist())) / 10)
    return float(np.mean(vals))


def sweep(
    uri: str,
    tokens: np.ndarray,
    qs: np.ndarray,
    truth: list[np.ndarray],
    label: str,
    np_p50: float,
    sizes: list[int],
    ef_factors: list[str],
) -> list[dict]:
    """`fast` at several prefetch sizes L (and hnsw_ef = factor x L, or an exact prefetch) on
    the index already built at ``uri``; recall@10 against numpy exact, p50 ratio to numpy."""
    n = tokens.shape[0]
    pooled = tokens.mean(axis=1)
    pooled /= np.linalg.norm(pooled, axis=1, keepdims=True)
    rows = []
    # the load of a shared machine drifts: time numpy again next to the sweep for the ratios
    _, t_np = numpy_exact(tokens, qs[:50], 10)
    np_p50 = pct(t_np)[0]
    for cands in sizes:
        oracle = oracle_recall(tokens, pooled, qs, truth, cands)
        for eff in ef_factors:
            opts: dict[str, Any] = {"fast_min_candidates": cands, "fast_factor": 1}
            if eff == "exact":
                opts["fast_exact_prefetch"] = True
            else:
                opts["fast_ef_factor"] = float(eff)
                opts["fast_exact_prefetch"] = False  # the HNSW walk, whatever the default
            idx = open_index(uri, "bench", read_only=True, options=opts)
            try:
                run_queries(idx, qs[:5], 10, "fast")
                got, times = run_queries(idx, qs, 10, "fast")
            finally:
                idx.close()
            p50, p95 = pct(times)
            row = dict(
                size=label,
                n=n,
                L=cands,
                ef="exact scan" if eff == "exact" else int(float(eff) * cands),
                p50_ms=p50,
                p95_ms=p95,
                recall10=recall(got, truth, 10),
                oracle_recall10=oracle,
                numpy_p50_ms=np_p50,
                speedup_vs_numpy=np_p50 / p50 if p50 > 0 else None,
                queries=len(qs),
            )
            logger.info("sweep %s: %s", label, row)
            rows.append(row)
    return rows


def sweep_table(rows: list[dict]) -> str:
    head = (
        "| size | L | hnsw_ef | p50 ms | p95 ms | recall@10 | recall@10 exact prefetch (numpy) "
        "| numpy p50 ms | speed-up vs numpy |"
    )
    lines = [head, "|" + "---|" * 9]
    for r in rows:
        lines.append(
            f"| {r['size']} | {r['L']} | {r['ef']} | {r['p50_ms']:.1f} | {r['p95_ms']:.1f} "
            f"| {r['recall10']:.3f} | {r['oracle_recall10']:.3f} | {r['numpy_p50_ms']:.1f} "
            f"| {r['speedup_vs_numpy']:.1f}x |"
        )
    return "\n".join(lines)


SWEEP: dict[str, Any] = {"sizes": [], "ef": ["1"], "rows": [], "modes": ["exact", "fast"]}
CALIBRATE: dict[str, Any] = {"on": True, "last": None, "queries": None}


def _measure(
    idx: Any,
    qs: np.ndarray,
    truth50: list[np.ndarray],
    m_nq: int,
    base: dict,
    mode: str,
    label_mode: str,
    build_s: float,
) -> dict:
    """One row of the main table: ``m_nq`` queries at top 10 and top 50 in ``mode``."""
    run_queries(idx, qs[:5], 10, mode)  # warm up (page cache, lazy structures)
    got10, times = run_queries(idx, qs[:m_nq], 10, mode)
    got50, _ = run_queries(idx, qs[:m_nq], 50, mode)
    p50, p95 = pct(times)
    row = dict(
        base,
        mode=label_mode,
        build_s=build_s,
        p50_ms=p50,
        p95_ms=p95,
        recall10=recall(got10, truth50[:m_nq], 10),
        recall50=recall(got50, truth50[:m_nq], 50),
        queries=m_nq,
    )
    logger.info("%s %s %s: %s", base["size"], base["backend"], label_mode, row)
    return row


def bench_size(tokens: np.ndarray, label: str, nq: int, local: bool, workdir: Path) -> list[dict]:
    n = tokens.shape[0]
    qs = make_queries(tokens, nq, seed=123)
    rows: list[dict] = []
    truth50, t_np = numpy_exact(tokens, qs, 50)
    np_p50, np_p95 = pct(t_np)
    rows.append(
        dict(
            size=label,
            n=n,
            backend="numpy",
            mode="exact",
            build_s=0.0,
            p50_ms=np_p50,
            p95_ms=np_p95,
            recall10=1.0,
            recall50=1.0,
            rss_mb=tokens.nbytes / 2**20,
            disk_mb=0.0,
        )
    )
    logger.info("%s numpy exact p50 %.1f ms", label, np_p50)

    backends = [("edge", f"edge:{workdir / 'edge'}")]
    if local:
        backends.append(("local", f"local:{workdir / 'local'}"))
    for backend, uri in backends:
        rss0 = rss_mb()
        idx, build_s = build(uri, tokens)
        rss1 = rss_mb()
        disk = du_mb(workdir / backend)
        modes = [m for m in SWEEP["modes"] if backend == "edge" or m == "exact"]
        m_nq = nq if backend == "edge" else min(nq, 20)  # local mode is a pure-Python scan
        base = dict(size=label, n=n, backend=backend, rss_mb=rss1 - rss0, disk_mb=disk)

        for mode in modes:
            rows.append(_measure(idx, qs, truth50, m_nq, base, mode, mode, build_s))
        idx.close()
        cal = CALIBRATE["last"] if backend == "edge" else None
        if cal and cal.get("L") and "fast" in modes:
            idx = open_index(uri, "bench", encoder_fingerprint="bench", read_only=True)
            label_mode = f"fast-cal (L={cal['L']})"
            build_cal = build_s + cal["calibrate_s"]
            row = _measure(idx, qs, truth50, m_nq, base, "fast", label_mode, build_cal)
            rows.append(dict(row, calibration=cal))
            idx.close()
        elif cal:
            logger.info("%s: calibration found no L for the target: %s", label, cal["curve"])
        if backend == "edge" and SWEEP["sizes"]:
            SWEEP["rows"] += sweep(
                uri, tokens, qs, truth50, label, np_p50, SWEEP["sizes"], SWEEP["ef"]
            )
        shutil.rmtree(workdir / backend, ignore_errors=True)
    for r in rows:
        r["speedup_vs_numpy"] = np_p50 / r["p50_ms"] if r["p50_ms"] > 0 else None
    return rows


def table(rows: list[dict]) -> str:
    head = (
        "| size | backend | mode | build s | p50 ms | p95 ms | recall@10 | recall@50 | "
        "RSS MB | disk MB | speed-up vs numpy |"
    )
    lines = [head, "|" + "---|" * 11]
    for r in rows:
        lines.append(
            f"| {r['size']} | {r['backend']} | {r['mode']} | {r['build_s']:.1f} | {r['p50_ms']:.1f} "
            f"| {r['p95_ms']:.1f} | {r['recall10']:.3f} | {r['recall50']:.3f} | {r['rss_mb']:.0f} "
            f"| {r['disk_mb']:.0f} | {r['speedup_vs_numpy']:.1f}x |"
        )
    return "\n".join(lines)


def encode_gallery(
    model: str,
    gallery: Path,
    triplets: Path | None,
    limit: int | None,
    nq: int,
    cache: Path,
    render: int = 0,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Encode the images of a gallery jsonl (``{"path": ...}`` per line, relative to the file)
    -- or, with ``render`` > 0, that many random shapes scenes (the real-feature gallery of
    benchmarks/server.py) -- with a trained model folder (e.g. models/sprc-shapes), and composed
    queries from a triplet jsonl (``reference`` + ``caption``). Cached as .npy under ``cache``."""

    import torch
    from PIL import Image

    from retrieval.encoder import Encoder

    torch.set_num_threads(max(1, (os.cpu_count() or 2) // 2))  # shared machine
    enc = Encoder.from_pretrained(model)
    src = f"render{render}" if render else f"{gallery.stem}-{limit or 'all'}"
    cache = cache / f"{enc.fingerprint}-{src}-{nq}"  # no stale reuse across models
    cache.mkdir(parents=True, exist_ok=True)
    f_path, q_path = cache / "targets.npy", cache / "queries.npy"
    if render:

        def images(s: int, m: int) -> list[Any]:  # the scenes of --gallery real
            return [im.convert("RGB") for im in _bench_server().render_scenes(s, m, 0)]

        total = render
    else:
        lines = [json.loads(x) for x in gallery.read_text().splitlines() if x.strip()][:limit]

        def images(s: int, m: int) -> list[Any]:
            return [Image.open(gallery.parent / x["path"]).convert("RGB") for x in lines[s : s + m]]

        total = len(lines)
    if f_path.exists():
        feats = np.load(f_path)
    else:
        t0 = time.perf_counter()
        parts = []
        for s in range(0, total, 64):
            imgs = images(s, min(64, total - s))
            parts.append(enc.encode_targets(imgs, batch_size=32))
        feats = np.concatenate(parts).astype(np.float32)
        np.save(f_path, feats)
        logger.info("encoded %d targets in %.0fs", len(feats), time.perf_counter() - t0)
    qs = None
    if triplets is not None:
        if q_path.exists():
            qs = np.load(q_path)
        else:
            trip = [json.loads(x) for x in triplets.read_text().splitlines() if x.strip()][:nq]
            imgs = [Image.open(triplets.parent / t["reference"]).convert("RGB") for t in trip]
            qs = enc.encode_queries(imgs, [t["caption"] for t in trip]).astype(np.float32)
            np.save(q_path, qs)
    return feats, qs


# --- streamed: a gallery larger than RAM (1M x 16 x 256 is 16.4 GB of float32) ----------------


@functools.cache
def _bench_server() -> Any:
    """benchmarks/server.py as a module (the renderer of its real-feature gallery)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "bench_server", Path(__file__).with_name("server.py")
    )
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _render_job(job: tuple[int, int, int]) -> np.ndarray:
    """uint8 pixels [m, H, W, 3] of scenes [start, start + m) (a render worker's job)."""
    return np.stack([np.asarray(im.convert("RGB")) for im in _bench_server().render_scenes(*job)])


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    tmp.replace(path)  # a kill never leaves half a state file


def _peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _rss_split_mb() -> dict[str, float]:
    """Resident memory now: anonymous (heap) and file-backed (mapped pages, reclaimable)."""
    out = {"rss_mb": rss_mb()}
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            key, _, val = line.partition(":")
            if key in ("RssAnon", "RssFile", "VmHWM"):
                out[key] = float(val.split()[0]) / 1024
    return out


def encode_streamed(model: str, n: int, cache: Path, seed: int = 0, chunk: int = 2048) -> dict:
    """Render ``n`` scenes of benchmarks/server.py's real-feature gallery (scene i is drawn
    and noised from its own seed: no two are alike) and encode them with ``model`` into a
    float16 memmap ``[n, Q, D]`` of unit tokens, ``targets_f16.npy`` in a folder named by the
    model's fingerprint. Progress is in ``state.json`` after every chunk: a killed run resumes
    where it stopped. One worker process renders beside the encoder."""
    import multiprocessing as mp

    import torch
    from PIL import Image

    from retrieval.encoder import Encoder

    torch.set_num_threads(os.cpu_count() or 2)
    enc = Encoder.from_pretrained(model)
    folder = cache / f"{enc.fingerprint}-render{n}-s{seed}"
    folder.mkdir(parents=True, exist_ok=True)
    state_p, feats_p = folder / "state.json", folder / "targets_f16.npy"
    state = json.loads(state_p.read_text()) if state_p.exists() else {"done": 0, "seconds": 0.0}
    probe = enc.encode_target_pixels(enc.preprocess(_bench_server().render_scenes(0, 1, seed)))
    q, d = probe.shape[1:]
    info = {"folder": str(folder), "n": n, "shape": [int(q), int(d)], "fp": enc.fingerprint}
    if state["done"] >= n:
        return {**info, **state}
    mm = np.lib.format.open_memmap(
        feats_p, mode="r+" if feats_p.exists() else "w+", dtype=np.float16, shape=(n, q, d)
    )
    jobs = [(s, min(chunk, n - s), seed) for s in range(int(state["done"]), n, chunk)]
    t0, done0, secs0 = time.perf_counter(), state["done"], state["seconds"]
    with mp.get_context("fork").Pool(1) as pool:
        for (s, m, _), pix in zip(jobs, pool.imap(_render_job, jobs), strict=True):
            px = enc.preprocess([Image.fromarray(a) for a in pix])
            f = np.concatenate(
                [enc.encode_target_pixels(px[j : j + 256]) for j in range(0, m, 256)]
            )
            f /= np.linalg.norm(f, axis=-1, keepdims=True)
            mm[s : s + m] = f.astype(np.float16)
            mm.flush()
            el = time.perf_counter() - t0
            state = {"done": s + m, "seconds": round(secs0 + el, 1)}
            _write_json(state_p, state)
            if (s // chunk) % 25 == 0 or s + m == n:
                rate = (s + m - done0) / el
                logger.info(
                    "encoded %d / %d (%.0f images/s, %.0f s left)",
                    s + m,
                    n,
                    rate,
                    (n - s - m) / rate,
                )
    del mm
    return {**info, **state}


def composed_streamed(model: str, enc_info: dict, nq: int, seed: int = 0) -> np.ndarray:
    """``nq`` real composed queries ``[nq, D]`` as `cir index build` makes them for its
    calibration: gallery scenes drawn as references (distinct), each with a caption drawn from
    the model's training triplets (else the built-in texts), encoded by the model. Cached."""
    from indexer.finish import CALIBRATION_TEXTS, training_captions
    from retrieval.encoder import Encoder

    path = Path(enc_info["folder"]) / f"queries-{nq}.npy"
    if path.exists():
        return np.load(path)
    found = training_captions(model)
    caps = found[0] if found else list(CALIBRATION_TEXTS)
    rng = np.random.default_rng(seed + 99)
    refs = rng.choice(enc_info["n"], size=nq, replace=False)
    render = _bench_server().render_scenes
    images = [render(int(i), 1, seed)[0].convert("RGB") for i in refs]
    texts = [caps[int(j)] for j in rng.integers(0, len(caps), nq)]
    enc = Encoder.from_pretrained(model)
    qv = np.asarray(enc.encode_queries(images, texts, batch_size=64), np.float32)
    qv /= np.linalg.norm(qv, axis=1, keepdims=True)
    np.save(path, qv)
    logger.info("%d composed queries (captions: %s)", nq, found[1] if found else "built-in")
    return qv


def exact_streamed(mm: np.ndarray, qs: np.ndarray, k: int, chunk: int = 20000) -> np.ndarray:
    """Exact MaxSim top-``k`` ids ``[M, k]`` (best first) over a memmap, chunk by chunk."""
    n, q, d = mm.shape
    m = len(qs)
    scores = np.empty((m, n), np.float32)
    for s in range(0, n, chunk):
        t = np.asarray(mm[s : s + chunk], np.float32)
        c = len(t)
        scores[:, s : s + c] = (t.reshape(c * q, d) @ qs.T).reshape(c, q, m).max(1).T
    top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    order = np.argsort(-np.take_along_axis(scores, top, axis=1), axis=1)
    return np.take_along_axis(top, order, axis=1)


def build_streamed(
    uri: str, mm: np.ndarray, fp: str, cal_q: np.ndarray, out: Path, options: dict[str, Any]
) -> dict:
    """Build an Edge version from the memmap in chunks (never all in RAM), activate it
    (flush + optimize: HNSW on ``pooled``, int8 tokens) and calibrate ``fast`` on the composed
    queries ``cal_q`` exactly as `cir index build` does. Its figures go to ``out`` (a finished
    build is reused)."""
    if out.exists():
        return json.loads(out.read_text())
    n, q, d = mm.shape
    idx = open_index(uri, "bench", encoder_fingerprint=fp, options=options)
    t0 = time.perf_counter()
    meta = VersionMeta(fp, "render", (q, d), {"bucket": "integer"})
    with idx.create_version(meta) as v:
        for s in range(0, n, 2000):
            e = min(n, s + 2000)
            v.upsert(
                [f"i{j}" for j in range(s, e)],
                np.asarray(mm[s:e], np.float32),
                [{"bucket": j % 10} for j in range(s, e)],
            )
            if e % 100000 == 0:  # as the indexer's flush_every: the flush truncates the WAL
                v.flush()  # (it holds every upsert in full until then: ~26 KB per point here)
                logger.info("upserted %d / %d (%.0fs)", e, n, time.perf_counter() - t0)
        version = v.version
        t1 = time.perf_counter()
    # leaving the block closed the handle: flush + optimize (HNSW on pooled, int8 tokens)
    idx.activate(version)
    t2 = time.perf_counter()
    logger.info("built %d points: upsert %.0fs, flush + optimize %.0fs", n, t1 - t0, t2 - t1)
    cal = calibrate_fast(idx, query_vectors=cal_q, source="composed")
    idx.update_version_meta(version, {CALIBRATION_KEY: cal})
    t3 = time.perf_counter()
    idx.close()
    res = {
        "upsert_s": round(t1 - t0, 1),
        "optimize_s": round(t2 - t1, 1),
        "build_s": round(t2 - t0, 1),
        "calibrate_s": round(t3 - t2, 1),
        "calibration": cal,
        "build_peak_rss_mb": round(_peak_rss_mb(), 0),
        "options": options,
        "disk_mb": round(du_mb(Path(uri.partition(":")[2])), 0),
    }
    _write_json(out, res)
    return res


def query_streamed(uri: str, qs: np.ndarray, truth: np.ndarray, modes: list[str]) -> dict:
    """In a fresh process (so its memory is the index's alone): open the built version
    read-only as the server does and time one query per call in each mode, with recall@10
    against numpy exact MaxSim and, for ``fast``, against Edge's own ``exact``."""
    with contextlib.suppress(OSError):  # reset VmHWM (a spawned child starts from its parent's)
        Path("/proc/self/clear_refs").write_text("5")
    rss0 = _rss_split_mb()
    idx = open_index(uri, "bench", read_only=True)
    rss_open = _rss_split_mb()
    rows, got_exact = [], None
    for mode in modes:
        run_queries(idx, qs[:5], 10, mode)  # warm up
        t0 = time.perf_counter()
        got, times = run_queries(idx, qs, 10, mode)
        wall = time.perf_counter() - t0
        ran = idx.search(qs[0], top_k=10, mode=mode)  # type: ignore[arg-type]
        p50, p95 = pct(times)
        row = dict(
            mode=mode,
            ran=ran.mode,
            note=ran.note,
            p50_ms=p50,
            p95_ms=p95,
            qps_one_thread=len(qs) / wall,
            recall10=recall(got, list(truth), 10),
            queries=len(qs),
        )
        if mode == "exact":
            got_exact = got
        elif got_exact is not None:
            row["recall10_vs_edge_exact"] = float(
                np.mean([len(set(a) & set(b)) / 10 for a, b in zip(got, got_exact, strict=True)])
            )
        logger.info("streamed %s: %s", mode, row)
        rows.append(row)
    info = idx.describe()
    rss_end = _rss_split_mb()  # the index still open: what a server holds
    idx.close()
    return {
        "rows": rows,
        "rss_before_open": rss0,
        "rss_after_open": rss_open,
        "rss_after_queries": rss_end,
        "peak_rss_mb": round(rss_end.get("VmHWM", 0.0), 0),
        "info": info,
    }


def bench_streamed(args: argparse.Namespace, workdir: Path) -> dict:
    """The whole streamed run (``--streamed --render N``): encode N scenes (cached), composed
    queries (``--queries-n`` measured + ``--calibrate-queries`` for the build's calibration,
    disjoint references), numpy ground truth streamed, the Edge build + calibration, then the
    queries in a fresh process."""
    import multiprocessing as mp

    t0 = time.perf_counter()
    enc_info = encode_streamed(args.features, args.render, args.cache)
    logger.info("features: %s", enc_info)
    nq, ncal = args.queries_n, args.calibrate_queries or 400
    allq = composed_streamed(args.features, enc_info, nq + ncal)
    qs, cal_q = allq[:nq], allq[nq:]
    mm = np.load(Path(enc_info["folder"]) / "targets_f16.npy", mmap_mode="r")
    truth_p = Path(enc_info["folder"]) / f"truth-{nq}-{nq + ncal}.npy"
    if truth_p.exists():
        truth = np.load(truth_p)
    else:
        t1 = time.perf_counter()
        truth = exact_streamed(mm, qs, 10)
        np.save(truth_p, truth)
        logger.info("ground truth in %.0fs", time.perf_counter() - t1)
    uri = f"edge:{workdir / 'edge'}"
    opts = {"tokens_dtype": args.tokens_dtype}
    build = build_streamed(uri, mm, enc_info["fp"], cal_q, workdir / "build.json", opts)
    logger.info("build: %s", build)
    del mm
    with mp.get_context("spawn").Pool(1) as pool:
        served = pool.apply(query_streamed, (uri, qs, truth, SWEEP["modes"]))
    return {
        "n": enc_info["n"],
        "shape": enc_info["shape"],
        "encode": enc_info,
        "build": build,
        "serve": served,
        "seconds": round(time.perf_counter() - t0, 1),
    }


def streamed_table(res: dict) -> str:
    b, s = res["build"], res["serve"]
    cal = b["calibration"]
    lines = [
        f"{res['n']:,} real features {res['shape'][0]} x {res['shape'][1]} "
        f"(encoded in {res['encode']['seconds']:.0f} s); Edge build {b['build_s']:.0f} s "
        f"(upsert {b['upsert_s']:.0f} + optimize {b['optimize_s']:.0f}), calibration "
        f"{b['calibrate_s']:.0f} s: L = {cal.get('L')}, held-out recall@10 "
        f"{cal.get('heldout_recall')}; disk {b['disk_mb']:,.0f} MB "
        f"(tokens {b.get('options', {}).get('tokens_dtype', 'float32')}); build peak RSS "
        f"{b['build_peak_rss_mb']:,.0f} MB",
        f"serving process: RSS {s['rss_after_queries']['rss_mb']:,.0f} MB "
        f"(anon {s['rss_after_queries'].get('RssAnon', 0):,.0f}, file-backed "
        f"{s['rss_after_queries'].get('RssFile', 0):,.0f}), peak {s['peak_rss_mb']:,.0f} MB",
        "",
        "| mode | ran | p50 ms | p95 ms | QPS (1 thread) | recall@10 vs numpy exact "
        "| recall@10 vs Edge exact |",
        "|" + "---|" * 7,
    ]
    for r in s["rows"]:
        ve = r.get("recall10_vs_edge_exact")
        lines.append(
            f"| {r['mode']} | {r['ran']} | {r['p50_ms']:.1f} | {r['p95_ms']:.1f} "
            f"| {r['qps_one_thread']:.1f} | {r['recall10']:.3f} | "
            f"{'' if ve is None else f'{ve:.3f}'} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="10000,100000", help="comma-separated gallery sizes")
    ap.add_argument("--queries-n", type=int, default=200, help="queries per size")
    ap.add_argument("--q", type=int, default=32, help="tokens per image")
    ap.add_argument("--d", type=int, default=256, help="token dimension")
    ap.add_argument("--local-max", type=int, default=10000, help="run local mode up to this size")
    ap.add_argument(
        "--features",
        help="real target features [N, Q, D] (.npy), or a model folder (models/sprc-shapes) to "
        "encode --gallery with",
    )
    ap.add_argument("--queries", type=Path, help="real query vectors [M, D] (.npy)")
    ap.add_argument("--gallery", type=Path, default=Path("data/shapes/gallery.jsonl"))
    ap.add_argument(
        "--triplets",
        type=Path,
        default=Path("data/shapes/test.jsonl"),
        help="composed queries (reference + caption) encoded with the --features model",
    )
    ap.add_argument("--limit", type=int, default=None, help="encode at most this many images")
    ap.add_argument(
        "--render",
        type=int,
        default=0,
        help="with a model folder as --features: encode this many random shapes scenes (as "
        "benchmarks/server.py --gallery real does) instead of --gallery",
    )
    ap.add_argument("--cache", type=Path, default=Path("/tmp/cir-index-bench-features"))
    ap.add_argument("--modes", default="exact,fast", help="Edge modes of the main table")
    ap.add_argument(
        "--no-calibrate",
        action="store_true",
        help="skip the per-version fast-L calibration and its `fast-cal` row",
    )
    ap.add_argument(
        "--calibrate-queries",
        type=int,
        default=0,
        help="with real queries: calibrate fast's L on this many further composed queries "
        "(after the measured --queries-n ones), as `cir index build --calibrate-queries` does, "
        "instead of the proxy queries",
    )
    ap.add_argument("--sweep", help="fast prefetch sizes to sweep, e.g. L=500,1000,2000,4000")
    ap.add_argument(
        "--sweep-ef",
        default="1",
        help="hnsw_ef as multiples of L for the sweep, or 'exact' (exact prefetch scan): 1,2,exact",
    )
    ap.add_argument(
        "--curve",
        type=int,
        default=0,
        help="only the calibration's recall-vs-L measurement at this many synthetic points "
        "(--q x --d), streamed without an index (e.g. 1000000 at 16 x 256)",
    )
    ap.add_argument(
        "--streamed",
        action="store_true",
        help="with a model folder as --features and --render N: a gallery larger than RAM "
        "(features in a float16 memmap under --cache, the build streamed from it, the queries "
        "in a fresh process): e.g. --render 1000000",
    )
    ap.add_argument(
        "--tokens-dtype",
        default="float32",
        choices=("float32", "float16"),
        help="--streamed: how the Edge version stores the token originals (the index option "
        "tokens_dtype; float16 halves the disk: 1M x 16 x 256 is 16.4 GB in float32)",
    )
    ap.add_argument("--workdir", type=Path, default=None, help="where the indexes are built")
    ap.add_argument("--json", type=Path, help="write the rows here")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    SWEEP["sizes"] = parse_sweep(args.sweep)
    SWEEP["ef"] = [x.strip() for x in args.sweep_ef.split(",") if x.strip()]
    SWEEP["modes"] = [x.strip() for x in args.modes.split(",") if x.strip()]
    CALIBRATE["on"] = not args.no_calibrate
    if args.curve:
        res = curve_at(args.curve, args.q, args.d, args.queries_n)
        print(json.dumps(res, indent=1))
        if args.json:
            args.json.write_text(json.dumps(res, indent=1))
        return
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="cir-index-bench-"))
    if args.streamed:
        if not args.features or args.features.endswith(".npy") or not args.render:
            ap.error("--streamed needs a model folder as --features and --render N")
        res = bench_streamed(args, workdir)
        print(streamed_table(res))
        if args.json:
            args.json.write_text(json.dumps({**run_info(), **res}, indent=1))
        return
    rows: list[dict] = []
    if args.features:
        qs_real: np.ndarray | None = None
        if not args.features.endswith(".npy"):  # a model folder (or a preset name)
            tokens, qs_real = encode_gallery(
                args.features,
                args.gallery,
                args.triplets,
                args.limit,
                args.queries_n + args.calibrate_queries,
                args.cache,
                args.render,
            )
        else:
            tokens = np.load(args.features, mmap_mode="r").astype(np.float32)
        tokens /= np.linalg.norm(tokens, axis=-1, keepdims=True)
        label = f"real {tokens.shape[0]}"
        if args.queries:
            qs_real = np.load(args.queries).astype(np.float32)
        if qs_real is not None and args.calibrate_queries > 0:
            cal_q = qs_real[args.queries_n : args.queries_n + args.calibrate_queries]
            if len(cal_q) < args.calibrate_queries:
                ap.error(f"only {len(qs_real)} real queries for --calibrate-queries")
            CALIBRATE["queries"] = cal_q / np.linalg.norm(cal_q, axis=1, keepdims=True)
        if qs_real is not None:
            qr = qs_real
            globals()["make_queries"] = lambda t, nq, seed: (
                qr[:nq] / np.linalg.norm(qr[:nq], axis=1, keepdims=True)
            )
        rows += bench_size(
            tokens, label, args.queries_n, tokens.shape[0] <= args.local_max, workdir
        )
    else:
        for n in (int(x) for x in args.sizes.split(",") if x):
            t0 = time.perf_counter()
            tokens = synth(n, args.q, args.d, seed=7)
            logger.info(
                "generated %d x %d x %d in %.1fs", n, args.q, args.d, time.perf_counter() - t0
            )
            rows += bench_size(
                tokens, f"{n // 1000}k", args.queries_n, n <= args.local_max, workdir
            )
            del tokens
    print(table(rows))
    if SWEEP["rows"]:
        print()
        print(sweep_table(SWEEP["rows"]))
    if args.json:
        info = {**run_info(), "rows": rows, "sweep": SWEEP["rows"]}
        args.json.write_text(json.dumps(info, indent=1))


def run_info() -> dict[str, Any]:
    """The command, the machine and the commit of a run (the JSON's header)."""
    return {
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "ram_gb": round(psutil.virtual_memory().total / 2**30, 1),
        },
        "git": subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True
        ).stdout.strip()
        or None,
    }


if __name__ == "__main__":
    main()
