"""Executors run the build's stages (``indexer.runner``) over one planned target: in this
process (the default; DataLoader decode workers) or on a Ray cluster (``--executor ray``).

Both fill the same report fields and return the same :class:`RunResult`, so planning
(``indexer.plan``) and finishing (``indexer.finish``) do not know which one ran.
"""

from __future__ import annotations

import time

from indexer.config import IndexerError
from indexer.executors.base import Executor, Job, RunResult
from indexer.stages import Ledger

__all__ = ["EXECUTORS", "Executor", "Job", "RunResult", "execute", "get_executor"]

EXECUTORS = ("inprocess", "ray")


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
