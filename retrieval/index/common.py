"""Backend-independent helpers: id mapping, input validation, filter parsing, candidate sizing."""

from __future__ import annotations

import logging
import math
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from retrieval.index.api import (
    FIELD_TYPES,
    ID_KEY,
    MAX_TOP_K,
    SEARCH_MODES,
    USER_ID_KEY,
    FieldType,
)
from retrieval.index.errors import InvalidFilterError, InvalidQueryError, ModelMismatchError

#: Namespace of the uuid5 point ids made from caller ids that are not uuids.
ID_NAMESPACE = uuid.UUID("6f1c2d8e-4b7a-5c3e-9d2f-0a1b2c3d4e5f")
RANGE_OPS = ("gte", "gt", "lte", "lt")


def point_id(caller_id: str) -> str:
    """Deterministic Qdrant point id (a uuid string) for a caller id."""
    if not isinstance(caller_id, str) or not caller_id:
        raise InvalidQueryError(f"ids must be non-empty strings, got {caller_id!r}")
    try:
        return str(uuid.UUID(caller_id))
    except ValueError:
        return str(uuid.uuid5(ID_NAMESPACE, caller_id))


def validate_fields(fields: Mapping[str, Any]) -> dict[str, FieldType]:
    out: dict[str, FieldType] = {}
    for key, kind in fields.items():
        if not isinstance(key, str) or not key or key.startswith("_"):
            raise InvalidFilterError(
                f"bad filterable field name {key!r} (non-empty, no '_' prefix)"
            )
        if kind not in FIELD_TYPES:
            raise InvalidFilterError(f"field {key!r}: type {kind!r} is not one of {FIELD_TYPES}")
        out[key] = kind
    return out


def normalise_tokens(tokens: Any, n: int, shape: tuple[int, int] | None) -> np.ndarray:
    """Validate ``[N, Q, D]`` tokens and L2-normalise each token (float32, C-contiguous)."""
    arr = np.asarray(tokens)
    if arr.ndim != 3 or arr.shape[0] != n:
        raise InvalidQueryError(f"tokens must be [N={n}, Q, D], got shape {tuple(arr.shape)}")
    if not np.issubdtype(arr.dtype, np.floating):
        raise InvalidQueryError(f"tokens must be floating point, got {arr.dtype}")
    if shape is not None and tuple(arr.shape[1:]) != tuple(shape):
        raise ModelMismatchError(
            f"tokens have shape [Q, D]={list(arr.shape[1:])} but this index version stores "
            f"{list(shape)}: vectors from another encoder/preset cannot be mixed in"
        )
    arr = arr.astype(np.float32, copy=False)
    if not np.isfinite(arr).all():
        raise InvalidQueryError("tokens contain NaN or infinite values")
    norms = np.linalg.norm(arr, axis=-1, keepdims=True)
    if (norms < 1e-12).any():
        raise InvalidQueryError("tokens contain an all-zero token (cannot be normalised)")
    return np.ascontiguousarray(arr / norms)


def pooled_of(tokens: np.ndarray) -> np.ndarray:
    """Normalised mean of the (normalised) tokens: ``[N, Q, D] -> [N, D]``."""
    p = tokens.mean(axis=1)
    norms = np.linalg.norm(p, axis=-1, keepdims=True)
    return np.ascontiguousarray(p / np.maximum(norms, 1e-12), dtype=np.float32)


def normalise_queries(query: Any, dim: int | None, batch: bool) -> np.ndarray:
    """Validate a ``[D]`` query (or ``[M, D]`` batch) and normalise it; returns ``[M, D]``."""
    arr = np.asarray(query)
    want = 2 if batch else 1
    if arr.ndim != want:
        what = "[M, D] batch" if batch else "[D] vector"
        raise InvalidQueryError(f"query must be a {what}, got shape {tuple(arr.shape)}")
    if not np.issubdtype(arr.dtype, np.floating) and not np.issubdtype(arr.dtype, np.integer):
        raise InvalidQueryError(f"query must be numeric, got {arr.dtype}")
    arr = np.atleast_2d(arr.astype(np.float32))
    if dim is not None and arr.shape[1] != dim:
        raise InvalidQueryError(f"query has dimension {arr.shape[1]}, the index stores D={dim}")
    if not np.isfinite(arr).all():
        raise InvalidQueryError("query contains NaN or infinite values")
    norms = np.linalg.norm(arr, axis=1, keepdims=True)
    if (norms < 1e-12).any():
        raise InvalidQueryError("query is an all-zero vector")
    return np.ascontiguousarray(arr / norms)


