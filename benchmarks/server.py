"""Server benchmark: p50/p99 latency and QPS of `Search` at several concurrencies, with
micro-batching on and off, over synthetic galleries of several sizes -- all in one run.

    python benchmarks/server.py --sizes 10000,100000 --concurrency 1,8,32 --duration 5 \
        --json runs/bench_server.json

Model: models/sprc-shapes when present, else the `sprc-small` preset with random weights (the
same architecture and cost; the output says which). Galleries: clustered random unit token
sets ``[N, Q, D]`` upserted into Edge indexes under ``--work-dir`` (kept between runs).
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
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

logger = logging.getLogger("bench.server")

DEMO_MODEL = ROOT / "models" / "sprc-shapes"
TEXTS = ["make it red", "same but larger", "with a white circle", "darker and smaller", "blue"]


def pick_model(arg: str | None) -> tuple[str, str]:
    if arg:
        return arg, f"{arg} (given)"
    if DEMO_MODEL.is_dir():
        return str(DEMO_MODEL), "demo model models/sprc-shapes"
    return "sprc-small", "sprc-small preset with RANDOM weights (models/sprc-shapes not found)"


def build_index(work: Path, n: int, encoder: Any, seed: int = 0) -> str:
    """An Edge index of ``n`` clustered synthetic token sets (reused when already built)."""
    from retrieval.index import open_index

    name = f"bench{n}"
    uri = f"edge:{work}"
    idx = open_index(uri, name, encoder_fingerprint=encoder.fingerprint, preset=encoder.preset)
    try:
        if idx.active_version is not None and idx.count() == n:
            logger.info("reusing %s (%d points)", name, n)
            return name
    finally:
        idx.close()
    shutil.rmtree(work / name, ignore_errors=True)
    rng = np.random.default_rng(seed)
    q, d = encoder.num_queries, encoder.dim
    centers = rng.standard_normal((256, d)).astype(np.float32)
    t0 = time.perf_counter()
    idx = open_index(
        uri,
        name,
        encoder_fingerprint=encoder.fingerprint,
        preset=encoder.preset,
        fields={"category": "keyword"},
    )
    try:
        chunk = 2000
        for s in range(0, n, chunk):
            m = min(chunk, n - s)
            which = rng.integers(0, len(centers), (m, q))
            toks = centers[which] + 0.7 * rng.standard_normal((m, q, d)).astype(np.float32)
            toks /= np.linalg.norm(toks, axis=-1, keepdims=True)
            ids = [f"s{n}-{i:07d}" for i in range(s, s + m)]
            payloads = [{"category": f"c{i % 10}"} for i in range(s, s + m)]
            idx.upsert(ids, toks, payloads)
        idx.flush()
    finally:
        idx.close()  # builds the HNSW / int8 indexes of the version
    logger.info("built %s: %d points in %.0fs", name, n, time.perf_counter() - t0)
    return name


def query_images(encoder: Any, count: int = 32) -> list[bytes]:
    from server.testing import render_images

    out = []
    side = max(64, int(encoder.image_size))
    for im in render_images(count, seed=123, size=(side + 32, side)):
        buf = io.BytesIO()
        im.save(buf, "JPEG", quality=85)
        out.append(buf.getvalue())
    return out


def free_port() -> int:
    from server.testing import free_port as fp

    return fp()


def start_server(
    model: str, work: Path, name: str, batching: bool, args: Any, dtype: str = "float32"
) -> tuple[Any, int]:
    port = free_port()
    cmd = [
        sys.executable,
        "-c",
        "from retrieval.cli import main; main()",
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
        "--refresh-interval-s",
        "0",
        "--log-format",
        "text",
        "--dtype",
        dtype,
    ]
    env = dict(os.environ)
    if args.threads:
        env["CIR_NUM_THREADS"] = str(args.threads)
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
    port: int, images: list[bytes], concurrency: int, duration: float, warmup: float, top_k: int
) -> dict[str, Any]:
    import grpc

    from server._generated.cir.v1 import search_pb2 as pb
    from server._generated.cir.v1 import search_pb2_grpc as pb_grpc

    lat: list[float] = []
    batch_sizes: list[int] = []
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
                req = pb.SearchRequest(
                    reference_image=rnd.choice(images),
                    text=rnd.choice(TEXTS),
                    top_k=top_k,
                    include_payload=False,
                )
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

        await asyncio.gather(*(worker(w) for w in range(concurrency)))
    arr = np.asarray(lat) * 1000.0
    return {
        "requests": len(lat),
        "qps": len(lat) / duration,
        "p50_ms": float(np.percentile(arr, 50)) if len(arr) else float("nan"),
        "p99_ms": float(np.percentile(arr, 99)) if len(arr) else float("nan"),
        "mean_batch": float(np.mean(batch_sizes)) if batch_sizes else 0.0,
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
        "--dtypes", default="float32", help="server compute dtypes, e.g. float32,bfloat16"
    )
    p.add_argument("--work-dir", type=Path, default=ROOT / "data" / "bench-server")
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
    concs = [int(c) for c in args.concurrency.split(",") if c]
    args.work_dir.mkdir(parents=True, exist_ok=True)
    images = query_images(encoder)
    rows: list[dict[str, Any]] = []
    for n in sizes:
        name = build_index(args.work_dir, n, encoder)
        for dtype, batching in [(d, b) for d in args.dtypes.split(",") for b in (True, False)]:
            proc, port = start_server(model, args.work_dir, name, batching, args, dtype)
            try:
                for c in concs:
                    r = asyncio.run(
                        run_load(port, images, c, args.duration, args.warmup, args.top_k)
                    )
                    r.update(gallery=n, batching=batching, concurrency=c, dtype=dtype)
                    rows.append(r)
                    print(
                        f"gallery={n:>7} {dtype} batching={'on ' if batching else 'off'} c={c:>3}  "
                        f"QPS={r['qps']:7.1f}  p50={r['p50_ms']:7.1f} ms  "
                        f"p99={r['p99_ms']:7.1f} ms  batch={r['mean_batch']:.1f}  "
                        f"errors={r['errors'] or 0}",
                        flush=True,
                    )
            finally:
                stop_server(proc)
    print()
    print(
        "| gallery | dtype | batching | concurrency | QPS | p50 ms | p99 ms | mean batch | errors |"
    )
    print("|---:|:---:|:---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['gallery']:,} | {r['dtype']} | {'on' if r['batching'] else 'off'} | "
            f"{r['concurrency']} | "
            f"{r['qps']:.1f} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {r['mean_batch']:.1f} | "
            f"{sum(r['errors'].values()) if r['errors'] else 0} |"
        )
    for n in sizes:
        for dtype in args.dtypes.split(","):
            sel = [r for r in rows if r["gallery"] == n and r["dtype"] == dtype]
            on = {r["concurrency"]: r for r in sel if r["batching"]}
            off = {r["concurrency"]: r for r in sel if not r["batching"]}
            hi = max(concs)
            if hi in on and hi in off and off[hi]["qps"] > 0:
                print(
                    f"gallery {n:,} {dtype}: batching speed-up at concurrency {hi}: "
                    f"{on[hi]['qps'] / off[hi]['qps']:.2f}x"
                )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        meta = {
            "model": model_note,
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
