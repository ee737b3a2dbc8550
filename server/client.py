"""Typed Python client for the CIR gRPC API (``cir.v1.SearchService``).

    from server.client import CIRClient
    with CIRClient("127.0.0.1:50051", api_key="...") as c:
        res = c.search("make it red", reference_id="img-001", top_k=5)  # point or user id
        for hit in res.results:
            print(hit.rank, hit.user_id, hit.id, hit.score, hit.payload)
        data, mime = c.get_image(res.results[0].id)               # thumbnail
        page = c.list_images(page_size=20, offset=0)              # (items, next_offset, total)

Every call has a deadline (``timeout`` seconds, per call or the client default) that covers
all retries. UNAVAILABLE and RESOURCE_EXHAUSTED are retried (``retries`` times) with
exponential backoff, honouring the server's ``retry-after-ms`` hint. Failures raise a
:class:`~server.client_errors.CIRError` subclass (re-exported here) with ``.code`` and ``.details``.
Thread-safe: one client can be shared (e.g. by Streamlit sessions).
"""

from __future__ import annotations

import json
import logging
import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, NamedTuple, TypeVar

import grpc
import numpy as np
from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception,
    stop_after_attempt,
)

from server._generated.cir.v1 import search_pb2 as pb
from server._generated.cir.v1 import search_pb2_grpc as pb_grpc
from server.client_errors import (
    CIRError,
    DeadlineExceededError,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    ResourceExhaustedError,
    ServerUnavailableError,
    UnauthenticatedError,
    from_rpc_error,
)
from server.protoconv import KINDS, MODE_NAMES, MODES, dict_to_struct, struct_to_dict

logger = logging.getLogger(__name__)

T = TypeVar("T")
DEFAULT_MAX_MESSAGE_BYTES = 32 * 1024 * 1024  # must match (or exceed) the server's setting
SERVICE_NAME = "cir.v1.SearchService"
Mode = Literal["auto", "exact", "fast"]
ImageKind = Literal["thumbnail", "original"]


# ------------------------------------------------------------------------------ result types
@dataclass(frozen=True)
class Hit:
    """One ranked gallery item. Two ids: ``id`` is the point id (the index's own uuid),
    ``user_id`` the user's own id (manifest id column or relative path; "" when the item was
    indexed without one). Both are accepted as ``reference_id`` and by ``get_image``."""

    id: str  # point id
    score: float  # the ranking score (the re-ranker's when ``reranked``, else MaxSim)
    rank: int  # 1-based absolute rank (offset included)
    payload: dict[str, Any] = field(default_factory=dict)  # stored payload without `thumbnail`
    user_id: str = ""  # the user's own id of the item
    first_stage_score: float = 0.0  # the first stage's MaxSim score
    reranked: bool = False  # ``score`` came from the re-ranker


@dataclass(frozen=True)
class SearchResult:
    """A search's hits plus provenance and server-side timings (milliseconds)."""

    results: list[Hit]
    index_version: str  # the index version searched
    encoder_fingerprint: str  # the encoder that built the query vector
    timings: dict[str, float]  # queue_ms, decode_ms, reference_ms, encode_ms, search_ms, ...
    request_id: str = ""  # the server's id for this request (in its logs)
    rerank_k: int = 0  # candidates re-ranked (0: the first stage's order alone)
    reranker_fingerprint: str = ""  # the re-ranker that scored them
    searched_mode: str = ""  # the mode that ran ("exact" when fast had no usable L), "" unknown
    mode_note: str = ""  # why searched_mode is not the mode asked for, when that matters


@dataclass(frozen=True)
class ModelInfo:
    preset: str
    fingerprint: str
    dim: int
    num_queries: int
    image_size: int
    max_text_tokens: int
    device: str
    dtype: str


@dataclass(frozen=True)
class IndexInfo:
    name: str
    backend: str
    version: str
    count: int
    filterable_fields: dict[str, str]  # field -> keyword | integer | float | bool
    encoder_fingerprint: str


@dataclass(frozen=True)
class Limits:
    max_top_k: int
    max_offset: int
    max_text_chars: int
    max_image_bytes: int
    max_image_pixels: int
    max_batch_queries: int
    max_message_bytes: int
    max_page_size: int
    max_rerank_k: int = 0


