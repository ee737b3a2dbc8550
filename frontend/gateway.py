"""The UI's only door to the search server: a thin adapter over ``server.client.CIRClient``.

It turns the client's results into small plain dataclasses the app renders, and every failure
into a :class:`UIError` whose ``message`` is meant for the person at the page (server down,
wrong API key, bad input, timeout, ...). Nothing here loads the model: the client only speaks
gRPC, so the UI process stays free of torch.
"""

from __future__ import annotations

import base64
import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

from frontend.config import UISettings

logger = logging.getLogger(__name__)

T = TypeVar("T")

ErrorKind = Literal[
    "unavailable", "unauthenticated", "invalid", "not_found", "timeout", "busy", "mismatch", "other"
]
DEFAULT_MODES: tuple[str, ...] = ("auto", "exact", "fast")
FIELD_TYPES: tuple[str, ...] = ("keyword", "integer", "float", "bool")


class UIError(Exception):
    """A failed server call, with a message fit for the page."""

    def __init__(self, kind: ErrorKind, message: str, details: str = "") -> None:
        super().__init__(message)
        self.kind: ErrorKind = kind
        self.message = message
        self.details = details


@dataclass(frozen=True)
class HitView:
    """One search result as the grid shows it."""

    id: str  # point id (the index's own id)
    score: float  # ranking score (the re-ranker's when ``reranked``, else MaxSim)
    rank: int  # 1-based absolute rank
    payload: dict[str, Any] = field(default_factory=dict)  # stored payload (no thumbnail)
    user_id: str = ""  # the image's own id (manifest id column / relative path); "" if none
    first_stage_score: float = 0.0  # the first stage's MaxSim score
    reranked: bool = False  # ``score`` came from the second stage

    @property
    def label(self) -> str:
        """The id people know the image by: its own id, else the point id."""
        return self.user_id or self.id


@dataclass(frozen=True)
class SearchView:
    """One page of results."""

    hits: list[HitView]
    index_version: str = ""  # version the server searched
    timings: dict[str, float] = field(default_factory=dict)  # server stage times (ms)


@dataclass(frozen=True)
class GalleryItem:
    """A gallery item from ``ListImages``."""

    id: str  # point id
    payload: dict[str, Any] = field(default_factory=dict)

    @property
    def user_id(self) -> str:
        value = self.payload.get("user_id")
        return value if isinstance(value, str) else ""

    @property
    def label(self) -> str:
        return self.user_id or self.id


@dataclass(frozen=True)
class GalleryPage:
    items: list[GalleryItem]
    next_offset: int | None  # None on the last page (and for random samples)
    total: int  # gallery size


@dataclass(frozen=True)
class InfoView:
    """What the UI needs from ``Info``; missing pieces fall back to safe defaults."""

    preset: str = ""  # model preset
    fingerprint: str = ""  # encoder fingerprint
    index_name: str = ""
    index_version: str = ""
    index_count: int = 0  # gallery items
    backend: str = ""
    fields: dict[str, str] = field(default_factory=dict)  # filterable field -> type
    max_top_k: int = 100  # largest top_k the server accepts
    max_offset: int = 10_000  # largest offset ("more results" stops there)
    max_text_chars: int = 0  # 0: unknown
    max_image_bytes: int = 0  # 0: unknown
    max_image_pixels: int = 0  # 0: unknown
    max_page_size: int = 100  # largest ListImages page
    server_version: str = ""
    modes: tuple[str, ...] = DEFAULT_MODES  # search modes offered in the UI
    reranker: str = ""  # the server's re-ranker fingerprint ("": none, the toggle is off)
    default_rerank_k: int = 0  # candidates it re-ranks when a request does not say


