"""Qdrant server / cluster backend (qdrant-client), also used with qdrant-client's local mode.

A version is a collection ``<name>__vNNNNNN``; the alias ``<name>`` points at the active one
(switched atomically with one ``update_collection_aliases`` call). Version metadata and the
rollback history live in a small ``<name>__catalog`` collection. Only engine calls live here
(:class:`QdrantBackend`, :class:`_Target`); validation, planning, the model guard and version
management are :class:`~retrieval.index.gallery.GalleryIndex`'s.

Local mode (``local:PATH`` / ``local::memory:``) runs the same code, but it is a pure-Python scan:
shards, replication, HNSW, quantization and payload indexes are accepted and ignored, and one
process owns a ``local:PATH`` directory.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
import warnings
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any, TypeVar

import grpc
import httpx
import numpy as np

from retrieval.index.api import ID_KEY, USER_ID_KEY, Hit, Record, VersionMeta
from retrieval.index.backend import iter_chunks
from retrieval.index.errors import (
    GalleryIndexError,
    IndexInUseError,
    IndexNotFoundError,
    IndexUnavailableError,
)
from retrieval.index.filters import Condition
from retrieval.index.policy import SearchPlan, tokens_dtype
from retrieval.index.validate import PayloadSpec, point_id, to_hit, to_record
from retrieval.index.versions import VERSION_RE, OwnerLock, check_name

logger = logging.getLogger(__name__)

T = TypeVar("T")
UPSERT_BATCH = 64  # points per request (32 x 256 floats each: ~1 MB of JSON/protobuf)
_CATALOG_NS = uuid.UUID("0d8a3c52-5b0e-4f57-9a37-2a4e52f6f0a1")


def _models() -> Any:
    from qdrant_client import models

    return models


# qdrant-client's local mode (qdrant_client/local/) raises plain ValueErrors whose text is the
# only thing that tells a missing or an existing collection apart: the one place the index reads
# an exception's text, and only for ValueErrors of local mode (the server's are status codes).
def _is_not_found(exc: BaseException) -> bool:
    """Local mode's ValueError for a missing collection."""
    text = str(exc).lower()
    return "not found" in text or "doesn't exist" in text or "does not exist" in text


def _already_exists(exc: BaseException) -> bool:
    return "already exists" in str(exc).lower()


def client_filter(conds: list[Condition]) -> Any:
    if not conds:
        return None
    m = _models()
    must = []
    for c in conds:
        if c.kind == "eq":
            must.append(m.FieldCondition(key=c.key, match=m.MatchValue(value=c.value)))
        elif c.kind == "any":
            must.append(m.FieldCondition(key=c.key, match=m.MatchAny(any=list(c.value))))
        else:
            must.append(m.FieldCondition(key=c.key, range=m.Range(**c.value)))
    return m.Filter(must=must)


def client_payload(spec: PayloadSpec) -> Any:
    """A parsed ``PayloadSelector`` -> qdrant-client's ``with_payload``."""
    kind, keys = spec
    if kind == "all":
        return True
    if kind == "include":
        return keys
    return _models().PayloadSelectorExclude(exclude=keys)


def _record(r: Any, with_vectors: bool) -> Record:
    return to_record(r.id, r.payload, r.vector, with_vectors)


