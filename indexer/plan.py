"""Planning a build, before any stage runs: which version it writes into (a new one, an
unfinished one to resume, the active one for ``--incremental``, the shared one of a shard
build) and what is already there; the safety refusals decided up front (shrink, deletions);
and ``--dry-run``, which plans without writing.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from indexer.config import (
    INDEXER_FORMAT,
    VERIFY_OPTIONS,
    BuildConfig,
    IndexerError,
    ShrinkRefusedError,
)
from indexer.decode import ImageDataset, PresentSet, worker_init
from indexer.report import Report
from indexer.sources import ID_FROM_PATH, Collection, parse_shard, shard_of
from indexer.stages import Listing, ProgressLines, meta_of, meta_of_item, note_duplicate
from indexer.store import resume_candidates

if TYPE_CHECKING:
    from retrieval.encoder import Encoder
    from retrieval.index import GalleryIndex, IndexView, VersionHandle

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------- guards
def shrink_refusal(
    before: int | None, after: int, max_shrink: float, what: str, active: str | None, why: str = ""
) -> str | None:
    """Why a version of ``after`` points must not replace the active one of ``before`` points
    (None: it may). Empty is always refused; otherwise more than ``max_shrink`` fewer."""
    if after == 0:
        serving = f"; the active version {active} keeps serving" if active else ""
        if active and before is not None:
            serving += f" its {before} points"
        return (
            f"refusing to activate {what}: it is empty (0 points){serving}{why}. "
            "Check the source, or pass --allow-shrink."
        )
    if not before or after >= before * (1.0 - max_shrink):
        return None
    return (
        f"refusing to activate {what}: {after} points would replace the {before} of the active "
        f"version {active} ({1 - after / before:.0%} fewer; the limit is --max-shrink "
        f"{max_shrink:g}){why}. The active version keeps serving. Check the source, or pass "
        "--allow-shrink."
    )


def delete_refusal(
    existing: int, deleting: int, max_shrink: float, active: str | None, why: str = ""
) -> str | None:
    """Why an incremental run must not delete ``deleting`` of ``existing`` points (None: it may)."""
    if deleting == 0 or deleting <= existing * max_shrink:
        return None
    return (
        f"refusing to delete {deleting} of the {existing} points of the active version {active} "
        f"({deleting / existing:.0%}; the limit is --max-shrink {max_shrink:g}){why}: "
        "check the source, or pass --allow-shrink."
    )


def active_count(uri: str, name: str) -> tuple[int | None, str | None]:
    """(points of the active version, the active version): counted when its shard is free,
    else the count its build recorded (None when neither is known). Opens and closes its own
    handle, so that the build never holds the active version's lock."""
    from indexer.config import COUNT_KEY
    from retrieval.index import IndexInUseError, open_index

    idx = open_index(uri, name)
    try:
        active = idx.active_version
        if active is None:
            return None, None
        try:
            return idx.count(), active
        except IndexInUseError:  # a server owns it: what its build recorded
            meta = idx.meta
            rec = meta.extra.get(COUNT_KEY) if meta is not None else None
            return (int(rec) if isinstance(rec, int) else None), active
    finally:
        idx.close()


def in_use_message(exc: BaseException, what: str) -> str:
    return (
        f"{what}: {exc}\nThe Edge index has one owner at a time. Incremental writes go into the "
        "version a server is serving; stop the server, or run a rebuild instead (without "
        "--incremental): it builds a new version and the server switches to it once activated."
    )


