"""The triplet JSONL format shared by every dataset, and its loaders.

A data directory holds::

    train.jsonl, val.jsonl, test.jsonl, [test_unseen.jsonl]   one Triplet per line
    gallery.jsonl                                              one GalleryItem per line
    meta.json                                                  optional, free-form
    images/...                                                 (or absolute paths into a source tree)

Row keys are exactly the dataclass field names (``extra``/``metadata`` may be omitted).
Image paths are relative to the data directory, or absolute (converters may point at the
source tree); :func:`resolve_path` turns either into an absolute path.

Evaluation ranks all gallery items for each triplet of an evaluation split, excluding the
reference itself (``reference_id``); the single correct answer is ``target_id``. Training
uses the ``reference``/``caption``/``target`` paths; train images need not be in the gallery.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

SPLITS = ("train", "val", "test", "test_unseen")
GALLERY_FILE = "gallery.jsonl"
META_FILE = "meta.json"

_TRIPLET_REQUIRED = ("reference", "caption", "target", "type", "reference_id", "target_id")
_TRIPLET_KEYS = frozenset((*_TRIPLET_REQUIRED, "extra"))
_GALLERY_REQUIRED = ("id", "path")
_GALLERY_KEYS = frozenset(("id", "path", "metadata"))


class DataFormatError(ValueError):
    """A JSONL file does not follow the format; the message names ``file:line``."""


@dataclass(frozen=True)
class Triplet:
    """One composed-retrieval query with its answer."""

    reference: str  # image path relative to the data dir (or absolute)
    caption: str  # relative caption (modification text)
    target: str | None  # image path; None where unknown (CIRR test)
    type: str  # add/remove/color/size/shape/move/combo, or "cirr", "fashioniq-dress", ...
    reference_id: str  # gallery id of the reference ("" when not in the gallery)
    target_id: str | None  # gallery id of the target (None when unknown / not in the gallery)
    extra: dict[str, Any] = field(default_factory=dict)  # signatures, CIRR pairid, img_set...

    def to_row(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> Triplet:
        return cls(
            reference=row["reference"],
            caption=row["caption"],
            target=row["target"],
            type=row["type"],
            reference_id=row["reference_id"],
            target_id=row["target_id"],
            extra=dict(row.get("extra") or {}),
        )


@dataclass(frozen=True)
class GalleryItem:
    """One image of the retrieval gallery."""

    id: str  # unique gallery id, e.g. "g000123" or the CIRR/FashionIQ image name
    path: str  # image path relative to the data dir (or absolute)
    metadata: dict[str, Any] = field(default_factory=dict)  # e.g. {"signature": ...}

    def to_row(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> GalleryItem:
        return cls(id=row["id"], path=row["path"], metadata=dict(row.get("metadata") or {}))


# --------------------------------------------------------------------------- JSONL helpers


def write_jsonl(path: str | Path, rows: Iterable[dict[str, Any] | Triplet | GalleryItem]) -> int:
    """Write rows (dicts or dataclasses) one JSON object per line; returns the row count.

    Output is deterministic: keys keep their insertion order, no spaces beyond ``", "``/``": "``,
    UTF-8, ``\\n`` line ends. Written to a temporary file first, then renamed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    n = 0
    with tmp.open("w", encoding="utf-8", newline="\n") as fh:
        for row in rows:
            obj = row.to_row() if isinstance(row, Triplet | GalleryItem) else row
            fh.write(json.dumps(obj, ensure_ascii=False))
            fh.write("\n")
            n += 1
    tmp.replace(path)
    return n


