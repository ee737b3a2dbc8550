"""Qdrant Edge backend: the Qdrant engine in-process, one shard directory per version.

Per point: ``tokens`` (multivector, MaxSim, int8 scalar quantization kept in RAM, originals on
disk, no HNSW graph: m=0) and ``pooled`` (HNSW m=16) plus the payload. ``exact`` scans the int8
tokens and rescores with the originals; ``fast`` prefetches L candidates by ``pooled`` and
reranks them by MaxSim on ``tokens``, in one engine call.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from retrieval.index import common
from retrieval.index.api import (
    ID_KEY,
    SEARCH_PAYLOAD,
    USER_ID_KEY,
    FieldType,
    Filter,
    GalleryIndex,
    Hit,
    PayloadSelector,
    Record,
    SearchMode,
    VersionHandle,
    VersionInfo,
    VersionMeta,
)
from retrieval.index.errors import (
    GalleryIndexError,
    IndexInUseError,
    IndexNotFoundError,
    ModelMismatchError,
)
from retrieval.index.versions import Catalog, OwnerLock, Pointer, is_locked, write_json_atomic

logger = logging.getLogger(__name__)

UPSERT_BATCH = 256  # points per engine update call (bounded memory per call)
#: Written into a version's folder once its shard is optimized (indexes built) after its last
#: write; removed by the next write. A version without it is never activated.
FINISHED_FILE = "finished.json"


def _edge() -> Any:
    import qdrant_edge

    return qdrant_edge


def shard_config(meta: VersionMeta, options: Mapping[str, Any]) -> Any:
    q = _edge()
    _, dim = meta.shape
    tokens = q.EdgeVectorParams(
        size=dim,
        distance=q.Distance.Dot,
        multivector_config=q.MultiVectorConfig(q.MultiVectorComparator.MaxSim),
        # int8 copy in RAM for the scan; float32 originals on disk for rescoring
        quantization_config=q.ScalarQuantizationConfig(
            q.ScalarType.Int8, quantile=float(options.get("quantile", 0.99)), always_ram=True
        ),
        # m=0: no graph on the multivector (HNSW on it took 30 min per 100k and lost)
        hnsw_config=q.HnswIndexConfig(m=0, ef_construct=100, full_scan_threshold=10),
        on_disk=True,
    )
    pooled = q.EdgeVectorParams(
        size=dim,
        distance=q.Distance.Dot,
        hnsw_config=q.HnswIndexConfig(
            m=int(options.get("hnsw_m", 16)),
            ef_construct=int(options.get("hnsw_ef_construct", 100)),
            full_scan_threshold=int(options.get("full_scan_threshold_kb", 10_000)),
        ),
    )
    # WAL stays on: with it disabled a second opener silently sees an empty shard
    return q.EdgeConfig(vectors={"tokens": tokens, "pooled": pooled}, wal_enabled=True)


_SCHEMA = {"keyword": "Keyword", "integer": "Integer", "float": "Float", "bool": "Bool"}


def bool_key(field: str) -> str:
    """Shadow integer key for a bool field: qdrant-edge-py 0.9.0 turns MatchValue(True) into
    MatchValue(1), which matches no bool payload, so bools are also stored (and matched) as 0/1."""
    return f"_b_{field}"


def edge_filter(conds: list[common.Condition]) -> Any:
    if not conds:
        return None
    q = _edge()
    must = []
    for c in conds:
        if c.kind == "eq" and isinstance(c.value, bool):
            must.append(q.FieldCondition(bool_key(c.key), match=q.MatchValue(int(c.value))))
        elif c.kind == "eq":
            must.append(q.FieldCondition(c.key, match=q.MatchValue(c.value)))
        elif c.kind == "any":
            must.append(q.FieldCondition(c.key, match=q.MatchAny(list(c.value))))
        else:
            must.append(q.FieldCondition(c.key, range=q.RangeFloat(**c.value)))
    return q.Filter(must=must)


def edge_payload(spec: Any) -> Any:
    """``PayloadSelector`` -> what Edge's ``with_payload`` takes."""
    kind, keys = common.payload_spec(spec)
    if kind == "all":
        return True
    if kind == "include":
        return keys
    return _edge().PayloadSelector.Exclude(keys)


