"""Prometheus metrics (own registry per server, so several servers can live in one process)."""

from __future__ import annotations

import logging
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

logger = logging.getLogger(__name__)

_LATENCY_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.02,
    0.035,
    0.05,
    0.075,
    0.1,
    0.15,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Metrics:
    """Requests by method and code, latency per stage, batch sizes, queue depth, cache hits."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "cir_requests", "RPCs by method and status code", ["method", "code"], registry=r
        )
        self.latency = Histogram(
            "cir_request_seconds",
            "RPC latency by method",
            ["method"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.stage = Histogram(
            "cir_stage_seconds",
            "Time per stage (queue, decode, reference, encode, search)",
            ["stage"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "cir_batch_size", "Queries per micro-batch", buckets=_BATCH_BUCKETS, registry=r
        )
        self.queue_depth = Gauge("cir_queue_depth", "Queries waiting to be encoded", registry=r)
        self.inflight = Gauge("cir_inflight_requests", "RPCs being handled", registry=r)
        self.dropped = Counter(
            "cir_dropped_queries", "Queries dropped before encoding", ["reason"], registry=r
        )
        self.client_gone = Counter(
            "cir_client_gone",
            "Calls whose client left before the answer (deadline passed or cancelled)",
            ["method", "reason"],
            registry=r,
        )
        self.rejected = Counter(
            "cir_admission_rejected",
            "Queries refused at admission (queue full or wait over the bound / the deadline)",
            registry=r,
        )
        self.service_rate = Gauge(
            "cir_service_rate_qps", "Measured queries per second the model drains", registry=r
        )
        self.cache = Counter(
            "cir_feature_cache", "Reference feature cache lookups", ["result"], registry=r
        )
        self.rerank_cache = Counter(
            "cir_rerank_cache",
            "Re-ranker candidate feature cache lookups (rerank_cache_mb)",
            ["result"],
            registry=r,
        )
        self.index_count = Gauge(
            "cir_index_points", "Gallery items in the served version", registry=r
        )
        self.index_switches = Counter(
            "cir_index_switches", "Switches to a newly activated index version", registry=r
        )
        # the recall guard (server/recall_guard.py): live fast recall@10 per served version
        self.guard_recall = Gauge(
            "cir_recall_guard_recall",
            "Running recall@10 of sampled live fast searches against exact search",
            ["version"],
            registry=r,
        )
        self.guard_lower = Gauge(
            "cir_recall_guard_recall_lower_bound",
            "One-sided Wilson lower confidence bound of that recall",
            ["version"],
            registry=r,
        )
        self.guard_samples = Gauge(
            "cir_recall_guard_samples",
            "Sampled fast searches the running recall is measured on (the current window)",
            ["version"],
            registry=r,
        )
        self.guard_fast_l = Gauge(
            "cir_recall_guard_fast_l",
            "Prefetch size L the guard set for a version (-1: searched exactly)",
            ["version"],
            registry=r,
        )
        self.guard_actions = Counter(
            "cir_recall_guard_actions",
            "Guard interventions (raise-L, exact) when the recall bound fell below the target",
            ["action"],
            registry=r,
        )
        self._http: Any = None

    def serve(self, port: int, host: str = "127.0.0.1") -> int:
        """Expose /metrics on ``port`` (0: disabled); returns the port."""
        if port <= 0:
            return 0
        result = start_http_server(port, addr=host, registry=self.registry)
        self._http = result
        logger.info("metrics on http://%s:%d/metrics", host, port)
        return port

    def close(self) -> None:
        http = self._http
        self._http = None
        if isinstance(http, tuple) and http:  # prometheus_client >= 0.17 returns (server, thread)
            try:
                http[0].shutdown()
                http[0].server_close()
            except Exception:  # pragma: no cover - best effort
                logger.debug("metrics server close failed", exc_info=True)
