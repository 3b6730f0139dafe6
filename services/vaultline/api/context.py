"""Who is calling and about what: the per-call context every layer below the edge can read.

The servicer wrappers (`api.calls.unary`, `unary_audited_by_method`, `streaming`) open it
before a method runs: one place per call, no per-call handler rebuilding as a generic
interceptor would need. `api.gate.Gate.admit` then adds the mTLS identity, role and policy
grant. Logging (`observability`) reads it to stamp each line with the request id.
"""

from __future__ import annotations

import contextvars
import itertools
import os
import re
import string
from dataclasses import dataclass
from typing import TYPE_CHECKING

import grpc

from ..card import has_digit_run

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


def admitted() -> tuple[CallContext, Grant]:
    """Inside a servicer method: the call the wrapper admitted, and its policy grant."""
    call = current_call.get()
    assert call is not None and call.grant is not None, "called outside an admitted call"
    return call, call.grant


def admitted_grant() -> Grant:
    """Inside a servicer method: the admitted caller's policy grant."""
    return admitted()[1]


def _request_id(context: grpc.aio.ServicerContext) -> str:
    for key, value in context.invocation_metadata() or ():
        if (
            key == "x-request-id"
            and isinstance(value, str)
            and _REQUEST_ID.match(value)
            and not has_digit_run(value)  # a card number is never taken as a request id
        ):
            return value
    return new_request_id()


# Request ids: a random per-process prefix and a counter, both spelled in letters only, so a
# generated id never holds a digit run that a PAN scanner (or an assessor's grep) would flag.
# Unique handles, not secrets: no per-call system call for randomness.
_PREFIX = "req_" + os.urandom(10).translate(_LETTERS).decode("ascii") + "_"
_counter = itertools.count()


def _letters(n: int) -> str:
    out = []
    while True:
        n, digit = divmod(n, 26)
        out.append(string.ascii_lowercase[digit])
        if not n:
            return "".join(reversed(out))


def new_request_id() -> str:
    """`req_<10 random letters>_<counter in letters>`: unique per process and across them."""
    return _PREFIX + _letters(next(_counter))


def open_call(method: str, context: grpc.aio.ServicerContext) -> CallContext:
    """Build the call's context and make it current for this task (each RPC has its own)."""
    call = CallContext(method, _request_id(context), context.peer())
    current_call.set(call)
    return call
