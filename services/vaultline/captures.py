"""Agent-assisted captures, the tokenizer's side: start, read, command and watch them.

The CRM (role `crm`) starts a capture on a live call; an IVR replica picks the command up
(NOTIFY `vaultline_capture_command`), drives Twilio's Payment on the customer's leg and
appends the capture's masked progress as events (`capture_append_event`, which NOTIFYs
`vaultline_capture`). Watchers on any tokenizer replica follow those events: `CaptureHub`
holds one LISTEN per process and wakes the watchers of a capture; a watcher also re-reads
every `POLL_SECONDS`, so a notification lost to a reconnect costs latency, never an event.

Nothing here sees card data: a capture holds the token and what GetToken shows of it.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import re
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Final

import asyncpg

from .card import has_digit_run
from .errors import (
    CaptureEnded,
    CaptureInProgress,
    CaptureNotFound,
    FieldViolation,
    InvalidInput,
    RequestIdReused,
)
from .runtime import periodically
from .security.access import Grant
from .service import validate_request_id, validate_tenant
from .store import Store

__all__ = ["FIELDS", "FINAL_STATES", "CaptureHub", "CaptureRequest", "CaptureService"]

log = logging.getLogger(__name__)

FIELDS: Final = ("card-number", "expiration-date", "security-code", "postal-code")
FINAL_STATES: Final = frozenset({"completed", "failed", "cancelled"})
POLL_SECONDS: Final = 2.0
# A capture whose start no IVR replica takes in this time fails (`ivr-unavailable`) rather
# than leaving the agent watching a capture that never begins.
START_DEADLINE: Final = dt.timedelta(seconds=30)
EVENTS_PAGE: Final = 200
_CALL_SID: Final = re.compile(r"CA[0-9a-f]{32}\Z")
_CAPTURE_ID: Final = re.compile(r"cap_[0-9a-f]{20}\Z")


def _bad(reason: str, field: str, description: str) -> InvalidInput:
    return InvalidInput(reason, (FieldViolation(field, description),))


@dataclass(frozen=True, slots=True)
class CaptureRequest:
    tenant: str
    call_sid: str
    agent_id: str
    security_code: bool
    postal_code: bool
    token_format: int
    request_id: str


def validate_capture_request(tenant: str, call_sid: str, agent_id: str, security_code: bool,
                             postal_code: bool, token_format: int, request_id: str
                             ) -> CaptureRequest:
    if not _CALL_SID.match(call_sid):
        raise _bad("INVALID_CALL_SID", "call_sid", "must be CA and 32 hex digits")
    if not (1 <= len(agent_id) <= 64 and agent_id.isprintable()) or has_digit_run(agent_id):
        raise _bad("INVALID_AGENT_ID", "agent_id",
                   "must be 1-64 printable characters, not a card number")
    if has_digit_run(request_id):
        raise _bad("INVALID_REQUEST_ID", "request_id", "must not hold a card number")
    return CaptureRequest(validate_tenant(tenant), call_sid, agent_id, security_code,
                          postal_code, token_format, validate_request_id(request_id))


def validate_capture_id(capture_id: str) -> str:
    if not _CAPTURE_ID.match(capture_id):
        raise _bad("INVALID_CAPTURE_ID", "capture_id", "must be cap_ and 20 hex digits")
    return capture_id


def new_capture_id() -> str:
    """`cap_` + 20 hex digits holding no run of 12 decimal digits: the id travels as the
    audited purpose, where such a run would be taken for a card number."""
    while True:
        candidate = "cap_" + secrets.token_hex(10)
        if not has_digit_run(candidate):
            return candidate


class CaptureHub:
    """One LISTEN per process on `vaultline_capture`; wakes the watchers of a capture."""

    def __init__(self) -> None:
        self._waiters: dict[str, set[asyncio.Event]] = {}
        self._stop: Callable[[], Awaitable[None]] | None = None

    async def start(self, store: Store) -> None:
        try:
            self._stop = await store.listen("vaultline_capture", self.notify)
        except Exception:  # noqa: BLE001 - watchers fall back to polling; the log says why
            log.warning("capture events: no LISTEN connection; watchers poll", exc_info=True)

    async def stop(self) -> None:
        if self._stop is not None:
            await self._stop()
            self._stop = None

    def notify(self, capture_id: str) -> None:
        for event in self._waiters.get(capture_id, ()):
            event.set()

    async def wait(self, capture_id: str, seconds: float) -> None:
        """Until the capture has a new event, or `seconds`."""
        event = asyncio.Event()
        self._waiters.setdefault(capture_id, set()).add(event)
        try:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(event.wait(), seconds)
        finally:
            waiters = self._waiters.get(capture_id)
            if waiters is not None:
                waiters.discard(event)
                if not waiters:
                    del self._waiters[capture_id]


class CaptureService:
    def __init__(self, store: Store, hub: CaptureHub, *, poll_seconds: float = POLL_SECONDS
                 ) -> None:
        self._store = store
        self._hub = hub
        self._poll = poll_seconds

    async def start(self, grant: Grant, request: CaptureRequest) -> Any:
        existing = await self._store.find_capture_by_request(grant.uri, request.request_id)
        if existing is not None:
            return self._same_request(grant, existing, request)
        try:
            return await self._store.insert_capture(
                new_capture_id(), request.tenant, request.call_sid, request.agent_id,
                grant.uri, request.request_id, request.security_code, request.postal_code,
                request.token_format)
        except asyncpg.UniqueViolationError as exc:
            if exc.constraint_name == "captures_active_call":
                raise CaptureInProgress() from None
            # A concurrent retry of the same request won the insert: answer its capture.
            raced = await self._store.find_capture_by_request(grant.uri, request.request_id)
            if raced is None:
                raise
            return self._same_request(grant, raced, request)

    def _same_request(self, grant: Grant, row: Any, request: CaptureRequest) -> Any:
        """A retry answers the first capture; the same request id for another call or
        tenant is a caller's mistake, refused rather than answered with someone's capture."""
        if (row["call_sid"], row["tenant"]) != (request.call_sid, request.tenant):
            raise RequestIdReused()
        return self._mine(grant, row)

    async def get(self, grant: Grant, capture_id: str) -> Any:
        row = await self._store.find_capture(validate_capture_id(capture_id))
        if row is None:
            raise CaptureNotFound()
        return self._mine(grant, row)

    @staticmethod
    def _mine(grant: Grant, row: Any) -> Any:
        """The capture, if the caller's grant covers its tenant (else as if it did not exist)."""
        if not grant.allows_tenant(row["tenant"]):
            raise CaptureNotFound()
        return row

    async def cancel(self, grant: Grant, capture_id: str) -> Any:
        await self.get(grant, capture_id)
        return await self._command(capture_id, "cancel")

    async def restart_field(self, grant: Grant, capture_id: str, field: str) -> Any:
        capture = await self.get(grant, capture_id)
        if field not in FIELDS:
            raise _bad("INVALID_FIELD", "field", "name the field to key again")
        if (field == "security-code" and not capture["security_code"]) or (
                field == "postal-code" and not capture["postal_code"]):
            raise _bad("FIELD_NOT_REQUESTED", "field", "this capture does not ask for it")
        return await self._command(capture_id, "restart:" + field)

    async def _command(self, capture_id: str, command: str) -> Any:
        """Leave `command` for the IVR (the caller has checked the capture is theirs)."""
        row = await self._store.command_capture(capture_id, command)
        if row is None:
            raise CaptureEnded()
        return row

    async def expire_unclaimed(self, deadline: dt.timedelta = START_DEADLINE) -> int:
        """Fail the captures no IVR started in time; how many."""
        failed = await self._store.fail_unclaimed_captures(deadline, "ivr-unavailable")
        if failed:
            log.warning("%d captures were not started by any IVR within %s: failed",
                        failed, deadline)
        return failed

    async def run_deadlines(self, every_seconds: float = 10.0) -> None:
        """`expire_unclaimed` every few seconds until cancelled."""
        await periodically(every_seconds, self.expire_unclaimed, "capture deadlines", log)

    async def watch(self, grant: Grant, capture_id: str, after_seq: int
                    ) -> AsyncIterator[Any]:
        """The capture's events after `after_seq`, then as they come, until it has ended."""
        await self.get(grant, capture_id)
        seq = max(after_seq, 0)
        while True:
            events = await self._store.capture_events_after(capture_id, seq, EVENTS_PAGE)
            for event in events:
                seq = event["seq"]
                yield event
            if len(events) == EVENTS_PAGE:
                continue
            capture = await self._store.find_capture(capture_id)
            if capture is None or (capture["state"] in FINAL_STATES
                                   and capture["last_seq"] <= seq):
                return
            if capture["last_seq"] > seq:
                continue  # appended between the two reads
            await self._hub.wait(capture_id, self._poll)
