"""The gallery index, written once over a :class:`~retrieval.index.backend.Backend`.

:class:`IndexView` holds the data operations on one concrete version (validation, planning,
the calls to the version's :class:`~retrieval.index.backend.VersionStore`); :class:`GalleryIndex`
serves the name's ACTIVE version and manages versions (model guard, create / open / activate /
rollback / drop / prune, the meta merge, auto-create on first upsert, ``refresh``);
:class:`VersionHandle` is one version being built or checked. Obtain a GalleryIndex with
:func:`retrieval.index.open_index`.

Version switches are reference counted (:class:`_Slot`): a search in flight finishes on the
version it started on, which is released afterwards, and the :class:`~retrieval.index.api.Hits`
it returns name that version.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np

from retrieval.index import validate as V
from retrieval.index.api import (
    CALIBRATION_KEY,
    FieldType,
    Filter,
    Hits,
    PayloadSelector,
    Record,
    SearchMode,
    VersionInfo,
    VersionMeta,
)
from retrieval.index.backend import Backend, VersionStore, merged_meta
from retrieval.index.errors import (
    GalleryIndexError,
    IndexInUseError,
    IndexNotFoundError,
    ModelMismatchError,
)
from retrieval.index.filters import parse_filter, user_id_condition, validate_fields
from retrieval.index.policy import DEFAULT_SEARCH_PAYLOAD, plan_search

logger = logging.getLogger(__name__)


class _Slot:
    """An opened version store with a reference count, so that a retired version is closed
    only after the calls running on it finish."""

    def __init__(self, store: VersionStore) -> None:
        self.store = store
        self.version = store.version
        self.refs = 0
        self.retired = False
        self.closed = False
        self.cv = threading.Condition()

    def acquire(self) -> bool:
        with self.cv:
            if self.closed:
                return False
            self.refs += 1
            return True

    def release(self) -> None:
        with self.cv:
            self.refs -= 1
            if self.refs == 0:
                self.cv.notify_all()
                if self.retired:
                    self._close_locked()

    def retire(self) -> None:
        """Close once idle (in-flight calls finish first)."""
        with self.cv:
            self.retired = True
            if self.refs == 0:
                self._close_locked()

    def close(self, wait: float = 30.0, finish: bool = False) -> None:
        """Close once idle; ``finish``: a writer's close (build the version's indexes)."""
        with self.cv:
            self.cv.wait_for(lambda: self.refs == 0, timeout=wait)
            self._close_locked(finish)

    def _close_locked(self, finish: bool = False) -> None:
        if not self.closed:
            self.closed = True
            self.store.close(finish=finish)


class IndexView:
    """Data operations on ONE concrete version (the active one, or a version being built)."""

    read_only: bool
    _options: dict[str, Any]

    def _use(self, write: bool = False, tokens: Any = None) -> Any:  # pragma: no cover
        """Context manager giving the version's store for the duration of one call."""
        raise NotImplementedError

    def _where(self, store: VersionStore) -> str:  # pragma: no cover
        raise NotImplementedError

    # ---- writes -----------------------------------------------------------------------------
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
        ids_l = V.check_ids(ids)
        pls = V.check_payloads(payloads, len(ids_l))
        if not ids_l:
            return 0
        with self._use(write=True, tokens=tokens) as st:
            toks = V.normalise_tokens(tokens, len(ids_l), st.meta.shape)
            return int(st.upsert(ids_l, toks, V.pooled_of(toks), pls))

    def delete(self, ids: Sequence[str]) -> None:
        """Delete points by caller id (missing ids are ignored)."""
        ids_l = V.check_ids(ids)
        if ids_l:
            with self._use(write=True) as st:
                st.delete(ids_l)

    def flush(self) -> None:
        """Make every write so far durable (survives a crash/SIGKILL of this process)."""
        with self._use(write=True) as st:
            st.flush()

    # ---- reads ------------------------------------------------------------------------------
    def search(
        self,
        query: np.ndarray,
        top_k: int = 10,
        offset: int = 0,
        filter: Filter | None = None,
        mode: SearchMode = "auto",
        with_payload: PayloadSelector | None = None,
    ) -> Hits:
        """Top images for one query vector ``[D]`` (float32; normalised here), with the version
        searched and the mode run (:class:`~retrieval.index.api.Hits`).

        Score = MaxSim = max over the image's tokens of the dot product. ``top_k`` in
        [1, 1000]; ``offset`` skips the first results (pagination: page p is
        ``offset=p*top_k``). ``filter``: see :data:`Filter` (declared fields only, else
        ``InvalidFilterError``). Hits are sorted by descending score. ``with_payload``: what
        of each hit's payload to return (:data:`PayloadSelector`; default
        :data:`~retrieval.index.api.SEARCH_PAYLOAD`: all but the thumbnail and the
        re-ranker's features, which a re-ranking caller asks for here to save a ``get``).
        """
        return self._search(query, top_k, offset, filter, mode, False, with_payload)[0]

    def search_batch(
        self,
        queries: np.ndarray,
        top_k: int = 10,
        offset: int = 0,
        filter: Filter | None = None,
        mode: SearchMode = "auto",
        with_payload: PayloadSelector | None = None,
    ) -> list[Hits]:
        """``search`` for ``[M, D]`` queries in one call (one batched engine call where
        possible); every :class:`Hits` names the same version."""
        return self._search(queries, top_k, offset, filter, mode, True, with_payload)

    def _search(
        self,
        query: Any,
        top_k: int,
        offset: int,
        flt: Filter | None,
        mode: str,
        batch: bool,
        with_payload: PayloadSelector | None = None,
    ) -> list[Hits]:
        V.check_paging(top_k, offset, mode)
        spec = DEFAULT_SEARCH_PAYLOAD if with_payload is None else V.payload_spec(with_payload)
        with self._use() as st:
            meta = st.meta
            qs = V.normalise_queries(query, meta.shape[1], batch)
            conds = parse_filter(flt, meta.fields)
            if len(qs) == 0:
                return []
            plan = plan_search(
                mode,
                top_k,
                offset,
                st.count(),
                conds,
                self._options,
                meta.extra.get(CALIBRATION_KEY),
                self._where(st),
                spec,
            )
            results = st.query(qs, plan)
            return [Hits(r, st.version, plan.mode, plan.note) for r in results]

    def count(self, filter: Filter | None = None) -> int:
        """Number of points (matching ``filter`` if given)."""
        with self._use() as st:
            return int(st.count(parse_filter(filter, st.meta.fields)))

    def get(
        self, ids: Sequence[str], with_vectors: bool = False, with_payload: PayloadSelector = True
    ) -> list[Record]:
        """Records for the ids that exist, in the order given (missing ids are skipped).

        ``with_vectors=True`` fills ``Record.tokens`` ``[Q, D]`` float32 (the stored originals).
        ``with_payload``: see :data:`PayloadSelector`.
        """
        ids_l = V.check_ids(ids)
        spec = V.payload_spec(with_payload)  # validated before touching the engine
        with self._use() as st:
            return st.retrieve(ids_l, with_vectors, spec) if ids_l else []

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
        V.check_count(limit, "limit")
        spec = V.payload_spec(with_payload)
        with self._use() as st:
            conds = parse_filter(filter, st.meta.fields)
            return st.scroll(limit, offset, spec, with_vectors, conds)

    def find_by_user_id(
        self, user_id: str, limit: int = 2, with_payload: PayloadSelector = True
    ) -> list[Record]:
        """Points whose payload ``user_id`` (:data:`USER_ID_KEY`) equals ``user_id``: at most
        ``limit`` of them, by point id (ask for 2 to tell a unique id from a clash). Uses the
        keyword payload index every version has on that key."""
        cond = user_id_condition(user_id)
        V.check_count(limit, "limit")
        spec = V.payload_spec(with_payload)
        with self._use() as st:
            return st.scroll(limit, None, spec, False, [cond])[0]

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
        V.check_count(n)
        if seed is None:
            spec = V.payload_spec(with_payload)
            with self._use() as st:
                return st.sample(n, spec)
        ids = sorted(r.id for r in self.iter_records(10_000, with_payload=False))
        if not ids:
            return []
        rng = np.random.default_rng(seed)
        pick = rng.choice(len(ids), size=min(n, len(ids)), replace=False)
        return self.get([ids[i] for i in pick], with_payload=with_payload)

    # ---- schema / info ----------------------------------------------------------------------
    def declared_fields(self) -> dict[str, FieldType]:  # pragma: no cover - overridden
        """Filterable payload fields and their types (from the version metadata)."""
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:  # pragma: no cover - overridden
        """Info dict: backend, uri, name, version, count, encoder_fingerprint, preset, shape,
        fields, created, and backend specifics. JSON-serialisable."""
        raise NotImplementedError

    def close(self) -> None:  # pragma: no cover - overridden
        """Flush and release the version (and the Edge lock). Idempotent."""
        raise NotImplementedError

    def __enter__(self) -> Any:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class VersionHandle(IndexView):
    """A version being built (``GalleryIndex.create_version``) or re-opened (``open_version``).

    Writable while the active version keeps serving (on Edge: its own shard directory and lock).
    Typical use::

        with idx.create_version(meta) as v:
            v.upsert(ids, tokens, payloads)
        idx.activate(v.version)
    """

    def __init__(
        self, index: GalleryIndex, slot: _Slot, read_only: bool = False, borrowed: bool = False
    ) -> None:
        self._index = index
        self._slot: _Slot | None = slot
        self._options = index._options
        self.read_only = read_only
        self._borrowed = borrowed  # the index's own active version: close() leaves it open
        self.version: str = slot.version
        self.meta: VersionMeta = slot.store.meta

    @contextmanager
    def _use(self, write: bool = False, tokens: Any = None) -> Iterator[VersionStore]:
        slot = self._slot
        if slot is None or slot.closed or self._index._closed:
            raise GalleryIndexError(f"version handle {self.version} is closed")
        if write and self.read_only:
            raise GalleryIndexError(f"version handle {self.version} was opened read-only")
        if not slot.acquire():
            raise GalleryIndexError(f"version handle {self.version} is closed")
        try:
            yield slot.store
        finally:
            slot.release()

    def _where(self, store: VersionStore) -> str:
        return self._index._where(store)

    def declared_fields(self) -> dict[str, FieldType]:
        return dict(self.meta.fields)

    def describe(self) -> dict[str, Any]:
        d = self._index._describe_version(self.version, self.meta)
        slot = self._slot
        if slot is not None and not slot.closed:
            d["count"] = self.count()
        return d

    def close(self) -> None:
        """Flush, build the indexes and release the version (then it can be activated or
        served). A writable handle always leaves its version finished, also when it wrote
        nothing (a build resumed after a kill before the indexes were built)."""
        slot, self._slot = self._slot, None
        if slot is not None and not self._borrowed:
            slot.close(finish=not self.read_only)
        self._index._handles.discard(self)


