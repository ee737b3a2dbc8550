"""The indexer's decisions over the gallery index's version API: which unfinished build to
resume, and the post-build check of a version.

Everything here goes through the public ``retrieval.index`` API (``GalleryIndex.versions``,
``VersionInfo.ever_active``: a version rolled back from is not an unfinished build; the
``ReadView`` reads). Re-opening a version is ``idx.open_version(v)``, every point of one
``view.iter_records()``.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from retrieval.index import GalleryIndex, ReadView, VersionInfo

logger = logging.getLogger(__name__)


def version_number(version: str) -> int:
    try:
        return int(version.lstrip("v"))
    except ValueError:
        return -1


def resume_candidates(idx: GalleryIndex, build_key: str) -> list[VersionInfo]:
    """Unfinished builds of ``build_key``: never-activated versions newer than the active one,
    oldest first (the oldest is the one every shard run agrees on). A version that was active
    once (then rolled back from) is finished, never resumed."""
    infos = idx.versions()
    active = [v for v in infos if v.active]
    floor = version_number(active[0].version) if active else 0
    return [
        v
        for v in infos
        if not v.active
        and not v.ever_active
        and version_number(v.version) > floor
        and v.meta.extra.get("build_key") == build_key
    ]


def verify_view(
    view: ReadView,
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
