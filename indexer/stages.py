"""The build's stages, shared by every executor: reader (the listing), decode/preprocess (see
``indexer.decode``), encode, write; plus the driver's ledger, which decides what of a decoded
batch is written (first of duplicate contents, not already present, usable) and keeps the
report's counts.

The in-process executor runs decode in DataLoader workers and encode + ledger + writer here;
the Ray executor runs decode in Ray tasks and encode in Ray actors, with the same functions.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from indexer.config import REPORT_LIST_LIMIT, BuildConfig, IndexerError
from indexer.decode import Decoded
from indexer.report import Report, write_json_atomic
from indexer.sources import RESERVED_KEYS, Collection, Item, parse_shard, read_source, select_shard
from retrieval.index.api import USER_ID_KEY
from retrieval.model_source import check_trained

if TYPE_CHECKING:
    from retrieval.encoder import Encoder
    from retrieval.index import IndexView

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------- reader
@dataclass
class Listing:
    """What the reader stage found: the collection and this run's items (shard, --limit)."""

    col: Collection  # the whole collection (fields, ignored files, warnings, source id)
    items: list[Item]  # this run's items, sorted by relpath
    all_relpaths: set[str]  # every relpath of the collection (all shards): what still exists


def read_listing(cfg: BuildConfig, report: Report, stages: dict[str, float]) -> Listing:
    """List + sort + shard + ``--limit``; fills the report's input counts."""
    t0 = time.perf_counter()
    shard_i, shard_n = parse_shard(cfg.shard)
    col = read_source(cfg.source, cfg.manifest_format, cfg.path_column, cfg.fields, cfg.id_column)
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
    return Listing(col, items, {it.relpath for it in col.items})


# --------------------------------------------------------------------------- model
def load_encoder_check(cfg: BuildConfig) -> None:
    """IndexerError when ``cfg.model`` is a random-weight preset and that is not allowed."""
    from retrieval.model_source import UntrainedModelError

    try:
        check_trained(cfg.model, cfg.allow_untrained, "cir index build")
    except UntrainedModelError as exc:
        raise IndexerError(str(exc)) from exc


def load_encoder(cfg: BuildConfig, device: str | None = None) -> Encoder:
    """The build's encoder (``device`` overrides ``cfg.device``: a Ray actor's own device)."""
    from retrieval import Encoder

    load_encoder_check(cfg)  # before loading it
    try:
        return Encoder.from_pretrained(
            cfg.model, device=device or cfg.device, dtype=cfg.dtype, num_threads=cfg.num_threads
        )
    except (FileNotFoundError, ValueError, KeyError) as exc:
        raise IndexerError(f"cannot load model {cfg.model!r}: {exc}") from exc


# --------------------------------------------------------------------------- encode
def encode_pixels(
    enc: Encoder, pixels: Any, payloads: list[dict[str, Any]], patches: bool = False
) -> tuple[np.ndarray, list[bool], list[str]]:
    """Encode a batch -> (tokens [M, Q, D], ok per image, error detail per image). If the batch
    fails, retry per image so one bad tensor skips one image. ``patches``: also store each
    image's ViT tokens in its payload (a "patches" re-ranker reads them of every candidate;
    computed in the same ViT pass)."""
    from retrieval.rerank import PATCHES_KEY, encode_patches

    def run(px: Any, pls: list[dict[str, Any]]) -> np.ndarray:
        if not patches:
            return enc.encode_target_pixels(px)
        tokens, vit = enc.encode_target_pixels_and_patches(px)
        for p, t in zip(pls, vit, strict=True):
            p[PATCHES_KEY] = encode_patches(t)
        return tokens

    details = [""] * len(payloads)
    try:
        tokens = run(pixels, payloads)
    except Exception as exc:
        logger.warning("batch encode failed (%s); retrying one by one", exc)
        parts = []
        for i in range(len(payloads)):
            try:
                parts.append(run(pixels[i : i + 1], payloads[i : i + 1])[0])
            except Exception as exc1:
                parts.append(np.full((enc.num_queries, enc.dim), np.nan, np.float32))
                details[i] = f"{type(exc1).__name__}: {exc1}"
        tokens = np.stack(parts)
    ok = np.isfinite(tokens).all(axis=(1, 2)).tolist()
    return tokens, ok, details


@dataclass
class WriteBatch:
    """Points to upsert: ids, tokens [M, Q, D], payloads."""

    ids: list[str]
    tokens: np.ndarray | None  # None: already written by a worker (Ray parallel writes)
    payloads: list[dict[str, Any]]


# --------------------------------------------------------------------------- ledger
def meta_of(payload: dict[str, Any]) -> str:
    """The part of a payload an incremental run compares: metadata and the user's id."""
    return json.dumps(
        {k: v for k, v in payload.items() if k not in RESERVED_KEYS or k == USER_ID_KEY},
        sort_keys=True,
        default=str,
    )


def meta_of_item(item: Any) -> str:
    """``meta_of`` of the payload ``item`` would get."""
    return meta_of({**item.meta, USER_ID_KEY: item.user_id})


