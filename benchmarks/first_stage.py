"""First-stage recall of `fast`: one mean vector per image (`pooled`) vs C centroids per image.

    python benchmarks/first_stage.py --n 20000 --centroids 1,2,4,8 --L 250,500,1000,2000,4000
    python benchmarks/first_stage.py --features models/sprc-shapes --data data/shapes

`fast` shortlists L candidates by one vector per image and reranks them by exact MaxSim. This
measures the best any such shortlist can do (an exact scan of the summary vectors, no HNSW
loss): recall@10 against exact MaxSim for a summary of C centroids per image (the mean of each
of C groups of tokens, scored by the max over the C), C = 1 being `pooled`. A gain here is the
ceiling of what a multi-centroid first stage could buy before paying C HNSW graphs for it.

Synthetic data is `benchmarks/index.py`'s clustered tokens and perturbed-token queries (N/100
clusters, the 100k benchmark's density); ``--features`` uses a checkpoint's real target tokens of
the gallery and composed queries of the test split (cached as benchmarks/index.py caches them). Prints a table; ``--json`` writes it.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.index import encode_gallery, make_queries, synth  # noqa: E402


def centroids(tokens: np.ndarray, c: int) -> np.ndarray:
    """[N, Q, D] -> [N, C, D]: normalised means of C contiguous token groups (C divides Q)."""
    n, q, d = tokens.shape
    if q % c:
        raise SystemExit(f"--centroids {c} does not divide {q} tokens per image")
    cents = tokens.reshape(n, c, q // c, d).mean(axis=2)
    return cents / np.maximum(np.linalg.norm(cents, axis=-1, keepdims=True), 1e-12)


def exact_top(tokens: np.ndarray, qs: np.ndarray, k: int) -> list[set[int]]:
    """Exact MaxSim top-k ids per query (numpy, as benchmarks/index.py's ground truth)."""
    out = []
    for q in qs:
        s = np.einsum("nqd,d->nq", tokens, q).max(axis=1)
        out.append(set(np.argpartition(-s, k)[:k].tolist()))
    return out


def first_stage_recall(
    summary: np.ndarray, qs: np.ndarray, truth: list[set], limits: list[int], k: int = 10
) -> dict[int, float]:
    hits = {L: 0 for L in limits}
    for i, q in enumerate(qs):
        s = (summary @ q).max(axis=1)
        order = np.argsort(-s)
        for L in limits:
            hits[L] += len(truth[i] & set(order[:L].tolist()))
    return {L: hits[L] / (k * len(qs)) for L in limits}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=20000, help="synthetic gallery size")
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--centroids", default="1,2,4,8", help="C values to compare (1 = pooled)")
    ap.add_argument("--L", default="250,500,1000,2000,4000", help="shortlist sizes")
    ap.add_argument("--features", help="checkpoint folder: real features instead of synthetic")
    ap.add_argument("--data", type=Path, default=Path("data/shapes"), help="with --features")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    cs = [int(x) for x in args.centroids.split(",")]
    limits = [int(x) for x in args.L.split(",")]

    t0 = time.perf_counter()
    if args.features:
        tokens, qs = encode_gallery(
            args.features,
            args.data / "gallery.jsonl",
            args.data / "test.jsonl",
            None,
            args.queries,
            Path("/tmp/cir-index-bench-features"),
        )
        assert qs is not None
        label = f"{args.features} ({len(tokens)} images)"
    else:
        tokens = synth(args.n, 32, 256, args.seed, clusters=max(1, args.n // 100))
        qs = make_queries(tokens, args.queries, args.seed + 1)
        label = f"synthetic clusters ({args.n} images)"
    limits = [lim for lim in limits if lim < len(tokens)]
    truth = exact_top(tokens, qs, 10)
    rows = []
    for c in cs:
        rec = first_stage_recall(centroids(tokens, c), qs, truth, limits)
        rows.append({"centroids": c, "recall@10": {str(L): round(r, 4) for L, r in rec.items()}})
    print(f"first-stage recall@10 (exact scan of the summary), {label}, {len(qs)} queries")
    print("| centroids per image | " + " | ".join(f"L={L}" for L in limits) + " |")
    print("|---:|" + "---:|" * len(limits))
    for r in rows:
        vals = " | ".join(f"{r['recall@10'][str(L)]:.3f}" for L in limits)
        print(f"| {r['centroids']}{' (pooled)' if r['centroids'] == 1 else ''} | {vals} |")
    print(f"({time.perf_counter() - t0:.0f} s)")
    if args.json:
        args.json.write_text(json.dumps({"data": label, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
