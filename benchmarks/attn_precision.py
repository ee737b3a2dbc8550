"""Attention kernel x precision, side by side in one run: a training step and a batch-1 query.

    python benchmarks/attn_precision.py --json runs/attn_precision.json
    python benchmarks/attn_precision.py --preset sprc-small --batch 64 --reps 8

For each (attention implementation, autocast precision) the same model (random, seeded weights
of ``--preset``) runs, in rounds that alternate the variants so that a noisy shared machine
disturbs them alike:

* ``train step``: one SPRC training step as ``cir train --reference-negatives --caption-loss``
  does it (forward with reference negatives and the scene-caption ITC, backward, AdamW) on a
  batch of ``--batch`` random images and captions;
* ``query b=1``: one composed query (ViT on the reference, fusion pass, compose) under
  ``torch.inference_mode``, as the server's encoder runs it for a lone request.

The table gives the median seconds / milliseconds and the speed-up over ``sdpa`` + ``fp32``
(the transformers default). Why it matters: with 10-40 tokens per sequence, SDPA's fused CPU
kernel (and above all its backward) costs more than plain matmul + softmax.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from retrieval.config import get_config  # noqa: E402
from retrieval.encoder import build_model, set_threads  # noqa: E402

VARIANTS = [("sdpa", "fp32"), ("eager", "fp32"), ("sdpa", "bf16"), ("eager", "bf16")]


def _inputs(cfg: Any, b: int, text_len: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    s = cfg.image_size
    ids = torch.randint(5, cfg.vocab_size, (b, text_len), generator=gen)
    ids[:, 0] = 1
    return {
        "ref": torch.randn(b, 3, s, s, generator=gen),
        "tgt": torch.randn(b, 3, s, s, generator=gen),
        "ids": ids,
        "mask": torch.ones(b, text_len, dtype=torch.long),
        "cap_ids": torch.randint(5, cfg.vocab_size, (2 * b, 2 * text_len), generator=gen),
        "cap_mask": torch.ones(2 * b, 2 * text_len, dtype=torch.long),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="sprc-small")
    ap.add_argument("--batch", type=int, default=64, help="training batch (triplets)")
    ap.add_argument("--text-len", type=int, default=16, help="caption tokens")
    ap.add_argument("--reps", type=int, default=6, help="rounds (each runs every variant)")
    ap.add_argument("--query-reps", type=int, default=50, help="batch-1 queries per round")
    ap.add_argument("--threads", type=int, default=2, help="torch threads")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)

    set_threads(args.threads)
    cfg = get_config(args.preset)
    gen = torch.Generator().manual_seed(0)
    x = _inputs(cfg, args.batch, args.text_len, gen)
    q1 = {k: v[:1] for k, v in x.items()}
    model = build_model(cfg, seed=0).float()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    pos = torch.eye(2 * args.batch, dtype=torch.bool)

    def train_step(bf16: bool) -> None:
        model.train()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = model(
                x["ref"],
                x["tgt"],
                x["ids"],
                x["mask"],
                reference_negatives=True,
                captions=(x["cap_ids"], x["cap_mask"], pos),
                caption_weight=1.0,
            )
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()

    def query(bf16: bool) -> None:
        model.eval()
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            model.composed_query(model.image_features(q1["ref"]), q1["ids"], q1["mask"])

    times: dict[tuple[str, str], dict[str, list[float]]] = {
        v: {"train": [], "query": []} for v in VARIANTS
    }
    for v in VARIANTS:  # warm-up: first calls allocate and pick kernels
        model.set_attn_implementation(v[0])
        train_step(v[1] == "bf16")
        query(v[1] == "bf16")
    for r in range(args.reps):
        for v in VARIANTS if r % 2 == 0 else VARIANTS[::-1]:
            model.set_attn_implementation(v[0])
            bf16 = v[1] == "bf16"
            t = time.perf_counter()
            train_step(bf16)
            times[v]["train"].append(time.perf_counter() - t)
            for _ in range(args.query_reps // args.reps or 1):
                t = time.perf_counter()
                query(bf16)
                times[v]["query"].append(time.perf_counter() - t)

    base = VARIANTS[0]
    med = {v: {k: statistics.median(t) for k, t in d.items()} for v, d in times.items()}
    rows = []
    print(
        f"\n{args.preset}, training batch {args.batch}, {args.threads} threads, "
        f"{args.reps} rounds, torch {torch.__version__}\n"
    )
    print("| attention | precision | train step s | speed-up | query b=1 ms | speed-up |")
    print("|---|---|---|---|---|---|")
    for v in VARIANTS:
        m = med[v]
        row = {
            "attention": v[0],
            "precision": v[1],
            "train_step_s": round(m["train"], 4),
            "train_speedup": round(med[base]["train"] / m["train"], 2),
            "query_ms": round(m["query"] * 1000, 2),
            "query_speedup": round(med[base]["query"] / m["query"], 2),
        }
        rows.append(row)
        print(
            f"| {v[0]} | {v[1]} | {row['train_step_s']:.3f} | {row['train_speedup']:.2f}x | "
            f"{row['query_ms']:.2f} | {row['query_speedup']:.2f}x |"
        )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        info = {
            "machine": platform.processor() or platform.machine(),
            "threads": args.threads,
            "torch": torch.__version__,
            "preset": args.preset,
            "batch": args.batch,
        }
        args.json.write_text(json.dumps({"info": info, "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