# ---------------------------------------------------------------------------------- errors
_MESSAGES: dict[str, str] = {
    "unavailable": "Cannot reach the search server at {server}. Is it running? ({details})",
    "unauthenticated": "The search server rejected the API key. Start the UI with the right "
    "--api-key (CIR_UI_API_KEY). ({details})",
    "invalid": "The server refused the request: {details}",
    "not_found": "Not found: {details}",
    "timeout": "The server did not answer within {timeout:g} s. Try again, ask for fewer "
    "results, or start the UI with a larger --timeout. ({details})",
    "busy": "The server is busy right now; try again in a moment. ({details})",
    "mismatch": "The server's index and model do not match: {details}",
    "other": "Unexpected error from the search server: {details}",
}

# class name in server.client -> kind (matched by name so a renamed/added class degrades to "other")
_CLASS_KINDS: dict[str, ErrorKind] = {
    "ServerUnavailableError": "unavailable",
    "UnavailableError": "unavailable",
    "UnauthenticatedError": "unauthenticated",
    "PermissionDeniedError": "unauthenticated",
    "InvalidArgumentError": "invalid",
    "NotFoundError": "not_found",
    "DeadlineExceededError": "timeout",
    "ResourceExhaustedError": "busy",
    "FailedPreconditionError": "mismatch",
}
# grpc.StatusCode names -> kind (for errors that only carry a .code)
_CODE_KINDS: dict[str, ErrorKind] = {
    "UNAVAILABLE": "unavailable",
    "UNAUTHENTICATED": "unauthenticated",
    "PERMISSION_DENIED": "unauthenticated",
    "INVALID_ARGUMENT": "invalid",
    "OUT_OF_RANGE": "invalid",
    "NOT_FOUND": "not_found",
    "DEADLINE_EXCEEDED": "timeout",
    "RESOURCE_EXHAUSTED": "busy",
    "FAILED_PRECONDITION": "mismatch",
}


def classify(exc: BaseException) -> ErrorKind:
    """The UI error kind of an exception from the client (or from grpc directly)."""
    for klass in type(exc).__mro__:
        kind = _CLASS_KINDS.get(klass.__name__)
        if kind:
            return kind
    code = getattr(exc, "code", None)
    if callable(code):  # grpc.RpcError exposes code() as a method
        try:
            code = code()
        except Exception:  # noqa: BLE001 - a broken error object must not break the page
            code = None
    name = getattr(code, "name", code)
    if isinstance(name, str) and name.upper() in _CODE_KINDS:
        return _CODE_KINDS[name.upper()]
    if isinstance(exc, TimeoutError):
        return "timeout"
    if isinstance(exc, ConnectionError):
        return "unavailable"
    return "other"


def _details(exc: BaseException) -> str:
    details = getattr(exc, "details", None)
    if callable(details):
        try:
            details = details()
        except Exception:  # noqa: BLE001
            details = None
    text = str(details) if details else str(exc)
    return text.strip() or type(exc).__name__


def to_ui_error(exc: BaseException, settings: UISettings) -> UIError:
    """Wrap any exception into a UIError with a message for the page."""
    if isinstance(exc, UIError):
        return exc
    kind = classify(exc)
    details = _details(exc)
    message = _MESSAGES[kind].format(
        server=settings.server, timeout=settings.timeout, details=details
    )
    return UIError(kind, message, details)


