"""What the indexer needs from the gallery index beyond its documented API, in one place.

``retrieval.index`` (helper-1) documents ``create_version``/``activate``/``versions`` and data
operations, but (at the time of writing) not:

* re-opening an existing, not yet active version for writing or reading (to resume a killed
  build, to fill one version from several shard runs, to verify a version before activating it);
* iterating over every point of a version (incremental mode needs the stored ids and paths).

Each helper here uses the public method when the index has it (``open_version``, ``scroll``)
and otherwise falls back to the backend's internals. Keep this file the only place that does.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import numpy as np

from retrieval.index import GalleryIndex, IndexView, Record, VersionHandle, VersionInfo

logger = logging.getLogger(__name__)

SCROLL_PAGE = 1000


def open_version(idx: GalleryIndex, version: str) -> VersionHandle:
    """A writable handle on an existing version (Edge: takes its lock -> IndexInUseError)."""
    fn = getattr(idx, "open_version", None)
    if callable(fn):
        handle: VersionHandle = fn(version)
        return handle
    if idx.backend == "edge":
        from retrieval.index.edge import EdgeVersionHandle, _Shard

        catalog = idx.catalog  # type: ignore[attr-defined]
        catalog.read_meta(version)  # IndexNotFoundError when missing
        shard = _Shard(catalog, version, idx._options)  # type: ignore[attr-defined]
        h = EdgeVersionHandle(idx, shard)  # type: ignore[arg-type]
        idx._handles.add(h)  # type: ignore[attr-defined]
        return h
    from retrieval.index.qdrant_server import QdrantVersionHandle

    target = idx._open_target(version)  # type: ignore[attr-defined]
    return QdrantVersionHandle(idx, target)  # type: ignore[arg-type]


def scroll(view: IndexView, page: int = SCROLL_PAGE) -> Iterator[Record]:
    """Every point of ``view`` (payload, no vectors), in the engine's order."""
    fn = getattr(view, "scroll", None)
    if callable(fn):
        yield from fn()
        return
    from retrieval.index import common

    if hasattr(view, "_use"):  # Edge: the index (active version) or a version handle
        import qdrant_edge as q

        offset: Any = None
        while True:
            with view._use() as sh:
                recs, offset = sh.shard.scroll(
                    q.ScrollRequest(offset=offset, limit=page, with_payload=True, with_vector=False)
                )
            for r in recs:
                cid, payload = common.strip_payload(r.payload)
                yield Record(cid or str(r.id), payload)
            if offset is None or not recs:
                return
    target = view._target()  # type: ignore[attr-defined]
    client = target.owner.client
    offset = None
    while True:
        recs, offset = target.call(
            client.scroll,
            target.collection,
            limit=page,
            offset=offset,
            with_payload=True,
            with_vectors=False,
        )
        for r in recs:
            cid, payload = common.strip_payload(r.payload)
            yield Record(cid or str(r.id), payload)
        if offset is None or not recs:
            return


def version_number(version: str) -> int:
    try:
        return int(version.lstrip("v"))
    except ValueError:
        return -1


def resume_candidates(idx: GalleryIndex, build_key: str) -> list[VersionInfo]:
    """Unfinished builds of ``build_key``: never-activated versions newer than the active one,
    oldest first (the oldest is the one every shard run agrees on)."""
    infos = idx.versions()
    active = [v for v in infos if v.active]
    floor = version_number(active[0].version) if active else 0
    return [
        v
        for v in infos
        if not v.active
        and version_number(v.version) > floor
        and v.meta.extra.get("build_key") == build_key
    ]


def verify_view(
    view: IndexView,
    sample_ids: list[str],
    expected_count: int | None,
    top_k: int = 10,
) -> dict[str, Any]:
    """Count check plus self-retrieval: each sampled image, queried by one of its own tokens,
    must come back at rank 1.

    Two queries per image: its most distinctive token as stored, and the same token with the
    sample's mean token removed (models with random or weakly trained weights give nearly
    identical tokens to every image, so the raw token ties within float noise; the centred one
    still separates them). Rank 1 by either counts; a hit that scores within 1e-6 of the top
    counts as tied for rank 1.
    """
    count = view.count()
    out: dict[str, Any] = {
        "count": count,
        "expected_count": expected_count,
        "count_ok": expected_count is None or count == expected_count,
        "sampled": 0,
        "found_rank1": 0,
        "failures": [],
    }
    recs = [r for r in view.get(sample_ids, with_vectors=True) if r.tokens is not None]
    out["missing"] = len(sample_ids) - len(recs)
    out["sampled"] = len(recs)
    if recs:
        toks = np.stack([np.asarray(r.tokens, dtype=np.float32) for r in recs])  # [S, Q, D]
        toks /= np.linalg.norm(toks, axis=-1, keepdims=True) + 1e-12
        mean = toks.reshape(-1, toks.shape[-1]).mean(0)
        dev = np.linalg.norm(toks - mean, axis=-1)  # [S, Q]
        pick = dev.argmax(1)
        raw = toks[np.arange(len(recs)), pick]
        centred = raw - mean
        centred /= np.linalg.norm(centred, axis=-1, keepdims=True) + 1e-12
        k = max(1, min(top_k, count or 1))
        hits_raw = view.search_batch(raw, top_k=k, mode="exact")
        hits_cen = view.search_batch(centred, top_k=k, mode="exact")
        for r, h1, h2 in zip(recs, hits_raw, hits_cen, strict=True):
            if _rank1(r.id, h1) or _rank1(r.id, h2):
                out["found_rank1"] += 1
            else:
                got = h2[0].id if h2 else None
                out["failures"].append({"id": r.id, "path": r.payload.get("path"), "top": got})
    out["ok"] = bool(
        out["count_ok"]
        and out["missing"] == 0
        and out["found_rank1"] == out["sampled"]
        and (count > 0 or expected_count == 0)
    )
    return out


def _rank1(id_: str, hits: list[Any]) -> bool:
    if not hits:
        return False
    top = hits[0].score
    for h in hits:
        if h.score < top - 1e-6:
            return False
        if h.id == id_:
            return True
    return False


def sample_ids(ids: list[str], k: int) -> list[str]:
    """``k`` ids spread evenly over the sorted ids (deterministic)."""
    if k <= 0 or not ids:
        return []
    s = sorted(ids)
    if len(s) <= k:
        return s
    step = len(s) / k
    return [s[int(i * step)] for i in range(k)]
