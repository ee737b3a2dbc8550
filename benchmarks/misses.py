"""What ranks first when the target does not: the test misses of a shapes model, by how the
rank-1 scene differs from the target scene.

    python benchmarks/misses.py --model models/sprc-shapes --data data/shapes --split test

Kinds: one object with a different ``cell`` / ``color`` / ``shape`` / ``size`` (or a ``+`` of
them), ``N objects differ``, ``count`` (another number of objects); and whether the rank-1 image
is one of the gallery's hard ``distractor`` images or another ``eval`` scene.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from retrieval.data.shapes import Scene, parse_signature  # noqa: E402


def difference(target: Scene, other: Scene) -> str:
    """How ``other`` differs from ``target``, e.g. ``"cell"``, ``"color+size"``, ``"2 objects
    differ"`` or ``"count"``."""
    a, b = set(target), set(other)
    if len(a) != len(b):
        return "count"
    only_a, only_b = a - b, b - a
    if not only_a:
        return "same"
    if len(only_a) == 1:
        (x,), (y,) = only_a, only_b
        return "+".join(
            f for f in ("cell", "color", "shape", "size") if getattr(x, f) != getattr(y, f)
        )
    return f"{len(only_a)} objects differ"


def main() -> None:
    import torch

    from retrieval.data.triplets import load_gallery, load_triplets
    from retrieval.encoder import Encoder
    from retrieval.evaluate import encode_gallery, load_images, maxsim_scores

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="models/sprc-shapes")
    ap.add_argument("--data", type=Path, default=Path("data/shapes"))
    ap.add_argument("--split", default="test")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    enc = Encoder.from_pretrained(args.model)
    items = load_gallery(args.data)
    gallery = encode_gallery(enc, args.data, items, progress=False)
    sig = {it.id: it.metadata["signature"] for it in items}
    source = {it.id: it.metadata.get("source", "?") for it in items}
    triplets = [t for t in load_triplets(args.data, args.split) if t.target_id]
    kinds: collections.Counter[str] = collections.Counter()
    sources: collections.Counter[str] = collections.Counter()
    for i in range(0, len(triplets), 64):
        chunk = triplets[i : i + 64]
        q = enc.encode_queries(
            load_images(args.data, [t.reference for t in chunk]), [t.caption for t in chunk]
        )
        scores = maxsim_scores(q, gallery.tokens)
        for j, t in enumerate(chunk):
            row = scores[j].clone()
            row[gallery.index[t.reference_id]] = -torch.inf  # the reference is excluded
            top = gallery.ids[int(row.argmax())]
            if top == t.target_id:
                continue
            assert t.target_id is not None
            kinds[difference(parse_signature(sig[t.target_id]), parse_signature(sig[top]))] += 1
            sources[source[top]] += 1
    n_miss = sum(kinds.values())
    print(f"{args.model} on {args.split}: {n_miss} of {len(triplets)} targets not at rank 1")
    print("| rank-1 scene vs target | misses |")
    print("|---|---:|")
    for k, v in kinds.most_common():
        print(f"| {k} | {v} |")
    print("rank-1 image source: " + ", ".join(f"{k} {v}" for k, v in sources.most_common()))
    if args.json:
        out = {"n": len(triplets), "misses": n_miss, "kinds": dict(kinds), "sources": dict(sources)}
        args.json.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
