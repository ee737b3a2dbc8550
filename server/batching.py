"""Dynamic micro-batching of concurrent queries on the event loop.

Handlers ``submit`` validated queries; one batcher task takes up to ``max_batch`` of them, or
whatever arrived within ``max_wait_s`` of the first one's arrival (with ``adaptive_wait``, a lone
query on a server whose recent batches held one query each is sent at once: an idle server
answers at batch-1 latency, a busy one still fills batches), drops the ones whose deadline
passed (or cannot be met: less time left than a batch takes) or whose caller went away, and
hands the batch to ``process`` (which runs the model in a worker thread and resolves the
futures).

Admission happens before any work on a query (:meth:`MicroBatcher.admit`, then the caller
decodes its reference image, then :meth:`MicroBatcher.submit` with the ticket): a query is
refused with :class:`QueueFullError` when the queue holds ``queue_size`` queries, when the
estimated wait (queries ahead / the measured service rate) exceeds ``max_queue_s`` once at
least two batches are waiting, or when it exceeds the caller's own deadline. The service rate
is a moving average of the model's time per query in full batches; ``retry-after`` is the time
the queries ahead need to drain at that rate.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger(__name__)


class QueueFullError(Exception):
    """The queue cannot take the queries; retry after ``retry_after_ms``."""

    def __init__(self, depth: int, capacity: int, retry_after_ms: int) -> None:
        super().__init__(
            f"server busy: {depth} queries queued (capacity {capacity}); "
            f"retry after {retry_after_ms} ms"
        )
        self.retry_after_ms = retry_after_ms


class BatcherClosedError(Exception):
    """The batcher is stopping; no new work is accepted."""


class DeadlineUnmeetableError(Exception):
    """A queued query was not started: less time was left than a batch takes."""


@dataclass
class Ticket:
    """Room in the queue held for ``n`` queries between admission and ``submit``."""

    n: int
    deadline: float
    open: bool = True


@dataclass
class Job:
    """One query waiting for the model."""

    item: Any  # what ``process`` needs (a validated query)
    deadline: float  # time.monotonic() after which the caller no longer waits
    future: asyncio.Future[Any]
    enqueued: float = field(default_factory=time.monotonic)
    dispatched: float = 0.0  # when the batch it is in was handed to ``process``
    batch_size: int = 0

    def alive(self, now: float) -> bool:
        return not self.future.done() and now < self.deadline


class MicroBatcher:
    """Collects jobs into batches. ``process(batch)`` must resolve every job's future."""

    def __init__(
        self,
        process: Callable[[list[Job]], Awaitable[None]],
        *,
        max_batch: int = 16,
        max_wait_s: float = 0.002,
        queue_size: int = 256,
        max_queue_s: float = 0.25,
        adaptive_wait: bool = True,
        on_drop: Callable[[str, int], None] | None = None,
        on_depth: Callable[[int], None] | None = None,
    ) -> None:
        self._process = process
        self.max_batch = max(1, int(max_batch))
        self.max_wait_s = max(0.0, float(max_wait_s))
        self.queue_size = max(1, int(queue_size))
        self.max_queue_s = max(0.0, float(max_queue_s))
        self.adaptive_wait = adaptive_wait
        # moving average of live batch sizes: ~1 means no concurrency, so waiting buys nothing
        self._recent_batch = 1.0
        self._on_drop = on_drop or (lambda reason, n: None)
        self._on_depth = on_depth or (lambda n: None)
        self._queue: collections.deque[Job] = collections.deque()
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        # moving averages of the model's time per query (the drain rate) and per batch; seeded
        # by the first batch, so the first estimates are the server's own
        self._per_query_s = 0.0
        self._per_batch_s = 0.0
        self._reserved = 0  # admitted queries not submitted yet (decoding their reference)
        self.batches = 0
        self.dropped_expired = 0
        self.dropped_cancelled = 0

    # ------------------------------------------------------------------ state
    @property
    def depth(self) -> int:
        """Queries admitted and not yet handed to ``process`` (queued or about to be)."""
        return len(self._queue) + self._reserved

    @property
    def service_rate(self) -> float:
        """Measured queries per second the model drains (0 before the first batch)."""
        return 1.0 / self._per_query_s if self._per_query_s > 0 else 0.0

    def expected_wait_s(self, ahead: int | None = None) -> float:
        """Time until ``ahead`` queued queries (default: all) have been through the model."""
        n = self.depth if ahead is None else ahead
        return n * self._per_query_s

    def retry_after_ms(self) -> int:
        """When to come back: the time the queries now queued take to drain at the measured
        rate, plus one batch-filling wait."""
        est = (self.expected_wait_s() + self.max_wait_s) * 1000.0
        return int(min(5000.0, max(10.0, est)))

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        if self._task is None:
            self._wake = asyncio.Event()
            self._task = asyncio.get_running_loop().create_task(self._run(), name="cir-batcher")

    async def stop(self, drain_timeout: float = 10.0) -> None:
        """Refuse new work, let queued work finish (up to ``drain_timeout``), then stop."""
        self._closed = True
        if self._wake is not None:
            self._wake.set()
        if self._task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._task), drain_timeout)
            except TimeoutError:
                self._task.cancel()
            self._task = None
        for job in self._queue:  # anything left (timeout): the callers learn it
            if not job.future.done():
                job.future.set_exception(BatcherClosedError("server is shutting down"))
        self._queue.clear()

    # ------------------------------------------------------------------ admission
    def admit(self, n: int, deadline: float) -> Ticket:
        """Hold room for ``n`` queries, or raise QueueFullError / BatcherClosedError. Cheap (no
        allocation but the ticket): call it before any work is spent on the queries."""
        if self._closed or self._task is None:
            raise BatcherClosedError("server is not accepting queries (starting or shutting down)")
        depth = self.depth
        if depth + n > self.queue_size:
            raise QueueFullError(depth, self.queue_size, self.retry_after_ms())
        if depth > 0 and self._per_query_s > 0:
            # the wait for the queries ahead plus our own batch
            wait = self.expected_wait_s(depth) + self._per_batch_s
            # two batches queued keep the model busy; beyond them a longer queue only adds
            # latency, so it is bounded in time
            if depth + n > 2 * self.max_batch and wait > self.max_queue_s:
                raise QueueFullError(depth, self.queue_size, self.retry_after_ms())
            if time.monotonic() + wait > deadline:  # it could not finish in time: not started
                raise QueueFullError(depth, self.queue_size, self.retry_after_ms())
        self._reserved += n
        return Ticket(n, deadline)

    def release(self, ticket: Ticket) -> None:
        """Give back an admitted ticket that will not be submitted (bad input, caller left)."""
        if ticket.open:
            ticket.open = False
            self._reserved -= ticket.n

    def submit(
        self, items: Sequence[Any], deadline: float, ticket: Ticket | None = None
    ) -> list[asyncio.Future[Any]]:
        """Queue ``items`` (all or none); returns one future per item. With ``ticket`` (from
        :meth:`admit`, for ``len(items)`` queries) the room is already held."""
        if ticket is not None:
            self.release(ticket)
        if self._closed or self._task is None:
            raise BatcherClosedError("server is not accepting queries (starting or shutting down)")
        if ticket is None and self.depth + len(items) > self.queue_size:
            raise QueueFullError(self.depth, self.queue_size, self.retry_after_ms())
        loop = asyncio.get_running_loop()
        futures = []
        for item in items:
            fut: asyncio.Future[Any] = loop.create_future()
            self._queue.append(Job(item, deadline, fut))
            futures.append(fut)
        self._on_depth(len(self._queue))
        assert self._wake is not None
        self._wake.set()
        return futures

    # ------------------------------------------------------------------ the loop
    async def _next_batch(self) -> list[Job]:
        assert self._wake is not None
        while not self._queue:
            if self._closed:
                return []
            self._wake.clear()
            await self._wake.wait()
        first = self._queue[0]
        until = first.enqueued + self.max_wait_s
        if self.adaptive_wait and len(self._queue) == 1 and self._recent_batch < 1.5:
            until = first.enqueued  # idle server: nobody else is likely to join this batch
        while len(self._queue) < self.max_batch and not self._closed:
            remaining = until - time.monotonic()
            if remaining <= 0:
                break
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), remaining)
            except TimeoutError:
                break
        n = min(self.max_batch, len(self._queue))
        return [self._queue.popleft() for _ in range(n)]

    async def _run(self) -> None:
        while True:
            batch = await self._next_batch()
            if not batch:
                return  # closed and drained
            self._on_depth(len(self._queue))
            now = time.monotonic()
            live = []
            for job in batch:
                if job.future.done():  # the caller went away (cancelled)
                    self.dropped_cancelled += 1
                    self._on_drop("cancelled", 1)
                elif now >= job.deadline:  # nobody waits for it any more: skip the work
                    self.dropped_expired += 1
                    self._on_drop("deadline", 1)
                    job.future.cancel()
                elif now + self._per_batch_s > job.deadline:  # it would finish too late
                    self.dropped_expired += 1
                    self._on_drop("deadline", 1)
                    job.future.set_exception(
                        DeadlineUnmeetableError(
                            f"not started: {1000 * (job.deadline - now):.0f} ms left, a batch "
                            f"takes about {1000 * self._per_batch_s:.0f} ms"
                        )
                    )
                else:
                    job.dispatched = now
                    live.append(job)
            if not live:
                continue
            for job in live:
                job.batch_size = len(live)
            self._recent_batch = 0.5 * self._recent_batch + 0.5 * len(live)
            self.batches += 1
            t0 = time.perf_counter()
            try:
                await self._process(live)
            except Exception as exc:  # process should resolve futures itself; never die here
                logger.exception("batch processing failed")
                for job in live:
                    if not job.future.done():
                        job.future.set_exception(exc)
            took = time.perf_counter() - t0
            per_query = took / len(live)
            if self._per_query_s == 0.0:
                self._per_query_s, self._per_batch_s = per_query, took
            elif len(live) >= self.max_batch // 2 or per_query < self._per_query_s:
                # the drain rate is the one of the batches a loaded server runs; an idle
                # server's lone queries would underrate it
                self._per_query_s = 0.8 * self._per_query_s + 0.2 * per_query
            self._per_batch_s = 0.8 * self._per_batch_s + 0.2 * took
