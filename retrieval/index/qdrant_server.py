"""Qdrant server / cluster backend (qdrant-client), also used with qdrant-client's local mode.

A version is a collection ``<name>__vNNNNNN``; the alias ``<name>`` points at the active one
(switched atomically with one ``update_collection_aliases`` call). Version metadata and the
rollback history live in a small ``<name>__catalog`` collection. This object serves a concrete
collection, checked by the model guard, and moves to a newly aliased one on ``refresh()``.

Local mode (``local:PATH`` / ``local::memory:``) runs the same code, but it is a pure-Python scan:
shards, replication, HNSW, quantization and payload indexes are accepted and ignored, and one
process owns a ``local:PATH`` directory.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
import warnings
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

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
    IndexUnavailableError,
    ModelMismatchError,
)
from retrieval.index.versions import VERSION_RE, OwnerLock, check_name

logger = logging.getLogger(__name__)

T = TypeVar("T")
UPSERT_BATCH = 64  # points per request (32 x 256 floats each: ~1 MB of JSON/protobuf)
_CATALOG_NS = uuid.UUID("0d8a3c52-5b0e-4f57-9a37-2a4e52f6f0a1")


def _models() -> Any:
    from qdrant_client import models

    return models


def _is_not_found(exc: BaseException) -> bool:
    text = str(exc).lower()
    return "not found" in text or "doesn't exist" in text or "does not exist" in text


def client_filter(conds: list[common.Condition]) -> Any:
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


def client_payload(spec: Any) -> Any:
    """``PayloadSelector`` -> qdrant-client's ``with_payload``."""
    kind, keys = common.payload_spec(spec)
    if kind == "all":
        return True
    if kind == "include":
        return keys
    return _models().PayloadSelectorExclude(exclude=keys)


def _record(r: Any, with_vectors: bool) -> Record:
    cid, payload = common.strip_payload(r.payload)
    toks = None
    if with_vectors and isinstance(r.vector, dict):
        toks = np.asarray(r.vector["tokens"], dtype=np.float32)
    return Record(cid or str(r.id), payload, toks)


def _already_exists(exc: BaseException) -> bool:
    return "already exists" in str(exc).lower()


