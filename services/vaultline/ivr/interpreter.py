"""The sans-IO IVR interpreter: `step(flow, state, event) -> Transition`.

Pure: no I/O, no clock (dates come in events), no randomness. The same function runs under the
webhook service, the simulator-driven tests and the unit tests. A transition carries the new
state, the TwiML actions to answer with, and at most one side effect; the edge performs the
effect and feeds its result back as the next event, collecting actions along the way:

    Start ─> [PauseRecording] ─RecordingUpdated─> Gather card_number ─Input─> … ─Input─>
      [ResumeRecording] ─> Gather confirmation ─Input "1"─> [Tokenize] ─Tokenized─>
      [NotifyCrm] ─CrmNotified─> on_success   (every failure: erase, resume, notify, on_failure)

Card fields live only in `State.secrets` (whose repr hides them); the edge seals them for
storage. Terminal transitions empty the secrets before anything else happens.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field, replace

from ..card import (
    CardBrand,
    CardError,
    Expiry,
    Pan,
    detect_brand,
    security_code_length,
    security_code_ok,
)
from ..tokens import TokenError, parse_token
from .flows import PAY_CARD_TYPES, PAY_FIELDS, PAY_MAX_ATTEMPTS, Ending, Flow, Prompt, Step

__all__ = [
    "CrmNotified", "Effect", "Event", "Expired", "Gather", "HungUp", "Input", "NotifyCrm",
    "Outcome", "PauseRecording", "RecordingUpdated", "ResumeRecording", "Say", "Secrets",
    "Start", "State", "Tokenize", "TokenizeFailed", "Tokenized", "Transition", "Action",
    "Hangup", "Redirect", "Enqueue", "Conference", "Pay", "PayField", "PayResult",
    "LookUpToken", "step", "new_state",
]

BRAND_NAMES: dict[CardBrand, str] = {
    CardBrand.VISA: "Visa", CardBrand.MASTERCARD: "Mastercard",
    CardBrand.AMEX: "American Express", CardBrand.DISCOVER: "Discover", CardBrand.JCB: "J C B",
    CardBrand.DINERS: "Diners Club", CardBrand.UNIONPAY: "Union Pay",
    CardBrand.MAESTRO: "Maestro",
}


class Outcome:
    SUCCESS = "success"
    TOO_MANY_ATTEMPTS = "too-many-failed-attempts"
    HUNG_UP = "caller-hung-up"
    TIMED_OUT = "session-timeout"
    RECORDING_ERROR = "recording-pause-failed"
    TOKENIZER_ERROR = "tokenizer-error"
    CRM_ERROR = "crm-error"
    PAY_ERROR = "pay-error"  # <Pay> ended without a token for another reason


# ---- state ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Secrets:
    """Interim card fields. Only ever stored sealed; the repr shows which are set, not values."""

    pan: str = ""
    expiry: str = ""  # MMYY
    security_code: str = ""
    postal_code: str = ""

    def __repr__(self) -> str:
        held = [n for n in ("pan", "expiry", "security_code", "postal_code") if getattr(self, n)]
        return f"Secrets(<sealed: {', '.join(held) or 'none'}>)"

    def __bool__(self) -> bool:
        return bool(self.pan or self.expiry or self.security_code or self.postal_code)

    def to_dict(self) -> dict[str, str]:
        return {"pan": self.pan, "expiry": self.expiry, "security_code": self.security_code,
                "postal_code": self.postal_code}


@dataclass(frozen=True, slots=True)
class State:
    """Everything about a call in the flow. All fields but `secrets` are free of card data."""

    flow: str
    call_sid: str
    seq: int = 0  # the `seq` the next Gather action URL carries; anything else is a replay
    phase: str = "new"
    step: int = 0
    attempts: int = 0
    recording_paused: bool = False
    brand: str = ""
    last4: str = ""
    outcome: str = ""
    token: str = ""
    expiry_month: int = 0
    expiry_year: int = 0
    conference: str = ""
    secrets: Secrets = field(default_factory=Secrets)

    @property
    def ended(self) -> bool:
        return self.phase == "ended"

    def public(self) -> dict[str, object]:
        """The non-sensitive fields, for storage in clear and for logs."""
        return {k: getattr(self, k) for k in _PUBLIC_FIELDS}


_PUBLIC_FIELDS = ("flow", "call_sid", "seq", "phase", "step", "attempts", "recording_paused",
                  "brand", "last4", "outcome", "token", "expiry_month", "expiry_year",
                  "conference")


def new_state(flow: str, call_sid: str) -> State:
    return State(flow=flow, call_sid=call_sid)


# ---- events (what happened) -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Start:
    conference: str = ""  # agent handoff: the conference to put the caller back into


@dataclass(frozen=True, slots=True)
class Input:
    seq: int
    digits: str
    finished_on_key: str
    today: dt.date

    def __repr__(self) -> str:  # digits may be card data
        return f"Input(seq={self.seq}, digits=<{len(self.digits)}>, key={self.finished_on_key!r})"


@dataclass(frozen=True, slots=True)
class PayResult:
    """A <Pay> action callback: Twilio's `Result` and the Pay Connector's `PaymentToken`.
    Nothing else of it is taken in (its masked card fields are not needed: GetToken says)."""

    seq: int
    result: str
    token: str = ""


@dataclass(frozen=True, slots=True)
class RecordingUpdated:
    ok: bool


@dataclass(frozen=True, slots=True)
class Tokenized:
    token: str
    brand: str
    last4: str
    expiry_month: int
    expiry_year: int


@dataclass(frozen=True, slots=True)
class TokenizeFailed:
    reason: str


@dataclass(frozen=True, slots=True)
class CrmNotified:
    ok: bool


@dataclass(frozen=True, slots=True)
class HungUp:
    pass


@dataclass(frozen=True, slots=True)
class Expired:
    pass


Event = (Start | Input | PayResult | RecordingUpdated | Tokenized | TokenizeFailed | CrmNotified
         | HungUp | Expired)

# ---- effects (what the edge must do, then report back) --------------------------------------


@dataclass(frozen=True, slots=True)
class PauseRecording:
    pass


@dataclass(frozen=True, slots=True)
class ResumeRecording:
    pass


@dataclass(frozen=True, slots=True)
class Tokenize:
    """Tokenize `state.secrets` (the edge reads them from the state it holds)."""


@dataclass(frozen=True, slots=True)
class LookUpToken:
    """Read `state.token`'s metadata (GetToken): <Pay> already had the card tokenized."""


