"""The re-ranker's first-stage weight (alpha) x K, on several worlds in one run: R@1 / R@5 of
every combination, from one pass of the model per world (the grid in docs/rerank.md).

    python benchmarks/rerank_alpha.py --data data/shapes:val,data/s1201:test --k 20,25,30,50

The head's scores of each query's first-stage top-max(K) are computed once
(``retrieval.rerank_calibrate.held_out_lists``); a smaller K is the same list's prefix (it is in
first-stage order), and each alpha re-orders it. ``--scales`` are multiples of the re-ranker's
alpha as trained (``calibration.json``'s ``alpha_trained`` when the folder has one, else its
current alpha), so the calibrated re-ranker and its uncalibrated self are rows of one table.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "models" / "sprc-shapes"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default=str(DEMO), help="first-stage model folder")
    ap.add_argument("--reranker", default=None, help="re-ranker folder (default MODEL/reranker)")
    ap.add_argument("--data", required=True, help="comma list of DATA_DIR:SPLIT")
    ap.add_argument("--k", default="20,25,30,50", help="candidates re-ranked (comma list)")
    ap.add_argument("--scales", default="1,2,4,8", help="multiples of the trained alpha")
    ap.add_argument("--limit", type=int, default=0, help="first N triplets per split (0 = all)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    ap.add_argument("--json", default=None, help="write the rows here")
    args = ap.parse_args()

    from retrieval.encoder import Encoder
    from retrieval.evaluate import RerankLists, recall_at
    from retrieval.rerank import Reranker, find_reranker
    from retrieval.rerank_calibrate import CALIBRATION_JSON, held_out_lists

    if args.threads:
        torch.set_num_threads(args.threads)
    enc = Encoder.from_pretrained(args.model)
    folder = Path(args.reranker) if args.reranker else find_reranker(args.model)
    if folder is None:
        raise SystemExit(f"{args.model} has no re-ranker (--reranker DIR)")
    rr = Reranker.from_pretrained(folder)
    current = float(rr.model.alpha.detach())
    cal = folder / CALIBRATION_JSON
    trained = float(json.loads(cal.read_text())["alpha_trained"]) if cal.is_file() else current
    ks = sorted({int(k) for k in args.k.split(",") if k})
    scales = [float(s) for s in args.scales.split(",") if s]
    worlds = [w.rsplit(":", 1) for w in args.data.split(",") if w]

    rows: list[dict[str, Any]] = []
    lists: dict[str, RerankLists] = {}
    for data, split in worlds:
        lists[f"{data}:{split}"] = held_out_lists(enc, rr, data, split, max(ks), limit=args.limit)
    for k in ks:
        for scale in scales:
            row: dict[str, Any] = {"k": k, "scale": scale, "alpha": trained * scale}
            for name, full in lists.items():
                row[name] = recall_at(full.prefix(k).ranks(trained * scale), (1, 5, 10))
            rows.append(row)

    print(f"re-ranker {rr.fingerprint}: alpha trained {trained:.2f}, as loaded {current:.2f}")
    print("| K | alpha x trained | " + " | ".join(f"{n} R@1 / R@5" for n in lists) + " |")
    print("|---|---|" + "---|" * len(lists))
    for r in rows:
        cells = [f"{100 * r[n]['1']:.1f} / {100 * r[n]['5']:.1f}" for n in lists]
        print(f"| {r['k']} | {r['scale']:g} | " + " | ".join(cells) + " |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
