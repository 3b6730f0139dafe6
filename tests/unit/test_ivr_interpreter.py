"""The sans-IO interpreter on its own: every validation path, every effect order, no I/O."""

from __future__ import annotations

import datetime as dt
from dataclasses import replace
from typing import Any

import pytest

from tests.testcards import TEST_CARDS
from vaultline.ivr import interpreter as ivr
from vaultline.ivr.flows import Flow, parse_flow
from vaultline.ivr.interpreter import (
    CrmNotified,
    Expired,
    Gather,
    HungUp,
    Input,
    NotifyCrm,
    Outcome,
    PauseRecording,
    RecordingUpdated,
    ResumeRecording,
    Say,
    Start,
    Tokenize,
    Tokenized,
    TokenizeFailed,
    Transition,
)
from vaultline.ivr.twiml import render

TODAY = dt.date(2025, 11, 25)
VISA = "4111111111111111"
AMEX = "378282246310005"


def make_flow(*, postal: bool = False, confirm: bool = True, cvv: bool = True,
              brands: list[str] | None = None, failure: dict[str, Any] | None = None,
              success: dict[str, Any] | None = None) -> Flow:
    steps: list[dict[str, Any]] = [
        {"step": "card_number", "max_attempts": 3},
        {"step": "expiry", "max_attempts": 2},
    ]
    if cvv:
        steps.append({"step": "security_code"})
    if postal:
        steps.append({"step": "postal_code", "min_length": 5, "max_length": 7})
    if confirm:
        steps.append({"step": "confirmation", "max_attempts": 2})
    doc: dict[str, Any] = {
        "name": "pay", "tenant": "default", "greeting": "Hello.", "steps": steps,
        "on_success": success or {"say": "Saved.", "then": "hangup"},
        "on_failure": failure or {"say": "Transferring.", "then": "redirect",
                                  "url": "/voice/queue/support"},
    }
    if brands:
        doc["accepted_brands"] = brands
    return parse_flow(doc, "test")


class Call:
    """Drives the interpreter like the webhook does, but with scripted effect results."""

    def __init__(self, flow: Flow, *, pause_ok: bool = True, resume_ok: bool = True,
                 tokenize: str = "ok", crm_ok: bool = True) -> None:
        self.flow = flow
        self.state = ivr.new_state(flow.name, "CA" + "0" * 32)
        self.pause_ok, self.resume_ok = pause_ok, resume_ok
        self.tokenize, self.crm_ok = tokenize, crm_ok
        self.effects: list[Any] = []
        self.actions: list[Any] = []
        self.heard: list[str] = []

    def send(self, event: Any) -> Transition:
        first = t = ivr.step(self.flow, self.state, event)
        self.actions = list(t.actions)
        while t.effect is not None:
            self.effects.append(t.effect)
            result = self._perform(t.effect, t.state)
            t = ivr.step(self.flow, t.state, result)
            self.actions += t.actions
        self.state = t.state
        for a in self.actions:
            if isinstance(a, Say):
                self.heard.append(a.prompt.text)
            elif isinstance(a, Gather):
                self.heard += [p.text for p in a.prompts]
        return first

    def _perform(self, effect: Any, state: ivr.State) -> Any:
        if isinstance(effect, PauseRecording):
            return RecordingUpdated(self.pause_ok)
        if isinstance(effect, ResumeRecording):
            return RecordingUpdated(self.resume_ok)
        if isinstance(effect, Tokenize):
            assert state.secrets.pan  # the card is there to tokenize, and only now
            if self.tokenize == "down":
                return TokenizeFailed("unavailable")
            return Tokenized("9999000011111111", state.brand, state.last4, 12, 2030)
        if isinstance(effect, NotifyCrm):
            assert not state.secrets, "card fields erased before the CRM hears anything"
            return CrmNotified(self.crm_ok)
        raise AssertionError(effect)

    def start(self) -> Call:
        self.send(Start())
        return self

    def press(self, digits: str, key: str = "") -> Transition:
        return self.send(Input(self.state.seq, digits, key, TODAY))

    @property
    def gather(self) -> Gather:
        gathers = [a for a in self.actions if isinstance(a, Gather)]
        assert gathers, self.actions
        return gathers[-1]

    @property
    def step_kind(self) -> str:
        return self.flow.steps[self.state.step].kind

    def twiml(self) -> str:
        return render(self.actions, base_url="https://ivr.example", flow=self.flow.name)


