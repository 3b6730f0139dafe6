"""The wrapper every RPC method runs in: open the call context, admit the caller through the
gate, run the method, audit the answer (allowed or refused), translate errors through the one
table, and observe metrics. Servicers decorate methods with `unary` or `streaming`.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any, TypeVar

import grpc

from ..errors import FieldViolation, InvalidInput, VaultlineError
from ..recordings.envelope import RECORDING_SID
from ..security.access import REVEALING_METHODS, TOKENIZING_METHODS
from ..service import validate_purpose, validate_tenant
from ..tokens import TokenError, parse_token
from .context import CallContext, current_call, open_call
from .errors import code_for, to_grpc_status, to_rpc_status
from .gate import Gate

log = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable[..., Any])


# ---- the call wrapper: admit, run, audit, translate errors -----------------------------------


async def _abort(context: grpc.aio.ServicerContext, exc: BaseException) -> None:
    if not isinstance(exc, VaultlineError):
        # The traceback goes to the log (PAN-masked); the caller gets a fixed message.
        log.exception("unexpected error", exc_info=exc)
    await context.abort_with_status(to_grpc_status(to_rpc_status(exc)))


def _code_name(exc: BaseException) -> str:
    return code_for(exc).name if isinstance(exc, VaultlineError) else "INTERNAL"


def _subject(request: Any) -> str:
    """What a call is about, for the audit record's token column: the token, or the
    recording (RecordingService)."""
    return getattr(request, "token", "") or getattr(request, "recording_sid", "")


def _audited_token(raw: str) -> str:
    """A token as it may appear in the audit trail: only a well-formed token (or recording
    SID), never a PAN."""
    if not raw:
        return ""
    if RECORDING_SID.match(raw):
        return raw
    try:
        return parse_token(raw)[0]
    except TokenError:
        return "<malformed>"


def _audited_purpose(raw: str) -> str:
    """The purpose as the audit trail may hold it: validated (stripped, at most 200
    characters, no digit run), or a marker; the caller's raw text is never stored."""
    if not raw:
        return ""
    try:
        return validate_purpose(raw)
    except InvalidInput:
        return "<malformed>"


def _audited_tenant(raw: str) -> str:
    """The tenant as the audit trail may hold it: a well-formed one, or a marker (a refused
    call's tenant field is caller text and could hold anything, a card number included)."""
    try:
        return validate_tenant(raw) if raw else raw
    except InvalidInput:
        return "<malformed>"


async def _audit_failure(
    gate: Gate, call: CallContext, code: str, tenant: str, token: str, purpose: str
) -> None:
    try:
        await gate.audit([gate.event(
            call, code, tenant=_audited_tenant(tenant), token=_audited_token(token),
            purpose=_audited_purpose(purpose))])
    except Exception:  # noqa: BLE001 - the call is refused either way; the log says why
        log.error("could not audit a refused or failed call", exc_info=True)


class _Answer:
    """How a call ended (its status code name), for the metric `_observed` records."""

    __slots__ = ("code",)

    def __init__(self) -> None:
        self.code = "OK"

    async def fail(self, exc: BaseException, gate: Gate, call: CallContext,
                   context: grpc.aio.ServicerContext, *, tenant: str, token: str = "",
                   purpose: str = "") -> None:
        """Audit a refused or failed call and abort it with the translated status."""
        self.code = _code_name(exc)
        # current_call: the identity is known even when authorization refused the call.
        await _audit_failure(gate, current_call.get() or call, self.code, tenant, token,
                             purpose)
        await _abort(context, exc)


@contextlib.contextmanager
def _observed(gate: Gate, method: str) -> Iterator[_Answer]:
    """Times a call and records its metric with the code it ended with."""
    answer = _Answer()
    started = time.perf_counter()
    try:
        yield answer
    finally:
        if gate.metrics is not None:
            gate.metrics.observe_call(method, answer.code, time.perf_counter() - started)


def unary(fn: F) -> F:
    """The wrapper of a unary method; it writes the audit record of every answer."""
    return _unary(fn, audits_success=True)


def unary_audited_by_method(fn: F) -> F:
    """`unary` for a method that writes its own success record (Tokenize: in its coalesced
    chunk, see `TokenService.tokenize`); refusals and failures are still audited here."""
    return _unary(fn, audits_success=False)


def _unary(fn: F, *, audits_success: bool) -> F:
    method = fn.__name__
    reveals = method in REVEALING_METHODS
    metered = reveals or method in TOKENIZING_METHODS  # one unit of the caller's quota
    assert audits_success or not reveals, "a reveal is always audited by the wrapper"

    @functools.wraps(fn)
    async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
        gate: Gate = self._gate
        call = open_call(method, context)
        scoped, tenant = _scope(request)
        with _observed(gate, method) as answer:
            try:
                call = gate.admit(call, context)
                _check_size(gate, request)
                if scoped:
                    gate.check_tenant(call, tenant)
                if metered:
                    gate.take_quota(call, 1)
                response = await fn(self, request, context)
                if audits_success:
                    token = _subject(request) or getattr(
                        getattr(response, "token", None), "token", "")
                    await gate.audit([gate.event(
                        call, "OK", tenant=tenant or _response_tenant(response), token=token,
                        purpose=_audited_purpose(_purpose_of(request)))])
                if reveals:
                    gate.count_reveals(call, 1)
                return response
            except Exception as exc:  # noqa: BLE001 - the translation table decides
                await answer.fail(exc, gate, call, context, tenant=tenant,
                                  token=_subject(request), purpose=_purpose_of(request))

    return wrapper  # type: ignore[return-value]


