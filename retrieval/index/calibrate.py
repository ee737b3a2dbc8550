"""Per-index calibration of the ``fast`` prefetch size L.

``fast`` prefetches L candidates by ``pooled`` (the mean token) and reranks them by MaxSim on
``tokens``. How large L must be for a recall target depends on the vectors: on the synthetic
clusters of ``benchmarks/index.py`` (tokens far from their mean) recall@10 >= 0.99 needs
L = 8000 at 100k, while trained SPRC tokens sit close to their mean and need far fewer. The
fixed :data:`~retrieval.index.common.FAST_RECALL_TABLE` must assume the hard case; this module
measures the index's own curve instead and records it in the version's metadata
(``extra["fast_calibration"]``), where ``fast_plan`` picks it up for every later search of that
version (server included).

Measurement: ``queries`` stored images drawn reproducibly (``seed``); each gives one query,
one of its tokens at random perturbed by Gaussian noise (``noise`` = 1.0: cosine about 0.7 to
the token, because a composed query matches its target's best token far from exactly). Every
point's tokens are streamed once; for each query the exact MaxSim top-``top_k`` is compared
with the ``pooled`` ranking, giving the recall of a perfect first stage at each L of
``ladder``. The chosen L is the smallest whose recall reaches the target with half the
remaining error as margin (0.995 for a 0.99 target), so sampling noise and the HNSW walk's
small losses stay inside the target.

The proxy queries are the conservative choice when nothing better is known, and they can be far
too pessimistic: a trained SPRC model's composed queries match their target as a whole, and on
the demo model's gallery real queries needed L = 100 where the proxy found no L at all
(docs/benchmarks.md). When real query vectors exist (composed queries from a log or a held-out
set), pass them as ``query_vectors``: the curve is then measured on them.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np

from retrieval.index.api import IndexView

logger = logging.getLogger(__name__)

#: Prefetch sizes measured (a larger L than the gallery is never needed: ``fast`` = ``exact``).
LADDER: tuple[int, ...] = (100, 250, 500, 1000, 2000, 4000, 8000, 16000, 32000)


def measure_fast_recall(
    view: IndexView,
    *,
    top_k: int = 10,
    queries: int = 200,
    noise: float = 1.0,
    seed: int = 0,
    ladder: tuple[int, ...] = LADDER,
    batch: int = 2000,
    query_vectors: np.ndarray | None = None,
) -> dict[str, Any]:
    """Recall@``top_k`` of a perfect ``pooled`` first stage at each L of ``ladder``, for
    ``query_vectors`` ([M, D] real queries) when given, else for proxy queries.

    Returns ``{"n", "queries", "top_k", "noise", "seed", "source", "curve": {L: recall},
    "seconds"}``; ``source`` is ``"queries"`` (real vectors) or ``"proxy"``.
    """
    t0 = time.perf_counter()
    n = view.count()
    if n == 0:
        raise ValueError("cannot calibrate an empty index")
    if query_vectors is not None:
        qv = np.asarray(query_vectors, np.float32)
        if qv.ndim != 2 or qv.shape[0] == 0:
            raise ValueError(f"query vectors must be a non-empty [M, D] array, got {qv.shape}")
        norms = np.linalg.norm(qv, axis=1, keepdims=True)
        if not np.all(np.isfinite(qv)) or np.any(norms == 0):
            raise ValueError("query vectors must be finite and non-zero")
        qv = qv / norms
        m = len(qv)
    else:
        recs = view.get(
            [r.id for r in view.sample(queries, seed=seed, with_payload=False)], True, False
        )
        rng = np.random.default_rng(seed)
        toks = np.stack([np.asarray(r.tokens, np.float32) for r in recs if r.tokens is not None])
        m, nq, d = toks.shape
        qv = toks[np.arange(m), rng.integers(0, nq, m)]
        qv = qv + noise * rng.standard_normal(qv.shape).astype(np.float32) / np.sqrt(d)
        qv /= np.linalg.norm(qv, axis=1, keepdims=True)
    exact = np.empty((m, n), np.float32)
    pooled = np.empty((m, n), np.float32)
    seen = 0
    chunk: list[np.ndarray] = []

    def flush() -> None:
        nonlocal seen
        t = np.stack(chunk)  # [c, Q, D]
        c, q, d = t.shape
        if d != qv.shape[1]:
            raise ValueError(f"query vectors have {qv.shape[1]} dimensions, the index {d}")
        t /= np.linalg.norm(t, axis=-1, keepdims=True) + 1e-12
        exact[:, seen : seen + c] = (t.reshape(c * q, d) @ qv.T).reshape(c, q, m).max(1).T
        p = t.mean(1)
        p /= np.linalg.norm(p, axis=1, keepdims=True) + 1e-12
        pooled[:, seen : seen + c] = (p @ qv.T).T
        seen += c
        chunk.clear()

    for rec in view.iter_records(batch, with_payload=False, with_vectors=True):
        if rec.tokens is None:
            continue
        if seen + len(chunk) >= n:  # points added while streaming: keep the first n
            break
        chunk.append(np.asarray(rec.tokens, np.float32))
        if len(chunk) >= batch:
            flush()
    if chunk:
        flush()
    exact, pooled = exact[:, :seen], pooled[:, :seen]
    k = min(top_k, seen)
    top = np.argpartition(-exact, k - 1, axis=1)[:, :k]  # [M, k] exact top-k (any order)
    # rank of each exact top-k point in the pooled order (0 = first)
    thr = np.take_along_axis(pooled, top, axis=1)  # [M, k]
    ranks = np.stack([(pooled[i][None, :] > thr[i][:, None]).sum(-1) for i in range(m)])
    curve = {int(L): float((ranks < L).mean()) for L in ladder if seen > L}
    return {
        "n": int(seen),
        "queries": int(m),
        "top_k": int(k),
        "noise": float(noise),
        "seed": int(seed),
        "source": "proxy" if query_vectors is None else "queries",
        "curve": curve,
        "seconds": round(time.perf_counter() - t0, 2),
    }


def choose_l(curve: dict[int, float], recall_target: float) -> int | None:
    """Smallest L whose measured recall reaches the target plus half its remaining error."""
    need = recall_target + (1.0 - recall_target) / 2
    for L in sorted(curve):
        if curve[L] >= need:
            return int(L)
    return None


def calibrate_fast(view: IndexView, recall_target: float = 0.99, **measure: Any) -> dict[str, Any]:
    """Measure (:func:`measure_fast_recall`) and choose L for ``recall_target``. The result is
    what :func:`~retrieval.index.common.fast_plan` reads from ``extra["fast_calibration"]``;
    ``"L": None`` means no measured L reached the target (``fast`` then uses the table and
    ``auto`` searches exactly). ``measure`` may hold ``query_vectors`` (real queries)."""
    res = measure_fast_recall(view, **measure)
    res["recall_target"] = float(recall_target)
    res["L"] = choose_l(res["curve"], recall_target)
    res["curve"] = {str(k): v for k, v in res["curve"].items()}  # JSON keys
    logger.info(
        "fast calibration: n=%d, L=%s for recall@%d >= %.3f (%.1fs)",
        res["n"], res["L"], res["top_k"], recall_target, res["seconds"],
    )  # fmt: skip
    return res


__all__ = ["LADDER", "calibrate_fast", "choose_l", "measure_fast_recall"]
