"""The Payment driver: an agent-assisted capture as a pure state machine.

Sans-IO: given a capture's driver state and what happened (the capture started, the agent
asked for something, Twilio posted a StatusCallback, a REST call came back), it answers the
new state, the capture events to append (masked: digit counts and outcomes, never digits)
and the commands to perform (pause or resume the recording, create or update the Payment).
The IVR's `agent_capture` module performs them.

Twilio's Payment resource on the customer's leg captures one field at a time
(`Capture=payment-card-number|expiration-date|security-code|postal-code`); its StatusCallbacks
report `Capture`, `PartialResult=true` while digits arrive (the masked value's length is the
digit count), `ErrorType` when a field is invalid, `Required` (the fields still missing),
and, after `Status=complete`, the `Result` and the `PaymentToken` the Pay Connector answered.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Final

from .interpreter import PauseRecording, ResumeRecording

__all__ = [
    "MAX_ATTEMPTS",
    "CancelPayment",
    "CapturePaymentField",
    "CompletePayment",
    "CreatePayment",
    "DriverState",
    "EventSpec",
    "Finish",
    "PauseRecording",
    "ResumeRecording",
    "Step",
    "on_callback",
    "on_command",
    "on_failure",
    "start",
]

MAX_ATTEMPTS: Final = 3
# Our field names (the capture API's) and Twilio's `Capture` values.
TWILIO_FIELD: Final = {
    "card-number": "payment-card-number",
    "expiration-date": "expiration-date",
    "security-code": "security-code",
    "postal-code": "postal-code",
}
OUR_FIELD: Final = {twilio: ours for ours, twilio in TWILIO_FIELD.items()}
# The StatusCallback parameter holding each field's (masked) value.
_VALUE_PARAM: Final = {
    "card-number": "PaymentCardNumber",
    "expiration-date": "ExpirationDate",
    "security-code": "SecurityCode",
    "postal-code": "PaymentCardPostalCode",
}
# `Result` of a finished Payment other than success, as a capture's failure reason and state.
_RESULTS: Final = {
    "caller-interrupted-with-star": ("cancelled", "caller-pressed-star"),
    "caller-hung-up": ("failed", "caller-hung-up"),
    "too-many-failed-attempts": ("failed", "too-many-failed-attempts"),
    "payment-connector-error": ("failed", "connector-error"),
    "validation-error": ("failed", "validation-error"),
    "internal-error": ("failed", "twilio-internal-error"),
}


# ---- commands ---------------------------------------------------------------------------------


# PauseRecording and ResumeRecording are the Gather interpreter's effects: one meaning, one
# performer-side handling.


@dataclass(frozen=True, slots=True)
class CreatePayment:
    security_code: bool
    postal_code: bool


@dataclass(frozen=True, slots=True)
class CapturePaymentField:
    field: str  # ours; the performer sends TWILIO_FIELD[field]


@dataclass(frozen=True, slots=True)
class CompletePayment:
    pass


@dataclass(frozen=True, slots=True)
class CancelPayment:
    pass


@dataclass(frozen=True, slots=True)
class Finish:
    """The capture has ended: end the call's Payment business (resume the recording first)."""

    token: str = ""  # on success: look its metadata up, tell the CRM


Command = (PauseRecording | ResumeRecording | CreatePayment | CapturePaymentField
           | CompletePayment | CancelPayment | Finish)


@dataclass(frozen=True, slots=True)
class EventSpec:
    """A capture event to append (see capture_append_event)."""

    state: str
    field: str = ""
    digits: int = 0
    outcome: str = ""
    attempt: int = 0
    token: str = ""
    failure: str = ""


# ---- state -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DriverState:
    fields: tuple[str, ...]  # in the order they are asked
    current: str = ""
    attempts: Mapping[str, int] = field(default_factory=dict)
    done: frozenset[str] = frozenset()
    phase: str = "starting"  # starting | capturing | completing | ended

    def to_json(self) -> dict[str, object]:
        return {"fields": list(self.fields), "current": self.current,
                "attempts": dict(self.attempts), "done": sorted(self.done),
                "phase": self.phase}

    @classmethod
    def from_json(cls, doc: Mapping[str, object]) -> DriverState:
        fields = doc.get("fields", [])
        attempts = doc.get("attempts", {})
        done = doc.get("done", [])
        assert isinstance(fields, list) and isinstance(attempts, dict) and isinstance(done, list)
        return cls(tuple(str(f) for f in fields), str(doc.get("current", "")),
                   {str(k): int(v) for k, v in attempts.items()},
                   frozenset(str(d) for d in done), str(doc.get("phase", "starting")))

    @property
    def ended(self) -> bool:
        return self.phase == "ended"


