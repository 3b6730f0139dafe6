"""Agent-assisted capture end to end (issue 15): the CRM starts a capture over gRPC, the IVR
drives the simulator's Payment on the customer's leg, the customer keys the card, Twilio hands
it to the Pay Connector, the CRM and every watcher see masked progress and the token.

In every scenario: the agent's leg heard no tone, no card digit was keyed while the recording
ran, and no card digit appears in any event."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest

from tests.helpers import unique_name
from tests.ivr.conftest import PUBLIC, IvrEnv
from vaultline.gen.capture.v1 import capture_pb2 as pb
from vaultline.gen.tokenization.v1 import tokenization_pb2 as tpb
from vaultline.ivr.connector import ConnectorCredentials
from vaultline.twilio_sim.payments import HANGUP, ConnectorConfig, PaymentScript

CREDENTIALS = ConnectorCredentials("twilio", "connector-password-for-tests")
PAN = "4111111111111111"


@pytest.fixture
async def agent_env(make_ivr: Callable[..., Any]) -> IvrEnv:
    env = await make_ivr(connector_credentials=CREDENTIALS)
    env.sim.payments.connectors["vaultline"] = ConnectorConfig(
        PUBLIC + "/pay/connector", CREDENTIALS.username, CREDENTIALS.password)
    return env


async def capture(env: IvrEnv, tokenizer: Any, script: PaymentScript, *,
                  security_code: bool = False, postal_code: bool = False,
                  during: Callable[[Any, str], Any] | None = None
                  ) -> tuple[Any, list[pb.CaptureEvent], pb.Capture]:
    """Place the conference, start the capture as the CRM, watch it to its end."""
    call = env.sim.agent_call(script)
    stub = tokenizer.capture_as("crm/crm-1")
    started = (await stub.StartCapture(pb.StartCaptureRequest(
        call_sid=call.sid, agent_id="agent-7", request_id=unique_name("req", 12),
        fields=pb.CaptureFields(security_code=security_code, postal_code=postal_code)))).capture
    events: list[pb.CaptureEvent] = []

    async def watch() -> None:
        async for response in stub.WatchCapture(pb.WatchCaptureRequest(
                capture_id=started.capture_id)):
            events.append(response.event)
            if during is not None:
                await during(stub, started.capture_id, response.event)

    await asyncio.wait_for(watch(), 30)
    await env.sim.payments.drain()
    final = (await stub.GetCapture(pb.GetCaptureRequest(capture_id=started.capture_id))).capture
    return call, events, final


def assert_safe(call: Any, events: list[pb.CaptureEvent], *pans: str) -> None:
    assert call.tones_heard_by_agent() == 0
    assert call.sensitive_presses_while_recording() == []
    assert [e.seq for e in events] == list(range(1, len(events) + 1))
    for pan in pans:
        assert all(pan not in str(e) and pan[:12] not in str(e) for e in events)
    # Short fields (expiry, security code) cannot be searched for in ids: no event carries
    # any field value at all but the completion's token metadata.
    for e in events:
        if e.state != pb.CAPTURE_STATE_COMPLETED:
            assert not e.card.token and not e.card.expiry_month and not e.card.last4
    # The recording ran again once the capture had ended.
    assert call.recording == "in-progress" or call.status == "completed"


async def test_a_card_keyed_on_the_call_becomes_a_token(
    agent_env: IvrEnv, tokenizer: Any
) -> None:
    call, events, final = await capture(
        agent_env, tokenizer, PaymentScript.card(PAN, "1230", cvv="123"), security_code=True)
    assert final.state == pb.CAPTURE_STATE_COMPLETED
    # What GetToken shows of the token. (Its expiry is the newest one the vault has seen for
    # this test card in the tenant, which other tests key too.)
    got = await tokenizer.stub.GetToken(tpb.GetTokenRequest(token=final.card.token))
    assert (final.card.last4, final.card.brand, final.card.expiry_month,
            final.card.expiry_year) == ("1111", tpb.CARD_BRAND_VISA, got.token.expiry_month,
                                        got.token.expiry_year)
    assert (got.token.expiry_year, got.token.expiry_month) >= (2030, 12)
    # Masked progress: digit counts climbing per field, each field valid, then the token.
    card_digits = [e.digits_entered for e in events
                   if e.field == pb.CAPTURE_FIELD_CARD_NUMBER and not e.field_outcome]
    assert card_digits[1:] == list(range(1, 17))
    outcomes = [(e.field, e.field_outcome) for e in events if e.field_outcome]
    assert outcomes == [(pb.CAPTURE_FIELD_CARD_NUMBER, "valid"),
                        (pb.CAPTURE_FIELD_EXPIRATION_DATE, "valid"),
                        (pb.CAPTURE_FIELD_SECURITY_CODE, "valid")]
    assert events[-1].state == pb.CAPTURE_STATE_COMPLETED and events[-1].card.last4 == "1111"
    assert_safe(call, events, PAN)
    # The recording was paused over every key and resumed after the last field.
    statuses = [s for _, s in call.recording_timeline()]
    assert statuses[:2] == ["in-progress", "paused (skip)"] and statuses[-1] == "in-progress"
    # The CRM gets the token, once (told right after the completion event is appended);
    # the connector was called once.
    for _ in range(100):
        if any(e["type"] == "capture.completed" for e in agent_env.crm.events):
            break
        await asyncio.sleep(0.05)
    [event] = [e for e in agent_env.crm.events if e["type"] == "capture.completed"]
    assert event["data"]["token"] == final.card.token and PAN not in str(event)
    [payment] = agent_env.sim.payments.payments.values()
    assert payment.connector_attempts == 1 and payment.status == "complete"
    # The security code went with the card and is held for the payment service, once.
    redeemed = await tokenizer.as_("payments/payments-1").RedeemSecurityCode(
        tpb.RedeemSecurityCodeRequest(token=final.card.token))
    assert redeemed.security_code == "123"


async def test_an_invalid_card_is_keyed_again(agent_env: IvrEnv, tokenizer: Any) -> None:
    script = PaymentScript({"payment-card-number": ["4111111111111112", PAN],
                            "expiration-date": ["1399", "1230"]})
    call, events, final = await capture(agent_env, tokenizer, script)
    assert final.state == pb.CAPTURE_STATE_COMPLETED
    outcomes = [(e.field, e.field_outcome, e.attempt) for e in events if e.field_outcome]
    assert outcomes == [
        (pb.CAPTURE_FIELD_CARD_NUMBER, "invalid-card-number", 1),
        (pb.CAPTURE_FIELD_CARD_NUMBER, "valid", 2),
        (pb.CAPTURE_FIELD_EXPIRATION_DATE, "invalid-date", 1),
        (pb.CAPTURE_FIELD_EXPIRATION_DATE, "valid", 2),
    ]
    assert_safe(call, events, PAN, "4111111111111112")


async def test_the_agent_cancels_mid_capture(agent_env: IvrEnv, tokenizer: Any) -> None:
    cancelled = False

    async def cancel_on_expiry(stub: Any, capture_id: str, event: pb.CaptureEvent) -> None:
        nonlocal cancelled
        if event.field == pb.CAPTURE_FIELD_EXPIRATION_DATE and not cancelled:
            cancelled = True
            await stub.CancelCapture(pb.CancelCaptureRequest(capture_id=capture_id))

    slow = PaymentScript.card(PAN, "1230")
    # The agent decides while the customer is still keying the expiry.
    slow.key_delays["expiration-date"] = 1.0
    call, events, final = await capture(agent_env, tokenizer, slow, during=cancel_on_expiry)
    assert (final.state, final.failure_reason) == (pb.CAPTURE_STATE_CANCELLED,
                                                   "agent-cancelled")
    assert not final.card.token
    assert_safe(call, events, PAN)
    assert call.recording == "in-progress"
    [payment] = agent_env.sim.payments.payments.values()
    assert payment.status == "cancelled" and payment.connector_attempts == 0


@pytest.mark.parametrize(("script", "state", "reason"), [
    (PaymentScript({"payment-card-number": ["41*"]}), pb.CAPTURE_STATE_CANCELLED,
     "caller-pressed-star"),
    (PaymentScript({"payment-card-number": [PAN], "expiration-date": [HANGUP]}),
     pb.CAPTURE_STATE_FAILED, "caller-hung-up"),
    (PaymentScript({"payment-card-number": ["4111111111111112"] * 3}),
     pb.CAPTURE_STATE_FAILED, "too-many-failed-attempts"),
])
async def test_the_customer_ends_it(agent_env: IvrEnv, tokenizer: Any, script: PaymentScript,
                                    state: int, reason: str) -> None:
    call, events, final = await capture(agent_env, tokenizer, script)
    assert (final.state, final.failure_reason) == (state, reason)
    assert_safe(call, events, PAN, "4111111111111112")


async def test_a_connector_refusal_fails_the_capture(agent_env: IvrEnv, tokenizer: Any) -> None:
    agent_env.sim.payments.connectors["vaultline"] = ConnectorConfig(
        PUBLIC + "/pay/connector", CREDENTIALS.username, "not-the-password-at-all")
    call, events, final = await capture(agent_env, tokenizer, PaymentScript.card(PAN, "1230"))
    assert final.state == pb.CAPTURE_STATE_FAILED
    assert final.failure_reason.startswith("connector-error")
    assert_safe(call, events, PAN)


async def test_tones_outside_a_payment_reach_the_agent(agent_env: IvrEnv) -> None:
    """The counter the scenarios above check is real: keys pressed on the conference with no
    Payment capturing them are heard on the agent's leg."""
    call = agent_env.sim.agent_call(PaymentScript())
    agent_env.sim.press_in_conference(call, "123")
    assert call.tones_heard_by_agent() == 3


