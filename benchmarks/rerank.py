"""Cost of the second stage: re-ranker ms per query at K candidates, and bytes per image of
each candidate-feature source, for the demo model and the real BLIP-2 size, in one run.

    python benchmarks/rerank.py --k 10,50,100 --batch 1,8

Both re-rankers are timed on the same inputs shapes they see in the server (the query side
once per query, K candidates of Q x D target vectors or T x C ViT tokens); the BLIP-2-size one
has random weights (its cost does not depend on them). Bytes per image: what the index must
hold per candidate for the source ("targets" are the first stage's own stored vectors, so
nothing new), and for "patches" the ViT tokens a candidate would need stored (fp16), or
recomputed from the image at query time (the ViT cost is printed as GFLOPs per candidate).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "models" / "sprc-shapes"


def _inputs(cfg: Any, b: int, k: int, text_len: int = 12) -> tuple[Any, torch.Tensor, torch.Tensor]:
    from retrieval.rerank import QueryFeatures

    g = torch.Generator().manual_seed(0)
    q = 16 if cfg.pair_rows <= 16 else 32
    qf = QueryFeatures(
        torch.randn(b, q, cfg.query_dim, generator=g),
        torch.randn(b, text_len, cfg.query_dim, generator=g),
        torch.ones(b, text_len, dtype=torch.bool),
        torch.randn(b, cfg.pair_rows, cfg.pair_dim, generator=g),
        torch.randn(b, 256, generator=g),
    )
    cand = torch.randn(b, k, cfg.pair_rows, cfg.pair_dim, generator=g)
    return qf, cand, torch.randn(b, k, generator=g)


def time_score(rr: Any, b: int, k: int, reps: int) -> float:
    """Median ms per call of Reranker.score for b queries x k candidates."""
    qf, cand, first = _inputs(rr.config, b, k)
    rr.score(qf, cand, first)  # warm-up
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        rr.score(qf, cand, first)
        out.append((time.perf_counter() - t0) * 1000.0)
    return float(np.median(out))


def vit_gflops(c: Any) -> float:
    """Forward GFLOPs of the ViT for one image (2 * MACs of its matmuls)."""
    t, w, m = c.num_image_tokens, c.vision_hidden_size, c.vision_intermediate_size
    per_layer = t * (4 * w * w + 2 * w * m) + 2 * t * t * w
    return 2 * per_layer * c.vision_num_layers / 1e9


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--k", default="10,50,100", help="candidates per query")
    p.add_argument("--batch", default="1,8", help="queries per call")
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--threads", type=int, default=1, help="torch threads (the server's: 1)")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    from retrieval.config import get_config
    from retrieval.rerank import Reranker, RerankerConfig, RerankerModel, find_reranker

    variants: list[tuple[str, Any, Any]] = []
    demo_dir = find_reranker(DEMO)
    if demo_dir is not None:
        variants.append(("demo (committed)", Reranker.from_pretrained(demo_dir), get_config(DEMO)))
    small = get_config("sprc-small")
    big = get_config("blip2-vitg")
    for name, c in (("sprc-small", small), ("blip2-vitg", big)):
        for src in ("targets", "patches"):
            rows, dim = (
                (c.num_query_tokens, c.embed_dim)
                if src == "targets"
                else (c.num_image_tokens, c.vision_hidden_size)
            )
            cfg = RerankerConfig(
                features=src, pair_rows=rows, pair_dim=dim, query_dim=c.qformer_hidden_size
            )
            variants.append((f"{name} {src} (random)", Reranker(RerankerModel(cfg)), c))
    ks = [int(x) for x in args.k.split(",") if x]
    bs = [int(x) for x in args.batch.split(",") if x]
    rows_out: list[dict[str, Any]] = []
    for name, rr, c in variants:
        src = rr.config.features
        stored = (
            0 if src == "targets" else c.num_image_tokens * c.vision_hidden_size * 2
        )  # new bytes per image in the index
        for b in bs:
            for k in ks:
                ms = time_score(rr, b, k, args.reps)
                rows_out.append(
                    {
                        "reranker": name,
                        "features": src,
                        "batch": b,
                        "k": k,
                        "ms_per_call": round(ms, 3),
                        "ms_per_query": round(ms / b, 3),
                        "new_bytes_per_image": stored,
                        "first_stage_bytes_per_image": c.num_query_tokens * c.embed_dim * 4,
                        "vit_gflops_per_candidate": round(vit_gflops(c), 2)
                        if src == "patches"
                        else 0.0,
                        "parameters": sum(p.numel() for p in rr.model.parameters()),
                    }
                )
    print(
        "| re-ranker | features | queries/call | K | ms/call | ms/query | new bytes/image "
        "| recompute GFLOPs/candidate |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for r in rows_out:
        print(
            f"| {r['reranker']} | {r['features']} | {r['batch']} | {r['k']} | "
            f"{r['ms_per_call']:.2f} | {r['ms_per_query']:.2f} | {r['new_bytes_per_image']:,} | "
            f"{r['vit_gflops_per_candidate']} |"
        )
    base = {(r["reranker"], r["batch"]): r for r in rows_out if r["k"] == min(ks)}
    for r in rows_out:
        if r["k"] == max(ks) and r["batch"] == max(bs):
            one = base.get((r["reranker"], r["batch"]))
            if one:
                print(
                    f"{r['reranker']}: K {min(ks)} -> {max(ks)} costs "
                    f"{r['ms_per_call'] / max(one['ms_per_call'], 1e-9):.2f}x"
                )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows_out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
