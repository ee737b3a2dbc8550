"""The cheap checks of each RPC's request (no I/O, no model): a refusal is a :class:`RequestError`
with INVALID_ARGUMENT (or FAILED_PRECONDITION for what this server cannot do), raised before the
request is admitted to the queue. ``where`` prefixes a message with the query's place in a
SearchBatch ("queries[3]: ").
"""

from __future__ import annotations

import json
import time
from typing import Any

from server._generated.cir.v1 import search_pb2 as pb
from server.engine import Engine, Query
from server.errors import RequestError
from server.protoconv import MODE_NAMES, struct_to_dict

DEFAULT_TOP_K = 10
DEFAULT_PAGE_SIZE = 50
#: GetImageRequest.kind -> the engine's image kind
IMAGE_KINDS = {
    pb.IMAGE_KIND_UNSPECIFIED: "thumbnail",
    pb.IMAGE_KIND_THUMBNAIL: "thumbnail",
    pb.IMAGE_KIND_ORIGINAL: "original",
}


def prefixed(exc: RequestError, where: str) -> RequestError:
    """``exc`` with ``where`` in front of its message (same code and retry hint)."""
    return RequestError(exc.code, where + exc.message, exc.retry_after_ms)


def deadline(context: Any, settings: Any) -> float:
    """The call's deadline on ``time.monotonic()``'s clock (the settings' default without one)."""
    remaining = context.time_remaining()
    if remaining is None:
        remaining = settings.default_timeout_s
    return time.monotonic() + max(0.0, float(remaining))


def check_text(text: str, settings: Any, where: str = "") -> str:
    """The modification text, stripped; refused when empty or over ``max_text_chars``."""
    if not text or not text.strip():
        raise RequestError("INVALID_ARGUMENT", f"{where}text is empty")
    if len(text) > settings.max_text_chars:
        raise RequestError(
            "INVALID_ARGUMENT",
            f"{where}text is {len(text)} characters; the limit is {settings.max_text_chars}",
        )
    return text.strip()


def _filter(request: pb.SearchRequest, where: str) -> dict[str, Any] | None:
    which = request.WhichOneof("filter_spec")
    if which == "filter":
        return struct_to_dict(request.filter) or None
    if which != "filter_json":
        return None
    raw = request.filter_json.strip()
    if not raw:
        return None
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
    return value or None


def parse_query(request: pb.SearchRequest, settings: Any, engine: Engine, where: str = "") -> Query:
    """The cheap checks of a search request: a Query without its reference (decoded later)."""
    s = settings
    text = check_text(request.text, s, where)
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
    flt = _filter(request, where)
    try:
        engine.check_filter(flt)
    except RequestError as exc:
        raise prefixed(exc, where) from None
    rerank_k = int(request.rerank_k) if request.HasField("rerank_k") else engine.default_rerank_k
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
    return Query(
        text=text,
        top_k=top_k,
        offset=offset,
        filter=flt,
        mode=MODE_NAMES[int(request.mode)],
        include_payload=(request.include_payload if request.HasField("include_payload") else True),
        rerank_k=rerank_k,
    )


def check_batch(request: pb.SearchBatchRequest, settings: Any) -> int:
    """The number of queries of a SearchBatch, refused when 0 or over ``max_batch_queries``."""
    n = len(request.queries)
    if n == 0:
        raise RequestError("INVALID_ARGUMENT", "queries is empty")
    if n > settings.max_batch_queries:
        raise RequestError(
            "INVALID_ARGUMENT",
            f"{n} queries; at most {settings.max_batch_queries} per SearchBatch",
        )
    return n


def image_request(request: pb.GetImageRequest) -> str:
    """GetImage's image kind ("thumbnail" / "original"), after checking the id is set."""
    kind = IMAGE_KINDS.get(int(request.kind))  # type: ignore[call-overload]
    if kind is None:
        raise RequestError("INVALID_ARGUMENT", f"unknown image kind {int(request.kind)}")
    if not request.id:
        raise RequestError("INVALID_ARGUMENT", "id is empty")
    return kind


def page_request(request: pb.ListImagesRequest, settings: Any) -> tuple[int, int | None, bool]:
    """ListImages' (page size, random seed or None, include payload)."""
    size = int(request.page_size) or DEFAULT_PAGE_SIZE
    if size > settings.max_page_size:
        raise RequestError(
            "INVALID_ARGUMENT", f"page_size must be in [1, {settings.max_page_size}], got {size}"
        )
    seed = int(request.random_seed) if request.HasField("random_seed") else None
    with_payload = request.include_payload if request.HasField("include_payload") else True
    return size, seed, with_payload


def explain_request(request: pb.ExplainRequest, settings: Any) -> tuple[str, str]:
    """Explain's (stripped text, which reference is set: "reference_image" / "reference_id")."""
    text = check_text(request.text, settings)
    which = request.WhichOneof("reference")
    if which is None:
        raise RequestError(
            "INVALID_ARGUMENT", "reference is required: set reference_image or reference_id"
        )
    if not request.candidate_id:
        raise RequestError("INVALID_ARGUMENT", "candidate_id is empty")
    return text, which


def explain_id(item_id: str, where: str) -> None:
    """A gallery id Explain reads must be set."""
    if not item_id:
        raise RequestError("INVALID_ARGUMENT", f"{where} is empty")
