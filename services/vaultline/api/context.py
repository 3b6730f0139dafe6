"""Who is calling and about what: the per-call context every layer below the edge can read.

The servicer wrapper (`api.tokenization.unary` / `streaming`) opens it before a method runs:
one place per call, no per-call handler rebuilding as a generic interceptor would need.
Access control (mTLS identity, role, tenant binding) plugs in here: `identity` is None until a
caller authenticates.
"""

from __future__ import annotations

import contextvars
import re
import uuid
from dataclasses import dataclass

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


def _request_id(context: grpc.aio.ServicerContext) -> str:
    for key, value in context.invocation_metadata() or ():
        if key == "x-request-id" and isinstance(value, str) and _REQUEST_ID.match(value):
            return value
    return uuid.uuid4().hex


def open_call(method: str, context: grpc.aio.ServicerContext) -> CallContext:
    """Build the call's context and make it current for this task (each RPC has its own)."""
    call = CallContext(method, _request_id(context), context.peer())
    current_call.set(call)
    return call
