"""Does a batch of queries search cheaper per query than the same queries one by one?

    python benchmarks/search_batch.py --index edge:data/bench-server-v5 --name real100000 \\
        --model models/sprc-shapes --data data/shapes --queries 64 --batches 1,8,32

The server's micro-batching pays off only where a batch costs less per query than its members
alone. The model does (one forward for B queries); this measures whether the index search does,
on an existing Edge index (e.g. the one `benchmarks/server.py --gallery real` builds), side by
side in one run:

* ``edge``: the index's own ``fast``/``auto`` search as the server calls it: ``search`` for a
  batch of 1, ``search_batch`` (one Edge ``query_batch`` call) for more.
* ``ram``: the alternative a batch could exploit: every vector copied into RAM as bfloat16
  (torch, one thread), one ``[B, D] x [D, N]`` matmul against the pooled vectors for the whole
  batch, top-L per query, bfloat16 MaxSim over the L candidates' tokens, and exact float32
  MaxSim on the best ``--rescore``. The scan is shared by the batch; the rerank is not.

Queries are composed test queries of the shapes world (after the first ``--skip``), encoded by
``--model``. Recall@10 is against exact float32 MaxSim over every image. Prints a table; the
``ratio`` column is edge batch-1 ms per query over the row's.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.server import calibration_queries  # noqa: E402


def load_vectors(idx: Any) -> tuple[list[str], torch.Tensor]:
    """Every point's id and tokens ``[N, Q, D]`` float32, in scroll order."""
    ids, toks = [], []
    for r in idx.iter_records(batch=2000, with_payload=False, with_vectors=True):
        ids.append(r.id)
        toks.append(r.tokens)
    return ids, torch.from_numpy(np.stack(toks).astype(np.float32))


def exact_top10(tokens: torch.Tensor, qs: torch.Tensor) -> list[set[int]]:
    return [set(torch.topk((tokens @ q).amax(1), 10).indices.tolist()) for q in qs]


class RamSearch:
    """The batched two-stage search over bfloat16 copies of the vectors (see module doc)."""

    def __init__(self, tokens: torch.Tensor, limit: int, rescore: int) -> None:
        self.tokens = tokens  # float32 originals for the exact rescoring
        pooled = torch.nn.functional.normalize(tokens.mean(1), dim=-1)
        self.pooled_bf16 = pooled.to(torch.bfloat16).contiguous()
        self.tokens_bf16 = tokens.to(torch.bfloat16).contiguous()
        self.limit, self.rescore = limit, rescore

    def search(self, qs: torch.Tensor) -> list[list[int]]:
        scan = (qs.to(torch.bfloat16) @ self.pooled_bf16.T).float()  # [B, N]: shared by the batch
        cand = torch.topk(scan, self.limit, dim=1).indices  # [B, L]
        out = []
        for q, c in zip(qs, cand, strict=True):  # per query: nothing left to share
            approx = (self.tokens_bf16[c] @ q.to(torch.bfloat16)).float().amax(1)
            best = c[torch.topk(approx, min(self.rescore, len(c))).indices]
            exact = (self.tokens[best] @ q).amax(1)
            out.append(best[torch.topk(exact, 10).indices].tolist())
        return out


def timed(fn: Any, qs: np.ndarray, batch: int, repeat: int) -> tuple[float, list[list[Any]]]:
    """Best ms per query over ``repeat`` passes (after one warm-up batch) and the last results."""
    results: list[list[Any]] = []
    fn(qs[:batch])
    best = float("inf")
    for _ in range(repeat):
        results = []
        t0 = time.perf_counter()
        for s in range(0, len(qs), batch):
            results.extend(fn(qs[s : s + batch]))
        best = min(best, (time.perf_counter() - t0) * 1000.0 / len(qs))
    return best, results


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--index", required=True, help="index URI, e.g. edge:data/bench-server-v5")
    ap.add_argument("--name", required=True, help="index name, e.g. real100000")
    ap.add_argument("--model", default="models/sprc-shapes", help="encodes the queries")
    ap.add_argument("--data", type=Path, default=Path("data/shapes"))
    ap.add_argument("--queries", type=int, default=64)
    ap.add_argument("--skip", type=int, default=264, help="test triplets skipped (calibration)")
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--mode", default="auto", help="the index's search mode for `edge`")
    ap.add_argument("--limit", type=int, default=0, help="`ram` L (0: the version's fast L)")
    ap.add_argument("--rescore", type=int, default=320, help="`ram` exact float32 rescoring")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)  # as the server's search process: one core

    from retrieval.encoder import Encoder
    from retrieval.index import open_index
    from retrieval.index.policy import CALIBRATION_KEY, fast_plan

    encoder = Encoder.from_pretrained(args.model)
    qs = calibration_queries(args.data, encoder, args.skip, args.queries).astype(np.float32)
    idx = open_index(args.index, args.name, read_only=True)
    meta = idx.meta
    cal = meta.extra.get(CALIBRATION_KEY) if meta else None
    # the L the index's own `fast` search uses for top 10 (its calibration, else its table)
    limit = args.limit or fast_plan(10, 0, {}, idx.count(), cal)[0]
    t0 = time.perf_counter()
    ids, tokens = load_vectors(idx)
    load_s = time.perf_counter() - t0
    print(f"{len(ids):,} images loaded into RAM in {load_s:.1f} s; L = {limit}", flush=True)
    truth = exact_top10(tokens, torch.from_numpy(qs))
    ram = RamSearch(tokens, limit, args.rescore)
    pos = {pid: i for i, pid in enumerate(ids)}

    def edge(batch: np.ndarray) -> list[list[int]]:
        if len(batch) == 1:
            hits = [idx.search(batch[0], 10, mode=args.mode)]
        else:
            hits = idx.search_batch(batch, 10, mode=args.mode)
        return [[pos[h.id] for h in hs] for hs in hits]

    def ram_fn(batch: np.ndarray) -> list[list[int]]:
        return ram.search(torch.from_numpy(batch))

    rows = []
    for name, fn in (("edge", edge), ("ram", ram_fn)):
        for b in [int(x) for x in args.batches.split(",")]:
            ms, res = timed(fn, qs, b, args.repeat)
            rec = sum(len(t & set(r)) for t, r in zip(truth, res, strict=True)) / (10 * len(qs))
            rows.append({"search": name, "batch": b, "ms_per_query": ms, "recall@10": rec})
    base = next(r["ms_per_query"] for r in rows if r["search"] == "edge" and r["batch"] == 1)
    print(f"\n{len(ids):,} images, {len(qs)} composed queries, one thread, L = {limit}")
    print("| search | batch | ms / query | ratio vs edge batch-1 | recall@10 |")
    print("|---|---:|---:|---:|---:|")
    for r in rows:
        r["ratio"] = base / r["ms_per_query"]
        print(
            f"| {r['search']} | {r['batch']} | {r['ms_per_query']:.2f} | {r['ratio']:.2f}x "
            f"| {r['recall@10']:.3f} |"
        )
    idx.close()
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "index": args.index,
                    "name": args.name,
                    "n": len(ids),
                    "L": limit,
                    "rescore": args.rescore,
                    "load_s": load_s,
                    "machine": platform.machine(),
                    "rows": rows,
                },
                indent=2,
            )
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