@dataclass(frozen=True)
class RerankerInfo:
    loaded: bool  # False: rerank_k other than 0 is refused
    fingerprint: str
    features: str  # what it reads of a candidate ("targets": the stored target vectors)
    default_rerank_k: int  # rerank_k of a request that leaves it unset


@dataclass(frozen=True)
class ServerInfo:
    """What ``Info`` returns."""

    model: ModelInfo
    index: IndexInfo
    limits: Limits
    server_version: str
    max_batch: int  # micro-batching: largest batch
    max_wait_ms: float  # micro-batching: longest wait after the first query
    reranker: RerankerInfo = field(default_factory=lambda: RerankerInfo(False, "", "", 0))


@dataclass(frozen=True)
class ImageItem:
    """A gallery item as listed by ``list_images``."""

    id: str  # point id
    payload: dict[str, Any] = field(default_factory=dict)  # without `thumbnail`

    @property
    def user_id(self) -> str:
        """The user's own id (payload ``user_id``; "" when absent or not listed)."""
        value = self.payload.get("user_id")
        return value if isinstance(value, str) else ""


class ImagePage(NamedTuple):
    items: list[ImageItem]
    next_offset: int | None  # None: last page (or a random sample)
    total: int  # gallery size


@dataclass(frozen=True)
class Heatmap:
    """One value per ViT patch of the model's view of an image, plus its PNG overlay."""

    rows: int
    cols: int
    values: np.ndarray  # [rows, cols] float32, row-major, >= 0, larger = more important
    png: bytes  # the map over the model's view of the image


@dataclass(frozen=True)
class WordScore:
    word: str  # a word of the cleaned (lower-cased) caption
    score: float  # signed attribution: > 0 raised the score, < 0 lowered it


@dataclass(frozen=True)
class Explanation:
    """What ``explain`` returns: why ``candidate_id`` scored ``score`` for the query."""

    score: float
    candidate_map: Heatmap  # Grad-CAM on the candidate's patches (against the reference's)
    reference_map: Heatmap  # Grad-CAM on the reference's patches (against the candidate's)
    words: list[WordScore]  # the caption's words in order


# ------------------------------------------------------------------------------ the client
def _read_bytes(value: bytes | str | Path | None) -> bytes | None:
    if value is None or isinstance(value, bytes):
        return value
    return Path(value).read_bytes()


