"""Executors run the build's stages (``indexer.runner``) over one planned target: in this
process (the default; DataLoader decode workers) or on a Ray cluster (``--executor ray``).

Both fill the same report fields and return the same :class:`RunResult`, so planning
(``indexer.plan``) and finishing (``indexer.finish``) do not know which one ran.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from indexer.config import BuildConfig, IndexerError
from indexer.decode import PresentSet
from indexer.report import Report
from indexer.stages import Ledger

if TYPE_CHECKING:
    from retrieval.encoder import Encoder
    from retrieval.index import IndexView

EXECUTORS = ("inprocess", "ray")


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


def get_executor(name: str) -> Executor:
    if name == "inprocess":
        from indexer.executors.inprocess import InProcessExecutor

        return InProcessExecutor()
    if name == "ray":
        from indexer.executors.ray_executor import RayExecutor

        return RayExecutor()
    raise IndexerError(f"unknown executor {name!r}: use one of {', '.join(EXECUTORS)}")


def execute(job: Job) -> Ledger:
    """Run the job's stages on its executor, apply the incremental payload updates, and fill
    the report's counts, stage_seconds and images/s."""
    from indexer.stages import apply_updates

    t0 = time.perf_counter()
    res = get_executor(job.cfg.executor).run(job)
    if job.ledger.updates:
        apply_updates(job.view, job.ledger.updates, job.report)
        job.view.flush()
    total_s = time.perf_counter() - t0
    st, report = job.stages, job.report
    st["decode_wait"] = res.wait_s
    st.update({f"worker_{k}": v for k, v in job.ledger.worker_s.items()})
    st["encode"] = res.encode_s
    st["write"] = res.write_s
    st["write_backpressure"] = res.write_blocked_s
    st["pipeline"] = total_s
    report.indexed = res.written
    done = report.indexed + report.already_present + report.duplicates + len(report.skipped)
    report.images_per_s = done / total_s if total_s > 0 else 0.0
    return job.ledger
