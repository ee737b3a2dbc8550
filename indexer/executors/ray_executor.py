"""``--executor ray``: the same stages on a Ray cluster, with Ray Data.

    listing (this run's items) -> ray.data dataset, ~one block per batch
      -> decode/preprocess: ``map_batches`` CPU tasks (read, sha256, decode, preprocess,
         thumbnail; the in-process code, ``indexer.decode.ImageDataset``), B items -> one row
         holding the decoded batch
      -> encode: ``map_batches`` over an actor pool of ``--encoders`` actors, one model each,
         ``--gpus-per-encoder`` GPUs each when the cluster has GPUs, else CPU
      -> [``qdrant:`` index] upsert: an actor pool whose workers write in parallel
      -> the driver: the ledger (the first of duplicate contents wins, in item order: the
         dataset preserves order), progress, the report; for Edge / local indexes (one owner
         process) the driver is the writer.

Exactly once: point ids are uuid5 of the content, so a batch that Ray re-runs (a killed actor
is restarted and its task retried, ``max_restarts`` / ``max_task_retries``) writes the same
points again; the driver counts each item once, since Ray Data hands every output block to
the consumer once. A killed driver leaves an unfinished version that the same command
resumes, as in-process. An encoder that cannot load the model fails the build with its own
error (it raises in its first batch; application errors are not retried).
"""

from __future__ import annotations

import functools
import logging
import os
import pickle
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from indexer.config import BuildConfig, IndexerError
from indexer.decode import Decoded, DecodedBatch, ImageDataset, PresentSet, collate
from indexer.executors.base import Job, RunResult, run_stages
from indexer.report import Report
from indexer.stages import (
    Progress,
    WriteBatch,
    apply_updates,
    encode_pixels,
    load_encoder,
)

logger = logging.getLogger(__name__)

#: Bytes of memory a decode task asks Ray for (a batch of decoded images, torch; Ray Data
#: measured up to 250 MiB for batches of 64 against the 256 MiB asked before).
DECODE_TASK_MEMORY = 384 * 1024 * 1024
#: Items per listing block: a few batches, so that decode tasks start early and stay small.
BLOCK_BATCHES = 2


class EncoderWorkerError(RuntimeError):
    """An encoder actor could not load the model (raised in its first batch, not retried)."""


@dataclass
class DecodeContext:
    """What a decode task needs (shipped once through the object store)."""

    preprocess: Callable[[Any], Any]  # the encoder's preprocessor (picklable)
    present: PresentSet  # ids already in the version: not decoded
    thumbnails: bool  # store a base64 JPEG thumbnail in the payload


@dataclass
class EncodedBatch:
    """A decoded batch after the encoder: tokens for its usable rows."""

    items: list[Decoded]
    usable: list[int]  # positions in ``items`` that ``tokens`` rows belong to
    tokens: np.ndarray | None  # [len(usable), Q, D] float32; None once written by a worker
    ok: list[bool]  # per usable row: finite tokens
    details: list[str]  # per usable row: encode error detail ("" when none)
    encode_s: float  # encoder seconds for this batch
    fingerprint: str  # the actor's encoder (must be the driver's)
    worker: str  # host:pid of the actor that encoded it


def _pack(obj: Any) -> np.ndarray:
    return np.array([pickle.dumps(obj, protocol=5)], dtype=object)


def decode_rows(rows: dict[str, np.ndarray], ctx: DecodeContext) -> dict[str, np.ndarray]:
    """Ray task: B listing rows -> one row holding their :class:`DecodedBatch` (numpy pixels)."""
    import torch

    torch.set_num_threads(1)  # the tasks are the parallelism
    items = [pickle.loads(b) for b in rows["item"]]
    dataset = ImageDataset(items, ctx.preprocess, ctx.present, thumbnails=ctx.thumbnails)
    out = []
    for k, pos in enumerate(rows["pos"]):
        d, px = dataset[k]
        d.index = int(pos)  # the item's position in the run, not in this batch
        out.append((d, px))
    batch = collate(out)
    pixels = None if batch.pixels is None else batch.pixels.numpy()
    return {"batch": _pack(DecodedBatch(batch.items, pixels, batch.usable))}