def enter_card(call: Call, pan: str = VISA, expiry: str = "1230", cvv: str = "123") -> None:
    call.start()
    call.press(pan, "#")
    call.press(expiry)
    if call.flow.step_index("security_code") >= 0:
        call.press(cvv)


# ---- the happy path ------------------------------------------------------------------------


def test_success_effects_in_order_and_card_erased() -> None:
    call = Call(make_flow())
    call.start()
    assert call.effects == [PauseRecording()]
    assert call.state.recording_paused and call.step_kind == "card_number"
    assert call.heard[0] == "Hello."
    call.press(VISA, "#")
    assert call.step_kind == "expiry" and call.gather.num_digits == 4
    call.press("1230")
    assert call.step_kind == "security_code" and call.gather.num_digits == 3
    call.press("123")
    # The read-back is asked with the recording still paused: its key is a tone too.
    assert call.effects == [PauseRecording()] and call.state.recording_paused
    assert call.state.phase == "confirming" and call.gather.num_digits == 1
    assert "Visa card ending in 1 1 1 1" in call.gather.prompts[-1].text
    assert VISA not in call.twiml()
    call.press("1")
    assert call.effects[-3:] == [ResumeRecording(), Tokenize(), NotifyCrm(Outcome.SUCCESS)]
    assert call.state.ended and call.state.outcome == Outcome.SUCCESS
    assert call.state.token == "9999000011111111" and call.state.last4 == "1111"
    assert not call.state.secrets
    assert call.heard[-1] == "Saved."
    assert isinstance(call.actions[-1], ivr.Hangup)


def test_without_confirmation_tokenizes_after_resume() -> None:
    call = Call(make_flow(confirm=False, cvv=False))
    enter_card(call)
    assert call.effects == [PauseRecording(), ResumeRecording(), Tokenize(),
                            NotifyCrm(Outcome.SUCCESS)]
    assert call.state.outcome == Outcome.SUCCESS


def test_every_sensitive_prompt_is_asked_while_paused() -> None:
    call = Call(make_flow(postal=True))
    call.start()
    for digits, key in ((VISA, "#"), ("1230", ""), ("123", ""), ("94111", "#")):
        assert call.state.recording_paused and call.flow.steps[call.state.step].sensitive
        call.press(digits, key)
    # ... and so is the read-back: the recording resumes after the last key of the call.
    assert call.state.recording_paused and call.state.phase == "confirming"
    call.press("1")
    assert not call.state.recording_paused


def test_amex_security_code_is_four_digits() -> None:
    call = Call(make_flow())
    call.start()
    call.press(AMEX, "#")
    call.press("1230")
    assert call.gather.num_digits == 4
    t = call.press("123")
    assert t.error == "invalid-security-code"
    call.press("1234")
    assert call.state.phase == "confirming"
    assert "American Express card ending in 0 0 0 5" in call.gather.prompts[-1].text


@pytest.mark.parametrize("brand", sorted(TEST_CARDS))
def test_every_test_card_brand_is_accepted(brand: str) -> None:
    call = Call(make_flow(cvv=False))
    call.start()
    call.press(TEST_CARDS[brand][0], "#")
    assert call.step_kind == "expiry", brand
    assert call.state.brand == brand


# ---- validation paths ----------------------------------------------------------------------


@pytest.mark.parametrize("digits, key, error", [
    ("4111111111111112", "#", "invalid-card-number"),  # Luhn failure
    ("411111111111", "#", "invalid-card-number"),  # too short for Visa, Luhn-valid or not
    ("41111111111111111111", "#", "invalid-card-number"),  # 20 digits
    ("411111111111113", "#", "invalid-card-number"),  # 15 digits Visa: wrong length
    ("9999999999999995", "#", "invalid-card-type"),  # Luhn-valid, no brand
    ("", "#", "invalid-card-number"),  # just the hash key
    ("", "", "input-timeout"),
    ("4111-1111", "#", "invalid-card-number"),  # not digits (cannot come from DTMF anyway)
])
def test_card_number_errors(digits: str, key: str, error: str) -> None:
    call = Call(make_flow())
    call.start()
    t = call.press(digits, key)
    assert t.error == error
    assert call.step_kind == "card_number" and call.state.attempts == 1
    assert call.gather.prompts[0] == call.flow.steps[0].reprompts[error]
    assert not call.state.secrets