# --------------------------------------------------------------------------- the target
def build_key(cfg: BuildConfig, col: Collection, fingerprint: str, fields: dict[str, str]) -> str:
    """What makes two runs the same build (so the second resumes the first)."""
    ident = {
        "source": cfg.build_id or col.source_id,
        "fingerprint": fingerprint,
        "fields": dict(sorted(fields.items())),
        "name": cfg.name,
        "path_column": cfg.path_column,
    }
    if col.id_source != ID_FROM_PATH:  # other ids make another build
        ident["id_source"] = col.id_source
    from retrieval.rerank import stores_patches

    if stores_patches(cfg.model, fingerprint):  # points carry the re-ranker's ViT tokens
        ident["rerank_patches"] = "float16"
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class Target:
    """Where the stages write, and what is there already."""

    cfg: BuildConfig  # the run's config (an incremental run without an active version: rebuild)
    idx: GalleryIndex
    view: IndexView | None = None  # None: a dry run (nothing is written)
    handle: VersionHandle | None = None  # rebuild / resume: the version's own handle
    existing: dict[str, tuple[str, str]] = field(default_factory=dict)  # incremental: id ->
    # (relpath, metadata json) of the active version
    present_ids: list[str] = field(default_factory=list)  # ids already in the version


@contextmanager
def open_target(
    cfg: BuildConfig, enc: Encoder, listing: Listing, report: Report, stages: dict[str, float]
) -> Iterator[Target]:
    """Plan the run (see the module doc) and hold the target version until the caller is done;
    index errors come out as IndexerError. A dry run yields a target without a view, its plan
    in ``report.plan``."""
    from retrieval.index import GalleryIndexError, IndexInUseError, ModelMismatchError, open_index

    t0 = time.perf_counter()
    fields = dict(listing.col.fields)
    try:
        idx = open_index(
            cfg.index,
            cfg.name,
            encoder_fingerprint=enc.fingerprint if cfg.incremental else None,
            preset=enc.preset,
            fields=fields,  # type: ignore[arg-type]
            options=VERIFY_OPTIONS,
        )
    except ModelMismatchError as exc:
        raise IndexerError(
            f"{exc}\nIncremental mode adds to the active version, which was built by another "
            "encoder: run a rebuild (without --incremental)."
        ) from exc
    target = Target(cfg, idx)
    try:
        if cfg.incremental and idx.active_version is None:
            logger.info("index %r has no active version: building the first one", cfg.name)
            report.warnings.append("incremental: no active version, built a new one instead")
            target.cfg = replace(cfg, incremental=False)
            report.mode = "rebuild"
        if target.cfg.incremental:
            _plan_incremental(target, enc, listing, report)
        elif cfg.dry_run:
            current = _active_records(idx) if idx.active_version is not None else {}
            dry_run(target.cfg, listing, current, report, idx.active_version)
        else:
            _plan_rebuild(target, enc, listing, report, fields)
        stages["open_index"] = time.perf_counter() - t0
        yield target
    except IndexInUseError as exc:
        if target.cfg.incremental:
            raise IndexerError(in_use_message(exc, "incremental update refused")) from exc
        raise IndexerError(
            f"{exc}\nAnother process is writing this build's version (an Edge version has one "
            "writer: run shards one after another), or pass --fresh to start a new version."
        ) from exc
    except GalleryIndexError as exc:
        raise IndexerError(f"index error: {exc}") from exc
    finally:
        if target.handle is not None:
            try:
                target.handle.close()
            except Exception:  # keep the original error
                logger.warning("closing version %s failed", target.handle.version, exc_info=True)
        idx.close()


def _plan_incremental(target: Target, enc: Encoder, listing: Listing, report: Report) -> None:
    from retrieval.index import IndexInUseError

    cfg, idx = target.cfg, target.idx
    target.view = idx
    report.version = idx.active_version
    meta = idx.meta
    fields = dict(listing.col.fields)
    if meta is not None and (tuple(meta.shape) != (enc.num_queries, enc.dim)):
        raise IndexerError(
            f"active version {report.version} has tokens {list(meta.shape)}, the model "
            f"gives {[enc.num_queries, enc.dim]}: run a rebuild"
        )
    if meta is not None and fields and fields != meta.fields:
        report.warnings.append(
            f"declared fields {fields} differ from the active version's {meta.fields}: "
            "filters use the version's; run a rebuild to change them"
        )
    try:
        for rec in idx.iter_records():
            rel = str(rec.payload.get("relpath", rec.payload.get("path", "")))
            target.existing[rec.id] = (rel, meta_of(rec.payload))
    except IndexInUseError as exc:
        raise IndexerError(in_use_message(exc, "incremental update refused")) from exc
    target.present_ids = list(target.existing)
    if cfg.dry_run:
        target.view = None
        dry_run(cfg, listing, target.existing, report, report.version)
        return
    # files that vanished from the source: refused before anything is written
    vanished = 0 if cfg.limit is not None else _vanished(target.existing, listing, cfg.shard)
    refusal = delete_refusal(
        len(target.existing),
        vanished,
        cfg.max_shrink,
        report.version,
        f"; {vanished} of their files are gone from {cfg.source}",
    )
    if refusal and not cfg.allow_shrink:
        raise ShrinkRefusedError(refusal)


