"""Server lifecycle: bind, health NOT_SERVING, load model + index, SERVING, refresh, drain.

    server = CIRServer(settings)                  # or CIRServer(settings, encoder=enc)
    await server.start()                          # raises StartupError (e.g. model mismatch)
    await server.wait_closed()                    # until stop()
    await server.stop()                           # SIGTERM path: NOT_SERVING, drain, close

:class:`BackgroundServer` runs one in a thread with its own event loop (tests, benchmarks).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import threading
import time
from concurrent.futures import Future as ConcurrentFuture
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection

from server._generated.cir.v1 import search_pb2 as pb
from server._generated.cir.v1 import search_pb2_grpc as pb_grpc
from server.auth import ApiKeyInterceptor
from server.config import ServerSettings
from server.engine import Engine
from server.metrics import Metrics
from server.service import IO_THREADS, SearchService

if TYPE_CHECKING:
    from retrieval.index import SearchView

logger = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["SearchService"].full_name
_SERVING = health_pb2.HealthCheckResponse.SERVING
_NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class StartupError(RuntimeError):
    """The server refuses to start (model/index mismatch, missing index, bad TLS files...)."""


def uses_search_process(settings: ServerSettings) -> bool:
    """Whether the served index is searched in a child process (``search_process`` and an
    ``edge:``/``local:`` index; a ``qdrant:`` server is searched over the network)."""
    from retrieval.index import parse_uri

    return settings.search_process and parse_uri(settings.index)[0] != "qdrant"


def default_threads(settings: ServerSettings) -> int | None:
    """Torch threads when none are configured: with a search process, one core fewer than
    torch would take, which the search process needs (on 2 cores at 100k: 224 QPS with 1 torch
    thread against 179 with 2, docs/benchmarks.md); otherwise torch's default."""
    import torch

    if settings.num_threads is not None or not uses_search_process(settings):
        return settings.num_threads  # configured (flag, CIR_NUM_THREADS, file), or torch's
    return max(1, min(torch.get_num_threads(), (os.cpu_count() or 2) - 1))


def load_encoder(settings: ServerSettings) -> Any:
    from retrieval.encoder import Encoder

    return Encoder.from_pretrained(
        settings.model,
        device=settings.device,
        dtype=settings.dtype,
        num_threads=default_threads(settings),
    )


def load_reranker(settings: ServerSettings, encoder: Any, model_folder: bool = True) -> Any:
    """The re-ranker to serve with, or None: ``settings.reranker``, else MODEL/reranker when the
    model folder has one (``model_folder``: the encoder was loaded from ``settings.model``);
    none when ``rerank_k`` is 0. Refuses (StartupError) a re-ranker that cannot be loaded or
    was trained on another encoder's features (the fingerprint guard)."""
    from retrieval.rerank import RerankerError, load_reranker_for

    if settings.rerank_k == 0 or (settings.reranker is None and not model_folder):
        return None
    try:
        rr = load_reranker_for(settings.model, settings.reranker, encoder, device=encoder.device)
    except RerankerError as exc:
        raise StartupError(f"refusing to start: {exc}") from exc
    if rr is not None:
        logger.info("re-ranker %s loaded (%s features)", rr.fingerprint, rr.config.features)
    elif settings.reranker is None and settings.rerank_k:
        raise StartupError(
            f"refusing to start: --rerank {settings.rerank_k} needs a re-ranker, and "
            f"{settings.model} has none (--reranker DIR)"
        )
    return rr


def open_served_index(settings: ServerSettings, encoder: Any) -> SearchView:
    """Open the index read-only with the model guard; raise StartupError saying why not."""
    from retrieval.index import (
        GalleryIndexError,
        IndexInUseError,
        IndexNotFoundError,
        IndexUnavailableError,
        ModelMismatchError,
        open_index,
    )
    from retrieval.index.process import ProcessIndex

    kwargs: dict[str, Any] = dict(
        encoder_fingerprint=encoder.fingerprint,
        force=settings.force,
        read_only=True,
        api_key=settings.index_api_key,
    )
    in_child = uses_search_process(settings)
    index: SearchView
    try:
        if in_child:
            index = ProcessIndex(
                settings.index, settings.name, connections=IO_THREADS + 2, **kwargs
            )
        else:
            index = open_index(settings.index, settings.name, **kwargs)
    except ModelMismatchError as exc:
        raise StartupError(
            f"refusing to start: the index {settings.name!r} at {settings.index} was built by "
            f"another encoder than {settings.model!r} (fingerprint {encoder.fingerprint}): "
            f"{exc}. Serve the model the index was built with, rebuild the index, or pass "
            "--force to serve anyway."
        ) from exc
    except IndexNotFoundError as exc:
        raise StartupError(f"refusing to start: {exc}") from exc
    except IndexInUseError as exc:
        raise StartupError(f"refusing to start: the index is in use: {exc}") from exc
    except IndexUnavailableError as exc:
        raise StartupError(f"refusing to start: the index backend is unreachable: {exc}") from exc
    except GalleryIndexError as exc:
        raise StartupError(f"refusing to start: cannot open the index: {exc}") from exc
    meta = index.meta
    if meta is not None and int(meta.shape[1]) != int(encoder.dim) and not settings.force:
        index.close()
        raise StartupError(
            f"refusing to start: the index stores {meta.shape[1]}-d tokens, the encoder makes "
            f"{encoder.dim}-d vectors"
        )
    return index


