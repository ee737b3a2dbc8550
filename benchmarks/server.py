"""Server benchmark: p50/p99 latency and QPS of `Search` at several concurrencies, with
micro-batching on and off, over galleries of several sizes -- all in one run.

    python benchmarks/server.py --gallery real --sizes 10000,100000 --concurrency 1,8,32 \
        --duration 5 --json runs/bench_server.json

Model: models/sprc-shapes when present, else the `sprc-small` preset with random weights (the
same architecture and cost; the output says which). Galleries (Edge indexes under
``--work-dir``, kept between runs): ``real`` (default with the demo model) renders N random
scenes of the shapes world (seeded; 1-5 objects, any shape/colour/size/cell) and indexes the
model's own target features, so the index sees the real feature distribution; queries are
the reference images and captions of ``data/shapes/test.jsonl``. ``synthetic``: clustered
random unit token sets ``[N, Q, D]`` and random query images.
Each (gallery, batching) pair runs `cir serve` as a subprocess; the load generator is a
grpc.aio client in this process (closed loop: each of C workers sends its next query when
the previous one returns). Queries: a reference image (JPEG bytes, decoded and encoded on
the server each time, no feature cache) + a text.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import logging
import os
import platform
import random
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

logger = logging.getLogger("bench.server")

DEMO_MODEL = ROOT / "models" / "sprc-shapes"
TEXTS = ["make it red", "same but larger", "with a white circle", "darker and smaller", "blue"]


#: server stages reported per response (`Timings`), in request order
STAGES = ("queue", "decode", "reference", "encode", "search", "rerank")


def pick_model(arg: str | None) -> tuple[str, str]:
    if arg:
        return arg, f"{arg} (given)"
    if DEMO_MODEL.is_dir():
        return str(DEMO_MODEL), "demo model models/sprc-shapes"
    return "sprc-small", "sprc-small preset with RANDOM weights (models/sprc-shapes not found)"


def _open_fresh(work: Path, name: str, n: int, encoder: Any) -> Any | None:
    """None when ``name`` already holds ``n`` points for this encoder (reuse it); otherwise
    (another size, or another encoder's vectors) clear it and return a new, empty index."""
    from retrieval.index import ModelMismatchError, open_index

    uri = f"edge:{work}"
    try:
        idx = open_index(uri, name, encoder_fingerprint=encoder.fingerprint, preset=encoder.preset)
    except ModelMismatchError:
        logger.info("%s was built with another encoder: rebuilding it", name)
    else:
        try:
            if idx.active_version is not None and idx.count() == n:
                logger.info("reusing %s (%d points)", name, n)
                return None
        finally:
            idx.close()
    shutil.rmtree(work / name, ignore_errors=True)
    return open_index(
        uri,
        name,
        encoder_fingerprint=encoder.fingerprint,
        preset=encoder.preset,
        fields={"category": "keyword"},
    )


def _build(work: Path, name: str, n: int, encoder: Any, fill: Callable[[Any], None]) -> str:
    """Build (or reuse) the Edge index ``name`` of ``n`` points: ``fill(idx)`` upserts them;
    then the fast-mode calibration, as `cir index build` does."""
    t0 = time.perf_counter()
    idx = _open_fresh(work, name, n, encoder)
    if idx is None:
        return name
    try:
        fill(idx)
        idx.flush()
    finally:
        idx.close()  # builds the HNSW / int8 indexes of the version
    from indexer.pipeline import calibrate_index

    cal = calibrate_index(f"edge:{work}", name)
    logger.info("%s: fast L=%s, recall curve %s", name, cal["L"], cal["curve"])
    logger.info("built %s: %d points in %.0fs", name, n, time.perf_counter() - t0)
    return name


def build_index(work: Path, n: int, encoder: Any, seed: int = 0) -> str:
    """An Edge index of ``n`` clustered synthetic token sets (reused when already built)."""

    def fill(idx: Any) -> None:
        rng = np.random.default_rng(seed)
        q, d = encoder.num_queries, encoder.dim
        centers = rng.standard_normal((256, d)).astype(np.float32)
        chunk = 2000
        for s in range(0, n, chunk):
            m = min(chunk, n - s)
            which = rng.integers(0, len(centers), (m, q))
            toks = centers[which] + 0.7 * rng.standard_normal((m, q, d)).astype(np.float32)
            toks /= np.linalg.norm(toks, axis=-1, keepdims=True)
            ids = [f"s{n}-{i:07d}" for i in range(s, s + m)]
            payloads = [{"category": f"c{i % 10}"} for i in range(s, s + m)]
            idx.upsert(ids, toks, payloads)

    return _build(work, f"bench{n}", n, encoder, fill)


def _render_chunk(job: tuple[int, int, int]) -> list[bytes]:
    """PNG bytes of scenes [start, start + m) of the benchmark's random shapes gallery."""
    out = []
    for im in render_scenes(*job):
        buf = io.BytesIO()
        im.save(buf, "PNG")
        out.append(buf.getvalue())
    return out


def render_scenes(start: int, m: int, seed: int) -> list[Any]:
    """Scenes [start, start + m) of the benchmark's random shapes gallery (PIL images): random
    objects in random cells; scene i is the same wherever it is rendered."""
    from retrieval.data.shapes import (
        COLOR_NAMES,
        MAX_OBJECTS,
        N_CELLS,
        SHAPES,
        SIZES,
        Obj,
        make_scene,
        render_scene,
    )

    out = []
    for i in range(start, start + m):
        rng = random.Random(f"{seed}-{i}")
        cells = rng.sample(range(N_CELLS), rng.randint(1, MAX_OBJECTS))
        scene = make_scene(
            Obj(c, rng.choice(COLOR_NAMES), rng.choice(SHAPES), rng.choice(SIZES)) for c in cells
        )
        out.append(render_scene(scene, 64, (seed, 7, i)))
    return out


def build_real_index(work: Path, n: int, encoder: Any, seed: int = 0, patches: bool = False) -> str:
    """An Edge index of ``n`` random shapes-world scenes encoded by ``encoder`` (reused when
    already built for this encoder). ``patches``: each point also stores its ViT tokens, as
    `cir index build` does for a model folder whose re-ranker reads them."""

    def fill(idx: Any) -> None:
        import multiprocessing as mp

        from PIL import Image

        from retrieval.index.api import PATCHES_KEY
        from retrieval.rerank import encode_patches

        chunk = 2000
        jobs = [(s, min(chunk, n - s), seed) for s in range(0, n, chunk)]
        with mp.get_context("fork").Pool(2) as pool:
            for (s, m, _), pngs in zip(jobs, pool.imap(_render_chunk, jobs), strict=True):
                images = [Image.open(io.BytesIO(b)).convert("RGB") for b in pngs]
                ids = [f"r{n}-{i:07d}" for i in range(s, s + m)]
                payloads: list[dict[str, Any]] = [
                    {"category": f"c{i % 10}"} for i in range(s, s + m)
                ]
                if patches:
                    parts = [
                        encoder.encode_target_pixels_and_patches(
                            encoder.preprocess(images[j : j + 250])
                        )
                        for j in range(0, m, 250)
                    ]
                    toks = np.concatenate([t for t, _ in parts])
                    vit = np.concatenate([v for _, v in parts])
                    for pl, v in zip(payloads, vit, strict=True):
                        pl[PATCHES_KEY] = encode_patches(v)
                else:
                    toks = encoder.encode_targets(images, batch_size=250)
                idx.upsert(ids, toks, payloads)

    return _build(work, f"real{n}{'p' if patches else ''}", n, encoder, fill)


def _calibration_of(work: Path, name: str) -> dict[str, Any] | None:
    from retrieval.index import open_index
    from retrieval.index.policy import CALIBRATION_KEY

    idx = open_index(f"edge:{work}", name)
    try:
        cal = idx.meta.extra.get(CALIBRATION_KEY) if idx.meta else None
    finally:
        idx.close()
    return None if cal is None else {"L": cal.get("L"), "curve": cal.get("curve")}


def query_images(encoder: Any, count: int = 32) -> list[tuple[bytes, str]]:
    """Random query images (JPEG) with generic texts, for the synthetic galleries."""
    from tests.helpers import render_images

    out = []
    side = max(64, int(encoder.image_size))
    for k, im in enumerate(render_images(count, seed=123, size=(side + 32, side))):
        buf = io.BytesIO()
        im.save(buf, "JPEG", quality=85)
        out.append((buf.getvalue(), TEXTS[k % len(TEXTS)]))
    return out


def shapes_queries(data: Path, count: int = 64) -> list[tuple[bytes, str]]:
    """(reference PNG bytes, caption) of the first ``count`` test triplets of a shapes world."""
    from retrieval.data.triplets import load_triplets, resolve_path

    rows = load_triplets(data, "test")[:count]
    return [(resolve_path(data, t.reference).read_bytes(), t.caption) for t in rows]


def calibration_queries(data: Path, encoder: Any, skip: int, count: int) -> np.ndarray:
    """Composed query vectors of ``count`` test triplets after the first ``skip`` (the load
    queries), to calibrate `fast` on real queries instead of the index's proxy queries."""
    from PIL import Image

    from retrieval.data.triplets import load_triplets, resolve_path

    rows = load_triplets(data, "test")[skip : skip + count]
    if not rows:
        raise SystemExit(f"no test triplets after the first {skip} in {data}")
    images = [Image.open(resolve_path(data, t.reference)).convert("RGB") for t in rows]
    return encoder.encode_queries(images, [t.caption for t in rows])


def start_server(
    model: str, work: Path, name: str, batching: bool, args: Any, dtype: str = "float32"
) -> tuple[Any, int]:
    from tests.helpers import free_port

    port = free_port()
    cmd = [
        sys.executable,
        "-c",
        "from cir.cli import main; main()",
        "--log-level",
        "WARNING",
        "serve",
        "--model",
        model,
        "--index",
        f"edge:{work}",
        "--name",
        name,
        "--port",
        str(port),
        "--metrics-port",
        "0",
        "--max-batch",
        str(args.max_batch if batching else 1),
        "--max-wait-ms",
        str(args.max_wait_ms if batching else 0),
        "--queue-size",
        "4096",
        # a closed loop queues at most `concurrency` queries: admission control (which sheds
        # load by estimated wait) would only turn a slow, busy machine's answers into errors
        "--max-queue-ms",
        "600000",
        "--refresh-interval-s",
        "0",
        "--log-format",
        "text",
        "--dtype",
        dtype,
    ]
    from retrieval.model_source import is_untrained_preset

    if is_untrained_preset(model):  # the sprc-small fallback (no demo model): random weights
        cmd.append("--allow-untrained")
    if not getattr(args, "search_process", True):
        cmd.append("--no-search-process")
    env = dict(os.environ)
    if args.threads:
        env["CIR_NUM_THREADS"] = str(args.threads)
    if args.batch_threads and batching:
        env["CIR_BATCH_THREADS"] = str(args.batch_threads)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    from server.client import CIRClient

    with CIRClient(f"127.0.0.1:{port}", timeout=5) as c:
        try:
            c.wait_ready(180)
        except Exception:
            proc.kill()
            err = proc.stderr.read().decode() if proc.stderr else ""
            raise RuntimeError(f"server did not start: {err[-2000:]}") from None
    return proc, port


def stop_server(proc: Any) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


async def run_load(
    port: int,
    queries: list[tuple[bytes, str]],
    concurrency: int,
    duration: float,
    warmup: float,
    top_k: int,
    rerank_k: int | None = None,
) -> dict[str, Any]:
    import grpc

    from server._generated.cir.v1 import search_pb2 as pb
    from server._generated.cir.v1 import search_pb2_grpc as pb_grpc

    lat: list[float] = []
    batch_sizes: list[int] = []
    stages: list[tuple[float, ...]] = []  # the server's own timings of each measured response
    errors: dict[str, int] = {}
    async with grpc.aio.insecure_channel(
        f"127.0.0.1:{port}",
        options=[
            ("grpc.max_send_message_length", 32 << 20),
            ("grpc.max_receive_message_length", 32 << 20),
        ],
    ) as ch:
        stub = pb_grpc.SearchServiceStub(ch)
        t_start = time.perf_counter()
        t_measure = t_start + warmup
        t_end = t_measure + duration

        async def worker(w: int) -> None:
            rnd = random.Random(w)
            while True:
                now = time.perf_counter()
                if now >= t_end:
                    return
                image, text = rnd.choice(queries)
                req = pb.SearchRequest(
                    reference_image=image,
                    text=text,
                    top_k=top_k,
                    include_payload=False,
                )
                if rerank_k is not None:  # None: the server's default
                    req.rerank_k = rerank_k
                t0 = time.perf_counter()
                try:
                    resp = await stub.Search(req, timeout=60)
                except grpc.aio.AioRpcError as exc:
                    if t_measure <= time.perf_counter() <= t_end:
                        errors[exc.code().name] = errors.get(exc.code().name, 0) + 1
                    continue
                t1 = time.perf_counter()
                if t_measure <= t1 <= t_end:  # completions inside the measured window
                    lat.append(t1 - t0)
                    batch_sizes.append(resp.timings.batch_size)
                    tm = resp.timings
                    stages.append(
                        (
                            tm.queue_ms,
                            tm.decode_ms,
                            tm.reference_ms,
                            tm.encode_ms,
                            tm.search_ms,
                            tm.rerank_ms,
                        )
                    )

        await asyncio.gather(*(worker(w) for w in range(concurrency)))
    arr = np.asarray(lat) * 1000.0
    return {
        "requests": len(lat),
        "qps": len(lat) / duration,
        "p50_ms": float(np.percentile(arr, 50)) if len(arr) else float("nan"),
        "p99_ms": float(np.percentile(arr, 99)) if len(arr) else float("nan"),
        "mean_batch": float(np.mean(batch_sizes)) if batch_sizes else 0.0,
        # mean ms per request of each server stage (a batch's encode/search time is every
        # member's): where a request's latency goes
        "stage_ms": (
            dict(zip(STAGES, np.mean(np.asarray(stages), axis=0).round(2).tolist(), strict=True))
            if stages
            else {}
        ),
        "errors": errors,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="checkpoint folder or preset (default: demo)")
    p.add_argument("--sizes", default="10000,100000", help="gallery sizes, comma-separated")
    p.add_argument("--concurrency", default="1,8,32", help="client concurrencies")
    p.add_argument("--duration", type=float, default=5.0, help="measured seconds per cell")
    p.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds per cell")
    p.add_argument("--max-batch", type=int, default=32, help="server --max-batch when batching")
    p.add_argument("--max-wait-ms", type=float, default=3.0, help="server --max-wait-ms")
    p.add_argument("--top-k", type=int, default=10)
    p.add_argument("--threads", type=int, default=0, help="server torch threads (0: default)")
    p.add_argument(
        "--batch-threads",
        type=int,
        default=0,
        help="server torch threads for batches of 4+ queries when batching (0: --threads)",
    )
    p.add_argument(
        "--dtypes", default="float32", help="server compute dtypes, e.g. float32,bfloat16"
    )
    p.add_argument("--work-dir", type=Path, default=ROOT / "data" / "bench-server")
    p.add_argument(
        "--gallery",
        choices=("auto", "real", "synthetic"),
        default="auto",
        help="real: the model's features of random shapes scenes; synthetic: clustered random "
        "tokens; auto: real with a trained model and a shapes world, else synthetic",
    )
    p.add_argument("--data", type=Path, default=ROOT / "data" / "shapes", help="shapes world")
    p.add_argument(
        "--calibrate-queries",
        type=int,
        default=0,
        help="real galleries: recalibrate fast's L on this many composed test queries (not the "
        "load queries) instead of the index's proxy queries (0: keep the build's calibration)",
    )
    p.add_argument(
        "--no-search-process",
        dest="search_process",
        action="store_false",
        help="servers search the index in their own process (cir serve --no-search-process)",
    )
    p.add_argument(
        "--rerank",
        default="",
        help="re-ranking rows: SearchRequest.rerank_k values, e.g. 0,50 (empty: the server's "
        "default only)",
    )
    p.add_argument(
        "--batching",
        choices=("both", "on", "off"),
        default="both",
        help="server batching in the rows: both (side by side), or only on / off",
    )
    p.add_argument("--json", type=Path, default=None, help="write all results here")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    import torch

    from retrieval.encoder import Encoder

    torch.set_num_threads(max(1, args.threads or 1))
    model, model_note = pick_model(args.model)
    encoder = Encoder.from_pretrained(model)
    print(f"model: {model_note} ({encoder.fingerprint})", flush=True)
    sizes = [int(s) for s in args.sizes.split(",") if s]
    reranks: list[int | None] = [int(k) for k in args.rerank.split(",") if k] or [None]
    concs = [int(c) for c in args.concurrency.split(",") if c]
    args.work_dir.mkdir(parents=True, exist_ok=True)
    gallery = args.gallery
    if gallery == "auto":
        trained = Path(model).is_dir() and (args.data / "test.jsonl").is_file()
        gallery = "real" if trained else "synthetic"
    if gallery == "real":
        queries = shapes_queries(args.data)
    else:
        queries = query_images(encoder)
    print(f"gallery: {gallery}; {len(queries)} distinct queries", flush=True)
    rows: list[dict[str, Any]] = []
    calibrations: dict[int, Any] = {}
    for n in sizes:
        if gallery == "real":
            from retrieval.rerank import stores_patches

            name = build_real_index(
                args.work_dir, n, encoder, patches=stores_patches(model, encoder.fingerprint)
            )
        else:
            name = build_index(args.work_dir, n, encoder)
        if gallery == "real" and args.calibrate_queries > 0:
            from indexer.pipeline import calibrate_index

            qv = calibration_queries(args.data, encoder, len(queries), args.calibrate_queries)
            calibrate_index(f"edge:{args.work_dir}", name, query_vectors=qv)
        calibrations[n] = _calibration_of(args.work_dir, name)
        print(f"gallery {n:,}: fast-mode calibration {calibrations[n]}", flush=True)
        modes = {"on": (True,), "off": (False,), "both": (True, False)}[args.batching]
        for dtype, batching in [(d, b) for d in args.dtypes.split(",") for b in modes]:
            proc, port = start_server(model, args.work_dir, name, batching, args, dtype)
            try:
                for rk, c in [(rk, c) for rk in reranks for c in concs]:
                    r = asyncio.run(
                        run_load(port, queries, c, args.duration, args.warmup, args.top_k, rk)
                    )
                    r.update(
                        gallery=n,
                        kind=gallery,
                        batching=batching,
                        concurrency=c,
                        dtype=dtype,
                        rerank_k=-1 if rk is None else rk,
                    )
                    rows.append(r)
                    print(
                        f"gallery={n:>7} {dtype} batching={'on ' if batching else 'off'} "
                        f"rerank={'default' if rk is None else rk} c={c:>3}  "
                        f"QPS={r['qps']:7.1f}  p50={r['p50_ms']:7.1f} ms  "
                        f"p99={r['p99_ms']:7.1f} ms  batch={r['mean_batch']:.1f}  "
                        f"errors={r['errors'] or 0}",
                        flush=True,
                    )
            finally:
                stop_server(proc)
    print()
    print(
        "| gallery | dtype | batching | rerank_k | concurrency | QPS | p50 ms | p99 ms "
        "| mean batch | errors |"
    )
    print("|---:|:---:|:---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['gallery']:,} | {r['dtype']} | {'on' if r['batching'] else 'off'} | "
            f"{'default' if r['rerank_k'] < 0 else r['rerank_k']} | {r['concurrency']} | "
            f"{r['qps']:.1f} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {r['mean_batch']:.1f} | "
            f"{sum(r['errors'].values()) if r['errors'] else 0} |"
        )
    print()
    print("Mean ms per request of each server stage (`SearchResponse.timings`; a batch's")
    print("reference/encode/search time is each of its members' time):")
    print("| gallery | dtype | batching | rerank_k | concurrency | " + " | ".join(STAGES) + " |")
    print("|---:|:---:|:---:|---:|---:|" + "---:|" * len(STAGES))
    for r in rows:
        st = r["stage_ms"]
        print(
            f"| {r['gallery']:,} | {r['dtype']} | {'on' if r['batching'] else 'off'} | "
            f"{'default' if r['rerank_k'] < 0 else r['rerank_k']} | {r['concurrency']} | "
            + " | ".join(f"{st.get(k, 0.0):.1f}" for k in STAGES)
            + " |"
        )
    for n in sizes:
        for dtype in args.dtypes.split(","):
            sel = [
                r
                for r in rows
                if r["gallery"] == n
                and r["dtype"] == dtype
                and r["rerank_k"] == rows[0]["rerank_k"]
            ]
            on = {r["concurrency"]: r for r in sel if r["batching"]}
            off = {r["concurrency"]: r for r in sel if not r["batching"]}
            hi = max(concs)
            if hi in on and hi in off and off[hi]["qps"] > 0:
                print(
                    f"gallery {n:,} {dtype}: batching speed-up at concurrency {hi}: "
                    f"{on[hi]['qps'] / off[hi]['qps']:.2f}x"
                )
    rr = sorted({r["rerank_k"] for r in rows if r["rerank_k"] > 0})
    if 0 in {r["rerank_k"] for r in rows}:
        for n, dtype, batching, k in [
            (n, d, b, k)
            for n in sizes
            for d in args.dtypes.split(",")
            for b in (True, False)
            for k in rr
        ]:
            cell = {
                (r["rerank_k"], r["concurrency"]): r
                for r in rows
                if r["gallery"] == n and r["dtype"] == dtype and r["batching"] == batching
            }
            lo, hi = min(concs), max(concs)
            if (0, lo) in cell and (k, lo) in cell and (0, hi) in cell and (k, hi) in cell:
                print(
                    f"gallery {n:,} {dtype} batching {'on' if batching else 'off'}: rerank_k={k} "
                    f"adds {cell[(k, lo)]['p50_ms'] - cell[(0, lo)]['p50_ms']:.1f} ms p50 at "
                    f"concurrency {lo}; QPS at {hi}: "
                    f"{cell[(k, hi)]['qps'] / max(cell[(0, hi)]['qps'], 1e-9):.2f}x of no re-ranking"
                )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        meta = {
            "model": model_note,
            "gallery": gallery,
            "calibration": {str(k): v for k, v in calibrations.items()},
            "fingerprint": encoder.fingerprint,
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "args": {k: str(v) for k, v in vars(args).items()},
        }
        args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