async def test_the_agent_asks_for_a_field_again(agent_env: IvrEnv, tokenizer: Any) -> None:
    asked = False

    async def restart_card(stub: Any, capture_id: str, event: pb.CaptureEvent) -> None:
        nonlocal asked
        if event.field == pb.CAPTURE_FIELD_EXPIRATION_DATE and not asked:
            asked = True
            await stub.RestartCaptureField(pb.RestartCaptureFieldRequest(
                capture_id=capture_id, field=pb.CAPTURE_FIELD_CARD_NUMBER))

    script = PaymentScript({"payment-card-number": [PAN, "5555555555554444"],
                            "expiration-date": ["1230", "1230"]},
                           key_delays={"expiration-date": 1.0})
    call, events, final = await capture(agent_env, tokenizer, script, during=restart_card)
    assert final.state == pb.CAPTURE_STATE_COMPLETED
    assert final.card.last4 == "4444"  # the card keyed the second time
    card_attempts = [e.attempt for e in events
                     if e.field == pb.CAPTURE_FIELD_CARD_NUMBER and e.field_outcome == "valid"]
    assert card_attempts == [1, 2]
    assert_safe(call, events, PAN, "5555555555554444")


async def test_a_tokenizer_outage_fails_the_capture_and_resumes_recording(
    make_ivr: Callable[..., Any], tokenizer: Any
) -> None:
    import grpc

    dead = grpc.aio.insecure_channel("127.0.0.1:9")  # the IVR's tokenizer is unreachable
    try:
        env = await make_ivr(channel=dead, connector_credentials=CREDENTIALS,
                             tokenizer_timeout=0.5)
        env.sim.payments.connectors["vaultline"] = ConnectorConfig(
            PUBLIC + "/pay/connector", CREDENTIALS.username, CREDENTIALS.password)
        call, events, final = await capture(env, tokenizer, PaymentScript.card(PAN, "1230"))
    finally:
        await dead.close()
    assert final.state == pb.CAPTURE_STATE_FAILED
    assert final.failure_reason == "connector-error:tokenizer-unavailable"
    assert call.recording == "in-progress"
    [payment] = env.sim.payments.payments.values()
    assert payment.connector_attempts == 3  # Twilio retried, same transaction_id
    assert_safe(call, events, PAN)


