"""Input validation and the conversions every backend shares: caller ids -> point ids, tokens
and queries checked and L2-normalised, paging and payload selectors checked, stored payloads
split into (caller id, visible payload).

Raises :class:`~retrieval.index.errors.InvalidQueryError` (and ``ModelMismatchError`` for
tokens of another shape); never touches an engine.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from retrieval.index.api import ID_KEY, MAX_SCROLL, MAX_TOP_K, SEARCH_MODES, Hit, Record
from retrieval.index.errors import InvalidQueryError, ModelMismatchError

#: Namespace of the uuid5 point ids made from caller ids that are not uuids.
ID_NAMESPACE = uuid.UUID("6f1c2d8e-4b7a-5c3e-9d2f-0a1b2c3d4e5f")

#: A parsed ``PayloadSelector``: ``("all", [])``, ``("include", keys)`` or ``("exclude", keys)``.
PayloadSpec = tuple[str, list[str]]


def point_id(caller_id: str) -> str:
    """Deterministic Qdrant point id (a uuid string) for a caller id."""
    if not isinstance(caller_id, str) or not caller_id:
        raise InvalidQueryError(f"ids must be non-empty strings, got {caller_id!r}")
    try:
        return str(uuid.UUID(caller_id))
    except ValueError:
        return str(uuid.uuid5(ID_NAMESPACE, caller_id))


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


def tokens_shape(tokens: Any) -> tuple[int, int]:
    """``(Q, D)`` of ``[N, Q, D]`` tokens (the shape a first upsert gives a new version)."""
    arr = np.asarray(tokens)
    if arr.ndim != 3:
        normalise_tokens(arr, len(arr), None)  # raises a clear error
    return int(arr.shape[1]), int(arr.shape[2])


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


def check_count(n: int, what: str = "n") -> int:
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_SCROLL:
        raise InvalidQueryError(f"{what} must be an integer in [1, {MAX_SCROLL}], got {n!r}")
    return n


def payload_spec(spec: Any) -> PayloadSpec:
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


def strip_payload(payload: Mapping[str, Any] | None) -> tuple[str, dict[str, Any]]:
    """Split a stored payload into (caller id, visible payload)."""
    p = dict(payload or {})
    cid = p.pop(ID_KEY, None)
    # keys with a "_" prefix are internal (callers cannot write them)
    return (str(cid) if cid is not None else ""), {k: v for k, v in p.items() if k[:1] != "_"}


def to_record(
    pid: Any, payload: Mapping[str, Any] | None, vector: Any, with_vectors: bool
) -> Record:
    """A stored point (engine id, payload, named vectors or None) as a :class:`Record`."""
    cid, visible = strip_payload(payload)
    toks = None
    if with_vectors and vector:
        try:
            toks = np.asarray(vector["tokens"], dtype=np.float32)
        except (KeyError, TypeError, IndexError):
            toks = None
    return Record(cid or str(pid), visible, toks)


def to_hit(payload: Mapping[str, Any] | None, score: float) -> Hit:
    cid, visible = strip_payload(payload)
    return Hit(cid, float(score), visible)
