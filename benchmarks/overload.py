"""Overload benchmark: goodput, rejection latency and admitted-call latency of `cir serve` at
1x, 5x and 10x the capacity it measures itself, in one run.

    python benchmarks/overload.py --duration 8 --json runs/bench_overload.json

1. Capacity: a closed loop of ``--capacity-concurrency`` clients (default 64) for
   ``--duration`` s: OK/s is the capacity, and the OK p50 the latency at capacity.
2. For each factor in ``--factors`` (default 1,5,10): an open loop (Poisson arrivals at factor
   x capacity, each call with a ``--deadline`` s deadline, no retries: a client that is told to
   come back is a new arrival) for ``--duration`` s. Reported: goodput (OK/s and % of
   capacity), RESOURCE_EXHAUSTED latency from the client's send (p50/p99), the p50/p99 of the
   admitted (OK) calls and its ratio to the p50 at capacity, and every status code seen.

Model: models/sprc-shapes when present, else the `tiny` preset (random weights; the output
says which). Gallery: ``--gallery-size`` clustered synthetic token sets in an Edge index under
``--work-dir`` (built once, reused), searched in the server's search process. Queries: random
reference images (JPEG, decoded and encoded on the server each time) + a text. The client is a
grpc.aio channel in this process; the server a `cir serve` subprocess on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import logging
import os
import platform
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

logger = logging.getLogger("bench.overload")

DEMO_MODEL = ROOT / "models" / "sprc-shapes"


def _bench_server() -> Any:
    """benchmarks/server.py (its gallery and query helpers), loaded by path."""
    spec = importlib.util.spec_from_file_location("bench_server", ROOT / "benchmarks" / "server.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def start_server(model: str, work: Path, name: str, args: Any) -> tuple[Any, int]:
    from server.client import CIRClient
    from tests.helpers import free_port

    port = free_port()
    cmd = [
        sys.executable, "-c", "from cir.cli import main; main()", "--log-level", "WARNING",
        "serve", "--model", model, "--index", f"edge:{work}", "--name", name,
        "--port", str(port), "--metrics-port", "0", "--max-batch", str(args.max_batch),
        "--max-wait-ms", str(args.max_wait_ms), "--refresh-interval-s", "0",
        "--log-format", "text", "--rerank", str(args.rerank),
    ]  # fmt: skip
    env = dict(os.environ)
    if not Path(model).is_dir():
        env["CIR_ALLOW_UNTRAINED"] = "1"  # a preset: random weights, said in the output
    if args.threads:
        env["CIR_NUM_THREADS"] = str(args.threads)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    with CIRClient(f"127.0.0.1:{port}", timeout=5) as c:
        deadline = time.monotonic() + 180
        while True:  # short waits, so a server that exits at start-up is reported at once
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                err = proc.stderr.read().decode() if proc.stderr else ""
                raise RuntimeError(f"server did not start: {err[-2000:]}")
            try:
                c.wait_ready(2)
                break
            except Exception:
                continue
    return proc, port


def _pct(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values) * 1000.0, q)) if values else float("nan")


async def _call(
    stub: Any, pb: Any, query: tuple[bytes, str], deadline: float
) -> tuple[str, float, float]:
    """(code, seconds from the send, the server's retry-after-ms or 0)."""
    import grpc

    image, text = query
    req = pb.SearchRequest(reference_image=image, text=text, top_k=10, include_payload=False)
    t0 = time.perf_counter()
    retry = 0.0
    try:
        await stub.Search(req, timeout=deadline)
        code = "OK"
    except grpc.aio.AioRpcError as exc:
        code = exc.code().name
        hint = [float(v) for k, v in (exc.trailing_metadata() or ()) if k == "retry-after-ms"]
        if code == "RESOURCE_EXHAUSTED" and not hint:
            code = "RESOURCE_EXHAUSTED(no retry-after)"
        retry = hint[0] if hint else 0.0
    return code, time.perf_counter() - t0, retry


async def closed_loop(
    port: int, queries: list[tuple[bytes, str]], concurrency: int, duration: float, args: Any
) -> dict[str, Any]:
    """``concurrency`` clients, each sending its next query when the last one returns (after
    the server's retry-after-ms, jittered, when refused: as CIRClient does; clients that retry
    at once measure their own retry storm, not the server's capacity)."""
    import grpc

    from server._generated.cir.v1 import search_pb2 as pb
    from server._generated.cir.v1 import search_pb2_grpc as pb_grpc

    ok: list[float] = []
    codes: Counter[str] = Counter()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
        stub = pb_grpc.SearchServiceStub(ch)
        t_measure = time.perf_counter() + args.warmup
        t_end = t_measure + duration

        async def worker(w: int) -> None:
            rnd = random.Random(w)
            while time.perf_counter() < t_end:
                code, lat, retry = await _call(stub, pb, rnd.choice(queries), 60.0)
                if t_measure <= time.perf_counter() <= t_end:
                    codes[code] += 1
                    if code == "OK":
                        ok.append(lat)
                if retry:
                    await asyncio.sleep(retry / 1000.0 * rnd.uniform(0.5, 1.5))

        await asyncio.gather(*(worker(w) for w in range(concurrency)))
    return {"ok_per_s": len(ok) / duration, "p50_ms": _pct(ok, 50), "p99_ms": _pct(ok, 99),
            "codes": dict(codes)}  # fmt: skip


async def open_loop(
    port: int, queries: list[tuple[bytes, str]], rate: float, duration: float, args: Any
) -> dict[str, Any]:
    """Poisson arrivals at ``rate``/s for ``duration`` s (after a warm-up), each call with the
    ``--deadline``; the answers of the calls sent in the measured window are reported."""
    import grpc

    from server._generated.cir.v1 import search_pb2 as pb
    from server._generated.cir.v1 import search_pb2_grpc as pb_grpc

    results: list[tuple[str, float, float]] = []
    rnd = random.Random(7)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
        stub = pb_grpc.SearchServiceStub(ch)
        tasks: set[asyncio.Task[None]] = set()
        t_start = time.perf_counter()
        t_measure = t_start + args.warmup
        t_end = t_measure + duration

        async def one(measured: bool) -> None:
            r = await _call(stub, pb, rnd.choice(queries), args.deadline)
            if measured:
                results.append(r)

        nxt = t_start
        sent = 0
        while True:
            now = time.perf_counter()
            if now >= t_end:
                break
            while nxt <= now:  # catch up when the loop was late: the offered rate holds
                t = asyncio.get_running_loop().create_task(one(t_measure <= nxt < t_end))
                tasks.add(t)
                t.add_done_callback(tasks.discard)
                sent += t_measure <= nxt < t_end
                nxt += rnd.expovariate(rate)
            await asyncio.sleep(max(0.0, min(nxt - time.perf_counter(), 0.01)))
        if tasks:
            await asyncio.wait(list(tasks), timeout=args.deadline + 5)
    codes = Counter(c for c, _, _ in results)
    ok = [t for c, t, _ in results if c == "OK"]
    rejected = [t for c, t, _ in results if c.startswith("RESOURCE_EXHAUSTED")]
    return {
        "offered_per_s": sent / duration,
        "ok_per_s": len(ok) / duration,
        "ok_p50_ms": _pct(ok, 50),
        "ok_p99_ms": _pct(ok, 99),
        "rejected_p50_ms": _pct(rejected, 50),
        "rejected_p99_ms": _pct(rejected, 99),
        "codes": dict(codes),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="checkpoint folder or preset (default: demo)")
    p.add_argument("--gallery-size", type=int, default=2000)
    p.add_argument("--capacity-concurrency", type=int, default=64)
    p.add_argument("--factors", default="1,5,10", help="offered load, x capacity")
    p.add_argument("--duration", type=float, default=8.0, help="measured seconds per phase")
    p.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds per phase")
    p.add_argument("--deadline", type=float, default=2.0, help="deadline of each call (s)")
    p.add_argument("--max-batch", type=int, default=16)
    p.add_argument("--max-wait-ms", type=float, default=2.0)
    p.add_argument("--threads", type=int, default=0, help="server torch threads (0: default)")
    p.add_argument("--rerank", type=int, default=0,
                   help="the server's default rerank_k (0: first stage only; the synthetic "
                        "gallery stores no ViT tokens for the demo re-ranker)")  # fmt: skip
    p.add_argument("--work-dir", type=Path, default=ROOT / "data" / "bench-overload")
    p.add_argument("--json", type=Path, default=None, help="write all results here")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    import torch

    from retrieval.encoder import Encoder

    torch.set_num_threads(1)
    bs = _bench_server()
    if args.model:
        model, note = args.model, f"{args.model} (given)"
    elif DEMO_MODEL.is_dir():
        model, note = str(DEMO_MODEL), "demo model models/sprc-shapes"
    else:
        model, note = "tiny", "tiny preset with RANDOM weights (models/sprc-shapes not found)"
    encoder = Encoder.from_pretrained(model)
    args.work_dir.mkdir(parents=True, exist_ok=True)
    name = bs.build_index(args.work_dir, args.gallery_size, encoder)
    queries = bs.query_images(encoder)
    load = os.getloadavg()
    print(f"model: {note}; gallery {args.gallery_size:,} synthetic; {os.cpu_count()} CPUs; "
          f"load average before the run {load[0]:.2f}", flush=True)  # fmt: skip
    proc, port = start_server(model, args.work_dir, name, args)
    try:
        cap = asyncio.run(
            closed_loop(port, queries, args.capacity_concurrency, args.duration, args)
        )
        capacity = cap["ok_per_s"]
        print(f"capacity (closed loop, {args.capacity_concurrency} in flight): "
              f"{capacity:.1f} OK/s, p50 {cap['p50_ms']:.0f} ms, p99 {cap['p99_ms']:.0f} ms, "
              f"codes {cap['codes']}", flush=True)  # fmt: skip
        rows = []
        for f in [float(x) for x in args.factors.split(",") if x]:
            r = asyncio.run(open_loop(port, queries, f * capacity, args.duration, args))
            r["factor"] = f
            r["goodput_pct"] = 100.0 * r["ok_per_s"] / capacity if capacity else float("nan")
            r["ok_p50_ratio"] = r["ok_p50_ms"] / cap["p50_ms"] if cap["p50_ms"] else float("nan")
            rows.append(r)
            print(f"{f:g}x: offered {r['offered_per_s']:.0f}/s  goodput {r['ok_per_s']:.1f} OK/s "
                  f"({r['goodput_pct']:.0f} %)  rejected p50/p99 {r['rejected_p50_ms']:.1f}/"
                  f"{r['rejected_p99_ms']:.1f} ms  OK p50/p99 {r['ok_p50_ms']:.0f}/"
                  f"{r['ok_p99_ms']:.0f} ms ({r['ok_p50_ratio']:.2f}x)  codes {r['codes']}",
                  flush=True)  # fmt: skip
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
    print()
    print(f"capacity: {capacity:.1f} OK/s at {args.capacity_concurrency} in flight, "
          f"OK p50 {cap['p50_ms']:.0f} ms")  # fmt: skip
    print("| load | offered/s | goodput OK/s | % of capacity | RESOURCE_EXHAUSTED p50 / p99 ms | "
          "OK p50 / p99 ms | OK p50 / p50 at capacity | codes |")  # fmt: skip
    print("|---:|---:|---:|---:|---:|---:|---:|:---|")
    for r in rows:
        codes = ", ".join(f"{k} {v}" for k, v in sorted(r["codes"].items()))
        print(f"| {r['factor']:g}x | {r['offered_per_s']:.0f} | {r['ok_per_s']:.1f} | "
              f"{r['goodput_pct']:.0f} % | {r['rejected_p50_ms']:.1f} / {r['rejected_p99_ms']:.1f} "
              f"| {r['ok_p50_ms']:.0f} / {r['ok_p99_ms']:.0f} | {r['ok_p50_ratio']:.2f} | "
              f"{codes} |")  # fmt: skip
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        meta = {"model": note, "cpus": os.cpu_count(), "platform": platform.platform(),
                "loadavg_before": load, "args": {k: str(v) for k, v in vars(args).items()}}  # fmt: skip
        args.json.write_text(json.dumps({"meta": meta, "capacity": cap, "rows": rows}, indent=2))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