def check_paging(top_k: int, offset: int, mode: str) -> None:
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= MAX_TOP_K:
        raise InvalidQueryError(f"top_k must be an integer in [1, {MAX_TOP_K}], got {top_k!r}")
    if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
        raise InvalidQueryError(f"offset must be an integer >= 0, got {offset!r}")
    if offset + top_k > 10 * MAX_TOP_K:
        raise InvalidQueryError(f"offset + top_k must be <= {10 * MAX_TOP_K}")
    if mode not in SEARCH_MODES:
        raise InvalidQueryError(f"mode must be one of {SEARCH_MODES}, got {mode!r}")


def check_payloads(payloads: Sequence[Mapping[str, Any]] | None, n: int) -> list[dict[str, Any]]:
    if payloads is None:
        return [{} for _ in range(n)]
    if len(payloads) != n:
        raise InvalidQueryError(f"got {n} ids but {len(payloads)} payloads")
    out = []
    for p in payloads:
        if not isinstance(p, Mapping):
            raise InvalidQueryError(f"payload must be a dict, got {type(p).__name__}")
        bad = [k for k in p if not isinstance(k, str) or k.startswith("_")]
        if bad:
            raise InvalidQueryError(f"payload keys must be strings without a '_' prefix: {bad}")
        out.append(dict(p))
    return out


def check_ids(ids: Sequence[str]) -> list[str]:
    if isinstance(ids, str):
        raise InvalidQueryError("ids must be a list of strings, not one string")
    out = list(ids)
    for i in out:
        if not isinstance(i, str) or not i:
            raise InvalidQueryError(f"ids must be non-empty strings, got {i!r}")
    return out


MAX_SCROLL = 10_000


def check_count(n: int, what: str = "n") -> int:
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_SCROLL:
        raise InvalidQueryError(f"{what} must be an integer in [1, {MAX_SCROLL}], got {n!r}")
    return n


def payload_spec(spec: Any) -> tuple[str, list[str]]:
    """Parse a ``PayloadSelector`` into ``("all", [])``, ``("include", keys)`` or
    ``("exclude", keys)``. The internal id key is always kept (include gets it added; exclude
    never removes it)."""
    if spec is True:
        return "all", []
    if spec is False or spec is None:
        return "include", [ID_KEY]
    if isinstance(spec, Mapping):
        if set(spec) != {"exclude"}:
            raise InvalidQueryError(
                f"with_payload as a dict must be {{'exclude': [keys]}}, got {dict(spec)!r}"
            )
        keys = _keys(spec["exclude"])
        return ("exclude", keys) if keys else ("all", [])
    keys = _keys(spec)
    return "include", [ID_KEY, *(k for k in keys if k != ID_KEY)]


def _keys(keys: Any) -> list[str]:
    if isinstance(keys, str) or not isinstance(keys, Sequence):
        raise InvalidQueryError(
            "with_payload must be True, False, a list of keys or {'exclude': [keys]}, "
            f"got {keys!r}"
        )
    out = []
    for k in keys:
        if not isinstance(k, str) or not k or k.startswith("_"):
            raise InvalidQueryError(f"payload key must be a non-empty string without '_': {k!r}")
        out.append(k)
    return out


@dataclass(frozen=True)
class Condition:
    """One parsed filter condition (backend-neutral)."""

    key: str
    kind: str  # "eq" | "any" | "range"
    value: Any  # scalar | list | dict of RANGE_OPS -> float


def _check_scalar(key: str, ftype: str, v: Any) -> Any:
    ok = {
        "keyword": isinstance(v, str),
        "integer": isinstance(v, int) and not isinstance(v, bool),
        "float": isinstance(v, int | float) and not isinstance(v, bool),
        "bool": isinstance(v, bool),
    }[ftype]
    if not ok:
        raise InvalidFilterError(f"filter on {ftype} field {key!r}: bad value {v!r}")
    return v


