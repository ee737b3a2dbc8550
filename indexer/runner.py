"""The runner: reader -> mapper -> writer, composed from injected builders (the shape of
clip-retrieval's runner). An executor decides what each builder makes: the in-process one a
DataLoader reader and a mapper that encodes here; the Ray one a reader that yields batches
already decoded and encoded by Ray tasks and actors, and a mapper that only selects.

The runner owns what every executor shares: the batch loop, the time spent waiting for the
reader, progress, and the writer's life cycle (drained and flushed also when the run fails, so
that what was encoded is kept and a resume is shorter).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

from indexer.stages import WriteBatch

logger = logging.getLogger(__name__)


class BatchWriter(Protocol):
    def put(self, batch: WriteBatch) -> None: ...

    def close(self) -> None: ...


@dataclass
class RunStats:
    """What the runner measured."""

    wait_s: float = 0.0  # waiting for the reader (decode, and on Ray the encode too)
    batches: int = 0  # batches the reader yielded
    seconds: float = 0.0  # wall time of the loop, writer drained


def run(
    reader_builder: Callable[[], Iterable[Any]],
    mapper_builder: Callable[[], Callable[[Any], WriteBatch | None]],
    writer_builder: Callable[[], BatchWriter],
    on_batch: Callable[[Any], None] | None = None,
) -> RunStats:
    """Feed every batch of the reader through the mapper into the writer."""
    stats = RunStats()
    t_start = time.perf_counter()
    writer = writer_builder()
    try:
        mapper = mapper_builder()
        it = iter(reader_builder())
        while True:
            t0 = time.perf_counter()
            try:
                batch = next(it)
            except StopIteration:
                break
            stats.wait_s += time.perf_counter() - t0
            stats.batches += 1
            out = mapper(batch)
            if out is not None and out.ids:
                writer.put(out)
            if on_batch is not None:
                on_batch(batch)
        writer.close()
    except BaseException:
        # keep what was encoded (valid, and it makes the resume shorter), then re-raise
        with contextlib.suppress(BaseException):
            writer.close()
        raise
    stats.seconds = time.perf_counter() - t_start
    return stats
