"""Indexer throughput: images/s end to end and per stage, and the fraction of this machine's
matmul rate the encoder reaches.

    python benchmarks/indexer.py --json /tmp/bench_indexer.json
    python benchmarks/indexer.py --presets sprc-small --n sprc-small=512 --device cuda
    python benchmarks/indexer.py --presets sprc-small --executor inprocess,ray   # side by side

For each preset: generate N synthetic JPEGs (random content, 256x192), build the preset (random
weights; blip2-vitg takes about a minute), count the model's FLOPs per image with
torch.utils.flop_counter.FlopCounterMode, run ``indexer.pipeline.build`` into a temporary Edge
index, and report images/s (end to end = the pipeline, excluding model load and
verification), per-stage seconds and achieved GFLOP/s vs. a torch.mm measurement taken in the
same process (fp32 on CPU, bf16 and fp32 on CUDA).

``--executor inprocess,ray`` builds the same images with each executor in one run and prints
images/s side by side with the ratio to in-process. Ray runs on a local cluster of this
machine's CPUs started once (``--ray-address`` joins another), with ``--encoders`` actors:
the first Ray build pays the cluster's worker start-up ("ray (cold)"), the second finds the
workers up ("ray (warm)"), as every build after the first does on a long-lived cluster.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

logger = logging.getLogger("benchmarks.indexer")

DEFAULT_N = {"sprc-small": 512, "blip2-vitg": 64, "tiny": 256}


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or "cpu"


def matmul_gflops(
    device: str, dtype: str = "float32", n: int = 2048, seconds: float = 3.0
) -> float:
    """Sustained torch.mm rate (GFLOP/s) on square ``n`` matrices."""
    import torch

    dt = getattr(torch, dtype)
    a = torch.randn(n, n, device=device, dtype=dt)
    b = torch.randn(n, n, device=device, dtype=dt)
    for _ in range(2):
        torch.mm(a, b)
    if device == "cuda":
        torch.cuda.synchronize()
    reps = 0
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        torch.mm(a, b)
        reps += 1
        if device == "cuda" and reps % 10 == 0:
            torch.cuda.synchronize()
    if device == "cuda":
        torch.cuda.synchronize()
    dt_s = time.perf_counter() - t0
    return 2.0 * n**3 * reps / dt_s / 1e9


def flops_per_image(enc: Any) -> float:
    """Forward FLOPs of the target encoder for one image (matmuls/convs, as counted by torch)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    px = torch.zeros(1, 3, enc.image_size, enc.image_size)
    # grad mode on (one image): the counter's module hooks need autograd-visible tensors
    with torch.enable_grad(), FlopCounterMode(display=False) as counter:
        enc.model.target_features(enc.model.image_features(px.to(enc.device, enc.dtype)))
    return float(counter.get_total_flops())