def _record(r: Any, with_vectors: bool) -> Record:
    cid, payload = common.strip_payload(r.payload)
    toks = None
    vec = getattr(r, "vector", None)
    if with_vectors and vec:
        toks = np.asarray(vec["tokens"], dtype=np.float32)
    return Record(cid or str(r.id), payload, toks)


class _Shard:
    """An opened (and locked) Edge shard of one version, with a reference count so that a
    retired shard is closed only after the searches running on it finish."""

    def __init__(self, catalog: Catalog, version: str, options: Mapping[str, Any]) -> None:
        self.catalog = catalog
        self.version = version
        self.options = options
        self.meta, self.created = catalog.read_meta(version)
        self.path = catalog.version_dir(version) / "shard"
        self.finished_path = catalog.version_dir(version) / FINISHED_FILE
        self.lock = catalog.lock(version)
        self.lock.acquire()  # IndexInUseError when another opener has it
        try:
            q = _edge()
            if (self.path / "edge_config.json").exists():
                self.shard = q.EdgeShard.load(str(self.path))
            else:
                self.shard = q.EdgeShard.create(str(self.path), shard_config(self.meta, options))
                if self.meta.fields.get(USER_ID_KEY) != "keyword":  # the user-id lookup
                    self.shard.update(
                        q.UpdateOperation.create_field_index(
                            USER_ID_KEY, q.PayloadSchemaType.Keyword
                        )
                    )
                for fname, ftype in self.meta.fields.items():
                    schema = getattr(q.PayloadSchemaType, _SCHEMA[ftype])
                    self.shard.update(q.UpdateOperation.create_field_index(fname, schema))
                    if ftype == "bool":
                        self.shard.update(
                            q.UpdateOperation.create_field_index(
                                bool_key(fname), q.PayloadSchemaType.Integer
                            )
                        )
        except BaseException as exc:
            self.lock.release()
            if "WouldBlock" in str(exc):  # the engine's own WAL lock (should be caught above)
                raise IndexInUseError(f"{self.lock.what} is in use by another opener") from exc
            raise
        self._count: int | None = None
        self.refs = 0
        self.retired = False
        self.closed = False
        self.dirty = False
        self.cv = threading.Condition()
        self.write_lock = threading.Lock()

    # reference counting ----------------------------------------------------------------------
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
        """Close once idle (in-flight searches finish first)."""
        with self.cv:
            self.retired = True
            if self.refs == 0:
                self._close_locked()

    def close(self, wait: float = 30.0, finish: bool = False) -> None:
        """Close once idle; ``finish``: also optimize a shard not finished yet (a writer's
        close, also when this process wrote nothing: a resumed build after a kill)."""
        with self.cv:
            self.cv.wait_for(lambda: self.refs == 0, timeout=wait)
            self._close_locked(finish)

    def _close_locked(self, finish: bool = False) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            if self.dirty or (finish and not self.finished):
                self.finish()
            self.shard.flush()
            self.shard.close()
        finally:
            self.lock.release()

    @property
    def finished(self) -> bool:
        """Optimized since its last write (by this process or an earlier one)."""
        return not self.dirty and self.finished_path.exists()

    def _written(self) -> None:
        """Called before every write: the shard is not finished any more."""
        if not self.dirty:
            self.dirty = True
            self.finished_path.unlink(missing_ok=True)

    def finish(self) -> None:
        """Build indexes (HNSW on pooled, int8 on tokens) for what was written, then record
        it. Idempotent: optimizing an optimized shard returns at once."""
        t0 = time.perf_counter()
        self.shard.optimize()
        self.shard.flush()
        info = self.shard.info()
        self.dirty = False
        write_json_atomic(
            self.finished_path,
            {
                "finished": time.time(),
                "points": int(info.points_count),
                "segments": int(info.segments_count),
                "indexed_vectors": int(info.indexed_vectors_count),
            },
        )
        logger.info(
            "optimized %s %s in %.1fs", self.catalog.name, self.version, time.perf_counter() - t0
        )

    # data ------------------------------------------------------------------------------------
    def count(self, conds: list[common.Condition] | None = None) -> int:
        q = _edge()
        if not conds:
            if self._count is None:
                self._count = int(self.shard.count(q.CountRequest(exact=True)))
            return self._count
        return int(self.shard.count(q.CountRequest(exact=True, filter=edge_filter(conds))))

    def upsert(self, ids: list[str], tokens: np.ndarray, payloads: list[dict[str, Any]]) -> int:
        q = _edge()
        pooled = common.pooled_of(tokens)
        bools = [f for f, t in self.meta.fields.items() if t == "bool"]
        with self.write_lock:
            self._count = None
            self._written()
            for s in range(0, len(ids), UPSERT_BATCH):
                pts = []
                for i in range(s, min(len(ids), s + UPSERT_BATCH)):
                    payload = dict(payloads[i])
                    payload[ID_KEY] = ids[i]
                    for f in bools:
                        if isinstance(payload.get(f), bool):
                            payload[bool_key(f)] = int(payload[f])
                    vec = {"tokens": tokens[i], "pooled": pooled[i]}
                    pts.append(q.Point(common.point_id(ids[i]), vec, payload))
                self.shard.update(q.UpdateOperation.upsert_points(pts))
        return len(ids)

    def delete(self, ids: list[str]) -> None:
        q = _edge()
        with self.write_lock:
            self._count = None
            self._written()
            pids = [common.point_id(i) for i in ids]
            for s in range(0, len(pids), 1000):
                self.shard.update(q.UpdateOperation.delete_points(pids[s : s + 1000]))

    def flush(self) -> None:
        with self.write_lock:
            self.shard.flush()

    def get(self, ids: list[str], with_vectors: bool, with_payload: Any = True) -> list[Record]:
        pids = [common.point_id(i) for i in ids]
        recs = self.shard.retrieve(
            pids,
            with_payload=edge_payload(with_payload),
            with_vector=["tokens"] if with_vectors else False,
        )
        by_pid = {str(r.id): r for r in recs}
        return [_record(by_pid[pid], with_vectors) for pid in pids if pid in by_pid]

    def scroll(
        self,
        limit: int,
        offset: str | None,
        with_payload: Any,
        with_vectors: bool,
        conds: list[common.Condition],
    ) -> tuple[list[Record], str | None]:
        q = _edge()
        recs, nxt = self.shard.scroll(
            q.ScrollRequest(
                offset=offset,
                limit=limit,
                filter=edge_filter(conds),
                with_payload=edge_payload(with_payload),
                with_vector=["tokens"] if with_vectors else False,
            )
        )
        return [_record(r, with_vectors) for r in recs], (None if nxt is None else str(nxt))

    def sample(self, n: int, with_payload: Any) -> list[Record]:
        q = _edge()
        res = self.shard.query(
            q.QueryRequest(limit=n, query=q.Sample.Random, with_payload=edge_payload(with_payload))
        )
        return [_record(p, False) for p in res]

    def requests(
        self, queries: np.ndarray, top_k: int, offset: int, conds: list[common.Condition], mode: str
    ) -> list[Any]:
        q = _edge()
        n = self.count()
        flt = edge_filter(conds)
        cal = self.meta.extra.get(common.CALIBRATION_KEY)
        asked = mode
        # auto -> exact/fast; fast -> exact when this version has no L meeting the target, or
        # when the candidate list would hold every point anyway
        mode, why = common.resolve_mode(mode, top_k, offset, n, self.options, cal)
        if why and asked == "fast" and common.uncalibrated_reason(self.options, cal):
            common.note_exact_fallback(f"index {self.catalog.name!r} {self.version}", why)
        limit_l, ef, exact_pre = common.fast_plan(top_k, offset, self.options, n, cal)
        # exact prefetch: scan every `pooled` vector instead of walking the HNSW graph
        pre_params = q.SearchParams(hnsw_ef=ef, exact=exact_pre)
        oversampling = common.oversampling_for(top_k, offset, self.options)
        params = q.SearchParams(
            quantization=q.QuantizationSearchParams(rescore=True, oversampling=oversampling)
        )
        reqs = []
        for vec in queries:
            if mode == "exact":
                reqs.append(
                    q.QueryRequest(
                        limit=top_k,
                        offset=offset,
                        query=q.Query.Nearest(vec, using="tokens"),
                        filter=flt,
                        params=params,
                        with_payload=edge_payload(SEARCH_PAYLOAD),
                        with_vector=False,
                    )
                )
            else:
                pre = q.Prefetch(
                    limit=limit_l,
                    query=q.Query.Nearest(vec, using="pooled"),
                    filter=flt,
                    params=pre_params,
                )
                reqs.append(
                    q.QueryRequest(
                        limit=top_k,
                        offset=offset,
                        prefetches=[pre],
                        query=q.Query.Nearest(vec, using="tokens"),
                        filter=flt,
                        params=params,
                        with_payload=edge_payload(SEARCH_PAYLOAD),
                        with_vector=False,
                    )
                )
        return reqs

    def search(
        self, queries: np.ndarray, top_k: int, offset: int, conds: list[common.Condition], mode: str
    ) -> list[list[Hit]]:
        q = _edge()
        reqs = self.requests(queries, top_k, offset, conds, mode)
        if len(reqs) == 1:
            results = [self.shard.query(reqs[0])]
        else:
            results = self.shard.query_batch(q.QueryBatchRequest(reqs))
        out = []
        for res in results:
            hits = []
            for p in res:
                cid, payload = common.strip_payload(p.payload)
                hits.append(Hit(cid, float(p.score), payload))
            out.append(hits)
        return out


