"""The server's one error table: every exception an RPC can meet -> its gRPC status code.

The RPC wrapper (:func:`server.service.rpc`) and the engine's per-query results both go through
:func:`status_of`, so a type is mapped in one place only. Lookup walks the exception's MRO, so a
subclass listed here wins over its base (``InvalidFilterError`` over ``GalleryIndexError``), and
anything not listed is INTERNAL (its text stays in the server's log, never in the reply).

The table is documented, row by row, in docs/api.md ("Errors"); tests/test_server.py
checks every row end to end.

The client's side (``CIRError`` and its subclasses per status code) is
:mod:`server.client_errors`.
"""

from __future__ import annotations

from dataclasses import dataclass

import grpc

from retrieval.index.errors import (
    GalleryIndexError,
    IndexInUseError,
    IndexNotFoundError,
    IndexUnavailableError,
    InvalidFilterError,
    InvalidQueryError,
    ModelMismatchError,
)
from server.batching import BatcherClosedError, DeadlineUnmeetableError, QueueFullError


class RequestError(Exception):
    """A request the server must refuse; ``code`` is a ``grpc.StatusCode`` name."""

    def __init__(self, code: str, message: str, retry_after_ms: int | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.retry_after_ms = retry_after_ms


@dataclass(frozen=True)
class Status:
    """What a client receives for one exception."""

    code: grpc.StatusCode
    message: str
    retry_after_ms: int | None = None


#: exception type -> (status code, prefix of the message sent to the client)
TABLE: dict[type[BaseException], tuple[grpc.StatusCode, str]] = {
    InvalidFilterError: (grpc.StatusCode.INVALID_ARGUMENT, ""),
    InvalidQueryError: (grpc.StatusCode.INVALID_ARGUMENT, ""),
    IndexNotFoundError: (grpc.StatusCode.NOT_FOUND, "index not found: "),
    IndexInUseError: (grpc.StatusCode.FAILED_PRECONDITION, "index in use: "),
    ModelMismatchError: (grpc.StatusCode.FAILED_PRECONDITION, "index and model differ: "),
    IndexUnavailableError: (grpc.StatusCode.UNAVAILABLE, "index unavailable: "),
    GalleryIndexError: (grpc.StatusCode.INTERNAL, "index error: "),
    QueueFullError: (grpc.StatusCode.RESOURCE_EXHAUSTED, ""),
    BatcherClosedError: (grpc.StatusCode.UNAVAILABLE, ""),
    DeadlineUnmeetableError: (grpc.StatusCode.DEADLINE_EXCEEDED, ""),
}


def lookup(exc: BaseException) -> tuple[grpc.StatusCode, str] | None:
    """The table's row for ``exc`` (its most specific listed type), or None."""
    for klass in type(exc).__mro__:
        row = TABLE.get(klass)
        if row is not None:
            return row
    return None


def status_of(exc: BaseException, internal_message: str = "internal error") -> Status:
    """The status a client gets for ``exc``: a :class:`RequestError`'s own code, a listed type's
    row, else INTERNAL with ``internal_message`` (an unlisted exception's text is not sent)."""
    if isinstance(exc, RequestError):
        return Status(grpc.StatusCode[exc.code], exc.message, exc.retry_after_ms)
    row = lookup(exc)
    if row is None:
        return Status(grpc.StatusCode.INTERNAL, internal_message)
    code, prefix = row
    retry = exc.retry_after_ms if isinstance(exc, QueueFullError) else None
    return Status(code, f"{prefix}{exc}", None if retry is None else int(retry))


def to_request_error(exc: BaseException, internal_message: str = "internal error") -> RequestError:
    """``exc`` as the :class:`RequestError` a client will receive (per-query results)."""
    if isinstance(exc, RequestError):
        return exc
    st = status_of(exc, internal_message)
    return RequestError(st.code.name, st.message, st.retry_after_ms)


def is_mapped(exc: BaseException) -> bool:
    """True when the table (or a RequestError) decides ``exc``'s code; False: INTERNAL."""
    return isinstance(exc, RequestError) or lookup(exc) is not None


__all__ = [
    "TABLE",
    "RequestError",
    "Status",
    "is_mapped",
    "lookup",
    "status_of",
    "to_request_error",
]
