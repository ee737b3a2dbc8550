"""API-key authentication as a grpc.aio server interceptor (health and reflection stay open)."""

from __future__ import annotations

import hmac
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import grpc

logger = logging.getLogger(__name__)

#: Methods under these prefixes never need a key (load balancers, grpcurl discovery).
OPEN_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")


def extract_key(metadata: Sequence[tuple[str, Any]] | None) -> str | None:
    """The key from ``x-api-key`` or ``authorization: Bearer KEY``."""
    for k, v in metadata or ():
        value = v.decode() if isinstance(v, bytes) else str(v)
        if k == "x-api-key":
            return value.strip()
        if k == "authorization" and value[:7].lower() == "bearer ":
            return value[7:].strip()
    return None


class ApiKeyInterceptor(grpc.aio.ServerInterceptor):
    """Rejects calls without a valid key with UNAUTHENTICATED (constant-time comparison)."""

    def __init__(self, keys: Sequence[str]) -> None:
        self._keys = [k.encode() for k in keys if k]

        async def deny(request: Any, context: grpc.aio.ServicerContext) -> Any:
            await context.abort(
                grpc.StatusCode.UNAUTHENTICATED,
                "missing or invalid API key: send metadata 'x-api-key: KEY' or "
                "'authorization: Bearer KEY'",
            )

        self._deny = grpc.unary_unary_rpc_method_handler(deny)

    def _ok(self, key: str | None) -> bool:
        if not key:
            return False
        raw = key.encode()
        ok = False
        for k in self._keys:  # no early exit: timing does not reveal which key matched
            ok |= hmac.compare_digest(raw, k)
        return ok

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        method = handler_call_details.method or ""
        if not self._keys or method.startswith(OPEN_PREFIXES):
            return await continuation(handler_call_details)
        if self._ok(extract_key(handler_call_details.invocation_metadata)):
            return await continuation(handler_call_details)
        logger.warning("unauthenticated call to %s", method)
        return self._deny
