"""Search policy: which mode a search really runs and how it is sized.

``auto`` picks ``exact`` or ``fast`` by gallery size and the fast plan's cost; ``fast``
prefetches L candidates by ``pooled`` (L from the caller's options, the version's own
calibration or the recall table, see :func:`fast_plan`) and reranks them exactly; ``exact``
scans the int8 tokens and rescores ``oversampling x (offset + top_k)`` of them with the float
originals. :func:`plan_search` puts it all in one :class:`SearchPlan` that every backend turns
into its engine's request. No engine calls here.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from retrieval.index.api import AUTO_FAST_MIN_POINTS, CALIBRATION_KEY, SEARCH_PAYLOAD
from retrieval.index.filters import Condition
from retrieval.index.validate import PayloadSpec, payload_spec

#: How a new version stores its float originals of ``tokens`` (option ``tokens_dtype``, or
#: ``CIR_INDEX_TOKENS_DTYPE``): float32, or float16 for half the disk and page cache (unit
#: vectors: a score moves by ~1e-4). The int8 copy searched in RAM is the same either way.
TOKENS_DTYPES = ("float32", "float16")


def tokens_dtype(options: Mapping[str, Any]) -> str:
    """The validated ``tokens_dtype`` option (default float32)."""
    value = str(options.get("tokens_dtype", "float32")).lower()
    if value not in TOKENS_DTYPES:
        raise ValueError(f"tokens_dtype must be one of {TOKENS_DTYPES}, got {value!r}")
    return value


#: what a search returns of each hit's payload unless asked otherwise (parsed once)
DEFAULT_SEARCH_PAYLOAD: PayloadSpec = payload_spec(SEARCH_PAYLOAD)

__all__ = [
    "AUTO_FAST_MAX_SHARE",
    "CALIBRATION_KEY",
    "DEFAULT_FAST_RECALL",
    "DEFAULT_OVERSAMPLING",
    "EXACT_PREFETCH_RATIO",
    "FAST_RECALL_TABLE",
    "RESCORE_BUDGET",
    "SearchPlan",
    "auto_mode",
    "fast_plan",
    "note_exact_fallback",
    "oversampling_for",
    "plan_search",
    "resolve_mode",
    "uncalibrated_reason",
]

#: ``fast`` prefetch size L per recall@10 target (measured, docs/benchmarks.md#gallery-index-retrievalindex): the
#: smallest swept L whose recall@10 reached the target at 100k on the synthetic set. Targets
#: between two rows take the larger L (the safe side). Data-dependent: recalibrate with
#: ``benchmarks/index.py --features ... --sweep L=...`` on real features.
FAST_RECALL_TABLE: tuple[tuple[float, int], ...] = (
    (0.95, 2000),  # 100k: 0.950
    (0.97, 4000),  # 100k: 0.978
    (0.99, 8000),  # 100k: 0.9935 (30k: 0.998, 10k: 1.0)
)
DEFAULT_FAST_RECALL = 0.99
#: ``fast_exact_prefetch="auto"``: scan `pooled` exactly instead of walking HNSW when
#: L x EXACT_PREFETCH_RATIO >= points. With ef >= L the walk visits on the order of ef x m
#: nodes, so for a large L it costs more than the scan and loses some recall too: measured
#: at 10k-100k the exact scan was faster (or within noise), and never less accurate, for every
#: L from 1.7% to 80% of the gallery (docs/benchmarks.md#gallery-index-retrievalindex); HNSW is kept for smaller
#: shares (e.g. 1M points with L < 15.6k).
EXACT_PREFETCH_RATIO = 64


def _own_calibration(
    options: Mapping[str, Any], calibration: Mapping[str, Any] | None
) -> Mapping[str, Any] | None:
    """The version's calibration when it decides L: not overridden by ``fast_min_candidates``
    or ``fast_ignore_calibration``."""
    if "fast_min_candidates" in options or options.get("fast_ignore_calibration", False):
        return None
    return calibration or None


def fast_plan(
    top_k: int,
    offset: int,
    options: Mapping[str, Any],
    n: int | None = None,
    calibration: Mapping[str, Any] | None = None,
) -> tuple[int, int, bool]:
    """``(L, hnsw_ef, exact_prefetch)`` for a ``fast`` query over ``n`` points.

    L (prefetched candidates): ``fast_min_candidates`` when given; else the version's own
    ``calibration`` (``extra["fast_calibration"]``, see :mod:`retrieval.index.calibrate`) when
    it found an L for a recall target at least ``fast_recall`` (default 0.99); else the row of
    :data:`FAST_RECALL_TABLE` for ``fast_recall``; in every case at least
    ``fast_factor`` (default 8) x ``offset + top_k``, so deeper pages get more candidates.
    hnsw_ef: ``fast_hnsw_ef`` when given, otherwise ``fast_ef_factor`` (default 1.0) x L and
    never below L (HNSW returns at most ef points: ef < L silently shrinks the candidate list).
    exact_prefetch: ``fast_exact_prefetch`` True/False, or ``"auto"`` (default): exact when
    ``L x fast_exact_prefetch_ratio`` (default :data:`EXACT_PREFETCH_RATIO`) >= ``n``.
    """
    target = float(options.get("fast_recall", DEFAULT_FAST_RECALL))
    cal = _own_calibration(options, calibration)
    if "fast_min_candidates" in options:
        base = int(options["fast_min_candidates"])
    elif cal and cal.get("L") and target <= float(cal.get("recall_target", 0.0)):
        base = int(cal["L"])
    else:
        base = FAST_RECALL_TABLE[-1][1]
        for rec, cand in FAST_RECALL_TABLE:
            if target <= rec:
                base = cand
                break
    factor = int(options.get("fast_factor", 8))
    limit_l = max(1, base, factor * (offset + top_k))
    if "fast_hnsw_ef" in options:
        ef = int(options["fast_hnsw_ef"])
    else:
        ef = int(math.ceil(float(options.get("fast_ef_factor", 1.0)) * limit_l))
    exact = options.get("fast_exact_prefetch", "auto")
    if exact == "auto":
        ratio = float(options.get("fast_exact_prefetch_ratio", EXACT_PREFETCH_RATIO))
        exact = n is not None and limit_l * ratio >= n
    return limit_l, max(ef, limit_l), bool(exact)


#: ``auto`` uses ``fast`` only when L is below this share of the gallery: the rerank costs about
#: 5x more per candidate than the ``exact`` int8 scan per point (100k: L=8000 took 37.5 ms,
#: the full exact scan 94.6 ms), so a larger L is slower than ``exact``.
AUTO_FAST_MAX_SHARE = 0.25


def auto_mode(
    top_k: int,
    offset: int,
    n: int,
    options: Mapping[str, Any],
    calibration: Mapping[str, Any] | None = None,
) -> str:
    """``exact`` or ``fast`` for ``mode="auto"`` over ``n`` points: ``fast`` from
    ``auto_fast_min_points`` (20,000) points on, only when its L is below
    ``auto_fast_max_share`` (0.25) of ``n``, and never when the version's calibration found no L
    reaching the recall target."""
    if n < int(options.get("auto_fast_min_points", AUTO_FAST_MIN_POINTS)):
        return "exact"
    cal = _own_calibration(options, calibration)
    target = float(options.get("fast_recall", DEFAULT_FAST_RECALL))
    if cal and not cal.get("L") and target >= float(cal.get("recall_target", 1.0)):
        # this version's own measurement found no L that reaches the target (tokens far from
        # their mean): the table's L would return a recall well below it, so search exactly
        return "exact"
    limit_l = fast_plan(top_k, offset, options, n, calibration)[0]
    share = float(options.get("auto_fast_max_share", AUTO_FAST_MAX_SHARE))
    return "fast" if limit_l < share * n else "exact"


def uncalibrated_reason(
    options: Mapping[str, Any], calibration: Mapping[str, Any] | None
) -> str | None:
    """Why ``fast`` cannot keep its recall promise on a version, or None when it can: the
    version's own calibration found no L reaching the target (``fast_recall``, default 0.99)
    for a target at least as high as the one asked for. The caller's ``fast_min_candidates`` /
    ``fast_ignore_calibration`` overrides take the responsibility (None)."""
    cal = _own_calibration(options, calibration)
    target = float(options.get("fast_recall", DEFAULT_FAST_RECALL))
    if not cal or cal.get("L") or target < float(cal.get("recall_target", 1.0)):
        return None
    why = cal.get("reason") or "its calibration found none"
    return (
        f"no prefetch size L meets recall@{cal.get('top_k', 10)} >= {target:g} on this version "
        f"({why}; calibrated on {cal.get('source', 'proxy')} queries): searched exactly"
    )


def resolve_mode(
    mode: str,
    top_k: int,
    offset: int,
    n: int,
    options: Mapping[str, Any],
    calibration: Mapping[str, Any] | None = None,
) -> tuple[str, str]:
    """The mode a search really runs (``"exact"`` or ``"fast"``) and why it differs from the
    one asked for when that matters ("" otherwise).

    ``fast`` promises its recall target: on a version whose calibration found no L meeting it,
    an explicit ``fast`` runs exactly (as ``auto`` does), and the reason says so. ``fast`` with
    L >= the gallery is exact too (the candidate list would hold every point).
    """
    if mode == "exact":
        return "exact", ""
    why = uncalibrated_reason(options, calibration)
    if mode == "auto":
        got = auto_mode(top_k, offset, n, options, calibration)
        big = n >= int(options.get("auto_fast_min_points", AUTO_FAST_MIN_POINTS))
        return got, (why or "") if got == "exact" and big else ""
    if why is not None:
        return "exact", why
    limit_l = fast_plan(top_k, offset, options, n, calibration)[0]
    if limit_l >= n:
        return "exact", f"L = {limit_l} >= the {n} points: fast is exact here"
    return "fast", ""


_NOTED: set[tuple[str, str]] = set()


def note_exact_fallback(what: str, reason: str) -> None:
    """Log (WARNING, once per ``what`` and reason) that a ``fast`` search ran exactly."""
    key = (what, reason)
    if key not in _NOTED:
        _NOTED.add(key)
        logging.getLogger("retrieval.index").warning("%s: fast search: %s", what, reason)


#: int8 candidates rescored with the float originals: ``oversampling x (offset + top_k)``. On the
#: demo model's real tokens (many near-equal scores) oversampling 2 gave recall@10 0.92 for
#: `exact`, 8 gave 0.996 and 32 gave 1.000 at about the same latency (5-6 ms, 7.5k images;
#: docs/benchmarks.md). Default: 32, capped so that at most RESCORE_BUDGET points are rescored
#: (never below 2): top_k 10 -> 32x, 100 -> 20x, 1000 -> 2x.
DEFAULT_OVERSAMPLING = 32.0
RESCORE_BUDGET = 2000


def oversampling_for(top_k: int, offset: int, options: Mapping[str, Any]) -> float:
    """Rescoring oversampling for one search (``options["oversampling"]`` overrides)."""
    if "oversampling" in options:
        return float(options["oversampling"])
    wanted = max(1, top_k + offset)
    return float(max(2.0, min(DEFAULT_OVERSAMPLING, RESCORE_BUDGET / wanted)))


@dataclass(frozen=True)
class SearchPlan:
    """One search (or batch), planned: what every backend turns into its engine request.

    ``mode``: ``"exact"`` (int8 scan of ``tokens`` + rescoring) or ``"fast"`` (prefetch
    ``limit`` candidates by ``pooled`` with ``hnsw_ef`` / an exact scan when
    ``exact_prefetch``, then MaxSim on ``tokens``); ``note``: why the mode differs from the one
    asked for, when that matters (see :func:`resolve_mode`).
    """

    mode: str
    top_k: int
    offset: int
    conditions: list[Condition] = field(default_factory=list)
    limit: int = 0
    hnsw_ef: int = 0
    exact_prefetch: bool = False
    oversampling: float = DEFAULT_OVERSAMPLING
    note: str = ""
    payload: PayloadSpec = DEFAULT_SEARCH_PAYLOAD  # what of each hit's payload comes back


def plan_search(
    mode: str,
    top_k: int,
    offset: int,
    n: int,
    conditions: list[Condition],
    options: Mapping[str, Any],
    calibration: Mapping[str, Any] | None,
    what: str,
    payload: PayloadSpec = DEFAULT_SEARCH_PAYLOAD,
) -> SearchPlan:
    """The plan of a search in ``mode`` over ``n`` points; an explicit ``fast`` that runs
    exactly on a version without a usable L is logged once (``what`` names the version)."""
    run, why = resolve_mode(mode, top_k, offset, n, options, calibration)
    if why and mode == "fast" and uncalibrated_reason(options, calibration):
        note_exact_fallback(what, why)
    limit_l, ef, exact_pre = fast_plan(top_k, offset, options, n, calibration)
    return SearchPlan(
        mode=run,
        top_k=top_k,
        offset=offset,
        conditions=conditions,
        limit=limit_l,
        hnsw_ef=ef,
        exact_prefetch=exact_pre,
        oversampling=oversampling_for(top_k, offset, options),
        note=why,
        payload=payload,
    )