def test_brand_not_accepted_by_flow() -> None:
    call = Call(make_flow(brands=["VISA"]))
    call.start()
    assert call.press("5555555555554444", "#").error == "invalid-card-type"
    assert call.press(VISA, "#").error == ""


@pytest.mark.parametrize("digits, key, error", [
    ("1324", "", "invalid-date"),  # month 13
    ("0030", "", "invalid-date"),  # month 0
    ("1024", "", "invalid-date"),  # October 2024: in the past
    ("1025", "", "invalid-date"),  # October 2025: expired the month before TODAY
    ("123", "#", "invalid-date"),  # three digits
    ("", "", "input-timeout"),
])
def test_expiry_errors(digits: str, key: str, error: str) -> None:
    call = Call(make_flow())
    call.start()
    call.press(VISA, "#")
    assert call.press(digits, key).error == error
    assert call.step_kind == "expiry"


def test_expiry_this_month_is_accepted() -> None:
    call = Call(make_flow())
    call.start()
    call.press(VISA, "#")
    assert call.press("1125").error == ""
    assert call.step_kind == "security_code"


@pytest.mark.parametrize("digits, error", [("12", "invalid-security-code"),
                                           ("1234", "invalid-security-code"),
                                           ("", "input-timeout")])
def test_security_code_errors(digits: str, error: str) -> None:
    call = Call(make_flow())
    call.start()
    call.press(VISA, "#")
    call.press("1230")
    assert call.press(digits).error == error


@pytest.mark.parametrize("digits, error", [("1234", "invalid-postal-code"),
                                           ("12345678", "invalid-postal-code"),
                                           ("", "input-timeout")])
def test_postal_code_errors(digits: str, error: str) -> None:
    call = Call(make_flow(postal=True))
    enter_card(call)
    assert call.step_kind == "postal_code"
    assert call.press(digits, "#" if digits else "").error == error
    assert call.state.recording_paused


@pytest.mark.parametrize("digits, error", [("2", "invalid-confirmation"),
                                           ("#", "invalid-confirmation"),
                                           ("", "input-timeout")])
def test_confirmation_errors(digits: str, error: str) -> None:
    call = Call(make_flow())
    enter_card(call)
    assert call.press(digits).error == error
    assert call.state.phase == "confirming"


def test_too_many_attempts_fails_politely_after_erasing() -> None:
    call = Call(make_flow())
    call.start()
    call.press(VISA, "#")
    call.press("1324")
    t = call.press("0000")  # expiry has max_attempts 2
    assert t.error == "invalid-date"
    assert call.effects[-2:] == [ResumeRecording(), NotifyCrm(Outcome.TOO_MANY_ATTEMPTS)]
    assert call.state.ended and call.state.outcome == Outcome.TOO_MANY_ATTEMPTS
    assert not call.state.secrets and not call.state.recording_paused
    assert call.heard[-1] == "Transferring."
    assert call.actions[-1] == ivr.Redirect("/voice/queue/support")
    assert 'Redirect method="POST">https://ivr.example/voice/queue/support<' in call.twiml()


def test_attempts_reset_after_a_good_entry() -> None:
    call = Call(make_flow())
    call.start()
    call.press("4111111111111112", "#")
    call.press("4111111111111112", "#")
    call.press(VISA, "#")
    assert call.state.attempts == 0 and call.step_kind == "expiry"


def test_timeouts_count_as_attempts() -> None:
    call = Call(make_flow())
    call.start()
    for _ in range(3):
        call.press("", "")
    assert call.state.outcome == Outcome.TOO_MANY_ATTEMPTS


# ---- star ----------------------------------------------------------------------------------


def test_star_restarts_the_step_without_an_attempt() -> None:
    call = Call(make_flow())
    call.start()
    call.press("4111*", "#")
    assert call.step_kind == "card_number" and call.state.attempts == 0
    assert call.gather.prompts[0] == call.flow.reenter
    call.press(VISA, "#")
    call.press("12*")
    assert call.step_kind == "expiry" and call.state.secrets.pan == VISA
    assert not call.state.secrets.expiry


