"""The client's exceptions: one class per gRPC status code a caller may want to handle.

Raised by :class:`server.client.CIRClient` (which re-exports them). Callers that branch on a
failure use ``CIRError.code`` (a ``grpc.StatusCode``) or these classes; the server's side of the
same table (exception type -> code) is :mod:`server.errors`, documented in docs/api.md.
"""

from __future__ import annotations

from typing import Any

import grpc


class CIRError(Exception):
    """A failed call. ``code``: the ``grpc.StatusCode``; ``details``: the server's message;
    ``retry_after_ms``: the server's hint on RESOURCE_EXHAUSTED; ``request_id``: for logs."""

    def __init__(
        self,
        code: grpc.StatusCode,
        details: str,
        *,
        retry_after_ms: float | None = None,
        request_id: str | None = None,
    ) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details
        self.retry_after_ms = retry_after_ms
        self.request_id = request_id


class ServerUnavailableError(CIRError):
    """UNAVAILABLE: server down, not ready, shutting down, or index backend unreachable."""


class UnauthenticatedError(CIRError):
    """UNAUTHENTICATED / PERMISSION_DENIED: missing or wrong API key."""


class InvalidArgumentError(CIRError):
    """INVALID_ARGUMENT (bad image/text/top_k/offset/filter) or OUT_OF_RANGE."""


class NotFoundError(CIRError):
    """NOT_FOUND: unknown gallery id, or the original image file is gone."""


class DeadlineExceededError(CIRError):
    """DEADLINE_EXCEEDED: the call's deadline passed."""


class ResourceExhaustedError(CIRError):
    """RESOURCE_EXHAUSTED: the server's queue is full (see ``retry_after_ms``) or a message is
    too large."""


class FailedPreconditionError(CIRError):
    """FAILED_PRECONDITION: e.g. the index was built by another model."""


_BY_CODE: dict[grpc.StatusCode, type[CIRError]] = {
    grpc.StatusCode.UNAVAILABLE: ServerUnavailableError,
    grpc.StatusCode.UNAUTHENTICATED: UnauthenticatedError,
    grpc.StatusCode.PERMISSION_DENIED: UnauthenticatedError,
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgumentError,
    grpc.StatusCode.OUT_OF_RANGE: InvalidArgumentError,
    grpc.StatusCode.NOT_FOUND: NotFoundError,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceededError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhaustedError,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPreconditionError,
}


def _metadata_value(md: Any, key: str) -> str | None:
    for item in md or ():
        k, v = item[0], item[1]
        if k == key:
            return v.decode() if isinstance(v, bytes) else str(v)
    return None


def from_rpc_error(exc: grpc.RpcError) -> CIRError:
    """The matching ``CIRError`` subclass for a ``grpc.RpcError`` (a ``grpc.Call``)."""
    code_fn = getattr(exc, "code", None)
    code = code_fn() if callable(code_fn) else grpc.StatusCode.UNKNOWN
    details_fn = getattr(exc, "details", None)
    details = (details_fn() if callable(details_fn) else None) or str(exc)
    trailing_fn = getattr(exc, "trailing_metadata", None)
    trailing = trailing_fn() if callable(trailing_fn) else None
    retry = _metadata_value(trailing, "retry-after-ms")
    retry_ms: float | None = None
    if retry is not None:
        try:
            retry_ms = float(retry)
        except ValueError:
            retry_ms = None
    cls = _BY_CODE.get(code, CIRError)
    return cls(
        code,
        details,
        retry_after_ms=retry_ms,
        request_id=_metadata_value(trailing, "x-request-id"),
    )


__all__ = [
    "CIRError",
    "DeadlineExceededError",
    "FailedPreconditionError",
    "InvalidArgumentError",
    "NotFoundError",
    "ResourceExhaustedError",
    "ServerUnavailableError",
    "UnauthenticatedError",
    "from_rpc_error",
]