# ---------------------------------------------------------------------------------- gateway
class Gateway:
    """The calls the app makes; every method raises only :class:`UIError`."""

    def __init__(self, settings: UISettings, client: Any | None = None) -> None:
        self.settings = settings
        self._client = client

    @property
    def client(self) -> Any:
        if self._client is None:
            self._client = self._guard(self._make_client)
        return self._client

    def _make_client(self) -> Any:
        # grpc only; importing it here keeps `cir --help` and the app's first paint light.
        from server.client import CIRClient

        return CIRClient(
            self.settings.server,
            api_key=self.settings.api_key,
            tls_ca=self.settings.tls_ca,
            timeout=self.settings.timeout,
        )

    def _guard(self, fn: Callable[[], T]) -> T:
        try:
            return fn()
        except UIError:
            raise
        except Exception as exc:  # noqa: BLE001 - everything becomes a message, never a crash
            err = to_ui_error(exc, self.settings)
            if err.kind == "other":
                logger.exception("server call failed")
            else:
                logger.info("server call failed (%s): %s", err.kind, err.details)
            raise err from exc

    def close(self) -> None:
        close = getattr(self._client, "close", None)
        if callable(close):
            try:
                close()
            except Exception:  # noqa: BLE001
                logger.debug("closing the client failed", exc_info=True)

    # ------------------------------------------------------------------------------ calls
    def info(self) -> InfoView:
        return self._guard(lambda: _info_view(self.client.info()))

    def search(
        self,
        text: str,
        *,
        reference_image: bytes | None = None,
        reference_id: str | None = None,
        top_k: int = 10,
        offset: int = 0,
        filter: Mapping[str, Any] | None = None,
        mode: str = "auto",
        rerank_k: int | None = None,
    ) -> SearchView:
        """``rerank_k``: None = the server's default second stage, 0 = the first stage only."""

        def call() -> SearchView:
            res = self.client.search(
                text,
                reference_image=reference_image,
                reference_id=reference_id,
                top_k=top_k,
                offset=offset,
                filter=dict(filter) if filter else None,
                mode=mode,
                include_payload=True,
                rerank_k=rerank_k,
            )
            return _search_view(res, offset)

        return self._guard(call)

    def get_image(self, image_id: str, kind: str = "thumbnail") -> tuple[bytes, str]:
        def call() -> tuple[bytes, str]:
            res = self.client.get_image(image_id, kind=kind)
            if isinstance(res, tuple):
                data, mime = res[0], (res[1] if len(res) > 1 else "")
            else:  # an object with .data / .mime_type
                data = getattr(res, "data", b"")
                mime = getattr(res, "mime_type", "") or getattr(res, "mime", "")
            return bytes(data), str(mime or "application/octet-stream")

        return self._guard(call)

    def list_images(
        self, page_size: int, offset: int = 0, random_seed: int | None = None
    ) -> GalleryPage:
        def call() -> GalleryPage:
            res = self.client.list_images(
                page_size=page_size, offset=offset, random_seed=random_seed
            )
            if isinstance(res, tuple):
                items, next_offset, total = (list(res) + [None, None, 0])[:3]
            else:
                items = getattr(res, "items", [])
                next_offset = getattr(res, "next_offset", None)
                total = getattr(res, "total", 0)
            return GalleryPage(
                items=[_gallery_item(i) for i in items or []],
                next_offset=None if next_offset is None else int(next_offset),
                total=int(total or 0),
            )

        return self._guard(call)


# ---------------------------------------------------------------------------------- converters
def _get(obj: Any, *names: str, default: Any = None) -> Any:
    """First present attribute/key among ``names`` (walks dotted paths)."""
    for name in names:
        cur = obj
        ok = True
        for part in name.split("."):
            if isinstance(cur, Mapping) and part in cur:
                cur = cur[part]
            elif not isinstance(cur, Mapping) and hasattr(cur, part):
                cur = getattr(cur, part)
            else:
                ok = False
                break
        if ok and cur is not None:
            return cur
    return default


def _int(value: Any, default: int) -> int:
    try:
        v = int(value)
    except (TypeError, ValueError):
        return default
    return v if v > 0 else default


