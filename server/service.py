"""``cir.v1.SearchService`` on grpc.aio: validation, admission, batching, responses.

Each RPC runs through :func:`_rpc`, which assigns the request id, maps errors to status codes,
records metrics and writes one structured log line per call (rejections under overload and
calls whose client already left at DEBUG: they are counted in the metrics, and writing them
would cost an overloaded server more than the rejection itself).

A search is admitted or refused before any work is spent on it: the cheap checks of the request
first (:meth:`SearchService._parse_query`), then the queue's admission
(:meth:`SearchService._admit`: queue full, estimated wait over the bound or over the call's own
deadline -> RESOURCE_EXHAUSTED with ``retry-after-ms``), and only then the reference image is
decoded in the I/O pool and the query queued for the model.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import grpc
import numpy as np

from retrieval.index.errors import IndexNotFoundError, IndexUnavailableError
from server import __version__
from server._generated.cir.v1 import search_pb2 as pb
from server._generated.cir.v1 import search_pb2_grpc as pb_grpc
from server.batching import (
    BatcherClosedError,
    DeadlineUnmeetableError,
    Job,
    MicroBatcher,
    QueueFullError,
    Ticket,
)
from server.engine import Engine, Query, RankedHit, RequestError, public_payload, user_id_of
from server.logs import access_level
from server.metrics import Metrics
from server.protoconv import MODE_NAMES, dict_to_struct, struct_to_dict

logger = logging.getLogger(__name__)
access_log = logging.getLogger("server.access")

T = TypeVar("T")
DEFAULT_TOP_K = 10
DEFAULT_PAGE_SIZE = 50


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


def _rpc(method: str) -> Callable[..., Any]:
    """Wrap an RPC implementation ``fn(self, request, context, rid)``."""

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
            except (IndexUnavailableError, IndexNotFoundError) as exc:
                # the index (its search process, its server) went away under any RPC
                code = grpc.StatusCode.UNAVAILABLE
                message = f"index unavailable: {exc}"
                gone = _client_gone(context)
                if gone:
                    m.client_gone.labels(method, gone).inc()
                    raise asyncio.CancelledError from None
                await context.abort(code, message, trailing_metadata=(("x-request-id", rid),))
            except RequestError as exc:
                code = grpc.StatusCode[exc.code]
                message = exc.message
                gone = _client_gone(context)
                if gone:  # nobody to tell: aborting a closed call only makes gRPC log an error
                    code = grpc.StatusCode.CANCELLED if gone == "cancelled" else code
                    m.client_gone.labels(method, gone).inc()
                    raise asyncio.CancelledError from None
                trailing: list[tuple[str, str]] = [("x-request-id", rid)]
                if exc.retry_after_ms is not None:
                    trailing.append(("retry-after-ms", str(exc.retry_after_ms)))
                await context.abort(code, message, trailing_metadata=tuple(trailing))
            except asyncio.CancelledError:
                if code == grpc.StatusCode.OK:  # gRPC cancelled the handler: the client left
                    code = grpc.StatusCode.CANCELLED
                    m.client_gone.labels(method, _client_gone(context) or "cancelled").inc()
                raise
            except Exception as exc:
                if type(exc).__name__ == "AbortError":  # raised by context.abort itself
                    raise
                code = grpc.StatusCode.INTERNAL
                message = f"internal error (request id {rid})"
                logger.exception("unhandled error in %s", method, extra={"request_id": rid})
                await context.abort(code, message, trailing_metadata=(("x-request-id", rid),))
            finally:
                elapsed = time.perf_counter() - t0
                m.inflight.dec()
                m.requests.labels(method, code.name).inc()
                m.latency.labels(method).observe(elapsed)
                level = access_level(method, _LEVELS.get(code, logging.WARNING))
                if code == grpc.StatusCode.DEADLINE_EXCEEDED and _client_gone(context):
                    level = logging.DEBUG  # the client left; counted in cir_client_gone
                if access_log.isEnabledFor(level):
                    access_log.log(
                        level,
                        "%s %s %.1fms%s",
                        method,
                        code.name,
                        elapsed * 1000.0,
                        f" {message}" if message else "",
                        extra={
                            "request_id": rid,
                            "method": method,
                            "code": code.name,
                            "ms": round(elapsed * 1000.0, 2),
                        },
                    )

        return wrapper

    return deco


#: Access-log level per status code (others: WARNING). Rejections under overload and calls the
#: client left are DEBUG: counted in the metrics, not worth a line each when thousands arrive.
_LEVELS = {
    grpc.StatusCode.OK: logging.INFO,
    grpc.StatusCode.RESOURCE_EXHAUSTED: logging.DEBUG,
    grpc.StatusCode.CANCELLED: logging.DEBUG,
    grpc.StatusCode.INTERNAL: logging.ERROR,
}

#: Threads that decode images, read files and call the index.
IO_THREADS = 4
MODE_VALUES = {name: value for value, name in MODE_NAMES.items() if value}


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


def recall_guard_info(engine: Engine, meta: Any) -> Any:
    """Info.recall_guard: the guard's running estimate for the served version and its L."""
    from retrieval.index.common import CALIBRATION_KEY

    guard = engine.guard
    if guard is None:
        return pb.RecallGuardInfo()
    snap = guard.snapshot(engine.version)
    cal = (meta.extra.get(CALIBRATION_KEY) if meta is not None else None) or {}
    try:
        fast_l = guard.current_l()
    except Exception:  # informative only
        fast_l = None
    last = snap["last_action"]
    words = ""
    if last:
        to = "exact search" if last.get("L") is None else f"L = {last['L']}"
        words = (
            f"{last['action']}: L {last['previous_L']} -> {to} at recall@10 {last['recall']} "
            f"(lower bound {last['lower_bound']}, {last['samples']} queries)"
        )
    return pb.RecallGuardInfo(
        enabled=guard.sampling,
        sample_rate=guard.rate,
        recall_target=guard.recall_target,
        recall=snap["recall"] or 0.0,
        recall_lower_bound=snap["lower_bound"] or 0.0,
        samples=snap["samples"],
        min_samples=guard.min_samples,
        fast_l=fast_l or 0,
        fast_l_source=("guard" if cal.get("guard") else str(cal.get("source", "proxy")))
        if cal
        else "table",
        heldout_recall=float(cal.get("heldout_recall") or 0.0),
        last_action=words,
        reservoir_size=snap["reservoir"],
        reservoir_file=str(guard.reservoir_file or ""),
    )