async def test_a_status_callback_without_twilios_signature_is_refused(
    agent_env: IvrEnv, tokenizer: Any
) -> None:
    slow = PaymentScript.card(PAN, "1230")
    slow.key_delays["payment-card-number"] = 1.0  # still keying when the forgeries arrive
    call = agent_env.sim.agent_call(slow)
    started = (await tokenizer.capture_as("crm/crm-1").StartCapture(pb.StartCaptureRequest(
        call_sid=call.sid, agent_id="agent-7", request_id=unique_name("req", 12)))).capture
    url = f"{PUBLIC}/pay/status/{started.capture_id}"
    forged = {"AccountSid": agent_env.sim.account_sid, "CallSid": call.sid,
              "Result": "success", "PaymentToken": "tok_" + "F" * 22}
    status, _ = await agent_env.sim.post(url, forged, signature="bm90IGEgc2lnbmF0dXJl")
    assert status == 403
    status, _ = await agent_env.sim.post(url, forged, signature="")
    assert status == 403
    got = await tokenizer.capture_as("crm/crm-1").GetCapture(
        pb.GetCaptureRequest(capture_id=started.capture_id))
    assert got.capture.state != pb.CAPTURE_STATE_COMPLETED
    stub = tokenizer.capture_as("crm/crm-1")
    await stub.CancelCapture(pb.CancelCaptureRequest(capture_id=started.capture_id))
    async for response in stub.WatchCapture(pb.WatchCaptureRequest(
            capture_id=started.capture_id)):  # until the IVR has cancelled it
        last = response.event
    assert last.state == pb.CAPTURE_STATE_CANCELLED


