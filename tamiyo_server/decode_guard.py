"""Requests that are not protobuf at all, on the unary-request RPCs: INVALID_ARGUMENT.

Why: grpc deserializes a unary request before any servicer code runs. Bytes that do not
parse as the request message made grpc answer ``UNKNOWN: Unexpected <class
'DecodeError'>`` and log an ERROR with a full traceback, per request, so any client
(even without a token) could flood the log, and the RPC never reached the metrics. The
streaming RPC already answers such bytes in-stream (``tamiyo_server.stream``).

How: the interceptor swaps the handler's deserializer for one that returns an
``Undecodable`` marker instead of raising, and the wrapped behaviour turns the marker into
``INVALID_ARGUMENT`` naming the expected message, counted as
``tamiyo_rejected_inputs_total{reason="undecodable"}``.
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any

import grpc

if TYPE_CHECKING:
    _Interceptor = grpc.aio.ServerInterceptor[Any, Any]
else:
    _Interceptor = grpc.aio.ServerInterceptor


class Undecodable:
    """What the guarded deserializer returns for bytes that are not the message."""

    __slots__ = ("error",)

    def __init__(self, error: Exception) -> None:
        self.error = error


def _message_name(deserializer: Callable[[bytes], Any]) -> str:
    owner = getattr(deserializer, "__self__", None)  # Message.FromString is bound
    descriptor = getattr(owner, "DESCRIPTOR", None)
    return str(getattr(descriptor, "full_name", "request message"))


def _guarded(deserializer: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    def parse(raw: bytes) -> Any:
        try:
            return deserializer(raw)
        except Exception as exc:  # DecodeError, or a deserializer's own error
            return Undecodable(exc)

    return parse


class UndecodableRequestGuard(_Interceptor):
    """Answer undecodable unary requests with INVALID_ARGUMENT (see the module doc);
    ``on_reject`` counts each."""

    def __init__(self, on_reject: Callable[[], None]) -> None:
        self.on_reject = on_reject

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any]]
        ],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any]:
        handler = await continuation(handler_call_details)
        deserializer = handler.request_deserializer if handler is not None else None
        if handler is None or handler.request_streaming or deserializer is None:
            return handler
        message = (
            f"request: not a valid {_message_name(deserializer)} (the bytes do not parse "
            "as that protobuf message)"
        )
        on_reject = self.on_reject

        async def refuse(request: Undecodable, context: Any) -> None:
            on_reject()
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, f"{message}: {request.error}"[:512]
            )

        parse = _guarded(deserializer)
        if handler.unary_unary is not None:
            inner_uu = handler.unary_unary

            async def unary_unary(request: Any, context: Any) -> Any:
                if isinstance(request, Undecodable):
                    await refuse(request, context)
                return await inner_uu(request, context)

            return grpc.unary_unary_rpc_method_handler(
                unary_unary, parse, handler.response_serializer
            )
        inner_us = handler.unary_stream
        if inner_us is None:
            return handler
        if inspect.isasyncgenfunction(inner_us):

            async def gen(request: Any, context: Any) -> AsyncIterator[Any]:
                if isinstance(request, Undecodable):
                    await refuse(request, context)
                async for item in inner_us(request, context):
                    yield item

            return grpc.unary_stream_rpc_method_handler(gen, parse, handler.response_serializer)

        async def unary_stream(request: Any, context: Any) -> Any:  # writes with
            if isinstance(request, Undecodable):  # context.write (health Watch)
                await refuse(request, context)
            return await inner_us(request, context)  # type: ignore[misc]  # (a coroutine)

        return grpc.unary_stream_rpc_method_handler(
            unary_stream, parse, handler.response_serializer
        )
