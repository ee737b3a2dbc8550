"""Server configuration: flags > environment (``CIR_*``) > config file (TOML/YAML) > defaults.

    settings = load_settings("server.toml", port=6000)      # flags are keyword arguments
    CIR_PORT=6000 CIR_API_KEYS='["k1","k2"]' cir serve ...

A config file holds the same field names at top level (or under a ``[server]`` table).
"""

from __future__ import annotations

import contextvars
import logging
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from retrieval.index.api import DEFAULT_URI

logger = logging.getLogger(__name__)

MiB = 1024 * 1024
_CONFIG_FILE: contextvars.ContextVar[Path | None] = contextvars.ContextVar(
    "cir_server_config_file", default=None
)


class ServerSettings(BaseSettings):
    """Everything ``cir serve`` can be told. See docs/api.md for the table."""

    model_config = SettingsConfigDict(env_prefix="CIR_", extra="forbid", validate_default=True)

    # --- what to serve
    model: str = "models/sprc-shapes"  # checkpoint folder or preset name (tiny, sprc-small, ...)
    index: str = DEFAULT_URI  # index URI: edge:PATH | qdrant:URL | local:PATH
    name: str = "gallery"  # index name at that URI
    force: bool = False  # serve even if the index was built by another encoder (fingerprint)
    index_api_key: str | None = None  # API key of a Qdrant server backend
    image_root: Path | None = None  # base folder for relative payload paths (originals)
    # edge:/local: indexes: search in a child process. Their engines hold the GIL for a whole
    # query, which stalls the model and the event loop; a qdrant: server is reached over the
    # network (no GIL held), so it is always searched in-process
    search_process: bool = True

    # --- second stage: a re-ranker over the first stage's top rerank_k
    reranker: str | None = None  # re-ranker folder (None: MODEL/reranker when the folder has one)
    rerank_k: int | None = Field(None, ge=0)  # default rerank_k of a request that sets none
    # (None: 25 with a re-ranker; 0: re-ranking off and no re-ranker loaded)
    max_rerank_k: int = Field(200, ge=1, le=1000)  # largest accepted SearchRequest.rerank_k

    # --- network
    host: str = "127.0.0.1"  # bind address ("0.0.0.0" for all interfaces)
    port: int = Field(50051, ge=0, le=65535)  # gRPC port (0: pick a free one)
    metrics_port: int = Field(9095, ge=0, le=65535)  # Prometheus /metrics port (0: disabled)
    metrics_host: str = "127.0.0.1"  # Prometheus bind address
    max_message_bytes: int = Field(32 * MiB, ge=MiB)  # gRPC send/receive message limit
    api_key: str | None = None  # one accepted API key (x-api-key / Bearer); unset: no auth
    api_keys: list[str] = Field(default_factory=list)  # more accepted keys (rotation)
    tls_cert: Path | None = None  # PEM certificate chain; with tls_key enables TLS
    tls_key: Path | None = None  # PEM private key

    # --- model runtime
    device: str = "cpu"  # cpu | cuda | auto
    dtype: str = "float32"  # retrieval.precision: auto | fp32 | bf16 | fp16 (or float32 | bfloat16 | float16)
    num_threads: int | None = Field(None, ge=1)  # torch intra-op threads (None: torch default)
    # torch threads for batches of BATCH_THREADS_MIN+ queries (None: num_threads); a lone query's
    # small matmuls lose more to thread hand-offs than they gain, a batch's do not
    batch_threads: int | None = Field(None, ge=1)
    # torch threads for the re-ranker's batch (None: as for an encoder batch of its size); it
    # runs after the batch's search, when the search process's core may be free
    rerank_threads: int | None = Field(None, ge=1)

    # --- batching and admission
    max_batch: int = Field(16, ge=1, le=1024)  # largest micro-batch (1 disables batching)
    max_wait_ms: float = Field(2.0, ge=0.0, le=10_000.0)  # wait after the first query of a batch
    adaptive_wait: bool = True  # skip that wait for a lone query while recent batches held one
    queue_size: int = Field(256, ge=1)  # queued queries beyond which RESOURCE_EXHAUSTED
    # admission bound on the estimated queue wait (queries ahead / measured service rate) once
    # two batches are queued: beyond it RESOURCE_EXHAUSTED with retry-after-ms
    max_queue_ms: float = Field(250.0, gt=0)
    # RPCs the gRPC server handles at once; beyond it gRPC answers RESOURCE_EXHAUSTED itself
    # (without it grpc.aio's backlog of ~1000 unhandled calls cancels the excess: CANCELLED)
    maximum_concurrent_rpcs: int = Field(1024, ge=1)
    max_batch_queries: int = Field(64, ge=1)  # queries per SearchBatch call
    default_timeout_s: float = Field(30.0, gt=0)  # deadline for calls that set none

    # --- request limits
    max_image_bytes: int = Field(10 * MiB, ge=1)  # reference image size before decoding
    max_image_pixels: int = Field(36_000_000, ge=1)  # reference image width*height
    max_text_chars: int = Field(1000, ge=1)  # longest accepted text (characters)
    max_top_k: int = Field(1000, ge=1, le=1000)  # largest top_k
    max_offset: int = Field(9000, ge=0, le=9999)  # largest offset (offset+top_k <= 10000)
    max_page_size: int = Field(500, ge=1, le=1000)  # ListImages page size limit

    # --- the recall guard (server/recall_guard.py): live fast searches checked against exact
    recall_guard_rate: float = Field(0.01, ge=0.0, le=1.0)  # share of fast searches (0: off)
    recall_guard_max_per_s: float = Field(5.0, ge=0.0)  # exact checks per second at most
    recall_guard_min_samples: int = Field(100, ge=1)  # checked queries before the guard acts
    recall_guard_window: int = Field(1000, ge=1)  # recent checked queries the estimate covers
    recall_guard_confidence: float = Field(0.95, gt=0.5, lt=1.0)  # one-sided Wilson bound
    recall_target: float = Field(0.99, gt=0.0, le=1.0)  # recall@10 fast promises
    # query vectors kept for `cir index calibrate --queries` (0: none) and where they are
    # written (None: PATH/<name>/traffic_queries.npy for edge:/local: indexes, none for qdrant:)
    query_reservoir: int = Field(2000, ge=0)
    query_reservoir_file: Path | None = None
    query_reservoir_save_s: float = Field(60.0, ge=0.0)  # write interval (0: only at shutdown)

    # --- caches, refresh, shutdown
    feature_cache_size: int = Field(2048, ge=0)  # gallery reference ViT features kept (0: off)
    feature_cache_mb: float = Field(512.0, ge=0)  # byte bound of that cache
    # the re-ranker's per-candidate features ("patches": ViT tokens, float16), by point id: a
    # warm cache lets a re-ranked search skip reading them from the index (0: off)
    rerank_cache_mb: float = Field(256.0, ge=0)
    refresh_interval_s: float = Field(2.0, ge=0)  # poll for a newly activated version (0: off)
    grace_s: float = Field(15.0, ge=0)  # SIGTERM: time in-flight requests get to finish
    log_format: Literal["json", "text"] = "json"  # structured (JSON lines) or plain logs

    @field_validator("api_keys", mode="before")
    @classmethod
    def _split_keys(cls, v: Any) -> Any:
        if isinstance(v, str):  # "k1,k2" from a flag or a plain env value
            return [k.strip() for k in v.split(",") if k.strip()]
        return v

    @model_validator(mode="after")
    def _check_tls(self) -> ServerSettings:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key must be given together")
        return self

    @property
    def keys(self) -> list[str]:
        """All accepted API keys (empty: authentication off)."""
        keys = list(self.api_keys)
        if self.api_key:
            keys.insert(0, self.api_key)
        return [k for k in keys if k]

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        path = _CONFIG_FILE.get()
        if path is not None:
            sources.append(_FileSource(settings_cls, path))
        return tuple(sources)


