"""Where the server's CPU goes under load: CPU seconds per query of the `cir serve` process and of
the load generator, and the server's CPU use (% of one core), batching on vs off, in one run.

    python benchmarks/server_cpu.py --size 100000 --dtype bfloat16 --concurrency 32

Same servers, galleries (`--gallery real` of benchmarks/server.py, built or reused under
``data/bench-server``) and closed-loop load as benchmarks/server.py. A batched server that does
not reach 200 % on this 2-core machine is held up by something other than compute (the GIL:
gRPC handling, decoding, the Edge search and the model's Python all take it).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _bench_server() -> Any:
    spec = importlib.util.spec_from_file_location("bench_server", ROOT / "benchmarks" / "server.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules["bench_server"] = mod  # its render pool pickles functions by module name
    spec.loader.exec_module(mod)
    return mod


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="checkpoint folder (default: the demo model)")
    ap.add_argument("--size", type=int, default=100000, help="gallery size")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--duration", type=float, default=8.0, help="measured seconds per mode")
    ap.add_argument(
        "--min-requests",
        type=int,
        default=0,
        help="measure each mode until at least this many requests completed (and --duration "
        "passed): on a busy machine a fixed window can end before the first answer",
    )
    ap.add_argument(
        "--max-seconds",
        type=float,
        default=600.0,
        help="give up on --min-requests after this many measured seconds per mode",
    )
    ap.add_argument("--max-batch", type=int, default=32)
    ap.add_argument("--max-wait-ms", type=float, default=3.0)
    ap.add_argument("--threads", type=int, default=1, help="server torch threads")
    ap.add_argument("--batch-threads", type=int, default=2, help="torch threads for batches")
    ap.add_argument("--work-dir", type=Path, default=ROOT / "data" / "bench-server")
    ap.add_argument("--data", type=Path, default=ROOT / "data" / "shapes")
    ap.add_argument(
        "--search-process",
        default="on,off",
        help="index searched in a child process (the server's default) and/or in-process",
    )
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    from retrieval.encoder import Encoder

    bs = _bench_server()
    model, note = bs.pick_model(args.model)
    encoder = Encoder.from_pretrained(model)
    from retrieval.rerank import stores_patches

    # the model folder's re-ranker (served by default) reads each point's stored ViT tokens
    name = bs.build_real_index(
        args.work_dir, args.size, encoder, patches=stores_patches(model, encoder.fingerprint)
    )
    queries = bs.shapes_queries(args.data)
    opts = SimpleNamespace(
        max_batch=args.max_batch,
        max_wait_ms=args.max_wait_ms,
        threads=args.threads,
        batch_threads=args.batch_threads,
    )
    me = psutil.Process()
    rows = []
    for search_process in [v.strip() == "on" for v in args.search_process.split(",")]:
        for batching in (True, False):
            opts.search_process = search_process
            rows.append(_measure(bs, model, args, name, queries, batching, opts, me))
    print(f"model: {note}; gallery {args.size:,}; {args.dtype}; concurrency {args.concurrency}")
    print(
        "| search process | batching | QPS | mean batch | server CPU % | of it search process % "
        "| server CPU ms/query | client CPU % |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {'on' if r['search_process'] else 'off'} | {'on' if r['batching'] else 'off'} "
            f"| {r['qps']} | {r['mean_batch']} | {r['server_cpu_pct']} | "
            f"{r['search_process_cpu_pct']} | {r['server_cpu_ms_per_query']} | "
            f"{r['client_cpu_pct']} |"
        )
    for i in range(0, len(rows), 2):
        on, off = rows[i], rows[i + 1]
        print(
            f"search process {'on' if on['search_process'] else 'off'}: batching "
            f"{on['qps'] / max(off['qps'], 1e-9):.2f}x the QPS, "
            f"{off['server_cpu_ms_per_query'] / max(on['server_cpu_ms_per_query'], 1e-9):.2f}x "
            f"less CPU per query, {on['server_cpu_pct'] / max(off['server_cpu_pct'], 1):.2f}x "
            "the CPU use"
        )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


def _cpu(procs: list[psutil.Process]) -> float:
    total = 0.0
    for p in procs:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return total


def _measure(
    bs: Any,
    model: str,
    args: argparse.Namespace,
    name: str,
    queries: list[tuple[bytes, str]],
    batching: bool,
    opts: SimpleNamespace,
    me: psutil.Process,
) -> dict[str, Any]:
    """One server (batching on or off), warmed up, then ``args.duration`` s of closed-loop load:
    QPS and the CPU of the server (its search process included) and of the load generator."""
    proc, port = bs.start_server(model, args.work_dir, name, batching, opts, args.dtype)
    try:
        server = psutil.Process(proc.pid)
        run = bs.run_load
        asyncio.run(run(port, queries, args.concurrency, 2.0, 1.0, 10))  # warm up
        kids = server.children(recursive=True)  # the search process, when there is one
        s0, k0 = _cpu([server]), _cpu(kids)
        c0, t0 = _cpu([me]), time.perf_counter()
        windows = [asyncio.run(run(port, queries, args.concurrency, args.duration, 0.0, 10))]
        # more windows until enough requests completed: what is measured is never an empty
        # window on a loaded machine (the QPS is then requests / measured time, as before)
        while (
            sum(w["requests"] for w in windows) < args.min_requests
            and time.perf_counter() - t0 < args.max_seconds
        ):
            windows.append(asyncio.run(run(port, queries, args.concurrency, 1.0, 0.0, 10)))
        s1, k1 = _cpu([server]), _cpu(kids)
        c1, t1 = _cpu([me]), time.perf_counter()
    finally:
        bs.stop_server(proc)
    r = _merge(windows, args.duration + 1.0 * (len(windows) - 1))
    n = max(1, r["requests"])
    srv = s1 - s0 + k1 - k0
    cli = c1 - c0
    return {
        "search_process": bool(opts.search_process),
        "child_processes": len(kids),
        "batching": batching,
        "requests": r["requests"],
        "qps": round(r["qps"], 1),
        "mean_batch": round(r["mean_batch"], 1),
        "server_cpu_pct": round(100 * srv / (t1 - t0)),
        "search_process_cpu_pct": round(100 * (k1 - k0) / (t1 - t0)),
        "server_cpu_ms_per_query": round(1000 * srv / n, 2),
        "client_cpu_pct": round(100 * cli / (t1 - t0)),
        "client_cpu_ms_per_query": round(1000 * cli / n, 2),
        "errors": r["errors"],
        "stage_ms": r["stage_ms"],  # where a request's latency goes (server's own timings)
    }


def _merge(windows: list[dict[str, Any]], seconds: float) -> dict[str, Any]:
    """One result of several consecutive load windows: requests and errors summed, the mean
    batch and stage times weighted by each window's requests, QPS over ``seconds``."""
    n = sum(w["requests"] for w in windows)
    errors: dict[str, int] = {}
    for w in windows:
        for k, v in w["errors"].items():
            errors[k] = errors.get(k, 0) + v
    stages: dict[str, float] = {}
    for w in windows:
        for k, v in w["stage_ms"].items():
            stages[k] = stages.get(k, 0.0) + v * w["requests"] / max(n, 1)
    return {
        "requests": n,
        "qps": n / seconds,
        "mean_batch": sum(w["mean_batch"] * w["requests"] for w in windows) / max(n, 1),
        "errors": errors,
        "stage_ms": {k: round(v, 2) for k, v in stages.items()},
    }


if __name__ == "__main__":
    main()
