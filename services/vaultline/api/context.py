"""Who is calling and about what: the per-call context every layer below the edge can read.

The interceptor fills it before a servicer runs. Access control (mTLS identity, role, tenant
binding) plugs in here: `identity` is None until a caller authenticates.
"""

from __future__ import annotations

import contextvars
import re
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc

_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}\Z")


@dataclass(frozen=True, slots=True)
class CallContext:
    method: str
    request_id: str
    peer: str
    identity: str | None = None


current_call: contextvars.ContextVar[CallContext | None] = contextvars.ContextVar(
    "vaultline_call", default=None
)


def _request_id(metadata: tuple[tuple[str, str | bytes], ...] | None) -> str:
    for key, value in metadata or ():
        if key == "x-request-id" and isinstance(value, str) and _REQUEST_ID.match(value):
            return value
    return uuid.uuid4().hex


class CallContextInterceptor(grpc.aio.ServerInterceptor):
    """Sets `current_call` for the handler; the slot where authentication will sit."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        method = handler_call_details.method
        request_id = _request_id(handler_call_details.invocation_metadata)
        return _wrap(handler, method, request_id)


def _wrap(handler: grpc.RpcMethodHandler, method: str, request_id: str) -> grpc.RpcMethodHandler:
    def enter(context: grpc.aio.ServicerContext) -> contextvars.Token[CallContext | None]:
        return current_call.set(CallContext(method, request_id, context.peer()))

    if handler.unary_unary:
        inner = handler.unary_unary

        async def unary_unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
            token = enter(context)
            try:
                return await inner(request, context)
            finally:
                current_call.reset(token)

        return grpc.unary_unary_rpc_method_handler(
            unary_unary, handler.request_deserializer, handler.response_serializer
        )
    if handler.stream_stream:
        inner_stream = handler.stream_stream

        async def stream_stream(requests: Any, context: grpc.aio.ServicerContext) -> Any:
            token = enter(context)
            try:
                async for response in inner_stream(requests, context):
                    yield response
            finally:
                current_call.reset(token)

        return grpc.stream_stream_rpc_method_handler(
            stream_stream, handler.request_deserializer, handler.response_serializer
        )
    return handler  # health and reflection: nothing of ours to set
