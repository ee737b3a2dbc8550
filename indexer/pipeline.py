"""The batch indexing pipeline: reader -> decode/preprocess (DataLoader workers) -> encoder ->
writer (batched upserts on a bounded queue), then verify and activate.

Exactly once: a point's id is uuid5 of the sha256 of the file's bytes, so re-writing an image is
idempotent. A rebuild writes into a new version whose metadata carries a ``build_key`` (source,
encoder, fields, name); a later run with the same key finds that unfinished version again, skips
the ids already in it and finishes it. Nothing is activated before it is verified.

Safe by default: a version that is empty, or that would shrink the active one by more than
``max_shrink``, is not activated; an incremental run does not delete more than that fraction of
the active version (both unless ``allow_shrink``); ``dry_run`` computes the plan and writes
nothing; random-weight presets are refused unless ``allow_untrained``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import queue
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from indexer.decode import DecodedBatch, ImageDataset, PresentSet, collate, worker_init
from indexer.report import Report, write_json_atomic
from indexer.sources import (
    ID_FROM_PATH,
    RESERVED_KEYS,
    Collection,
    parse_shard,
    read_source,
    select_shard,
    shard_of,
)
from indexer.store import open_version, resume_candidates, sample_ids, scroll, verify_view
from retrieval.index.api import USER_ID_KEY
from retrieval.index.common import CALIBRATION_KEY
from retrieval.model_source import DEFAULT_MODEL, check_trained

if TYPE_CHECKING:
    from retrieval.encoder import Encoder
    from retrieval.index import GalleryIndex, IndexView, VersionHandle

logger = logging.getLogger(__name__)

INDEXER_FORMAT = 1  # recorded in version metadata (extra.indexer)
#: ``VersionMeta.extra`` key of a version's point count, recorded by every build that knows it:
#: the count of a version a server owns (its Edge shard is locked) is known without opening it.
COUNT_KEY = "count"
#: Report lists of named files (duplicates, ignored files) keep at most this many entries.
REPORT_LIST_LIMIT = 1000
#: This process only searches to verify: rescore many int8 candidates exactly, so that models
#: whose images get nearly identical tokens (random weights) still find themselves at rank 1.
VERIFY_OPTIONS = {"oversampling": 64.0}


class IndexerError(RuntimeError):
    """A run that cannot proceed (bad arguments, index in use, verification failed)."""


class ShrinkRefusedError(IndexerError):
    """The run would empty or shrink the active version beyond ``max_shrink`` (nothing written)."""


@dataclass
class BuildConfig:
    """Options of ``cir index build`` (see docs/indexer.md)."""

    source: Path  # folder of images, or a manifest (jsonl/csv/parquet)
    index: str  # index URI: edge:PATH, local:PATH, qdrant:URL
    name: str = "gallery"  # index name
    model: str = DEFAULT_MODEL  # checkpoint folder (default: the committed demo model) or preset
    allow_untrained: bool = False  # accept a preset name (random weights)
    manifest_format: str = "auto"  # auto | jsonl | csv | parquet
    path_column: str = "path"  # manifest column holding the image path/URI
    id_column: str | None = None  # manifest column of the user's ids (None: `id` if present)
    fields: dict[str, str] = field(default_factory=dict)  # declared filterable fields -> type
    batch_size: int = 64  # images per encoder batch
    workers: int = 2  # DataLoader worker processes (0: decode in the main process)
    device: str = "auto"  # cpu | cuda | auto
    dtype: str = "auto"  # float32 | bfloat16 | auto (bf16 autocast on CUDA, fp32 on CPU)
    num_threads: int | None = None  # torch intra-op threads for the encoder (None: torch default)
    shard: str = "0/1"  # i/n: this run takes the items whose relpath hashes to i mod n
    incremental: bool = False  # add new/changed, delete vanished, into the active version
    allow_shrink: bool = False  # activate an empty/much smaller version, delete > max_shrink
    max_shrink: float = 0.5  # largest fraction of the active version's points a run may drop
    dry_run: bool = False  # compute the plan (add/change/delete/skip), write nothing
    activate: bool = True  # activate the new version once verified (never for n > 1 shards)
    verify: bool = True  # run the verification (count + self-retrieval sample)
    verify_sample: int = 32  # images queried by their own tokens during verification
    calibrate: bool = True  # measure this version's fast-mode L (retrieval.index.calibrate)
    calibrate_min_points: int = 5000  # smaller galleries search `exact` anyway: skip
    calibrate_queries: str | None = None  # .npy of real query vectors [M, D] to calibrate on
    # (e.g. a query log saved from EncodeQuery, the server's traffic reservoir); None: composed
    # queries the model makes here (gallery references + captions)
    calibration_captions: str | None = None  # one caption per line (else the model's training
    # captions when its folder names them, else CALIBRATION_TEXTS)
    calibration_queries: int = 400  # composed queries (half fit L, half held out)
    limit: int | None = None  # only the first N items (after sharding); for trials
    fresh: bool = False  # never resume: always start a new version
    build_id: str | None = None  # resume key override (several machines with different mounts)
    into: str | None = None  # write into this existing version (e.g. pre-created for shards)
    progress: bool = True  # tqdm progress bar on stderr
    progress_every_s: float = 0.0  # > 0: a plain progress line on stderr every N s (no TTY)
    progress_file: Path | None = None  # JSON {written, processed, total, version} after each write
    flush_every: int = 8  # flush (durable) every N written batches
    write_queue: int = 4  # batches buffered between encoder and writer (backpressure)
    claim_settle_s: float = 1.0  # sharded runs: wait before agreeing on the shared version
    thumbnails: bool = True  # store a base64 JPEG thumbnail in the payload


# --------------------------------------------------------------------------- writer
class _Writer:
    """Upserts batches on a thread; ``put`` blocks while ``maxsize`` batches wait (backpressure)."""

    def __init__(
        self,
        view: IndexView,
        maxsize: int,
        flush_every: int,
        on_written: Callable[[int], None] | None = None,
    ) -> None:
        self.view = view
        self.q: queue.Queue[Any] = queue.Queue(maxsize=max(1, maxsize))
        self.flush_every = max(1, flush_every)
        self.on_written = on_written
        self.error: BaseException | None = None
        self.written = 0
        self.busy_s = 0.0
        self.blocked_s = 0.0
        self._batches = 0
        self._thread = threading.Thread(target=self._run, name="indexer-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            job = self.q.get()
            if job is None:
                return
            if self.error is not None:
                continue  # drain so the producer never blocks forever
            ids, tokens, payloads = job
            t0 = time.perf_counter()
            try:
                self.view.upsert(ids, tokens, payloads)
                self._batches += 1
                if self._batches % self.flush_every == 0:
                    self.view.flush()
                self.written += len(ids)
                if self.on_written is not None:
                    self.on_written(self.written)
            except BaseException as exc:  # surfaced to the main thread by put()/close()
                self.error = exc
            finally:
                self.busy_s += time.perf_counter() - t0

    def _check(self) -> None:
        if self.error is not None:
            raise self.error

    def put(self, ids: list[str], tokens: np.ndarray, payloads: list[dict[str, Any]]) -> None:
        t0 = time.perf_counter()
        while True:
            self._check()
            try:
                self.q.put((ids, tokens, payloads), timeout=0.5)
                break
            except queue.Full:
                continue
        self.blocked_s += time.perf_counter() - t0

    def close(self) -> None:
        """Drain, flush, stop; re-raise a write error. Idempotent."""
        while self._thread.is_alive():
            try:
                self.q.put(None, timeout=0.5)
                break
            except queue.Full:
                continue
        self._thread.join()
        self._check()
        t0 = time.perf_counter()
        self.view.flush()
        self.busy_s += time.perf_counter() - t0


# --------------------------------------------------------------------------- helpers
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


def _meta_of(payload: dict[str, Any]) -> str:
    """The part of a payload an incremental run compares: metadata and the user's id."""
    return json.dumps(
        {k: v for k, v in payload.items() if k not in RESERVED_KEYS or k == USER_ID_KEY},
        sort_keys=True,
        default=str,
    )


