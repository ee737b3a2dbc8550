"""The build's configuration and errors, shared by planning, the stages and finishing."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from retrieval.model_source import DEFAULT_MODEL

INDEXER_FORMAT = 1  # recorded in version metadata (extra.indexer)
#: ``VersionMeta.extra`` key of a version's point count, recorded by every build that knows it:
#: the count of a version a server owns (its Edge shard is locked) is known without opening it.
COUNT_KEY = "count"
#: Report lists of named files (duplicates, ignored files) keep at most this many entries.
REPORT_LIST_LIMIT = 1000
#: This process only searches to verify: rescore many int8 candidates exactly, so that models
#: whose images get nearly identical tokens (random weights) still find themselves at rank 1.
VERIFY_OPTIONS = {"oversampling": 64.0}


class IndexerError(RuntimeError):
    """A run that cannot proceed (bad arguments, index in use, verification failed)."""


class ShrinkRefusedError(IndexerError):
    """The run would empty or shrink the active version beyond ``max_shrink`` (nothing written)."""


@dataclass
class BuildConfig:
    """Options of ``cir index build`` (see docs/indexer.md)."""

    source: Path  # folder of images, or a manifest (jsonl/csv/parquet)
    index: str  # index URI: edge:PATH, local:PATH, qdrant:URL
    name: str = "gallery"  # index name
    model: str = DEFAULT_MODEL  # checkpoint folder (default: the committed demo model) or preset
    allow_untrained: bool = False  # accept a preset name (random weights)
    manifest_format: str = "auto"  # auto | jsonl | csv | parquet
    path_column: str = "path"  # manifest column holding the image path/URI
    id_column: str | None = None  # manifest column of the user's ids (None: `id` if present)
    fields: dict[str, str] = field(default_factory=dict)  # declared filterable fields -> type
    batch_size: int = 64  # images per encoder batch
    workers: int = 2  # DataLoader worker processes (0: decode in the main process)
    device: str = "auto"  # cpu | cuda | auto
    dtype: str = "auto"  # float32 | bfloat16 | auto (bf16 autocast on CUDA, fp32 on CPU)
    num_threads: int | None = None  # torch intra-op threads for the encoder (None: torch default)
    shard: str = "0/1"  # i/n: this run takes the items whose relpath hashes to i mod n
    incremental: bool = False  # add new/changed, delete vanished, into the active version
    allow_shrink: bool = False  # activate an empty/much smaller version, delete > max_shrink
    max_shrink: float = 0.5  # largest fraction of the active version's points a run may drop
    dry_run: bool = False  # compute the plan (add/change/delete/skip), write nothing
    activate: bool = True  # activate the new version once verified (never for n > 1 shards)
    verify: bool = True  # run the verification (count + self-retrieval sample)
    verify_sample: int = 32  # images queried by their own tokens during verification
    calibrate: bool = True  # measure this version's fast-mode L (retrieval.index.calibrate)
    calibrate_min_points: int = 5000  # smaller galleries search `exact` anyway: skip
    calibrate_queries: str | None = None  # .npy of real query vectors [M, D] to calibrate on
    # (e.g. a query log saved from EncodeQuery, the server's traffic reservoir); None: composed
    # queries the model makes here (gallery references + captions)
    calibration_captions: str | None = None  # one caption per line (else the model's training
    # captions when its folder names them, else CALIBRATION_TEXTS)
    calibration_queries: int = 400  # composed queries (half fit L, half held out)
    limit: int | None = None  # only the first N items (after sharding); for trials
    fresh: bool = False  # never resume: always start a new version
    build_id: str | None = None  # resume key override (several machines with different mounts)
    into: str | None = None  # write into this existing version (e.g. pre-created for shards)
    progress: bool = True  # tqdm progress bar on stderr
    progress_every_s: float = 0.0  # > 0: a plain progress line on stderr every N s (no TTY)
    progress_file: Path | None = None  # JSON {written, processed, total, version} after each write
    flush_every: int = 8  # flush (durable) every N written batches
    write_queue: int = 4  # batches buffered between encoder and writer (backpressure)
    claim_settle_s: float = 1.0  # sharded runs: wait before agreeing on the shared version
    thumbnails: bool = True  # store a base64 JPEG thumbnail in the payload
    # ---- executor (docs/indexer.md#distributed-builds-ray-data)
    executor: str = "inprocess"  # inprocess (DataLoader workers + this process) | ray
    ray_address: str | None = None  # ray: None starts a local cluster; "auto", "ray://HOST:10001"
    encoders: int = 1  # ray: encoder actors (one model each)
    gpus_per_encoder: float = 1.0  # ray: GPUs per encoder actor when the cluster has GPUs
    cpus_per_encoder: float = 1.0  # ray: CPUs per encoder actor (its torch threads on CPU)
    cpus_per_decoder: float = 1.0  # ray: CPUs per decode task (a fraction runs more at once)
    parallel_writes: bool | None = None  # ray: workers upsert (None: yes for qdrant:, else the
    # driver writes, since Edge and local indexes have one owner process)
