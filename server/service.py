"""``cir.v1.SearchService`` on grpc.aio: the thin gRPC adapter.

Each RPC checks its request (server/validation.py), hands the work to the dispatcher
(server/dispatch.py: admission, batching, the model, the index) or the engine, and builds its
reply (server/responses.py). Every failure goes through :func:`rpc`, which maps it with the
one error table (server/errors.py), assigns the request id, records metrics and writes one
structured log line per call (rejections under overload and calls whose client already left
at DEBUG: they are counted in the metrics, and writing them would cost an overloaded server
more than the rejection itself).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc

from server._generated.cir.v1 import search_pb2 as pb
from server._generated.cir.v1 import search_pb2_grpc as pb_grpc
from server.dispatch import IO_THREADS, Dispatcher
from server.engine import Engine, Query
from server.errors import RequestError, is_mapped, status_of
from server.logs import access_level
from server.metrics import Metrics
from server.responses import (
    MODE_VALUES,
    encode_response,
    explain_response,
    info_response,
    list_response,
    recall_guard_info,
    search_response,
)
from server.validation import (
    DEFAULT_PAGE_SIZE,
    DEFAULT_TOP_K,
    check_batch,
    check_text,
    deadline,
    explain_id,
    explain_request,
    image_request,
    page_request,
    parse_query,
    prefixed,
)

logger = logging.getLogger(__name__)
access_log = logging.getLogger("server.access")

__all__ = [
    "DEFAULT_PAGE_SIZE",
    "DEFAULT_TOP_K",
    "IO_THREADS",
    "MODE_VALUES",
    "SearchService",
    "make_recall_guard",
    "recall_guard_info",
    "rpc",
]


def _request_id(context: grpc.aio.ServicerContext) -> str:
    for k, v in context.invocation_metadata() or ():
        if k == "x-request-id":
            value = v.decode() if isinstance(v, bytes) else str(v)
            if 0 < len(value) <= 64 and value.isprintable():
                return value
    return uuid.uuid4().hex[:16]


#: A call whose deadline is this close (s) is treated as left by its client: its own timer has
#: fired or is about to, and a status sent now would meet a call gRPC already closed.
_GONE_S = 0.005


def _client_gone(context: Any) -> str | None:
    """Why the client no longer waits for this call ("deadline", "cancelled"), or None."""
    try:
        if context.cancelled():
            return "cancelled"
        remaining = context.time_remaining()
    except Exception:  # a context without these (tests' fakes): assume the client waits
        return None
    if remaining is not None and remaining <= _GONE_S:
        return "deadline"
    return None


#: Access-log level per status code (others: WARNING). Rejections under overload and calls the
#: client left are DEBUG: counted in the metrics, not worth a line each when thousands arrive.
_LEVELS = {
    grpc.StatusCode.OK: logging.INFO,
    grpc.StatusCode.RESOURCE_EXHAUSTED: logging.DEBUG,
    grpc.StatusCode.CANCELLED: logging.DEBUG,
    grpc.StatusCode.INTERNAL: logging.ERROR,
}


def _access_log(
    method: str, code: grpc.StatusCode, message: str, rid: str, s: float, ctx: Any
) -> None:
    level = access_level(method, _LEVELS.get(code, logging.WARNING))
    if code == grpc.StatusCode.DEADLINE_EXCEEDED and _client_gone(ctx):
        level = logging.DEBUG  # the client left; counted in cir_client_gone
    if access_log.isEnabledFor(level):
        access_log.log(
            level,
            "%s %s %.1fms%s",
            method,
            code.name,
            s * 1000.0,
            f" {message}" if message else "",
            extra={
                "request_id": rid,
                "method": method,
                "code": code.name,
                "ms": round(s * 1000.0, 2),
            },
        )


def rpc(method: str) -> Callable[..., Any]:
    """Wrap an RPC implementation ``fn(self, request, context, rid)``: its exceptions become
    status codes through the one table (server/errors.py); an exception the table does not
    list is INTERNAL, logged with its traceback, and its text is not sent."""

    def deco(fn: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
        @functools.wraps(fn)
        async def wrapper(self: SearchService, request: Any, context: Any) -> Any:
            rid = _request_id(context)
            t0 = time.perf_counter()
            code = grpc.StatusCode.OK
            message = ""
            m = self.metrics
            m.inflight.inc()
            try:
                if not self.ready:
                    raise RequestError(
                        "UNAVAILABLE", "server is not ready (loading, or shutting down)"
                    )
                resp = await fn(self, request, context, rid)
                context.set_trailing_metadata((("x-request-id", rid),))
                return resp
            except asyncio.CancelledError:
                if code == grpc.StatusCode.OK:  # gRPC cancelled the handler: the client left
                    code = grpc.StatusCode.CANCELLED
                    m.client_gone.labels(method, _client_gone(context) or "cancelled").inc()
                raise
            except grpc.aio.AbortError:  # raised by context.abort itself
                raise
            except Exception as exc:
                status = status_of(exc, f"internal error (request id {rid})")
                code, message = status.code, status.message
                trailing: list[tuple[str, str]] = [("x-request-id", rid)]
                if code == grpc.StatusCode.INTERNAL and not isinstance(exc, RequestError):
                    # a bug or a broken index: keep the trace (a RequestError was logged where
                    # it was made)
                    logger.exception("unhandled error in %s", method, extra={"request_id": rid})
                if is_mapped(exc):
                    gone = _client_gone(context)
                    if gone:  # nobody to tell: aborting a closed call only makes gRPC log
                        code = grpc.StatusCode.CANCELLED if gone == "cancelled" else code
                        m.client_gone.labels(method, gone).inc()
                        raise asyncio.CancelledError from None
                    if status.retry_after_ms is not None:
                        trailing.append(("retry-after-ms", str(status.retry_after_ms)))
                await context.abort(code, message, trailing_metadata=tuple(trailing))
            finally:
                elapsed = time.perf_counter() - t0
                m.inflight.dec()
                m.requests.labels(method, code.name).inc()
                m.latency.labels(method).observe(elapsed)
                _access_log(method, code, message, rid, elapsed, context)

        return wrapper

    return deco


_rpc = rpc  # the name this module used before


def make_recall_guard(settings: Any, engine: Engine, metrics: Metrics) -> Any:
    """The recall guard of ``engine``'s index (server/recall_guard.py), from the settings."""
    from retrieval.index import parse_uri
    from server.recall_guard import RESERVOIR_FILE, RecallGuard

    path = settings.query_reservoir_file
    if path is None:
        backend, location = parse_uri(str(settings.index))
        if backend in ("edge", "local") and location != ":memory:":
            path = Path(location) / str(settings.name) / RESERVOIR_FILE
    return RecallGuard(
        engine.index,
        rate=settings.recall_guard_rate,
        max_per_s=settings.recall_guard_max_per_s,
        min_samples=settings.recall_guard_min_samples,
        window=settings.recall_guard_window,
        confidence=settings.recall_guard_confidence,
        recall_target=settings.recall_target,
        reservoir=settings.query_reservoir,
        reservoir_file=path,
        save_every_s=settings.query_reservoir_save_s,
        fingerprint=str(engine.encoder.fingerprint),
        metrics=metrics,
        options=engine.index_options(),
    )