class GalleryIndex(IndexView):
    """A named gallery index: data operations go to the ACTIVE version, plus version management.

    Obtained with :func:`retrieval.index.open_index`. Thread-safe for concurrent searches;
    writes are serialised. If the name has no version yet, the first ``upsert`` creates and
    activates one (shape from the tokens, fingerprint/preset/fields from ``open_index``).
    """

    def __init__(
        self,
        backend: Backend,
        *,
        uri: str,
        name: str,
        encoder_fingerprint: str | None,
        preset: str | None,
        fields: Mapping[str, Any],
        force: bool,
        read_only: bool,
        keep_versions: int,
        options: Mapping[str, Any],
    ) -> None:
        self.uri = uri  # the URI given to open_index
        self.name = name
        self.read_only = read_only  # writes raise GalleryIndexError
        self._backend = backend
        self._fingerprint = encoder_fingerprint
        self._preset = preset
        self._fields = validate_fields(fields)
        self._force = force
        self._keep = max(0, int(keep_versions))
        self._options = dict(options)
        self._mutex = threading.RLock()
        self._slot: _Slot | None = None
        self._handles: set[VersionHandle] = set()
        self._closed = False
        try:
            active = backend.active()
            if active is None:
                if read_only:
                    raise IndexNotFoundError(
                        f"index {name!r} has no active version {backend.where} "
                        "(build it first, e.g. with the indexer)"
                    )
            else:
                meta, _ = backend.read_meta(active)
                self._guard(active, meta)
                if read_only or not backend.exclusive:  # Edge: a writer opens on first use
                    self._slot = _Slot(backend.open(active, meta))
        except BaseException:
            backend.close()
            raise

    @property
    def backend(self) -> str:
        """``"edge"`` | ``"qdrant"`` | ``"local"``."""
        return self._backend.kind

    @property
    def options(self) -> dict[str, Any]:
        """The search options given to ``open_index`` (see docs/index.md)."""
        return dict(self._options)

    # ---- model guard ------------------------------------------------------------------------
    def _guard(self, version: str, meta: VersionMeta) -> None:
        fp = self._fingerprint
        if fp is None or fp == meta.encoder_fingerprint:
            return
        msg = (
            f"index {self.name!r} version {version} was built with encoder fingerprint "
            f"{meta.encoder_fingerprint!r} (preset {meta.preset!r}, tokens {list(meta.shape)}) but "
            f"this process uses {fp!r}: query vectors would not be comparable. Re-index with "
            "this encoder, or open with force=True to accept it."
        )
        if self._force:
            logger.warning("%s (forced)", msg)
            return
        raise ModelMismatchError(msg)

    def _writable(self) -> None:
        if self.read_only:
            raise GalleryIndexError(f"index {self.name!r} was opened read-only")

    def _open(self, version: str, meta: VersionMeta) -> _Slot:
        return _Slot(self._backend.open(version, meta))

    def _where(self, store: VersionStore) -> str:
        return f"index {self.name!r} {store.version}"

    # ---- the active version -----------------------------------------------------------------
    @contextmanager
    def _use(self, write: bool = False, tokens: Any = None) -> Iterator[VersionStore]:
        if self._closed:
            raise GalleryIndexError(f"index {self.name!r} is closed")
        if write:
            self._writable()
        for _ in range(3):
            slot = self._slot
            if slot is None:
                slot = self._open_active(tokens if write else None)
            if slot.acquire():
                try:
                    yield slot.store
                finally:
                    slot.release()
                return
            # retired and closed between reading and acquiring: read the new one
        raise GalleryIndexError("index kept switching versions; retry")

    def _open_active(self, tokens: Any) -> _Slot:
        b = self._backend
        with self._mutex:
            if self._slot is not None and not self._slot.closed:
                return self._slot
            active = b.active()
            if active is not None:
                meta, _ = b.read_meta(active)
                self._guard(active, meta)
                self._slot = self._open(active, meta)
                return self._slot
            if tokens is None:
                raise IndexNotFoundError(f"index {self.name!r} has no version yet {b.where}")
            # auto-create on the first upsert: shape from the tokens, the rest from open_index
            meta = VersionMeta(
                self._fingerprint or "unspecified",
                self._preset or "",
                V.tokens_shape(tokens),
                dict(self._fields),
            )
            version = b.create(meta)
            self._slot = self._open(version, meta)
            with b.mutex():
                b.mark_activated(version)
                b.point(version, [])
            logger.info("created index %r version %s", self.name, version)
            return self._slot

    # ---- versions ---------------------------------------------------------------------------
    @property
    def active_version(self) -> str | None:
        """The version this object currently serves from (None: the name has no version yet)."""
        slot = self._slot
        if slot is not None and not slot.closed:
            return slot.version
        return self._backend.active()

    @property
    def meta(self) -> VersionMeta | None:
        """Metadata of the active version (None when there is no version)."""
        v = self.active_version
        return None if v is None else self._backend.read_meta(v)[0]

    def _open_stores(self) -> list[_Slot]:
        slots = [self._slot, *(h._slot for h in list(self._handles))]
        return [s for s in slots if s is not None and not s.closed]

    def _open_count(self, version: str) -> int | None:
        for s in self._open_stores():
            if s.version == version and s.acquire():
                try:
                    return int(s.store.count())
                finally:
                    s.release()
        return None

    def versions(self) -> list[VersionInfo]:
        """All versions of this name, oldest first."""
        b = self._backend
        active, history = b.active(), set(b.history())
        out = []
        for v, (meta, created, activated) in sorted(b.records().items()):
            count = b.count_version(v)
            if count is None:  # Edge: known when this object has the version open
                count = self._open_count(v)
            # versions activated before activated_at was recorded: known from the pointer
            ever = activated is not None or v == active or v in history
            out.append(VersionInfo(v, meta, created, count, v == active, activated, ever))
        return out

    def create_version(self, meta: VersionMeta) -> VersionHandle:
        """Create a new empty version (not active) and return a writable handle on it.

        Payload indexes are made for ``meta.fields``. The active version keeps serving.
        """
        self._writable()
        validate_fields(meta.fields)
        with self._mutex:
            version = self._backend.create(meta)
            handle = VersionHandle(self, self._open(version, meta))
            self._handles.add(handle)
        logger.info("index %r: building version %s", self.name, version)
        return handle

    def open_version(self, version: str, read_only: bool = False) -> VersionHandle:
        """A handle on an EXISTING version (active or not): to resume a build, to fill one
        version from several runs, or to verify a version before activating it.

        Same rules as ``create_version``: on Edge the handle takes the version's lock (pid in
        ``owner.lock``), so a version held by another process (a builder, or a server serving
        it) raises ``IndexInUseError`` with ``.pid``, at once. ``read_only=True``: writes raise
        ``GalleryIndexError`` (on Edge the lock is still taken: one opener per shard).
        The model guard applies (``ModelMismatchError`` unless forced). ``IndexNotFoundError``
        when the version does not exist. If this object already serves ``version`` as the
        active one, the handle shares that version (closing the handle leaves it open).
        """
        if self._closed:
            raise GalleryIndexError(f"index {self.name!r} is closed")
        if self.read_only and not read_only:
            raise GalleryIndexError(
                f"index {self.name!r} was opened read-only: use open_version(v, read_only=True)"
            )
        meta, _ = self._backend.read_meta(version)  # IndexNotFoundError when missing
        self._guard(version, meta)
        if not self._backend.exists(version):
            raise IndexNotFoundError(
                f"version {version} of index {self.name!r} is listed but its storage is missing"
            )
        with self._mutex:
            cur = self._slot
            if cur is not None and cur.version == version and not cur.closed:
                handle = VersionHandle(self, cur, read_only=read_only, borrowed=True)
            else:
                # IndexInUseError (with the pid) when another opener holds the version
                handle = VersionHandle(self, self._open(version, meta), read_only=read_only)
            self._handles.add(handle)
        logger.info(
            "index %r: opened version %s (%s)", self.name, version, "read" if read_only else "write"
        )
        return handle

    def update_version_meta(self, version: str, extra: Mapping[str, Any]) -> VersionMeta:
        """Merge ``extra`` into the version's ``VersionMeta.extra`` (a key set to ``None`` is
        removed) and return the new metadata. The rest of the metadata (fingerprint, shape,
        fields) is fixed at creation. Allowed on any version, active or not."""
        self._writable()
        if not isinstance(extra, Mapping):
            raise GalleryIndexError(f"extra must be a dict, got {type(extra).__name__}")
        return self._merge_extra(version, extra)

    def set_fast_calibration(
        self, version: str, calibration: Mapping[str, Any] | None
    ) -> VersionMeta:
        """Record ``version``'s fast-mode calibration (``extra["fast_calibration"]``; None
        removes it). Allowed on a read-only index too (a server's recall guard raising L): it
        changes how the version is searched, not its data. This object uses it at once; other
        processes on their next ``refresh()``."""
        if calibration is not None and not isinstance(calibration, Mapping):
            raise GalleryIndexError(
                f"calibration must be a dict or None, got {type(calibration).__name__}"
            )
        value = None if calibration is None else dict(calibration)
        return self._merge_extra(version, {CALIBRATION_KEY: value})

    def _merge_extra(self, version: str, extra: Mapping[str, Any]) -> VersionMeta:
        with self._mutex:
            new = merged_meta(self._backend, version, extra)
            for h in list(self._handles):
                if h.version == version:
                    h.meta = new
            for s in self._open_stores():
                if s.version == version:
                    s.store.meta = new
        return new

    def activate(self, version: str) -> None:
        """Point the name at ``version`` atomically (alias swap / pointer file ``os.replace``).

        The version's indexes are built first (Edge: its handles of this object are closed
        here; a version another process holds unfinished is refused; Qdrant: waits for the
        collection to be optimized). Versions beyond ``keep_versions`` old ones are dropped
        (never the active one). This object switches to the new version at once; other
        processes switch on ``refresh()``.
        """
        self._writable()
        b = self._backend
        meta, _ = b.read_meta(version)
        self._guard(version, meta)
        if b.exclusive:
            for h in list(self._handles):
                if h.version == version:
                    h.close()  # flush + build indexes + release, so a server can open it
        if b.active() != version:
            cur = self._slot
            mine = cur.store if cur is not None and cur.version == version else None
            b.finish(version, mine)
        with self._mutex, b.mutex():
            active = b.active()
            b.mark_activated(version)
            if active != version:
                history = [v for v in [active, *b.history()] if v and v != version]
                b.point(version, history)
                logger.info("index %r: active version %s -> %s", self.name, active, version)
            old = self._slot
            if old is not None and old.version != version:
                self._slot = None  # the next call opens the new one
                old.retire()
        self._prune()

    def _prune(self) -> None:
        b = self._backend
        active, history = b.active(), b.history()
        busy = {h.version for h in self._handles}
        old = [v for v in reversed(b.list_versions()) if v != active]
        for v in old[self._keep :]:
            if v in busy or b.in_use(v, history):
                logger.info("index %r: keeping %s beyond the limit (in use)", self.name, v)
                continue
            try:
                self.drop_version(v)
            except IndexInUseError:
                continue

    def drop_version(self, version: str) -> None:
        """Delete a version's data. Refuses (GalleryIndexError) to drop the active version."""
        self._writable()
        b = self._backend
        with self._mutex:
            if version == b.active():
                raise GalleryIndexError(
                    f"refusing to drop {version}: it is the active version of {self.name!r}"
                )
            b.read_meta(version)  # IndexNotFoundError when missing
            b.drop(version)  # IndexInUseError while a process still serves/builds it
            with b.mutex():
                history = b.history()
                if version in history:
                    b.set_history([v for v in history if v != version])
        logger.info("index %r: dropped version %s", self.name, version)

    def rollback(self) -> str:
        """Re-activate the previously active version still kept; returns it.

        Raises ``IndexNotFoundError`` when there is none.
        """
        existing = set(self._backend.list_versions())
        for v in self._backend.history():
            if v in existing:
                self.activate(v)
                return v
        raise IndexNotFoundError(f"index {self.name!r} has no previous version to roll back to")

    def refresh(self) -> bool:
        """Cheap check of the name's pointer/alias; if it changed, open the new version, swap
        atomically (searches in flight finish on the old one, which is closed afterwards) and
        return True. Raises ``ModelMismatchError`` (and keeps serving the old version) when the
        new version's fingerprint differs from the one given to ``open_index`` (unless forced).
        Also picks up a calibration another process recorded for the served version.
        Servers call it periodically (e.g. every second) or on an admin RPC.
        """
        b = self._backend
        active = b.active()
        cur = self._slot
        if active is None or (cur is not None and cur.version == active):
            if cur is not None and not cur.closed:
                self._reload_calibration(cur.store)
            return False
        if cur is None and not self.read_only:
            return False  # nothing opened yet: the next call opens the active version
        meta, _ = b.read_meta(active)
        self._guard(active, meta)
        try:
            new = self._open(active, meta)
        except IndexInUseError as exc:
            # the builder has not released it yet: keep serving the old version, retry later
            logger.info("index %r: %s not switchable yet: %s", self.name, active, exc)
            return False
        with self._mutex:
            old, self._slot = self._slot, new
        if old is not None:
            old.retire()
        logger.info(
            "index %r: switched %s -> %s", self.name, old.version if old else None, new.version
        )
        return True

    def _reload_calibration(self, store: VersionStore) -> None:
        """Pick up a calibration another process recorded for the served version (``cir index
        calibrate``, another server's recall guard): searches read ``store.meta``."""
        try:
            meta, _ = self._backend.read_meta(store.version)
        except (IndexNotFoundError, OSError, ValueError):
            return
        key = CALIBRATION_KEY
        if meta.extra.get(key) != store.meta.extra.get(key):
            logger.info(
                "index %r %s: fast calibration changed (L %s -> %s)",
                self.name,
                store.version,
                (store.meta.extra.get(key) or {}).get("L"),
                (meta.extra.get(key) or {}).get("L"),
            )
            store.meta = meta

    # ---- schema / info ----------------------------------------------------------------------
    def declared_fields(self) -> dict[str, FieldType]:
        m = self.meta
        return dict(m.fields) if m is not None else dict(self._fields)

    def _describe_version(self, version: str | None, meta: VersionMeta | None) -> dict[str, Any]:
        return {
            "backend": self.backend,
            "uri": self.uri,
            "name": self.name,
            "version": version,
            "count": None,
            "encoder_fingerprint": meta.encoder_fingerprint if meta else None,
            "preset": meta.preset if meta else None,
            "shape": list(meta.shape) if meta else None,
            "fields": dict(meta.fields) if meta else {},
            "extra": dict(meta.extra) if meta else {},
            "pid": os.getpid(),
            **self._backend.describe(version),
        }

    def describe(self) -> dict[str, Any]:
        b = self._backend
        v = self.active_version
        meta, created = b.read_meta(v) if v else (None, None)
        d = self._describe_version(v, meta)
        d["created"] = created
        d["versions"] = b.list_versions()
        d["read_only"] = self.read_only
        slot = self._slot
        if slot is not None and not slot.closed:
            d["count"] = self.count()
        return d

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            for h in list(self._handles):
                h.close()
            with self._mutex:
                slot, self._slot = self._slot, None
            if slot is not None:
                slot.close()
        finally:
            self._backend.close()

    def __del__(self) -> None:  # best effort: release the lock if the caller forgot close()
        try:
            if not self._closed and (self._slot is not None or self._handles):
                self.close()
        except Exception:
            pass
