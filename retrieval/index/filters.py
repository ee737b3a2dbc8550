"""The filter dialect (and the declared filterable fields it runs on), parsed into
backend-neutral :class:`Condition` lists that each backend turns into its engine's filter.

``{"category": "bag", "price": {"gte": 10, "lt": 50}, "color": ["red", "blue"]}``: per field a
scalar (equality), a list (any-of), or a dict with ``gte``/``gt``/``lte``/``lt`` (range, numeric
fields) and/or ``eq`` / ``any``. All conditions must hold (AND). Only declared fields can be
filtered on (each has a payload index); anything else is :class:`InvalidFilterError`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from retrieval.index.api import FIELD_TYPES, USER_ID_KEY, FieldType
from retrieval.index.errors import InvalidFilterError, InvalidQueryError

RANGE_OPS = ("gte", "gt", "lte", "lt")


@dataclass(frozen=True)
class Condition:
    """One parsed filter condition (backend-neutral)."""

    key: str
    kind: str  # "eq" | "any" | "range"
    value: Any  # scalar | list | dict of RANGE_OPS -> float


def validate_fields(fields: Mapping[str, Any]) -> dict[str, FieldType]:
    """Declared filterable fields, checked: names without a ``_`` prefix, types of FIELD_TYPES."""
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
            conds.extend(_operators(key, ftype, spec))
        else:
            conds.append(_eq(key, ftype, spec))
    return conds


def _operators(key: str, ftype: str, spec: Mapping[str, Any]) -> list[Condition]:
    unknown = set(spec) - set(RANGE_OPS) - {"eq", "any"}
    if unknown or not spec:
        raise InvalidFilterError(
            f"filter on {key!r}: unknown operators {sorted(unknown) or '(empty)'}; use "
            "eq, any, gte, gt, lte, lt"
        )
    conds = []
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