@dataclass(frozen=True, slots=True)
class NotifyCrm:
    outcome: str


Effect = PauseRecording | ResumeRecording | Tokenize | LookUpToken | NotifyCrm

# ---- TwiML actions (rendered by twiml.py) ---------------------------------------------------


@dataclass(frozen=True, slots=True)
class Say:
    prompt: Prompt


@dataclass(frozen=True, slots=True)
class Gather:
    seq: int
    prompts: tuple[Prompt, ...]
    timeout: int
    finish_on_key: str
    num_digits: int = 0  # 0: unlimited


@dataclass(frozen=True, slots=True)
class PayField:
    """One field <Pay> asks for: its `for` name, its prompt and its re-prompts by errorType."""

    name: str
    prompt: Prompt
    reprompts: tuple[tuple[str, Prompt], ...] = ()


@dataclass(frozen=True, slots=True)
class Pay:
    """Twilio's <Pay>: the card goes from the caller's keypad to the Pay Connector."""

    seq: int
    lead: tuple[Prompt, ...]
    fields: tuple[PayField, ...]
    security_code: bool
    postal_code: bool
    min_postal_code_length: int
    card_types: tuple[str, ...]
    timeout: int
    max_attempts: int
    tenant: str


@dataclass(frozen=True, slots=True)
class Hangup:
    pass


@dataclass(frozen=True, slots=True)
class Redirect:
    url: str


@dataclass(frozen=True, slots=True)
class Enqueue:
    queue: str


@dataclass(frozen=True, slots=True)
class Conference:
    name: str


Action = Say | Gather | Pay | Hangup | Redirect | Enqueue | Conference


@dataclass(frozen=True, slots=True)
class Transition:
    state: State
    actions: tuple[Action, ...] = ()
    effect: Effect | None = None
    rejected: str = ""  # non-empty: the event was refused (replay, stale, unexpected)
    error: str = ""  # the validation error type this input produced, if any


# ---- the step function ----------------------------------------------------------------------


