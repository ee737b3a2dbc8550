"""Plain (Streamlit-free) pieces of the UI: the reference, history steps, upload checks, filters.

Kept apart from ``app.py`` so they are unit-testable without a browser or a server.
"""

from __future__ import annotations

import hashlib
import io
import logging
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from retrieval.imageio import IMAGE_EXTENSIONS

logger = logging.getLogger(__name__)

# Image types offered by the uploader: the formats the indexer reads too (one list).
UPLOAD_TYPES: tuple[str, ...] = tuple(ext.lstrip(".") for ext in IMAGE_EXTENSIONS)
MAX_UPLOAD_PIXELS = 64_000_000  # refuse decompression bombs before sending anything


@dataclass(frozen=True)
class Reference:
    """The reference image of a query: uploaded bytes or a gallery id."""

    kind: Literal["upload", "gallery"]
    label: str  # what the page shows (file name or gallery id)
    data: bytes | None = field(default=None, repr=False)  # uploaded bytes (kind == "upload")
    gallery_id: str | None = None  # gallery id (kind == "gallery")

    @classmethod
    def upload(cls, name: str, data: bytes) -> Reference:
        return cls(kind="upload", label=name or "upload", data=data)

    @classmethod
    def gallery(cls, image_id: str) -> Reference:
        return cls(kind="gallery", label=image_id, gallery_id=image_id)

    @property
    def key(self) -> str:
        """Stable identity (for widget keys and comparisons)."""
        if self.kind == "gallery":
            return f"gallery:{self.gallery_id}"
        return "upload:" + hashlib.sha1(self.data or b"").hexdigest()[:12]

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

    def summary(self) -> str:
        ref = self.reference.label if self.reference else "(text only)"
        return f"{ref} + “{self.text}”"


class UploadError(ValueError):
    """A file the UI will not send (too big, not an image)."""


def check_upload(data: bytes, max_bytes: int) -> tuple[int, int]:
    """Validate uploaded bytes before they go to the server; returns (width, height).

    Raises :class:`UploadError` with a message for the page.
    """
    if not data:
        raise UploadError("The uploaded file is empty.")
    if len(data) > max_bytes:
        raise UploadError(
            f"The uploaded file is {len(data) / 2**20:.1f} MiB; the limit is {max_bytes / 2**20:.1f} MiB."
        )
    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                width, height = img.size
                if width * height > MAX_UPLOAD_PIXELS:
                    raise UploadError(
                        f"The image is {width}x{height} pixels; the limit is {MAX_UPLOAD_PIXELS:,} pixels."
                    )
                img.verify()  # structure check without a full decode
            with Image.open(io.BytesIO(data)) as img:
                img.load()  # verify() misses truncated pixel data
    except UploadError:
        raise
    except (
        UnidentifiedImageError,
        Image.DecompressionBombError,
        Image.DecompressionBombWarning,
    ) as exc:
        raise UploadError(f"The uploaded file is not a usable image ({exc}).") from exc
    except (OSError, ValueError, SyntaxError) as exc:  # truncated/corrupt files
        raise UploadError(f"The uploaded file is not a readable image ({exc}).") from exc
    return width, height


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