def make_images(folder: Path, n: int, size: tuple[int, int] = (256, 192)) -> None:
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        # smooth-ish content (upscaled noise) so JPEG sizes are realistic; noise of its own per
        # image, so every image is a distinct content at any N (a shifted shared base repeated
        # after 768 images, and the duplicates were hashed but never encoded in-process)
        grid = np.random.default_rng(i).integers(0, 256, (size[1] // 8, size[0] // 8, 3))
        arr = grid.astype(np.uint8)
        im = Image.fromarray(arr).resize(size, Image.Resampling.BILINEAR)
        im.save(folder / f"img{i:05d}.jpg", quality=90)


def run_preset(
    preset: str, n: int, args: argparse.Namespace, work: Path, executor: str = "inprocess"
) -> dict[str, Any]:
    from indexer.pipeline import BuildConfig, build
    from retrieval import Encoder

    src = work / f"images-{n}"
    if not src.exists():
        make_images(src, n)
    t0 = time.perf_counter()
    enc = Encoder.from_pretrained(
        preset, device=args.device, dtype=args.dtype, num_threads=args.threads
    )
    load_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    fpi = flops_per_image(enc)
    flop_count_s = time.perf_counter() - t0
    cfg = BuildConfig(
        source=src,
        index=f"edge:{work / ('ix-' + preset + '-' + executor)}",
        name="bench",
        model=preset,
        allow_untrained=True,  # throughput of the presets' architectures: weights do not matter
        batch_size=args.batch_size,
        workers=args.workers,
        device=args.device,
        dtype=args.dtype,
        # the Ray actor's torch threads: --ray-threads, else as many as in-process
        num_threads=(args.ray_threads if executor == "ray" else None)
        or args.threads
        or os.cpu_count(),
        progress=False,
        verify_sample=8,
        fresh=True,
        calibrate=False,  # not part of the throughput
        executor=executor,
        encoders=args.encoders,
        cpus_per_encoder=args.cpus_per_encoder,
        cpus_per_decoder=args.cpus_per_decoder,
    )
    rep = build(cfg, encoder=enc)
    st = rep.stage_seconds
    pipe_ips = rep.images_per_s
    enc_ips = rep.indexed / st["encode"] if st.get("encode") else 0.0
    return {
        "preset": preset,
        "executor": executor,
        "device": rep.device,
        "dtype": rep.dtype,
        "images": n,
        "indexed": rep.indexed,
        "image_size": enc.image_size,
        "tokens": [enc.num_queries, enc.dim],
        "model_build_s": round(load_s, 2),
        "flop_count_s": round(flop_count_s, 2),
        "gflops_per_image": round(fpi / 1e9, 3),
        "images_per_s_end_to_end": round(pipe_ips, 3),
        "images_per_s_encode_stage": round(enc_ips, 3),
        "achieved_gflops_end_to_end": round(pipe_ips * fpi / 1e9, 2),
        "achieved_gflops_encode_stage": round(enc_ips * fpi / 1e9, 2),
        "stage_seconds": {k: round(v, 3) for k, v in st.items()},
        "verified": rep.verified,
        "verification": {k: v for k, v in (rep.verification or {}).items() if k != "failures"},
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--presets", default="sprc-small,blip2-vitg")
    ap.add_argument("--n", action="append", default=[], help="PRESET=N images (repeatable)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    ap.add_argument("--json", type=Path, default=None, help="write results here")
    ap.add_argument(
        "--executor", default="inprocess", help="comma list: inprocess, ray (side by side)"
    )
    ap.add_argument("--encoders", type=int, default=1, help="ray: encoder actors")
    ap.add_argument("--ray-address", default=None, help="ray: join this cluster (default: local)")
    ap.add_argument(
        "--ray-threads", type=int, default=None, help="ray: encoder actor's torch threads"
    )
    ap.add_argument("--cpus-per-encoder", type=float, default=1.0, help="ray: CPUs per actor")
    ap.add_argument("--cpus-per-decoder", type=float, default=1.0, help="ray: CPUs per decode task")
    ap.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="rounds of the executors, alternating (ray: one cold build, then a warm one per "
        "round); the summary gives each round's ratio and their median",
    )
    args = ap.parse_args(argv)
    executors = [e for e in args.executor.split(",") if e]
    logging.basicConfig(level=logging.WARNING)

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    device = "cuda" if args.device in ("auto", "cuda") and torch.cuda.is_available() else "cpu"
    args.device = device
    counts = dict(DEFAULT_N)
    for spec in args.n:
        k, _, v = spec.partition("=")
        counts[k] = int(v)
    peak = {"float32": round(matmul_gflops(device, "float32"), 1)}
    if device == "cuda":
        peak["bfloat16"] = round(matmul_gflops(device, "bfloat16", n=8192), 1)
    machine = {
        "device": torch.cuda.get_device_name(0) if device == "cuda" else cpu_name(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "workers": args.workers,
        "batch_size": args.batch_size,
        "matmul_gflops": peak,
    }
    results = []
    if "ray" in executors:
        machine["ray"] = start_ray(args.ray_address)
    try:
        with tempfile.TemporaryDirectory(prefix="cir-bench-") as tmp:
            for preset in [p for p in args.presets.split(",") if p]:
                for rnd in range(max(1, args.repeat)):
                    for executor in executors:
                        runs = ["cold", "warm"] if executor == "ray" and rnd == 0 else ["warm"]
                        for tag in runs if executor == "ray" else [""]:
                            r = run_preset(
                                preset, counts.get(preset, 64), args, Path(tmp), executor
                            )
                            r["executor"] = f"{executor} ({tag})" if tag else executor
                            r["round"] = rnd
                            add_fractions(r, peak)
                            results.append(r)
                            print(json.dumps(r), file=sys.stderr, flush=True)
    finally:
        if "ray" in executors:
            import ray

            ray.shutdown()
    print_table(machine, results)
    if len(executors) > 1:
        print_executors(results)
    if args.json:
        args.json.write_text(json.dumps({"machine": machine, "results": results}, indent=1))
    return 0


def start_ray(address: str | None) -> dict[str, Any]:
    """A local Ray cluster of this machine's CPUs (or join ``address``), started before any
    timing; what it offers."""
    import ray

    if address:
        ray.init(address=address, logging_level=logging.WARNING)
    else:
        for attempt in (1, 2, 3):  # a loaded machine can miss Ray's 30 s raylet start-up wait
            try:
                ray.init(
                    num_cpus=os.cpu_count(),
                    include_dashboard=False,
                    object_store_memory=1024**3,
                    logging_level=logging.WARNING,
                )
                break
            except Exception:
                ray.shutdown()
                if attempt == 3:
                    raise
    res = ray.cluster_resources()
    return {"version": ray.__version__, "cpus": res.get("CPU"), "gpus": res.get("GPU", 0)}


def add_fractions(r: dict[str, Any], peak: dict[str, float]) -> None:
    ref = peak["bfloat16" if r["dtype"] == "bfloat16" and "bfloat16" in peak else "float32"]
    r["matmul_gflops_ref"] = ref
    r["fraction_of_matmul_end_to_end"] = round(r["achieved_gflops_end_to_end"] / ref, 4)
    r["fraction_of_matmul_encode_stage"] = round(r["achieved_gflops_encode_stage"] / ref, 4)


def print_executors(results: list[dict[str, Any]]) -> None:
    """Images/s per executor beside in-process (same preset, same run)."""
    print()
    print(
        "| preset | round | executor | images | img/s end-to-end | ratio to inprocess "
        "(same round) | pipeline s |"
    )
    print("|---|---|---|---|---|---|---|")
    base = {(r["preset"], r["round"]): r for r in results if r["executor"] == "inprocess"}
    ratios: dict[tuple[str, str], list[float]] = {}
    for r in results:
        b = base.get((r["preset"], r["round"]))
        ratio = "-"
        if b and b["images_per_s_end_to_end"]:
            x = r["images_per_s_end_to_end"] / b["images_per_s_end_to_end"]
            ratios.setdefault((r["preset"], r["executor"]), []).append(x)
            ratio = f"{x:.2f}"
        print(
            f"| {r['preset']} | {r['round']} | {r['executor']} | {r['indexed']} | "
            f"{r['images_per_s_end_to_end']} | {ratio} | {r['stage_seconds'].get('pipeline', 0):.2f} |"
        )
    rounds = {r["round"] for r in results}
    if len(rounds) > 1:
        print()
        print("| preset | executor | rounds | median ratio | min | max |")
        print("|---|---|---|---|---|---|")
        for (preset, ex), xs in ratios.items():
            if ex == "inprocess":
                continue
            print(
                f"| {preset} | {ex} | {len(xs)} | {statistics.median(xs):.2f} | "
                f"{min(xs):.2f} | {max(xs):.2f} |"
            )


def print_table(machine: dict[str, Any], results: list[dict[str, Any]]) -> None:
    print(f"machine: {machine}")
    head = (
        "| preset | executor | device/dtype | images | GFLOP/img | img/s end-to-end | img/s encode | "
        "% of matmul (e2e / encode) | decode cpu s | encode s | write s | pipeline s |"
    )
    print(head)
    print("|---" * 12 + "|")
    for r in results:
        st = r["stage_seconds"]
        dec = st.get("worker_read", 0) + st.get("worker_decode", 0) + st.get("worker_preprocess", 0)
        print(
            f"| {r['preset']} | {r['executor']} | {r['device']}/{r['dtype']} | {r['indexed']} | "
            f"{r['gflops_per_image']} | {r['images_per_s_end_to_end']} | "
            f"{r['images_per_s_encode_stage']} | "
            f"{100 * r['fraction_of_matmul_end_to_end']:.1f}% / "
            f"{100 * r['fraction_of_matmul_encode_stage']:.1f}% | {dec:.2f} | "
            f"{st.get('encode', 0):.2f} | {st.get('write', 0):.2f} | {st.get('pipeline', 0):.2f} |"
        )


if __name__ == "__main__":
    raise SystemExit(main())
