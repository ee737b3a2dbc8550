"""Conversions between protobuf messages and plain Python values (shared by client and server).

Kept free of torch/numpy-heavy imports so the client stays light.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from google.protobuf import struct_pb2

from server._generated.cir.v1 import search_pb2 as pb

MODES: dict[str, int] = {
    "auto": pb.SEARCH_MODE_AUTO,
    "exact": pb.SEARCH_MODE_EXACT,
    "fast": pb.SEARCH_MODE_FAST,
}
MODE_NAMES: dict[int, str] = {
    pb.SEARCH_MODE_UNSPECIFIED: "auto",
    pb.SEARCH_MODE_AUTO: "auto",
    pb.SEARCH_MODE_EXACT: "exact",
    pb.SEARCH_MODE_FAST: "fast",
}
KINDS: dict[str, int] = {"thumbnail": pb.IMAGE_KIND_THUMBNAIL, "original": pb.IMAGE_KIND_ORIGINAL}


def _clean(value: Any) -> Any:
    """Struct numbers are doubles: whole numbers come back as int (ids, sizes, years)."""
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return int(value)
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_clean(v) for v in value]
    return value


def _value_to_py(v: struct_pb2.Value) -> Any:
    kind = v.WhichOneof("kind")
    if kind == "struct_value":
        return struct_to_dict(v.struct_value)
    if kind == "list_value":
        return [_value_to_py(x) for x in v.list_value.values]
    if kind == "number_value":
        return _clean(v.number_value)
    if kind == "string_value":
        return v.string_value
    if kind == "bool_value":
        return v.bool_value
    return None


def struct_to_dict(s: struct_pb2.Struct) -> dict[str, Any]:
    """Struct -> dict (whole numbers as int)."""
    return {k: _value_to_py(v) for k, v in s.fields.items()}


def _jsonable(value: Any) -> Any:
    """Make a payload value Struct-compatible (tuples -> lists, numpy scalars -> Python)."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, (int, float)):
        return float(value) if math.isfinite(float(value)) else None
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    item = getattr(value, "item", None)  # numpy scalar
    if callable(item):
        return _jsonable(item())
    return str(value)


def dict_to_struct(d: Mapping[str, Any], out: struct_pb2.Struct | None = None) -> struct_pb2.Struct:
    """dict -> Struct (values made JSON-compatible first)."""
    s = out if out is not None else struct_pb2.Struct()
    s.update(_jsonable(dict(d)))
    return s


__all__ = ["KINDS", "MODES", "MODE_NAMES", "dict_to_struct", "struct_to_dict"]