class _FileSource(PydanticBaseSettingsSource):
    """A TOML or YAML file (by extension); keys at top level or under ``server``."""

    def __init__(self, settings_cls: type[BaseSettings], path: Path) -> None:
        super().__init__(settings_cls)
        self.data = read_config_file(path)

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return self.data.get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return dict(self.data)


def read_config_file(path: Path) -> dict[str, Any]:
    """Parse a TOML (.toml) or YAML (.yaml/.yml) config file into a dict."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    text = path.read_text()
    if path.suffix.lower() == ".toml":
        import tomllib

        data: Any = tomllib.loads(text)
    elif path.suffix.lower() in (".yaml", ".yml"):
        import yaml

        data = yaml.safe_load(text) or {}
    else:
        raise ValueError(f"config file {path}: use .toml, .yaml or .yml")
    if not isinstance(data, dict):
        raise ValueError(f"config file {path}: expected a table/mapping at top level")
    if isinstance(data.get("server"), dict):
        data = data["server"]
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def load_settings(config_file: str | Path | None = None, **flags: Any) -> ServerSettings:
    """Settings from ``flags`` (None values are ignored) > env > ``config_file`` > defaults."""
    given = {k: v for k, v in flags.items() if v is not None}
    token = _CONFIG_FILE.set(Path(config_file) if config_file else None)
    try:
        return ServerSettings(**given)
    finally:
        _CONFIG_FILE.reset(token)


__all__ = ["ServerSettings", "load_settings", "read_config_file"]
