"""Request messages that are not protobuf at all: INVALID_ARGUMENT, never a silent end.

Why: grpc deserializes a request message before servicer code sees it. Bytes that do not
parse as the request message (invalid UTF-8 in a ``string``, which C++ clients
serialise; a field whose wire type changed between versions; a corrupted payload) made
grpc answer a unary call ``UNKNOWN: Unexpected <class 'DecodeError'>`` and log an ERROR
with a full traceback, per request, so any client (even without a token) could flood
the log, and the RPC never reached the metrics. On a request stream the ``async for``
over the requests raised instead, and that iterator cannot go on: one bad message ended
``StreamTelemetry`` (status OK) and every later frame went unread, though gRPC messages
are length-prefixed, so the next one is intact.

How: the interceptor swaps the handler's deserializer for one that returns an
``Undecodable`` marker instead of raising.

* Unary-request RPCs: the wrapped behaviour turns the marker into ``INVALID_ARGUMENT``
  naming the expected message, counted as
  ``tamiyo_rejected_inputs_total{reason="undecodable"}``.
* Request-streaming RPCs in ``IN_STREAM``: the marker is handed to the servicer in the
  request stream, which answers it in-stream and goes on (``tamiyo_server.stream``
  counts it).
* Any other request-streaming RPC (reflection): the call ends with ``INVALID_ARGUMENT``
  at the bad message, counted as above.
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Awaitable, Callable, Collection
from typing import TYPE_CHECKING, Any, cast

import grpc

if TYPE_CHECKING:
    _Interceptor = grpc.aio.ServerInterceptor[Any, Any]
else:
    _Interceptor = grpc.aio.ServerInterceptor


IN_STREAM = frozenset({"/tamiyo.v1.TamiyoService/StreamTelemetry"})
"""Request-streaming methods whose servicer answers an ``Undecodable`` marker itself (in
the stream, which goes on) instead of the call being ended here."""


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
    """Answer undecodable request messages with INVALID_ARGUMENT (see the module doc);
    ``on_reject`` counts each (except in ``in_stream`` methods, whose servicer counts
    the markers it is handed)."""

    def __init__(
        self, on_reject: Callable[[], None], in_stream: Collection[str] = IN_STREAM
    ) -> None:
        self.on_reject = on_reject
        self.in_stream = frozenset(in_stream)

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any]]
        ],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any]:
        handler = await continuation(handler_call_details)
        deserializer = handler.request_deserializer if handler is not None else None
        if handler is None or deserializer is None:
            return handler
        message = (
            f"request: not a valid {_message_name(deserializer)} (the bytes do not parse "
            "as that protobuf message)"
        )
        on_reject = self.on_reject
        if handler.request_streaming:
            return self._streaming(handler, handler_call_details.method, message)

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

    def _streaming(
        self, handler: grpc.RpcMethodHandler[Any, Any], method: str, message: str
    ) -> grpc.RpcMethodHandler[Any, Any]:
        """A request-streaming handler with the guarded deserializer: ``in_stream``
        methods get the markers; any other ends at the first one with INVALID_ARGUMENT."""
        assert handler.request_deserializer is not None
        parse = _guarded(handler.request_deserializer)
        inner = cast(Callable[..., Any] | None, handler.stream_stream or handler.stream_unary)
        make = (
            grpc.stream_stream_rpc_method_handler
            if handler.stream_stream is not None
            else grpc.stream_unary_rpc_method_handler
        )
        if inner is None:
            return handler
        if method in self.in_stream:
            return make(inner, parse, handler.response_serializer)
        on_reject = self.on_reject

        async def checked(requests: AsyncIterator[Any], context: Any) -> AsyncIterator[Any]:
            async for request in requests:
                if isinstance(request, Undecodable):
                    on_reject()
                    await context.abort(
                        grpc.StatusCode.INVALID_ARGUMENT, f"{message}: {request.error}"[:512]
                    )
                yield request

        if inspect.isasyncgenfunction(inner):

            async def gen(requests: Any, context: Any) -> AsyncIterator[Any]:
                async for item in inner(checked(requests, context), context):
                    yield item

            return make(gen, parse, handler.response_serializer)

        async def coro(requests: Any, context: Any) -> Any:
            return await inner(checked(requests, context), context)

        return make(coro, parse, handler.response_serializer)
