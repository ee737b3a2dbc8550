"""Plain (Streamlit-free) pieces of the UI: the reference, history steps, upload checks, filters.

Kept apart from ``app.py`` so they are unit-testable without a browser or a server.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from retrieval.imageio import IMAGE_EXTENSIONS

logger = logging.getLogger(__name__)

# Image types offered by the uploader: the formats the indexer reads too (one list).
UPLOAD_TYPES: tuple[str, ...] = tuple(ext.lstrip(".") for ext in IMAGE_EXTENSIONS)
MAX_UPLOAD_PIXELS = 36_000_000  # the server's default max_image_pixels (Info overrides it)
DEFAULT_UPLOAD_BYTES = 10 * 2**20  # the server's default max_image_bytes (Info overrides it)


@dataclass(frozen=True)
class Reference:
    """The reference image of a query: uploaded bytes or a gallery image."""

    kind: Literal["upload", "gallery"]
    label: str  # what the page shows (file name, or the image's user id / point id)
    data: bytes | None = field(default=None, repr=False)  # uploaded bytes (kind == "upload")
    gallery_id: str | None = None  # the id sent as reference_id (point id or user id)
    user_id: str = ""  # the gallery image's own id, when known

    @classmethod
    def upload(cls, name: str, data: bytes) -> Reference:
        return cls(kind="upload", label=name or "upload", data=data)

    @classmethod
    def gallery(cls, image_id: str, user_id: str = "") -> Reference:
        return cls(kind="gallery", label=user_id or image_id, gallery_id=image_id, user_id=user_id)

    @property
    def key(self) -> str:
        """Stable identity (for widget keys and comparisons)."""
        if self.kind == "gallery":
            return f"gallery:{self.gallery_id}"
        return "upload:" + hashlib.sha1(self.data or b"").hexdigest()[:12]

    @property
    def sha256(self) -> str:
        """sha256 of the uploaded bytes (the indexer stores the same hash of each file)."""
        return hashlib.sha256(self.data).hexdigest() if self.data else ""

    def is_hit(
        self, hit_id: str, hit_user_id: str = "", payload: Mapping[str, Any] | None = None
    ) -> bool:
        """Whether a result is this reference itself: the same gallery image (by point id or
        user id), or an upload whose bytes are the indexed file's (same sha256)."""
        if self.kind == "gallery":
            ids = {self.gallery_id, self.user_id} - {None, ""}
            return hit_id in ids or (bool(hit_user_id) and hit_user_id in ids)
        sha = (payload or {}).get("sha256")
        return isinstance(sha, str) and bool(sha) and sha == self.sha256

    def describe(self) -> str:
        return (
            f"gallery image `{self.label}`"
            if self.kind == "gallery"
            else f"uploaded `{self.label}`"
        )


@dataclass(frozen=True)
class Query:
    """Everything that defines a result list (one history step)."""

    reference: Reference | None
    text: str
    top_k: int = 12
    mode: str = "auto"
    filter: dict[str, Any] = field(default_factory=dict)
    filter_widgets: dict[str, Any] = field(default_factory=dict)  # widget values to restore
    rerank: bool = True  # the server's second stage (when it has one); False: first stage only

    def summary(self, max_text: int = 60) -> str:
        """One line for headings and history: the reference and the text, shortened."""
        ref = self.reference.label if self.reference else "(text only)"
        return f"{ref} + “{shorten(self.text, max_text)}”"


