"""Qdrant Edge backend: the Qdrant engine in-process, one shard directory per version.

Per point: ``tokens`` (multivector, MaxSim, int8 scalar quantization kept in RAM, originals on
disk, no HNSW graph: m=0) and ``pooled`` (HNSW m=16) plus the payload. ``exact`` scans the int8
tokens and rescores with the originals; ``fast`` prefetches L candidates by ``pooled`` and
reranks them by MaxSim on ``tokens``, in one engine call.

Only engine calls live here (:class:`EdgeBackend`, :class:`_Shard`); validation, planning and
version management are :class:`~retrieval.index.gallery.GalleryIndex`'s. Versions, the pointer
and the owner locks are files (:mod:`retrieval.index.versions`); a shard has one opener at a
time (its ``owner.lock`` holds the pid).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import numpy as np

from retrieval.index.api import ID_KEY, USER_ID_KEY, Hit, Record, VersionMeta
from retrieval.index.backend import iter_chunks
from retrieval.index.errors import GalleryIndexError, IndexInUseError
from retrieval.index.filters import Condition
from retrieval.index.policy import SearchPlan, tokens_dtype
from retrieval.index.validate import PayloadSpec, point_id, to_hit, to_record
from retrieval.index.versions import Catalog, Pointer, is_locked, write_json_atomic

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
        datatype=(
            q.VectorStorageDatatype.Float16
            if tokens_dtype(options) == "float16"
            else q.VectorStorageDatatype.Float32
        ),
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


def edge_filter(conds: list[Condition]) -> Any:
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


def edge_payload(spec: PayloadSpec) -> Any:
    """A parsed ``PayloadSelector`` -> what Edge's ``with_payload`` takes."""
    kind, keys = spec
    if kind == "all":
        return True
    if kind == "include":
        return keys
    return _edge().PayloadSelector.Exclude(keys)