def test_star_at_confirmation_starts_over_still_paused() -> None:
    call = Call(make_flow())
    enter_card(call)
    call.press("*")
    assert call.effects == [PauseRecording()]  # never resumed, so nothing to pause again
    assert call.state.recording_paused and call.step_kind == "card_number"
    assert call.flow.reenter.text in call.heard
    assert not call.state.secrets and call.state.last4 == ""
    enter_card_again = ("5555555555554444", "#"), ("1230", ""), ("123", ""), ("1", "")
    for digits, key in enter_card_again:
        call.press(digits, key)
    assert call.state.outcome == Outcome.SUCCESS and call.state.last4 == "4444"


# ---- failures of the world -----------------------------------------------------------------


def test_pause_failure_never_asks_for_card_data() -> None:
    call = Call(make_flow(), pause_ok=False)
    call.start()
    assert not any(isinstance(a, Gather) for a in call.actions)
    assert call.state.outcome == Outcome.RECORDING_ERROR
    assert call.effects == [PauseRecording(), NotifyCrm(Outcome.RECORDING_ERROR)]
    assert call.heard[-2:] == [call.flow.apology.text, "Transferring."]


def test_resume_failure_goes_on_to_confirmation() -> None:
    call = Call(make_flow(), resume_ok=False)
    enter_card(call)
    assert call.state.phase == "confirming"


def test_tokenizer_down_apologises_and_keeps_nothing() -> None:
    call = Call(make_flow(), tokenize="down")
    enter_card(call)
    call.press("1")
    assert call.state.outcome == Outcome.TOKENIZER_ERROR and not call.state.secrets
    assert call.state.token == ""
    assert call.heard[-2:] == [call.flow.apology.text, "Transferring."]


def test_crm_down_turns_success_into_failure_path() -> None:
    call = Call(make_flow(), crm_ok=False)
    enter_card(call)
    call.press("1")
    assert call.state.outcome == Outcome.CRM_ERROR
    assert call.heard[-2:] == [call.flow.apology.text, "Transferring."]


def test_hang_up_mid_card_erases_and_notifies_without_twiml() -> None:
    call = Call(make_flow())
    call.start()
    call.press(VISA, "#")
    assert call.state.secrets.pan
    t = call.send(HungUp())
    assert call.state.ended and call.state.outcome == Outcome.HUNG_UP
    assert not call.state.secrets and call.actions == [] and t.actions == ()
    assert t.effect == NotifyCrm(Outcome.HUNG_UP)
    assert call.effects[-1] == NotifyCrm(Outcome.HUNG_UP)
    assert ResumeRecording() not in call.effects[1:]  # nothing to resume on a dead call
    assert ivr.step(call.flow, call.state, HungUp()).state == call.state  # idempotent


def test_session_expiry_erases_and_takes_failure_path() -> None:
    call = Call(make_flow())
    call.start()
    call.press(VISA, "#")
    call.send(Expired())
    assert call.state.outcome == Outcome.TIMED_OUT and not call.state.secrets
    assert call.effects[-2:] == [ResumeRecording(), NotifyCrm(Outcome.TIMED_OUT)]


# ---- replays and stray events --------------------------------------------------------------


def test_replayed_or_stale_input_is_refused_without_change() -> None:
    call = Call(make_flow())
    call.start()
    first_seq = call.state.seq
    call.press(VISA, "#")
    before = call.state
    t = ivr.step(call.flow, before, Input(first_seq, VISA, "#", TODAY))
    assert t.rejected == "stale-or-replayed" and t.state == before and t.actions == ()
    t = ivr.step(call.flow, before, Input(before.seq + 5, "1230", "", TODAY))
    assert t.rejected


def test_second_start_and_events_after_the_end_are_refused() -> None:
    call = Call(make_flow())
    call.start()
    assert ivr.step(call.flow, call.state, Start()).rejected == "already-started"
    assert ivr.step(call.flow, call.state, Tokenized("t", "VISA", "1111", 1, 2030)).rejected
    assert ivr.step(call.flow, call.state, CrmNotified(True)).rejected
    enter_card(call := Call(make_flow()))
    call.press("1")
    assert ivr.step(call.flow, call.state, Input(call.state.seq, "1", "", TODAY)).rejected
    assert ivr.step(call.flow, call.state, Expired()).rejected == "session-ended"


def test_input_before_recording_is_paused_is_refused() -> None:
    flow = make_flow()
    state = ivr.step(flow, ivr.new_state("pay", "CA1"), Start()).state
    assert state.phase == "pausing"
    assert ivr.step(flow, state, Input(state.seq, VISA, "#", TODAY)).rejected


