"""The UI's only door to the search server: a thin adapter over ``server.client.CIRClient``.

It turns the client's results into small plain dataclasses the app renders, and every failure
into a :class:`UIError` whose ``message`` is meant for the person at the page (server down,
wrong API key, bad input, timeout, ...). Nothing here loads the model: the client only speaks
gRPC, so the UI process stays free of torch.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from frontend.config import UISettings
from retrieval.index.api import FIELD_TYPES

if TYPE_CHECKING:  # the client's types (importing it at run time loads grpc)
    from server.client import SearchResult, ServerInfo

logger = logging.getLogger(__name__)

T = TypeVar("T")

ErrorKind = Literal[
    "unavailable", "unauthenticated", "invalid", "not_found", "timeout", "busy", "mismatch", "other"
]
DEFAULT_MODES: tuple[str, ...] = ("auto", "exact", "fast")


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

# the client's error code (``CIRError.code.name``) -> kind; every failure of the typed client is
# a ``server.client_errors.CIRError``, anything else is "other"
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
    """The UI error kind of an exception from the client: by its status code alone."""
    from server.client_errors import CIRError  # grpc only; keeps the first paint light

    if not isinstance(exc, CIRError):
        return "other"
    return _CODE_KINDS.get(exc.code.name, "other")


def _details(exc: BaseException) -> str:
    from server.client_errors import CIRError

    text = exc.details if isinstance(exc, CIRError) and exc.details else str(exc)
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
            data, mime = self.client.get_image(image_id, kind=kind)
            return bytes(data), str(mime or "application/octet-stream")

        return self._guard(call)

    def list_images(
        self, page_size: int, offset: int = 0, random_seed: int | None = None
    ) -> GalleryPage:
        def call() -> GalleryPage:
            page = self.client.list_images(
                page_size=page_size, offset=offset, random_seed=random_seed
            )
            return GalleryPage(
                items=[GalleryItem(id=i.id, payload=dict(i.payload)) for i in page.items],
                next_offset=page.next_offset,
                total=int(page.total),
            )

        return self._guard(call)


# ---------------------------------------------------------------------------------- converters
# from the typed client's dataclasses (server.client: ServerInfo, SearchResult)
def _positive(value: int, default: int) -> int:
    """``value`` when the server set it (> 0), else the UI's default."""
    return int(value) if value and value > 0 else default


def _info_view(info: ServerInfo) -> InfoView:
    idx, lim = info.index, info.limits
    return InfoView(
        preset=info.model.preset,
        fingerprint=info.model.fingerprint,
        index_name=idx.name,
        index_version=idx.version,
        index_count=max(0, int(idx.count)),
        backend=idx.backend,
        fields={k: v for k, v in idx.filterable_fields.items() if v in FIELD_TYPES},
        max_top_k=_positive(lim.max_top_k, 100),
        max_offset=_positive(lim.max_offset, 10_000),
        max_text_chars=_positive(lim.max_text_chars, 0),
        max_image_bytes=_positive(lim.max_image_bytes, 0),
        max_image_pixels=_positive(lim.max_image_pixels, 0),
        max_page_size=_positive(lim.max_page_size, 100),
        server_version=info.server_version,
        reranker=info.reranker.fingerprint,
        default_rerank_k=_positive(info.reranker.default_rerank_k, 0),
    )


def _search_view(res: SearchResult, offset: int) -> SearchView:
    hits = [
        HitView(
            id=h.id,
            score=float(h.score),
            rank=h.rank if h.rank > 0 else offset + pos + 1,
            payload=dict(h.payload),
            user_id=h.user_id,
            first_stage_score=float(h.first_stage_score) if h.reranked else float(h.score),
            reranked=bool(h.reranked),
        )
        for pos, h in enumerate(res.results)
    ]
    return SearchView(
        hits=hits,
        index_version=res.index_version,
        timings={k: float(v) for k, v in res.timings.items()},
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
