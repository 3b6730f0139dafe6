"""Who is calling and about what: the per-call context every layer below the edge can read.

The servicer wrapper (`api.tokenization.unary` / `streaming`) opens it before a method runs:
one place per call, no per-call handler rebuilding as a generic interceptor would need.
`api.gate.Gate.admit` then adds the mTLS identity, role and policy grant.
"""

from __future__ import annotations

import contextvars
import os
import re
import string
from dataclasses import dataclass
from typing import TYPE_CHECKING

import grpc

if TYPE_CHECKING:
    from ..security.access import Grant

# Byte -> letter (slightly uneven; request ids are unique handles, not secrets).
_LETTERS = bytes(string.ascii_lowercase[b % 26].encode()[0] for b in range(256))
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}\Z")


@dataclass(frozen=True, slots=True)
class CallContext:
    method: str
    request_id: str
    peer: str
    identity: str | None = None  # the caller's SPIFFE URI, once authenticated
    role: str | None = None
    grant: Grant | None = None  # what the policy allows it, once authorized


current_call: contextvars.ContextVar[CallContext | None] = contextvars.ContextVar(
    "vaultline_call", default=None
)


def _request_id(context: grpc.aio.ServicerContext) -> str:
    for key, value in context.invocation_metadata() or ():
        if key == "x-request-id" and isinstance(value, str) and _REQUEST_ID.match(value):
            return value
    return new_request_id()


def new_request_id() -> str:
    """`req_` + 20 random lower-case letters (~90 bits). Letters only: a generated id never
    holds a digit run that a PAN scanner (or an assessor's grep) would flag."""
    return "req_" + os.urandom(20).translate(_LETTERS).decode("ascii")


def open_call(method: str, context: grpc.aio.ServicerContext) -> CallContext:
    """Build the call's context and make it current for this task (each RPC has its own)."""
    call = CallContext(method, _request_id(context), context.peer())
    current_call.set(call)
    return call