def step(flow: Flow, state: State, event: Event) -> Transition:
    """Apply one event. Never raises on caller input; refuses events that do not fit."""
    if isinstance(event, HungUp):
        if state.ended:
            return Transition(state)
        # The call is gone: no TwiML, no recording to resume; erase, then tell the CRM.
        return _finish(flow, state, Outcome.HUNG_UP, call_alive=False)
    if state.ended:
        return Transition(state, rejected="session-ended")
    if isinstance(event, Expired):
        return _finish(flow, state, Outcome.TIMED_OUT)

    phase = state.phase
    if isinstance(event, Start):
        if phase != "new":
            return Transition(state, rejected="already-started")
        s = replace(state, phase="pausing", conference=event.conference)
        actions: tuple[Action, ...] = (Say(flow.greeting),) if flow.greeting else ()
        return Transition(s, actions, PauseRecording())

    if isinstance(event, RecordingUpdated):
        if phase == "pausing":
            if not event.ok:
                return _finish(flow, state, Outcome.RECORDING_ERROR)
            if flow.mode == "pay":
                s = replace(state, phase="paying", recording_paused=True, secrets=Secrets(),
                            brand="", last4="")
                return Transition(s, (_pay(flow, s, ()),))
            s = replace(state, phase="collecting", step=0, attempts=0, recording_paused=True,
                        secrets=Secrets(), brand="", last4="")
            return _ask(flow, s, ())
        if phase == "resuming":
            # A failed resume leaves the rest of the call unrecorded: a compliance gap, never
            # a card-data leak, so the call goes on (the edge logs it).
            s = replace(state, recording_paused=False)
            return _after_sensitive(flow, s)
        if phase == "finishing-resume":
            s = replace(state, recording_paused=False, phase="notifying")
            return Transition(s, (), NotifyCrm(state.outcome))
        return Transition(state, rejected="unexpected-event")

    if isinstance(event, Input):
        if event.seq != state.seq or phase not in ("collecting", "confirming"):
            return Transition(state, rejected="stale-or-replayed")
        return _input(flow, state, event)

    if isinstance(event, PayResult):
        if event.seq != state.seq or phase != "paying":
            return Transition(state, rejected="stale-or-replayed")
        return _pay_result(flow, replace(state, seq=state.seq + 1), event)

    if isinstance(event, Tokenized):
        if phase != "tokenizing":
            return Transition(state, rejected="unexpected-event")
        s = replace(state, token=event.token, brand=event.brand, last4=event.last4,
                    expiry_month=event.expiry_month, expiry_year=event.expiry_year)
        return _finish(flow, s, Outcome.SUCCESS)

    if isinstance(event, TokenizeFailed):
        if phase != "tokenizing":
            return Transition(state, rejected="unexpected-event")
        return _finish(flow, state, Outcome.TOKENIZER_ERROR)

    if isinstance(event, CrmNotified):
        if phase != "notifying":
            return Transition(state, rejected="unexpected-event")
        outcome = state.outcome
        if outcome == Outcome.SUCCESS and not event.ok:
            # The CRM never learnt of the token: the caller must not think they have paid.
            outcome = Outcome.CRM_ERROR
        s = replace(state, phase="ended", outcome=outcome)
        return Transition(s, _ending_actions(flow, s, outcome))

    return Transition(state, rejected="unexpected-event")


def _ask(flow: Flow, state: State, before: tuple[Action, ...]) -> Transition:
    """Prompt for the current step (a fresh Gather with the next seq)."""
    return Transition(state, before + (_gather(flow, flow.steps[state.step], state),))


def _gather(flow: Flow, st: Step, state: State, lead: tuple[Prompt, ...] = ()) -> Gather:
    prompt = st.prompt
    if st.kind == "confirmation":
        brand = BRAND_NAMES.get(CardBrand[state.brand], state.brand) if state.brand else "card"
        # Digits read one by one; the last four only, never more.
        prompt = Prompt(prompt.text.format(brand=brand, last4=" ".join(state.last4)),
                        prompt.voice, prompt.language)
    num = 0
    if st.kind == "expiry":
        num = 4
    elif st.kind == "security_code":
        num = security_code_length(_brand_of(state))
    elif st.kind == "confirmation":
        num = 1
    return Gather(state.seq, lead + (prompt,), st.timeout, st.finish_on_key, num)


