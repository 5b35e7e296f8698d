"""Optional bearer-token authentication and TLS / mTLS credentials.

When a token is configured every RPC must carry ``authorization: Bearer <token>``
metadata; anything else is refused with UNAUTHENTICATED (deny by default). The only
exemption is the standard health service, all of it (``Check``, ``Watch`` and ``List``),
so load-balancer and Kubernetes probes work without the secret: health reveals nothing
but SERVING / NOT_SERVING per service name, and ``List`` only the two names Tamiyo
registers (``""`` and ``tamiyo.v1.TamiyoService``), which reflection and the docs name
anyway. Reflection is not exempt. The comparison is constant-time
(``hmac.compare_digest``) so response timing does not leak the token.

The credentials are parsed as RFC 6750 says (``Bearer 1*SP b64token``): the scheme is
case-insensitive (RFC 7235 §2.1, so ``bearer`` and ``BEARER`` are accepted as some
clients and proxies send them), one or more spaces separate it from the token, and
optional whitespace around the whole value is ignored (RFC 9110 §5.5). The token itself
is compared exactly (case-sensitively). Anything else, another scheme included, is
refused.
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc

if TYPE_CHECKING:
    _Interceptor = grpc.aio.ServerInterceptor[Any, Any]
else:
    _Interceptor = grpc.aio.ServerInterceptor

HEALTH_METHODS = frozenset(
    f"/grpc.health.v1.Health/{method}" for method in ("Check", "Watch", "List")
)


def _deny(
    message: str, handler: grpc.RpcMethodHandler[Any, Any]
) -> grpc.RpcMethodHandler[Any, Any]:
    async def abort(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    # Keep the handler's shape so grpc can still (de)serialize; the call aborts at once.
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(abort)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(abort)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(abort)
    return grpc.unary_unary_rpc_method_handler(abort)


_SCHEME = b"bearer"
_OWS = b" \t"


def bearer_credentials(value: str | bytes) -> bytes | None:
    """The token of an ``authorization`` value with the Bearer scheme, else None.

    ``Bearer``, matched case-insensitively, then one or more SP, then the token, taken
    as it is (compared exactly by the caller); SP / HTAB around the value is ignored."""
    raw = (value.encode() if isinstance(value, str) else bytes(value)).strip(_OWS)
    scheme, sp, rest = raw.partition(b" ")
    if not sp or scheme.lower() != _SCHEME:
        return None
    return rest.lstrip(b" ") or None


class BearerTokenInterceptor(_Interceptor):
    """Deny every RPC without the right bearer token (health checks exempt)."""

    def __init__(self, token: str, exempt: frozenset[str] = HEALTH_METHODS) -> None:
        if not token:
            raise ValueError("an empty token would admit everyone; configure none instead")
        self._expected = token.encode()
        self._exempt = exempt

    def _ok(self, metadata: Any) -> bool:
        for key, value in metadata or ():
            if key == "authorization":
                # Not Bearer: compared as b"", which the (non-empty) token never equals.
                return hmac.compare_digest(bearer_credentials(value) or b"", self._expected)
        return False

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any]]
        ],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any]:
        handler = await continuation(handler_call_details)
        if handler is None or handler_call_details.method in self._exempt:
            return handler
        if self._ok(handler_call_details.invocation_metadata):
            return handler
        return _deny("missing or invalid bearer token (metadata 'authorization')", handler)


def server_credentials(
    cert_file: str, key_file: str, client_ca_file: str = ""
) -> grpc.ServerCredentials:
    """TLS with the server's PEM certificate chain and key; with ``client_ca_file`` it is
    mTLS: clients must present a certificate signed by that CA or the handshake fails."""
    chain = Path(cert_file).read_bytes()
    key = Path(key_file).read_bytes()
    if client_ca_file:
        return grpc.ssl_server_credentials(
            [(key, chain)],
            root_certificates=Path(client_ca_file).read_bytes(),
            require_client_auth=True,
        )
    return grpc.ssl_server_credentials([(key, chain)])
