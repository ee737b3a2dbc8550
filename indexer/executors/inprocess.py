"""The default executor: decode/preprocess in torch DataLoader workers, encode in this process
(the driver's encoder), a writer thread with a bounded queue."""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np

from indexer.decode import DecodedBatch, ImageDataset, collate, worker_init
from indexer.executors.base import Job, RunResult, run_stages
from indexer.stages import Progress, WriteBatch, encode_pixels

logger = logging.getLogger(__name__)


class InProcessExecutor:
    """reader = DataLoader over :class:`ImageDataset`; mapper = ledger + encoder; writer."""

    def run(self, job: Job) -> RunResult:
        from torch.utils.data import DataLoader

        cfg, enc, ledger = job.cfg, job.enc, job.ledger
        progress = Progress(cfg, len(job.items))
        encode_s = 0.0
        loader: Any = None

        def reader() -> Any:
            nonlocal loader
            dataset = ImageDataset(
                job.items, enc.preprocessor, job.present, thumbnails=cfg.thumbnails
            )
            workers = max(0, int(cfg.workers))
            loader = DataLoader(
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
            return loader

        def mapper() -> Any:
            def encode(batch: DecodedBatch) -> WriteBatch | None:
                nonlocal encode_s
                rows = ledger.select(batch.items)
                if not rows:
                    return None
                t0 = time.perf_counter()
                chosen = [batch.items[p] for p in rows]
                px_rows = [batch.usable.index(p) for p in rows]
                px = (
                    batch.pixels if len(px_rows) == batch.pixels.shape[0] else batch.pixels[px_rows]
                )
                tokens, ok, details = encode_pixels(
                    enc, px, [d.payload for d in chosen], patches=job.store_patches
                )
                encode_s += time.perf_counter() - t0
                good = ledger.encoded(chosen, ok, details)
                if not good:
                    return None
                return WriteBatch(
                    [d.id for d in good if d.id is not None],
                    tokens[np.asarray(ok)],
                    [d.payload for d in good],
                )

            return encode

        try:
            stats, w = run_stages(job, progress, reader, mapper)
        finally:
            del loader
        return RunResult(w.written, stats.wait_s, encode_s, w.busy_s, w.blocked_s)
