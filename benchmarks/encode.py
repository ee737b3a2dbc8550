"""Encoder benchmark: composed-query and target-encoding latency/throughput, and the fraction of
this machine's matmul rate (measured in the same run) that the model reaches.

    python benchmarks/encode.py --json /tmp/encode_bench.json
    python benchmarks/encode.py --presets sprc-small --dtypes float32 --batches 1,32

For each preset (random, seeded weights: the same as ``build_model``) x dtype x batch size:

* ``target``: pixels [B, 3, S, S] -> ViT -> query-only Q-Former -> [B, 32, 256]
  (``Encoder.encode_target_pixels``).
* ``query``: reference pixels + captions -> tokenizer -> ViT -> fusion pass -> compose -> [B, 256]
  (the work of ``Encoder.encode_queries`` after image decoding/preprocessing).

Model FLOPs per image are counted with ``torch.utils.flop_counter.FlopCounterMode`` (matmuls,
convolutions and attention; elementwise ops are not counted). torch.mm GFLOP/s of the same
dtype (2048^2 matrices) is sampled at the start, before every preset/dtype block ("now") and at
the end; ``% of best`` = FLOPs/image x images/s / the best sample of the run (the machine is
shared, so the least disturbed sample is the closest to what it can do). When a batch would take longer than ``--cell-budget`` seconds
(blip2-vitg on a few CPU cores), a smaller batch is run instead and the row says so.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import logging
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from retrieval.config import get_config  # noqa: E402
from retrieval.encoder import Encoder  # noqa: E402
from retrieval.modeling_sprc import SPRCModel  # noqa: E402
from retrieval.tokenization import QFormerTokenizer  # noqa: E402

logger = logging.getLogger("bench.encode")

CAPTIONS = [
    "make the circle red and move it to the left",
    "add a small blue star",
    "remove the green squares",
    "is bigger and has long sleeves",
]
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def random_model(preset: str, seed: int = 0) -> SPRCModel:
    """``build_model(preset, seed)`` without transformers' own (discarded) random init: build on
    the meta device, allocate, then the same seeded LAVIS-style init (identical weights)."""
    cfg = get_config(preset)
    with torch.device("meta"):
        model = SPRCModel(cfg)
    model = model.to_empty(device="cpu")
    model.init_weights(torch.Generator().manual_seed(seed))
    return model


def matmul_gflops(dtype: torch.dtype, n: int = 2048, seconds: float = 2.0) -> float:
    """Best-of-several torch.mm rate in GFLOP/s for [n, n] x [n, n]."""
    a = torch.randn(n, n).to(dtype)
    b = torch.randn(n, n).to(dtype)
    torch.mm(a, b)  # warm-up (oneDNN kernel selection)
    best, t_end = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < t_end:
        t0 = time.perf_counter()
        torch.mm(a, b)
        dt = time.perf_counter() - t0
        best = max(best, 2 * n**3 / dt / 1e9)
    return best


def count_flops(fn: Callable[[], Any]) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return int(counter.get_total_flops())


def workload(
    enc: Encoder, kind: str, b: int, mode: Callable[[], Any] = torch.inference_mode
) -> Callable[[], Any]:
    """One call of the ``target`` or ``query`` path on a batch of ``b`` random images.
    ``mode``: inference_mode for timing; autograd on for FLOP counting (FlopCounterMode's
    module tracker fails on inference/no-grad tensors)."""
    cfg, m = enc.config, enc.model
    g = torch.Generator().manual_seed(b)
    px = torch.randn(b, 3, cfg.image_size, cfg.image_size, generator=g).to(enc.dtype)
    texts = [CAPTIONS[i % len(CAPTIONS)] for i in range(b)]

    def run() -> Any:
        with mode():
            img = m.image_features(px)
            if kind == "target":  # as Encoder.encode_target_pixels
                return m.target_features(img).detach().float().numpy()
            t = enc.tokenizer(texts)
            return m.composed_query(img, t.input_ids, t.attention_mask).detach().float().numpy()

    return run


def timed(
    fn: Callable[[], Any], reps: int, min_time: float = 3.0, max_time: float = 60.0
) -> list[float]:
    """Seconds per call: at least ``reps`` calls and ``min_time`` seconds (the machine is
    shared: more samples for fast models), stopping after ``max_time`` (at least one call)."""
    out: list[float] = []
    start = time.perf_counter()
    while True:
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
        elapsed = time.perf_counter() - start
        if (len(out) >= reps and elapsed >= min_time) or elapsed >= max_time or len(out) >= 200:
            break
    return out


def bench_preset(
    preset: str,
    dtypes: list[str],
    batches: list[int],
    reps1: int,
    cell_budget: float,
    peaks: dict[str, list[float]],
) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    model = random_model(preset)
    build_s = time.perf_counter() - t0
    cfg = model.config
    tok = QFormerTokenizer.builtin(max_length=cfg.max_text_len)
    n_params = sum(p.numel() for p in model.parameters())
    logger.info("%s: %.1fM parameters, built in %.1fs", preset, n_params / 1e6, build_s)
    flops: dict[str, int] = {}
    for dtype in dtypes:
        # weights_digest given: hashing 1B parameters is not what is measured here
        enc = Encoder(model, tok, dtype=_DTYPES[dtype], weights_digest="benchmark")
        # matmul rate right before this block: the shared machine's load changes over minutes
        now = matmul_gflops(_DTYPES[dtype])
        peaks[dtype].append(now)

        for kind in ("target", "query"):
            if kind not in flops:
                flops[kind] = count_flops(workload(enc, kind, 1, mode=contextlib.nullcontext))
            make = functools.partial(workload, enc, kind)
            make(1)()  # warm-up
            lat1 = timed(make(1), reps1, max_time=cell_budget / 2)
            per_img = min(lat1)
            for b in batches:
                run_b, note = b, ""
                if b > 1 and per_img * b > cell_budget:
                    run_b = max(1, min(b, int(cell_budget / per_img)))
                    run_b = 1 << (run_b.bit_length() - 1)  # power of two
                    note = f"batch {b} would take ~{per_img * b:.0f}s: ran {run_b}"
                if run_b == 1:
                    times = lat1
                else:
                    times = timed(make(run_b), reps1, max_time=cell_budget / 2)
                best = min(times)
                ips = run_b / best
                achieved = flops[kind] * ips / 1e9
                row = {
                    "preset": preset,
                    "params_m": round(n_params / 1e6, 1),
                    "dtype": dtype,
                    "kind": kind,
                    "batch": b,
                    "ran_batch": run_b,
                    "reps": len(times),
                    "latency_ms": round(best * 1000, 2),
                    "latency_ms_median": round(sorted(times)[len(times) // 2] * 1000, 2),
                    "images_per_s": round(ips, 3),
                    "gflop_per_image": round(flops[kind] / 1e9, 3),
                    "achieved_gflops": round(achieved, 2),
                    "matmul_now_gflops": round(now, 1),
                    "peak_gflops": None,  # filled in at the end: best matmul rate of the run
                    "note": note,
                }
                rows.append(row)
                logger.info("%s", row)
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    head = (
        "| preset | dtype | path | batch | reps | latency (ms/batch) | images/s | GFLOP/img "
        "| achieved GFLOP/s | matmul now / best | % of best | note |"
    )
    lines = [head, "|" + "---|" * 12]
    for r in rows:
        batch = (
            str(r["batch"])
            if r["ran_batch"] == r["batch"]
            else f"{r['ran_batch']} (of {r['batch']})"
        )
        lines.append(
            f"| {r['preset']} | {r['dtype']} | {r['kind']} | {batch} | {r['reps']} | {r['latency_ms']:.1f} "
            f"| {r['images_per_s']:.2f} | {r['gflop_per_image']:.2f} | {r['achieved_gflops']:.1f} "
            f"| {r['matmul_now_gflops']:.0f} / {r['peak_gflops']:.0f} | {r['pct_peak']:.1f}% | {r['note']} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--presets", default="sprc-small,blip2-vitg", help="comma-separated presets")
    ap.add_argument("--dtypes", default="float32,bfloat16", help="float32,bfloat16")
    ap.add_argument("--batches", default="1,32", help="batch sizes")
    ap.add_argument(
        "--reps", type=int, default=5, help="timed repetitions at batch 1 (best is reported)"
    )
    ap.add_argument("--cell-budget", type=float, default=120.0, help="max seconds for one batch")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    ap.add_argument("--json", type=Path, default=None, help="write rows + machine info here")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    dtypes = [d for d in args.dtypes.split(",") if d]
    for d in dtypes:
        if d not in _DTYPES:
            ap.error(f"unknown dtype {d!r}")
    batches = [int(b) for b in args.batches.split(",") if b]
    peaks = {d: [matmul_gflops(_DTYPES[d])] for d in dtypes}
    logger.info("torch.mm GFLOP/s: %s", peaks)
    t0 = time.perf_counter()
    rows: list[dict[str, Any]] = []
    for preset in [p for p in args.presets.split(",") if p]:
        rows.extend(bench_preset(preset, dtypes, batches, args.reps, args.cell_budget, peaks))
    for d in dtypes:
        peaks[d].append(matmul_gflops(_DTYPES[d]))
    # "peak" = the best torch.mm rate seen in this run (the machine is shared: the least
    # disturbed sample is the closest to what it can do); every row is a fraction of it
    best = {d: max(v) for d, v in peaks.items()}
    for r in rows:
        r["peak_gflops"] = round(best[r["dtype"]], 1)
        r["pct_peak"] = round(100 * r["achieved_gflops"] / best[r["dtype"]], 1)
    info = {
        "machine": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "matmul_peak_gflops": best,
        "matmul_samples_gflops": {d: [round(x, 1) for x in v] for d, v in peaks.items()},
        "load_avg": os.getloadavg(),
        "wall_s": round(time.perf_counter() - t0, 1),
        "command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
    }
    print(table(rows))
    print(json.dumps({k: v for k, v in info.items() if k != "command"}))
    if args.json:
        args.json.write_text(json.dumps({"info": info, "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
