"""The model + index side of the server: validated queries in, vectors and hits out.

Everything here that touches torch or the index is synchronous and runs in worker threads:
one dedicated inference thread (torch releases the GIL), and a small pool for decoding,
index lookups, searches and file reads. The event loop only routes.
"""

from __future__ import annotations

import base64
import binascii
import collections
import json
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np

from retrieval.index.api import PATCHES_KEY, Hits, SearchMode, SearchView
from server.config import ServerSettings
from server.errors import RequestError, to_request_error

logger = logging.getLogger(__name__)

#: Batches of at least this many queries run with ``batch_threads`` torch threads.
BATCH_THREADS_MIN = 4
#: Payload keys that hold a thumbnail (never returned in payloads; served by GetImage).
THUMBNAIL_KEYS = ("thumbnail", "thumbnail_b64", "thumbnail_path")
#: Payload keys never returned to clients (computed once, not per hit).
PRIVATE_KEYS = frozenset((*THUMBNAIL_KEYS, PATCHES_KEY))
#: Payload keys that hold the original image's location, in order of preference.
PATH_KEYS = ("path", "file", "uri", "source")
#: Gallery browsing goes deeper than search pagination: exact scan, bounded by the index.


@dataclass
class Query:
    """A validated query, ready for the batcher."""

    text: str
    image: Any = None  # decoded PIL reference image (needs ViT features)
    features: Any = None  # cached reference ViT features [T, C] (torch)
    cache_key: str | None = None  # store computed features under this key
    top_k: int = 10
    offset: int = 0
    filter: dict[str, Any] | None = None
    mode: str = "auto"
    include_payload: bool = True
    search: bool = True  # False: EncodeQuery (vector only)
    rerank_k: int = 0  # re-rank the first stage's top rerank_k (0: off; needs a reference)
    rerank_feats: Any = None  # the re-ranker's query side (retrieval.rerank.QueryFeatures)
    # candidates' re-ranker features [T, C] by id, read with the search's hits (patches source)
    rerank_cands: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    searched_mode: str = ""  # what the index really ran ("exact" / "fast"), set by search
    index_version: str = ""  # the version that answered this query's search, set by search
    mode_note: str = ""  # why it is not the mode asked for, when that matters

    @property
    def has_reference(self) -> bool:
        return self.image is not None or self.features is not None

    @property
    def reranks(self) -> bool:
        return self.rerank_k > 0 and self.has_reference

    def group_key(self) -> tuple[Any, ...]:
        flt = json.dumps(self.filter, sort_keys=True) if self.filter else ""
        return (self.top_k, self.offset, flt, self.mode, self.rerank_k if self.reranks else 0)


@dataclass(frozen=True)
class RankedHit:
    """A hit after the second stage: ``score`` is the re-ranker's when ``reranked``."""

    id: str
    score: float
    payload: dict[str, Any]
    first_stage_score: float
    reranked: bool


# rerank_hit_rate above which a re-ranked search stops reading its candidates' features with
# its hits (a miss then costs a second index call, for the few not cached)
RERANK_CACHE_WARM = 0.9


class FeatureCache:
    """LRU of reference ViT features per gallery image, bounded by entries and bytes."""

    def __init__(self, max_entries: int, max_bytes: int) -> None:
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self._data: collections.OrderedDict[str, Any] = collections.OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    @staticmethod
    def _size(t: Any) -> int:
        return int(t.nbytes)  # torch tensors and numpy arrays alike

    def get(self, key: str) -> Any:
        with self._lock:
            t = self._data.get(key)
            if t is None:
                self.misses += 1
                return None
            self._data.move_to_end(key)
            self.hits += 1
            return t

    def put(self, key: str, t: Any) -> None:
        if self.max_entries <= 0 or self._size(t) > self.max_bytes:
            return
        with self._lock:
            old = self._data.pop(key, None)
            if old is not None:
                self._bytes -= self._size(old)
            self._data[key] = t
            self._bytes += self._size(t)
            while self._data and (
                len(self._data) > self.max_entries or self._bytes > self.max_bytes
            ):
                _, ev = self._data.popitem(last=False)
                self._bytes -= self._size(ev)

    def __len__(self) -> int:
        return len(self._data)

    @property
    def nbytes(self) -> int:
        return self._bytes