def _plan_rebuild(
    target: Target, enc: Encoder, listing: Listing, report: Report, fields: dict[str, str]
) -> None:
    from retrieval.index import VersionMeta

    cfg, idx = target.cfg, target.idx
    _, shard_n = parse_shard(cfg.shard)
    if shard_n == 1 and cfg.activate and not cfg.allow_shrink:
        # the version cannot hold more points than the source has items: refuse now
        # rather than after hours of encoding
        before, active = active_count(cfg.index, cfg.name)
        most = sum(1 for it in listing.items if not it.problem)
        refusal = shrink_refusal(
            before,
            most,
            cfg.max_shrink,
            "a new version",
            active,
            f" (the source {cfg.source} has {most} items)",
        )
        if refusal:
            raise ShrinkRefusedError(refusal)
    key = build_key(cfg, listing.col, enc.fingerprint, fields)
    meta_new = VersionMeta(
        enc.fingerprint,
        enc.preset,
        (enc.num_queries, enc.dim),
        fields,  # type: ignore[arg-type]
        {
            "build_key": key,
            "indexer": INDEXER_FORMAT,
            "source": str(cfg.source),
            "source_kind": listing.col.kind,
            "user_ids": listing.col.id_source,  # where the payload's user_id came from
            "shards": shard_n,
        },
    )
    handle, resumed = claim_version(idx, cfg, key, meta_new, shard_n)
    target.handle = target.view = handle
    report.version = handle.version
    if resumed:
        report.mode = "resume"
        target.present_ids = [r.id for r in handle.iter_records()]
        logger.info("resuming %s: %d points already in it", handle.version, len(target.present_ids))


def claim_version(
    idx: GalleryIndex, cfg: BuildConfig, key: str, meta: Any, shard_n: int
) -> tuple[VersionHandle, bool]:
    """The version this run writes into, and whether it already existed (resume)."""
    if cfg.into:
        return idx.open_version(cfg.into), True
    if not cfg.fresh:
        cands = resume_candidates(idx, key)
        if cands:
            return idx.open_version(cands[0].version), True
    handle = idx.create_version(meta)
    if shard_n > 1 and cfg.claim_settle_s > 0:
        # shard runs started together may each have created one: all settle on the oldest
        time.sleep(cfg.claim_settle_s)
        cands = resume_candidates(idx, key)
        if cands and cands[0].version != handle.version:
            mine = handle.version
            handle.close()
            try:
                idx.drop_version(mine)
            except Exception:  # harmless leftover (empty), dropped by a later prune
                logger.info("could not drop empty version %s", mine, exc_info=True)
            return idx.open_version(cands[0].version), True
    return handle, False


def _vanished(existing: dict[str, tuple[str, str]], listing: Listing, shard: str) -> int:
    """Points of the active version (this shard's) whose file is no longer in the source."""
    shard_i, shard_n = parse_shard(shard)
    return sum(
        1
        for rel, _ in existing.values()
        if rel not in listing.all_relpaths and (shard_n == 1 or shard_of(rel, shard_n) == shard_i)
    )