# ---- endings, rendering and secrecy ---------------------------------------------------------


def test_conference_ending_returns_to_the_agent() -> None:
    call = Call(make_flow(success={"then": "conference"}, failure={"then": "conference"}))
    call.send(Start(conference="room-42"))
    call.press(VISA, "#")
    call.press("1230")
    call.press("123")
    call.press("1")
    assert call.actions[-1] == ivr.Conference("room-42")
    assert "<Dial><Conference>room-42</Conference></Dial>" in call.twiml()


def test_enqueue_ending() -> None:
    call = Call(make_flow(failure={"say": "Hold on.", "then": "enqueue", "queue": "support"}))
    call.start()
    for _ in range(3):
        call.press("", "")
    assert "<Enqueue>support</Enqueue>" in call.twiml()


def test_gather_twiml_attributes() -> None:
    call = Call(make_flow())
    call.start()
    xml = call.twiml()
    assert 'action="https://ivr.example/voice/pay/input?seq=0"' in xml
    assert 'actionOnEmptyResult="true"' in xml and 'input="dtmf"' in xml
    assert 'finishOnKey="#"' in xml and 'timeout="5"' in xml


def test_no_card_data_in_any_twiml_repr_or_public_state() -> None:
    call = Call(make_flow(postal=True))
    call.start()
    seen = []
    for digits, key in ((VISA, "#"), ("1230", ""), ("123", ""), ("94111", "#"), ("1", "")):
        call.press(digits, key)
        seen += [call.twiml(), repr(call.state), str(call.state.public()), repr(call.effects)]
    blob = "\n".join(seen)
    assert VISA not in blob and "411111" not in blob
    assert repr(Input(1, VISA, "#", TODAY)).count("4111") == 0


def test_state_secrets_repr() -> None:
    s = ivr.Secrets(pan=VISA, expiry="1230")
    assert repr(s) == "Secrets(<sealed: pan, expiry>)"
    assert not ivr.Secrets() and bool(s)
    assert replace(s, pan="").pan == ""


# ---- mode: pay (<Pay>) -----------------------------------------------------------------------


def pay_flow(**over: Any) -> Flow:
    doc: dict[str, Any] = {
        "name": "pay_line", "tenant": "default", "mode": "pay",
        "accepted_brands": ["VISA", "AMEX"],
        "steps": [{"step": "card_number", "prompt": "Card please", "timeout": 9,
                   "reprompts": {"input-timeout": "Nothing heard"}},
                  {"step": "expiry"}, {"step": "security_code", "max_attempts": 2},
                  {"step": "postal_code", "min_length": 5}],
        "on_success": {"say": "Thanks", "then": "hangup"},
        "on_failure": {"say": "Sorry", "then": "redirect", "url": "/voice/queue/support"},
    }
    doc.update(over)
    return parse_flow(doc)


def paying(flow: Flow) -> Transition:
    t = ivr.step(flow, ivr.new_state(flow.name, "CA" + "a" * 32), Start())
    assert t.effect == PauseRecording()
    return ivr.step(flow, t.state, RecordingUpdated(True))


def test_pay_mode_asks_twilio_for_the_whole_card_while_paused() -> None:
    flow = pay_flow()
    t = paying(flow)
    (pay,) = t.actions
    assert isinstance(pay, ivr.Pay) and t.state.phase == "paying"
    assert t.state.recording_paused and pay.seq == t.state.seq
    assert [f.name for f in pay.fields] == ["payment-card-number", "expiration-date",
                                           "security-code", "postal-code"]
    assert (pay.security_code, pay.postal_code, pay.min_postal_code_length) == (True, True, 5)
    assert pay.card_types == ("amex", "visa") and pay.timeout == 9 and pay.max_attempts == 3
    # <Prompt errorType> says `timeout` where the flow (and the Payment resource) say
    # `input-timeout`.
    card = pay.fields[0]
    assert ("timeout", card.reprompts[-1][1]) == card.reprompts[-1]
    twiml = render(t.actions, base_url="https://ivr.example.com", flow=flow.name,
                   pay_connector="acme-vault")
    assert '<Pay action="https://ivr.example.com/voice/pay_line/pay?seq=0"' in twiml
    for attribute in ('paymentConnector="acme-vault"', 'tokenType="reusable"',
                      'chargeAmount="0"', 'securityCode="true"', 'postalCode="true"',
                      'minPostalCodeLength="5"', 'validCardTypes="amex visa"',
                      '<Prompt errorType="timeout" for="payment-card-number">',
                      '<Parameter name="vaultline_tenant" value="default" />'):
        assert attribute in twiml, attribute


