"""From validated queries to results: admission, reference decoding, micro-batching, encoding,
search and re-ranking, on the server's thread pools. No gRPC here: failures are exceptions the
one table (server/errors.py) maps, or per-query :class:`RequestError` results.

A search is admitted or refused before any work is spent on it (:meth:`Dispatcher.admit`: queue
full, estimated wait over the bound or over the call's own deadline -> ``QueueFullError``, sent
as RESOURCE_EXHAUSTED with ``retry-after-ms``), and only then the reference image is decoded in
the I/O pool and the query queued for the model.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import numpy as np

from server.batching import Job, MicroBatcher, QueueFullError, Ticket
from server.engine import Engine, Query
from server.errors import RequestError, to_request_error
from server.metrics import Metrics
from server.validation import prefixed

logger = logging.getLogger(__name__)

T = TypeVar("T")

#: Threads that decode images, read files and call the index.
IO_THREADS = 4


class Dispatcher:
    """The pools, the batcher and the pipeline of one server. ``engine`` is set by ``start``."""

    def __init__(self, settings: Any, metrics: Metrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.engine: Engine | None = None
        self.infer_pool = ThreadPoolExecutor(1, thread_name_prefix="cir-infer")
        self.io_pool = ThreadPoolExecutor(IO_THREADS, thread_name_prefix="cir-io")
        self.batcher = MicroBatcher(
            self._process,
            max_batch=settings.max_batch,
            max_wait_s=settings.max_wait_ms / 1000.0,
            queue_size=settings.queue_size,
            max_queue_s=settings.max_queue_ms / 1000.0,
            adaptive_wait=settings.adaptive_wait,
            on_drop=lambda reason, n: metrics.dropped.labels(reason).inc(n),
            on_depth=metrics.queue_depth.set,
        )
        self._search_tasks: set[asyncio.Task[None]] = set()
        self._rerank_cache_seen = (0, 0)  # the engine's rerank_cache totals last exported

    # ------------------------------------------------------------------ lifecycle
    def start(self, engine: Engine) -> None:
        self.engine = engine
        self.batcher.start()

    async def drain(self, timeout: float) -> None:
        """Finish queued work and in-flight searches, then stop the pools."""
        await self.batcher.stop(timeout)
        if self._search_tasks:
            await asyncio.wait(list(self._search_tasks), timeout=timeout)
        self.infer_pool.shutdown(wait=True, cancel_futures=True)
        self.io_pool.shutdown(wait=True, cancel_futures=True)

    @property
    def _engine(self) -> Engine:
        if self.engine is None:
            raise RequestError("UNAVAILABLE", "server is not ready (model or index loading)")
        return self.engine

    async def io(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` in the I/O pool."""
        return await asyncio.get_running_loop().run_in_executor(self.io_pool, fn, *args)

    async def infer(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` in the inference thread."""
        return await asyncio.get_running_loop().run_in_executor(self.infer_pool, fn, *args)

    # ------------------------------------------------------------------ the whole path
    async def run(self, items: list[tuple[Query, Any, str]], deadline: float) -> list[Any]:
        """Admit, prepare, queue and await ``items`` (query, request, where): per query its
        ``(hits, version)`` (a search) or its vector (``search=False``)."""
        ticket = self.admit(len(items), deadline)
        futures = await self.prepare(items, deadline, ticket)
        return await self.await_all(futures, deadline)

    # ------------------------------------------------------------------ admission, batching
    def admit(self, n: int, deadline: float) -> Ticket:
        """Room for ``n`` queries in the model's queue, before any work is spent on them."""
        try:
            return self.batcher.admit(n, deadline)
        except QueueFullError:
            self.metrics.rejected.inc(n)
            raise

    async def reference(self, q: Query, request: Any, where: str = "") -> None:
        """Decode the reference image / look up the gallery reference into ``q``."""
        engine = self._engine
        which = request.WhichOneof("reference")
        t0 = time.perf_counter()
        try:
            if which == "reference_image":
                q.image = await self.io(engine.decode_reference, bytes(request.reference_image))
            elif which == "reference_id":
                feats, image, key = await self.io(engine.gallery_reference, request.reference_id)
                q.features, q.image, q.cache_key = feats, image, key
                q.timings["reference_cached"] = 1.0 if feats is not None else 0.0
                self.metrics.cache.labels("hit" if feats is not None else "miss").inc()
        except RequestError as exc:
            raise prefixed(exc, where) from None
        q.timings["decode_ms"] = (time.perf_counter() - t0) * 1000.0
        self.metrics.stage.labels("decode").observe(q.timings["decode_ms"] / 1000.0)

    async def prepare(
        self,
        items: list[tuple[Query, Any, str]],
        deadline: float,
        ticket: Ticket,
    ) -> list[asyncio.Future[Any]]:
        """Decode the admitted queries' references (I/O pool), then queue them with the ticket
        (given back if anything fails on the way)."""
        try:
            for q, request, where in items:
                await self.reference(q, request, where)
            return self.batcher.submit([q for q, _, _ in items], deadline, ticket)
        finally:
            self.batcher.release(ticket)  # a no-op once submitted

    async def await_all(self, futures: list[asyncio.Future[Any]], deadline: float) -> list[Any]:
        remaining = deadline - time.monotonic()
        try:
            async with asyncio.timeout(max(0.0, remaining)):
                return list(await asyncio.gather(*futures))
        except TimeoutError:
            for f in futures:
                f.cancel()  # the batcher skips cancelled work
            raise RequestError(
                "DEADLINE_EXCEEDED", "deadline passed before the query ran"
            ) from None
        except asyncio.CancelledError:  # the caller went away (or its deadline passed)
            for f in futures:
                f.cancel()
            raise

    # ------------------------------------------------------------------ the batcher's side
    async def _process(self, batch: list[Job]) -> None:
        """Encode a batch in the inference thread, then search it in the io pool without
        holding up the next batch's encoding."""
        engine = self._engine
        loop = asyncio.get_running_loop()
        queries: list[Query] = [j.item for j in batch]
        for j in batch:
            j.item.timings["queue_ms"] = (j.dispatched - j.enqueued) * 1000.0
            self.metrics.stage.labels("queue").observe(j.dispatched - j.enqueued)
        self.metrics.batch_size.observe(len(batch))
        try:
            vectors, t = await self.infer(engine.encode, queries)
        except Exception as exc:
            logger.exception("encoding failed")
            err = RequestError("INTERNAL", f"encoding failed: {type(exc).__name__}: {exc}")
            for j in batch:
                if not j.future.done():
                    j.future.set_exception(err)
            return
        self.metrics.service_rate.set(self.batcher.service_rate)
        self.metrics.stage.labels("reference").observe(t["reference_ms"] / 1000.0)
        self.metrics.stage.labels("encode").observe(t["encode_ms"] / 1000.0)
        for j in batch:
            j.item.timings.update(t)
            j.item.timings["batch_size"] = float(len(batch))
        searching = [i for i, q in enumerate(queries) if q.search]
        for i, j in enumerate(batch):
            if not queries[i].search and not j.future.done():
                j.future.set_result(vectors[i])
        if searching:
            task = loop.create_task(self._search([batch[i] for i in searching], vectors[searching]))
            self._search_tasks.add(task)
            task.add_done_callback(self._search_tasks.discard)

    async def _search(self, jobs: list[Job], vectors: np.ndarray) -> None:
        live = [i for i, j in enumerate(jobs) if not j.future.done()]
        if not live:
            return
        jobs = [jobs[i] for i in live]
        vectors = vectors[live]
        results: list[Any]
        try:
            results, version, ms = await self.io(
                self._engine.search, vectors, [j.item for j in jobs]
            )
        except Exception as exc:
            err = to_request_error(exc, f"search failed: {exc}")
            if err.code == "INTERNAL":
                logger.exception("search failed")
            results = [err] * len(jobs)
            version, ms = "", 0.0
        self.metrics.stage.labels("search").observe(ms / 1000.0)
        rr_ms = await self._rerank(jobs, results)
        for j, r in zip(jobs, results, strict=True):
            if j.future.done():
                continue
            j.item.timings["search_ms"] = ms
            j.item.timings["rerank_ms"] = rr_ms
            if isinstance(r, RequestError):
                j.future.set_exception(r)
            else:
                j.future.set_result((r, j.item.index_version or version))  # what it searched

    async def _rerank(self, jobs: list[Job], results: list[Any]) -> float:
        """The second stage for the jobs that asked for it and are still waiting (a call whose
        deadline passed or whose client left is not re-ranked), in the inference thread: one
        batch across the concurrent requests, as the encoder's."""
        now = time.monotonic()
        todo = [
            i
            for i, j in enumerate(jobs)
            if j.item.reranks and j.alive(now) and not isinstance(results[i], RequestError)
        ]
        if not todo:
            return 0.0
        sub = [results[i] for i in todo]
        try:
            ms = await self.infer(self._engine.rerank, [jobs[i].item for i in todo], sub)
        except Exception as exc:
            logger.exception("re-ranking failed")
            err = RequestError("INTERNAL", f"re-ranking failed: {type(exc).__name__}: {exc}")
            sub, ms = [err] * len(todo), 0.0
        for i, r in zip(todo, sub, strict=True):
            results[i] = r
        self.metrics.stage.labels("rerank").observe(ms / 1000.0)
        cache = self._engine.rerank_cache  # its running totals, exported as the increments
        seen_hits, seen_misses = self._rerank_cache_seen
        self._rerank_cache_seen = (cache.hits, cache.misses)
        self.metrics.rerank_cache.labels("hit").inc(max(0, cache.hits - seen_hits))
        self.metrics.rerank_cache.labels("miss").inc(max(0, cache.misses - seen_misses))
        return ms
