"""What every executor receives and returns (imported by the executors and by the package
facade, so the executors never import the package that picks them)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from indexer import runner
from indexer.config import BuildConfig
from indexer.decode import PresentSet
from indexer.report import Report
from indexer.stages import Ledger, Progress, Writer, progress_writer

if TYPE_CHECKING:
    from retrieval.encoder import Encoder
    from retrieval.index import IndexView


@dataclass
class Job:
    """One run of the stages: what to encode, where to write, and what to account into."""

    cfg: BuildConfig
    enc: Encoder  # the driver's encoder (fingerprint, preprocessor; in-process: the model)
    items: list[Any]  # this run's items
    view: IndexView  # the version written into
    present: PresentSet  # ids already in it: not decoded, not encoded
    ledger: Ledger  # skips, duplicates, present, updates (and the report they go into)
    report: Report
    stages: dict[str, float]  # stage_seconds, filled by the executor
    store_patches: bool  # also store each point's ViT tokens (a "patches" re-ranker)


@dataclass
class RunResult:
    """What an executor did (the ledger holds the rest)."""

    written: int  # points written by this run
    wait_s: float  # the driver waiting for batches
    encode_s: float  # encoder seconds (summed over Ray actors)
    write_s: float  # writer busy
    write_blocked_s: float  # encoder/driver blocked on a full write queue


class Executor(Protocol):
    def run(self, job: Job) -> RunResult: ...


def run_stages(
    job: Job,
    progress: Progress,
    reader: Callable[[], Iterable[Any]],
    mapper: Callable[[], Callable[[Any], Any]],
) -> tuple[runner.RunStats, Writer]:
    """Both executors' tail: the runner over ``reader`` / ``mapper`` into the job's version
    through one writer thread (progress lines as points land); the progress bar is closed
    whatever happens. Returns the runner's stats and the writer (its counts and timings)."""
    cfg = job.cfg
    holder: dict[str, Writer] = {}

    def writer() -> Writer:
        on_written = progress_writer(cfg, job.report, len(job.items), lambda: progress.done)
        holder["w"] = Writer(job.view, cfg.write_queue, cfg.flush_every, on_written)
        return holder["w"]

    try:
        stats = runner.run(reader, mapper, writer, lambda b: progress.update(len(b.items)))
    finally:
        progress.close()
    return stats, holder["w"]
