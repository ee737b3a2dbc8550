"""Why `fast` finds no L on a large gallery: the oracle of its first stage, on the cached
features of `benchmarks/index.py --streamed` (no index needed).

    python benchmarks/index_oracle.py data/bench-1m/cache/<fingerprint>-render1000000-s0

For the measured composed queries (the first ``--queries`` of the folder's queries-*.npy):
recall@10 of an exact top-L by ``pooled`` (the mean token) followed by exact MaxSim, strict and
tie-aware (a result within eps of the 10th exact score counts), how crowded the top scores are,
and how many distinct scene layouts the exact top-10 hold (duplicate layouts would tie).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from retrieval.data.shapes import COLOR_NAMES, MAX_OBJECTS, N_CELLS, SHAPES, SIZES  # noqa: E402


def layout(i: int, seed: int = 0) -> tuple:
    """Scene i's layout, drawn as benchmarks/server.py's render_scenes draws it."""
    rng = random.Random(f"{seed}-{i}")
    cells = rng.sample(range(N_CELLS), rng.randint(1, MAX_OBJECTS))
    return tuple(
        sorted((c, rng.choice(COLOR_NAMES), rng.choice(SHAPES), rng.choice(SIZES)) for c in cells)
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folder", type=Path, help="a --streamed cache folder (targets_f16.npy)")
    ap.add_argument("--queries", type=int, default=200, help="the measured queries")
    ap.add_argument("--ladder", default="1000,2000,4000,8000,16000,32000")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    mm = np.load(args.folder / "targets_f16.npy", mmap_mode="r")
    qfile = sorted(args.folder.glob("queries-*.npy"))[0]
    qs = np.load(qfile)[: args.queries]
    n, q, d = mm.shape
    t0 = time.perf_counter()
    ex = np.empty((len(qs), n), np.float32)
    po = np.empty((len(qs), n), np.float32)
    for s in range(0, n, 20000):
        t = np.asarray(mm[s : s + 20000], np.float32)
        c = len(t)
        ex[:, s : s + c] = (t.reshape(c * q, d) @ qs.T).reshape(c, q, -1).max(1).T
        p = t.mean(1)
        p /= np.linalg.norm(p, axis=1, keepdims=True)
        po[:, s : s + c] = (p @ qs.T).T
    top = np.argsort(-ex, axis=1)[:, :11]
    s10 = np.take_along_axis(ex, top[:, 9:10], axis=1)[:, 0]
    gap = s10 - np.take_along_axis(ex, top[:, 10:11], axis=1)[:, 0]
    out: dict = {"n": n, "queries": len(qs), "median_gap_10_11": float(np.median(gap))}
    out["within_eps_of_10th_median"] = {
        str(e): float(np.median((ex >= (s10 - e)[:, None]).sum(1))) for e in (1e-3, 1e-2)
    }
    out["distinct_layouts_in_top10"] = float(
        np.mean([len({layout(int(i)) for i in row[:10]}) for row in top])
    )
    rows = {}
    for L in (int(x) for x in args.ladder.split(",")):
        cand = np.argpartition(-po, L, axis=1)[:, :L]
        ce = np.take_along_axis(ex, cand, axis=1)
        got = np.take_along_axis(cand, np.argsort(-ce, axis=1)[:, :10], axis=1)
        ge = np.take_along_axis(ex, got, axis=1)
        strict = np.mean([len(set(g) & set(t[:10])) / 10 for g, t in zip(got, top, strict=True)])
        rows[L] = {
            "strict": float(strict),
            "tie_0.001": float((ge >= (s10 - 1e-3)[:, None]).mean()),
            "tie_0.003": float((ge >= (s10 - 3e-3)[:, None]).mean()),
        }
    out["oracle_recall10"] = rows
    out["seconds"] = round(time.perf_counter() - t0, 1)
    print("| L | recall@10 (strict) | within 0.001 | within 0.003 |\n|---|---:|---:|---:|")
    for L, r in rows.items():
        print(f"| {L} | {r['strict']:.3f} | {r['tie_0.001']:.3f} | {r['tie_0.003']:.3f} |")
    print(json.dumps({k: v for k, v in out.items() if k != "oracle_recall10"}))
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
