"""Recall of the Encoder's precisions on one model: fp32, bf16 with every weight bf16 (the Encoder
before issue #19), and bf16 with the Q-Former side in float32 (``_keep_in_fp32_modules``, now).

    python benchmarks/precision_recall.py                       # models/sprc-shapes, data/shapes
    python benchmarks/precision_recall.py --limit 0 --gallery 0 --json runs/precision_recall.json

First stage only (no baselines, no re-ranker); docs/architecture.md has the committed numbers.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from retrieval.encoder import Encoder
from retrieval.evaluate import evaluate

VARIANTS = ("fp32", "bf16-all", "bf16-qformer-fp32")


def load(model: str, variant: str) -> Encoder:
    if variant == "bf16-all":  # exactly the old CPU path: every weight bf16, no autocast
        enc = Encoder.from_pretrained(model, dtype="fp32")
        enc.model.to(torch.bfloat16)
        enc.dtype = torch.bfloat16
        return enc
    return Encoder.from_pretrained(model, dtype="fp32" if variant == "fp32" else "bf16")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="models/sprc-shapes")
    ap.add_argument("--data", default="data/shapes")
    ap.add_argument("--split", default="test")
    ap.add_argument("--limit", type=int, default=500, help="queries (0 = all)")
    ap.add_argument("--gallery", type=int, default=2000, help="gallery_limit (0 = full)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    out = {}
    for variant in VARIANTS:
        t0 = time.perf_counter()
        res = evaluate(
            load(args.model, variant),
            args.data,
            args.split,
            limit=args.limit or None,
            gallery_limit=args.gallery or None,
            baselines=False,
            progress=False,
            batch_size=128,
        )
        out[variant] = {"recall": res["recall"], "seconds": round(time.perf_counter() - t0, 1)}
        print(variant, json.dumps(out[variant]), flush=True)
    if args.json:
        args.json.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