class CIRClient:
    """Client for ``cir.v1.SearchService``.

    ``target``: "host:port". ``api_key``: sent as ``x-api-key``. ``tls_ca``: PEM bytes or a file
    path of the CA (or self-signed certificate) to trust; ``tls=True`` without ``tls_ca`` uses
    the system roots. ``timeout``: default per-call deadline in seconds (covers retries).
    ``retries``: extra attempts on UNAVAILABLE / RESOURCE_EXHAUSTED.
    ``tls_server_name``: override the name checked against the certificate.
    """

    def __init__(
        self,
        target: str,
        api_key: str | None = None,
        tls_ca: bytes | str | Path | None = None,
        timeout: float = 10.0,
        retries: int = 3,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        *,
        tls: bool = False,
        tls_server_name: str | None = None,
        backoff_s: float = 0.05,
        max_backoff_s: float = 2.0,
    ) -> None:
        self.target = target
        self.timeout = float(timeout)
        self.retries = max(0, int(retries))
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self._metadata: tuple[tuple[str, str], ...] = (("x-api-key", api_key),) if api_key else ()
        options: list[tuple[str, Any]] = [
            ("grpc.max_send_message_length", int(max_message_bytes)),
            ("grpc.max_receive_message_length", int(max_message_bytes)),
            # our own retry loop (with retry-after) replaces gRPC's transparent retries
            ("grpc.enable_retries", 0),
        ]
        if tls_server_name:
            options.append(("grpc.ssl_target_name_override", tls_server_name))
        ca = _read_bytes(tls_ca)
        if ca is not None or tls:
            creds = grpc.ssl_channel_credentials(root_certificates=ca)
            self._channel = grpc.secure_channel(target, creds, options=options)
        else:
            self._channel = grpc.insecure_channel(target, options=options)
        self._stub = pb_grpc.SearchServiceStub(self._channel)

    # -------------------------------------------------------------- lifecycle
    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> CIRClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -------------------------------------------------------------- plumbing
    def _wait(self, state: RetryCallState) -> float:
        exc = state.outcome.exception() if state.outcome else None
        hint = getattr(exc, "retry_after_ms", None)
        if hint:
            return float(hint) / 1000.0 * (1.0 + 0.2 * random.random())
        base = min(self.max_backoff_s, self.backoff_s * (2 ** (state.attempt_number - 1)))
        return base * (0.5 + random.random())  # jitter so clients do not retry in lockstep

    def _call(self, method: Callable[..., T], request: Any, timeout: float | None) -> T:
        budget = self.timeout if timeout is None else float(timeout)
        deadline = time.monotonic() + budget

        def attempt() -> T:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise DeadlineExceededError(
                    grpc.StatusCode.DEADLINE_EXCEEDED,
                    f"client deadline of {budget:.3g}s passed before the call could be (re)tried",
                )
            try:
                return method(request, timeout=remaining, metadata=self._metadata)
            except grpc.RpcError as exc:
                raise from_rpc_error(exc) from None

        def retryable(exc: BaseException) -> bool:
            if deadline - time.monotonic() <= 0:
                return False
            if isinstance(exc, ResourceExhaustedError):
                # queue full (the server sends retry-after-ms); a too-large message is not
                return exc.retry_after_ms is not None
            return isinstance(exc, ServerUnavailableError)

        retrying = Retrying(
            stop=stop_after_attempt(self.retries + 1),
            wait=self._wait,
            retry=retry_if_exception(retryable),
            reraise=True,
        )
        return retrying(attempt)

    @staticmethod
    def _fill_reference(
        msg: Any, reference_image: bytes | str | Path | None, reference_id: str | None
    ) -> None:
        if reference_image is not None and reference_id is not None:
            raise InvalidArgumentError(
                grpc.StatusCode.INVALID_ARGUMENT,
                "give reference_image or reference_id, not both",
            )
        data = _read_bytes(reference_image)
        if data is not None:
            msg.reference_image = data
        elif reference_id is not None:
            msg.reference_id = reference_id

    @classmethod
    def _search_request(
        cls,
        text: str,
        reference_image: bytes | str | Path | None = None,
        reference_id: str | None = None,
        top_k: int = 10,
        offset: int = 0,
        filter: Mapping[str, Any] | str | None = None,
        mode: Mode = "auto",
        include_payload: bool = True,
        rerank_k: int | None = None,
    ) -> pb.SearchRequest:
        if mode not in MODES:
            raise InvalidArgumentError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"mode must be one of {sorted(MODES)}, got {mode!r}",
            )
        if top_k < 0 or offset < 0:
            raise InvalidArgumentError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"top_k and offset must be >= 0 (got top_k={top_k}, offset={offset})",
            )
        req = pb.SearchRequest(
            text=text,
            top_k=int(top_k),
            offset=int(offset),
            mode=MODES[mode],  # type: ignore[arg-type]
            include_payload=include_payload,
        )
        if rerank_k is not None:  # unset: the server's default (Info.reranker)
            if rerank_k < 0:
                raise InvalidArgumentError(
                    grpc.StatusCode.INVALID_ARGUMENT, f"rerank_k must be >= 0, got {rerank_k}"
                )
            req.rerank_k = int(rerank_k)
        cls._fill_reference(req, reference_image, reference_id)
        if isinstance(filter, str):
            req.filter_json = filter
        elif filter is not None:
            try:
                dict_to_struct(filter, req.filter)
            except (TypeError, ValueError) as exc:
                raise InvalidArgumentError(
                    grpc.StatusCode.INVALID_ARGUMENT, f"filter is not JSON-like: {exc}"
                ) from None
        return req

    @staticmethod
    def _result(resp: pb.SearchResponse) -> SearchResult:
        t = resp.timings
        timings = {
            "queue_ms": t.queue_ms,
            "decode_ms": t.decode_ms,
            "reference_ms": t.reference_ms,
            "encode_ms": t.encode_ms,
            "search_ms": t.search_ms,
            "total_ms": t.total_ms,
            "batch_size": float(t.batch_size),
            "reference_cached": float(t.reference_cached),
            "rerank_ms": t.rerank_ms,
        }
        hits = [
            Hit(
                h.id,
                float(h.score),
                int(h.rank),
                struct_to_dict(h.payload),
                h.user_id,
                float(h.first_stage_score),
                bool(h.reranked),
            )
            for h in resp.results
        ]
        return SearchResult(
            hits,
            resp.index_version,
            resp.encoder_fingerprint,
            timings,
            resp.request_id,
            int(resp.rerank_k),
            resp.reranker_fingerprint,
            MODE_NAMES.get(int(resp.searched_mode), "") if resp.searched_mode else "",
            resp.mode_note,
        )

    # -------------------------------------------------------------- RPCs
    def search(
        self,
        text: str,
        reference_image: bytes | str | Path | None = None,
        reference_id: str | None = None,
        top_k: int = 10,
        offset: int = 0,
        filter: Mapping[str, Any] | str | None = None,
        mode: Mode = "auto",
        include_payload: bool = True,
        timeout: float | None = None,
        rerank_k: int | None = None,
    ) -> SearchResult:
        """Composed search. ``reference_image``: encoded bytes or a local file path (read here);
        ``reference_id``: a point id or a user id; neither: text-only. ``filter``: a dict or a
        JSON text. ``rerank_k``: re-rank the first stage's top-K (None: the server's default,
        0: off)."""
        req = self._search_request(
            text,
            reference_image,
            reference_id,
            top_k,
            offset,
            filter,
            mode,
            include_payload,
            rerank_k,
        )
        return self._result(self._call(self._stub.Search, req, timeout))

    def search_batch(
        self, queries: Sequence[Mapping[str, Any]], timeout: float | None = None
    ) -> list[SearchResult]:
        """Several searches in one call; each query is a dict of ``search``'s keyword arguments
        (``text`` required). Results are in the same order."""
        reqs = []
        for i, q in enumerate(queries):
            try:
                reqs.append(self._search_request(**dict(q)))
            except TypeError as exc:
                raise InvalidArgumentError(
                    grpc.StatusCode.INVALID_ARGUMENT, f"queries[{i}]: {exc}"
                ) from None
        resp = self._call(self._stub.SearchBatch, pb.SearchBatchRequest(queries=reqs), timeout)
        return [self._result(r) for r in resp.responses]

    def encode_query(
        self,
        text: str,
        reference_image: bytes | str | Path | None = None,
        reference_id: str | None = None,
        timeout: float | None = None,
    ) -> np.ndarray:
        """The L2-normalised query vector ``[dim]`` float32."""
        req = pb.EncodeQueryRequest(text=text)
        self._fill_reference(req, reference_image, reference_id)
        resp = self._call(self._stub.EncodeQuery, req, timeout)
        return np.asarray(resp.vector, dtype=np.float32)

    def get_image(
        self, id: str, kind: ImageKind = "thumbnail", timeout: float | None = None
    ) -> tuple[bytes, str]:
        """A gallery item's thumbnail or original image: ``(bytes, mime_type)``. ``id``: a
        point id or a user id."""
        if kind not in KINDS:
            raise InvalidArgumentError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"kind must be one of {sorted(KINDS)}, got {kind!r}",
            )
        req = pb.GetImageRequest(id=id, kind=KINDS[kind])  # type: ignore[arg-type]
        resp = self._call(self._stub.GetImage, req, timeout)
        return bytes(resp.data), resp.mime_type

    def list_images(
        self,
        page_size: int = 50,
        offset: int = 0,
        random_seed: int | None = None,
        include_payload: bool = True,
        timeout: float | None = None,
    ) -> ImagePage:
        """A page of gallery ids with payload summaries, or a seeded random sample."""
        req = pb.ListImagesRequest(
            page_size=int(page_size), offset=int(offset), include_payload=include_payload
        )
        if random_seed is not None:
            req.random_seed = int(random_seed)
        resp = self._call(self._stub.ListImages, req, timeout)
        items = [ImageItem(it.id, struct_to_dict(it.payload)) for it in resp.items]
        nxt = int(resp.next_offset) if resp.HasField("next_offset") else None
        return ImagePage(items, nxt, int(resp.total))

    def explain(
        self,
        text: str,
        candidate_id: str,
        reference_image: bytes | str | Path | None = None,
        reference_id: str | None = None,
        timeout: float | None = None,
    ) -> Explanation:
        """Why ``candidate_id`` scored as it did for (reference, ``text``): heatmaps on the
        candidate and the reference, and a signed score per caption word. The reference is
        required (``reference_image`` bytes or file path, or ``reference_id``)."""
        if reference_image is None and reference_id is None:
            raise InvalidArgumentError(
                grpc.StatusCode.INVALID_ARGUMENT,
                "explain needs a reference: give reference_image or reference_id",
            )
        req = pb.ExplainRequest(text=text, candidate_id=candidate_id)
        self._fill_reference(req, reference_image, reference_id)
        resp = self._call(self._stub.Explain, req, timeout)

        def heatmap(h: Any) -> Heatmap:
            values = np.asarray(h.values, dtype=np.float32).reshape(int(h.rows), int(h.cols))
            return Heatmap(int(h.rows), int(h.cols), values, bytes(h.png))

        return Explanation(
            float(resp.score),
            heatmap(resp.candidate_map),
            heatmap(resp.reference_map),
            [WordScore(w.word, float(w.score)) for w in resp.words],
        )

    def info(self, timeout: float | None = None) -> ServerInfo:
        r = self._call(self._stub.Info, pb.InfoRequest(), timeout)
        m, i, lim = r.model, r.index, r.limits
        return ServerInfo(
            model=ModelInfo(
                m.preset,
                m.fingerprint,
                m.dim,
                m.num_queries,
                m.image_size,
                m.max_text_tokens,
                m.device,
                m.dtype,
            ),
            index=IndexInfo(
                i.name,
                i.backend,
                i.version,
                int(i.count),
                dict(i.filterable_fields),
                i.encoder_fingerprint,
            ),
            limits=Limits(
                lim.max_top_k,
                lim.max_offset,
                lim.max_text_chars,
                int(lim.max_image_bytes),
                int(lim.max_image_pixels),
                lim.max_batch_queries,
                int(lim.max_message_bytes),
                lim.max_page_size,
                lim.max_rerank_k,
            ),
            server_version=r.server_version,
            max_batch=r.max_batch,
            max_wait_ms=r.max_wait_ms,
            reranker=RerankerInfo(
                bool(r.reranker.loaded),
                r.reranker.fingerprint,
                r.reranker.features,
                int(r.reranker.default_rerank_k),
            ),
        )

    def health(self, service: str = "", timeout: float | None = None) -> str:
        """grpc.health.v1 status: "SERVING", "NOT_SERVING", "SERVICE_UNKNOWN" or "UNKNOWN".
        ``service``: "" (the whole server) or "cir.v1.SearchService". No retries."""
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        stub = health_pb2_grpc.HealthStub(self._channel)
        try:
            resp = stub.Check(
                health_pb2.HealthCheckRequest(service=service),
                timeout=self.timeout if timeout is None else timeout,
            )
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status))

    def wait_ready(self, timeout: float = 30.0, interval: float = 0.1) -> None:
        """Block until health says SERVING; raises ``ServerUnavailableError`` after ``timeout``."""
        deadline = time.monotonic() + timeout
        last = "no answer"
        while time.monotonic() < deadline:
            try:
                last = self.health(timeout=max(0.1, min(2.0, deadline - time.monotonic())))
                if last == "SERVING":
                    return
            except CIRError as exc:
                last = str(exc)
            time.sleep(interval)
        raise ServerUnavailableError(
            grpc.StatusCode.UNAVAILABLE, f"{self.target} not SERVING after {timeout}s ({last})"
        )


def parse_filter(text: str | None) -> dict[str, Any] | None:
    """A ``--filter`` JSON object text -> dict (None passes through)."""
    if text is None or not text.strip():
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidArgumentError(
            grpc.StatusCode.INVALID_ARGUMENT, f"filter is not valid JSON: {exc}"
        ) from None
    if not isinstance(value, dict):
        raise InvalidArgumentError(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"filter must be a JSON object, got {type(value).__name__}",
        )
    return value


__all__ = [
    "CIRClient",
    "CIRError",
    "DeadlineExceededError",
    "Explanation",
    "FailedPreconditionError",
    "Heatmap",
    "Hit",
    "ImageItem",
    "ImagePage",
    "IndexInfo",
    "InvalidArgumentError",
    "Limits",
    "ModelInfo",
    "NotFoundError",
    "ResourceExhaustedError",
    "SearchResult",
    "ServerInfo",
    "ServerUnavailableError",
    "UnauthenticatedError",
    "WordScore",
    "parse_filter",
]