class _Target:
    """Engine calls on one concrete collection (a VersionStore)."""

    def __init__(self, owner: QdrantBackend, version: str, meta: VersionMeta) -> None:
        self.owner = owner
        self.collection = owner.collection(version)
        self.version = version
        self.meta = meta
        self._count: int | None = None

    def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        return self.owner.call(fn, *args, **kwargs)

    def count(self, conds: list[Condition] | None = None) -> int:
        if not conds and self._count is not None:
            return self._count
        res = self.call(
            self.owner.client.count,
            self.collection,
            count_filter=client_filter(conds or []),
            exact=True,
        )
        if not conds:
            self._count = int(res.count)
        return int(res.count)

    def upsert(
        self, ids: list[str], tokens: np.ndarray, pooled: np.ndarray, payloads: list[dict[str, Any]]
    ) -> int:
        m = _models()
        self._count = None
        with self.owner.guarded():
            for s, e in iter_chunks(len(ids), UPSERT_BATCH):
                pts = []
                for i in range(s, e):
                    payload = dict(payloads[i])
                    payload[ID_KEY] = ids[i]
                    vec = {"tokens": tokens[i].tolist(), "pooled": pooled[i].tolist()}
                    pts.append(m.PointStruct(id=point_id(ids[i]), vector=vec, payload=payload))
                self.call(self.owner.client.upsert, self.collection, points=pts, wait=True)
        return len(ids)

    def delete(self, ids: list[str]) -> None:
        m = _models()
        self._count = None
        pids: list[Any] = [point_id(i) for i in ids]
        self.call(
            self.owner.client.delete,
            self.collection,
            points_selector=m.PointIdsList(points=pids),
            wait=True,
        )

    def flush(self) -> None:
        """Writes are sent with ``wait=True``: acknowledged means in the server's WAL (local mode
        persists each write to its SQLite file)."""

    def retrieve(self, ids: list[str], with_vectors: bool, payload: PayloadSpec) -> list[Record]:
        pids: list[Any] = [point_id(i) for i in ids]
        recs = self.call(
            self.owner.client.retrieve,
            self.collection,
            ids=pids,
            with_payload=client_payload(payload),
            with_vectors=["tokens"] if with_vectors else False,
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
        recs, nxt = self.call(
            self.owner.client.scroll,
            self.collection,
            scroll_filter=client_filter(conds),
            limit=limit,
            offset=offset,
            with_payload=client_payload(payload),
            with_vectors=["tokens"] if with_vectors else False,
        )
        return [_record(r, with_vectors) for r in recs], (None if nxt is None else str(nxt))

    def sample(self, n: int, payload: PayloadSpec) -> list[Record]:
        m = _models()
        resp = self.call(
            self.owner.client.query_points,
            self.collection,
            query=m.SampleQuery(sample=m.Sample.RANDOM),
            limit=n,
            with_payload=client_payload(payload),
            with_vectors=False,
        )
        return [_record(p, False) for p in resp.points]

    def query(self, queries: np.ndarray, plan: SearchPlan) -> list[list[Hit]]:
        m = _models()
        flt = client_filter(plan.conditions)
        params = m.SearchParams(
            quantization=m.QuantizationSearchParams(rescore=True, oversampling=plan.oversampling)
        )
        reqs = []
        for vec in queries:
            prefetch = None
            if plan.mode == "fast":
                prefetch = m.Prefetch(
                    query=vec.tolist(),
                    using="pooled",
                    limit=plan.limit,
                    filter=flt,
                    params=m.SearchParams(hnsw_ef=plan.hnsw_ef, exact=plan.exact_prefetch),
                )
            reqs.append(
                m.QueryRequest(
                    # a one-vector multivector query: MaxSim = max over tokens of <q, token>
                    query=[vec.tolist()],
                    using="tokens",
                    prefetch=prefetch,
                    filter=flt,
                    params=params,
                    limit=plan.top_k,
                    offset=plan.offset,
                    with_payload=client_payload(plan.payload),
                    with_vector=False,
                )
            )
        client = self.owner.client
        if len(reqs) == 1:
            r = reqs[0]
            resp = self.call(
                client.query_points,
                self.collection,
                query=r.query,
                using=r.using,
                prefetch=r.prefetch,
                query_filter=r.filter,
                search_params=r.params,
                limit=r.limit,
                offset=r.offset,
                with_payload=client_payload(plan.payload),
                with_vectors=False,
            )
            results = [resp]
        else:
            results = self.call(client.query_batch_points, self.collection, requests=reqs)
        return [[to_hit(p.payload, p.score) for p in res.points] for res in results]

    def finish(self) -> None:
        """The server's optimizers build the indexes (see QdrantBackend.finish)."""

    def close(self, finish: bool = False) -> None:
        """Nothing is held per collection."""


class QdrantBackend:
    """One index name on a Qdrant server (``qdrant:URL``) or in qdrant-client's local mode."""

    exclusive = False

    def __init__(
        self,
        location: str,
        name: str,
        *,
        uri: str,
        local: bool,
        api_key: str | None,
        shard_number: int,
        replication_factor: int,
        timeout: float,
        options: Mapping[str, Any],
    ) -> None:
        from qdrant_client import QdrantClient

        self.name = check_name(name)
        self.uri = uri
        self.kind = "local" if local else "qdrant"
        self.where = f"at {uri}"
        self.shard_number = int(shard_number)
        self.replication_factor = int(replication_factor)
        self._options = options
        self._mutex = threading.RLock()
        # local mode is plain Python objects: serialise calls; a server client is thread-safe
        self._local_lock: threading.RLock | None = threading.RLock() if local else None
        self._lock: OwnerLock | None = None
        self._closed = False
        if local:
            # expected in local mode (documented): it ignores search params and payload indexes
            warnings.filterwarnings("ignore", message="Local mode performs exact")
            warnings.filterwarnings("ignore", message="Payload indexes have no effect")
            if location != ":memory:":
                Path(location).mkdir(parents=True, exist_ok=True)
                self._lock = OwnerLock(
                    Path(location) / ".cir_owner.lock", f"local index directory {location}"
                )
                self._lock.acquire()
            try:
                self.client = (
                    QdrantClient(location=":memory:")
                    if location == ":memory:"
                    else (QdrantClient(path=location))
                )
            except RuntimeError as exc:  # qdrant-client's own portalocker lock
                self._release_lock()
                raise IndexInUseError(f"local index {location} is in use: {exc}") from exc
        else:
            self.client = QdrantClient(url=location, api_key=api_key, timeout=int(timeout))

    # plumbing --------------------------------------------------------------------------------
    def guarded(self) -> AbstractContextManager[Any]:
        return self._local_lock if self._local_lock is not None else nullcontext()

    def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """One client call, its failures as the index's typed errors."""
        from qdrant_client.http.exceptions import ResponseHandlingException, UnexpectedResponse

        try:
            with self.guarded():
                return fn(*args, **kwargs)
        except UnexpectedResponse as exc:
            if exc.status_code == 404:
                raise IndexNotFoundError(f"{self.uri}: {exc}") from exc
            if exc.status_code in (502, 503, 504):
                raise IndexUnavailableError(f"Qdrant at {self.uri} unavailable: {exc}") from exc
            raise GalleryIndexError(f"Qdrant at {self.uri}: {exc}") from exc
        except ResponseHandlingException as exc:  # connection refused, timeouts
            raise IndexUnavailableError(f"Qdrant at {self.uri} unreachable: {exc}") from exc
        except ValueError as exc:  # local mode: missing collection etc.
            if _is_not_found(exc):
                raise IndexNotFoundError(f"{self.uri}: {exc}") from exc
            raise
        except (grpc.RpcError, httpx.TransportError) as exc:  # gRPC / REST transport
            raise IndexUnavailableError(f"Qdrant at {self.uri} unreachable: {exc}") from exc

    def collection(self, version: str) -> str:
        return f"{self.name}__{version}"

    @property
    def _catalog(self) -> str:
        return f"{self.name}__catalog"

    def _catalog_pid(self, key: str) -> Any:
        return str(uuid.uuid5(_CATALOG_NS, f"{self.name}/{key}"))

    def _ensure_catalog(self) -> None:
        m = _models()
        if not self.call(self.client.collection_exists, self._catalog):
            try:
                self.call(
                    self.client.create_collection,
                    self._catalog,
                    vectors_config=m.VectorParams(size=1, distance=m.Distance.DOT),
                    replication_factor=self.replication_factor,
                )
            except (GalleryIndexError, ValueError) as exc:
                if not _already_exists(exc):
                    raise  # else another process created it just now: fine

    def _catalog_records(self) -> list[dict[str, Any]]:
        if not self.call(self.client.collection_exists, self._catalog):
            return []
        recs, _ = self.call(
            self.client.scroll, self._catalog, limit=100_000, with_payload=True, with_vectors=False
        )
        return [dict(r.payload or {}) for r in recs]

    def _put_catalog(self, key: str, payload: dict[str, Any]) -> None:
        m = _models()
        self._ensure_catalog()
        point = m.PointStruct(id=self._catalog_pid(key), vector=[1.0], payload=payload)
        self.call(self.client.upsert, self._catalog, points=[point], wait=True)

    def _set_catalog(self, key: str, payload: dict[str, Any]) -> None:
        """Merge ``payload`` into the catalog point ``key`` (set_payload: other keys kept)."""
        pid = self._catalog_pid(key)
        self.call(self.client.set_payload, self._catalog, payload=payload, points=[pid], wait=True)

    def _del_catalog(self, key: str) -> None:
        m = _models()
        selector = m.PointIdsList(points=[self._catalog_pid(key)])
        self.call(self.client.delete, self._catalog, points_selector=selector)

    # pointer / alias -------------------------------------------------------------------------
    def active(self) -> str | None:
        """The active version, read from the alias (atomic on a server)."""
        resp = self.call(self.client.get_aliases)
        prefix = f"{self.name}__"
        for a in resp.aliases:
            if a.alias_name == self.name and a.collection_name.startswith(prefix):
                return str(a.collection_name[len(prefix) :])
        return None

    def history(self) -> list[str]:
        for r in self._catalog_records():
            if r.get("kind") == "pointer":
                return list(r.get("history", []))
        return []

    def point(self, version: str, history: list[str]) -> None:
        m = _models()
        ops: list[Any] = []
        if self.active() is not None:
            ops.append(m.DeleteAliasOperation(delete_alias=m.DeleteAlias(alias_name=self.name)))
        ops.append(
            m.CreateAliasOperation(
                create_alias=m.CreateAlias(
                    collection_name=self.collection(version), alias_name=self.name
                )
            )
        )
        # one request: the server applies delete+create atomically
        self.call(self.client.update_collection_aliases, change_aliases_operations=ops)
        self.set_history(history, active=version)

    def set_history(self, history: list[str], active: str | None = None) -> None:
        pointer = {"kind": "pointer", "active": active or self.active(), "history": history}
        self._put_catalog("_pointer", pointer)

    def mark_activated(self, version: str) -> None:
        recs = self.records()
        if version in recs and recs[version][2] is None:
            self._set_catalog(version, {"activated_at": time.time()})

    def mutex(self) -> AbstractContextManager[Any]:
        """This process's writers (Qdrant has no compare-and-set: concurrent meta updates of
        the SAME version from two processes can lose one; the indexer updates a version from
        one process at a time)."""
        return self._mutex

    # versions --------------------------------------------------------------------------------
    def records(self) -> dict[str, tuple[VersionMeta, float, float | None]]:
        out = {}
        for r in self._catalog_records():
            if r.get("kind") == "version":
                act = r.get("activated_at")
                out[r["version"]] = (
                    VersionMeta.from_json(r["meta"]),
                    float(r.get("created", 0)),
                    float(act) if act is not None else None,
                )
        return out

    def list_versions(self) -> list[str]:
        return sorted(self.records())

    def read_meta(self, version: str) -> tuple[VersionMeta, float]:
        if not VERSION_RE.match(version):
            raise IndexNotFoundError(f"bad version id {version!r} (expected like 'v000001')")
        recs = self.records()
        if version not in recs:
            raise IndexNotFoundError(f"version {version} of index {self.name!r} does not exist")
        meta, created, _ = recs[version]
        return meta, created

    def write_meta(self, version: str, meta: VersionMeta) -> None:
        self._set_catalog(version, {"meta": meta.to_json()})

    def create(self, meta: VersionMeta) -> str:
        """Create a version atomically between processes.

        The version number is CLAIMED by creating its collection: ``create_collection`` of a
        name that exists fails on the server (and in local mode), so of two processes that
        picked the same number only one succeeds and the other moves on to the next number.
        The catalog entry is written last, after the payload indexes: a version is listed only
        once it is complete (like Edge's ``meta.json``). A creator killed in between leaves a
        collection without a catalog entry: never listed, its number is skipped by later
        creators, and it can be deleted by hand (``<name>__vNNNNNN`` absent from versions()).
        """
        with self._mutex:
            self._ensure_catalog()
            n = max((int(v[1:]) for v in self.records()), default=0) + 1
            for _ in range(1000):
                version = f"v{n:06d}"
                coll = self.collection(version)
                if not self.call(self.client.collection_exists, coll) and self._claim(coll, meta):
                    break
                n += 1
            else:  # pragma: no cover - a thousand concurrent creators
                raise GalleryIndexError(f"index {self.name!r}: could not claim a version number")
            self._create_payload_indexes(coll, meta)
            entry = {"kind": "version", "version": version, "meta": meta.to_json()}
            self._put_catalog(version, {**entry, "created": time.time()})
        return version

    def _claim(self, coll: str, meta: VersionMeta) -> bool:
        """Create the version's collection; False when another process created it first."""
        try:
            self._create_collection(coll, meta.shape[1])
        except (GalleryIndexError, ValueError) as exc:
            if _already_exists(exc):
                logger.info("index %r: %s taken by another process, next number", self.name, coll)
                return False
            raise
        return True

    def _create_collection(self, coll: str, dim: int) -> None:
        m, opts = _models(), self._options
        self.call(
            self.client.create_collection,
            coll,
            vectors_config={
                "tokens": m.VectorParams(
                    size=dim,
                    distance=m.Distance.DOT,
                    multivector_config=m.MultiVectorConfig(
                        comparator=m.MultiVectorComparator.MAX_SIM
                    ),
                    on_disk=True,  # originals on disk, int8 copy in RAM
                    datatype=(
                        m.Datatype.FLOAT16
                        if tokens_dtype(opts) == "float16"
                        else m.Datatype.FLOAT32
                    ),
                    hnsw_config=m.HnswConfigDiff(m=0),  # no graph on the multivector
                    quantization_config=m.ScalarQuantization(
                        scalar=m.ScalarQuantizationConfig(
                            type=m.ScalarType.INT8,
                            quantile=float(opts.get("quantile", 0.99)),
                            always_ram=True,
                        )
                    ),
                ),
                "pooled": m.VectorParams(
                    size=dim,
                    distance=m.Distance.DOT,
                    hnsw_config=m.HnswConfigDiff(
                        m=int(opts.get("hnsw_m", 16)),
                        ef_construct=int(opts.get("hnsw_ef_construct", 100)),
                    ),
                ),
            },
            shard_number=self.shard_number,
            replication_factor=self.replication_factor,
            on_disk_payload=True,
        )

    def _create_payload_indexes(self, coll: str, meta: VersionMeta) -> None:
        m = _models()
        schema = {
            "keyword": m.PayloadSchemaType.KEYWORD,
            "integer": m.PayloadSchemaType.INTEGER,
            "float": m.PayloadSchemaType.FLOAT,
            "bool": m.PayloadSchemaType.BOOL,
        }
        indexes = {USER_ID_KEY: "keyword", **meta.fields}  # user_id: the user-id lookup
        for fname, ftype in indexes.items():
            self.call(
                self.client.create_payload_index, coll, fname, field_schema=schema[ftype], wait=True
            )

    def exists(self, version: str) -> bool:
        return bool(self.call(self.client.collection_exists, self.collection(version)))

    def open(self, version: str, meta: VersionMeta) -> _Target:
        return _Target(self, version, meta)

    def finish(self, version: str, store: Any) -> None:
        """The server-side finish of a version: its optimizers have built the indexes of what
        was written (status green), also when the writer of the last points was killed. A
        version still optimizing after ``activate_timeout_s`` (option, default 600) is not
        activated. Local mode has no optimizer (always green)."""
        m = _models()
        coll = self.collection(version)
        limit = float(self._options.get("activate_timeout_s", 600.0))
        deadline = time.monotonic() + limit
        nudged = False
        while True:
            status = self.call(self.client.get_collection, coll).status
            if status == m.CollectionStatus.GREEN:
                return
            if status == m.CollectionStatus.RED:
                raise GalleryIndexError(
                    f"refusing to activate {coll}: the collection failed to optimize (status red)"
                )
            if status == m.CollectionStatus.GREY and not nudged:
                # optimizations pending but not started (e.g. after a server restart)
                self.call(
                    self.client.update_collection, coll, optimizers_config=m.OptimizersConfigDiff()
                )
                nudged = True
            if time.monotonic() > deadline:
                raise GalleryIndexError(
                    f"refusing to activate {coll}: its indexes are still being built after "
                    f"{limit:.0f}s (status {status}); activate it once the server finished"
                )
            time.sleep(0.2)

    def in_use(self, version: str, history: list[str]) -> bool:
        # the previous version: servers may still be reading it until their next refresh()
        return bool(history) and version == history[0]

    def drop(self, version: str) -> None:
        self.call(self.client.delete_collection, self.collection(version))
        self._del_catalog(version)

    def count_version(self, version: str) -> int | None:
        try:
            res = self.call(self.client.count, self.collection(version), exact=True)
        except GalleryIndexError:
            return None
        return int(res.count)

    def describe(self, version: str | None) -> dict[str, Any]:
        return {
            "collection": self.collection(version) if version else None,
            "shard_number": self.shard_number,
            "replication_factor": self.replication_factor,
        }

    def _release_lock(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            client = getattr(self, "client", None)
            if client is not None:
                with self.guarded():
                    client.close()
        finally:
            self._release_lock()
