"""Collection readers: a folder of images (recursive) or a manifest (JSONL, CSV, Parquet).

Both give a sorted list of :class:`Item` (sorted by ``relpath``, so every run, shard and machine
sees the same order) plus the declared filterable fields. Nothing here opens an image.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from retrieval.imageio import IMAGE_EXTENSIONS as _READABLE
from retrieval.index.api import FIELD_TYPES, PATCHES_KEY, USER_ID_KEY

logger = logging.getLogger(__name__)

#: Extensions a folder walk picks up (case-insensitive); anything else is counted as ignored.
#: The same list as the UI's uploader (retrieval.imageio.IMAGE_EXTENSIONS).
IMAGE_EXTENSIONS = frozenset(_READABLE)
#: Payload keys written by the indexer; manifest columns may not use them (``user_id`` only as
#: the ``--id-column`` itself).
RESERVED_KEYS = frozenset(
    {
        "path",
        "relpath",
        "sha256",
        "width",
        "height",
        "bytes",
        "mime",
        "thumbnail",
        USER_ID_KEY,
        PATCHES_KEY,
    }
)
#: The manifest column taken as the user's id when ``--id-column`` is not given (if present).
DEFAULT_ID_COLUMN = "id"
#: ``Collection.id_source`` of a collection whose user ids are the relative paths.
ID_FROM_PATH = "relpath"
#: Clashing ids named in the error message (the rest are counted).
MAX_CLASHES_SHOWN = 5
#: Sidecar of a manifest declaring its fields: ``<manifest>.fields.json`` = {"name": "type"}.
SIDECAR_SUFFIX = ".fields.json"
#: A JSONL manifest may start with a header line ``{"_fields": {"name": "type", ...}}``.
JSONL_HEADER_KEY = "_fields"
#: A Parquet manifest may declare fields in its schema metadata under this key (JSON object).
PARQUET_META_KEY = b"cir.fields"


class SourceError(ValueError):
    """The collection itself is unusable (missing folder, unreadable manifest, bad declaration)."""


@dataclass(frozen=True)
class Item:
    """One image of the collection, before it is read."""

    relpath: str  # stable key: path relative to the folder, or the manifest's path as given
    location: str  # what is opened: an absolute filesystem path, or a URI that cannot be opened
    path: str  # what the payload's ``path`` shows (absolute path, or the manifest's URI/path)
    meta: dict[str, Any] = field(default_factory=dict)  # manifest metadata (typed), payload
    problem: str | None = None  # a reason to skip it without reading (e.g. "unsupported-uri")
    user_id: str = ""  # the user's own id (id column, else relpath); payload ``user_id``

    def __post_init__(self) -> None:
        if not self.user_id:  # frozen: set through object.__setattr__
            object.__setattr__(self, "user_id", self.relpath)


@dataclass
class Collection:
    """What a reader found."""

    items: list[Item]  # sorted by relpath, unique relpaths
    fields: dict[str, str]  # declared filterable fields -> type
    ignored: int = 0  # files with other extensions (folder input)
    ignored_paths: list[str] = field(default_factory=list)  # their relative paths, sorted
    warnings: list[str] = field(default_factory=list)  # metadata values that did not convert
    source_id: str = ""  # identifies the source for resume (resolved folder/manifest path)
    kind: str = "folder"  # "folder" | "jsonl" | "csv" | "parquet"
    id_source: str = ID_FROM_PATH  # where user ids come from: "relpath" or "column:NAME"


# ----------------------------------------------------------------------------- fields
def parse_field_specs(specs: Sequence[str]) -> dict[str, str]:
    """``["category:keyword", "price:float"]`` -> {"category": "keyword", "price": "float"}."""
    out: dict[str, str] = {}
    for spec in specs:
        name, sep, kind = spec.partition(":")
        name, kind = name.strip(), kind.strip().lower()
        if not sep or not name or kind not in FIELD_TYPES:
            raise SourceError(f"bad --field {spec!r}: use NAME:TYPE with TYPE in {FIELD_TYPES}")
        _check_field_name(name)
        out[name] = kind
    return out


def _check_field_name(name: str) -> None:
    if name.startswith("_") or name in RESERVED_KEYS:
        raise SourceError(
            f"metadata field {name!r} clashes with the indexer's payload keys "
            f"({', '.join(sorted(RESERVED_KEYS))}) or uses the reserved '_' prefix; rename it"
        )


def _fields_from_obj(obj: Any, where: str) -> dict[str, str]:
    if not isinstance(obj, Mapping):
        raise SourceError(f"{where}: field declaration must be an object {{name: type}}")
    return parse_field_specs([f"{k}:{v}" for k, v in obj.items()])


_TRUE = {"true", "1", "yes", "y", "t"}
_FALSE = {"false", "0", "no", "n", "f"}


def coerce(value: Any, kind: str) -> Any:
    """Convert a metadata value to its declared type; ``None`` for empty; ValueError if not."""
    if value is None or (isinstance(value, str) and value.strip() == ""):
        return None
    if isinstance(value, float) and math.isnan(value):
        return None
    if kind == "keyword":
        if isinstance(value, list):
            return [str(v) for v in value]
        if isinstance(value, bool):
            return str(value).lower()
        return str(value)
    if kind == "integer":
        if isinstance(value, bool):
            raise ValueError(f"{value!r} is not an integer")
        if isinstance(value, float):
            if not value.is_integer():
                raise ValueError(f"{value!r} is not an integer")
            return int(value)
        return int(str(value).strip())
    if kind == "float":
        if isinstance(value, bool):
            raise ValueError(f"{value!r} is not a number")
        f = float(value)
        if not math.isfinite(f):
            raise ValueError(f"{value!r} is not finite")
        return f
    if kind == "bool":
        if isinstance(value, bool):
            return value
        if isinstance(value, int | float) and value in (0, 1):
            return bool(value)
        s = str(value).strip().lower()
        if s in _TRUE:
            return True
        if s in _FALSE:
            return False
        raise ValueError(f"{value!r} is not a boolean")
    raise ValueError(f"unknown type {kind!r}")


def _json_safe(value: Any) -> Any:
    """Payload values must be JSON-like (parquet gives numpy/datetime/bytes values)."""
    if value is None or isinstance(value, str | bool | int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if hasattr(value, "item"):  # numpy scalar
        return _json_safe(value.item())
    if isinstance(value, bytes):
        return value.hex()
    return str(value)


# ----------------------------------------------------------------------------- sharding
def parse_shard(spec: str | None) -> tuple[int, int]:
    """``"i/n"`` -> (i, n) with 0 <= i < n; None -> (0, 1)."""
    if not spec:
        return 0, 1
    a, sep, b = spec.partition("/")
    try:
        i, n = int(a), int(b)
    except ValueError:
        i, n = -1, 0
    if not sep or n < 1 or not 0 <= i < n:
        raise SourceError(f"bad --shard {spec!r}: use i/n with 0 <= i < n (e.g. 0/4)")
    return i, n


def shard_of(relpath: str, n: int) -> int:
    """Deterministic shard of an item: sha256 of its relpath (same on every machine/Python)."""
    if n <= 1:
        return 0
    h = hashlib.sha256(relpath.encode("utf-8", "surrogateescape")).digest()
    return int.from_bytes(h[:8], "big") % n


def select_shard(items: Iterable[Item], i: int, n: int) -> list[Item]:
    return [it for it in items if shard_of(it.relpath, n) == i]


# ----------------------------------------------------------------------------- folder
def read_folder(root: Path) -> Collection:
    """Every image file under ``root`` (recursive, symlinks to files followed; a dangling
    symlink with an image extension is listed so that it is reported as unreadable)."""
    root = Path(root)
    if not root.is_dir():
        raise SourceError(f"{root} is not a folder")
    base = root.resolve()
    items: list[Item] = []
    ignored: list[str] = []
    for dirpath, dirnames, filenames in os.walk(base, followlinks=False):
        dirnames.sort()
        for name in filenames + [d for d in dirnames if Path(dirpath, d).is_symlink()]:
            full = Path(dirpath) / name
            if Path(name).suffix.lower() not in IMAGE_EXTENSIONS:
                ignored.append(full.relative_to(base).as_posix())
                continue
            if full.is_dir():  # a symlink to a folder named like an image: not followed
                ignored.append(full.relative_to(base).as_posix())
                continue
            rel = full.relative_to(base).as_posix()
            items.append(Item(relpath=rel, location=str(full), path=str(full)))
    items.sort(key=lambda it: it.relpath)
    return Collection(
        items=items,
        fields={},
        ignored=len(ignored),
        ignored_paths=sorted(ignored),
        source_id=str(base),
        kind="folder",
    )


# ----------------------------------------------------------------------------- manifests
def detect_format(path: Path, fmt: str = "auto") -> str:
    if fmt != "auto":
        if fmt not in ("jsonl", "csv", "parquet"):
            raise SourceError(f"unknown manifest format {fmt!r} (auto, jsonl, csv, parquet)")
        return fmt
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson", ".json"):
        return "jsonl"
    if suffix in (".csv", ".tsv"):
        return "csv"
    if suffix in (".parquet", ".pq"):
        return "parquet"
    raise SourceError(f"cannot tell the format of {path}: pass --manifest-format jsonl|csv|parquet")


def _rows_jsonl(path: Path) -> tuple[list[dict[str, Any]], dict[str, str], list[str]]:
    rows: list[dict[str, Any]] = []
    fields: dict[str, str] = {}
    warnings: list[str] = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                obj = json.loads(line)
            except ValueError as exc:
                warnings.append(f"{path.name}:{lineno}: not JSON ({exc}); line ignored")
                continue
            if not isinstance(obj, dict):
                warnings.append(f"{path.name}:{lineno}: not a JSON object; line ignored")
                continue
            if not rows and JSONL_HEADER_KEY in obj and len(obj) == 1:
                fields = _fields_from_obj(obj[JSONL_HEADER_KEY], f"{path}:{lineno}")
                continue
            rows.append(obj)
    return rows, fields, warnings


def _rows_csv(path: Path) -> tuple[list[dict[str, Any]], dict[str, str], list[str]]:
    """CSV (TSV by extension); a header cell ``name:type`` declares a filterable field."""
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.reader(f, delimiter=delimiter)
        try:
            header = next(reader)
        except StopIteration:
            return [], {}, []
        names: list[str] = []
        fields: dict[str, str] = {}
        for cell in header:
            name, sep, kind = cell.strip().partition(":")
            if sep and kind.strip().lower() in FIELD_TYPES:
                fields.update(parse_field_specs([f"{name}:{kind}"]))
            names.append(name.strip())
        rows = []
        warnings: list[str] = []
        for lineno, rec in enumerate(reader, 2):
            if not any(c.strip() for c in rec):
                continue
            if len(rec) != len(names):
                warnings.append(f"{path.name}:{lineno}: {len(rec)} cells, header has {len(names)}")
            rows.append(dict(zip(names, rec, strict=False)))
    return rows, fields, warnings


def _rows_parquet(path: Path) -> tuple[list[dict[str, Any]], dict[str, str], list[str]]:
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    fields: dict[str, str] = {}
    meta = table.schema.metadata or {}
    if PARQUET_META_KEY in meta:
        try:
            fields = _fields_from_obj(json.loads(meta[PARQUET_META_KEY]), str(path))
        except ValueError as exc:
            raise SourceError(f"{path}: bad {PARQUET_META_KEY.decode()} metadata: {exc}") from exc
    return table.to_pylist(), fields, []


_URI_SCHEMES = ("http://", "https://", "s3://", "gs://", "az://", "hf://")


def _id_text(value: Any) -> str:
    """A manifest cell as a user id (``17`` and ``17.0`` both read as "17")."""
    if value is None or isinstance(value, bool):
        return "" if value is None else str(value).lower()
    if isinstance(value, float):
        if not math.isfinite(value):
            return ""
        if value.is_integer():
            return str(int(value))
    if hasattr(value, "item") and not isinstance(value, str | bytes):  # numpy scalar
        return _id_text(value.item())
    return str(value).strip()


def check_unique_ids(items: Sequence[Item], where: str) -> None:
    """Every item's user id is its own: a clash is a SourceError naming the ids and paths."""
    by_id: dict[str, list[str]] = {}
    for it in items:
        by_id.setdefault(it.user_id, []).append(it.relpath)
    clashes = {uid: paths for uid, paths in by_id.items() if len(paths) > 1}
    if not clashes:
        return
    shown = sorted(clashes)[:MAX_CLASHES_SHOWN]
    named = "; ".join(
        f"{uid!r} ({len(clashes[uid])} rows: {', '.join(clashes[uid][:3])}"
        f"{', ...' if len(clashes[uid]) > 3 else ''})"
        for uid in shown
    )
    more = f" and {len(clashes) - len(shown)} more" if len(clashes) > len(shown) else ""
    raise SourceError(
        f"{where}: {len(clashes)} user id(s) name more than one image: {named}{more}. "
        "Ids must be unique within the collection: fix the manifest, or pick another column "
        "with --id-column"
    )