def _scope(request: Any) -> tuple[bool, str]:
    """Whether a request names a tenant (the policy's tenant binding applies), and which.
    Administration requests name none."""
    if hasattr(request, "tenant"):
        return True, request.tenant or "default"
    return False, ""


def _check_size(gate: Gate, request: Any) -> None:
    """A single request message (unary, or a server stream's) within the unary limit."""
    if request.ByteSize() > gate.max_unary_bytes:
        raise InvalidInput("MESSAGE_TOO_LARGE", (FieldViolation(
            "", "the request is larger than this server accepts"),))


def _purpose_of(request: Any) -> str:
    """What the audit record names as purpose: the settlement batch or capture the request is
    about (their ids never hold a digit run), else its purpose."""
    return (getattr(request, "batch_id", "") or getattr(request, "capture_id", "")
            or getattr(request, "purpose", "") or getattr(request, "reason", ""))


def _response_tenant(response: Any) -> str:
    """The tenant of a settlement batch or capture a response carries (their requests name
    only the id)."""
    for name in ("batch", "capture"):
        value = getattr(response, name, None)
        if value is not None:
            return str(value.tenant)
    return ""


def server_streaming(fn: F) -> F:
    """The wrapper of a server-streaming method (one request, many answers): admitted and
    checked as a unary call; one audit record when the stream ends, however it ends."""
    method = fn.__name__

    @functools.wraps(fn)
    async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
        gate: Gate = self._gate
        call = open_call(method, context)
        purpose = _purpose_of(request)
        scoped, tenant = _scope(request)
        with _observed(gate, method) as answer:
            try:
                call = gate.admit(call, context)
                _check_size(gate, request)
                if scoped:
                    gate.check_tenant(call, tenant)
                async for response in fn(self, request, context):
                    yield response
                await gate.audit([gate.event(call, "OK", tenant=tenant,
                                             token=_subject(request),
                                             purpose=_audited_purpose(purpose))])
            except Exception as exc:  # noqa: BLE001 - the translation table decides
                await answer.fail(exc, gate, call, context, tenant=tenant,
                                  token=_subject(request), purpose=purpose)

    return wrapper  # type: ignore[return-value]


def client_streaming(fn: F) -> F:
    """The wrapper of a client-streaming method (many requests, one answer): the answer's
    batch names the audited tenant and purpose."""
    method = fn.__name__

    @functools.wraps(fn)
    async def wrapper(self: Any, requests: Any, context: grpc.aio.ServicerContext) -> Any:
        gate: Gate = self._gate
        call = open_call(method, context)
        seen = _StreamTrace()
        with _observed(gate, method) as answer:
            try:
                call = gate.admit(call, context)
                response = await fn(self, _traced(requests, seen), context)
                await gate.audit([gate.event(
                    call, "OK", tenant=_response_tenant(response) or _audited_tenant(seen.tenant),
                    purpose=response.batch.batch_id)])
                return response
            except Exception as exc:  # noqa: BLE001 - the translation table decides
                await answer.fail(exc, gate, call, context, tenant=seen.tenant)

    return wrapper  # type: ignore[return-value]


def streaming(fn: F) -> F:
    method = fn.__name__

    @functools.wraps(fn)
    async def wrapper(self: Any, requests: Any, context: grpc.aio.ServicerContext) -> Any:
        gate: Gate = self._gate
        call = open_call(method, context)
        seen = _StreamTrace()
        with _observed(gate, method) as answer:
            try:
                call = gate.admit(call, context)
                async for response in fn(self, _traced(requests, seen), context):
                    yield response
                await gate.audit([gate.event(
                    call, "OK", tenant=_audited_tenant(seen.tenant),
                    purpose=_audited_purpose(seen.purpose))])
            except Exception as exc:  # noqa: BLE001 - the translation table decides
                await answer.fail(exc, gate, call, context, tenant=seen.tenant,
                                  purpose=seen.purpose)

    return wrapper  # type: ignore[return-value]


class _StreamTrace:
    """What the call-level audit record of a stream names: the last chunk's tenant/purpose."""

    __slots__ = ("tenant", "purpose")

    def __init__(self) -> None:
        self.tenant = ""  # unknown until a chunk is read (a refused stream reads none)
        self.purpose = ""


async def _traced(requests: AsyncIterator[Any], seen: _StreamTrace) -> AsyncIterator[Any]:
    async for chunk in requests:
        seen.tenant = chunk.tenant or "default"
        seen.purpose = _purpose_of(chunk)
        yield chunk