class _EdgeOps:
    """Data operations shared by the index (active version) and version handles."""

    _options: dict[str, Any]
    read_only: bool

    @contextmanager
    def _use(self, write: bool = False, tokens: Any = None) -> Iterator[_Shard]:
        raise NotImplementedError

    def upsert(
        self,
        ids: Sequence[str],
        tokens: np.ndarray,
        payloads: Sequence[Mapping[str, Any]] | None = None,
    ) -> int:
        ids_l = common.check_ids(ids)
        pls = common.check_payloads(payloads, len(ids_l))
        if not ids_l:
            return 0
        with self._use(write=True, tokens=tokens) as sh:
            toks = common.normalise_tokens(tokens, len(ids_l), sh.meta.shape)
            return sh.upsert(ids_l, toks, pls)

    def delete(self, ids: Sequence[str]) -> None:
        ids_l = common.check_ids(ids)
        if ids_l:
            with self._use(write=True) as sh:
                sh.delete(ids_l)

    def flush(self) -> None:
        with self._use(write=True) as sh:
            sh.flush()

    def search(
        self,
        query: np.ndarray,
        top_k: int = 10,
        offset: int = 0,
        filter: Filter | None = None,
        mode: SearchMode = "auto",
    ) -> list[Hit]:
        return self._search(query, top_k, offset, filter, mode, batch=False)[0]

    def search_batch(
        self,
        queries: np.ndarray,
        top_k: int = 10,
        offset: int = 0,
        filter: Filter | None = None,
        mode: SearchMode = "auto",
    ) -> list[list[Hit]]:
        return self._search(queries, top_k, offset, filter, mode, batch=True)

    def _search(
        self, query: Any, top_k: int, offset: int, flt: Filter | None, mode: str, batch: bool
    ) -> list[list[Hit]]:
        common.check_paging(top_k, offset, mode)
        with self._use() as sh:
            qs = common.normalise_queries(query, sh.meta.shape[1], batch)
            conds = common.parse_filter(flt, sh.meta.fields)
            if len(qs) == 0:
                return []
            return sh.search(qs, top_k, offset, conds, mode)

    def count(self, filter: Filter | None = None) -> int:
        with self._use() as sh:
            return sh.count(common.parse_filter(filter, sh.meta.fields))

    def get(
        self, ids: Sequence[str], with_vectors: bool = False, with_payload: PayloadSelector = True
    ) -> list[Record]:
        ids_l = common.check_ids(ids)
        common.payload_spec(with_payload)  # validate before touching the shard
        with self._use() as sh:
            return sh.get(ids_l, with_vectors, with_payload) if ids_l else []

    def scroll(
        self,
        limit: int = 256,
        offset: str | None = None,
        with_payload: PayloadSelector = True,
        with_vectors: bool = False,
        filter: Filter | None = None,
    ) -> tuple[list[Record], str | None]:
        common.check_count(limit, "limit")
        common.payload_spec(with_payload)
        with self._use() as sh:
            conds = common.parse_filter(filter, sh.meta.fields)
            return sh.scroll(limit, offset, with_payload, with_vectors, conds)

    def _engine_sample(self, n: int, with_payload: PayloadSelector) -> list[Record]:
        common.payload_spec(with_payload)
        with self._use() as sh:
            return sh.sample(n, with_payload)

    def find_by_user_id(
        self, user_id: str, limit: int = 2, with_payload: PayloadSelector = True
    ) -> list[Record]:
        cond = common.user_id_condition(user_id)
        common.check_count(limit, "limit")
        common.payload_spec(with_payload)
        with self._use() as sh:
            return sh.scroll(limit, None, with_payload, False, [cond])[0]