def read_manifest(
    path: Path,
    fmt: str = "auto",
    path_column: str = "path",
    fields: Mapping[str, str] | None = None,
    id_column: str | None = None,
) -> Collection:
    """Rows with a path column; every other column becomes payload metadata.

    The user's id of each row is the ``id_column`` (default: the ``id`` column when the
    manifest has one, else the path as given); it must be unique, and every row must have one
    (``SourceError`` naming the clashing ids or the rows without one).

    Field declarations: the manifest's header (JSONL ``_fields`` line, CSV ``name:type``
    header cells, Parquet ``cir.fields`` schema metadata), a ``<manifest>.fields.json``
    sidecar, then ``fields`` (the command line) -- later ones win per field. Relative paths are
    resolved against the manifest's folder; ``file://`` URIs are opened; other URIs are
    skipped as ``unsupported-uri`` (the indexer reads local files only).
    """
    path = Path(path)
    if not path.is_file():
        raise SourceError(f"manifest {path} does not exist")
    kind = detect_format(path, fmt)
    try:
        reader = {"jsonl": _rows_jsonl, "csv": _rows_csv, "parquet": _rows_parquet}[kind]
        rows, declared, warnings = reader(path)
    except SourceError:
        raise
    except Exception as exc:  # pyarrow/csv/unicode errors: the manifest itself is unusable
        raise SourceError(f"cannot read manifest {path} as {kind}: {exc}") from exc
    sidecar = path.with_name(path.name + SIDECAR_SUFFIX)
    if sidecar.is_file():
        try:
            declared.update(_fields_from_obj(json.loads(sidecar.read_text()), str(sidecar)))
        except ValueError as exc:
            raise SourceError(f"bad field sidecar {sidecar}: {exc}") from exc
    declared.update(fields or {})
    for name in declared:
        _check_field_name(name)
    base = path.resolve().parent
    columns = {k for row in rows for k in row}
    if id_column is not None and id_column not in columns:
        raise SourceError(
            f"manifest {path} has no column {id_column!r} (--id-column); its columns: "
            f"{', '.join(sorted(columns)) or 'none'}"
        )
    if id_column is None and DEFAULT_ID_COLUMN in columns:
        id_column = DEFAULT_ID_COLUMN
    if id_column == path_column:
        id_column = None  # the path as given is the id anyway
    by_rel: dict[str, Item] = {}
    no_id: list[str] = []
    for n, row in enumerate(rows):
        raw = row.get(path_column)
        if raw is None or str(raw).strip() == "":
            warnings.append(f"row {n}: no {path_column!r} value; row ignored")
            continue
        given = str(raw).strip()
        user_id = given
        if id_column is not None:
            user_id = _id_text(row.get(id_column))
            if not user_id:
                no_id.append(given)
                continue
        meta: dict[str, Any] = {}
        for key, value in row.items():
            if key == path_column or (key == USER_ID_KEY and key == id_column):
                continue
            if key in RESERVED_KEYS or key.startswith("_"):
                raise SourceError(
                    f"manifest column {key!r} clashes with the indexer's payload keys "
                    f"({', '.join(sorted(RESERVED_KEYS))}) or the '_' prefix; rename it"
                )
            if key in declared:
                try:
                    meta[key] = coerce(value, declared[key])
                except (TypeError, ValueError) as exc:
                    warnings.append(f"{given}: {key}={value!r} is not {declared[key]} ({exc})")
                    meta[key] = None
            else:
                meta[key] = _json_safe(value)
        problem = None
        if given.startswith("file://"):
            location = given[len("file://") :]
        elif given.startswith(_URI_SCHEMES):
            location, problem = given, "unsupported-uri"
        else:
            p = Path(given)
            location = str(p if p.is_absolute() else base / p)
        if given in by_rel:
            warnings.append(f"{given}: listed twice in the manifest; the last row wins")
        by_rel[given] = Item(
            relpath=given,
            location=location,
            path=given,
            meta=meta,
            problem=problem,
            user_id=user_id,
        )
    if no_id:
        raise SourceError(
            f"manifest {path}: {len(no_id)} row(s) have no value in the id column "
            f"{id_column!r}: {', '.join(no_id[:MAX_CLASHES_SHOWN])}"
            f"{', ...' if len(no_id) > MAX_CLASHES_SHOWN else ''}"
        )
    items = sorted(by_rel.values(), key=lambda it: it.relpath)
    check_unique_ids(items, f"manifest {path}")
    return Collection(
        items=items,
        fields=dict(declared),
        warnings=warnings,
        source_id=str(path.resolve()),
        kind=kind,
        id_source=ID_FROM_PATH if id_column is None else f"column:{id_column}",
    )


def read_source(
    source: Path,
    manifest_format: str = "auto",
    path_column: str = "path",
    fields: Mapping[str, str] | None = None,
    id_column: str | None = None,
) -> Collection:
    """A folder (user ids: the relative paths) or a manifest file (user ids: ``id_column``,
    default ``id`` when present), by what ``source`` is."""
    source = Path(source)
    if source.is_dir():
        if id_column is not None:
            raise SourceError(
                f"--id-column {id_column!r} applies to manifests; the images of folder {source} "
                "are known by their paths relative to it"
            )
        col = read_folder(source)
        col.fields = dict(fields or {})
        return col
    if source.is_file():
        return read_manifest(source, manifest_format, path_column, fields, id_column)
    raise SourceError(f"{source} is neither a folder of images nor a manifest file")