def iter_jsonl(path: str | Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield ``(line_number, object)`` for each non-blank line; bad JSON raises DataFormatError."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    with path.open("r", encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataFormatError(f"{path}:{lineno}: invalid JSON ({exc.msg})") from exc
            if not isinstance(obj, dict):
                raise DataFormatError(
                    f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}"
                )
            yield lineno, obj


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Read every object of a JSONL file (blank lines skipped)."""
    return [obj for _, obj in iter_jsonl(path)]


# --------------------------------------------------------------------------- validation


def _check_keys(
    obj: dict[str, Any], required: tuple[str, ...], allowed: frozenset[str], where: str
) -> None:
    missing = [k for k in required if k not in obj]
    if missing:
        raise DataFormatError(f"{where}: missing key(s) {', '.join(missing)}")
    unknown = sorted(set(obj) - allowed)
    if unknown:
        raise DataFormatError(f"{where}: unknown key(s) {', '.join(unknown)}")


def _check_str(obj: dict[str, Any], key: str, where: str, *, nullable: bool, empty: bool) -> None:
    value = obj[key]
    if value is None:
        if not nullable:
            raise DataFormatError(f"{where}: {key!r} must be a string, got null")
        return
    if not isinstance(value, str):
        raise DataFormatError(f"{where}: {key!r} must be a string, got {type(value).__name__}")
    if not empty and not value:
        raise DataFormatError(f"{where}: {key!r} must not be empty")


def validate_triplet_row(obj: dict[str, Any], where: str) -> Triplet:
    """Check one triplet row and build the Triplet; errors name ``where`` (``file:line``)."""
    _check_keys(obj, _TRIPLET_REQUIRED, _TRIPLET_KEYS, where)
    _check_str(obj, "reference", where, nullable=False, empty=False)
    _check_str(obj, "caption", where, nullable=False, empty=True)
    _check_str(obj, "target", where, nullable=True, empty=False)
    _check_str(obj, "type", where, nullable=False, empty=False)
    _check_str(obj, "reference_id", where, nullable=False, empty=True)
    _check_str(obj, "target_id", where, nullable=True, empty=False)
    if obj.get("extra") is not None and not isinstance(obj["extra"], dict):
        raise DataFormatError(f"{where}: 'extra' must be an object")
    return Triplet.from_row(obj)


def validate_gallery_row(obj: dict[str, Any], where: str) -> GalleryItem:
    """Check one gallery row and build the GalleryItem."""
    _check_keys(obj, _GALLERY_REQUIRED, _GALLERY_KEYS, where)
    _check_str(obj, "id", where, nullable=False, empty=False)
    _check_str(obj, "path", where, nullable=False, empty=False)
    if obj.get("metadata") is not None and not isinstance(obj["metadata"], dict):
        raise DataFormatError(f"{where}: 'metadata' must be an object")
    return GalleryItem.from_row(obj)


# --------------------------------------------------------------------------- loaders


def split_path(data_dir: str | Path, split: str) -> Path:
    """Path of ``{split}.jsonl`` inside ``data_dir``."""
    return Path(data_dir) / f"{split}.jsonl"


def load_triplets(data_dir: str | Path, split: str) -> list[Triplet]:
    """Read and validate ``{data_dir}/{split}.jsonl``.

    Raises FileNotFoundError (naming the file and the splits that exist) or DataFormatError
    (naming ``file:line``).
    """
    path = split_path(data_dir, split)
    if not path.is_file():
        present = sorted(p.stem for p in Path(data_dir).glob("*.jsonl") if p.name != GALLERY_FILE)
        raise FileNotFoundError(
            f"{path}: no such file (split {split!r}; splits present: {present or 'none'})"
        )
    return [validate_triplet_row(obj, f"{path}:{lineno}") for lineno, obj in iter_jsonl(path)]


def load_gallery(data_dir: str | Path) -> list[GalleryItem]:
    """Read and validate ``{data_dir}/gallery.jsonl``; ids must be unique."""
    path = Path(data_dir) / GALLERY_FILE
    items: list[GalleryItem] = []
    seen: dict[str, int] = {}
    for lineno, obj in iter_jsonl(path):
        item = validate_gallery_row(obj, f"{path}:{lineno}")
        if item.id in seen:
            raise DataFormatError(
                f"{path}:{lineno}: duplicate gallery id {item.id!r} (first at line {seen[item.id]})"
            )
        seen[item.id] = lineno
        items.append(item)
    return items


def load_meta(data_dir: str | Path) -> dict[str, Any]:
    """Read ``meta.json`` if present, else ``{}``."""
    path = Path(data_dir) / META_FILE
    if not path.is_file():
        return {}
    with path.open("r", encoding="utf-8") as fh:
        meta = json.load(fh)
    if not isinstance(meta, dict):
        raise DataFormatError(f"{path}: expected a JSON object")
    return meta


def resolve_path(data_dir: str | Path, path: str) -> Path:
    """Absolute path of an image path from the JSONL (relative to data_dir, or absolute)."""
    p = Path(path)
    return p if p.is_absolute() else Path(data_dir) / p


def gallery_index(items: Iterable[GalleryItem]) -> dict[str, int]:
    """Map gallery id -> position, for turning ``target_id`` into a label."""
    return {item.id: i for i, item in enumerate(items)}


def check_split_against_gallery(
    triplets: Iterable[Triplet], gallery: Iterable[GalleryItem], split: str = "?"
) -> None:
    """Raise DataFormatError if a reference_id/target_id is not a gallery id (evaluation needs both
    resolvable; ``""``/None mean "not in the gallery" and are allowed)."""
    ids = {g.id for g in gallery}
    for i, t in enumerate(triplets, start=1):
        if t.reference_id and t.reference_id not in ids:
            raise DataFormatError(
                f"{split}.jsonl:{i}: reference_id {t.reference_id!r} not in gallery"
            )
        if t.target_id is not None and t.target_id not in ids:
            raise DataFormatError(f"{split}.jsonl:{i}: target_id {t.target_id!r} not in gallery")


__all__ = [
    "GALLERY_FILE",
    "META_FILE",
    "SPLITS",
    "DataFormatError",
    "GalleryItem",
    "Triplet",
    "check_split_against_gallery",
    "gallery_index",
    "iter_jsonl",
    "load_gallery",
    "load_meta",
    "load_triplets",
    "read_jsonl",
    "resolve_path",
    "split_path",
    "validate_gallery_row",
    "validate_triplet_row",
    "write_jsonl",
]