@dataclass(frozen=True, slots=True)
class Step:
    state: DriverState
    events: tuple[EventSpec, ...] = ()
    commands: tuple[Command, ...] = ()


def _ask(state: DriverState, name: str) -> Step:
    """Ask for field `name` (again): the next attempt at it."""
    attempt = state.attempts.get(name, 0) + 1
    new = replace(state, current=name, attempts={**state.attempts, name: attempt},
                  phase="capturing")
    return Step(new, (EventSpec("capturing", name, 0, "", attempt),),
                (CapturePaymentField(name),))


def _end(state: DriverState, status: str, failure: str = "", *,
         cancel: bool = False) -> Step:
    commands: tuple[Command, ...] = (CancelPayment(),) if cancel else ()
    return Step(replace(state, phase="ended", current=""),
                (EventSpec(status, failure=failure),),
                (*commands, ResumeRecording(), Finish()))


# ---- transitions ------------------------------------------------------------------------------


def start(security_code: bool, postal_code: bool) -> Step:
    """The capture begins: recording paused first, then the Payment, then the card number."""
    fields = ("card-number", "expiration-date",
              *(("security-code",) if security_code else ()),
              *(("postal-code",) if postal_code else ()))
    step = _ask(DriverState(fields), "card-number")
    return Step(step.state, step.events,
                (PauseRecording(), CreatePayment(security_code, postal_code), *step.commands))


def on_command(state: DriverState, command: str) -> Step:
    """The agent's `cancel` or `restart:<field>` (CaptureService)."""
    if state.ended:
        return Step(state)
    if command == "cancel":
        return _end(state, "cancelled", "agent-cancelled", cancel=True)
    name = command.removeprefix("restart:")
    if command.startswith("restart:") and name in state.fields and state.phase == "capturing":
        return _ask(replace(state, done=state.done - {name}), name)
    return Step(state)


def on_failure(state: DriverState, reason: str) -> Step:
    """Something the capture cannot go on without failed (Twilio or the vault unreachable)."""
    if state.ended:
        return Step(state)
    return _end(state, "failed", reason, cancel=state.phase in ("capturing", "completing"))


def on_callback(state: DriverState, params: Mapping[str, str]) -> Step:
    """One StatusCallback of the Payment."""
    if state.ended:
        return Step(state)
    result = params.get("Result", "")
    if result:
        return _finished(state, result, params.get("PaymentToken", ""),
                         params.get("ConnectorError", ""))
    name = OUR_FIELD.get(params.get("Capture", ""), "")
    if not name or name != state.current or state.phase != "capturing":
        return Step(state)  # late or out-of-order news of another field: nothing to do
    attempt = state.attempts.get(name, 1)
    error = params.get("ErrorType", "")
    if error:
        event = EventSpec("capturing", name, 0, error[:40], attempt)
        if attempt >= MAX_ATTEMPTS:
            ended = _end(state, "failed", "too-many-failed-attempts", cancel=True)
            return Step(ended.state, (event, *ended.events), ended.commands)
        asked = _ask(state, name)
        return Step(asked.state, (event, *asked.events), asked.commands)
    digits = min(len(params.get(_VALUE_PARAM[name], "")), 19)
    if params.get("PartialResult", "").lower() == "true":
        return Step(state, (EventSpec("capturing", name, digits, "", attempt),))
    # The field is complete and valid: the next one still missing, or complete the Payment.
    done = state.done | {name}
    valid = EventSpec("capturing", name, digits, "valid", attempt)
    required = _required(params)
    remaining = [f for f in state.fields if f not in done and (required is None
                                                                or f in required)]
    state = replace(state, done=done)
    if remaining:
        asked = _ask(state, remaining[0])
        return Step(asked.state, (valid, *asked.events), asked.commands)
    return Step(replace(state, current="", phase="completing"), (valid,), (CompletePayment(),))


def _required(params: Mapping[str, str]) -> set[str] | None:
    """`Required` as our field names (None: not sent). Accepts a comma-separated list."""
    if "Required" not in params:
        return None
    return {OUR_FIELD[p.strip()] for p in params["Required"].split(",")
            if p.strip() in OUR_FIELD}


def _finished(state: DriverState, result: str, token: str, connector_error: str) -> Step:
    if result == "success" and token:
        return Step(replace(state, phase="ended", current=""), (),
                    (ResumeRecording(), Finish(token)))
    status, reason = _RESULTS.get(result, ("failed", "payment-failed"))
    if result == "payment-connector-error" and connector_error:
        reason = f"connector-error:{connector_error[:40]}"
    return _end(state, status, reason)