def _meta_of_item(item: Any) -> str:
    """``_meta_of`` of the payload ``item`` would get."""
    return _meta_of({**item.meta, USER_ID_KEY: item.user_id})


def _progress_bar(total: int, enabled: bool) -> Any:
    from tqdm import tqdm

    return tqdm(
        total=total,
        unit="img",
        dynamic_ncols=True,
        smoothing=0.1,
        disable=not enabled,
        file=sys.stderr,
        desc="indexing",
    )


def load_encoder_check(cfg: BuildConfig) -> None:
    """IndexerError when ``cfg.model`` is a random-weight preset and that is not allowed."""
    from retrieval.model_source import UntrainedModelError

    try:
        check_trained(cfg.model, cfg.allow_untrained, "cir index build")
    except UntrainedModelError as exc:
        raise IndexerError(str(exc)) from exc


def load_encoder(cfg: BuildConfig) -> Encoder:
    from retrieval import Encoder

    load_encoder_check(cfg)  # before loading it
    try:
        return Encoder.from_pretrained(
            cfg.model, device=cfg.device, dtype=cfg.dtype, num_threads=cfg.num_threads
        )
    except (FileNotFoundError, ValueError, KeyError) as exc:
        raise IndexerError(f"cannot load model {cfg.model!r}: {exc}") from exc


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


def _in_use_message(exc: BaseException, what: str) -> str:
    return (
        f"{what}: {exc}\nThe Edge index has one owner at a time. Incremental writes go into the "
        "version a server is serving; stop the server, or run a rebuild instead (without "
        "--incremental): it builds a new version and the server switches to it once activated."
    )