def test_a_pay_success_resumes_recording_then_reads_the_token() -> None:
    flow = pay_flow()
    t = paying(flow)
    token = "tok_" + "A" * 22
    t = ivr.step(flow, t.state, ivr.PayResult(t.state.seq, "success", token))
    assert t.effect == ResumeRecording() and t.state.token == token
    t = ivr.step(flow, t.state, RecordingUpdated(True))
    assert t.effect == ivr.LookUpToken() and t.state.phase == "tokenizing"
    assert not t.state.recording_paused
    t = ivr.step(flow, t.state, Tokenized(token, "VISA", "1111", 12, 2030))
    assert t.effect == NotifyCrm(Outcome.SUCCESS)
    t = ivr.step(flow, t.state, CrmNotified(True))
    assert t.state.ended and t.state.outcome == Outcome.SUCCESS and t.state.last4 == "1111"
    assert not t.state.secrets


def test_a_replayed_or_stale_pay_result_is_refused() -> None:
    flow = pay_flow()
    t = paying(flow)
    assert ivr.step(flow, t.state, ivr.PayResult(t.state.seq + 1, "success",
                                                 "tok_" + "A" * 22)).rejected
    done = ivr.step(flow, t.state, ivr.PayResult(t.state.seq, "success", "tok_" + "A" * 22))
    assert ivr.step(flow, done.state, ivr.PayResult(t.state.seq, "success",
                                                    "tok_" + "A" * 22)).rejected


@pytest.mark.parametrize("token", ["", "4111111111111111", "not a token", "tok_short"])
def test_a_success_without_a_token_of_ours_keeps_nothing(token: str) -> None:
    """A card number where the token should be is never kept, not even in the session."""
    flow = pay_flow()
    t = paying(flow)
    t = ivr.step(flow, t.state, ivr.PayResult(t.state.seq, "success", token))
    assert t.state.token == "" and t.state.outcome == Outcome.PAY_ERROR
    assert t.effect == ResumeRecording()


def test_star_asks_again_until_the_attempts_are_spent() -> None:
    flow = pay_flow()
    t = paying(flow)
    for _ in range(2):
        t = ivr.step(flow, t.state, ivr.PayResult(t.state.seq, "caller-interrupted-with-star"))
        (pay,) = t.actions
        assert isinstance(pay, ivr.Pay) and pay.seq == t.state.seq
        assert pay.lead == (flow.reenter,)  # said before <Pay> asks again
        assert t.state.recording_paused
    t = ivr.step(flow, t.state, ivr.PayResult(t.state.seq, "caller-interrupted-with-star"))
    assert t.state.outcome == Outcome.TOO_MANY_ATTEMPTS and t.effect == ResumeRecording()


@pytest.mark.parametrize(("result", "outcome"), [
    ("too-many-failed-attempts", Outcome.TOO_MANY_ATTEMPTS),
    ("payment-connector-error", Outcome.TOKENIZER_ERROR),
    ("validation-error", Outcome.PAY_ERROR),
    ("internal-error", Outcome.PAY_ERROR),
    ("something-new", Outcome.PAY_ERROR),
])
def test_a_failed_pay_resumes_recording_and_fails_politely(result: str, outcome: str) -> None:
    flow = pay_flow()
    t = paying(flow)
    t = ivr.step(flow, t.state, ivr.PayResult(t.state.seq, result))
    assert t.effect == ResumeRecording() and t.state.outcome == outcome
    t = ivr.step(flow, t.state, RecordingUpdated(True))
    assert t.effect == NotifyCrm(outcome)
    t = ivr.step(flow, t.state, CrmNotified(True))
    assert [type(a) for a in t.actions][-1] is ivr.Redirect


def test_a_hang_up_during_pay_ends_without_resuming() -> None:
    flow = pay_flow()
    t = paying(flow)
    t = ivr.step(flow, t.state, ivr.PayResult(t.state.seq, "caller-hung-up"))
    assert t.effect == NotifyCrm(Outcome.HUNG_UP) and not t.state.recording_paused