class EdgeVersionHandle(_EdgeOps, VersionHandle):
    """A version being built; owns its shard (and lock) until closed."""

    def __init__(
        self,
        index: EdgeGalleryIndex,
        shard: _Shard,
        read_only: bool = False,
        borrowed: bool = False,
    ) -> None:
        self._index = index
        self._shard: _Shard | None = shard
        self._options = index._options
        self.read_only = read_only
        self._borrowed = borrowed  # the index's own active shard: close() leaves it open
        self.version = shard.version
        self.meta = shard.meta

    @contextmanager
    def _use(self, write: bool = False, tokens: Any = None) -> Iterator[_Shard]:
        sh = self._shard
        if sh is None or sh.closed:
            raise GalleryIndexError(f"version handle {self.version} is closed")
        if write and self.read_only:
            raise GalleryIndexError(f"version handle {self.version} was opened read-only")
        if not sh.acquire():
            raise GalleryIndexError(f"version handle {self.version} is closed")
        try:
            yield sh
        finally:
            sh.release()

    def declared_fields(self) -> dict[str, FieldType]:
        return dict(self.meta.fields)

    def describe(self) -> dict[str, Any]:
        d = self._index._describe_version(self.version, self.meta)
        if self._shard is not None and not self._shard.closed:
            d["count"] = self._shard.count()
        return d

    def close(self) -> None:
        """Flush, build the indexes and release the shard (then it can be activated/served).
        A writable handle always leaves its version finished, also when it wrote nothing (a
        build resumed after a kill before the indexes were built)."""
        if self._shard is not None:
            if not self._borrowed:
                self._shard.close(finish=not self.read_only)
            self._shard = None
        self._index._handles.discard(self)


