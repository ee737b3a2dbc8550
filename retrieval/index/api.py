"""The index layer's vocabulary: constants, result and metadata types, and the protocols the
layers above program against (nothing here imports numpy or qdrant at run time).

* :class:`SearchView` -- what a server needs of a served index; implemented by
  :class:`~retrieval.index.gallery.GalleryIndex` (in-process) and
  :class:`~retrieval.index.process.ProcessIndex` (a search child process).
* :class:`ReadView` -- the reads of one version (calibration, verification).
* :class:`Hits` -- a search's hits together with the version it searched and the mode it ran.

The one implementation of the index is :mod:`retrieval.index.gallery` over a backend
(:mod:`retrieval.index.backend`: :mod:`~retrieval.index.edge`, :mod:`~retrieval.index.qdrant_server`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Literal, Protocol

if TYPE_CHECKING:
    import numpy as np

#: The index URI every command uses when none is given (``cir serve``, ``cir index``, the demo).
DEFAULT_URI = "edge:data/index"

#: Types a payload field can be declared filterable as (each gets a payload index).
FieldType = Literal["keyword", "integer", "float", "bool"]
FIELD_TYPES: tuple[str, ...] = ("keyword", "integer", "float", "bool")

#: ``exact``: exact MaxSim top-k over all tokens (int8 scan + exact rescoring);
#: ``fast``: two-stage (HNSW on ``pooled`` -> L candidates -> exact MaxSim rerank on ``tokens``);
#: ``auto``: ``exact`` for small galleries, ``fast`` above ``AUTO_FAST_MIN_POINTS``.
SearchMode = Literal["auto", "exact", "fast"]
SEARCH_MODES: tuple[str, ...] = ("auto", "exact", "fast")

#: Largest accepted ``top_k`` (and ``offset + top_k`` bound for ``fast`` candidate lists).
MAX_TOP_K = 1000
#: Largest page of ``scroll`` / ``sample`` / ``find_by_user_id``.
MAX_SCROLL = 10_000
#: ``auto`` switches from ``exact`` to ``fast`` at this many points.
AUTO_FAST_MIN_POINTS = 20_000
#: Payload key holding the caller's string id (Qdrant point ids must be uuid or int).
ID_KEY = "_id"
#: Payload key holding the user's own id of an image (a manifest's id column or the file's
#: relative path, written by the indexer). Every version gets a keyword payload index on it,
#: so :meth:`IndexView.find_by_user_id` is an index lookup, not a scan.
USER_ID_KEY = "user_id"
#: Payload key of a point's ViT tokens for a "patches" re-ranker (retrieval.rerank): base64
#: float16 [T, C], written by the indexer, never returned to clients.
PATCHES_KEY = "rerank_patches"
#: What a search returns of a hit's payload: everything but these heavy keys (the thumbnail is
#: served by GetImage, the re-ranker fetches the patches of its window with ``get``).
SEARCH_PAYLOAD: dict[str, list[str]] = {"exclude": ["thumbnail", PATCHES_KEY]}

#: ``VersionMeta.extra`` key of a version's own fast-L calibration (retrieval.index.calibrate).
CALIBRATION_KEY = "fast_calibration"

#: What payload to return from ``scroll``/``get``/``sample``: ``True`` (all), ``False`` (none),
#: a list of keys to include (``["path", "category"]``), or ``{"exclude": ["thumbnail"]}`` (all
#: but those keys; e.g. to skip a heavy thumbnail). The caller's id is always returned.
PayloadSelector = bool | Sequence[str] | Mapping[str, Sequence[str]]

#: A filter: ``{"category": "bag", "price": {"gte": 10, "lt": 50}, "color": ["red", "blue"]}``.
#: Per field: a scalar (equality), a list (any-of), or a dict with ``gte``/``gt``/``lte``/``lt``
#: (range, numeric fields) and/or ``eq`` / ``any``. All conditions must hold (AND).
Filter = Mapping[str, Any]


@dataclass(frozen=True)
class Hit:
    """One search result."""

    id: str  # the caller's id (as given to ``upsert``)
    score: float  # MaxSim score: max over the image's tokens of <query, token>
    payload: dict[str, Any]  # the stored payload (without the internal ``_id`` key)


class Hits(list[Hit]):
    """One search's hits, best first (a ``list`` of :class:`Hit`), with what was searched:

    ``version``: the index version that answered (read in the same call as the hits, so a
    refresh switching versions meanwhile cannot make it another one's); ``mode``: the mode
    that really ran (``"exact"`` / ``"fast"``); ``note``: why it is not the mode asked for,
    when that matters ("" otherwise). Compares equal to a plain list of the same hits.
    """

    def __init__(
        self, hits: Iterable[Hit] = (), version: str = "", mode: str = "", note: str = ""
    ) -> None:
        super().__init__(hits)
        self.version = version
        self.mode = mode
        self.note = note

    def __reduce__(self) -> Any:  # crosses the search process's pipe with its facts
        return (type(self), (list(self), self.version, self.mode, self.note))

    def __repr__(self) -> str:
        return f"Hits({list.__repr__(self)}, version={self.version!r}, mode={self.mode!r})"


@dataclass(frozen=True)
class Record:
    """One stored image, as returned by ``get``."""

    id: str  # the caller's id
    payload: dict[str, Any]  # stored payload (without ``_id``)
    tokens: np.ndarray | None = None  # [Q, D] float32 when ``get(..., with_vectors=True)``


@dataclass(frozen=True)
class VersionMeta:
    """What a version was built with; recorded when the version is created (model guard)."""

    encoder_fingerprint: str  # identifies encoder weights + preprocessing; checked on open
    preset: str  # model preset name (e.g. "sprc-demo")
    shape: tuple[int, int]  # (Q, D): tokens per image, token dimension
    fields: dict[str, FieldType] = field(default_factory=dict)  # filterable payload fields
    extra: dict[str, Any] = field(default_factory=dict)  # free-form (dataset, commit, ...)

    def to_json(self) -> dict[str, Any]:
        return {
            "encoder_fingerprint": self.encoder_fingerprint,
            "preset": self.preset,
            "shape": [int(self.shape[0]), int(self.shape[1])],
            "fields": dict(self.fields),
            "extra": dict(self.extra),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> VersionMeta:
        shape = data["shape"]
        return cls(
            encoder_fingerprint=str(data["encoder_fingerprint"]),
            preset=str(data.get("preset", "")),
            shape=(int(shape[0]), int(shape[1])),
            fields=dict(data.get("fields", {})),
            extra=dict(data.get("extra", {})),
        )

    def with_extra(self, extra: Mapping[str, Any]) -> VersionMeta:
        """This metadata with ``extra`` merged into ``extra`` (a key set to ``None`` is
        removed); the rest (fingerprint, shape, fields) is fixed at creation."""
        merged = dict(self.extra)
        for k, v in extra.items():
            if v is None:
                merged.pop(k, None)
            else:
                merged[k] = v
        return replace(self, extra=merged)


@dataclass(frozen=True)
class VersionInfo:
    """A version of an index as listed by ``versions()``."""

    version: str  # e.g. "v000003" (sortable, monotonically increasing)
    meta: VersionMeta
    created: float  # unix time
    count: int | None  # points (None when not cheaply known, e.g. shard owned by another process)
    active: bool  # the name currently points to it
    # unix time of the first activation (None: never activated, or activated before this was
    # recorded, see ever_active)
    activated_at: float | None = None
    # was ever the active version (activated_at set, active now, or in the rollback history):
    # a version that is not ever_active is an unfinished build; one that is was rolled back from
    ever_active: bool = False


class ReadView(Protocol):
    """The reads of one index version (a :class:`~retrieval.index.gallery.GalleryIndex`, a
    version handle, or a :class:`~retrieval.index.process.ProcessIndex`)."""

    def search(
        self,
        query: np.ndarray,
        top_k: int = 10,
        offset: int = 0,
        filter: Filter | None = None,
        mode: SearchMode = "auto",
        with_payload: PayloadSelector | None = None,
    ) -> Hits: ...

    def search_batch(
        self,
        queries: np.ndarray,
        top_k: int = 10,
        offset: int = 0,
        filter: Filter | None = None,
        mode: SearchMode = "auto",
        with_payload: PayloadSelector | None = None,
    ) -> list[Hits]: ...

    def count(self, filter: Filter | None = None) -> int: ...

    def get(
        self, ids: Sequence[str], with_vectors: bool = False, with_payload: PayloadSelector = True
    ) -> list[Record]: ...

    def find_by_user_id(
        self, user_id: str, limit: int = 2, with_payload: PayloadSelector = True
    ) -> list[Record]: ...

    def scroll(
        self,
        limit: int = 256,
        offset: str | None = None,
        with_payload: PayloadSelector = True,
        with_vectors: bool = False,
        filter: Filter | None = None,
    ) -> tuple[list[Record], str | None]: ...

    def iter_records(
        self,
        batch: int = 1000,
        with_payload: PayloadSelector = True,
        with_vectors: bool = False,
        filter: Filter | None = None,
    ) -> Iterable[Record]: ...

    def sample(
        self, n: int, seed: int | None = None, with_payload: PayloadSelector = True
    ) -> list[Record]: ...

    def declared_fields(self) -> dict[str, FieldType]: ...

    def describe(self) -> dict[str, Any]: ...


class SearchView(ReadView, Protocol):
    """What a server uses of the index it serves (server/engine.py, server/recall_guard.py,
    server/app.py), read-only but for the fast-mode calibration. ``search`` returns the
    version it searched (:class:`Hits`): the version facts below are for reporting
    (Info, ListImages), never to label a search's hits."""

    @property
    def name(self) -> str: ...

    @property
    def uri(self) -> str: ...

    @property
    def backend(self) -> str: ...

    @property
    def read_only(self) -> bool: ...

    @property
    def options(self) -> dict[str, Any]: ...

    @property
    def active_version(self) -> str | None: ...

    @property
    def meta(self) -> VersionMeta | None: ...

    def versions(self) -> list[VersionInfo]: ...

    def refresh(self) -> bool: ...

    def set_fast_calibration(
        self, version: str, calibration: Mapping[str, Any] | None
    ) -> VersionMeta: ...

    def close(self) -> None: ...