def shorten(text: str, limit: int) -> str:
    """``text`` cut at a word boundary to at most ``limit`` characters, with an ellipsis."""
    text = " ".join(text.split())
    if len(text) <= limit:
        return text
    cut = text[: limit - 1]
    if " " in cut[limit // 2 :]:
        cut = cut[: cut.rfind(" ")]
    return cut.rstrip(" ,.;:") + "…"


def human_bytes(n: int) -> str:
    """Bytes the way Streamlit's uploader counts them (its "MB" is 2**20 bytes)."""
    if n >= 2**20:
        return f"{n / 2**20:.1f}".removesuffix(".0") + " MB"
    if n >= 1024:
        return f"{n / 1024:.0f} KB"
    return f"{n} bytes"


def upload_limit(server_bytes: int, cap_bytes: int | None) -> int:
    """The one upload limit: the server's ``max_image_bytes`` (0: unknown), lowered by the UI's
    own cap (``cir ui --max-upload-mb``) when that is set; the server's default when neither
    is known."""
    known = [b for b in (server_bytes, cap_bytes or 0) if b > 0]
    return min(known) if known else DEFAULT_UPLOAD_BYTES


class UploadError(ValueError):
    """A file the UI will not send (too big, not an image)."""


def check_upload(
    data: bytes, max_bytes: int, max_pixels: int = MAX_UPLOAD_PIXELS
) -> tuple[int, int]:
    """Validate uploaded bytes before they go to the server (the server's own limits, the
    server's own decoder); returns (width, height).

    Raises :class:`UploadError` with a message for the page that says what the file is and why
    it was refused (never a Python object's repr).
    """
    from retrieval.imageio import ImageDecodeError, decode_image

    if not data:
        raise UploadError("The file is empty.")
    if len(data) > max_bytes:
        raise UploadError(
            f"The file is {human_bytes(len(data))}; the server accepts at most "
            f"{human_bytes(max_bytes)}."
        )
    try:
        image = decode_image(data, max_pixels=max_pixels)
    except ImageDecodeError as exc:
        if exc.reason == "too-many-pixels":
            raise UploadError(
                f"The image is too large: {exc.detail} (the server's limit)."
            ) from None
        detail = exc.detail or exc.reason
        raise UploadError(f"{detail[:1].upper()}{detail[1:]}.") from None
    return image.width, image.height


# ---------------------------------------------------------------------------------- filters
def parse_keyword(raw: str) -> str | list[str] | None:
    """ "red" -> "red"; "red, blue" -> ["red", "blue"] (any of); "" -> None."""
    parts = [p.strip() for p in (raw or "").split(",")]
    parts = [p for p in parts if p]
    if not parts:
        return None
    return parts[0] if len(parts) == 1 else parts


def build_filter(fields: Mapping[str, str], values: Mapping[str, Any]) -> dict[str, Any]:
    """The server's filter dict from the widget values.

    ``fields``: field -> type from Info. ``values``: field -> widget value, where keyword is a
    string (comma-separated any-of) or a list, integer/float a ``(min, max)`` pair (None = open),
    bool one of "any"/"true"/"false". Empty widgets add no condition.
    """
    out: dict[str, Any] = {}
    for name, ftype in fields.items():
        value = values.get(name)
        if value is None:
            continue
        if ftype == "keyword":
            if isinstance(value, list | tuple):
                kw: Any = [str(v) for v in value if str(v).strip()]
                kw = kw[0] if len(kw) == 1 else (kw or None)
            else:
                kw = parse_keyword(str(value))
            if kw is not None:
                out[name] = kw
        elif ftype in ("integer", "float"):
            lo, hi = value if isinstance(value, list | tuple) and len(value) == 2 else (None, None)
            cast = int if ftype == "integer" else float
            rng: dict[str, Any] = {}
            if lo is not None:
                rng["gte"] = cast(lo)
            if hi is not None:
                rng["lte"] = cast(hi)
            if rng:
                out[name] = rng
        elif ftype == "bool":
            if str(value).lower() in ("true", "yes"):
                out[name] = True
            elif str(value).lower() in ("false", "no"):
                out[name] = False
    return out


def filter_problems(fields: Mapping[str, str], values: Mapping[str, Any]) -> list[str]:
    """Human-readable problems in the filter widgets (e.g. min > max)."""
    problems = []
    for name, ftype in fields.items():
        value = values.get(name)
        if ftype in ("integer", "float") and isinstance(value, list | tuple) and len(value) == 2:
            lo, hi = value
            if lo is not None and hi is not None and lo > hi:
                problems.append(f"Filter `{name}`: the minimum {lo} is above the maximum {hi}.")
    return problems


def describe_filter(flt: Mapping[str, Any]) -> str:
    """A filter dict in words: ``{"color": ["red", "blue"], "size": {"gte": 30}}`` ->
    "color is red or blue · size ≥ 30"."""
    ops = {"gte": "≥", "gt": ">", "lte": "≤", "lt": "<"}
    parts = []
    for name, cond in flt.items():
        if isinstance(cond, Mapping):
            bits = []
            if "eq" in cond:
                bits.append(f"{name} is {_word(cond['eq'])}")
            if "any" in cond:
                bits.append(f"{name} is {' or '.join(_word(v) for v in cond['any'])}")
            bits += [f"{name} {ops[op]} {_word(cond[op])}" for op in ops if op in cond]
            parts.append(" and ".join(bits))
        elif isinstance(cond, list | tuple):
            parts.append(f"{name} is {' or '.join(_word(v) for v in cond)}")
        else:
            parts.append(f"{name} is {_word(cond)}")
    return " · ".join(parts)


def _word(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


#: Keyword values offered per field at most (the box still takes any typed value).
MAX_KNOWN_VALUES = 200


def known_values(
    payloads: Iterable[Mapping[str, Any]], fields: Mapping[str, str]
) -> dict[str, list[str]]:
    """The values of each keyword field seen in ``payloads`` (gallery samples, results), sorted,
    for the filter boxes to offer. List values count each element."""
    seen: dict[str, set[str]] = {name: set() for name, t in fields.items() if t == "keyword"}
    for payload in payloads:
        for name, values in seen.items():
            value = payload.get(name)
            items = value if isinstance(value, list | tuple) else [value]
            for v in items:
                usable = isinstance(v, str | int | float) and not isinstance(v, bool)
                if usable and str(v).strip() and len(values) < MAX_KNOWN_VALUES:
                    values.add(str(v))
    return {name: sorted(values, key=str.casefold) for name, values in seen.items()}