class _Shard:
    """An opened (and locked) Edge shard of one version: the engine calls of a VersionStore."""

    def __init__(
        self, catalog: Catalog, version: str, meta: VersionMeta, options: Mapping[str, Any]
    ) -> None:
        self.catalog = catalog
        self.version = version
        self.meta = meta
        self.path = catalog.version_dir(version) / "shard"
        self.finished_path = catalog.version_dir(version) / FINISHED_FILE
        self.lock = catalog.lock(version)
        self.lock.acquire()  # IndexInUseError when another opener has it
        try:
            q = _edge()
            if (self.path / "edge_config.json").exists():
                self.shard = q.EdgeShard.load(str(self.path))
            else:
                self.shard = q.EdgeShard.create(str(self.path), shard_config(meta, options))
                self._create_indexes(q)
        except BaseException as exc:
            self.lock.release()
            if "WouldBlock" in str(exc):  # the engine's own WAL lock (should be caught above)
                raise IndexInUseError(f"{self.lock.what} is in use by another opener") from exc
            raise
        self._count: int | None = None
        self.closed = False
        self.dirty = False
        self.write_lock = threading.Lock()

    def _create_indexes(self, q: Any) -> None:
        if self.meta.fields.get(USER_ID_KEY) != "keyword":  # the user-id lookup
            self.shard.update(
                q.UpdateOperation.create_field_index(USER_ID_KEY, q.PayloadSchemaType.Keyword)
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

    def close(self, finish: bool = False) -> None:
        """Flush and release; ``finish``: also optimize a shard not finished yet (a writer's
        close, also when this process wrote nothing: a resumed build after a kill)."""
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
    def count(self, conds: list[Condition] | None = None) -> int:
        q = _edge()
        if not conds:
            if self._count is None:
                self._count = int(self.shard.count(q.CountRequest(exact=True)))
            return self._count
        return int(self.shard.count(q.CountRequest(exact=True, filter=edge_filter(conds))))

    def upsert(
        self, ids: list[str], tokens: np.ndarray, pooled: np.ndarray, payloads: list[dict[str, Any]]
    ) -> int:
        q = _edge()
        bools = [f for f, t in self.meta.fields.items() if t == "bool"]
        with self.write_lock:
            self._count = None
            self._written()
            for s, e in iter_chunks(len(ids), UPSERT_BATCH):
                pts = []
                for i in range(s, e):
                    payload = dict(payloads[i])
                    payload[ID_KEY] = ids[i]
                    for f in bools:
                        if isinstance(payload.get(f), bool):
                            payload[bool_key(f)] = int(payload[f])
                    vec = {"tokens": tokens[i], "pooled": pooled[i]}
                    pts.append(q.Point(point_id(ids[i]), vec, payload))
                self.shard.update(q.UpdateOperation.upsert_points(pts))
        return len(ids)

    def delete(self, ids: list[str]) -> None:
        q = _edge()
        with self.write_lock:
            self._count = None
            self._written()
            pids = [point_id(i) for i in ids]
            for s, e in iter_chunks(len(pids), 1000):
                self.shard.update(q.UpdateOperation.delete_points(pids[s:e]))

    def flush(self) -> None:
        with self.write_lock:
            self.shard.flush()

    def retrieve(self, ids: list[str], with_vectors: bool, payload: PayloadSpec) -> list[Record]:
        pids = [point_id(i) for i in ids]
        recs = self.shard.retrieve(
            pids,
            with_payload=edge_payload(payload),
            with_vector=["tokens"] if with_vectors else False,
        )
        by_pid = {str(r.id): r for r in recs}
        return [_record(by_pid[pid], with_vectors) for pid in pids if pid in by_pid]

    def scroll(
        self,
        limit: int,
        offset: str | None,
        payload: PayloadSpec,
        with_vectors: bool,
        conds: list[Condition],
    ) -> tuple[list[Record], str | None]:
        q = _edge()
        recs, nxt = self.shard.scroll(
            q.ScrollRequest(
                offset=offset,
                limit=limit,
                filter=edge_filter(conds),
                with_payload=edge_payload(payload),
                with_vector=["tokens"] if with_vectors else False,
            )
        )
        return [_record(r, with_vectors) for r in recs], (None if nxt is None else str(nxt))

    def sample(self, n: int, payload: PayloadSpec) -> list[Record]:
        q = _edge()
        res = self.shard.query(
            q.QueryRequest(limit=n, query=q.Sample.Random, with_payload=edge_payload(payload))
        )
        return [_record(p, False) for p in res]

    def query(self, queries: np.ndarray, plan: SearchPlan) -> list[list[Hit]]:
        q = _edge()
        flt = edge_filter(plan.conditions)
        # exact prefetch: scan every `pooled` vector instead of walking the HNSW graph
        pre_params = q.SearchParams(hnsw_ef=plan.hnsw_ef, exact=plan.exact_prefetch)
        params = q.SearchParams(
            quantization=q.QuantizationSearchParams(rescore=True, oversampling=plan.oversampling)
        )
        reqs = []
        for vec in queries:
            kw: dict[str, Any] = {}
            if plan.mode == "fast":
                kw["prefetches"] = [
                    q.Prefetch(
                        limit=plan.limit,
                        query=q.Query.Nearest(vec, using="pooled"),
                        filter=flt,
                        params=pre_params,
                    )
                ]
            reqs.append(
                q.QueryRequest(
                    limit=plan.top_k,
                    offset=plan.offset,
                    query=q.Query.Nearest(vec, using="tokens"),
                    filter=flt,
                    params=params,
                    with_payload=edge_payload(plan.payload),
                    with_vector=False,
                    **kw,
                )
            )
        if len(reqs) == 1:
            results = [self.shard.query(reqs[0])]
        else:
            results = self.shard.query_batch(q.QueryBatchRequest(reqs))
        return [[to_hit(p.payload, p.score) for p in res] for res in results]


def _record(r: Any, with_vectors: bool) -> Record:
    return to_record(r.id, r.payload, getattr(r, "vector", None), with_vectors)


class EdgeBackend:
    """One index name under a folder (:class:`~retrieval.index.versions.Catalog`)."""

    kind = "edge"
    exclusive = True

    def __init__(self, location: str, name: str, options: Mapping[str, Any]) -> None:
        self.catalog = Catalog(Path(location), name)
        self.where = f"under {self.catalog.dir}"
        self._options = options

    # pointer -----------------------------------------------------------------------------------
    def active(self) -> str | None:
        return self.catalog.read_pointer().active

    def history(self) -> list[str]:
        return self.catalog.read_pointer().history

    def point(self, version: str, history: list[str]) -> None:
        self.catalog.write_pointer(Pointer(version, history))  # os.replace: atomic

    def set_history(self, history: list[str]) -> None:
        self.catalog.write_pointer(Pointer(self.active(), history))

    def mark_activated(self, version: str) -> None:
        self.catalog.mark_activated(version)

    def mutex(self) -> AbstractContextManager[Any]:
        return self.catalog.mutex()

    # versions ----------------------------------------------------------------------------------
    def list_versions(self) -> list[str]:
        return self.catalog.list_versions()

    def read_meta(self, version: str) -> tuple[VersionMeta, float]:
        return self.catalog.read_meta(version)

    def records(self) -> dict[str, tuple[VersionMeta, float, float | None]]:
        out = {}
        for v in self.catalog.list_versions():
            try:
                meta, created = self.catalog.read_meta(v)
                out[v] = (meta, created, self.catalog.read_activated(v))
            except GalleryIndexError:  # dropped meanwhile
                continue
        return out

    def write_meta(self, version: str, meta: VersionMeta) -> None:
        self.catalog.write_meta(version, meta)

    def create(self, meta: VersionMeta) -> str:
        return self.catalog.new_version(meta)  # the shard is created by its first opener

    def exists(self, version: str) -> bool:
        return True  # read_meta found meta.json; a missing shard is created on open

    def open(self, version: str, meta: VersionMeta) -> _Shard:
        return _Shard(self.catalog, version, meta, self._options)

    def finish(self, version: str, store: Any) -> None:
        """Never activate a version whose indexes were not built: finish it here when its last
        writer did not (killed before its close), or refuse."""
        if (self.catalog.version_dir(version) / FINISHED_FILE).exists():
            return
        if isinstance(store, _Shard) and not store.closed:
            with store.write_lock:
                store.finish()
            return
        meta, _ = self.catalog.read_meta(version)
        try:
            shard = self.open(version, meta)
        except IndexInUseError as exc:
            raise GalleryIndexError(
                f"refusing to activate {version}: its indexes were never built (its build "
                f"stopped before finishing) and another process holds it: {exc}. Let that "
                "build finish (or resume it), then activate."
            ) from exc
        logger.warning(
            "index %r: %s was not finished by its build; building its indexes before activating",
            self.catalog.name,
            version,
        )
        shard.close(finish=True)

    def in_use(self, version: str, history: list[str]) -> bool:
        return is_locked(self.catalog.version_dir(version) / "owner.lock")

    def drop(self, version: str) -> None:
        lock = self.catalog.lock(version)
        lock.acquire()  # IndexInUseError while a process still serves/builds it
        try:
            self.catalog.remove(version)
        finally:
            lock.release()

    def count_version(self, version: str) -> int | None:
        return None  # its shard may be owned by another process

    def describe(self, version: str | None) -> dict[str, Any]:
        return {"path": str(self.catalog.dir)}

    def close(self) -> None:
        pass
