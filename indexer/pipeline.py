"""The batch indexing pipeline: plan -> stages (reader -> decode/preprocess -> encode -> write,
run by an executor: in this process, or on Ray) -> finish (delete, verify, calibrate,
activate). ``build`` composes them; the steps live in ``indexer.plan``, ``indexer.stages``,
``indexer.runner``, ``indexer.executors`` and ``indexer.finish``.

Exactly once: a point's id is uuid5 of the sha256 of the file's bytes, so re-writing an image is
idempotent. A rebuild writes into a new version whose metadata carries a ``build_key`` (source,
encoder, fields, name); a later run with the same key finds that unfinished version again, skips
the ids already in it and finishes it. Nothing is activated before it is verified.

Safe by default: a version that is empty, or that would shrink the active one by more than
``max_shrink``, is not activated; an incremental run does not delete more than that fraction of
the active version (both unless ``allow_shrink``); ``dry_run`` computes the plan and writes
nothing; random-weight presets are refused unless ``allow_untrained``.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from indexer.config import (
    COUNT_KEY,
    INDEXER_FORMAT,
    REPORT_LIST_LIMIT,
    VERIFY_OPTIONS,
    BuildConfig,
    IndexerError,
    ShrinkRefusedError,
)
from indexer.decode import PresentSet
from indexer.executors import EXECUTORS, Job, execute
from indexer.finish import (
    CALIBRATION_TEXTS,
    calibrate_index,
    calibrate_version,
    composed_queries,
    finish,
    load_query_vectors,
    read_captions,
    training_captions,
    verify_version,
)
from indexer.plan import active_count, build_key, delete_refusal, open_target, shrink_refusal
from indexer.report import Report
from indexer.sources import parse_shard
from indexer.stages import Ledger, load_encoder, load_encoder_check, read_listing

if TYPE_CHECKING:
    from retrieval.encoder import Encoder

__all__ = [
    "CALIBRATION_TEXTS",
    "COUNT_KEY",
    "EXECUTORS",
    "INDEXER_FORMAT",
    "REPORT_LIST_LIMIT",
    "VERIFY_OPTIONS",
    "BuildConfig",
    "IndexerError",
    "ShrinkRefusedError",
    "active_count",
    "build",
    "build_key",
    "calibrate_index",
    "calibrate_version",
    "composed_queries",
    "delete_refusal",
    "load_encoder",
    "load_encoder_check",
    "load_query_vectors",
    "read_captions",
    "shrink_refusal",
    "training_captions",
    "verify_version",
]

logger = logging.getLogger(__name__)


def build(cfg: BuildConfig, encoder: Encoder | None = None) -> Report:
    """Run one ``cir index build``; returns the report (also on verification failure)."""
    from retrieval.rerank import stores_patches

    t_start = time.perf_counter()
    stages: dict[str, float] = {}
    shard_i, shard_n = parse_shard(cfg.shard)
    if cfg.executor not in EXECUTORS:
        raise IndexerError(f"unknown executor {cfg.executor!r}: use one of {', '.join(EXECUTORS)}")
    report = Report(
        index=cfg.index,
        name=cfg.name,
        shard=f"{shard_i}/{shard_n}",
        source=str(cfg.source),
        mode="incremental" if cfg.incremental else "rebuild",
    )
    if encoder is None:  # a refused model fails before the source is read
        load_encoder_check(cfg)
    # read the calibration queries first: a bad file fails before hours of encoding
    calib_q = None if cfg.calibrate_queries is None else load_query_vectors(cfg.calibrate_queries)
    captions = None if cfg.calibration_captions is None else read_captions(cfg.calibration_captions)

    listing = read_listing(cfg, report, stages)
    enc = _encoder(cfg, encoder, report, stages)
    if calib_q is not None and calib_q.shape[1] != enc.dim:
        raise IndexerError(
            f"calibration queries {cfg.calibrate_queries} are {calib_q.shape[1]}-d; "
            f"the model {cfg.model!r} makes {enc.dim}-d queries"
        )
    with open_target(cfg, enc, listing, report, stages) as target:
        if target.view is not None:  # None: a dry run, planned and done
            job = Job(
                cfg=target.cfg,
                enc=enc,
                items=listing.items,
                view=target.view,
                present=PresentSet(target.present_ids),
                ledger=Ledger(listing.items, report, target.existing, listing.all_relpaths),
                report=report,
                stages=stages,
                # the model folder's re-ranker reads candidates' ViT tokens: store them
                store_patches=stores_patches(cfg.model, enc.fingerprint),
            )
            ledger = execute(job)
            finish(target, enc, listing, ledger, report, stages, calib_q, captions)
    report.seconds = time.perf_counter() - t_start
    report.stage_seconds = stages
    return report


def _encoder(
    cfg: BuildConfig, encoder: Encoder | None, report: Report, stages: dict[str, float]
) -> Encoder:
    """The driver's encoder (given, or loaded), checked, and named in the report."""
    t0 = time.perf_counter()
    enc = encoder if encoder is not None else load_encoder(cfg)
    stages["load_model"] = time.perf_counter() - t0
    if getattr(enc, "untrained", False) and not cfg.allow_untrained:
        raise IndexerError(
            f"cir index build: the encoder has RANDOM weights ({enc.source}): its index would "
            "mean nothing. Use a trained checkpoint folder, or allow_untrained=True."
        )
    report.preset, report.encoder_fingerprint = enc.preset, enc.fingerprint
    report.model = getattr(enc, "source", str(cfg.model))
    report.untrained = bool(getattr(enc, "untrained", False))
    report.dry_run = cfg.dry_run
    report.device, report.dtype = str(enc.device), str(enc.dtype).replace("torch.", "")
    return enc