class CIRServer:
    """The gRPC server. ``encoder``/``index`` may be given (tests); else loaded from settings."""

    def __init__(
        self,
        settings: ServerSettings,
        *,
        encoder: Any = None,
        index: SearchView | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.settings = settings
        self.metrics = metrics or Metrics()
        self._encoder = encoder
        self._index = index
        self._owns_index = index is None
        self.service = SearchService(settings, self.metrics)
        self.health = health_aio.HealthServicer()
        self.port = 0
        self.metrics_port = 0
        self._server: grpc.aio.Server | None = None
        self._refresher: asyncio.Task[None] | None = None
        self._closed = asyncio.Event()
        self._stopping = False

    # ------------------------------------------------------------------ helpers
    async def _set_health(self, status: Any) -> None:
        for name in ("", SERVICE_NAME):
            await self.health.set(name, status)

    def _credentials(self) -> grpc.ServerCredentials | None:
        s = self.settings
        if s.tls_cert is None or s.tls_key is None:
            return None
        try:
            cert, key = Path(s.tls_cert).read_bytes(), Path(s.tls_key).read_bytes()
        except OSError as exc:
            raise StartupError(f"refusing to start: cannot read TLS files: {exc}") from exc
        return grpc.ssl_server_credentials([(key, cert)])

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        """Listen at once (health NOT_SERVING), load, then SERVING. Raises StartupError."""
        s = self.settings
        # gRPC core cancels calls beyond a backlog of ~1000 not yet handed to the server
        # (CANCELLED); with a backlog far above any burst they reach the concurrency limit
        # instead and are answered RESOURCE_EXHAUSTED (a pending call holds little memory)
        backlog = max(16_384, 8 * s.maximum_concurrent_rpcs)
        opts = [
            ("grpc.max_send_message_length", s.max_message_bytes),
            ("grpc.max_receive_message_length", s.max_message_bytes),
            ("grpc.so_reuseport", 0),
            ("grpc.server.max_pending_requests", backlog),
            ("grpc.server.max_pending_requests_hard_limit", 2 * backlog),
        ]
        interceptors = [ApiKeyInterceptor(s.keys)] if s.keys else []
        server = grpc.aio.server(
            interceptors=interceptors,
            options=opts,
            maximum_concurrent_rpcs=s.maximum_concurrent_rpcs,
        )
        pb_grpc.add_SearchServiceServicer_to_server(self.service, server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection(
            (
                SERVICE_NAME,
                health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                reflection.SERVICE_NAME,
            ),
            server,
        )
        await self._set_health(_NOT_SERVING)
        address = f"{s.host}:{s.port}"
        creds = self._credentials()
        try:
            port = (
                server.add_secure_port(address, creds)
                if creds is not None
                else server.add_insecure_port(address)
            )
        except RuntimeError as exc:
            raise StartupError(f"refusing to start: cannot bind {address}: {exc}") from exc
        if port == 0:
            raise StartupError(f"refusing to start: cannot bind {address}")
        self.port = port
        self._server = server
        await server.start()
        logger.info(
            "listening on %s:%d (%s, auth %s); loading model and index",
            s.host,
            port,
            "TLS" if creds else "plaintext",
            "on" if s.keys else "off",
        )
        try:
            self.metrics_port = self.metrics.serve(s.metrics_port, s.metrics_host)
            loop = asyncio.get_running_loop()
            engine = await loop.run_in_executor(None, self._load)
        except BaseException:
            await server.stop(0)
            self._closed.set()
            raise
        self.service.attach(engine)
        self.metrics.index_count.set(await loop.run_in_executor(None, engine.index.count))
        if s.refresh_interval_s > 0:
            self._refresher = loop.create_task(self._refresh_loop(), name="cir-index-refresh")
        await self._set_health(_SERVING)
        logger.info(
            "SERVING %s version %s (%s) with %s",
            engine.index.name,
            engine.version,
            engine.index.backend,
            engine.encoder.fingerprint,
        )

    def _load(self) -> Engine:
        t0 = time.perf_counter()
        try:
            encoder = self._encoder if self._encoder is not None else load_encoder(self.settings)
        except (FileNotFoundError, KeyError, ValueError, RuntimeError) as exc:
            raise StartupError(
                f"refusing to start: cannot load model {self.settings.model!r}: {exc}"
            ) from exc
        index = (
            self._index if self._index is not None else open_served_index(self.settings, encoder)
        )
        if self._index is not None:  # given by the caller: still enforce the model guard
            meta = index.meta
            if (
                meta is not None
                and meta.encoder_fingerprint != encoder.fingerprint
                and not self.settings.force
            ):
                raise StartupError(
                    f"refusing to start: the index was built by another encoder "
                    f"(index fingerprint {meta.encoder_fingerprint}, encoder "
                    f"{encoder.fingerprint}); pass --force to serve anyway"
                )
        reranker = load_reranker(self.settings, encoder, model_folder=self._encoder is None)
        engine = Engine(self.settings, encoder, index, reranker)
        try:
            engine.check_reranker_features()
        except RuntimeError as exc:
            raise StartupError(f"refusing to start: {exc}") from exc
        logger.info("model and index ready in %.1fs", time.perf_counter() - t0)
        return engine

    async def _refresh_loop(self) -> None:
        """Poll the index pointer; switch to a newly activated version without a restart."""
        from retrieval.index import IndexUnavailableError, ModelMismatchError

        engine = self.service.engine
        assert engine is not None
        loop = asyncio.get_running_loop()
        warned: set[str] = set()
        while True:
            await asyncio.sleep(self.settings.refresh_interval_s)
            try:
                changed = await loop.run_in_executor(None, engine.index.refresh)
            except ModelMismatchError as exc:
                msg = str(exc)
                if msg not in warned:
                    warned.add(msg)
                    logger.error("not switching index version (model mismatch): %s", exc)
                continue
            except asyncio.CancelledError:
                raise
            except IndexUnavailableError as exc:  # the search process died; it restarts
                logger.warning("index refresh failed (%s); still serving %s", exc, engine.version)
                continue
            except Exception:
                logger.exception("index refresh failed; still serving %s", engine.version)
                continue
            if changed:
                self.metrics.index_switches.inc()
                self.metrics.index_count.set(await loop.run_in_executor(None, engine.index.count))
                logger.info("now serving index version %s", engine.version)

    async def stop(self, grace: float | None = None) -> None:
        """NOT_SERVING, stop accepting, let in-flight calls finish (``grace`` s), close."""
        if self._stopping:
            await self._closed.wait()
            return
        self._stopping = True
        grace = self.settings.grace_s if grace is None else grace
        logger.info("shutting down: draining in-flight requests (grace %.1fs)", grace)
        await self.health.enter_graceful_shutdown()
        if self._refresher is not None:
            self._refresher.cancel()
        if self._server is not None:
            await self._server.stop(grace)
        await self.service.drain(max(1.0, grace))
        if self._index is None and self.service.engine is not None and self._owns_index:
            self.service.engine.index.close()
        self.metrics.close()
        self._closed.set()
        logger.info("stopped")

    async def wait_closed(self) -> None:
        await self._closed.wait()


async def serve(settings: ServerSettings) -> int:
    """Run until SIGTERM/SIGINT; returns the process exit code."""
    server = CIRServer(settings)
    loop = asyncio.get_running_loop()
    stop_requested = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop_requested.set)
    try:
        await server.start()
    except StartupError as exc:
        logger.error("%s", exc)
        return 2
    print(f"cir serve: listening on {settings.host}:{server.port}", flush=True)
    await stop_requested.wait()
    await server.stop()
    return 0


class BackgroundServer:
    """A CIRServer on its own event loop in a daemon thread (tests, benchmarks)."""

    def __init__(self, settings: ServerSettings, **kwargs: Any) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True, name="cir-aio")
        self._thread.start()
        self.server = self.call(self._make(settings, kwargs))

    @staticmethod
    async def _make(settings: ServerSettings, kwargs: dict[str, Any]) -> CIRServer:
        return CIRServer(settings, **kwargs)

    def call(self, coro: Any, timeout: float | None = 120.0) -> Any:
        fut: ConcurrentFuture[Any] = asyncio.run_coroutine_threadsafe(coro, self.loop)
        return fut.result(timeout)

    def start(self) -> BackgroundServer:
        self.call(self.server.start())
        return self

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.server.port}"

    def stop(self, grace: float = 1.0) -> None:
        try:
            self.call(self.server.stop(grace))
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(10)
            if not self.loop.is_running():
                self.loop.close()

    def __enter__(self) -> BackgroundServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


__all__ = [
    "BackgroundServer",
    "CIRServer",
    "StartupError",
    "load_encoder",
    "open_served_index",
    "serve",
]