class EdgeGalleryIndex(_EdgeOps, GalleryIndex):
    backend = "edge"

    def __init__(
        self,
        location: str,
        *,
        uri: str,
        name: str,
        encoder_fingerprint: str | None,
        preset: str | None,
        fields: dict[str, FieldType],
        force: bool,
        read_only: bool,
        keep_versions: int,
        options: dict[str, Any],
    ) -> None:
        self.uri = uri
        self.name = name
        self.root = Path(location)
        self.read_only = read_only
        self.catalog = Catalog(self.root, name)
        self._fingerprint = encoder_fingerprint
        self._preset = preset
        self._fields = common.validate_fields(fields)
        self._force = force
        self._keep = max(0, int(keep_versions))
        self._options = options
        self._mutex = threading.RLock()
        self._shard: _Shard | None = None
        self._handles: set[EdgeVersionHandle] = set()
        self._closed = False
        ptr = self.catalog.read_pointer()
        if ptr.active is None:
            if read_only:
                raise IndexNotFoundError(
                    f"index {name!r} has no active version under {self.catalog.dir} "
                    "(build it first, e.g. with the indexer)"
                )
        else:
            meta, _ = self.catalog.read_meta(ptr.active)
            self._guard(ptr.active, meta)
            if read_only:
                self._shard = _Shard(self.catalog, ptr.active, options)

    # model guard -----------------------------------------------------------------------------
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

    # shard access ----------------------------------------------------------------------------
    @contextmanager
    def _use(self, write: bool = False, tokens: Any = None) -> Iterator[_Shard]:
        if self._closed:
            raise GalleryIndexError(f"index {self.name!r} is closed")
        if write and self.read_only:
            raise GalleryIndexError(f"index {self.name!r} was opened read-only")
        for _ in range(3):
            sh = self._shard
            if sh is None:
                sh = self._open_active(tokens if write else None)
            if sh.acquire():
                try:
                    yield sh
                finally:
                    sh.release()
                return
            # retired and closed between reading and acquiring: read the new one
        raise GalleryIndexError("index kept switching versions; retry")

    def _open_active(self, tokens: Any) -> _Shard:
        with self._mutex:
            if self._shard is not None and not self._shard.closed:
                return self._shard
            ptr = self.catalog.read_pointer()
            if ptr.active is None:
                if tokens is None:
                    raise IndexNotFoundError(
                        f"index {self.name!r} has no version yet under {self.catalog.dir}"
                    )
                arr = np.asarray(tokens)
                if arr.ndim != 3:
                    common.normalise_tokens(arr, len(arr), None)  # raises a clear error
                meta = VersionMeta(
                    self._fingerprint or "unspecified",
                    self._preset or "",
                    (int(arr.shape[1]), int(arr.shape[2])),
                    dict(self._fields),
                )
                version = self.catalog.new_version(meta)
                self._shard = _Shard(self.catalog, version, self._options)
                with self.catalog.mutex():
                    self.catalog.mark_activated(version)
                    self.catalog.write_pointer(Pointer(version, []))
                logger.info("created index %r version %s", self.name, version)
                return self._shard
            meta, _ = self.catalog.read_meta(ptr.active)
            self._guard(ptr.active, meta)
            self._shard = _Shard(self.catalog, ptr.active, self._options)
            return self._shard

    # versions --------------------------------------------------------------------------------
    @property
    def active_version(self) -> str | None:
        sh = self._shard
        if sh is not None and not sh.closed:
            return sh.version
        return self.catalog.read_pointer().active

    @property
    def meta(self) -> VersionMeta | None:
        v = self.active_version
        return None if v is None else self.catalog.read_meta(v)[0]

    def versions(self) -> list[VersionInfo]:
        ptr = self.catalog.read_pointer()
        out = []
        for v in self.catalog.list_versions():
            try:
                meta, created = self.catalog.read_meta(v)
                activated = self.catalog.read_activated(v)
            except IndexNotFoundError:  # dropped meanwhile
                continue
            count = None
            for sh in [self._shard, *(h._shard for h in self._handles)]:
                if sh is not None and sh.version == v and not sh.closed:
                    count = sh.count()
            # versions activated before activated_at was recorded: known from the pointer
            ever = activated is not None or v == ptr.active or v in ptr.history
            out.append(VersionInfo(v, meta, created, count, v == ptr.active, activated, ever))
        return out

    def create_version(self, meta: VersionMeta) -> VersionHandle:
        if self.read_only:
            raise GalleryIndexError(f"index {self.name!r} was opened read-only")
        common.validate_fields(meta.fields)
        version = self.catalog.new_version(meta)
        handle = EdgeVersionHandle(self, _Shard(self.catalog, version, self._options))
        self._handles.add(handle)
        logger.info("index %r: building version %s", self.name, version)
        return handle

    def open_version(self, version: str, read_only: bool = False) -> VersionHandle:
        if self._closed:
            raise GalleryIndexError(f"index {self.name!r} is closed")
        if self.read_only and not read_only:
            raise GalleryIndexError(
                f"index {self.name!r} was opened read-only: use open_version(v, read_only=True)"
            )
        meta, _ = self.catalog.read_meta(version)  # IndexNotFoundError when missing
        self._guard(version, meta)
        with self._mutex:
            cur = self._shard
            if cur is not None and cur.version == version and not cur.closed:
                handle = EdgeVersionHandle(self, cur, read_only=read_only, borrowed=True)
            else:
                # IndexInUseError (with the pid) when another opener holds the version
                shard = _Shard(self.catalog, version, self._options)
                handle = EdgeVersionHandle(self, shard, read_only=read_only)
            self._handles.add(handle)
        logger.info(
            "index %r: opened version %s (%s)", self.name, version, "read" if read_only else "write"
        )
        return handle

    def update_version_meta(self, version: str, extra: Mapping[str, Any]) -> VersionMeta:
        if self.read_only:
            raise GalleryIndexError(f"index {self.name!r} was opened read-only")
        if not isinstance(extra, Mapping):
            raise GalleryIndexError(f"extra must be a dict, got {type(extra).__name__}")
        return self._merge_extra(version, extra)

    def set_fast_calibration(
        self, version: str, calibration: Mapping[str, Any] | None
    ) -> VersionMeta:
        """Record ``version``'s fast-mode calibration (``extra["fast_calibration"]``; None
        removes it). Allowed on a read-only index too (a server's recall guard raising L): it
        changes how the version is searched, not its data. This object's open shard uses it at
        once; other processes on their next ``refresh()``."""
        if calibration is not None and not isinstance(calibration, Mapping):
            raise GalleryIndexError(
                f"calibration must be a dict or None, got {type(calibration).__name__}"
            )
        value = None if calibration is None else dict(calibration)
        return self._merge_extra(version, {common.CALIBRATION_KEY: value})

    def _merge_extra(self, version: str, extra: Mapping[str, Any]) -> VersionMeta:
        new = self.catalog.update_extra(version, extra)
        for h in list(self._handles):
            if h.version == version:
                h.meta = new
        for sh in [self._shard, *(h._shard for h in self._handles)]:
            if sh is not None and sh.version == version:
                sh.meta = new
        return new

    def activate(self, version: str) -> None:
        if self.read_only:
            raise GalleryIndexError(f"index {self.name!r} was opened read-only")
        meta, _ = self.catalog.read_meta(version)
        self._guard(version, meta)
        for h in list(self._handles):
            if h.version == version:
                h.close()  # flush + build indexes + release, so a server can open it
        self._ensure_finished(version)
        with self._mutex, self.catalog.mutex():
            ptr = self.catalog.read_pointer()
            self.catalog.mark_activated(version)
            if ptr.active != version:
                history = [v for v in [ptr.active, *ptr.history] if v and v != version]
                self.catalog.write_pointer(Pointer(version, history))
                logger.info("index %r: active version %s -> %s", self.name, ptr.active, version)
            old = self._shard
            if old is not None and old.version != version:
                self._shard = None
                old.retire()
        self._prune()

    def _ensure_finished(self, version: str) -> None:
        """Never activate a version whose indexes were not built: finish it here when its last
        writer did not (killed before its close), or refuse."""
        if (self.catalog.version_dir(version) / FINISHED_FILE).exists():
            return
        if self.catalog.read_pointer().active == version:
            return  # already active (and served): nothing is switched
        with self._mutex:
            cur = self._shard
            if cur is not None and cur.version == version and not cur.closed:
                with cur.write_lock:
                    cur.finish()
                return
        try:
            shard = _Shard(self.catalog, version, self._options)
        except IndexInUseError as exc:
            raise GalleryIndexError(
                f"refusing to activate {version}: its indexes were never built (its build "
                f"stopped before finishing) and another process holds it: {exc}. Let that "
                "build finish (or resume it), then activate."
            ) from exc
        logger.warning(
            "index %r: %s was not finished by its build; building its indexes before activating",
            self.name,
            version,
        )
        shard.close(finish=True)

    def _prune(self) -> None:
        ptr = self.catalog.read_pointer()
        busy = {h.version for h in self._handles}
        old = [v for v in reversed(self.catalog.list_versions()) if v != ptr.active]
        for v in old[self._keep :]:
            if v in busy or is_locked(self.catalog.version_dir(v) / "owner.lock"):
                logger.info("index %r: keeping %s beyond the limit (in use)", self.name, v)
                continue
            try:
                self.drop_version(v)
            except IndexInUseError:
                continue

    def drop_version(self, version: str) -> None:
        if self.read_only:
            raise GalleryIndexError(f"index {self.name!r} was opened read-only")
        with self._mutex:
            ptr = self.catalog.read_pointer()
            if version == ptr.active:
                raise GalleryIndexError(
                    f"refusing to drop {version}: it is the active version of {self.name!r}"
                )
            self.catalog.read_meta(version)  # IndexNotFoundError when missing
            lock: OwnerLock = self.catalog.lock(version)
            lock.acquire()  # IndexInUseError while a process still serves/builds it
            try:
                self.catalog.remove(version)
            finally:
                lock.release()
            with self.catalog.mutex():
                ptr = self.catalog.read_pointer()
                if version in ptr.history:
                    self.catalog.write_pointer(
                        Pointer(ptr.active, [v for v in ptr.history if v != version])
                    )
        logger.info("index %r: dropped version %s", self.name, version)

    def rollback(self) -> str:
        ptr = self.catalog.read_pointer()
        existing = set(self.catalog.list_versions())
        for v in ptr.history:
            if v in existing:
                self.activate(v)
                return v
        raise IndexNotFoundError(f"index {self.name!r} has no previous version to roll back to")

    def refresh(self) -> bool:
        ptr = self.catalog.read_pointer()
        cur = self._shard
        if ptr.active is None or (cur is not None and cur.version == ptr.active):
            if cur is not None and not cur.closed:
                self._reload_calibration(cur)
            return False
        if cur is None and not self.read_only:
            return False  # nothing opened yet: the next call opens the active version
        meta, _ = self.catalog.read_meta(ptr.active)
        self._guard(ptr.active, meta)
        try:
            new = _Shard(self.catalog, ptr.active, self._options)
        except IndexInUseError as exc:
            # the builder has not released it yet: keep serving the old version, retry later
            logger.info("index %r: %s not switchable yet: %s", self.name, ptr.active, exc)
            return False
        with self._mutex:
            old, self._shard = self._shard, new
        if old is not None:
            old.retire()
        logger.info(
            "index %r: switched %s -> %s", self.name, old.version if old else None, new.version
        )
        return True

    def _reload_calibration(self, sh: _Shard) -> None:
        """Pick up a calibration another process recorded for the served version (``cir index
        calibrate``, another server's recall guard): searches read ``sh.meta``."""
        try:
            meta, _ = self.catalog.read_meta(sh.version)
        except (IndexNotFoundError, OSError, ValueError):
            return
        key = common.CALIBRATION_KEY
        if meta.extra.get(key) != sh.meta.extra.get(key):
            logger.info(
                "index %r %s: fast calibration changed on disk (L %s -> %s)",
                self.name,
                sh.version,
                (sh.meta.extra.get(key) or {}).get("L"),
                (meta.extra.get(key) or {}).get("L"),
            )
            sh.meta = meta

    # schema / info ---------------------------------------------------------------------------
    def declared_fields(self) -> dict[str, FieldType]:
        m = self.meta
        return dict(m.fields) if m is not None else dict(self._fields)

    def _describe_version(self, version: str | None, meta: VersionMeta | None) -> dict[str, Any]:
        return {
            "backend": self.backend,
            "uri": self.uri,
            "name": self.name,
            "path": str(self.catalog.dir),
            "version": version,
            "count": None,
            "encoder_fingerprint": meta.encoder_fingerprint if meta else None,
            "preset": meta.preset if meta else None,
            "shape": list(meta.shape) if meta else None,
            "fields": dict(meta.fields) if meta else {},
            "extra": dict(meta.extra) if meta else {},
            "pid": os.getpid(),
        }

    def describe(self) -> dict[str, Any]:
        v = self.active_version
        meta, created = self.catalog.read_meta(v) if v else (None, None)
        d = self._describe_version(v, meta)
        d["created"] = created
        d["versions"] = self.catalog.list_versions()
        d["read_only"] = self.read_only
        sh = self._shard
        if sh is not None and not sh.closed:
            d["count"] = sh.count()
        return d

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for h in list(self._handles):
            h.close()
        with self._mutex:
            sh, self._shard = self._shard, None
        if sh is not None:
            sh.close()

    def __del__(self) -> None:  # best effort: release the lock if the caller forgot close()
        try:
            if not self._closed and self._shard is not None:
                self.close()
        except Exception:
            pass