class SearchService(pb_grpc.SearchServiceServicer):
    """The servicer. ``engine`` is None until the model and index are loaded."""

    def __init__(self, settings: Any, metrics: Metrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.engine: Engine | None = None
        self.ready = False
        self.dispatch = Dispatcher(settings, metrics)

    # the dispatcher's pools and batcher, under the names callers used before the split
    @property
    def batcher(self) -> Any:
        return self.dispatch.batcher

    @property
    def infer_pool(self) -> Any:
        return self.dispatch.infer_pool

    @property
    def io_pool(self) -> Any:
        return self.dispatch.io_pool

    # ------------------------------------------------------------------ lifecycle
    def attach(self, engine: Engine) -> None:
        self.engine = engine
        engine.guard = make_recall_guard(self.settings, engine, self.metrics)
        engine.guard.start()
        self.dispatch.start(engine)
        self.ready = True

    async def drain(self, timeout: float) -> None:
        """Finish queued work and in-flight searches (after the gRPC server stopped)."""
        self.ready = False
        await self.dispatch.drain(timeout)
        guard = self.engine.guard if self.engine is not None else None
        if guard is not None:  # pending checks, then the traffic reservoir's file
            await asyncio.get_running_loop().run_in_executor(None, guard.stop, timeout)

    @property
    def _engine(self) -> Engine:
        if self.engine is None:
            raise RequestError("UNAVAILABLE", "server is not ready (model or index loading)")
        return self.engine

    # ------------------------------------------------------------------ RPCs
    @rpc("Search")
    async def Search(self, request: pb.SearchRequest, context: Any, rid: str) -> Any:
        t0 = time.perf_counter()
        due = deadline(context, self.settings)
        q = parse_query(request, self.settings, self._engine)
        ((hits, version),) = await self.dispatch.run([(q, request, "")], due)
        return search_response(self._engine, q, hits, version, rid, t0)

    @rpc("SearchBatch")
    async def SearchBatch(self, request: pb.SearchBatchRequest, context: Any, rid: str) -> Any:
        t0 = time.perf_counter()
        check_batch(request, self.settings)
        due = deadline(context, self.settings)
        engine = self._engine
        items = [
            (parse_query(r, self.settings, engine, f"queries[{i}]: "), r, f"queries[{i}]: ")
            for i, r in enumerate(request.queries)
        ]
        done = await self.dispatch.run(items, due)
        return pb.SearchBatchResponse(
            responses=[
                search_response(engine, q, hits, version, rid, t0)
                for (q, _, _), (hits, version) in zip(items, done, strict=True)
            ]
        )

    @rpc("EncodeQuery")
    async def EncodeQuery(self, request: pb.EncodeQueryRequest, context: Any, rid: str) -> Any:
        due = deadline(context, self.settings)
        q = Query(text=check_text(request.text, self.settings), search=False)
        (vec,) = await self.dispatch.run([(q, request, "")], due)
        return encode_response(self._engine, q, vec)

    @rpc("GetImage")
    async def GetImage(self, request: pb.GetImageRequest, context: Any, rid: str) -> Any:
        kind = image_request(request)
        data, mime, w, h = await self.dispatch.io(self._engine.get_image, request.id, kind)
        return pb.GetImageResponse(id=request.id, data=data, mime_type=mime, width=w, height=h)

    @rpc("ListImages")
    async def ListImages(self, request: pb.ListImagesRequest, context: Any, rid: str) -> Any:
        size, seed, with_payload = page_request(request, self.settings)
        engine = self._engine
        version = engine.version
        hits, nxt, total = await self.dispatch.io(
            engine.list_images, size, int(request.offset), seed
        )
        return list_response(hits, nxt, total, version, with_payload)

    @rpc("Info")
    async def Info(self, request: pb.InfoRequest, context: Any, rid: str) -> Any:
        engine = self._engine
        count = await self.dispatch.io(engine.index.count)
        return info_response(engine, self.settings, count)

    # ------------------------------------------------------------------ Explain
    #: the Explainer of the attached engine's encoder (built on the first Explain)
    _explainer: Any = None
    #: Explains admitted and not yet answered (bounded by settings.queue_size, as Search)
    _explains_pending: int = 0

    def _explain_image(self, item_id: str, where: str) -> Any:
        """A gallery item's decoded image by id, through GetImage's path (the original file,
        else the payload's thumbnail); errors name ``where``."""
        from retrieval.imageio import ImageDecodeError, decode_image

        engine = self._engine
        explain_id(item_id, where)
        try:
            payload = engine.record(item_id).payload or {}
            data = engine.read_original(item_id, payload, missing_ok=True)
            if data is None:
                data = engine.read_thumbnail(payload)
        except RequestError as exc:
            raise prefixed(exc, f"{where}: ") from None
        if data is None:
            raise RequestError(
                "NOT_FOUND",
                f"{where}: gallery id {item_id!r} has no readable image (original file missing "
                "and no thumbnail in its payload)",
            )
        try:
            return decode_image(data, max_pixels=self.settings.max_image_pixels)
        except ImageDecodeError as exc:
            raise RequestError(
                "FAILED_PRECONDITION",
                f"{where}: gallery image {item_id!r} cannot be decoded: {exc}",
            ) from None

    def _explain_sync(self, reference: Any, text: str, candidate: Any) -> Any:
        """The explanation as an ExplainResponse (inference thread)."""
        from retrieval.explain import Explainer

        engine = self._engine
        if self._explainer is None or self._explainer.encoder is not engine.encoder:
            # the score that ordered the results: the re-ranker's when the server re-ranks by
            # default, else MaxSim
            scorer = None
            if engine.reranker is not None and engine.default_rerank_k > 0:
                from retrieval.rerank import RerankPixelScorer

                scorer = RerankPixelScorer(engine.encoder.model, engine.reranker)
            self._explainer = Explainer(engine.encoder, scorer=scorer)
        ex = self._explainer
        e = ex.explain(reference, text, candidate, attention=False)
        return explain_response(ex, e, reference, candidate)

    @rpc("Explain")
    async def Explain(self, request: pb.ExplainRequest, context: Any, rid: str) -> Any:
        due = deadline(context, self.settings)
        text, which = explain_request(request, self.settings)
        engine = self._engine
        io = self.dispatch.io
        if which == "reference_image":
            reference = await io(engine.decode_reference, bytes(request.reference_image))
        else:
            reference = await io(self._explain_image, request.reference_id, "reference_id")
        candidate = await io(self._explain_image, request.candidate_id, "candidate_id")
        if self._explains_pending >= self.settings.queue_size:
            raise RequestError(
                "RESOURCE_EXHAUSTED",
                f"{self._explains_pending} explanations are queued (the limit is "
                f"{self.settings.queue_size}); retry later",
                retry_after_ms=100,
            )
        self._explains_pending += 1
        try:
            future = asyncio.get_running_loop().run_in_executor(
                self.dispatch.infer_pool, self._explain_sync, reference, text, candidate
            )
            try:
                async with asyncio.timeout(max(0.0, due - time.monotonic())):
                    return await future
            except TimeoutError:
                future.cancel()  # not started yet: it never runs
                raise RequestError(
                    "DEADLINE_EXCEEDED", "deadline passed before the explanation was ready"
                ) from None
        finally:
            self._explains_pending -= 1