async def test_a_card_type_the_tenant_does_not_accept_is_keyed_again(
    make_ivr: Callable[..., Any], tokenizer: Any
) -> None:
    env = await make_ivr(connector_credentials=CREDENTIALS, card_types={"default": "visa"})
    env.sim.payments.connectors["vaultline"] = ConnectorConfig(
        PUBLIC + "/pay/connector", CREDENTIALS.username, CREDENTIALS.password)
    script = PaymentScript({"payment-card-number": ["5555555555554444", PAN],
                            "expiration-date": ["1230"]})
    call, events, final = await capture(env, tokenizer, script)
    assert final.state == pb.CAPTURE_STATE_COMPLETED and final.card.last4 == "1111"
    outcomes = [(e.field, e.field_outcome) for e in events if e.field_outcome]
    assert outcomes[:2] == [(pb.CAPTURE_FIELD_CARD_NUMBER, "invalid-card-type"),
                            (pb.CAPTURE_FIELD_CARD_NUMBER, "valid")]
    created = [f for _, path, f in env.sim.rest_requests if path.endswith("/Payments.json")]
    assert created[-1]["ValidCardTypes"] == "visa"
    assert_safe(call, events, PAN, "5555555555554444")


async def test_a_hang_up_between_prompts_ends_the_capture(
    agent_env: IvrEnv, tokenizer: Any
) -> None:
    """No Payment callback reports it: Twilio's call status callback does."""
    hung = False

    async def hang_up_while_keying_expiry(stub: Any, capture_id: str,
                                          event: pb.CaptureEvent) -> None:
        nonlocal hung
        if event.field == pb.CAPTURE_FIELD_EXPIRATION_DATE and event.digits_entered and not hung:
            hung = True
            call = next(c for c in agent_env.sim.calls.values() if c.agent is not None)
            await agent_env.sim.hang_up(call, PUBLIC + "/voice/status")

    slow = PaymentScript.card(PAN, "1230")
    slow.key_delays["expiration-date"] = 1.0
    call, events, final = await capture(agent_env, tokenizer, slow,
                                        during=hang_up_while_keying_expiry)
    assert (final.state, final.failure_reason) == (pb.CAPTURE_STATE_FAILED, "caller-hung-up")
    assert not final.card.token
    assert_safe(call, events, PAN)
