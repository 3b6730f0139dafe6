"""Self-service flows on Twilio's <Pay> (`mode: pay`, issue 15) end to end: the simulator
runs the <Pay> TwiML, keys the card into Twilio's capture, calls the Pay Connector, and posts
the action; the webhook gets the token and never a card number. Recording is paused over every
card digit; the security code is held for the payment service."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import grpc
import pytest

from tests.ivr.conftest import PUBLIC, IvrEnv
from tests.ivr.test_ivr_calls import assert_paused_for_card_digits
from vaultline.gen.tokenization.v1 import tokenization_pb2 as pb
from vaultline.ivr.connector import ConnectorCredentials
from vaultline.twilio_sim import HangUp, Press, SimCall, Timeout
from vaultline.twilio_sim.payments import ConnectorConfig

pytestmark = pytest.mark.integration

FLOW = "card_capture_pay"
VISA = "4111111111111111"
AMEX = "378282246310005"
CREDENTIALS = ConnectorCredentials("twilio", "connector-password-for-pay-flows")


def card(pan: str = VISA, expiry: str = "1230", cvv: str = "739") -> list[Any]:
    return [Press(pan + "#"), Press(expiry), Press(cvv)]


@pytest.fixture
async def env(make_ivr: Callable[..., Any]) -> IvrEnv:
    env: IvrEnv = await make_ivr(connector_credentials=CREDENTIALS)
    env.sim.payments.connectors["vaultline"] = ConnectorConfig(
        PUBLIC + "/pay/connector", CREDENTIALS.username, CREDENTIALS.password)
    return env


def pay_actions(call: SimCall) -> list[str]:
    return [e.detail for e in call.timeline if e.kind == "webhook" and "/pay?" in e.detail]


def assert_no_card_number(call: SimCall, env: IvrEnv, *extra: str, pan: str = VISA) -> None:
    for blob in [*call.responses, *(b.decode() for b in env.crm.bodies), *extra]:
        assert pan not in blob and pan[:12] not in blob


async def test_a_card_taken_by_pay_becomes_a_token_the_webhook_never_saw(
    env: IvrEnv, tokenizer: Any, caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    call = await env.call(FLOW, card())
    assert call.heard()[-1].startswith("Thank you. Your card has been saved")
    assert len(pay_actions(call)) == 1
    # The CRM gets the token the connector issued (opaque: the connector's format), with what
    # GetToken shows of the card.
    (event,) = env.crm.events
    data = event["data"]
    assert (data["outcome"], data["brand"], data["last4"], data["flow"]) == (
        "success", "VISA", "1111", FLOW)
    assert data["token"].startswith("tok_")
    # The TwiML was a <Pay> naming the connector: Twilio, not the webhook, took the digits.
    pay_twiml = next(r for r in call.responses if "<Pay " in r)
    assert 'paymentConnector="vaultline"' in pay_twiml and "<Gather" not in pay_twiml
    [payment] = env.sim.payments.payments.values()
    assert payment.status == "complete" and payment.connector_attempts == 1
    assert_paused_for_card_digits(call)
    statuses = [s for _, s in call.recording_timeline()]
    assert statuses[:2] == ["in-progress", "paused (skip)"] and statuses[-1] == "in-progress"
    assert_no_card_number(call, env, caplog.text)
    # The security code went with the card to the vault, held for the payment service.
    redeemed = await tokenizer.as_("payments/payments-1").RedeemSecurityCode(
        pb.RedeemSecurityCodeRequest(token=data["token"]))
    assert redeemed.security_code == "739"
    [row] = await env.sessions(call.sid)
    assert row.outcome == "success" and row.token == data["token"] and row.sealed is None


async def test_an_invalid_entry_is_reprompted_by_pay_with_the_flows_words(env: IvrEnv) -> None:
    call = await env.call(FLOW, [Press("4111111111111112#"), Timeout(), *card(AMEX, cvv="0739")])
    heard = call.heard()
    assert any("That card number is not valid" in h for h in heard)
    assert any("did not receive your card number" in h for h in heard)
    (event,) = env.crm.events
    assert event["data"]["outcome"] == "success" and event["data"]["brand"] == "AMEX"
    assert_paused_for_card_digits(call)


async def test_too_many_failed_attempts_fail_politely(env: IvrEnv) -> None:
    call = await env.call(FLOW, [Press(VISA + "#"), Press("1399"), Press("0120"),
                                 Press("1330")])
    (event,) = env.crm.events
    assert event["data"]["outcome"] == "too-many-failed-attempts" and not event["data"]["token"]
    assert any("could not take your card details" in h for h in call.heard())
    assert any("expiry date is not valid" in h for h in call.heard())
    assert call.recording == "in-progress"  # resumed before the call went on
    assert_paused_for_card_digits(call)
    assert env.sim.payments.payments and all(
        p.connector_attempts == 0 for p in env.sim.payments.payments.values())


async def test_star_starts_the_card_again(env: IvrEnv) -> None:
    call = await env.call(FLOW, [Press("4111*"), *card()])
    assert any("Let's start again" in h for h in call.heard())
    assert len(pay_actions(call)) == 2
    assert env.crm.events[-1]["data"]["outcome"] == "success"
    assert_paused_for_card_digits(call)


async def test_a_hang_up_during_pay_ends_the_capture(env: IvrEnv) -> None:
    call = await env.call(FLOW, [Press(VISA + "#"), HangUp()])
    (event,) = env.crm.events
    assert event["data"]["outcome"] == "caller-hung-up"
    [row] = await env.sessions(call.sid)
    assert row.outcome == "caller-hung-up" and row.sealed is None
    assert_paused_for_card_digits(call)


async def test_a_vault_outage_fails_the_capture_and_resumes_recording(
    make_ivr: Callable[..., Any],
) -> None:
    dead = grpc.aio.insecure_channel("127.0.0.1:9")  # nothing listens there
    try:
        env: IvrEnv = await make_ivr(channel=dead, connector_credentials=CREDENTIALS)
        env.sim.payments.connectors["vaultline"] = ConnectorConfig(
            PUBLIC + "/pay/connector", CREDENTIALS.username, CREDENTIALS.password)
        call = await env.call(FLOW, card())
    finally:
        await dead.close()
    (event,) = env.crm.events
    assert event["data"]["outcome"] == "tokenizer-error"
    [payment] = env.sim.payments.payments.values()
    assert payment.connector_attempts == 3  # 503: Twilio retried, same transaction id
    assert any("technical problem" in h for h in call.heard())
    assert call.recording == "in-progress"
    assert_paused_for_card_digits(call)


async def test_the_connector_tokenizes_into_the_pay_flows_tenant(
    make_ivr: Callable[..., Any], tokenizer: Any,
) -> None:
    """The connector's own tenant is `demo`; the flow's <Pay> names `default`, one of the
    tenants of this IVR's pay flows, and the card goes there."""
    env: IvrEnv = await make_ivr(connector_credentials=CREDENTIALS, connector_tenant="demo")
    env.sim.payments.connectors["vaultline"] = ConnectorConfig(
        PUBLIC + "/pay/connector", CREDENTIALS.username, CREDENTIALS.password)
    await env.call(FLOW, card())
    token = env.crm.events[-1]["data"]["token"]
    got = await tokenizer.stub.GetToken(pb.GetTokenRequest(tenant="default", token=token))
    assert got.token.last4 == "1111"
    with pytest.raises(grpc.aio.AioRpcError) as other:
        await tokenizer.stub.GetToken(pb.GetTokenRequest(tenant="demo", token=token))
    assert other.value.code() == grpc.StatusCode.NOT_FOUND


async def test_a_replayed_pay_action_is_refused(env: IvrEnv) -> None:
    call = await env.call(FLOW, card())
    (url,) = [d.split(" ")[1] for d in pay_actions(call)]
    params = {**env.sim.call_params(call), "Result": "success",
              "PaymentToken": env.crm.events[-1]["data"]["token"]}
    status, _ = await env.sim.post(url, params)
    assert status == 409