def _active_records(idx: GalleryIndex) -> dict[str, tuple[str, str]] | None:
    """id -> (relpath, metadata json) of the active version; None when another process owns
    its shard (a server): then a dry run cannot compare against it."""
    from retrieval.index import IndexInUseError

    out: dict[str, tuple[str, str]] = {}
    try:
        for rec in idx.iter_records(with_payload={"exclude": ["thumbnail"]}):
            rel = str(rec.payload.get("relpath", rec.payload.get("path", "")))
            out[rec.id] = (rel, meta_of(rec.payload))
    except IndexInUseError as exc:
        logger.warning("dry run: cannot read the active version (%s): no delete/change plan", exc)
        return None
    return out


# --------------------------------------------------------------------------- dry run
def _keep_image(image: Any) -> None:
    """The dry run's preprocessing: the image was decoded (so it would be indexed); no pixels."""
    return None


def _plan_collate(batch: list[tuple[Any, Any]]) -> list[Any]:
    return [d for d, _ in batch]


def dry_run(
    cfg: BuildConfig,
    listing: Listing,
    current: dict[str, tuple[str, str]] | None,
    report: Report,
    active: str | None,
) -> None:
    """``--dry-run``: read, hash and decode every item as the build would (no encoding), compare
    with the version the run would change (incremental: the active one; rebuild: the active one
    it would replace) and put the plan in ``report.plan``. Writes nothing to the index."""
    from torch.utils.data import DataLoader

    items, all_relpaths = listing.items, listing.all_relpaths
    shard_i, shard_n = parse_shard(cfg.shard)
    known = current or {}
    dataset = ImageDataset(items, _keep_image, PresentSet(list(known)), thumbnails=False)
    workers = max(0, int(cfg.workers))
    loader: Any = DataLoader(
        dataset,  # type: ignore[arg-type]
        batch_size=max(1, int(cfg.batch_size)),
        shuffle=False,
        num_workers=workers,
        collate_fn=_plan_collate,
        worker_init_fn=worker_init if workers else None,
    )
    seen: dict[str, str] = {}  # id -> path of its first item
    add = change = unchanged = 0
    lines = ProgressLines(len(items), cfg.progress_every_s, "dry run")
    for batch in loader:
        for d in batch:
            item = items[d.index]
            if d.reason is not None:
                report.skipped.append(
                    {"path": item.path, "reason": d.reason, "detail": d.detail[:300]}
                )
                continue
            assert d.id is not None
            if d.id in seen:
                note_duplicate(report, item.path, seen[d.id])
                continue
            seen[d.id] = item.path
            old = known.get(d.id)
            if old is None:
                add += 1
            elif (old[0] != item.relpath and old[0] not in all_relpaths) or old[1] != meta_of_item(
                item
            ):
                change += 1
            else:
                unchanged += 1
        lines.update(len(batch))
    lines.close()
    delete: int | None = None
    if current is not None:
        gone = [
            rel
            for i, (rel, _) in current.items()
            if i not in seen and (shard_n == 1 or shard_of(rel, shard_n) == shard_i)
        ]
        delete = 0 if cfg.limit is not None and cfg.incremental else len(gone)
    before = None if current is None else len(current)
    if cfg.incremental:
        after = None if before is None or delete is None else before - delete + add
        refusal = (
            None
            if cfg.allow_shrink or before is None or delete is None
            else delete_refusal(before, delete, cfg.max_shrink, active)
        )
    else:
        after = len(seen)
        if current is None:
            before, _ = active_count(cfg.index, cfg.name)
        refusal = (
            None
            if cfg.allow_shrink or shard_n > 1 or not cfg.activate
            else shrink_refusal(before, after, cfg.max_shrink, "the new version", active)
        )
    report.total = len(items)
    report.plan = {
        "add": add,
        "change": change,
        "delete": delete,
        "skip": len(report.skipped) + report.duplicates,
        "unchanged": unchanged,
        "encode": add if cfg.incremental else len(seen),
        "count_before": before,
        "count_after": after,
        "active_version": active,
    }
    report.refused = refusal