def _plain(value: Any) -> Any:
    """Struct-ish payload values -> plain JSON (whole floats from protobuf Struct become ints)."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if (
        isinstance(value, float)
        and math.isfinite(value)
        and value.is_integer()
        and abs(value) < 2**53
    ):
        return int(value)
    return value


def _payload(raw: Any) -> dict[str, Any]:
    if raw is None:
        return {}
    if not isinstance(raw, Mapping):
        try:  # a protobuf Struct
            from google.protobuf.json_format import MessageToDict

            raw = MessageToDict(raw)
        except Exception:  # noqa: BLE001
            return {}
    return {str(k): _plain(v) for k, v in raw.items()}


def _info_view(info: Any) -> InfoView:
    fields_raw = _get(info, "filterable_fields", "index.filterable_fields", "fields", default={})
    fields = {str(k): str(v) for k, v in dict(fields_raw).items() if str(v) in FIELD_TYPES}
    modes = _get(info, "modes", "search_modes", default=None)
    return InfoView(
        preset=str(_get(info, "model.preset", "preset", "model", default="") or ""),
        fingerprint=str(_get(info, "model.fingerprint", "encoder_fingerprint", default="")),
        index_name=str(_get(info, "index.name", "index_name", default="")),
        index_version=str(_get(info, "index.version", "index_version", default="")),
        index_count=_int(_get(info, "index.count", "index_size", "count", default=0), 0),
        backend=str(_get(info, "index.backend", "backend", default="")),
        fields=fields,
        max_top_k=_int(_get(info, "limits.max_top_k", "max_top_k"), 100),
        max_offset=_int(_get(info, "limits.max_offset", "max_offset"), 10_000),
        max_text_chars=_int(_get(info, "limits.max_text_chars", "max_text_chars"), 0),
        max_image_bytes=_int(_get(info, "limits.max_image_bytes", "max_image_bytes"), 0),
        max_image_pixels=_int(_get(info, "limits.max_image_pixels", "max_image_pixels"), 0),
        max_page_size=_int(_get(info, "limits.max_page_size", "max_page_size"), 100),
        server_version=str(_get(info, "server_version", default="")),
        modes=tuple(str(m) for m in modes) if modes else DEFAULT_MODES,
        reranker=str(_get(info, "reranker.fingerprint", default="") or ""),
        default_rerank_k=_int(_get(info, "reranker.default_rerank_k", default=0), 0),
    )


def _search_view(res: Any, offset: int) -> SearchView:
    raw_hits = _get(res, "results", "hits", default=[])
    hits = []
    for pos, h in enumerate(raw_hits):
        rank = _int(_get(h, "rank", default=0), offset + pos + 1)
        payload = _payload(_get(h, "payload", default=None))
        user_id = _get(h, "user_id", default="") or payload.get("user_id") or ""
        score = float(_get(h, "score", default=0.0))
        reranked = bool(_get(h, "reranked", default=False))
        hits.append(
            HitView(
                id=str(_get(h, "id", default="")),
                score=score,
                rank=rank,
                payload=payload,
                user_id=str(user_id),
                first_stage_score=float(_get(h, "first_stage_score", default=score))
                if reranked
                else score,
                reranked=reranked,
            )
        )
    timings_raw = _get(res, "timings", default={})
    timings: dict[str, float] = {}
    if isinstance(timings_raw, Mapping):
        items: list[tuple[Any, Any]] = list(timings_raw.items())
    else:  # a Timings message
        items = [(k, getattr(timings_raw, k)) for k in dir(timings_raw) if k.endswith("_ms")]
    for k, v in items:
        if isinstance(v, int | float) and not isinstance(v, bool):
            timings[str(k)] = float(v)
    return SearchView(
        hits=hits, index_version=str(_get(res, "index_version", default="")), timings=timings
    )


def _gallery_item(item: Any) -> GalleryItem:
    if isinstance(item, str):
        return GalleryItem(id=item)
    return GalleryItem(
        id=str(_get(item, "id", default="")), payload=_payload(_get(item, "payload", default=None))
    )


def payload_for_display(payload: Mapping[str, Any], max_chars: int = 200) -> dict[str, Any]:
    """The payload without the thumbnail blob and with long strings shortened."""
    out: dict[str, Any] = {}
    for k, v in payload.items():
        if k == "thumbnail":
            continue
        if isinstance(v, str) and len(v) > max_chars:
            v = v[:max_chars] + f"... ({len(v)} chars)"
        out[k] = v
    return out


def thumbnail_from_payload(payload: Mapping[str, Any]) -> bytes | None:
    """Decode a base64 ``thumbnail`` payload field (fallback when GetImage fails)."""
    raw = payload.get("thumbnail")
    if not isinstance(raw, str) or not raw:
        return None
    try:
        return base64.b64decode(raw, validate=False)
    except (ValueError, TypeError):
        return None
