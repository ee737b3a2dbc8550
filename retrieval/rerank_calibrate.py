"""The re-ranker's first-stage weight, fitted on held-out triplets (``cir calibrate-reranker``).

The re-ranker's score is ``head(query, candidate) + alpha * first_stage_score``. ``alpha`` is
learned with the head, against negatives sampled from the frozen first stage's top-K over the
*train* split. That is not the list the re-ranker orders at serve time: held-out queries' top-K,
on which the first stage is less sure and its score carries different information. Measured on
the demo model (docs/rerank.md), the learned alpha weighs the first stage 4-5x too little: a
larger one raised R@1 and R@5 on the val split and on the test splits of three worlds never
used in training.

So after training, ``alpha`` is chosen on the val split (the training world's held-out
triplets, never the test splits): the head's scores of every val query's first-stage top-K are
computed once, and each candidate ``alpha`` re-orders them; the one with the best R@1 + R@5
wins (the trained one on ties). The head is unchanged.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from retrieval.data.triplets import load_gallery, load_triplets
from retrieval.encoder import Encoder
from retrieval.evaluate import (
    RerankLists,
    encode_gallery,
    load_images,
    maxsim_scores,
    recall_at,
    rerank_lists,
)
from retrieval.rerank import Reranker, query_features

logger = logging.getLogger(__name__)

CALIBRATION_JSON = "calibration.json"  # written beside the re-ranker's weights
# Multiples of the trained alpha tried (1 = keep it); the demo's best was 4-6 (docs/rerank.md).
DEFAULT_SCALES: tuple[float, ...] = (0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 4.0, 5.0, 6.0, 8.0, 12.0)
KS = (1, 5, 10)


@torch.inference_mode()
def held_out_lists(
    encoder: Encoder,
    reranker: Reranker,
    data_dir: str | Path,
    split: str = "val",
    k: int = 30,
    batch_size: int = 64,
    limit: int = 0,
) -> RerankLists:
    """Score every ``split`` query's first-stage top-``k`` over the whole gallery with the
    re-ranker's head (one pass; ``RerankLists.ranks`` then re-orders for any alpha)."""
    reranker.check_encoder(encoder)
    data_dir = Path(data_dir)
    triplets = [t for t in load_triplets(data_dir, split) if t.target_id]
    if limit:
        triplets = triplets[:limit]
    if not triplets:
        raise ValueError(f"{data_dir}/{split}.jsonl has no triplet with a target_id")
    source = reranker.config.features
    gallery = encode_gallery(
        encoder, data_dir, load_gallery(data_dir), batch_size, False, patches=source == "patches"
    )
    parts = []
    for i in range(0, len(triplets), batch_size):
        chunk = triplets[i : i + batch_size]
        refs = encoder.reference_features(load_images(data_dir, [t.reference for t in chunk]))
        qf = query_features(encoder, refs, [t.caption for t in chunk], source)
        scores = maxsim_scores(qf.query.cpu().numpy(), gallery.tokens)
        tgt = [gallery.index[str(t.target_id)] for t in chunk]
        excl = [gallery.index.get(t.reference_id, -1) for t in chunk]
        parts.append(rerank_lists(reranker, qf, scores, gallery, tgt, excl, k))
    return RerankLists.cat(parts)


def choose_alpha(
    lists: RerankLists, trained: float, scales: Sequence[float] = DEFAULT_SCALES
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The grid row (``scale``, ``alpha``, ``recall``) with the best R@1 + R@5 over
    ``trained * scale`` for each scale (1 always included), and every row. Ties go to the
    trained alpha, then to the smallest change."""
    rows: list[dict[str, Any]] = []
    for scale in sorted(set(scales) | {1.0}):
        alpha = trained * scale
        rows.append({"scale": scale, "alpha": alpha, "recall": recall_at(lists.ranks(alpha), KS)})
    best = max(
        rows,
        key=lambda r: (
            round(r["recall"]["1"] + r["recall"]["5"], 9),
            r["scale"] == 1.0,
            -abs(math.log(r["scale"])),
        ),
    )
    return best, rows


def calibrate_alpha(
    encoder: Encoder,
    reranker: Reranker,
    data_dir: str | Path,
    split: str = "val",
    k: int = 30,
    scales: Sequence[float] = DEFAULT_SCALES,
    limit: int = 0,
) -> dict[str, Any]:
    """Set ``reranker.model.alpha`` to the multiple of its trained value with the best
    R@1 + R@5 on ``split`` at ``k`` (see the module docstring); returns the report."""
    t0 = time.perf_counter()
    lists = held_out_lists(encoder, reranker, data_dir, split, k, limit=limit)
    trained = float(reranker.model.alpha.detach())
    best, rows = choose_alpha(lists, trained, scales)
    with torch.no_grad():
        reranker.model.alpha.fill_(best["alpha"])
    report = {
        "split": split,
        "data": str(data_dir),
        "n": int(lists.first.shape[0]),
        "k": k,
        "alpha_trained": trained,
        "alpha": best["alpha"],
        "scale": best["scale"],
        "recall_trained": next(r["recall"] for r in rows if r["scale"] == 1.0),
        "recall": best["recall"],
        "grid": rows,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    logger.info(
        "alpha %.3f -> %.3f (x%g) on %s (n=%d, K=%d): R@1+R@5 %.3f -> %.3f",
        trained,
        best["alpha"],
        best["scale"],
        split,
        report["n"],
        k,
        sum(report["recall_trained"][x] for x in ("1", "5")),
        sum(best["recall"][x] for x in ("1", "5")),
    )
    return report


def calibrate_folder(
    encoder: Encoder,
    folder: str | Path,
    data_dir: str | Path,
    split: str = "val",
    k: int = 30,
    scales: Sequence[float] = DEFAULT_SCALES,
    limit: int = 0,
) -> dict[str, Any]:
    """Calibrate the re-ranker saved in ``folder`` and write it back (weights in their saved
    dtype, and ``calibration.json``); the report gains the new ``fingerprint``."""
    folder = Path(folder)
    rr = Reranker.from_pretrained(folder)
    saved_dtype = _saved_dtype(folder)
    report = calibrate_alpha(encoder, rr, data_dir, split, k, scales, limit)
    rr.save_pretrained(folder, weights_dtype=saved_dtype)
    saved = Reranker.from_pretrained(folder)
    report["alpha"] = float(saved.model.alpha.detach())  # as stored (float16 rounds it)
    report["fingerprint"] = saved.fingerprint
    (folder / CALIBRATION_JSON).write_text(json.dumps(report, indent=2) + "\n")
    return report


def _saved_dtype(folder: Path) -> torch.dtype:
    from safetensors import safe_open

    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        return f.get_tensor(next(iter(f.keys()))).dtype