class SearchService(pb_grpc.SearchServiceServicer):
    """The servicer. ``engine`` is None until the model and index are loaded."""

    def __init__(self, settings: Any, metrics: Metrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.engine: Engine | None = None
        self.ready = False
        self.infer_pool = ThreadPoolExecutor(1, thread_name_prefix="cir-infer")
        self.io_pool = ThreadPoolExecutor(IO_THREADS, thread_name_prefix="cir-io")
        self.batcher = MicroBatcher(
            self._process,
            max_batch=settings.max_batch,
            max_wait_s=settings.max_wait_ms / 1000.0,
            queue_size=settings.queue_size,
            max_queue_s=settings.max_queue_ms / 1000.0,
            adaptive_wait=settings.adaptive_wait,
            on_drop=lambda reason, n: metrics.dropped.labels(reason).inc(n),
            on_depth=metrics.queue_depth.set,
        )
        self._search_tasks: set[asyncio.Task[None]] = set()

    # ------------------------------------------------------------------ lifecycle
    def attach(self, engine: Engine) -> None:
        self.engine = engine
        engine.guard = make_recall_guard(self.settings, engine, self.metrics)
        engine.guard.start()
        self.batcher.start()
        self.ready = True

    async def drain(self, timeout: float) -> None:
        """Finish queued work and in-flight searches (after the gRPC server stopped)."""
        self.ready = False
        await self.batcher.stop(timeout)
        if self._search_tasks:
            await asyncio.wait(list(self._search_tasks), timeout=timeout)
        self.infer_pool.shutdown(wait=True, cancel_futures=True)
        self.io_pool.shutdown(wait=True, cancel_futures=True)
        guard = self.engine.guard if self.engine is not None else None
        if guard is not None:  # pending checks, then the traffic reservoir's file
            await asyncio.get_running_loop().run_in_executor(None, guard.stop, timeout)

    async def _io(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self.io_pool, fn, *args)

    @property
    def _engine(self) -> Engine:
        if self.engine is None:
            raise RequestError("UNAVAILABLE", "server is not ready (model or index loading)")
        return self.engine

    # ------------------------------------------------------------------ validation
    def _deadline(self, context: Any) -> float:
        remaining = context.time_remaining()
        if remaining is None:
            remaining = self.settings.default_timeout_s
        return time.monotonic() + max(0.0, float(remaining))

    def _check_text(self, text: str, where: str = "") -> str:
        s = self.settings
        if not text or not text.strip():
            raise RequestError("INVALID_ARGUMENT", f"{where}text is empty")
        if len(text) > s.max_text_chars:
            raise RequestError(
                "INVALID_ARGUMENT",
                f"{where}text is {len(text)} characters; the limit is {s.max_text_chars}",
            )
        return text.strip()

    async def _reference(self, q: Query, request: Any, where: str = "") -> None:
        """Decode the reference image / look up the gallery reference into ``q``."""
        engine = self._engine
        which = request.WhichOneof("reference")
        t0 = time.perf_counter()
        try:
            if which == "reference_image":
                q.image = await self._io(engine.decode_reference, bytes(request.reference_image))
            elif which == "reference_id":
                feats, image, key = await self._io(engine.gallery_reference, request.reference_id)
                q.features, q.image, q.cache_key = feats, image, key
                q.timings["reference_cached"] = 1.0 if feats is not None else 0.0
                self.metrics.cache.labels("hit" if feats is not None else "miss").inc()
        except RequestError as exc:
            raise RequestError(exc.code, where + exc.message, exc.retry_after_ms) from None
        q.timings["decode_ms"] = (time.perf_counter() - t0) * 1000.0
        self.metrics.stage.labels("decode").observe(q.timings["decode_ms"] / 1000.0)

    def _parse_query(self, request: pb.SearchRequest, where: str = "") -> Query:
        """The cheap checks of a search request (no I/O): a Query without its reference."""
        s = self.settings
        text = self._check_text(request.text, where)
        top_k = int(request.top_k) or DEFAULT_TOP_K
        if top_k > s.max_top_k:
            raise RequestError(
                "INVALID_ARGUMENT", f"{where}top_k must be in [1, {s.max_top_k}], got {top_k}"
            )
        offset = int(request.offset)
        if offset > s.max_offset:
            raise RequestError(
                "INVALID_ARGUMENT", f"{where}offset must be in [0, {s.max_offset}], got {offset}"
            )
        if int(request.mode) not in MODE_NAMES:
            raise RequestError("INVALID_ARGUMENT", f"{where}unknown mode {int(request.mode)}")
        flt: dict[str, Any] | None = None
        which = request.WhichOneof("filter_spec")
        if which == "filter_json":
            raw = request.filter_json.strip()
            if raw:
                try:
                    value = json.loads(raw)
                except json.JSONDecodeError as exc:
                    raise RequestError(
                        "INVALID_ARGUMENT", f"{where}filter_json is not valid JSON: {exc}"
                    ) from None
                if not isinstance(value, dict):
                    raise RequestError(
                        "INVALID_ARGUMENT",
                        f"{where}filter_json must be a JSON object, got {type(value).__name__}",
                    )
                flt = value or None
        elif which == "filter":
            flt = struct_to_dict(request.filter) or None
        try:
            self._engine.check_filter(flt)
        except RequestError as exc:
            raise RequestError(exc.code, where + exc.message) from None
        engine = self._engine
        rerank_k = (
            int(request.rerank_k) if request.HasField("rerank_k") else engine.default_rerank_k
        )
        if rerank_k > s.max_rerank_k:
            raise RequestError(
                "INVALID_ARGUMENT",
                f"{where}rerank_k must be in [0, {s.max_rerank_k}], got {rerank_k}",
            )
        if rerank_k and engine.reranker is None:
            raise RequestError(
                "FAILED_PRECONDITION",
                f"{where}rerank_k {rerank_k}: this server has no re-ranker (Info.reranker)",
            )
        q = Query(
            text=text,
            top_k=top_k,
            offset=offset,
            filter=flt,
            mode=MODE_NAMES[int(request.mode)],
            include_payload=(
                request.include_payload if request.HasField("include_payload") else True
            ),
            rerank_k=rerank_k,
        )
        return q

    # ------------------------------------------------------------------ admission, batching
    def _admit(self, n: int, deadline: float) -> Ticket:
        """Room for ``n`` queries in the model's queue, before any work is spent on them."""
        try:
            ticket = self.batcher.admit(n, deadline)
        except QueueFullError as exc:
            self.metrics.rejected.inc(n)
            raise RequestError("RESOURCE_EXHAUSTED", str(exc), exc.retry_after_ms) from None
        except BatcherClosedError as exc:
            raise RequestError("UNAVAILABLE", str(exc)) from None
        return ticket

    async def _prepare(
        self,
        items: list[tuple[Query, Any, str]],
        deadline: float,
        ticket: Ticket,
    ) -> list[asyncio.Future[Any]]:
        """Decode the admitted queries' references (I/O pool), then queue them with the ticket
        (given back if anything fails on the way)."""
        try:
            for q, request, where in items:
                await self._reference(q, request, where)
            return self._submit([q for q, _, _ in items], deadline, ticket)
        finally:
            self.batcher.release(ticket)  # a no-op once submitted

    def _submit(
        self, queries: list[Query], deadline: float, ticket: Ticket | None = None
    ) -> list[asyncio.Future[Any]]:
        try:
            return self.batcher.submit(queries, deadline, ticket)
        except QueueFullError as exc:
            raise RequestError("RESOURCE_EXHAUSTED", str(exc), exc.retry_after_ms) from None
        except BatcherClosedError as exc:
            raise RequestError("UNAVAILABLE", str(exc)) from None

    async def _await_all(self, futures: list[asyncio.Future[Any]], deadline: float) -> list[Any]:
        remaining = deadline - time.monotonic()
        try:
            async with asyncio.timeout(max(0.0, remaining)):
                return list(await asyncio.gather(*futures))
        except TimeoutError:
            for f in futures:
                f.cancel()  # the batcher skips cancelled work
            raise RequestError(
                "DEADLINE_EXCEEDED", "deadline passed before the query ran"
            ) from None
        except asyncio.CancelledError:  # the caller went away (or its deadline passed)
            for f in futures:
                f.cancel()
            raise
        except DeadlineUnmeetableError as exc:  # dropped unstarted; the client still waits
            raise RequestError("DEADLINE_EXCEEDED", str(exc)) from None
        except BatcherClosedError as exc:
            raise RequestError("UNAVAILABLE", str(exc)) from None

    async def _process(self, batch: list[Job]) -> None:
        """Encode a batch in the inference thread, then search it in the io pool without
        holding up the next batch's encoding."""
        engine = self._engine
        loop = asyncio.get_running_loop()
        queries: list[Query] = [j.item for j in batch]
        for j in batch:
            j.item.timings["queue_ms"] = (j.dispatched - j.enqueued) * 1000.0
            self.metrics.stage.labels("queue").observe(j.dispatched - j.enqueued)
        self.metrics.batch_size.observe(len(batch))
        try:
            vectors, t = await loop.run_in_executor(self.infer_pool, engine.encode, queries)
        except Exception as exc:
            logger.exception("encoding failed")
            err = RequestError("INTERNAL", f"encoding failed: {type(exc).__name__}: {exc}")
            for j in batch:
                if not j.future.done():
                    j.future.set_exception(err)
            return
        self.metrics.service_rate.set(self.batcher.service_rate)
        self.metrics.stage.labels("reference").observe(t["reference_ms"] / 1000.0)
        self.metrics.stage.labels("encode").observe(t["encode_ms"] / 1000.0)
        for j in batch:
            j.item.timings.update(t)
            j.item.timings["batch_size"] = float(len(batch))
        searching = [i for i, q in enumerate(queries) if q.search]
        for i, j in enumerate(batch):
            if not queries[i].search and not j.future.done():
                j.future.set_result(vectors[i])
        if searching:
            task = loop.create_task(self._search([batch[i] for i in searching], vectors[searching]))
            self._search_tasks.add(task)
            task.add_done_callback(self._search_tasks.discard)

    async def _search(self, jobs: list[Job], vectors: np.ndarray) -> None:
        live = [i for i, j in enumerate(jobs) if not j.future.done()]
        if not live:
            return
        jobs = [jobs[i] for i in live]
        vectors = vectors[live]
        try:
            results, version, ms = await self._io(
                self._engine.search, vectors, [j.item for j in jobs]
            )
        except (IndexUnavailableError, IndexNotFoundError) as exc:
            results = [RequestError("UNAVAILABLE", f"index unavailable: {exc}")] * len(jobs)
            version, ms = "", 0.0
        except Exception as exc:
            logger.exception("search failed")
            results = [RequestError("INTERNAL", f"search failed: {exc}")] * len(jobs)
            version, ms = "", 0.0
        self.metrics.stage.labels("search").observe(ms / 1000.0)
        rr_ms = await self._rerank(jobs, results)
        for j, r in zip(jobs, results, strict=True):
            if j.future.done():
                continue
            j.item.timings["search_ms"] = ms
            j.item.timings["rerank_ms"] = rr_ms
            if isinstance(r, RequestError):
                j.future.set_exception(r)
            else:
                j.future.set_result((r, version))

    async def _rerank(self, jobs: list[Job], results: list[Any]) -> float:
        """The second stage for the jobs that asked for it and are still waiting (a call whose
        deadline passed or whose client left is not re-ranked), in the inference thread: one
        batch across the concurrent requests, as the encoder's."""
        now = time.monotonic()
        todo = [
            i
            for i, j in enumerate(jobs)
            if j.item.reranks and j.alive(now) and not isinstance(results[i], RequestError)
        ]
        if not todo:
            return 0.0
        sub = [results[i] for i in todo]
        loop = asyncio.get_running_loop()
        try:
            ms = await loop.run_in_executor(
                self.infer_pool, self._engine.rerank, [jobs[i].item for i in todo], sub
            )
        except Exception as exc:
            logger.exception("re-ranking failed")
            err = RequestError("INTERNAL", f"re-ranking failed: {type(exc).__name__}: {exc}")
            sub, ms = [err] * len(todo), 0.0
        for i, r in zip(todo, sub, strict=True):
            results[i] = r
        self.metrics.stage.labels("rerank").observe(ms / 1000.0)
        return ms

    # ------------------------------------------------------------------ responses
    def _response(self, q: Query, hits: list[Any], version: str, rid: str, t0: float) -> Any:
        engine = self._engine
        tm = q.timings
        resp = pb.SearchResponse(
            index_version=version,
            encoder_fingerprint=engine.encoder.fingerprint,
            request_id=rid,
            timings=pb.Timings(
                queue_ms=tm.get("queue_ms", 0.0),
                decode_ms=tm.get("decode_ms", 0.0),
                reference_ms=tm.get("reference_ms", 0.0) if not tm.get("reference_cached") else 0.0,
                encode_ms=tm.get("encode_ms", 0.0),
                search_ms=tm.get("search_ms", 0.0),
                total_ms=(time.perf_counter() - t0) * 1000.0,
                batch_size=int(tm.get("batch_size", 0)),
                reference_cached=bool(tm.get("reference_cached", 0.0)),
                rerank_ms=tm.get("rerank_ms", 0.0),
            ),
        )
        if q.searched_mode:
            resp.searched_mode = MODE_VALUES[q.searched_mode]  # type: ignore[assignment]
            resp.mode_note = q.mode_note
        reranked = bool(hits) and isinstance(hits[0], RankedHit)
        if q.reranks and engine.reranker is not None:
            resp.rerank_k = q.rerank_k
            resp.reranker_fingerprint = engine.reranker.fingerprint
        for i, h in enumerate(hits):
            hit = resp.results.add(
                id=h.id,
                score=float(h.score),
                rank=q.offset + i + 1,
                user_id=user_id_of(h.payload),
                first_stage_score=float(h.first_stage_score if reranked else h.score),
                reranked=bool(h.reranked) if reranked else False,
            )
            if q.include_payload and h.payload:
                dict_to_struct(public_payload(h.payload), hit.payload)
        return resp

    # ------------------------------------------------------------------ RPCs
    @_rpc("Search")
    async def Search(self, request: pb.SearchRequest, context: Any, rid: str) -> Any:
        t0 = time.perf_counter()
        deadline = self._deadline(context)
        q = self._parse_query(request)
        ticket = self._admit(1, deadline)
        (fut,) = await self._prepare([(q, request, "")], deadline, ticket)
        ((hits, version),) = await self._await_all([fut], deadline)
        return self._response(q, hits, version, rid, t0)

    @_rpc("SearchBatch")
    async def SearchBatch(self, request: pb.SearchBatchRequest, context: Any, rid: str) -> Any:
        t0 = time.perf_counter()
        s = self.settings
        n = len(request.queries)
        if n == 0:
            raise RequestError("INVALID_ARGUMENT", "queries is empty")
        if n > s.max_batch_queries:
            raise RequestError(
                "INVALID_ARGUMENT", f"{n} queries; at most {s.max_batch_queries} per SearchBatch"
            )
        deadline = self._deadline(context)
        items = [
            (self._parse_query(r, f"queries[{i}]: "), r, f"queries[{i}]: ")
            for i, r in enumerate(request.queries)
        ]
        queries = [q for q, _, _ in items]
        ticket = self._admit(n, deadline)
        futures = await self._prepare(items, deadline, ticket)
        done = await self._await_all(futures, deadline)
        return pb.SearchBatchResponse(
            responses=[
                self._response(q, hits, version, rid, t0)
                for q, (hits, version) in zip(queries, done, strict=True)
            ]
        )

    @_rpc("EncodeQuery")
    async def EncodeQuery(self, request: pb.EncodeQueryRequest, context: Any, rid: str) -> Any:
        deadline = self._deadline(context)
        q = Query(text=self._check_text(request.text), search=False)
        ticket = self._admit(1, deadline)
        (fut,) = await self._prepare([(q, request, "")], deadline, ticket)
        (vec,) = await self._await_all([fut], deadline)
        tm = q.timings
        return pb.EncodeQueryResponse(
            vector=[float(x) for x in vec],
            dim=len(vec),
            encoder_fingerprint=self._engine.encoder.fingerprint,
            timings=pb.Timings(
                queue_ms=tm.get("queue_ms", 0.0),
                decode_ms=tm.get("decode_ms", 0.0),
                reference_ms=tm.get("reference_ms", 0.0),
                encode_ms=tm.get("encode_ms", 0.0),
                batch_size=int(tm.get("batch_size", 0)),
                reference_cached=bool(tm.get("reference_cached", 0.0)),
            ),
        )

    @_rpc("GetImage")
    async def GetImage(self, request: pb.GetImageRequest, context: Any, rid: str) -> Any:
        kinds = {
            pb.IMAGE_KIND_UNSPECIFIED: "thumbnail",
            pb.IMAGE_KIND_THUMBNAIL: "thumbnail",
            pb.IMAGE_KIND_ORIGINAL: "original",
        }
        kind = kinds.get(int(request.kind))  # type: ignore[call-overload]
        if kind is None:
            raise RequestError("INVALID_ARGUMENT", f"unknown image kind {int(request.kind)}")
        if not request.id:
            raise RequestError("INVALID_ARGUMENT", "id is empty")
        data, mime, w, h = await self._io(self._engine.get_image, request.id, kind)
        return pb.GetImageResponse(id=request.id, data=data, mime_type=mime, width=w, height=h)

    @_rpc("ListImages")
    async def ListImages(self, request: pb.ListImagesRequest, context: Any, rid: str) -> Any:
        s = self.settings
        size = int(request.page_size) or DEFAULT_PAGE_SIZE
        if size > s.max_page_size:
            raise RequestError(
                "INVALID_ARGUMENT", f"page_size must be in [1, {s.max_page_size}], got {size}"
            )
        seed = int(request.random_seed) if request.HasField("random_seed") else None
        with_payload = request.include_payload if request.HasField("include_payload") else True
        engine = self._engine
        version = engine.version
        hits, nxt, total = await self._io(engine.list_images, size, int(request.offset), seed)
        resp = pb.ListImagesResponse(total=total, index_version=version)
        for h in hits:
            item = resp.items.add(id=h.id)
            if with_payload and h.payload:
                dict_to_struct(public_payload(h.payload), item.payload)
        if nxt is not None:
            resp.next_offset = nxt
        return resp

    @_rpc("Info")
    async def Info(self, request: pb.InfoRequest, context: Any, rid: str) -> Any:
        engine = self._engine
        s = self.settings
        enc = engine.encoder
        idx = engine.index
        count = await self._io(idx.count)
        meta = idx.meta
        return pb.InfoResponse(
            model=pb.ModelInfo(
                preset=str(enc.preset),
                fingerprint=str(enc.fingerprint),
                dim=int(enc.dim),
                num_queries=int(enc.num_queries),
                image_size=int(enc.image_size),
                max_text_tokens=int(enc.max_text_tokens),
                device=str(enc.device),
                dtype=str(enc.dtype).replace("torch.", ""),
            ),
            index=pb.IndexInfo(
                name=str(idx.name),
                backend=str(idx.backend),
                version=engine.version,
                count=int(count),
                filterable_fields=engine.fields(),
                encoder_fingerprint=str(meta.encoder_fingerprint) if meta else "",
            ),
            limits=pb.Limits(
                max_top_k=s.max_top_k,
                max_offset=s.max_offset,
                max_text_chars=s.max_text_chars,
                max_image_bytes=s.max_image_bytes,
                max_image_pixels=s.max_image_pixels,
                max_batch_queries=s.max_batch_queries,
                max_message_bytes=s.max_message_bytes,
                max_page_size=s.max_page_size,
                max_rerank_k=s.max_rerank_k,
            ),
            server_version=__version__,
            max_batch=s.max_batch,
            max_wait_ms=s.max_wait_ms,
            reranker=pb.RerankerInfo(
                loaded=engine.reranker is not None,
                fingerprint=engine.reranker.fingerprint if engine.reranker is not None else "",
                features=engine.reranker.config.features if engine.reranker is not None else "",
                default_rerank_k=engine.default_rerank_k,
            ),
            recall_guard=recall_guard_info(engine, meta),
        )

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
        if not item_id:
            raise RequestError("INVALID_ARGUMENT", f"{where} is empty")
        try:
            payload = engine.record(item_id).payload or {}
            data = engine.read_original(item_id, payload, missing_ok=True)
            if data is None:
                data = engine.read_thumbnail(payload)
        except RequestError as exc:
            raise RequestError(exc.code, f"{where}: {exc.message}") from None
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

        def heatmap(image: Any, values: Any) -> Any:
            return pb.Heatmap(
                rows=int(values.shape[0]),
                cols=int(values.shape[1]),
                values=[float(v) for v in values.reshape(-1)],
                png=ex.overlay_png(image, values),
            )

        return pb.ExplainResponse(
            score=e.score,
            candidate_map=heatmap(candidate, e.candidate_map),
            reference_map=heatmap(reference, e.reference_map),
            words=[pb.WordScore(word=w.word, score=w.score) for w in e.words],
        )

    @_rpc("Explain")
    async def Explain(self, request: pb.ExplainRequest, context: Any, rid: str) -> Any:
        deadline = self._deadline(context)
        text = self._check_text(request.text)
        which = request.WhichOneof("reference")
        if which is None:
            raise RequestError(
                "INVALID_ARGUMENT", "reference is required: set reference_image or reference_id"
            )
        if not request.candidate_id:
            raise RequestError("INVALID_ARGUMENT", "candidate_id is empty")
        engine = self._engine
        if which == "reference_image":
            reference = await self._io(engine.decode_reference, bytes(request.reference_image))
        else:
            reference = await self._io(self._explain_image, request.reference_id, "reference_id")
        candidate = await self._io(self._explain_image, request.candidate_id, "candidate_id")
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
                self.infer_pool, self._explain_sync, reference, text, candidate
            )
            try:
                async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                    return await future
            except TimeoutError:
                future.cancel()  # not started yet: it never runs
                raise RequestError(
                    "DEADLINE_EXCEEDED", "deadline passed before the explanation was ready"
                ) from None
        finally:
            self._explains_pending -= 1