# --------------------------------------------------------------------------- the build
def build(cfg: BuildConfig, encoder: Encoder | None = None) -> Report:
    """Run one ``cir index build``; returns the report (also on verification failure)."""
    from retrieval.index import (
        GalleryIndexError,
        IndexInUseError,
        ModelMismatchError,
        VersionMeta,
        open_index,
    )

    t_start = time.perf_counter()
    stages: dict[str, float] = {}
    shard_i, shard_n = parse_shard(cfg.shard)
    report = Report(
        index=cfg.index,
        name=cfg.name,
        shard=f"{shard_i}/{shard_n}",
        source=str(cfg.source),
        mode="incremental" if cfg.incremental else "rebuild",
    )

    if encoder is None:  # a refused model fails before the source is read
        load_encoder_check(cfg)
    # read the calibration queries first: a bad file fails before hours of encoding
    calib_q = None if cfg.calibrate_queries is None else load_query_vectors(cfg.calibrate_queries)
    captions = None if cfg.calibration_captions is None else read_captions(cfg.calibration_captions)

    # ---- reader
    t0 = time.perf_counter()
    col = read_source(cfg.source, cfg.manifest_format, cfg.path_column, cfg.fields, cfg.id_column)
    all_relpaths = {it.relpath for it in col.items}
    items = select_shard(col.items, shard_i, shard_n)
    if cfg.limit is not None:
        items = items[: max(0, cfg.limit)]
    report.total = len(items)
    report.ignored_files = col.ignored
    report.ignored_paths = col.ignored_paths[:REPORT_LIST_LIMIT]
    report.warnings.extend(col.warnings[:1000])
    stages["read"] = time.perf_counter() - t0
    logger.info(
        "%s: %d items (shard %d/%d, %d in the collection)",
        cfg.source,
        len(items),
        shard_i,
        shard_n,
        len(col.items),
    )

    # ---- encoder
    t0 = time.perf_counter()
    enc = encoder if encoder is not None else load_encoder(cfg)
    stages["load_model"] = time.perf_counter() - t0
    if getattr(enc, "untrained", False) and not cfg.allow_untrained:
        raise IndexerError(
            f"cir index build: the encoder has RANDOM weights ({enc.source}): its index would "
            "mean nothing. Use a trained checkpoint folder, or allow_untrained=True."
        )
    report.preset, report.encoder_fingerprint = enc.preset, enc.fingerprint
    report.model = getattr(enc, "source", str(cfg.model))
    report.untrained = bool(getattr(enc, "untrained", False))
    report.dry_run = cfg.dry_run
    if calib_q is not None and calib_q.shape[1] != enc.dim:
        raise IndexerError(
            f"calibration queries {cfg.calibrate_queries} are {calib_q.shape[1]}-d; "
            f"the model {cfg.model!r} makes {enc.dim}-d queries"
        )
    report.device, report.dtype = str(enc.device), str(enc.dtype).replace("torch.", "")
    fields = dict(col.fields)

    # ---- index: pick the target view
    t0 = time.perf_counter()
    idx: GalleryIndex | None = None
    handle: VersionHandle | None = None
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
    try:
        existing: dict[str, tuple[str, str]] = {}  # id -> (relpath, metadata json)
        present_ids: list[str] = []
        key = build_key(cfg, col, enc.fingerprint, fields)
        if cfg.incremental and idx.active_version is None:
            logger.info("index %r has no active version: building the first one", cfg.name)
            report.warnings.append("incremental: no active version, built a new one instead")
            cfg = _replace(cfg, incremental=False)
            report.mode = "rebuild"
        if cfg.incremental:
            view: IndexView = idx
            report.version = idx.active_version
            meta = idx.meta
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
                for rec in scroll(idx):
                    rel = str(rec.payload.get("relpath", rec.payload.get("path", "")))
                    existing[rec.id] = (rel, _meta_of(rec.payload))
            except IndexInUseError as exc:
                raise IndexerError(_in_use_message(exc, "incremental update refused")) from exc
            present_ids = list(existing)
            if cfg.dry_run:
                _dry_run(cfg, enc, items, existing, all_relpaths, report, report.version)
                report.seconds, report.stage_seconds = time.perf_counter() - t_start, stages
                return report
            # files that vanished from the source: refused before anything is written
            vanished = 0 if cfg.limit is not None else _vanished(existing, all_relpaths, cfg.shard)
            refusal = delete_refusal(
                len(existing),
                vanished,
                cfg.max_shrink,
                report.version,
                f"; {vanished} of their files are gone from {cfg.source}",
            )
            if refusal and not cfg.allow_shrink:
                raise ShrinkRefusedError(refusal)
        elif cfg.dry_run:
            current = _active_records(idx) if idx.active_version is not None else {}
            _dry_run(cfg, enc, items, current, all_relpaths, report, idx.active_version)
            report.seconds, report.stage_seconds = time.perf_counter() - t_start, stages
            return report
        else:
            if shard_n == 1 and cfg.activate and not cfg.allow_shrink:
                # the version cannot hold more points than the source has items: refuse now
                # rather than after hours of encoding
                before, active = active_count(cfg.index, cfg.name)
                most = sum(1 for it in items if not it.problem)
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
            meta_new = VersionMeta(
                enc.fingerprint,
                enc.preset,
                (enc.num_queries, enc.dim),
                fields,  # type: ignore[arg-type]
                {
                    "build_key": key,
                    "indexer": INDEXER_FORMAT,
                    "source": str(cfg.source),
                    "source_kind": col.kind,
                    "user_ids": col.id_source,  # where the payload's user_id came from
                    "shards": shard_n,
                },
            )
            handle, resumed = _claim_version(idx, cfg, key, meta_new, shard_n)
            view = handle
            report.version = handle.version
            if resumed:
                report.mode = "resume"
                present_ids = [r.id for r in scroll(handle)]
                logger.info(
                    "resuming %s: %d points already in it", handle.version, len(present_ids)
                )
        stages["open_index"] = time.perf_counter() - t0

        # ---- the pipeline
        processed = _run_pipeline(
            cfg, enc, items, view, PresentSet(present_ids), existing, all_relpaths, report, stages
        )
        seen: set[str] = processed["seen"]
        present_set = set(present_ids)

        # ---- deletions: incremental (vanished / changed) and a resumed build's stale points
        t0 = time.perf_counter()
        kept_stale = 0  # incremental: points to delete that the shrink guard kept
        if cfg.limit is None:
            in_scope = present_set - seen
            if shard_n > 1:
                rel_of = {i: existing[i][0] for i in in_scope if i in existing}
                in_scope = {i for i in in_scope if shard_of(rel_of.get(i, ""), shard_n) == shard_i}
            refusal = None
            if in_scope and cfg.incremental and not cfg.allow_shrink:
                refusal = delete_refusal(
                    len(present_set), len(in_scope), cfg.max_shrink, report.version
                )
            if refusal:
                report.refused = f"{refusal} Nothing was deleted; {report.indexed} added."
                kept_stale = len(in_scope)
            elif in_scope and (cfg.incremental or shard_n == 1):
                stale = sorted(in_scope)
                for s in range(0, len(stale), 1000):
                    view.delete(stale[s : s + 1000])
                view.flush()
                report.deleted = len(stale)
        elif cfg.incremental:
            report.warnings.append("--limit: vanished images were not deleted")
        stages["delete"] = time.perf_counter() - t0

        # ---- finalize, verify, activate
        # a count check needs the whole collection in this run (no other shards, no --limit
        # on top of earlier content)
        whole = shard_n == 1 and (cfg.limit is None or report.mode == "rebuild")
        expected = len(seen) + kept_stale if whole else None
        sample = sample_ids(sorted(processed["written_ids"]) or sorted(seen), cfg.verify_sample)
        if cfg.incremental:
            t0 = time.perf_counter()
            report.count = idx.count()
            if cfg.verify:
                report.verification = verify_view(idx, sample, expected)
                report.verified = bool(report.verification["ok"])
            if report.version is not None:
                idx.update_version_meta(report.version, {COUNT_KEY: report.count})
            stages["verify"] = time.perf_counter() - t0
        else:
            assert handle is not None
            version = handle.version
            t0 = time.perf_counter()
            handle.close()  # Edge: builds the indexes, releases the lock
            handle = None
            stages["finalize"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            check = open_version(idx, version)
            try:
                report.count = check.count()
                if cfg.verify:
                    report.verification = verify_view(check, sample, expected)
                    report.verified = bool(report.verification["ok"])
            finally:
                check.close()
            idx.update_version_meta(version, {COUNT_KEY: report.count})
            stages["verify"] = time.perf_counter() - t0
            if cfg.calibrate and whole and report.count >= cfg.calibrate_min_points:
                t0 = time.perf_counter()
                qv, source = calib_q, "queries"
                info: dict[str, Any] = {}
                if qv is None:  # the model's own composed queries on this gallery
                    qv, info = composed_queries(enc, items, cfg, captions)
                    source = "composed"
                report.calibration = calibrate_version(
                    idx, version, query_vectors=qv, source=source if qv is not None else None
                )
                report.calibration.update(info)
                idx.update_version_meta(version, {CALIBRATION_KEY: report.calibration})
                stages["calibrate"] = time.perf_counter() - t0
            if shard_n > 1:
                if cfg.activate:
                    report.warnings.append(
                        f"shard {shard_i}/{shard_n}: not activated (a shard is part of a build); "
                        f"after every shard finished: cir index activate {version}"
                    )
            elif cfg.activate and report.verified:
                refusal = None
                if not cfg.allow_shrink:
                    before, active = active_count(cfg.index, cfg.name)
                    refusal = shrink_refusal(
                        before, report.count, cfg.max_shrink, f"version {version}", active
                    )
                if refusal:
                    report.refused = (
                        f"{refusal} {version} is kept, not active (`cir index activate "
                        f"{version} --allow-shrink` to activate it anyway)."
                    )
                else:
                    t0 = time.perf_counter()
                    idx.activate(version)
                    report.activated = True
                    stages["activate"] = time.perf_counter() - t0
            elif cfg.activate and report.verified is False:
                report.warnings.append(
                    f"version {version} failed verification and was NOT activated: "
                    f"{_verify_summary(report.verification)}"
                )
    except IndexInUseError as exc:
        if cfg.incremental:
            raise IndexerError(_in_use_message(exc, "incremental update refused")) from exc
        raise IndexerError(
            f"{exc}\nAnother process is writing this build's version (an Edge version has one "
            "writer: run shards one after another), or pass --fresh to start a new version."
        ) from exc
    except GalleryIndexError as exc:
        raise IndexerError(f"index error: {exc}") from exc
    finally:
        if handle is not None:
            try:
                handle.close()
            except Exception:  # keep the original error
                logger.warning("closing version %s failed", handle.version, exc_info=True)
        if idx is not None:
            idx.close()
    report.seconds = time.perf_counter() - t_start
    report.stage_seconds = stages
    return report


def _vanished(existing: dict[str, tuple[str, str]], all_relpaths: set[str], shard: str) -> int:
    """Points of the active version (this shard's) whose file is no longer in the source."""
    shard_i, shard_n = parse_shard(shard)
    return sum(
        1
        for rel, _ in existing.values()
        if rel not in all_relpaths and (shard_n == 1 or shard_of(rel, shard_n) == shard_i)
    )


def _active_records(idx: GalleryIndex) -> dict[str, tuple[str, str]] | None:
    """id -> (relpath, metadata json) of the active version; None when another process owns
    its shard (a server): then a dry run cannot compare against it."""
    from retrieval.index import IndexInUseError

    out: dict[str, tuple[str, str]] = {}
    try:
        for rec in scroll(idx, with_payload={"exclude": ["thumbnail"]}):
            rel = str(rec.payload.get("relpath", rec.payload.get("path", "")))
            out[rec.id] = (rel, _meta_of(rec.payload))
    except IndexInUseError as exc:
        logger.warning("dry run: cannot read the active version (%s): no delete/change plan", exc)
        return None
    return out


def _keep_image(image: Any) -> None:
    """The dry run's preprocessing: the image was decoded (so it would be indexed); no pixels."""
    return None


def _plan_collate(batch: list[tuple[Any, Any]]) -> list[Any]:
    return [d for d, _ in batch]


def _dry_run(
    cfg: BuildConfig,
    enc: Encoder,
    items: list[Any],
    current: dict[str, tuple[str, str]] | None,
    all_relpaths: set[str],
    report: Report,
    active: str | None,
) -> None:
    """``--dry-run``: read, hash and decode every item as the build would (no encoding), compare
    with the version the run would change (incremental: the active one; rebuild: the active one
    it would replace) and put the plan in ``report.plan``. Writes nothing to the index."""
    from torch.utils.data import DataLoader

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
    lines = _ProgressLines(len(items), cfg.progress_every_s, "dry run")
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
                _note_duplicate(report, item.path, seen[d.id])
                continue
            seen[d.id] = item.path
            old = known.get(d.id)
            if old is None:
                add += 1
            elif (old[0] != item.relpath and old[0] not in all_relpaths) or old[1] != _meta_of_item(
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


def _note_duplicate(report: Report, path: str, first: str) -> None:
    report.duplicates += 1
    if len(report.duplicate_files) < REPORT_LIST_LIMIT:
        report.duplicate_files.append({"path": path, "same_as": first})


class _ProgressLines:
    """Plain progress lines on stderr every ``every_s`` seconds (for logs, where a tqdm bar
    would be one endless line): done/total, percent, rate and time left."""

    def __init__(self, total: int, every_s: float, what: str = "indexing") -> None:
        self.total, self.every_s, self.what = total, every_s, what
        self.done = 0
        self.t0 = self.last = time.monotonic()

    def update(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if self.every_s > 0 and now - self.last >= self.every_s:
            self.last = now
            self._line(now)

    def _line(self, now: float, final: bool = False) -> None:
        dt = max(now - self.t0, 1e-9)
        rate = self.done / dt
        pct = 100.0 * self.done / self.total if self.total else 100.0
        left = (self.total - self.done) / rate if rate > 0 else float("inf")
        tail = f"done in {dt:.0f} s" if final else f"{left:.0f} s left"
        sys.stderr.write(
            f"{self.what}: {self.done}/{self.total} ({pct:.1f}%), {rate:.1f} images/s, {tail}\n"
        )
        sys.stderr.flush()

    def close(self) -> None:
        if self.every_s > 0:
            self._line(time.monotonic(), final=True)


def _verify_summary(v: dict[str, Any] | None) -> str:
    if not v:
        return "not run"
    return (
        f"count {v['count']} (expected {v['expected_count']}), "
        f"{v['found_rank1']}/{v['sampled']} sampled images found at rank 1, {v['missing']} missing"
    )


def _replace(cfg: BuildConfig, **kw: Any) -> BuildConfig:
    from dataclasses import replace

    return replace(cfg, **kw)


def _claim_version(
    idx: GalleryIndex, cfg: BuildConfig, key: str, meta: Any, shard_n: int
) -> tuple[VersionHandle, bool]:
    """The version this run writes into, and whether it already existed (resume)."""
    if cfg.into:
        return open_version(idx, cfg.into), True
    if not cfg.fresh:
        cands = resume_candidates(idx, key)
        if cands:
            return open_version(idx, cands[0].version), True
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
            return open_version(idx, cands[0].version), True
    return handle, False


def _batches(loader: Any) -> Iterator[tuple[DecodedBatch, float]]:
    """Yield batches with the time the main thread waited for each."""
    it = iter(loader)
    while True:
        t0 = time.perf_counter()
        try:
            batch = next(it)
        except StopIteration:
            return
        yield batch, time.perf_counter() - t0


def _run_pipeline(
    cfg: BuildConfig,
    enc: Encoder,
    items: list[Any],
    view: IndexView,
    present: PresentSet,
    existing: dict[str, tuple[str, str]],
    all_relpaths: set[str],
    report: Report,
    stages: dict[str, float],
) -> dict[str, Any]:
    import torch
    from torch.utils.data import DataLoader

    t_pipe = time.perf_counter()
    from retrieval.rerank import stores_patches

    # the model folder's re-ranker reads candidates' ViT tokens: store them with each point
    store_patches = stores_patches(cfg.model, enc.fingerprint)
    dataset = ImageDataset(items, enc.preprocessor, present, thumbnails=cfg.thumbnails)
    workers = max(0, int(cfg.workers))
    loader: Any = DataLoader(
        dataset,  # type: ignore[arg-type]
        batch_size=max(1, int(cfg.batch_size)),
        shuffle=False,  # in-order: the first of duplicate contents wins, deterministically
        num_workers=workers,
        collate_fn=collate,
        worker_init_fn=worker_init if workers else None,
        prefetch_factor=4 if workers else None,
        pin_memory=enc.device.type == "cuda",
        persistent_workers=False,
    )
    progress_file = cfg.progress_file
    state = {"processed": 0}

    def on_written(n: int) -> None:
        if progress_file is not None:
            write_json_atomic(
                Path(progress_file),
                {
                    "written": n,
                    "processed": state["processed"],
                    "total": len(items),
                    "version": report.version,
                    "pid": os.getpid(),
                },
            )

    writer = _Writer(view, cfg.write_queue, cfg.flush_every, on_written)
    seen: dict[str, int] = {}  # id -> position of the first item with that content
    written_ids: list[str] = []
    updates: list[tuple[str, Any]] = []  # incremental: (id, item) whose path/metadata changed
    worker_s = {"read": 0.0, "decode": 0.0, "preprocess": 0.0}
    wait_s = encode_s = 0.0
    bar = _progress_bar(len(items), cfg.progress)
    lines = _ProgressLines(len(items), 0.0 if cfg.progress else cfg.progress_every_s)
    try:
        for batch, waited in _batches(loader):
            wait_s += waited
            rows: list[int] = []  # rows of batch.pixels to encode
            new: list[Any] = []
            for pos, d in enumerate(batch.items):
                for k, v in d.seconds.items():
                    worker_s[k] = worker_s.get(k, 0.0) + v
                item = items[d.index]
                if d.reason is not None:
                    report.skipped.append(
                        {"path": item.path, "reason": d.reason, "detail": d.detail[:300]}
                    )
                    continue
                assert d.id is not None
                if d.id in seen:
                    _note_duplicate(report, item.path, items[seen[d.id]].path)
                    continue
                seen[d.id] = d.index
                if d.present:
                    report.already_present += 1
                    old = existing.get(d.id)
                    if old is not None and (
                        (old[0] != item.relpath and old[0] not in all_relpaths)
                        or old[1] != _meta_of_item(item)
                    ):
                        updates.append((d.id, item))
                    continue
                rows.append(batch.usable.index(pos))
                new.append(d)
            if new:
                t0 = time.perf_counter()
                px = batch.pixels if len(rows) == batch.pixels.shape[0] else batch.pixels[rows]
                tokens, ok = _encode(enc, px, new, report, patches=store_patches)
                encode_s += time.perf_counter() - t0
                good = [d for d, k in zip(new, ok, strict=True) if k]
                if good:
                    ids = [d.id for d in good]
                    writer.put(ids, tokens[np.asarray(ok)], [d.payload for d in good])
                    written_ids.extend(ids)
            state["processed"] += len(batch.items)
            bar.update(len(batch.items))
            lines.update(len(batch.items))
        writer.close()
    except BaseException:
        # keep what was encoded (valid, and it makes the resume shorter), then re-raise
        with contextlib.suppress(BaseException):
            writer.close()
        raise
    finally:
        bar.close()
        lines.close()
        del loader
    if updates:
        _apply_updates(view, updates, report)
        view.flush()
    del torch  # imported for DataLoader's side effects only
    report.indexed = writer.written
    total_s = time.perf_counter() - t_pipe
    stages["decode_wait"] = wait_s
    stages.update({f"worker_{k}": v for k, v in worker_s.items()})
    stages["encode"] = encode_s
    stages["write"] = writer.busy_s
    stages["write_backpressure"] = writer.blocked_s
    stages["pipeline"] = total_s
    done = report.indexed + report.already_present + report.duplicates + len(report.skipped)
    report.images_per_s = done / total_s if total_s > 0 else 0.0
    return {"seen": set(seen), "written_ids": written_ids}


def _encode(
    enc: Encoder, pixels: Any, new: list[Any], report: Report, patches: bool = False
) -> tuple[np.ndarray, list[bool]]:
    """Encode a batch; if the batch fails, retry per image so one bad tensor skips one image.
    ``patches``: also store each image's ViT tokens in its payload (a "patches" re-ranker
    reads them of every candidate; computed in the same ViT pass)."""
    from retrieval.rerank import PATCHES_KEY, encode_patches

    def run(px: Any, items: list[Any]) -> np.ndarray:
        if not patches:
            return enc.encode_target_pixels(px)
        tokens, vit = enc.encode_target_pixels_and_patches(px)
        for d, t in zip(items, vit, strict=True):
            d.payload[PATCHES_KEY] = encode_patches(t)
        return tokens

    try:
        tokens = run(pixels, new)
    except Exception as exc:
        logger.warning("batch encode failed (%s); retrying one by one", exc)
        parts = []
        for i in range(len(new)):
            try:
                parts.append(run(pixels[i : i + 1], new[i : i + 1])[0])
            except Exception as exc1:
                parts.append(np.full((enc.num_queries, enc.dim), np.nan, np.float32))
                new[i].detail = f"{type(exc1).__name__}: {exc1}"
        tokens = np.stack(parts)
    ok = np.isfinite(tokens).all(axis=(1, 2)).tolist()
    for d, k in zip(new, ok, strict=True):
        if not k:
            reason = "encode-error" if d.detail else "non-finite-embedding"
            report.skipped.append(
                {"path": d.payload.get("path", ""), "reason": reason, "detail": d.detail}
            )
    return tokens, ok


def _apply_updates(view: IndexView, updates: list[tuple[str, Any]], report: Report) -> None:
    """Incremental: same content under a new path, or new metadata: rewrite the payload."""
    for s in range(0, len(updates), 256):
        chunk = dict(updates[s : s + 256])
        recs = view.get(list(chunk), with_vectors=True)
        ids: list[str] = []
        toks: list[np.ndarray] = []
        pls: list[dict[str, Any]] = []
        for r in recs:
            item = chunk[r.id]
            payload = {k: v for k, v in r.payload.items() if k in RESERVED_KEYS}
            payload.update(path=item.path, relpath=item.relpath, user_id=item.user_id, **item.meta)
            if r.tokens is None:
                continue
            ids.append(r.id)
            toks.append(r.tokens)
            pls.append(payload)
        if ids:
            view.upsert(ids, np.stack(toks), pls)
            report.moved += len(ids)


# --------------------------------------------------------------------------- admin helpers
def load_query_vectors(path: str | Path) -> np.ndarray:
    """Real query vectors [M, D] from a .npy file, or IndexerError saying what is wrong."""
    try:
        qv = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise IndexerError(f"cannot read query vectors {path}: {exc}") from exc
    if qv.ndim != 2 or qv.shape[0] == 0 or not np.issubdtype(qv.dtype, np.number):
        raise IndexerError(
            f"query vectors {path} must be a non-empty numeric [M, D] array, got "
            f"{qv.dtype} {qv.shape}"
        )
    qv = qv.astype(np.float32)
    if not np.all(np.isfinite(qv)) or np.any(np.linalg.norm(qv, axis=1) == 0):
        raise IndexerError(f"query vectors {path} must be finite and non-zero")
    return qv


#: Generic modification texts for composed calibration queries when neither an operator file
#: nor the model's training captions are at hand: edits of colour, size, position, count and
#: style, the kinds of change composed queries ask for.
CALIBRATION_TEXTS: tuple[str, ...] = (
    "make it red",
    "change the colour to blue",
    "the same but green",
    "make it yellow",
    "in black instead",
    "in white",
    "make it purple",
    "turn it orange",
    "make it bigger",
    "make it smaller",
    "the same but larger",
    "a smaller version",
    "move it to the left",
    "move it to the right",
    "put it at the top",
    "put it at the bottom",
    "move it to the middle",
    "add another one next to it",
    "add a small object on the left",
    "add a big object on the right",
    "remove the object in the middle",
    "remove one of them",
    "only keep the largest one",
    "two of them instead of one",
    "make it darker",
    "make it lighter",
    "brighter colours",
    "with a different shape",
    "make it round",
    "make it square",
    "the same with stripes",
    "without the pattern",
    "the same but plain",
    "swap the colours",
    "rotate it",
    "upside down",
    "closer to the camera",
    "further away",
    "on a plain background",
    "the same thing in a different colour",
)


def read_captions(path: str | Path) -> list[str]:
    """Calibration captions, one per line (blank lines skipped), or IndexerError."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise IndexerError(f"cannot read calibration captions {path}: {exc}") from exc
    caps = [line.strip() for line in text.splitlines() if line.strip()]
    if not caps:
        raise IndexerError(f"calibration captions {path} holds no caption (one per line)")
    return caps


def training_captions(model: str | Path, limit: int = 20_000) -> tuple[list[str], str] | None:
    """The captions of the triplets the model was trained on, when its folder names them
    (``card.json``: ``training.config.data``, a folder with ``train.jsonl``); None when the
    folder names none or the data is not on this machine (not an error)."""
    from retrieval.model_source import resolve_model

    folder = Path(resolve_model(model))
    try:
        card = json.loads((folder / "card.json").read_text())
        data = card["training"]["config"]["data"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not isinstance(data, str) or not data:
        return None
    # relative to here, else to the folder holding `models/` (the repository's root)
    rel = Path(data)
    bases = [Path("/")] if rel.is_absolute() else [Path.cwd(), folder.parent.parent, folder.parent]
    train = next(
        (b / rel / "train.jsonl" for b in bases if (b / rel / "train.jsonl").is_file()), None
    )
    if train is None:
        logger.info("the model's training data %s is not here: generic calibration texts", data)
        return None
    caps: list[str] = []
    with open(train, encoding="utf-8") as f:
        for line in f:
            try:
                cap = json.loads(line).get("caption")
            except (ValueError, AttributeError):
                continue
            if isinstance(cap, str) and cap.strip():
                caps.append(cap.strip())
            if len(caps) >= limit:
                break
    return (caps, f"training triplets {train}") if caps else None


def composed_queries(
    enc: Any, items: list[Any], cfg: BuildConfig, captions: list[str] | None, seed: int = 0
) -> tuple[np.ndarray | None, dict[str, Any]]:
    """Composed queries the model makes for calibration: ``cfg.calibration_queries`` gallery
    images drawn reproducibly as references, each with a caption drawn from ``captions`` (an
    operator file), else the model's training captions, else :data:`CALIBRATION_TEXTS`;
    encoded with the build's encoder. ``(None, info)`` when no reference could be read."""
    from retrieval.imageio import ImageDecodeError, decode_image

    if captions is not None:
        what = f"file {cfg.calibration_captions}"
    else:
        found = training_captions(cfg.model)
        captions, what = found if found else (list(CALIBRATION_TEXTS), "built-in texts")
    rng = np.random.default_rng(seed)
    want = max(1, int(cfg.calibration_queries))
    refs: list[Any] = []
    for i in rng.permutation(len(items))[: 3 * want]:  # a few unreadable files are skipped
        item = items[int(i)]
        if item.problem:
            continue
        try:
            with open(item.location, "rb") as f:
                refs.append(decode_image(f.read()))
        except (OSError, ImageDecodeError):
            continue
        if len(refs) >= want:
            break
    info = {"captions": what, "references": len(refs)}
    if not refs:
        return None, info
    texts = [captions[int(j)] for j in rng.integers(0, len(captions), len(refs))]
    t0 = time.perf_counter()
    qv = enc.encode_queries(refs, texts, batch_size=max(1, cfg.batch_size))
    info["encode_seconds"] = round(time.perf_counter() - t0, 2)
    logger.info("calibration: %d composed queries (captions: %s)", len(refs), what)
    return np.asarray(qv, np.float32), info


def calibrate_version(
    idx: Any,
    version: str,
    recall_target: float = 0.99,
    query_vectors: np.ndarray | None = None,
    source: str | None = None,
) -> dict[str, Any]:
    """Measure ``version``'s fast-mode L (on ``query_vectors`` [M, D] when given, named by
    ``source``: "composed" or "queries"; else on proxy queries, the last resort) and record it
    in its metadata (see retrieval.index.calibrate); later searches of that version use it."""
    from retrieval.index.calibrate import calibrate_fast

    kw: dict[str, Any] = {"query_vectors": query_vectors, "source": source}
    if version == idx.active_version:
        res = calibrate_fast(idx, recall_target, **kw)
    else:
        view = open_version(idx, version)
        try:
            res = calibrate_fast(view, recall_target, **kw)
        finally:
            view.close()
    idx.update_version_meta(version, {CALIBRATION_KEY: res})
    return res


def _version_or_active(idx: Any, version: str | None, uri: str, name: str) -> str:
    target = version or idx.active_version
    if target is None:
        raise IndexerError(f"index {name!r} at {uri} has no active version")
    return str(target)


def calibrate_index(
    uri: str,
    name: str,
    version: str | None = None,
    recall_target: float = 0.99,
    query_vectors: np.ndarray | None = None,
    queries_fingerprint: str | None = None,
) -> dict[str, Any]:
    """``calibrate_version`` by URI (default: the active version). ``queries_fingerprint``:
    the encoder that made ``query_vectors`` when known (a server's traffic reservoir names
    it); another encoder's queries are refused."""
    from retrieval.index import open_index

    idx = open_index(uri, name, options=VERIFY_OPTIONS)
    try:
        target = _version_or_active(idx, version, uri, name)
        if queries_fingerprint is not None:
            fp = next(
                (v.meta.encoder_fingerprint for v in idx.versions() if v.version == target), None
            )
            if fp is not None and fp != queries_fingerprint:
                raise IndexerError(
                    f"the query vectors were made by encoder {queries_fingerprint}, version "
                    f"{target} was built with {fp}: they are not comparable"
                )
        try:
            res = calibrate_version(idx, target, recall_target, query_vectors)
        except ValueError as exc:  # an empty version or unusable query vectors
            raise IndexerError(f"cannot calibrate {name} {target}: {exc}") from exc
        res["version"] = target
        return res
    finally:
        idx.close()


def verify_version(
    uri: str, name: str, version: str | None, sample: int = 32, expect: int | None = None
) -> dict[str, Any]:
    """Verify a version (default: the active one) by count and self-retrieval."""
    from retrieval.index import open_index

    idx = open_index(uri, name, options=VERIFY_OPTIONS)
    try:
        target = _version_or_active(idx, version, uri, name)
        if target == idx.active_version:
            view: Any = idx
            ids = [r.id for _, r in zip(range(sample * 50), scroll(idx), strict=False)]
            res = verify_view(idx, sample_ids(ids, sample), expect)
        else:
            view = open_version(idx, target)
            try:
                ids = [r.id for _, r in zip(range(sample * 50), scroll(view), strict=False)]
                res = verify_view(view, sample_ids(ids, sample), expect)
            finally:
                view.close()
        res["version"] = target
        return res
    finally:
        idx.close()