def note_duplicate(report: Report, path: str, first: str) -> None:
    report.duplicates += 1
    if len(report.duplicate_files) < REPORT_LIST_LIMIT:
        report.duplicate_files.append({"path": path, "same_as": first})


@dataclass
class Ledger:
    """The driver's bookkeeping over decoded items, in item order (so the first of duplicate
    contents wins whatever executor decoded them): skips, duplicates, already-present points,
    incremental payload updates, and the ids this run writes."""

    items: list[Item]
    report: Report
    existing: dict[str, tuple[str, str]]  # incremental: id -> (relpath, metadata json)
    all_relpaths: set[str]
    seen: dict[str, int] = field(default_factory=dict)  # id -> position of its first item
    written_ids: list[str] = field(default_factory=list)
    updates: list[tuple[str, Any]] = field(default_factory=list)  # incremental (id, item)
    worker_s: dict[str, float] = field(
        default_factory=lambda: {"read": 0.0, "decode": 0.0, "preprocess": 0.0}
    )
    encode_s: float = 0.0

    def select(self, decoded: list[Decoded]) -> list[int]:
        """Positions in ``decoded`` to encode and write (usable, new, first of their content)."""
        rows: list[int] = []
        report = self.report
        for pos, d in enumerate(decoded):
            for k, v in d.seconds.items():
                self.worker_s[k] = self.worker_s.get(k, 0.0) + v
            item = self.items[d.index]
            if d.reason is not None:
                report.skipped.append(
                    {"path": item.path, "reason": d.reason, "detail": d.detail[:300]}
                )
                continue
            assert d.id is not None
            if d.id in self.seen:
                note_duplicate(report, item.path, self.items[self.seen[d.id]].path)
                continue
            self.seen[d.id] = d.index
            if d.present:
                report.already_present += 1
                old = self.existing.get(d.id)
                if old is not None and (
                    (old[0] != item.relpath and old[0] not in self.all_relpaths)
                    or old[1] != meta_of_item(item)
                ):
                    self.updates.append((d.id, item))
                continue
            rows.append(pos)
        return rows

    def encoded(self, chosen: list[Decoded], ok: list[bool], details: list[str]) -> list[Decoded]:
        """Record encode failures of ``chosen``; the ones to write."""
        good = []
        for d, k, detail in zip(chosen, ok, details, strict=True):
            if k:
                good.append(d)
                continue
            reason = "encode-error" if detail else "non-finite-embedding"
            self.report.skipped.append(
                {"path": d.payload.get("path", ""), "reason": reason, "detail": detail}
            )
        self.written_ids.extend(d.id for d in good if d.id is not None)
        return good


# --------------------------------------------------------------------------- write
class Writer:
    """Upserts batches on a thread; ``put`` blocks while ``maxsize`` batches wait (backpressure).
    A batch without tokens (already upserted by a Ray worker) is only counted."""

    def __init__(
        self,
        view: IndexView | None,
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
            job: WriteBatch | None = self.q.get()
            if job is None:
                return
            if self.error is not None:
                continue  # drain so the producer never blocks forever
            t0 = time.perf_counter()
            try:
                if job.tokens is not None and self.view is not None:
                    self.view.upsert(job.ids, job.tokens, job.payloads)
                    self._batches += 1
                    if self._batches % self.flush_every == 0:
                        self.view.flush()
                self.written += len(job.ids)
                if self.on_written is not None:
                    self.on_written(self.written)
            except BaseException as exc:  # surfaced to the main thread by put()/close()
                self.error = exc
            finally:
                self.busy_s += time.perf_counter() - t0

    def _check(self) -> None:
        if self.error is not None:
            raise self.error

    def put(self, batch: WriteBatch) -> None:
        t0 = time.perf_counter()
        while True:
            self._check()
            try:
                self.q.put(batch, timeout=0.5)
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
        if self.view is not None:
            self.view.flush()
        self.busy_s += time.perf_counter() - t0


def progress_writer(
    cfg: BuildConfig, report: Report, total: int, processed: Callable[[], int]
) -> Callable[[int], None]:
    """The writer's ``on_written``: rewrite ``--progress-file`` after each written batch."""
    progress_file = cfg.progress_file

    def on_written(n: int) -> None:
        if progress_file is not None:
            write_json_atomic(
                Path(progress_file),
                {
                    "written": n,
                    "processed": processed(),
                    "total": total,
                    "version": report.version,
                    "pid": os.getpid(),
                },
            )

    return on_written


# --------------------------------------------------------------------------- progress
def progress_bar(total: int, enabled: bool) -> Any:
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


class ProgressLines:
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


class Progress:
    """The driver's progress: a tqdm bar on a terminal, else plain lines."""

    def __init__(self, cfg: BuildConfig, total: int) -> None:
        self.done = 0
        self.bar = progress_bar(total, cfg.progress)
        self.lines = ProgressLines(total, 0.0 if cfg.progress else cfg.progress_every_s)

    def update(self, n: int) -> None:
        self.done += n
        self.bar.update(n)
        self.lines.update(n)

    def close(self) -> None:
        self.bar.close()
        self.lines.close()


def apply_updates(view: IndexView, updates: list[tuple[str, Any]], report: Report) -> None:
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
