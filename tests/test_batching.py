"""MicroBatcher policy: batches fill under load; a lone query on an idle server is not held."""

from __future__ import annotations

import asyncio
import time

from server.batching import Job, MicroBatcher


async def _run(adaptive: bool, arrivals: list[list[int]], gap_s: float = 0.0) -> list[int]:
    """Submit waves of queries (``arrivals``: items per wave); return the batch sizes seen."""
    sizes: list[int] = []

    async def process(batch: list[Job]) -> None:
        sizes.append(len(batch))
        await asyncio.sleep(0.02)  # the "model"
        for j in batch:
            j.future.set_result(time.monotonic() - j.enqueued)

    b = MicroBatcher(process, max_batch=16, max_wait_s=0.3, adaptive_wait=adaptive)
    b.start()
    waits: list[float] = []
    for wave in arrivals:
        futs = b.submit(wave, deadline=time.monotonic() + 10)
        waits.extend(await asyncio.gather(*futs))
        await asyncio.sleep(gap_s)
    await b.stop()
    return sizes, waits  # type: ignore[return-value]


def test_lone_query_is_sent_at_once_when_idle() -> None:
    sizes, waits = asyncio.run(_run(True, [[1], [2], [3]]))
    assert sizes == [1, 1, 1]
    assert max(waits) < 0.2  # not held for max_wait (0.3 s)


def test_without_adaptive_wait_a_lone_query_waits_for_the_batch() -> None:
    sizes, waits = asyncio.run(_run(False, [[1]]))
    assert sizes == [1]
    assert waits[0] >= 0.29


def test_concurrent_queries_still_batch_and_then_hold_the_batch_open() -> None:
    # a burst of 8 is one batch; right after it (recent batches large) a lone query waits to
    # give others the chance to join, as under sustained load
    sizes, waits = asyncio.run(_run(True, [list(range(8)), [99]]))
    assert sizes == [8, 1]
    assert waits[-1] >= 0.29