class EncodeActor:
    """Ray actor: one model; encodes the usable rows of each decoded batch."""

    def __init__(self, cfg: BuildConfig, device: str, threads: int, patches: bool) -> None:
        self.worker = f"{socket.gethostname()}:{os.getpid()}"
        self.patches = patches
        self.error: str | None = None
        self.enc: Any = None
        try:
            import torch

            torch.set_num_threads(max(1, threads))
            self.enc = load_encoder(cfg, device=device)
        except Exception as exc:  # reported by the first batch: a clear error, not a hang
            self.error = f"encoder worker {self.worker} cannot load the model: {exc}"
            logger.error("%s", self.error)

    def __call__(self, rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        if self.error is not None:
            raise EncoderWorkerError(self.error)
        out = []
        for blob in rows["batch"]:
            b: DecodedBatch = pickle.loads(blob)
            t0 = time.perf_counter()
            tokens: np.ndarray | None = None
            ok: list[bool] = []
            details: list[str] = []
            if b.usable:
                payloads = [b.items[p].payload for p in b.usable]
                tokens, ok, details = encode_pixels(
                    self.enc, torch.from_numpy(b.pixels), payloads, patches=self.patches
                )
            eb = EncodedBatch(
                b.items,
                b.usable,
                tokens,
                ok,
                details,
                time.perf_counter() - t0,
                self.enc.fingerprint,
                self.worker,
            )
            out.append(pickle.dumps(eb, protocol=5))
        return {"batch": np.array(out, dtype=object)}


def open_version_view(uri: str, name: str, version: str) -> Any:
    """A worker's own handle on the version being built (Qdrant: no single owner)."""
    from retrieval.index import open_index

    return open_index(uri, name).open_version(version)


class UpsertWorker:
    """Ray actor (``qdrant:`` indexes): upserts every encoded, finite row of each batch into the
    version, then passes the batch on without its tokens. Duplicate contents are written by
    whichever worker gets them (same id, same tokens); the driver rewrites the payloads of
    those ids to the first item's afterwards."""

    def __init__(self, opener: Callable[[], Any], flush_every: int = 8) -> None:
        self.view = opener()
        self.flush_every = max(1, flush_every)
        self.batches = 0

    def __call__(self, rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = []
        for blob in rows["batch"]:
            eb: EncodedBatch = pickle.loads(blob)
            if eb.tokens is not None:
                keep = [t for t, k in enumerate(eb.ok) if k]
                if keep:
                    ds = [eb.items[eb.usable[t]] for t in keep]
                    self.view.upsert(
                        [d.id for d in ds], eb.tokens[np.asarray(keep)], [d.payload for d in ds]
                    )
                    self.batches += 1
                    if self.batches % self.flush_every == 0:
                        self.view.flush()
            eb.tokens = None  # written: the driver needs the accounting only
            out.append(pickle.dumps(eb, protocol=5))
        return {"batch": np.array(out, dtype=object)}


# --------------------------------------------------------------------------- driver
def connect(cfg: BuildConfig) -> bool:
    """Join the cluster (``--ray-address``) or start a local one; True when this call started
    Ray (the caller shuts it down). A Ray already initialised in this process is used as is."""
    import ray

    if ray.is_initialized():
        return False
    if cfg.ray_address:  # an existing cluster ("auto", HOST:PORT, ray://HOST:10001)
        ray.init(address=cfg.ray_address, logging_level=logging.WARNING)
    else:  # a local cluster of this machine, for this run
        ray.init(include_dashboard=False, logging_level=logging.WARNING)
    return True


def _resources() -> dict[str, float]:
    import ray

    res = ray.cluster_resources()
    return {k: res[k] for k in ("CPU", "GPU") if k in res}


def _parallel_writes(cfg: BuildConfig) -> bool:
    if cfg.parallel_writes is not None:
        return cfg.parallel_writes
    return cfg.index.startswith("qdrant:")


def _root_error(exc: BaseException) -> BaseException:
    """The worker's own exception inside Ray's wrappers (RayTaskError, UserCodeException)."""
    seen = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, EncoderWorkerError | IndexerError):
            return cur
        nxt = getattr(cur, "cause", None) or cur.__cause__
        cur = nxt if isinstance(nxt, BaseException) else None
    return exc


class RayExecutor:
    """reader = the Ray Data pipeline, consumed in order on the driver; mapper = ledger;
    writer = the driver's writer thread (Edge / local) or a counter (workers wrote)."""

    def run(self, job: Job) -> RunResult:
        import ray

        cfg = job.cfg
        if not job.items:
            return RunResult(0, 0.0, 0.0, 0.0, 0.0)
        t0 = time.perf_counter()
        started = connect(cfg)
        logger.info("ray: cluster ready in %.1f s: %s", time.perf_counter() - t0, _resources())
        try:
            return self._run(job)
        except ray.exceptions.RayError as exc:
            root = _root_error(exc)
            if root is not exc:
                raise IndexerError(f"the Ray build failed: {root}") from exc
            raise IndexerError(f"the Ray build failed: {exc}") from exc
        finally:
            if started:
                ray.shutdown()

    def _dataset(self, job: Job, parallel: bool) -> Any:
        import pyarrow as pa
        import ray

        cfg = job.cfg
        ctx = ray.data.DataContext.get_current()
        ctx.execution_options.preserve_order = True  # the first of duplicates wins, as in-process
        ctx.enable_progress_bars = bool(cfg.progress)
        bs = max(1, int(cfg.batch_size))
        n = len(job.items)
        step = bs * BLOCK_BATCHES
        table = pa.table(
            {
                "pos": pa.array(range(n), pa.int64()),
                "item": pa.array([pickle.dumps(it) for it in job.items], pa.binary()),
            }
        )
        ds: Any = ray.data.from_arrow([table.slice(s, step) for s in range(0, n, step)])
        dctx = DecodeContext(job.enc.preprocessor, job.present, cfg.thumbnails)
        # decode: CPU tasks of --cpus-per-decoder CPUs each; the memory request is a batch's working set, and
        # (differing from the encoders' resources) it keeps Ray Data from fusing decode into
        # the encoder actors, which would decode and encode one after the other in one process
        ds = ds.map_batches(
            decode_rows,
            fn_kwargs={"ctx": dctx},
            batch_size=bs,
            num_cpus=cfg.cpus_per_decoder,
            memory=DECODE_TASK_MEMORY,
        )
        gpus = float(ray.cluster_resources().get("GPU", 0.0))
        use_gpu = gpus > 0 and cfg.gpus_per_encoder > 0
        device = "cuda" if use_gpu else "cpu"
        threads = cfg.num_threads or max(1, int(cfg.cpus_per_encoder))
        logger.info(
            "ray: %d encoder actor(s) on %s (%s GPU each), batch %d",
            cfg.encoders,
            device,
            cfg.gpus_per_encoder if use_gpu else 0,
            bs,
        )
        # Ray Data's actor pools restart a dead actor and retry its batch by default
        # (max_restarts=-1, max_task_retries=-1): a SIGKILLed encoder costs one batch
        ds = ds.map_batches(
            EncodeActor,
            fn_constructor_kwargs={
                "cfg": cfg,
                "device": device,
                "threads": threads,
                "patches": job.store_patches,
            },
            batch_size=1,  # one decoded batch per call
            compute=ray.data.ActorPoolStrategy(size=max(1, int(cfg.encoders))),
            num_cpus=cfg.cpus_per_encoder,
            num_gpus=cfg.gpus_per_encoder if use_gpu else 0,
        )
        if parallel:
            assert job.report.version is not None
            opener = functools.partial(open_version_view, cfg.index, cfg.name, job.report.version)
            ds = ds.map_batches(
                UpsertWorker,
                fn_constructor_kwargs={"opener": opener, "flush_every": cfg.flush_every},
                batch_size=1,
                compute=ray.data.ActorPoolStrategy(size=max(1, int(cfg.encoders))),
                num_cpus=0.25,  # network-bound
            )
        return ds

    def _run(self, job: Job) -> RunResult:
        cfg, ledger = job.cfg, job.ledger
        parallel = _parallel_writes(cfg)
        progress = Progress(cfg, len(job.items))
        encode_s = 0.0
        dup_winners: dict[str, Any] = {}  # parallel writes: id -> the item whose payload wins

        def reader() -> Iterator[EncodedBatch]:
            ds = self._dataset(job, parallel)
            for rows in ds.iter_batches(batch_size=None, batch_format="numpy"):
                for blob in rows["batch"]:
                    yield pickle.loads(blob)

        def mapper() -> Callable[[EncodedBatch], WriteBatch | None]:
            def select(eb: EncodedBatch) -> WriteBatch | None:
                nonlocal encode_s
                if eb.fingerprint != job.enc.fingerprint:
                    raise IndexerError(
                        f"encoder worker {eb.worker} has another model (fingerprint "
                        f"{eb.fingerprint}, the driver's is {job.enc.fingerprint}): every node "
                        f"must see the same --model {cfg.model}"
                    )
                encode_s += eb.encode_s
                dups = job.report.duplicates
                rows = ledger.select(eb.items)
                if parallel and job.report.duplicates > dups:
                    for d in eb.items:
                        if d.id is not None and d.reason is None and not d.present:
                            first = ledger.seen.get(d.id)
                            if first is not None and first != d.index:
                                dup_winners[d.id] = job.items[first]
                if not rows:
                    return None
                chosen = [eb.items[p] for p in rows]
                trow = [eb.usable.index(p) for p in rows]
                ok = [eb.ok[t] for t in trow]
                good = ledger.encoded(chosen, ok, [eb.details[t] for t in trow])
                if not good:
                    return None
                ids = [d.id for d in good if d.id is not None]
                if parallel or eb.tokens is None:
                    return WriteBatch(ids, None, [d.payload for d in good])
                keep = [t for t, k in zip(trow, ok, strict=True) if k]
                return WriteBatch(ids, eb.tokens[np.asarray(keep)], [d.payload for d in good])

            return select

        stats, w = run_stages(job, progress, reader, mapper)
        if dup_winners:  # parallel writes: the first item's payload, as in-process
            apply_updates(job.view, list(dup_winners.items()), Report())
            job.view.flush()
        return RunResult(w.written, stats.wait_s, encode_s, w.busy_s, w.blocked_s)
