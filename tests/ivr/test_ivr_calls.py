"""Simulated calls end to end: simulator -> webhook -> tokenizer -> CRM callback receiver."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import asyncpg
import grpc
import pytest

from tests.fixtures.infra import PostgresHandle
from tests.ivr.conftest import IvrEnv
from vaultline.gen.tokenization.v1 import tokenization_pb2 as tpb
from vaultline.store import Store
from vaultline.twilio_sim import Delay, HangUp, Press, SimCall, Timeout, WaitForRedirect, sign

pytestmark = pytest.mark.integration

VISA = "4111111111111111"
AMEX = "378282246310005"


def card_script(pan: str = VISA, expiry: str = "1230", cvv: str = "123") -> list[Any]:
    return [Press(pan + "#"), Press(expiry), Press(cvv), Press("1", sensitive=False)]


def assert_paused_for_card_digits(call: SimCall) -> None:
    presses = [e for e in call.timeline if e.kind == "pressed" and e.sensitive]
    assert presses, "the script pressed card digits"
    assert call.sensitive_presses_while_recording() == []
    assert all(e.recording == "paused" for e in presses)


async def test_success_tokenizes_and_notifies_crm(env: IvrEnv, caplog: Any) -> None:
    caplog.set_level(logging.DEBUG)
    call = await env.call("card_capture", card_script())
    heard = call.heard()
    assert any("Visa card ending in 1 1 1 1" in h for h in heard)
    assert heard[-1].startswith("Thank you. Your card has been saved")
    assert call.ended_by == "twiml"
    assert_paused_for_card_digits(call)
    # paused with skip before the first card prompt, resumed before the read-back
    rec = [d for _, d in call.recording_timeline()]
    assert rec == ["in-progress", "paused (skip)", "in-progress"]
    first_card_prompt = next(e.t for e in call.timeline if e.kind == "heard"
                             and "card number" in e.detail)
    paused_at = next(t for t, d in call.recording_timeline() if d.startswith("paused"))
    assert paused_at <= first_card_prompt
    # the CRM got one signed event with the token and masked data only
    assert len(env.crm.events) == 1
    event = env.crm.events[0]
    data = event["data"]
    assert event["type"] == "ivr.capture.completed" and event["id"].startswith("evt_")
    assert data["outcome"] == "success" and data["brand"] == "VISA" and data["last4"] == "1111"
    # The token's expiry: the vault keeps the newest one seen for a card in the tenant, and
    # other tests tokenize this test card in "default" too, some with a later year.
    assert (data["expiry_year"], data["expiry_month"]) >= (2030, 12)
    assert data["call_sid"] == call.sid and data["flow"] == "card_capture"
    token = data["token"]
    assert token and token != VISA and token.endswith("1111")
    # the session row keeps the result and no card data
    [row] = await env.sessions(call.sid)
    assert row.outcome == "success" and row.token == token and row.sealed is None
    assert row.ended_at is not None
    # no PAN in any TwiML, CRM body or log line
    for blob in call.responses + [b.decode() for b in env.crm.bodies] + [caplog.text]:
        assert VISA not in blob and "411111111111" not in blob
    # the REST requests Vaultline made are Twilio's documented ones
    paths = [(p, f) for _, p, f in env.sim.rest_requests if f"/Calls/{call.sid}" in p]
    assert paths[0][0].endswith(f"/Calls/{call.sid}/Recordings/Twilio.CURRENT.json")
    assert paths[0][1] == {"Status": "paused", "PauseBehavior": "skip"}
    assert paths[1][1] == {"Status": "in-progress"}


async def test_same_card_same_token_and_amex_cvv(env: IvrEnv, tokenizer: Any) -> None:
    first = await env.call("card_capture", card_script())
    second = await env.call("card_capture", card_script())
    tokens = [e["data"]["token"] for e in env.crm.events]
    assert tokens[0] == tokens[1] and first.sid != second.sid
    amex = await env.call("card_capture", card_script(AMEX, cvv="1234"))
    event = env.crm.events[-1]
    assert event["data"]["brand"] == "AMEX"
    assert_paused_for_card_digits(amex)
    # The keyed security code is held for the payment service, once, never in the CRM event.
    assert "security_code" not in event["data"] and "1234" not in event["data"].values()
    redeemed = await tokenizer.as_("payments/payments-1").RedeemSecurityCode(
        tpb.RedeemSecurityCodeRequest(token=event["data"]["token"]))
    assert redeemed.security_code == "1234"


@pytest.mark.parametrize("script, reprompt", [
    ([Press("4111111111111112#")], "That card number is not valid"),  # Luhn
    ([Press("411111111111#")], "That card number is not valid"),  # length
    ([Press("9999999999999995#")], "we do not accept that type of card"),  # brand
    ([Press("6759649826438453#")], "we do not accept that type of card"),  # Maestro refused
    ([Press(VISA + "#"), Press("0120")], "card has expired"),  # past expiry
    ([Press(VISA + "#"), Press("1330")], "expiry date is not valid"),  # month 13
    ([Press(VISA + "#"), Press("1230"), Press("12#")], "security code is not valid"),
    ([Timeout()], "we did not receive your card number"),
])
async def test_each_validation_failure_reprompts(env: IvrEnv, script: list[Any],
                                                 reprompt: str) -> None:
    call = await env.call("card_capture", script + [HangUp()])
    assert any(reprompt in h for h in call.heard()), call.transcript()
    if any(isinstance(s, Press) for s in script):
        assert_paused_for_card_digits(call)
    [row] = await env.sessions(call.sid)
    assert row.outcome == "caller-hung-up" and row.sealed is None


async def test_star_re_enters(env: IvrEnv) -> None:
    script = [Press("4111*"), Press(VISA + "#"), Press("1230"), Press("123"),
              Press("*", sensitive=False), Press("5555555555554444#"), Press("1230"),
              Press("123"), Press("1", sensitive=False)]
    call = await env.call("card_capture", script)
    assert call.heard().count("Let's start that entry again.") == 2
    assert env.crm.events[-1]["data"]["last4"] == "4444"
    # Paused once, through both entries and both read-backs (every key, `*` included).
    rec = [d for _, d in call.recording_timeline()]
    assert rec == ["in-progress", "paused (skip)", "in-progress"]
    assert_paused_for_card_digits(call)
    assert all(e.recording == "paused" for e in call.timeline if e.kind == "pressed")


async def test_too_many_attempts_redirects_to_agent_queue(env: IvrEnv) -> None:
    call = await env.call("card_capture", [Press("4111111111111112#")] * 3)
    heard = call.heard()
    assert "We could not take your card details" in heard[-2]
    assert heard[-1] == "Please hold for the next available agent."
    assert call.events("enqueue")[0].detail == "support"
    assert call.recording_timeline()[-1][1] == "in-progress"
    [row] = await env.sessions(call.sid)
    assert row.outcome == "too-many-failed-attempts" and row.token is None
    assert env.crm.events[-1]["data"]["outcome"] == "too-many-failed-attempts"


async def test_timeouts_exhaust_attempts(env: IvrEnv) -> None:
    call = await env.call("card_capture", [Timeout(), Timeout(), Timeout()])
    assert call.heard().count("Sorry, we did not receive your card number.") == 2
    [row] = await env.sessions(call.sid)
    assert row.outcome == "too-many-failed-attempts"


async def test_hang_up_mid_card_erases(env: IvrEnv) -> None:
    call = await env.call("card_capture", [Press(VISA + "#"), HangUp()])
    assert call.events("status-callback")
    [row] = await env.sessions(call.sid)
    assert row.outcome == "caller-hung-up" and row.sealed is None and row.token is None
    assert env.crm.events[-1]["data"]["outcome"] == "caller-hung-up"


async def test_session_timeout_erases(make_ivr: Any) -> None:
    import datetime as dt

    env = await make_ivr(session_ttl=dt.timedelta(seconds=1))
    call = await env.call("card_capture", [Press(VISA + "#"), Delay(1.5), Press("1230")])
    assert any("could not take your card" in h for h in call.heard())
    [row] = await env.sessions(call.sid)
    assert row.outcome == "session-timeout" and row.sealed is None


async def test_sweeper_erases_abandoned_sessions(make_ivr: Any) -> None:
    import datetime as dt

    env = await make_ivr(session_ttl=dt.timedelta(seconds=1))
    # hangs up but the status callback never arrives (no status_callback configured)
    call = await env.sim.call(env.url("/voice/card_capture"), [Press(VISA + "#"), HangUp()])
    [row] = await env.sessions(call.sid)
    assert row.sealed is not None and row.ended_at is None
    await asyncio.sleep(1.2)
    assert await env.ivr.service.store.end_expired_sessions() >= 1
    [row] = await env.sessions(call.sid)
    assert row.sealed is None and row.outcome == "session-timeout"


async def test_tokenizer_down(make_ivr: Any) -> None:
    dead = grpc.aio.insecure_channel("127.0.0.1:9")  # nothing listens on discard
    try:
        env = await make_ivr(channel=dead)
        call = await env.call("card_capture", card_script())
    finally:
        await dead.close()
    heard = call.heard()
    assert "Sorry, we are having a technical problem and could not save your card." in heard
    [row] = await env.sessions(call.sid)
    assert row.outcome == "tokenizer-error" and row.token is None and row.sealed is None


async def test_crm_retries_then_succeeds_with_one_event_id(env: IvrEnv) -> None:
    env.crm.fail_with = [503, 500]
    await env.call("card_capture", card_script())
    assert env.crm.attempts == 3 and len(env.crm.events) == 1


async def test_crm_down_apologises(env: IvrEnv) -> None:
    env.crm.always_fail = True
    call = await env.call("card_capture", card_script())
    assert env.crm.attempts == env.config.crm_attempts
    assert any("technical problem" in h for h in call.heard())
    [row] = await env.sessions(call.sid)
    assert row.outcome == "crm-error" and row.sealed is None


async def test_recording_pause_failure_asks_for_nothing(env: IvrEnv) -> None:
    env.sim.recording_fault = 500
    call = await env.call("card_capture", card_script())
    assert not any("card number" in h for h in call.heard())
    assert not call.events("pressed")
    [row] = await env.sessions(call.sid)
    assert row.outcome == "recording-pause-failed"


async def test_a_404_pausing_an_active_recording_asks_for_nothing(env: IvrEnv) -> None:
    # Issue 14: any 404 from the pause was taken for "no recording", and the card was asked
    # for with the recording running. Now the IVR asks Twilio, which lists it as active.
    env.sim.recording_fault = 404
    call = await env.call("card_capture", card_script())
    assert not any("card number" in h for h in call.heard())
    assert not call.events("pressed")
    assert not call.sensitive_presses_while_recording()
    [row] = await env.sessions(call.sid)
    assert row.outcome == "recording-pause-failed"


async def test_unrecorded_call_still_captures(env: IvrEnv) -> None:
    call = await env.call("card_capture", card_script(), record=False)
    assert env.crm.events[-1]["data"]["outcome"] == "success"
    assert call.recording_timeline() == []


async def test_bad_and_missing_signature_are_403_without_twiml(env: IvrEnv,
                                                               caplog: Any) -> None:
    call = env.sim.new_call()
    params = env.sim.call_params(call)
    url = env.url("/voice/card_capture")
    status, body = await env.sim.post(url, params, signature="bm90IGEgc2lnbmF0dXJl")
    assert (status, body) == (403, "")
    status, body = await env.sim.post(url, params, signature="")
    assert (status, body) == (403, "")
    # signed for another URL (the listener's own address instead of the public one)
    status, _ = await env.sim.post(url, params, signature=sign(
        env.sim.auth_token, env.ivr.address + "/voice/card_capture", params.items()))
    assert status == 403
    assert "twilio signature rejected" in caplog.text
    assert await env.sessions(call.sid) == []


async def test_port_variant_of_public_url_is_accepted(env: IvrEnv) -> None:
    call = env.sim.new_call()
    params = env.sim.call_params(call)
    signature = sign(env.sim.auth_token, "https://ivr.vaultline.test:443/voice/card_capture",
                     params.items())
    status, body = await env.sim.post(env.url("/voice/card_capture"), params,
                                      signature=signature)
    assert status == 200 and "<Gather" in body


async def test_replayed_webhooks_are_refused(env: IvrEnv) -> None:
    call = env.sim.new_call()
    params = env.sim.call_params(call)
    start = env.url("/voice/card_capture")
    status, body = await env.sim.post(start, params)
    assert status == 200
    assert (await env.sim.post(start, params))[0] == 409  # replayed incoming call
    gather = {**params, "Digits": VISA, "FinishedOnKey": "#"}
    first_input = env.url("/voice/card_capture/input?seq=0")
    status, body = await env.sim.post(first_input, gather)
    assert status == 200 and 'numDigits="4"' in body
    [before] = await env.sessions(call.sid)
    assert (await env.sim.post(first_input, gather))[0] == 409  # replayed card number
    [after] = await env.sessions(call.sid)
    assert after.version == before.version and after.state == before.state


async def test_agent_handoff_out_of_conference_and_back(env: IvrEnv) -> None:
    from vaultline.ivr.twilio_rest import TwilioRest

    call = env.sim.new_call()
    in_conference = "<Response><Dial><Conference>room-42</Conference></Dial></Response>"
    script = [WaitForRedirect(10), Press(VISA + "#"), Press("1230"), Press("123"),
              Press("94111#"), Press("1", sensitive=False), WaitForRedirect(0.2)]
    running = asyncio.create_task(env.sim.run(call, None, script, twiml=in_conference,
                                              status_callback=env.url("/voice/status")))
    await asyncio.sleep(0.1)
    rest = TwilioRest(env.sim.account_sid, env.sim.auth_token, env.sim.rest_base_url)
    try:
        await rest.redirect_call(call.sid, env.url("/voice/agent_handoff?conference=room-42"))
    finally:
        await rest.close()
    await asyncio.wait_for(running, 20)
    assert [e.detail for e in call.events("conference")] == ["room-42", "room-42"]
    assert env.crm.events[-1]["data"]["flow"] == "agent_handoff"
    assert env.crm.events[-1]["data"]["outcome"] == "success"
    assert_paused_for_card_digits(call)


async def test_no_pan_in_session_rows(env: IvrEnv, superuser_db: str) -> None:
    await env.call("card_capture", [Press(VISA + "#"), Press("1230"), HangUp()])
    await env.call("card_capture", card_script())
    conn = await asyncpg.connect(superuser_db)
    try:
        rows = await conn.fetch("SELECT * FROM ivr_sessions")
    finally:
        await conn.close()
    for r in rows:
        for key, value in dict(r).items():
            blob = value if isinstance(value, bytes) else str(value).encode()
            assert VISA.encode() not in blob, key


async def test_the_capture_is_in_the_chained_audit_trail(
    env: IvrEnv, migrated: PostgresHandle
) -> None:
    # Issue 14: the IVR's capture events were log lines only; now each is a chained audit
    # record, durable before the call goes on, naming the token (never a card number).
    call = await env.call("card_capture", card_script())
    [row] = await env.sessions(call.sid)
    # Read back as the auditor: the IVR's own role appends records but cannot read them.
    auditor = await Store.connect(migrated.auditor_dsn, min_size=1, max_size=1)
    try:
        records = await auditor.recent_audit(200)
    finally:
        await auditor.close()
    mine = [(r["method"].rsplit("/", 1)[-1], r["outcome"], r["token"], r["role"], r["peer"])
            for r in records if r["request_id"] == row.id]
    token = env.crm.events[-1]["data"]["token"]
    # The flow resumes the recording before reading the last four back, and tokenizes once
    # the caller confirms them.
    assert mine == [
        ("capture.started", "OK", "", "ivr", call.sid),
        ("recording.paused", "OK", "", "ivr", call.sid),
        ("recording.resumed", "OK", "", "ivr", call.sid),
        ("capture.tokenize", "OK", token, "ivr", call.sid),
        ("capture.ended", "success", "", "ivr", call.sid),
    ]
    assert all(r["identity"] == "spiffe://vaultline/ivr/ivr-webhook" for r in records
               if r["request_id"] == row.id)
