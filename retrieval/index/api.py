"""Types and the abstract interface shared by the Edge and Qdrant-server backends.

Nothing here imports qdrant; the backends live in ``edge.py`` and ``qdrant_server.py``.
"""

from __future__ import annotations

import abc
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

logger = logging.getLogger(__name__)

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
#: ``auto`` switches from ``exact`` to ``fast`` at this many points.
AUTO_FAST_MIN_POINTS = 20_000
#: Payload key holding the caller's string id (Qdrant point ids must be uuid or int).
ID_KEY = "_id"

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


@dataclass(frozen=True)
class VersionInfo:
    """A version of an index as listed by ``versions()``."""

    version: str  # e.g. "v000003" (sortable, monotonically increasing)
    meta: VersionMeta
    created: float  # unix time
    count: int | None  # points (None when not cheaply known, e.g. shard owned by another process)
    active: bool  # the name currently points to it


class IndexView(abc.ABC):
    """Data operations on ONE concrete version (the active one, or a version being built)."""

    # ---- writes -----------------------------------------------------------------------------
    @abc.abstractmethod
    def upsert(
        self,
        ids: Sequence[str],
        tokens: np.ndarray,
        payloads: Sequence[Mapping[str, Any]] | None = None,
    ) -> int:
        """Insert or replace points; returns how many were written.

        ``ids``: caller's string ids (any string; mapped to uuid5 internally, kept in payload).
        ``tokens``: float32 ``[N, Q, D]``; rows are L2-normalised here (so ``pooled`` too).
        ``payloads``: one JSON-like dict per id (str/int/float/bool/list/None values); keys
        starting with ``_`` are reserved. Re-upserting an id replaces it (idempotent).
        Raises ``InvalidQueryError`` (shapes, non-finite), ``IndexInUseError`` (Edge shard owned
        by another process), ``ModelMismatchError`` (``[Q, D]`` differs from the version's shape).
        """

    @abc.abstractmethod
    def delete(self, ids: Sequence[str]) -> None:
        """Delete points by caller id (missing ids are ignored)."""

    @abc.abstractmethod
    def flush(self) -> None:
        """Make every write so far durable (survives a crash/SIGKILL of this process)."""

    # ---- reads ------------------------------------------------------------------------------
    @abc.abstractmethod
    def search(
        self,
        query: np.ndarray,
        top_k: int = 10,
        offset: int = 0,
        filter: Filter | None = None,
        mode: SearchMode = "auto",
    ) -> list[Hit]:
        """Top images for one query vector ``[D]`` (float32; normalised here).

        Score = MaxSim = max over the image's tokens of the dot product. ``top_k`` in
        [1, 1000]; ``offset`` skips the first results (pagination: page p is
        ``offset=p*top_k``). ``filter``: see :data:`Filter` (declared fields only, else
        ``InvalidFilterError``). Hits are sorted by descending score.
        """

    @abc.abstractmethod
    def search_batch(
        self,
        queries: np.ndarray,
        top_k: int = 10,
        offset: int = 0,
        filter: Filter | None = None,
        mode: SearchMode = "auto",
    ) -> list[list[Hit]]:
        """``search`` for ``[M, D]`` queries in one call (one batched engine call where possible)."""

    @abc.abstractmethod
    def count(self, filter: Filter | None = None) -> int:
        """Number of points (matching ``filter`` if given)."""

    @abc.abstractmethod
    def get(self, ids: Sequence[str], with_vectors: bool = False) -> list[Record]:
        """Records for the ids that exist, in the order given (missing ids are skipped).

        ``with_vectors=True`` fills ``Record.tokens`` ``[Q, D]`` float32 (the stored originals).
        """

    # ---- schema / info ----------------------------------------------------------------------
    @abc.abstractmethod
    def declared_fields(self) -> dict[str, FieldType]:
        """Filterable payload fields and their types (from the version metadata)."""

    @abc.abstractmethod
    def describe(self) -> dict[str, Any]:
        """Info dict: backend, uri, name, version, count, encoder_fingerprint, preset, shape,
        fields, created, and backend specifics. JSON-serialisable."""

    @abc.abstractmethod
    def close(self) -> None:
        """Flush and release the shard / client (and the Edge lock). Idempotent."""

    def __enter__(self) -> IndexView:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class VersionHandle(IndexView):
    """A version being built (returned by ``GalleryIndex.create_version``).

    Writable while the active version keeps serving (on Edge: its own shard directory and lock).
    Typical use::

        with idx.create_version(meta) as v:
            v.upsert(ids, tokens, payloads)
        idx.activate(v.version)
    """

    version: str  # the version id, e.g. "v000004"
    meta: VersionMeta


class GalleryIndex(IndexView):
    """A named gallery index: data operations go to the ACTIVE version, plus version management.

    Obtained with :func:`retrieval.index.open_index`. Thread-safe for concurrent searches;
    writes are serialised. If the name has no version yet, the first ``upsert`` creates and
    activates one (shape from the tokens, fingerprint/preset/fields from ``open_index``).
    """

    uri: str  # the URI given to open_index
    name: str  # the index name
    backend: str  # "edge" | "qdrant" | "local"
    read_only: bool  # writes raise GalleryIndexError

    # ---- versions ---------------------------------------------------------------------------
    @property
    @abc.abstractmethod
    def active_version(self) -> str | None:
        """The version this object currently serves from (None: the name has no version yet)."""

    @property
    @abc.abstractmethod
    def meta(self) -> VersionMeta | None:
        """Metadata of the active version (None when there is no version)."""

    @abc.abstractmethod
    def versions(self) -> list[VersionInfo]:
        """All versions of this name, oldest first."""

    @abc.abstractmethod
    def create_version(self, meta: VersionMeta) -> VersionHandle:
        """Create a new empty version (not active) and return a writable handle on it.

        Payload indexes are made for ``meta.fields``. The active version keeps serving.
        """

    @abc.abstractmethod
    def activate(self, version: str) -> None:
        """Point the name at ``version`` atomically (alias swap / pointer file ``os.replace``).

        The version's handle should be closed (Edge: it is closed here if it belongs to this
        object). Versions beyond ``keep_versions`` old ones are dropped (never the active one).
        This object switches to the new version at once; other processes switch on
        ``refresh()``.
        """

    @abc.abstractmethod
    def drop_version(self, version: str) -> None:
        """Delete a version's data. Refuses (GalleryIndexError) to drop the active version."""

    @abc.abstractmethod
    def rollback(self) -> str:
        """Re-activate the previously active version still kept; returns it.

        Raises ``IndexNotFoundError`` when there is none.
        """

    @abc.abstractmethod
    def refresh(self) -> bool:
        """Cheap check of the name's pointer/alias; if it changed, open the new version, swap
        atomically (searches in flight finish on the old one, which is closed afterwards) and
        return True. Raises ``ModelMismatchError`` (and keeps serving the old version) when the
        new version's fingerprint differs from the one given to ``open_index`` (unless forced).
        Servers call it periodically (e.g. every second) or on an admin RPC.
        """
