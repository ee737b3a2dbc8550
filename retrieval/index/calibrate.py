"""Per-index calibration of the ``fast`` prefetch size L.

``fast`` prefetches L candidates by ``pooled`` (the mean token) and reranks them by MaxSim on
``tokens``. How large L must be for a recall target depends on the vectors AND on the queries:
on the synthetic clusters of ``benchmarks/index.py`` (tokens far from their mean) recall@10 >=
0.99 needs L = 8000 at 100k, while trained SPRC tokens sit close to their mean and the model's
own composed queries need far fewer. This module measures a version's own curve and records it
in the version's metadata (``extra["fast_calibration"]``), where ``fast_plan`` picks it up for
every later search of that version (server included).

Measurement (:func:`measure_fast_recall`): for each query vector, every point's tokens are
streamed once and the exact MaxSim top-``top_k`` is compared with the ``pooled`` ranking, giving
the recall of a perfect first stage at each L of ``ladder``.

Choice (:func:`calibrate_fast`): the queries are split reproducibly into a fitting part and a
held-out part (``heldout``, default half). L is the smallest ladder value whose recall on the
fitting part reaches the target plus half the remaining error (0.995 for 0.99: sampling noise
and the HNSW walk's small losses stay inside the target) AND whose recall on the held-out part
reaches the target itself; the held-out recall at L is recorded (``heldout_recall``). No such L
(or fewer than :data:`MIN_SPLIT` queries on a side: too few to be sure) gives ``"L": None``,
and ``fast`` then searches exactly: a ``fast`` that cannot promise its target is never run.

Queries, best first (``source`` in the record):

* ``"composed"``: real composed queries the model makes at build time (``cir index build``:
  gallery images as references + captions; indexer/pipeline.py), passed as ``query_vectors``;
* ``"queries"``: real query vectors from a file (a query log, the server's traffic reservoir);
* ``"proxy"``: the last resort when no query vectors exist: stored images drawn reproducibly,
  one of their tokens perturbed by Gaussian noise (``noise`` = 1.0: cosine about 0.7 to the
  token). Proxies are not like real queries in either direction (on the demo model they found
  no L where real queries need 500; on clustered vectors they picked L = 100 where real queries
  lost half their recall: issue 22), so they follow the same held-out rule, and the server's
  recall guard (server/recall_guard.py) watches live ``fast`` queries whatever the source.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np

from retrieval.index.api import ReadView

logger = logging.getLogger(__name__)

#: Prefetch sizes measured (a larger L than the gallery is never needed: ``fast`` = ``exact``).
LADDER: tuple[int, ...] = (100, 250, 500, 1000, 2000, 4000, 8000, 16000, 32000)
#: Fewest queries on each side of the fit / held-out split for an L to be chosen at all.
MIN_SPLIT = 10
#: Query sources a calibration record names (best first).
SOURCES = ("composed", "queries", "proxy")


def _unit_queries(query_vectors: np.ndarray) -> np.ndarray:
    qv = np.asarray(query_vectors, np.float32)
    if qv.ndim != 2 or qv.shape[0] == 0:
        raise ValueError(f"query vectors must be a non-empty [M, D] array, got {qv.shape}")
    norms = np.linalg.norm(qv, axis=1, keepdims=True)
    if not np.all(np.isfinite(qv)) or np.any(norms == 0):
        raise ValueError("query vectors must be finite and non-zero")
    return qv / norms


def _proxy_queries(view: ReadView, queries: int, noise: float, seed: int) -> np.ndarray:
    recs = view.get(
        [r.id for r in view.sample(queries, seed=seed, with_payload=False)], True, False
    )
    rng = np.random.default_rng(seed)
    toks = np.stack([np.asarray(r.tokens, np.float32) for r in recs if r.tokens is not None])
    m, nq, d = toks.shape
    qv = toks[np.arange(m), rng.integers(0, nq, m)]
    qv = qv + noise * rng.standard_normal(qv.shape).astype(np.float32) / np.sqrt(d)
    return np.asarray(qv / np.linalg.norm(qv, axis=1, keepdims=True), np.float32)


def _pooled_ranks(view: ReadView, qv: np.ndarray, top_k: int, batch: int) -> tuple[np.ndarray, int]:
    """``[M, k]`` rank in the ``pooled`` order (0 = first) of each query's exact MaxSim top-k
    points, and the number of points streamed."""
    n = view.count()
    m = len(qv)
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
    thr = np.take_along_axis(pooled, top, axis=1)  # [M, k]
    ranks = np.stack([(pooled[i][None, :] > thr[i][:, None]).sum(-1) for i in range(m)])
    return ranks, seen


def _curve(ranks: np.ndarray, ladder: tuple[int, ...], n: int) -> dict[int, float]:
    return {int(L): float((ranks < L).mean()) for L in ladder if n > L}


def _measure(
    view: ReadView,
    *,
    top_k: int = 10,
    queries: int = 200,
    noise: float = 1.0,
    seed: int = 0,
    ladder: tuple[int, ...] = LADDER,
    batch: int = 2000,
    query_vectors: np.ndarray | None = None,
    source: str | None = None,
) -> tuple[dict[str, Any], np.ndarray]:
    t0 = time.perf_counter()
    if view.count() == 0:
        raise ValueError("cannot calibrate an empty index")
    if query_vectors is not None:
        qv = _unit_queries(query_vectors)
    else:
        qv = _proxy_queries(view, queries, noise, seed)
    ranks, seen = _pooled_ranks(view, qv, top_k, batch)
    res = {
        "n": int(seen),
        "queries": int(len(qv)),
        "top_k": int(ranks.shape[1]),
        "noise": float(noise),
        "seed": int(seed),
        "source": "proxy" if query_vectors is None else (source or "queries"),
        "curve": _curve(ranks, ladder, seen),
        "seconds": round(time.perf_counter() - t0, 2),
    }
    return res, ranks


def measure_fast_recall(
    view: ReadView,
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
    res, _ = _measure(
        view,
        top_k=top_k,
        queries=queries,
        noise=noise,
        seed=seed,
        ladder=ladder,
        batch=batch,
        query_vectors=query_vectors,
    )
    return res


def choose_l(curve: dict[int, float], recall_target: float) -> int | None:
    """Smallest L whose measured recall reaches the target plus half its remaining error."""
    need = recall_target + (1.0 - recall_target) / 2
    for L in sorted(curve):
        if curve[L] >= need:
            return int(L)
    return None


def choose_l_heldout(
    fit: dict[int, float], heldout: dict[int, float], recall_target: float
) -> int | None:
    """Smallest L meeting :func:`choose_l`'s rule on ``fit`` whose ``heldout`` recall reaches
    the target too (None: no L does; the version is then searched exactly)."""
    need = recall_target + (1.0 - recall_target) / 2
    for L in sorted(fit):
        if fit[L] >= need and heldout.get(L, -1.0) >= recall_target:
            return int(L)
    return None


def calibrate_fast(
    view: ReadView,
    recall_target: float = 0.99,
    *,
    heldout: float = 0.5,
    source: str | None = None,
    **measure: Any,
) -> dict[str, Any]:
    """Measure (:func:`measure_fast_recall`) and choose L for ``recall_target`` on a fit /
    held-out split of the queries (see the module docstring). The result is what
    :func:`~retrieval.index.policy.fast_plan` reads from ``extra["fast_calibration"]``;
    ``"L": None`` means no L met the target on both parts: ``fast`` and ``auto`` then search
    exactly. ``measure`` may hold ``query_vectors`` (real queries; ``source`` names them:
    ``"composed"`` or ``"queries"``), ``queries``/``noise``/``seed`` (proxies), ``ladder``,
    ``top_k``, ``batch``. The record holds the fitting curve (``curve``), the held-out one
    (``heldout_curve``), ``heldout_recall`` at the chosen L, and ``reason`` when L is None.
    """
    if not 0.0 <= heldout < 1.0:
        raise ValueError(f"heldout must be in [0, 1), got {heldout}")
    res, ranks = _measure(view, source=source, **measure)
    ladder = tuple(measure.get("ladder", LADDER))
    m = len(ranks)
    order = np.random.default_rng(int(measure.get("seed", 0)) + 1).permutation(m)
    n_held = int(round(m * heldout))
    fit_i, held_i = order[n_held:], order[:n_held]
    fit = _curve(ranks[fit_i], ladder, res["n"])
    held = _curve(ranks[held_i], ladder, res["n"]) if n_held else {}
    res["recall_target"] = float(recall_target)
    res["fit_queries"], res["heldout_queries"] = int(len(fit_i)), int(n_held)
    res["all_curve"] = {str(k): v for k, v in res["curve"].items()}
    res["curve"] = {str(k): v for k, v in fit.items()}  # JSON keys
    res["heldout_curve"] = {str(k): v for k, v in held.items()}
    reason = ""
    if not fit:
        L = None
        reason = f"every measured L is >= the {res['n']} points: fast searches exactly anyway"
    elif n_held and min(len(fit_i), n_held) < MIN_SPLIT:
        L = None
        reason = (
            f"{m} queries are too few to choose L with a held-out check (at least "
            f"{2 * MIN_SPLIT} needed)"
        )
    elif n_held:
        L = choose_l_heldout(fit, held, recall_target)
    else:  # no held-out part asked for (heldout=0): the fitting rule alone
        L = choose_l(fit, recall_target)
    if L is None and not reason:
        best = max(held.values() if held else fit.values())
        reason = (
            f"no L up to {max(fit)} reaches recall@{res['top_k']} {recall_target} on both the "
            f"fitting and the held-out queries (best held-out {best:.3f})"
        )
    res["L"] = L
    res["heldout_recall"] = None if L is None or not n_held else float(held[L])
    if reason:
        res["reason"] = reason
    logger.info(
        "fast calibration (%s queries): n=%d, L=%s for recall@%d >= %.3f, held-out %s (%.1fs)%s",
        res["source"], res["n"], res["L"], res["top_k"], recall_target, res["heldout_recall"],
        res["seconds"], f": {reason}" if reason else "",
    )  # fmt: skip
    return res


__all__ = [
    "LADDER",
    "MIN_SPLIT",
    "SOURCES",
    "calibrate_fast",
    "choose_l",
    "choose_l_heldout",
    "measure_fast_recall",
]
