"""Types and the abstract interface shared by the Edge and Qdrant-server backends.

Nothing here imports qdrant; the backends live in ``edge.py`` and ``qdrant_server.py``.
"""

from __future__ import annotations

import abc
import logging
from collections.abc import Iterator, Mapping, Sequence
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
    # unix time of the first activation (None: never activated, or activated before this was
    # recorded, see ever_active)
    activated_at: float | None = None
    # was ever the active version (activated_at set, active now, or in the rollback history):
    # a version that is not ever_active is an unfinished build; one that is was rolled back from
    ever_active: bool = False


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
    def get(
        self, ids: Sequence[str], with_vectors: bool = False, with_payload: PayloadSelector = True
    ) -> list[Record]:
        """Records for the ids that exist, in the order given (missing ids are skipped).

        ``with_vectors=True`` fills ``Record.tokens`` ``[Q, D]`` float32 (the stored originals).
        ``with_payload``: see :data:`PayloadSelector`.
        """

    @abc.abstractmethod
    def scroll(
        self,
        limit: int = 256,
        offset: str | None = None,
        with_payload: PayloadSelector = True,
        with_vectors: bool = False,
        filter: Filter | None = None,
    ) -> tuple[list[Record], str | None]:
        """One page of points in the engine's order (by point id): ``(records, next_offset)``.

        Start with ``offset=None`` and pass each ``next_offset`` back until it is ``None``.
        ``limit`` in [1, 10000]. ``with_payload``: see :data:`PayloadSelector`, e.g.
        ``{"exclude": ["thumbnail"]}``. ``with_vectors=True`` fills ``Record.tokens``.
        Points written during a scroll may or may not be seen; none is returned twice.
        """

    @abc.abstractmethod
    def find_by_user_id(
        self, user_id: str, limit: int = 2, with_payload: PayloadSelector = True
    ) -> list[Record]:
        """Points whose payload ``user_id`` (:data:`USER_ID_KEY`) equals ``user_id``: at most
        ``limit`` of them, by point id (ask for 2 to tell a unique id from a clash). Uses the
        keyword payload index every version has on that key."""

    def iter_records(
        self,
        batch: int = 1000,
        with_payload: PayloadSelector = True,
        with_vectors: bool = False,
        filter: Filter | None = None,
    ) -> Iterator[Record]:
        """Every point (matching ``filter``), page by page with :meth:`scroll`."""
        offset: str | None = None
        while True:
            recs, offset = self.scroll(batch, offset, with_payload, with_vectors, filter)
            yield from recs
            if offset is None or not recs:
                return

    def sample(
        self, n: int, seed: int | None = None, with_payload: PayloadSelector = True
    ) -> list[Record]:
        """``n`` distinct points drawn uniformly at random (all of them when fewer exist).

        ``seed`` given: reproducible (same data + seed -> same sample, in the same order); it
        reads every id once (one id-only scroll: about 0.1 s per 100k points). ``seed=None``: the
        engine's own random sample (one call, cheaper, not reproducible).
        """
        from retrieval.index.common import check_count

        check_count(n)
        if seed is None:
            return self._engine_sample(n, with_payload)
        ids = sorted(r.id for r in self.iter_records(10_000, with_payload=False))
        if not ids:
            return []
        rng = np.random.default_rng(seed)
        pick = rng.choice(len(ids), size=min(n, len(ids)), replace=False)
        return self.get([ids[i] for i in pick], with_payload=with_payload)

    def _engine_sample(self, n: int, with_payload: PayloadSelector) -> list[Record]:
        """Backend hook for ``sample(seed=None)``; default: the seeded path with a fresh seed."""
        return self.sample(
            n, seed=int(np.random.default_rng().integers(2**31)), with_payload=with_payload
        )

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
    read_only: bool  # opened with open_version(..., read_only=True): writes raise


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
    def open_version(self, version: str, read_only: bool = False) -> VersionHandle:
        """A handle on an EXISTING version (active or not): to resume a build, to fill one
        version from several runs, or to verify a version before activating it.

        Same rules as ``create_version``: on Edge the handle takes the version's lock (pid in
        ``owner.lock``), so a version held by another process (a builder, or a server serving
        it) raises ``IndexInUseError`` with ``.pid``, at once. ``read_only=True``: writes raise
        ``GalleryIndexError`` (on Edge the lock is still taken: one opener per shard).
        The model guard applies (``ModelMismatchError`` unless forced). ``IndexNotFoundError``
        when the version does not exist. If this object already serves ``version`` as the
        active one, the handle shares that shard (closing the handle leaves it open).
        """

    @abc.abstractmethod
    def update_version_meta(self, version: str, extra: Mapping[str, Any]) -> VersionMeta:
        """Merge ``extra`` into the version's ``VersionMeta.extra`` (a key set to ``None`` is
        removed) and return the new metadata. The rest of the metadata (fingerprint, shape,
        fields) is fixed at creation. Allowed on any version, active or not."""

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