class _Target:
    """Data operations against one concrete collection."""

    def __init__(self, owner: QdrantGalleryIndex, collection: str, version: str, meta: VersionMeta):
        self.owner = owner
        self.collection = collection
        self.version = version
        self.meta = meta
        self._count: int | None = None

    def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        return self.owner._call(fn, *args, **kwargs)

    def count(self, conds: list[common.Condition] | None = None) -> int:
        c = self.owner.client
        if not conds and self._count is not None:
            return self._count
        res = self.call(
            c.count, self.collection, count_filter=client_filter(conds or []), exact=True
        )
        if not conds:
            self._count = int(res.count)
        return int(res.count)

    def upsert(self, ids: list[str], tokens: np.ndarray, payloads: list[dict[str, Any]]) -> int:
        m = _models()
        pooled = common.pooled_of(tokens)
        self._count = None
        for s in range(0, len(ids), UPSERT_BATCH):
            pts = []
            for i in range(s, min(len(ids), s + UPSERT_BATCH)):
                payload = dict(payloads[i])
                payload[ID_KEY] = ids[i]
                vec = {"tokens": tokens[i].tolist(), "pooled": pooled[i].tolist()}
                pts.append(m.PointStruct(id=common.point_id(ids[i]), vector=vec, payload=payload))
            self.call(self.owner.client.upsert, self.collection, points=pts, wait=True)
        return len(ids)

    def delete(self, ids: list[str]) -> None:
        m = _models()
        self._count = None
        pids: list[Any] = [common.point_id(i) for i in ids]
        self.call(
            self.owner.client.delete,
            self.collection,
            points_selector=m.PointIdsList(points=pids),
            wait=True,
        )

    def get(self, ids: list[str], with_vectors: bool, with_payload: Any = True) -> list[Record]:
        pids: list[Any] = [common.point_id(i) for i in ids]
        recs = self.call(
            self.owner.client.retrieve,
            self.collection,
            ids=pids,
            with_payload=client_payload(with_payload),
            with_vectors=["tokens"] if with_vectors else False,
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
        recs, nxt = self.call(
            self.owner.client.scroll,
            self.collection,
            scroll_filter=client_filter(conds),
            limit=limit,
            offset=offset,
            with_payload=client_payload(with_payload),
            with_vectors=["tokens"] if with_vectors else False,
        )
        return [_record(r, with_vectors) for r in recs], (None if nxt is None else str(nxt))

    def sample(self, n: int, with_payload: Any) -> list[Record]:
        m = _models()
        resp = self.call(
            self.owner.client.query_points,
            self.collection,
            query=m.SampleQuery(sample=m.Sample.RANDOM),
            limit=n,
            with_payload=client_payload(with_payload),
            with_vectors=False,
        )
        return [_record(p, False) for p in resp.points]

    def search(
        self, queries: np.ndarray, top_k: int, offset: int, conds: list[common.Condition], mode: str
    ) -> list[list[Hit]]:
        m = _models()
        opts = self.owner._options
        n = self.count()
        flt = client_filter(conds)
        cal = self.meta.extra.get(common.CALIBRATION_KEY)
        asked = mode
        # fast runs exactly on a version with no L meeting the target (see resolve_mode)
        mode, why = common.resolve_mode(mode, top_k, offset, n, opts, cal)
        if why and asked == "fast" and common.uncalibrated_reason(opts, cal):
            common.note_exact_fallback(f"collection {self.collection!r}", why)
        limit_l, ef, exact_pre = common.fast_plan(top_k, offset, opts, n, cal)
        params = m.SearchParams(
            quantization=m.QuantizationSearchParams(
                rescore=True, oversampling=common.oversampling_for(top_k, offset, opts)
            )
        )
        reqs = []
        for vec in queries:
            prefetch = None
            if mode == "fast":
                prefetch = m.Prefetch(
                    query=vec.tolist(),
                    using="pooled",
                    limit=limit_l,
                    filter=flt,
                    params=m.SearchParams(hnsw_ef=ef, exact=exact_pre),
                )
            reqs.append(
                m.QueryRequest(
                    # a one-vector multivector query: MaxSim = max over tokens of <q, token>
                    query=[vec.tolist()],
                    using="tokens",
                    prefetch=prefetch,
                    filter=flt,
                    params=params,
                    limit=top_k,
                    offset=offset,
                    with_payload=client_payload(SEARCH_PAYLOAD),
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
                with_payload=client_payload(SEARCH_PAYLOAD),
                with_vectors=False,
            )
            results = [resp]
        else:
            results = self.call(client.query_batch_points, self.collection, requests=reqs)
        out = []
        for res in results:
            hits = []
            for p in res.points:
                cid, payload = common.strip_payload(p.payload)
                hits.append(Hit(cid, float(p.score), payload))
            out.append(hits)
        return out


class _ClientOps:
    """Data operations shared by the index (active version) and version handles."""

    read_only: bool

    def _target(self, write: bool = False, tokens: Any = None) -> _Target:
        raise NotImplementedError

    def _guarded(self) -> AbstractContextManager[Any]:
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
        t = self._target(write=True, tokens=tokens)
        toks = common.normalise_tokens(tokens, len(ids_l), t.meta.shape)
        with self._guarded():
            return t.upsert(ids_l, toks, pls)

    def delete(self, ids: Sequence[str]) -> None:
        ids_l = common.check_ids(ids)
        if ids_l:
            t = self._target(write=True)
            with self._guarded():
                t.delete(ids_l)

    def flush(self) -> None:
        """Writes are sent with ``wait=True``: acknowledged means in the server's WAL (local mode
        persists each write to its SQLite file)."""
        self._target(write=True)

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
        t = self._target()
        qs = common.normalise_queries(query, t.meta.shape[1], batch)
        conds = common.parse_filter(flt, t.meta.fields)
        if len(qs) == 0:
            return []
        with self._guarded():
            return t.search(qs, top_k, offset, conds, mode)

    def count(self, filter: Filter | None = None) -> int:
        t = self._target()
        conds = common.parse_filter(filter, t.meta.fields)
        with self._guarded():
            return t.count(conds)

    def get(
        self, ids: Sequence[str], with_vectors: bool = False, with_payload: PayloadSelector = True
    ) -> list[Record]:
        ids_l = common.check_ids(ids)
        common.payload_spec(with_payload)
        t = self._target()
        if not ids_l:
            return []
        with self._guarded():
            return t.get(ids_l, with_vectors, with_payload)

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
        t = self._target()
        conds = common.parse_filter(filter, t.meta.fields)
        with self._guarded():
            return t.scroll(limit, offset, with_payload, with_vectors, conds)

    def _engine_sample(self, n: int, with_payload: PayloadSelector) -> list[Record]:
        common.payload_spec(with_payload)
        t = self._target()
        with self._guarded():
            return t.sample(n, with_payload)

    def find_by_user_id(
        self, user_id: str, limit: int = 2, with_payload: PayloadSelector = True
    ) -> list[Record]:
        cond = common.user_id_condition(user_id)
        common.check_count(limit, "limit")
        common.payload_spec(with_payload)
        t = self._target()
        with self._guarded():
            return t.scroll(limit, None, with_payload, False, [cond])[0]


class QdrantVersionHandle(_ClientOps, VersionHandle):
    def __init__(self, index: QdrantGalleryIndex, target: _Target, read_only: bool = False):
        self._index = index
        self._t: _Target | None = target
        self.read_only = read_only
        self.version = target.version
        self.meta = target.meta

    def _target(self, write: bool = False, tokens: Any = None) -> _Target:
        if self._t is None or self._index._closed:
            raise GalleryIndexError(f"version handle {self.version} is closed")
        if write and self.read_only:
            raise GalleryIndexError(f"version handle {self.version} was opened read-only")
        return self._t

    def _guarded(self) -> AbstractContextManager[Any]:
        return self._index._guarded()

    def declared_fields(self) -> dict[str, FieldType]:
        return dict(self.meta.fields)

    def describe(self) -> dict[str, Any]:
        d = self._index._describe_version(self.version, self.meta)
        if self._t is not None:
            d["count"] = self.count()
        return d

    def close(self) -> None:
        self._t = None


class QdrantGalleryIndex(_ClientOps, GalleryIndex):
    def __init__(
        self,
        location: str,
        *,
        local: bool,
        api_key: str | None,
        shard_number: int,
        replication_factor: int,
        timeout: float,
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
        from qdrant_client import QdrantClient

        self.uri = uri
        self.name = check_name(name)
        self.backend = "local" if local else "qdrant"
        self.read_only = read_only
        self._location = location
        self._fingerprint = encoder_fingerprint
        self._preset = preset
        self._fields = common.validate_fields(fields)
        self._force = force
        self._keep = max(0, int(keep_versions))
        self._options = options
        self._shard_number = int(shard_number)
        self._replication_factor = int(replication_factor)
        self._mutex = threading.RLock()
        # local mode is plain Python objects: serialise calls; a server client is thread-safe
        self._local_lock: threading.RLock | None = threading.RLock() if local else None
        self._lock: OwnerLock | None = None
        self._closed = False
        self._t: _Target | None = None
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
        try:
            active = self._alias_target()
            if active is None:
                if read_only:
                    raise IndexNotFoundError(
                        f"index {name!r} has no active version at {uri} (build it first)"
                    )
            else:
                self._t = self._open_target(active)
        except BaseException:
            self.close()
            raise

    # plumbing --------------------------------------------------------------------------------
    def _guarded(self) -> AbstractContextManager[Any]:
        return self._local_lock if self._local_lock is not None else nullcontext()

    def _call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        from qdrant_client.http.exceptions import ResponseHandlingException, UnexpectedResponse

        try:
            with self._guarded():
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
        except Exception as exc:
            name = type(exc).__name__
            if name in ("RpcError", "_InactiveRpcError", "ConnectError", "ConnectTimeout"):
                raise IndexUnavailableError(f"Qdrant at {self.uri} unreachable: {exc}") from exc
            raise

    def _collection(self, version: str) -> str:
        return f"{self.name}__{version}"

    @property
    def _catalog(self) -> str:
        return f"{self.name}__catalog"

    def _ensure_catalog(self) -> None:
        m = _models()
        if not self._call(self.client.collection_exists, self._catalog):
            try:
                self._call(
                    self.client.create_collection,
                    self._catalog,
                    vectors_config=m.VectorParams(size=1, distance=m.Distance.DOT),
                    replication_factor=self._replication_factor,
                )
            except (GalleryIndexError, ValueError) as exc:
                if not _already_exists(exc):
                    raise  # else another process created it just now: fine

    def _catalog_records(self) -> list[dict[str, Any]]:
        if not self._call(self.client.collection_exists, self._catalog):
            return []
        recs, _ = self._call(
            self.client.scroll, self._catalog, limit=100_000, with_payload=True, with_vectors=False
        )
        return [dict(r.payload or {}) for r in recs]

    def _put_catalog(self, key: str, payload: dict[str, Any]) -> None:
        m = _models()
        self._ensure_catalog()
        pid = str(uuid.uuid5(_CATALOG_NS, f"{self.name}/{key}"))
        self._call(
            self.client.upsert,
            self._catalog,
            points=[m.PointStruct(id=pid, vector=[1.0], payload=payload)],
            wait=True,
        )

    def _del_catalog(self, key: str) -> None:
        m = _models()
        pid: Any = str(uuid.uuid5(_CATALOG_NS, f"{self.name}/{key}"))
        self._call(self.client.delete, self._catalog, points_selector=m.PointIdsList(points=[pid]))

    def _history(self) -> list[str]:
        for r in self._catalog_records():
            if r.get("kind") == "pointer":
                return list(r.get("history", []))
        return []

    def _metas(self) -> dict[str, tuple[VersionMeta, float]]:
        return {v: (meta, created) for v, (meta, created, _) in self._version_records().items()}

    def _version_records(self) -> dict[str, tuple[VersionMeta, float, float | None]]:
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

    def _set_catalog(self, key: str, payload: dict[str, Any]) -> None:
        """Merge ``payload`` into the catalog point ``key`` (set_payload: other keys kept)."""
        pid: Any = str(uuid.uuid5(_CATALOG_NS, f"{self.name}/{key}"))
        self._call(self.client.set_payload, self._catalog, payload=payload, points=[pid], wait=True)

    def _mark_activated(self, version: str) -> None:
        recs = self._version_records()
        if version in recs and recs[version][2] is None:
            self._set_catalog(version, {"activated_at": time.time()})

    def _read_meta(self, version: str) -> VersionMeta:
        metas = self._metas()
        if version not in metas:
            raise IndexNotFoundError(f"version {version} of index {self.name!r} does not exist")
        return metas[version][0]

    def _alias_target(self) -> str | None:
        """The active version, read from the alias (atomic on a server)."""
        resp = self._call(self.client.get_aliases)
        prefix = f"{self.name}__"
        for a in resp.aliases:
            if a.alias_name == self.name and a.collection_name.startswith(prefix):
                return a.collection_name[len(prefix) :]
        return None

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

    def _open_target(self, version: str) -> _Target:
        meta = self._read_meta(version)
        self._guard(version, meta)
        return _Target(self, self._collection(version), version, meta)

    def _target(self, write: bool = False, tokens: Any = None) -> _Target:
        if self._closed:
            raise GalleryIndexError(f"index {self.name!r} is closed")
        if write and self.read_only:
            raise GalleryIndexError(f"index {self.name!r} was opened read-only")
        t = self._t
        if t is not None:
            return t
        with self._mutex:
            if self._t is not None:
                return self._t
            active = self._alias_target()
            if active is not None:
                self._t = self._open_target(active)
                return self._t
            if tokens is None:
                raise IndexNotFoundError(f"index {self.name!r} has no version yet at {self.uri}")
            arr = np.asarray(tokens)
            if arr.ndim != 3:
                common.normalise_tokens(arr, len(arr), None)  # raises a clear error
            meta = VersionMeta(
                self._fingerprint or "unspecified",
                self._preset or "",
                (int(arr.shape[1]), int(arr.shape[2])),
                dict(self._fields),
            )
            version = self._create(meta)
            self._switch_alias(version, [])
            self._t = _Target(self, self._collection(version), version, meta)
            return self._t

    # versions --------------------------------------------------------------------------------
    def _create(self, meta: VersionMeta) -> str:
        """Create a version atomically between processes.

        The version number is CLAIMED by creating its collection: ``create_collection`` of a
        name that exists fails on the server (and in local mode), so of two processes that
        picked the same number only one succeeds and the other moves on to the next number.
        The catalog entry is written last, after the payload indexes: a version is listed only
        once it is complete (like Edge's ``meta.json``). A creator killed in between leaves a
        collection without a catalog entry: never listed, its number is skipped by later
        creators, and it can be deleted by hand (``<name>__vNNNNNN`` absent from versions()).
        """
        common.validate_fields(meta.fields)
        self._ensure_catalog()
        existing = self._metas()
        n = max((int(v[1:]) for v in existing), default=0) + 1
        for _ in range(1000):
            version = f"v{n:06d}"
            coll = self._collection(version)
            if not self._call(self.client.collection_exists, coll) and self._claim(coll, meta):
                break
            n += 1
        else:  # pragma: no cover - a thousand concurrent creators
            raise GalleryIndexError(f"index {self.name!r}: could not claim a version number")
        self._finish_create(coll, meta)
        self._put_catalog(
            version,
            {"kind": "version", "version": version, "meta": meta.to_json(), "created": time.time()},
        )
        return version

    def _claim(self, coll: str, meta: VersionMeta) -> bool:
        """Create the version's collection; False when another process created it first."""
        m = _models()
        _, dim = meta.shape
        opts = self._options
        try:
            self._create_collection(coll, dim, opts, m)
        except (GalleryIndexError, ValueError) as exc:
            if _already_exists(exc):
                logger.info("index %r: %s taken by another process, next number", self.name, coll)
                return False
            raise
        return True

    def _create_collection(self, coll: str, dim: int, opts: Mapping[str, Any], m: Any) -> None:
        self._call(
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
            shard_number=self._shard_number,
            replication_factor=self._replication_factor,
            on_disk_payload=True,
        )

    def _finish_create(self, coll: str, meta: VersionMeta) -> None:
        m = _models()
        schema = {
            "keyword": m.PayloadSchemaType.KEYWORD,
            "integer": m.PayloadSchemaType.INTEGER,
            "float": m.PayloadSchemaType.FLOAT,
            "bool": m.PayloadSchemaType.BOOL,
        }
        indexes = {USER_ID_KEY: "keyword", **meta.fields}  # user_id: the user-id lookup
        for fname, ftype in indexes.items():
            self._call(
                self.client.create_payload_index, coll, fname, field_schema=schema[ftype], wait=True
            )

    def _switch_alias(self, version: str, history: list[str]) -> None:
        m = _models()
        ops: list[Any] = []
        if self._alias_target() is not None:
            ops.append(m.DeleteAliasOperation(delete_alias=m.DeleteAlias(alias_name=self.name)))
        ops.append(
            m.CreateAliasOperation(
                create_alias=m.CreateAlias(
                    collection_name=self._collection(version), alias_name=self.name
                )
            )
        )
        # one request: the server applies delete+create atomically
        self._call(self.client.update_collection_aliases, change_aliases_operations=ops)
        self._put_catalog("_pointer", {"kind": "pointer", "active": version, "history": history})
        self._mark_activated(version)

    @property
    def active_version(self) -> str | None:
        t = self._t
        return t.version if t is not None else self._alias_target()

    @property
    def meta(self) -> VersionMeta | None:
        v = self.active_version
        return None if v is None else self._read_meta(v)

    def versions(self) -> list[VersionInfo]:
        active = self._alias_target()
        history = set(self._history())
        out = []
        for v, (meta, created, activated) in sorted(self._version_records().items()):
            try:
                res = self._call(self.client.count, self._collection(v), exact=True)
                count: int | None = int(res.count)
            except GalleryIndexError:
                count = None
            ever = activated is not None or v == active or v in history
            out.append(VersionInfo(v, meta, created, count, v == active, activated, ever))
        return out

    def open_version(self, version: str, read_only: bool = False) -> VersionHandle:
        if self._closed:
            raise GalleryIndexError(f"index {self.name!r} is closed")
        if self.read_only and not read_only:
            raise GalleryIndexError(
                f"index {self.name!r} was opened read-only: use open_version(v, read_only=True)"
            )
        if not VERSION_RE.match(version):
            raise IndexNotFoundError(f"bad version id {version!r} (expected like 'v000001')")
        target = self._open_target(version)  # IndexNotFoundError / ModelMismatchError
        if not self._call(self.client.collection_exists, target.collection):
            raise IndexNotFoundError(
                f"version {version} of index {self.name!r} is listed but its collection "
                f"{target.collection} is missing"
            )
        return QdrantVersionHandle(self, target, read_only=read_only)

    def update_version_meta(self, version: str, extra: Mapping[str, Any]) -> VersionMeta:
        """Read-modify-write of the catalog entry: concurrent updates of the SAME version from
        two processes can lose one (Qdrant has no compare-and-set); the indexer updates a
        version from one process at a time."""
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
        changes how the version is searched, not its data; this object uses it at once."""
        if calibration is not None and not isinstance(calibration, Mapping):
            raise GalleryIndexError(
                f"calibration must be a dict or None, got {type(calibration).__name__}"
            )
        value = None if calibration is None else dict(calibration)
        return self._merge_extra(version, {common.CALIBRATION_KEY: value})

    def _merge_extra(self, version: str, extra: Mapping[str, Any]) -> VersionMeta:
        with self._mutex:
            meta = self._read_meta(version)
            merged = dict(meta.extra)
            for k, v in extra.items():
                if v is None:
                    merged.pop(k, None)
                else:
                    merged[k] = v
            new = replace(meta, extra=merged)
            self._set_catalog(version, {"meta": new.to_json()})
            t = self._t
            if t is not None and t.version == version:
                t.meta = new
        return new

    def create_version(self, meta: VersionMeta) -> VersionHandle:
        if self.read_only:
            raise GalleryIndexError(f"index {self.name!r} was opened read-only")
        with self._mutex:
            version = self._create(meta)
        logger.info("index %r: building version %s", self.name, version)
        return QdrantVersionHandle(self, _Target(self, self._collection(version), version, meta))

    def activate(self, version: str) -> None:
        if self.read_only:
            raise GalleryIndexError(f"index {self.name!r} was opened read-only")
        if not VERSION_RE.match(version):
            raise IndexNotFoundError(f"bad version id {version!r}")
        meta = self._read_meta(version)
        self._guard(version, meta)
        with self._mutex:
            cur = self._alias_target()
            if cur != version:
                self._wait_indexed(self._collection(version))
                history = [v for v in [cur, *self._history()] if v and v != version]
                self._switch_alias(version, history)
                logger.info("index %r: active version %s -> %s", self.name, cur, version)
            self._t = _Target(self, self._collection(version), version, meta)
        self._prune()

    def _wait_indexed(self, coll: str) -> None:
        """The server-side finish of a version: its optimizers have built the indexes of what
        was written (status green), also when the writer of the last points was killed. A
        version still optimizing after ``activate_timeout_s`` (option, default 600) is not
        activated. Local mode has no optimizer (always green)."""
        m = _models()
        limit = float(self._options.get("activate_timeout_s", 600.0))
        deadline = time.monotonic() + limit
        nudged = False
        while True:
            info = self._call(self.client.get_collection, coll)
            status = info.status
            if status == m.CollectionStatus.GREEN:
                return
            if status == m.CollectionStatus.RED:
                raise GalleryIndexError(
                    f"refusing to activate {coll}: the collection failed to optimize (status red)"
                )
            if status == m.CollectionStatus.GREY and not nudged:
                # optimizations pending but not started (e.g. after a server restart)
                self._call(
                    self.client.update_collection, coll, optimizers_config=m.OptimizersConfigDiff()
                )
                nudged = True
            if time.monotonic() > deadline:
                raise GalleryIndexError(
                    f"refusing to activate {coll}: its indexes are still being built after "
                    f"{limit:.0f}s (status {status}); activate it once the server finished"
                )
            time.sleep(0.2)

    def _prune(self) -> None:
        active = self._alias_target()
        history = self._history()
        old = [v for v in sorted(self._metas(), reverse=True) if v != active]
        for v in old[self._keep :]:
            if history and v == history[0]:
                continue  # servers may still be reading it until their next refresh()
            self.drop_version(v)

    def drop_version(self, version: str) -> None:
        if self.read_only:
            raise GalleryIndexError(f"index {self.name!r} was opened read-only")
        with self._mutex:
            if version == self._alias_target():
                raise GalleryIndexError(
                    f"refusing to drop {version}: it is the active version of {self.name!r}"
                )
            self._read_meta(version)
            self._call(self.client.delete_collection, self._collection(version))
            self._del_catalog(version)
            history = self._history()
            if version in history:
                self._put_catalog(
                    "_pointer",
                    {
                        "kind": "pointer",
                        "active": self._alias_target(),
                        "history": [v for v in history if v != version],
                    },
                )
        logger.info("index %r: dropped version %s", self.name, version)

    def rollback(self) -> str:
        metas = self._metas()
        for v in self._history():
            if v in metas:
                self.activate(v)
                return v
        raise IndexNotFoundError(f"index {self.name!r} has no previous version to roll back to")

    def refresh(self) -> bool:
        active = self._alias_target()
        t = self._t
        if active is None or (t is not None and t.version == active):
            if t is not None:  # a calibration recorded by another process (cir index calibrate)
                meta = self._read_meta(t.version)
                if meta.extra.get(common.CALIBRATION_KEY) != t.meta.extra.get(
                    common.CALIBRATION_KEY
                ):
                    t.meta = meta
            return False
        new = self._open_target(active)  # ModelMismatchError keeps the old one serving
        with self._mutex:
            self._t = new
        logger.info("index %r: switched %s -> %s", self.name, t.version if t else None, active)
        return True

    # schema / info ---------------------------------------------------------------------------
    def declared_fields(self) -> dict[str, FieldType]:
        m = self.meta
        return dict(m.fields) if m is not None else dict(self._fields)

    def _describe_version(self, version: str | None, meta: VersionMeta | None) -> dict[str, Any]:
        return {
            "backend": self.backend,
            "uri": self.uri,
            "name": self.name,
            "collection": self._collection(version) if version else None,
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
        metas = self._metas()
        meta, created = metas.get(v, (None, None)) if v else (None, None)
        d = self._describe_version(v, meta)
        d["created"] = created
        d["versions"] = sorted(metas)
        d["read_only"] = self.read_only
        d["shard_number"] = self._shard_number
        d["replication_factor"] = self._replication_factor
        if self._t is not None:
            d["count"] = self.count()
        return d

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
                with self._guarded():
                    client.close()
        finally:
            self._release_lock()