def _input(flow: Flow, state: State, event: Input) -> Transition:
    st = flow.steps[state.step]
    digits = event.digits
    # Every accepted input moves the sequence on: the next Gather's URL carries the new value,
    # so a replay of this request (or of any earlier one) no longer matches.
    state = replace(state, seq=state.seq + 1)
    if "*" in digits:
        if st.kind == "confirmation":
            # Re-enter the whole card: the recording is still paused (it resumes only after
            # the confirmation), so straight back to the first step.
            s = replace(state, phase="collecting", step=0, attempts=0, secrets=Secrets(),
                        brand="", last4="")
            return _ask(flow, s, (Say(flow.reenter),))
        s = replace(state, secrets=_set(state.secrets, st.kind, ""))
        return Transition(s, (_gather(flow, st, s, (flow.reenter,)),))

    error, value, brand = _validate(flow, st, state, digits, event)
    if error:
        attempts = state.attempts + 1
        if attempts >= st.max_attempts:
            t = _finish(flow, replace(state, attempts=attempts), Outcome.TOO_MANY_ATTEMPTS)
            return replace(t, error=error)
        s = replace(state, attempts=attempts)
        return Transition(s, (_gather(flow, st, s, (st.reprompts[error],)),), error=error)

    if st.kind == "confirmation":
        # The last key of the capture: only now does the recording resume.
        return Transition(replace(state, phase="resuming"), (), ResumeRecording())
    s = replace(state, attempts=0, secrets=_set(state.secrets, st.kind, value))
    if st.kind == "card_number":
        s = replace(s, brand=brand, last4=value[-4:])
    if state.step == flow.last_sensitive_index:
        nxt = state.step + 1
        if nxt < len(flow.steps):
            # The read-back is asked while still paused: its key press is a keypad tone too,
            # and a recording must hold none (the recording vault certifies that).
            return _ask(flow, replace(s, phase="confirming", step=nxt, attempts=0), ())
        # The last keys are in: resume the recording before anything else is said.
        return Transition(replace(s, phase="resuming"), (), ResumeRecording())
    return _ask(flow, replace(s, step=state.step + 1), ())


def _after_sensitive(flow: Flow, state: State) -> Transition:
    """The recording runs again after the last key: now the card becomes a token (with
    <Pay> it is one already, and only its metadata is wanted)."""
    effect: Effect = LookUpToken() if flow.mode == "pay" else Tokenize()
    return Transition(replace(state, phase="tokenizing"), (), effect)


# ---- <Pay> -----------------------------------------------------------------------------------

# <Pay>'s Results that end the capture, as outcomes (anything else unknown: PAY_ERROR).
_PAY_ENDINGS = {
    "too-many-failed-attempts": Outcome.TOO_MANY_ATTEMPTS,
    "payment-connector-error": Outcome.TOKENIZER_ERROR,
}


# <Prompt errorType> calls a timeout `timeout` (the Payment resource's ErrorType says
# `input-timeout`, as the flows do).
_PROMPT_ERROR = {"input-timeout": "timeout"}


def _pay(flow: Flow, state: State, lead: tuple[Prompt, ...]) -> Pay:
    kinds = {st.kind for st in flow.steps}
    postal = next((st for st in flow.steps if st.kind == "postal_code"), None)
    return Pay(
        seq=state.seq,
        lead=lead,
        fields=tuple(PayField(PAY_FIELDS[st.kind], st.prompt, tuple(
            (_PROMPT_ERROR.get(error, error), prompt) for error, prompt in st.reprompts.items()))
            for st in flow.steps if st.kind in PAY_FIELDS),
        security_code="security_code" in kinds,
        postal_code=postal is not None,
        min_postal_code_length=postal.min_length if postal is not None else 0,
        card_types=tuple(sorted(PAY_CARD_TYPES[b] for b in flow.accepted_brands
                                if b in PAY_CARD_TYPES)),
        timeout=max(st.timeout for st in flow.steps),
        max_attempts=min(PAY_MAX_ATTEMPTS, max(st.max_attempts for st in flow.steps)),
        tenant=flow.tenant,
    )


