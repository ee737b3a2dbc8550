"""The batch indexing pipeline: reader -> decode/preprocess (DataLoader workers) -> encoder ->
writer (batched upserts on a bounded queue), then verify and activate.

Exactly once: a point's id is uuid5 of the sha256 of the file's bytes, so re-writing an image is
idempotent. A rebuild writes into a new version whose metadata carries a ``build_key`` (source,
encoder, fields, name); a later run with the same key finds that unfinished version again, skips
the ids already in it and finishes it. Nothing is activated before it is verified.
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

if TYPE_CHECKING:
    from retrieval.encoder import Encoder
    from retrieval.index import GalleryIndex, IndexView, VersionHandle

logger = logging.getLogger(__name__)

INDEXER_FORMAT = 1  # recorded in version metadata (extra.indexer)
#: This process only searches to verify: rescore many int8 candidates exactly, so that models
#: whose images get nearly identical tokens (random weights) still find themselves at rank 1.
VERIFY_OPTIONS = {"oversampling": 64.0}


class IndexerError(RuntimeError):
    """A run that cannot proceed (bad arguments, index in use, verification failed)."""


@dataclass
class BuildConfig:
    """Options of ``cir index build`` (see docs/indexer.md)."""

    source: Path  # folder of images, or a manifest (jsonl/csv/parquet)
    index: str  # index URI: edge:PATH, local:PATH, qdrant:URL
    name: str = "gallery"  # index name
    model: str = "sprc-small"  # checkpoint folder or preset
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
    activate: bool = True  # activate the new version once verified (never for n > 1 shards)
    verify: bool = True  # run the verification (count + self-retrieval sample)
    verify_sample: int = 32  # images queried by their own tokens during verification
    calibrate: bool = True  # measure this version's fast-mode L (retrieval.index.calibrate)
    calibrate_min_points: int = 5000  # smaller galleries search `exact` anyway: skip
    calibrate_queries: str | None = None  # .npy of real query vectors [M, D] to calibrate on
    # (e.g. a query log saved from EncodeQuery); None: proxy queries, which can be pessimistic
    limit: int | None = None  # only the first N items (after sharding); for trials
    fresh: bool = False  # never resume: always start a new version
    build_id: str | None = None  # resume key override (several machines with different mounts)
    into: str | None = None  # write into this existing version (e.g. pre-created for shards)
    progress: bool = True  # tqdm progress bar on stderr
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


def load_encoder(cfg: BuildConfig) -> Encoder:
    from retrieval import Encoder

    try:
        return Encoder.from_pretrained(
            cfg.model, device=cfg.device, dtype=cfg.dtype, num_threads=cfg.num_threads
        )
    except (FileNotFoundError, ValueError, KeyError) as exc:
        raise IndexerError(f"cannot load model {cfg.model!r}: {exc}") from exc


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

    # read the calibration queries first: a bad file fails before hours of encoding
    calib_q = None if cfg.calibrate_queries is None else load_query_vectors(cfg.calibrate_queries)

    # ---- reader
    t0 = time.perf_counter()
    col = read_source(cfg.source, cfg.manifest_format, cfg.path_column, cfg.fields, cfg.id_column)
    all_relpaths = {it.relpath for it in col.items}
    items = select_shard(col.items, shard_i, shard_n)
    if cfg.limit is not None:
        items = items[: max(0, cfg.limit)]
    report.total = len(items)
    report.ignored_files = col.ignored
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
    report.preset, report.encoder_fingerprint = enc.preset, enc.fingerprint
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
        else:
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
        if cfg.limit is None:
            in_scope = present_set - seen
            if shard_n > 1:
                rel_of = {i: existing[i][0] for i in in_scope if i in existing}
                in_scope = {i for i in in_scope if shard_of(rel_of.get(i, ""), shard_n) == shard_i}
            if in_scope and (cfg.incremental or shard_n == 1):
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
        expected = len(seen) if whole else None
        sample = sample_ids(sorted(processed["written_ids"]) or sorted(seen), cfg.verify_sample)
        if cfg.incremental:
            t0 = time.perf_counter()
            report.count = idx.count()
            if cfg.verify:
                report.verification = verify_view(idx, sample, expected)
                report.verified = bool(report.verification["ok"])
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
            stages["verify"] = time.perf_counter() - t0
            if cfg.calibrate and whole and report.count >= cfg.calibrate_min_points:
                t0 = time.perf_counter()
                report.calibration = calibrate_version(idx, version, query_vectors=calib_q)
                stages["calibrate"] = time.perf_counter() - t0
            if shard_n > 1:
                if cfg.activate:
                    report.warnings.append(
                        f"shard {shard_i}/{shard_n}: not activated (a shard is part of a build); "
                        f"after every shard finished: cir index activate {version}"
                    )
            elif cfg.activate and report.verified:
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
    seen: set[str] = set()
    written_ids: list[str] = []
    updates: list[tuple[str, Any]] = []  # incremental: (id, item) whose path/metadata changed
    worker_s = {"read": 0.0, "decode": 0.0, "preprocess": 0.0}
    wait_s = encode_s = 0.0
    bar = _progress_bar(len(items), cfg.progress)
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
                    report.duplicates += 1
                    continue
                seen.add(d.id)
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
                tokens, ok = _encode(enc, px, new, report)
                encode_s += time.perf_counter() - t0
                good = [d for d, k in zip(new, ok, strict=True) if k]
                if good:
                    ids = [d.id for d in good]
                    writer.put(ids, tokens[np.asarray(ok)], [d.payload for d in good])
                    written_ids.extend(ids)
            state["processed"] += len(batch.items)
            bar.update(len(batch.items))
        writer.close()
    except BaseException:
        # keep what was encoded (valid, and it makes the resume shorter), then re-raise
        with contextlib.suppress(BaseException):
            writer.close()
        raise
    finally:
        bar.close()
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
    return {"seen": seen, "written_ids": written_ids}


def _encode(
    enc: Encoder, pixels: Any, new: list[Any], report: Report
) -> tuple[np.ndarray, list[bool]]:
    """Encode a batch; if the batch fails, retry per image so one bad tensor skips one image."""
    try:
        tokens = enc.encode_target_pixels(pixels)
    except Exception as exc:
        logger.warning("batch encode failed (%s); retrying one by one", exc)
        parts = []
        for i in range(len(new)):
            try:
                parts.append(enc.encode_target_pixels(pixels[i : i + 1])[0])
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


def calibrate_version(
    idx: Any,
    version: str,
    recall_target: float = 0.99,
    query_vectors: np.ndarray | None = None,
) -> dict[str, Any]:
    """Measure ``version``'s fast-mode L (on ``query_vectors`` [M, D] when given, else on
    proxy queries) and record it in its metadata (see retrieval.index.calibrate); later
    searches of that version use it."""
    from retrieval.index.calibrate import calibrate_fast
    from retrieval.index.common import CALIBRATION_KEY

    if version == idx.active_version:
        res = calibrate_fast(idx, recall_target, query_vectors=query_vectors)
    else:
        view = open_version(idx, version)
        try:
            res = calibrate_fast(view, recall_target, query_vectors=query_vectors)
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
) -> dict[str, Any]:
    """``calibrate_version`` by URI (default: the active version)."""
    from retrieval.index import open_index

    idx = open_index(uri, name, options=VERIFY_OPTIONS)
    try:
        target = _version_or_active(idx, version, uri, name)
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