def sniff_mime(data: bytes) -> str:
    if data[:3] == b"\xff\xd8\xff":
        return "image/jpeg"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "image/png"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "image/gif"
    if data[:2] == b"BM":
        return "image/bmp"
    if data[:4] in (b"II*\x00", b"MM\x00*"):
        return "image/tiff"
    return "application/octet-stream"


def public_payload(payload: dict[str, Any]) -> dict[str, Any]:
    """A payload as clients see it (thumbnails are served by GetImage only; the re-ranker's
    stored ViT tokens are internal)."""
    return {k: v for k, v in payload.items() if k not in PRIVATE_KEYS}


def user_id_of(payload: dict[str, Any] | None) -> str:
    """The user's own id stored with a point ("" for points indexed without one)."""
    from retrieval.index.api import USER_ID_KEY

    value = (payload or {}).get(USER_ID_KEY)
    return value if isinstance(value, str) else ""


def _looks_like_uuid(text: str) -> bool:
    import uuid

    try:
        uuid.UUID(text)
    except ValueError:
        return False
    return True


class Engine:
    """Owns the encoder, the index and the feature cache. Thread-safe where it needs to be."""

    def __init__(
        self, settings: ServerSettings, encoder: Any, index: SearchView, reranker: Any = None
    ) -> None:
        self.settings = settings
        self.encoder = encoder
        self.index = index
        self.reranker = reranker  # retrieval.rerank.Reranker, checked against the encoder
        # SearchRequest.rerank_k when unset: the configured one, else DEFAULT_RERANK_K with a
        # re-ranker and 0 without
        from retrieval.rerank import DEFAULT_RERANK_K

        configured = settings.rerank_k
        self.default_rerank_k = (
            0 if reranker is None else (DEFAULT_RERANK_K if configured is None else configured)
        )
        self._browse_cache: tuple[str | None, list[str]] | None = None
        self.cache = FeatureCache(
            settings.feature_cache_size, int(settings.feature_cache_mb * 1024 * 1024)
        )
        # the re-ranker's candidate features by point id (float16 [T, C]). A point id is the
        # uuid5 of the image's content and every served version has this encoder (the model
        # guard), so an id's features never change and need no version in the key.
        patches = reranker is not None and reranker.config.features == "patches"
        self.rerank_cache = FeatureCache(  # 0 bytes (off) unless the re-ranker reads ViT tokens
            1 << 62, int(settings.rerank_cache_mb * 1024 * 1024) if patches else 0
        )
        # share of recent re-rank candidates found in that cache (EMA over batches): while it
        # is low a search reads the candidates' features with its hits (one index call), once
        # it is high only the misses are read, in one `get`
        self.rerank_hit_rate = 0.0
        self._fields: dict[str, str] | None = None
        self._fields_version: str | None = None
        import torch

        self._small_threads = torch.get_num_threads()  # what num_threads set at load
        self._threads_now = self._small_threads
        self.guard: Any = None  # server.recall_guard.RecallGuard (set by the service)
        self._noted: set[tuple[str, str]] = set()

    #: How long a calibration recorded elsewhere takes to reach the searches: nothing is cached
    #: here any more (every search's Hits say the mode the index ran), so no wait.
    PLAN_TTL_S = 0.0

    def index_options(self) -> dict[str, Any]:
        """The search options the index was opened with (``open_index(options=...)``)."""
        return dict(self.index.options)

    def searched(self, q: Query, hits: Hits, forced: bool) -> tuple[str, str]:
        """The mode ``q`` really ran in and why it differs from the one asked, from its
        :class:`~retrieval.index.api.Hits` (the index resolved auto / an uncalibrated fast in
        the same call); ``forced``: the recall guard's exact fallback."""
        if forced:
            guard = self.guard
            return "exact", (
                f"the recall guard found fast below recall@10 {guard.recall_target:g} on "
                f"version {hits.version} and could not record a larger L: searched exactly"
            )
        run, note = hits.mode or q.mode, hits.note
        if note and q.mode == "fast" and (hits.version, note) not in self._noted:
            self._noted.add((hits.version, note))
            logger.warning("fast search on index version %s: %s", hits.version, note)
        return run, note

    # ------------------------------------------------------------------ index facts
    @property
    def version(self) -> str:
        return str(self.index.active_version or "")

    def fields(self) -> dict[str, str]:
        """Declared filterable fields of the active version (cached per version)."""
        v = self.version
        if self._fields is None or self._fields_version != v:
            self._fields = dict(self.index.declared_fields())
            self._fields_version = v
        return self._fields

    # ------------------------------------------------------------------ admission (io pool)
    def check_filter(self, flt: dict[str, Any] | None) -> None:
        """Early, clear INVALID_ARGUMENT for filters the index would refuse."""
        if not flt:
            return
        from retrieval.index import InvalidFilterError, validate_filter

        try:
            validate_filter(flt, self.fields())  # type: ignore[arg-type]
        except InvalidFilterError as exc:
            raise RequestError("INVALID_ARGUMENT", f"filter: {exc}") from None

    def decode_reference(self, data: bytes) -> Any:
        """Reference image bytes -> PIL RGB, or INVALID_ARGUMENT saying what is wrong."""
        from retrieval.imageio import ImageDecodeError, decode_image

        s = self.settings
        if len(data) > s.max_image_bytes:
            raise RequestError(
                "INVALID_ARGUMENT",
                f"reference_image is {len(data)} bytes; the limit is {s.max_image_bytes} bytes",
            )
        try:
            return decode_image(data, max_pixels=s.max_image_pixels)
        except ImageDecodeError as exc:
            # exc.detail says what the bytes are and why they were refused, in plain words
            bomb = exc.reason == "decompression-bomb"
            hint = " (refused as a decompression bomb)" if bomb else ""
            detail = f": {exc.detail}" if exc.detail else ""
            raise RequestError(
                "INVALID_ARGUMENT",
                f"reference_image cannot be used ({exc.reason}){detail}{hint}",
            ) from None

    def record(self, item_id: str) -> Any:
        """The gallery record ``item_id`` names, or NOT_FOUND.

        Either kind of id works: the point id (the indexer's uuid; any caller id written through
        the index API) or the user's own id (payload ``user_id``: a manifest's id column or the
        file's relative path). A uuid-looking id is tried as a point id first, anything else as
        a user id first; an unknown id is NOT_FOUND, a user id on several points (a clash left by
        an old build) FAILED_PRECONDITION naming them.
        """
        if not item_id:
            raise RequestError("INVALID_ARGUMENT", "id is empty")
        from retrieval.index import InvalidQueryError

        def by_point() -> Any:
            recs = self.index.get([item_id])
            return recs[0] if recs else None

        def by_user_id() -> Any:
            try:
                recs = self.index.find_by_user_id(item_id, limit=2)
            except InvalidQueryError:
                return None
            if len(recs) > 1:
                raise RequestError(
                    "FAILED_PRECONDITION",
                    f"user id {item_id!r} names more than one image in index {self.index.name!r} "
                    f"(version {self.version}; point ids {', '.join(r.id for r in recs)}): "
                    "rebuild the index from a collection whose ids are unique, or use a point id",
                )
            return recs[0] if recs else None

        lookups = (by_point, by_user_id) if _looks_like_uuid(item_id) else (by_user_id, by_point)
        for lookup in lookups:
            rec = lookup()
            if rec is not None:
                return rec
        raise RequestError(
            "NOT_FOUND",
            f"gallery id {item_id!r} is not in index {self.index.name!r} "
            f"(version {self.version}; neither a point id nor a user id)",
        )

    def gallery_reference(self, item_id: str) -> tuple[Any, Any, str]:
        """(cached features or None, decoded image or None, cache key) for a gallery id."""
        rec = self.record(item_id)
        payload = rec.payload or {}
        # by point id: an image named by its user id and by its point id shares one entry
        key = f"{rec.id}@{payload.get('sha256') or self.version}"
        feats = self.cache.get(key)
        if feats is not None:
            return feats, None, key
        data = self.read_original(item_id, payload, missing_ok=True)
        if data is None:
            data = self.read_thumbnail(payload)
        if data is None:
            raise RequestError(
                "NOT_FOUND",
                f"gallery id {item_id!r} has no readable image (original file missing and no "
                "thumbnail in its payload)",
            )
        from retrieval.imageio import ImageDecodeError, decode_image

        try:
            image = decode_image(data, max_pixels=self.settings.max_image_pixels)
        except ImageDecodeError as exc:
            raise RequestError(
                "FAILED_PRECONDITION", f"gallery image {item_id!r} cannot be decoded: {exc}"
            ) from None
        return None, image, key

    # ------------------------------------------------------------------ images (io pool)
    def _resolve(self, location: str) -> Path | None:
        if "://" in location:
            if not location.startswith("file://"):
                return None  # remote originals are not fetched by the server
            location = location[len("file://") :]
        p = Path(location)
        if not p.is_absolute() and self.settings.image_root is not None:
            p = self.settings.image_root / p
        return p

    def read_thumbnail(self, payload: dict[str, Any]) -> bytes | None:
        """Thumbnail bytes from the payload: base64 (optionally a data: URI) or a file path."""
        for key in THUMBNAIL_KEYS:
            value = payload.get(key)
            if not isinstance(value, str) or not value:
                continue
            text = value
            if text.startswith("data:"):
                text = text.partition(",")[2]
            if key != "thumbnail_path":
                try:
                    data = base64.b64decode(text, validate=True)
                    if sniff_mime(data) != "application/octet-stream":
                        return data
                except (binascii.Error, ValueError):
                    pass
            p = self._resolve(value)
            if p is not None and p.is_file():
                return p.read_bytes()
        return None

    def read_original(
        self, item_id: str, payload: dict[str, Any], missing_ok: bool = False
    ) -> bytes | None:
        """The original file named by the payload (never by the request)."""
        location = next(
            (payload[k] for k in PATH_KEYS if isinstance(payload.get(k), str) and payload[k]),
            None,
        )
        if location is None:
            if missing_ok:
                return None
            raise RequestError("NOT_FOUND", f"gallery id {item_id!r} has no original image path")
        p = self._resolve(location)
        if p is None:
            if missing_ok:
                return None
            raise RequestError(
                "FAILED_PRECONDITION",
                f"the original of {item_id!r} is stored at a non-local location the server "
                "does not fetch",
            )
        if not p.is_file():
            if missing_ok:
                return None
            raise RequestError(
                "NOT_FOUND", f"the original image file of {item_id!r} is missing on the server"
            )
        size = p.stat().st_size
        limit = self.settings.max_message_bytes - 64 * 1024
        if size > limit:
            if missing_ok:
                return None
            raise RequestError(
                "RESOURCE_EXHAUSTED",
                f"the original of {item_id!r} is {size} bytes, over the {limit}-byte message limit",
            )
        return p.read_bytes()

    def get_image(self, item_id: str, kind: str) -> tuple[bytes, str, int, int]:
        rec = self.record(item_id)
        payload = rec.payload or {}
        if kind == "original":
            data = self.read_original(item_id, payload)
            assert data is not None
            w = h = 0
        else:
            thumb = self.read_thumbnail(payload)
            if thumb is None:
                raise RequestError("NOT_FOUND", f"gallery id {item_id!r} has no thumbnail")
            data = thumb
            w = h = 0
        try:
            import io

            from PIL import Image

            with Image.open(io.BytesIO(data)) as im:
                w, h = im.size
        except Exception:  # size is informative only
            pass
        return data, sniff_mime(data), int(w), int(h)

    # ------------------------------------------------------------------ inference thread
    def _pick_threads(self, n: int, override: int | None = None) -> int:
        """Torch threads for a batch of ``n`` queries (``batch_threads`` from
        :data:`BATCH_THREADS_MIN` on, or ``override``); called in the inference thread that runs
        the model."""
        import torch

        want = self._small_threads
        if override:
            want = override
        elif self.settings.batch_threads and n >= BATCH_THREADS_MIN:
            want = self.settings.batch_threads
        if want != self._threads_now and self.encoder.device.type == "cpu":
            torch.set_num_threads(want)
            self._threads_now = want
        return self._threads_now

    def encode(self, queries: list[Query]) -> tuple[np.ndarray, dict[str, float]]:
        """Vectors [N, D] for a batch (reference + text, or text only)."""
        import torch

        enc = self.encoder
        self._pick_threads(len(queries))
        out = np.zeros((len(queries), enc.dim), np.float32)
        t_ref = t_enc = 0.0
        with_ref = [i for i, q in enumerate(queries) if q.has_reference]
        text_only = [i for i, q in enumerate(queries) if not q.has_reference]
        if with_ref:
            t0 = time.perf_counter()
            need = [i for i in with_ref if queries[i].features is None]
            if need:
                feats = enc.reference_features([queries[i].image for i in need])
                for j, i in enumerate(need):
                    q = queries[i]
                    q.features = feats[j]
                    q.image = None
                    q.timings["reference_cached"] = 0.0
                    if q.cache_key is not None:
                        self.cache.put(q.cache_key, feats[j].detach().clone())
            t1 = time.perf_counter()
            plain = [i for i in with_ref if not queries[i].reranks]
            rerank = [i for i in with_ref if queries[i].reranks]
            if plain:
                out[plain] = enc.encode_queries(
                    None,
                    [queries[i].text for i in plain],
                    ref_features=torch.stack([queries[i].features for i in plain]),
                    batch_size=max(1, len(plain)),
                )
            if rerank:  # the same fusion pass gives the query vector and the re-ranker's input
                from retrieval.rerank import query_features

                assert self.reranker is not None
                qf = query_features(
                    enc,
                    torch.stack([queries[i].features for i in rerank]),
                    [queries[i].text for i in rerank],
                    self.reranker.config.features,
                ).to("cpu")
                out[rerank] = qf.query.numpy()
                for j, i in enumerate(rerank):
                    queries[i].rerank_feats = qf.select([j])
            t_ref, t_enc = t1 - t0, time.perf_counter() - t1
        if text_only:
            t0 = time.perf_counter()
            out[text_only] = enc.encode_texts(
                [queries[i].text for i in text_only], batch_size=max(1, len(text_only))
            )
            t_enc += time.perf_counter() - t0
        return out, {"reference_ms": t_ref * 1000.0, "encode_ms": t_enc * 1000.0}

    # ------------------------------------------------------------------ search (io pool)
    def search(
        self, vectors: np.ndarray, queries: list[Query]
    ) -> tuple[list[list[Any] | RequestError], str, float]:
        """Hits per query (or the error for that query's group), the version searched, ms."""
        from retrieval.index import GalleryIndexError

        t0 = time.perf_counter()
        groups: dict[tuple[Any, ...], list[int]] = {}
        for i, q in enumerate(queries):
            groups.setdefault(q.group_key(), []).append(i)
        results: list[list[Any] | RequestError] = [[] for _ in queries]
        guard = self.guard
        # the recall guard's fallback (the index itself applies the calibration's); a local
        # read of the served version (no round trip), only when the guard forced one
        forced = (
            guard is not None and bool(guard.forced_exact) and self.version in guard.forced_exact
        )
        modes = ["exact"] * len(queries)
        with_patches = self.reranker is not None and self.reranker.config.features == "patches"
        for idx in groups.values():
            q = queries[idx[0]]
            # a re-ranked query fetches its whole window from 0; rerank() cuts its page
            top_k, offset = q.top_k, q.offset
            payload: Any = None  # the index's default: no thumbnail, no re-ranker features
            if q.reranks:
                top_k, offset = max(q.rerank_k, q.offset + q.top_k), 0
                # the candidates' ViT tokens come with the hits (no 2nd call), unless the
                # cache is warm: then rerank() reads only its misses
                if with_patches and self.rerank_hit_rate < RERANK_CACHE_WARM:
                    payload = {"exclude": ["thumbnail"]}
            mode = cast("SearchMode", "exact" if forced else q.mode)  # validated by the service
            try:  # one call to the index (its search process) per group: hits + version
                if len(idx) == 1:
                    hits = [
                        self.index.search(vectors[idx[0]], top_k, offset, q.filter, mode, payload)
                    ]
                else:
                    hits = self.index.search_batch(
                        vectors[idx], top_k, offset, q.filter, mode, payload
                    )
            except GalleryIndexError as exc:  # mapped by the one table (server/errors.py)
                err = to_request_error(exc)
                if err.code == "INTERNAL":
                    logger.exception("index search failed")
                for i in idx:
                    results[i] = err
                continue
            for i, h in zip(idx, hits, strict=True):
                results[i] = h
                if payload is not None:
                    queries[i].rerank_cands = self._take_patches(h, q.rerank_k)
                run, note = self.searched(q, h, forced and q.mode != "exact")
                queries[i].searched_mode, queries[i].mode_note = run, note
                queries[i].index_version = h.version
                modes[i] = run
        # the version searched (per query in Query.index_version: a refresh between two
        # groups' calls may switch it); "" when every group failed
        version = next((q.index_version for q in queries if q.index_version), "")
        ms = (time.perf_counter() - t0) * 1000.0
        if self.guard is not None:  # keeps the vectors, queues a sample: no index call here
            self.guard.observe(version, vectors, queries, results, modes)
        return results, version, ms

    # ------------------------------------------------------------------ second stage
    def rerank(self, queries: list[Query], results: list[list[Any] | RequestError]) -> float:
        """Re-rank, in place, the results of the queries that asked for it: their first
        ``rerank_k`` hits by the re-ranker (one batch for all of them: one vector fetch, one
        model call), then their page. Runs in the inference thread. Returns ms."""
        import torch

        from retrieval.index import GalleryIndexError

        todo = [
            i
            for i, q in enumerate(queries)
            if q.reranks and q.rerank_feats is not None and not isinstance(results[i], RequestError)
        ]
        if not todo:
            return 0.0
        assert self.reranker is not None
        t0 = time.perf_counter()
        windows = {i: results[i][: queries[i].rerank_k] for i in todo}  # type: ignore[index]
        wanted = {h.id for i in todo for h in windows[i]}
        cached = self._cached_candidates(wanted)  # looked up first: the hit rate counts all
        tokens: dict[str, np.ndarray] = {}
        for i in todo:  # read with the search's hits (patches), else cached or fetched here
            tokens.update(queries[i].rerank_cands)
        self._cache_candidates({p: t for p, t in tokens.items() if p not in cached})
        tokens = {**cached, **tokens}
        ids = sorted(wanted - tokens.keys())
        try:
            if ids:
                fetched = self.candidate_features(ids)
                tokens.update(fetched)
                self._cache_candidates(fetched)
        except GalleryIndexError as exc:  # mapped by the one table (server/errors.py)
            err = to_request_error(exc)
            if err.code == "INTERNAL":
                logger.exception("fetching re-rank candidates failed")
            for i in todo:
                results[i] = err
            return (time.perf_counter() - t0) * 1000.0
        k = max(len(w) for w in windows.values())
        cfg = self.reranker.config
        cand = torch.zeros((len(todo), k, cfg.pair_rows, cfg.pair_dim))
        first = torch.zeros((len(todo), k))
        missing: set[int] = set()  # queries with a candidate whose features are gone
        for row, i in enumerate(todo):
            for col, h in enumerate(windows[i]):
                t = tokens.get(h.id)
                if t is None:  # deleted since the search, or a version built without them
                    missing.add(i)
                else:
                    cand[row, col] = torch.from_numpy(t)
                first[row, col] = float(h.score)
        if missing:
            logger.warning(
                "%d queries keep the first stage's order: candidates without re-ranker "
                "features (was the active version built with this model folder?)",
                len(missing),
            )
        from retrieval.rerank import QueryFeatures

        feats = QueryFeatures.cat([queries[i].rerank_feats for i in todo])
        self._pick_threads(len(todo), self.settings.rerank_threads)
        scores = self.reranker.score(feats, cand, first)  # [B, k]
        for row, i in enumerate(todo):
            if i in missing:
                qr = queries[i]
                results[i] = results[i][qr.offset : qr.offset + qr.top_k]  # type: ignore[index]
                continue
            qr, window = queries[i], windows[i]
            n = len(window)
            order = sorted(range(n), key=lambda c: -float(scores[row, c]))
            ranked = [
                RankedHit(
                    window[c].id,
                    float(scores[row, c]),
                    window[c].payload,
                    float(window[c].score),
                    True,
                )
                for c in order
            ]
            tail = [
                RankedHit(h.id, float(h.score), h.payload, float(h.score), False)
                for h in results[i][n:]  # type: ignore[index]
            ]
            results[i] = (ranked + tail)[qr.offset : qr.offset + qr.top_k]
        return (time.perf_counter() - t0) * 1000.0

    def _take_patches(self, hits: list[Any], k: int) -> dict[str, np.ndarray]:
        """Move the re-ranker's features out of the hits' payloads (they never reach a
        response) and decode those of the first ``k``: id -> [T, C] float32."""
        from retrieval.index.api import PATCHES_KEY

        texts = [(h.id, h.payload.pop(PATCHES_KEY, None)) for h in hits]
        return self._decode_patches(texts[:k])

    def _cached_candidates(self, ids: set[str]) -> dict[str, np.ndarray]:
        """The cached features of ``ids`` (patches only), and the hit rate's update."""
        if self.rerank_cache.max_bytes <= 0:
            return {}
        out = {pid: t for pid in ids if (t := self.rerank_cache.get(pid)) is not None}
        if ids:
            rate = len(out) / len(ids)
            self.rerank_hit_rate = 0.8 * self.rerank_hit_rate + 0.2 * rate
        return out

    def _cache_candidates(self, feats: dict[str, np.ndarray]) -> None:
        if self.rerank_cache.max_bytes > 0:
            for pid, t in feats.items():  # float16, as stored in the index: half the memory
                self.rerank_cache.put(pid, t.astype(np.float16))

    def _decode_patches(self, texts: list[tuple[str, Any]]) -> dict[str, np.ndarray]:
        """(id, payload text) -> id -> [T, C]; a missing or unusable text is left out."""
        from retrieval.rerank import decode_patches

        assert self.reranker is not None
        cfg = self.reranker.config
        out: dict[str, np.ndarray] = {}
        for pid, text in texts:
            if isinstance(text, str):
                try:
                    out[pid] = decode_patches(text, cfg.pair_rows, cfg.pair_dim)
                except ValueError as exc:
                    logger.warning("point %s: unusable re-ranker features: %s", pid, exc)
        return out

    def candidate_features(self, ids: list[str]) -> dict[str, np.ndarray]:
        """What the re-ranker reads of each candidate, in one index call: the stored target
        vectors [Q, D] ("targets") or the ViT tokens [T, C] stored in the payload ("patches")."""
        from retrieval.index.api import PATCHES_KEY

        assert self.reranker is not None
        if self.reranker.config.features == "targets":
            recs = self.index.get(ids, with_vectors=True, with_payload=False)
            return {r.id: np.asarray(r.tokens, np.float32) for r in recs if r.tokens is not None}
        recs = self.index.get(ids, with_vectors=False, with_payload=[PATCHES_KEY])
        return self._decode_patches([(r.id, r.payload.get(PATCHES_KEY)) for r in recs])

    def check_reranker_features(self) -> None:
        """At start-up: the active version holds what the re-ranker reads (RuntimeError)."""
        if self.reranker is None or self.reranker.config.features == "targets":
            return
        recs = self.index.sample(1, with_payload=False) if self.index.count() else []
        if recs and not self.candidate_features([recs[0].id]):
            raise RuntimeError(
                "the re-ranker reads each candidate's ViT tokens, and the active index version "
                "has none: rebuild it with this model folder (cir index build --model ...), or "
                "serve with --rerank 0"
            )

    # ------------------------------------------------------------------ browsing (io pool)
    def _browse_ids(self) -> list[str]:
        """Every id of the active version, sorted (stable pages); rebuilt when the version
        changes. One id-only scroll: ~0.1 s per 100k points, then O(page) per call."""
        version = self.index.active_version
        cached = self._browse_cache
        if cached is None or cached[0] != version:
            ids = sorted(r.id for r in self.index.iter_records(batch=2048, with_payload=False))
            cached = (version, ids)
            self._browse_cache = cached
        return cached[1]

    def list_images(
        self, page_size: int, offset: int, seed: int | None
    ) -> tuple[list[Any], int | None, int]:
        """A page of the gallery in id order, or a seeded uniform random sample:
        (records without thumbnails, next offset or None, total)."""
        ids = self._browse_ids()
        total = len(ids)
        if seed is not None:
            rng = np.random.default_rng(int(seed))
            picked: list[int] = rng.choice(
                total, size=min(page_size, total), replace=False
            ).tolist()
            page, nxt = [ids[i] for i in picked], None
        else:
            if offset >= total:
                return [], None, total
            page = ids[offset : offset + page_size]
            nxt = offset + len(page) if offset + len(page) < total else None
        records = {r.id: r for r in self.index.get(page, with_payload={"exclude": ["thumbnail"]})}
        return [records[i] for i in page if i in records], nxt, total