def parse_filter(flt: Mapping[str, Any] | None, fields: Mapping[str, str]) -> list[Condition]:
    """Parse the filter dialect into conditions; every key must be a declared field."""
    if flt is None:
        return []
    if not isinstance(flt, Mapping):
        raise InvalidFilterError(f"filter must be a dict of field -> condition, got {flt!r}")
    conds: list[Condition] = []
    for key, spec in flt.items():
        if key not in fields:
            declared = ", ".join(f"{k} ({t})" for k, t in sorted(fields.items())) or "none"
            raise InvalidFilterError(
                f"cannot filter on {key!r}: not a declared filterable field (declared: {declared})"
            )
        ftype = fields[key]
        if isinstance(spec, list | tuple):
            conds.append(_any(key, ftype, spec))
        elif isinstance(spec, Mapping):
            unknown = set(spec) - set(RANGE_OPS) - {"eq", "any"}
            if unknown or not spec:
                raise InvalidFilterError(
                    f"filter on {key!r}: unknown operators {sorted(unknown) or '(empty)'}; use "
                    "eq, any, gte, gt, lte, lt"
                )
            if "eq" in spec:
                conds.append(_eq(key, ftype, spec["eq"]))
            if "any" in spec:
                if not isinstance(spec["any"], list | tuple):
                    raise InvalidFilterError(f"filter on {key!r}: 'any' wants a list")
                conds.append(_any(key, ftype, spec["any"]))
            rng = {op: spec[op] for op in RANGE_OPS if op in spec}
            if rng:
                if ftype not in ("integer", "float"):
                    raise InvalidFilterError(f"range filter on {ftype} field {key!r}")
                for op, v in rng.items():
                    if isinstance(v, bool) or not isinstance(v, int | float) or math.isnan(v):
                        raise InvalidFilterError(f"filter on {key!r}: {op} wants a number")
                conds.append(Condition(key, "range", {k: float(v) for k, v in rng.items()}))
        else:
            conds.append(_eq(key, ftype, spec))
    return conds


def user_id_condition(user_id: str) -> Condition:
    """The condition of a user-id lookup (on :data:`USER_ID_KEY`, declared or not)."""
    if not isinstance(user_id, str) or not user_id:
        raise InvalidQueryError(f"user_id must be a non-empty string, got {user_id!r}")
    return Condition(USER_ID_KEY, "eq", user_id)


def _eq(key: str, ftype: str, v: Any) -> Condition:
    _check_scalar(key, ftype, v)
    if ftype == "float":  # exact float equality as a closed range (MatchValue has no floats)
        return Condition(key, "range", {"gte": float(v), "lte": float(v)})
    return Condition(key, "eq", v)


def _any(key: str, ftype: str, values: Sequence[Any]) -> Condition:
    if not values:
        raise InvalidFilterError(f"filter on {key!r}: empty any-of list")
    if ftype not in ("keyword", "integer"):
        raise InvalidFilterError(f"any-of filter on {ftype} field {key!r} (keyword/integer only)")
    return Condition(key, "any", [_check_scalar(key, ftype, v) for v in values])


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
#: ``VersionMeta.extra`` key of a version's own fast-L calibration (retrieval.index.calibrate).
CALIBRATION_KEY = "fast_calibration"
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
    from retrieval.index.api import AUTO_FAST_MIN_POINTS

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
        from retrieval.index.api import AUTO_FAST_MIN_POINTS

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


def fast_candidates(top_k: int, offset: int, options: Mapping[str, Any]) -> int:
    """Prefetch size L for ``fast`` (see :func:`fast_plan`)."""
    return fast_plan(top_k, offset, options)[0]


def strip_payload(payload: Mapping[str, Any] | None) -> tuple[str, dict[str, Any]]:
    """Split a stored payload into (caller id, visible payload)."""
    p = dict(payload or {})
    cid = p.pop(ID_KEY, None)
    # keys with a "_" prefix are internal (callers cannot write them)
    return (str(cid) if cid is not None else ""), {k: v for k, v in p.items() if k[:1] != "_"}


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