def _pay_result(flow: Flow, state: State, event: PayResult) -> Transition:
    if event.result == "success":
        try:
            token = parse_token(event.token)[0] if event.token else ""
        except TokenError:
            token = ""  # not a token of ours: never kept, not even in the session row
        if not token:
            return _finish(flow, state, Outcome.PAY_ERROR)
        # The card digits are all in: resume the recording, then read the token's metadata.
        return Transition(replace(state, phase="resuming", token=token), (), ResumeRecording())
    if event.result == "caller-interrupted-with-star":
        attempts = state.attempts + 1
        if attempts >= PAY_MAX_ATTEMPTS:
            return _finish(flow, replace(state, attempts=attempts), Outcome.TOO_MANY_ATTEMPTS)
        s = replace(state, attempts=attempts)
        return Transition(s, (_pay(flow, s, (flow.reenter,)),))
    if event.result == "caller-hung-up":
        return _finish(flow, state, Outcome.HUNG_UP, call_alive=False)
    return _finish(flow, state, _PAY_ENDINGS.get(event.result, Outcome.PAY_ERROR))


def _set(secrets: Secrets, kind: str, value: str) -> Secrets:
    if kind == "card_number":
        return replace(secrets, pan=value)
    if kind in ("expiry", "security_code", "postal_code"):
        return replace(secrets, **{kind: value})
    return secrets


def _brand_of(state: State) -> CardBrand:
    """The brand of the card keyed so far (its security code's length depends on it)."""
    return CardBrand[state.brand] if state.brand else CardBrand.VISA


def _validate(flow: Flow, st: Step, state: State, digits: str,
              event: Input) -> tuple[str, str, str]:
    """(error type or '', accepted value, brand name) for one step's input."""
    if not digits:
        # An empty entry ended by the finish key is a wrong entry; no key at all is a timeout.
        if event.finished_on_key == "":
            return "input-timeout", "", ""
    kind = st.kind
    if kind == "card_number":
        try:
            pan = Pan.parse(digits) if digits.isdigit() else None
        except CardError as exc:
            if exc.reason == "UNKNOWN_BRAND" and not _known_prefix(digits):
                return "invalid-card-type", "", ""
            return "invalid-card-number", "", ""
        if pan is None:
            return "invalid-card-number", "", ""
        if pan.brand not in flow.accepted_brands:
            return "invalid-card-type", "", ""
        return "", pan.reveal(), pan.brand.name
    if kind == "expiry":
        if len(digits) != 4 or not digits.isdigit():
            return "invalid-date", "", ""
        try:
            Expiry.parse(int(digits[:2]), int(digits[2:]), today=event.today)
        except CardError:
            return "invalid-date", "", ""
        return "", digits, ""
    if kind == "security_code":
        if not security_code_ok(digits, _brand_of(state)):
            return "invalid-security-code", "", ""
        return "", digits, ""
    if kind == "postal_code":
        if not (st.min_length <= len(digits) <= st.max_length and digits.isdigit()):
            return "invalid-postal-code", "", ""
        return "", digits, ""
    # confirmation
    if digits != "1":
        return "invalid-confirmation", "", ""
    return "", "1", ""


def _known_prefix(digits: str) -> bool:
    """True when the number starts like a supported brand, so only its length is wrong."""
    head = digits[:12]
    return any(detect_brand(head.ljust(n, "0")) is not None for n in (13, 14, 15, 16, 19))


def _finish(flow: Flow, state: State, outcome: str, *, call_alive: bool = True) -> Transition:
    """End the capture: erase card fields first, then resume recording, then tell the CRM."""
    s = replace(state, secrets=Secrets(), outcome=outcome)
    if call_alive and state.recording_paused:
        return Transition(replace(s, phase="finishing-resume"), (), ResumeRecording())
    if not call_alive:
        s = replace(s, recording_paused=False)
    return Transition(replace(s, phase="notifying"), (), NotifyCrm(outcome))


def _ending_actions(flow: Flow, state: State, outcome: str) -> tuple[Action, ...]:
    if outcome == Outcome.HUNG_UP:
        return ()
    ending: Ending = flow.on_success if outcome == Outcome.SUCCESS else flow.on_failure
    actions: list[Action] = []
    if outcome in (Outcome.TOKENIZER_ERROR, Outcome.CRM_ERROR, Outcome.RECORDING_ERROR):
        actions.append(Say(flow.apology))
    if ending.say is not None:
        actions.append(Say(ending.say))
    if ending.action == "redirect":
        actions.append(Redirect(ending.url))
    elif ending.action == "enqueue":
        actions.append(Enqueue(ending.queue))
    elif ending.action == "conference" and state.conference:
        actions.append(Conference(state.conference))
    else:
        actions.append(Hangup())
    return tuple(actions)
