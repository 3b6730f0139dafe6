"""Agent-assisted captures, the IVR's side: drive Twilio's Payment on the customer's leg.

The tokenizer's CaptureService leaves commands on a capture (`start`, `cancel`,
`restart:<field>`) and NOTIFYs `vaultline_capture_command`; one IVR replica takes each
(`claim_capture_commands`, FOR UPDATE SKIP LOCKED). Twilio's signed StatusCallbacks arrive at
`POST /pay/status/{capture_id}` on any replica. Both go through the pure driver
(`ivr.payment`): its new state is saved compare-and-set on the capture's `driver_version`
before anything is done, so exactly one replica performs each step; then its events are
appended (masked progress, NOTIFY for the watchers) and its commands performed (recording
pause/resume, Payment create/update). The card itself never passes here: Twilio hands it to
the Pay Connector (`ivr.connector`), and the capture only learns the token.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import logging
import re
import time
import weakref
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Final

from ..card import CardBrand
from ..ivr_store import IvrStore
from ..security.audit import AuditEvent, AuditWriter
from . import payment
from .crm import CrmNotifier, agent_capture_event
from .tokenizer import IvrTokenizer, TokenizerUnavailable
from .twilio_rest import RecordingNotFound, TwilioRest, TwilioUnavailable

__all__ = ["AgentCaptures"]

log = logging.getLogger("vaultline.ivr.capture")

POLL_SECONDS: Final = 1.0
_CAPTURE_ID: Final = re.compile(r"cap_[0-9a-f]{20}\Z")


class AgentCaptures:
    def __init__(self, store: IvrStore, rest: TwilioRest, tokenizer: IvrTokenizer,
                 crm: CrmNotifier | None, audit: AuditWriter | None, *, base_url: str,
                 connector: str, crm_url: str = "", audit_identity: str = "",
                 card_types: Mapping[str, str] | None = None,
                 poll_seconds: float = POLL_SECONDS) -> None:
        self._store = store
        self._rest = rest
        self._tokenizer = tokenizer
        self._crm = crm
        self._audit = audit
        self._base = base_url.rstrip("/")
        self._connector = connector
        self._crm_url = crm_url
        self._identity = audit_identity
        self._poll = poll_seconds
        self._card_types = dict(card_types or {})
        self._wake = asyncio.Event()
        # One step at a time per capture in this process (replicas race on the CAS instead).
        self._locks: weakref.WeakValueDictionary[str, asyncio.Lock] = (
            weakref.WeakValueDictionary())

    # ---- the command loop -------------------------------------------------------------------

    async def run(self) -> None:
        """Take and perform the agents' commands until cancelled."""
        stop: Callable[[], Awaitable[None]] | None = None
        with contextlib.suppress(Exception):
            stop = await self._store.listen_commands(lambda _id: self._wake.set())
        try:
            while True:
                try:
                    for row, command in await self._store.claim_capture_commands():
                        await self._command(row, command)
                except Exception:  # noqa: BLE001 - keep driving the other captures
                    log.exception("agent capture command loop")
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self._poll)
        finally:
            if stop is not None:
                await stop()

    async def _command(self, row: Any, command: str) -> None:
        if command == "start":
            await self._advance(row["id"], lambda _state, fresh: payment.start(
                fresh["security_code"], fresh["postal_code"]), starting=True)
        else:
            await self._advance(row["id"], lambda state, _: payment.on_command(state, command))

    # ---- StatusCallbacks ----------------------------------------------------------------------

    async def status_callback(self, capture_id: str, form: Mapping[str, str]) -> int:
        """A signed StatusCallback of the capture's Payment; the HTTP status to answer."""
        if not _CAPTURE_ID.match(capture_id):
            return 404
        row = await self._store.find_capture(capture_id)
        if row is None or form.get("CallSid") != row["call_sid"] or (
                row["payment_sid"] and form.get("Sid", row["payment_sid"]) != row["payment_sid"]):
            return 404
        await self._advance(capture_id, lambda state, _: payment.on_callback(state, form))
        return 204

    async def call_ended(self, call_sid: str) -> None:
        """Twilio's call status callback says the call is over: a capture in progress on it
        ends as the customer hanging up (between two fields no Payment callback says so)."""
        row = await self._store.find_active_capture(call_sid)
        if row is not None:
            await self._advance(row["id"], lambda state, _: payment.on_callback(
                state, {"Result": "caller-hung-up"}))

    # ---- one step ----------------------------------------------------------------------------

    async def _advance(self, capture_id: str,
                       transition: Callable[[payment.DriverState, Any], payment.Step], *,
                       starting: bool = False) -> None:
        """Apply a transition: save its state (compare-and-set), then do what it says."""
        lock = self._locks.get(capture_id)
        if lock is None:
            lock = self._locks[capture_id] = asyncio.Lock()
        async with lock:
            for _ in range(5):
                row = await self._store.find_capture(capture_id)
                if row is None:
                    return
                state = _driver_state(row)
                if starting and state.fields:
                    return  # started already (a repeated start command)
                step = transition(state, row)
                if step.state == state and not step.events and not step.commands:
                    return
                if await self._store.save_capture_driver(
                        capture_id, row["driver_version"], step.state.to_json()):
                    await self._perform(row, step)
                    return
            log.warning("agent capture %s: lost the compare-and-set five times", capture_id)

    async def _perform(self, row: Any, step: payment.Step) -> None:
        capture_id = row["id"]
        for event in step.events:
            await self._event(capture_id, event)
        payment_sid: str = row["payment_sid"] or ""
        commands = list(step.commands)
        while commands:
            command = commands.pop(0)
            try:
                payment_sid = await self._do(row, command, payment_sid)
            except (TwilioUnavailable, TokenizerUnavailable) as exc:
                reason = ("tokenizer-unavailable" if isinstance(exc, TokenizerUnavailable)
                          else "twilio-unavailable")
                log.warning("agent capture %s: %s failed (%s)", capture_id,
                            type(command).__name__, reason)
                failed = await self._fail(row, reason)
                if failed is None:
                    return
                commands = [c for c in failed.commands if not isinstance(c, type(command))]

    async def _fail(self, row: Any, reason: str) -> payment.Step | None:
        """Move the capture to failed (saved like any step); its events appended, and the
        commands left to do (resume the recording) answered."""
        fresh = await self._store.find_capture(row["id"])
        if fresh is None:
            return None
        step = payment.on_failure(_driver_state(fresh), reason)
        if not await self._store.save_capture_driver(row["id"], fresh["driver_version"],
                                                     step.state.to_json()):
            return None
        for event in step.events:
            await self._event(row["id"], event)
        return step

    async def _do(self, row: Any, command: payment.Command, payment_sid: str) -> str:
        call_sid = row["call_sid"]
        callback = f"{self._base}/pay/status/{row['id']}"
        key = f"{row['id']}-{row['driver_version'] + 1}-{type(command).__name__}"
        if isinstance(command, payment.PauseRecording | payment.ResumeRecording):
            pause = isinstance(command, payment.PauseRecording)
            with contextlib.suppress(RecordingNotFound):  # no recording, or the call ended
                if pause:
                    await self._rest.pause_recording(call_sid)
                else:
                    await self._rest.resume_recording(call_sid)
            await self._record(row, "recording.paused" if pause else "recording.resumed", "OK")
        elif isinstance(command, payment.CreatePayment):
            payment_sid = await self._rest.create_payment(
                call_sid, idempotency_key=key, status_callback=callback,
                connector=self._connector, security_code=command.security_code,
                postal_code=command.postal_code,
                valid_card_types=self._card_types.get(row["tenant"], ""))
            await self._store.set_capture_payment(row["id"], payment_sid)
        elif isinstance(command, payment.CapturePaymentField):
            await self._rest.update_payment(call_sid, payment_sid, idempotency_key=key,
                                            status_callback=callback,
                                            capture=payment.TWILIO_FIELD[command.field])
        elif isinstance(command, payment.CompletePayment | payment.CancelPayment):
            if payment_sid:
                status = "complete" if isinstance(command, payment.CompletePayment) else "cancel"
                await self._rest.update_payment(call_sid, payment_sid, idempotency_key=key,
                                                status_callback=callback, status=status)
        elif isinstance(command, payment.Finish):
            await self._finish(row, command.token)
        return payment_sid

    async def _finish(self, row: Any, token: str) -> None:
        """The capture has ended: on success its completion event (the token's metadata, as
        GetToken shows it) and the CRM event; always an audit record."""
        if not token:
            await self._record(row, "capture.ended", "not-completed")
            return
        try:
            card = await self._tokenizer.get_token(row["tenant"], token)
        except TokenizerUnavailable as exc:
            # The card is in the vault and the capture done: the token without its metadata.
            log.warning("agent capture %s: token metadata unavailable (%s)", row["id"], exc.code)
            await self._store.append_capture_event(row["id"], "completed", token=token)
            await self._record(row, "capture.tokenize", "OK", token=token)
            return
        await self._store.append_capture_event(
            row["id"], "completed", token=card.token, brand=_brand_number(card.brand),
            last4=card.last4, expiry_month=card.expiry_month, expiry_year=card.expiry_year)
        await self._record(row, "capture.tokenize", "OK", token=card.token)
        if self._crm is not None and self._crm_url:
            data = {"capture_id": row["id"], "call_sid": row["call_sid"],
                    "agent_id": row["agent_id"], "tenant": row["tenant"], "token": card.token,
                    "brand": card.brand, "last4": card.last4,
                    "expiry_month": card.expiry_month, "expiry_year": card.expiry_year}
            await self._crm.notify(self._crm_url, agent_capture_event(row["id"], data,
                                                                      int(time.time())))

    async def _event(self, capture_id: str, event: payment.EventSpec) -> None:
        await self._store.append_capture_event(
            capture_id, event.state, event.field, event.digits, event.outcome, event.attempt,
            failure=event.failure)

    async def _record(self, row: Any, event: str, outcome: str, *, token: str = "") -> None:
        """A chained audit record of a capture event (as the IVR's Gather captures have)."""
        if self._audit is None:
            return
        await self._audit.record([AuditEvent(
            identity=self._identity, role="ivr", tenant=row["tenant"],
            method=f"ivr/agent-capture/{event}", outcome=outcome, request_id=row["id"],
            peer=row["call_sid"], token=token, at=dt.datetime.now(dt.UTC))])


def _driver_state(row: Any) -> payment.DriverState:
    """The capture's saved driver state (none yet: an empty one)."""
    doc = json.loads(row["driver"]) if row["driver"] else {}
    return payment.DriverState.from_json(doc) if doc else payment.DriverState(())


def _brand_number(name: str) -> int | None:
    """A GetToken brand name (VISA, …) as its number (`card.CardBrand` = the proto enum)."""
    brand = CardBrand.__members__.get(name)
    return int(brand) if brand is not None else None
