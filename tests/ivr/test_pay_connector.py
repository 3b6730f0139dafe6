"""The Generic Pay Connector endpoint over real HTTP, into the real tokenizer (issue 15):
HTTP Basic, Twilio's JSON, `transaction_id` as the idempotency key, clear error codes that
never echo card data, and a chained audit record of every answer."""

from __future__ import annotations

import base64
import json
import logging
from collections.abc import Callable
from typing import Any

import aiohttp
import grpc
import pytest

from tests.fixtures.infra import PostgresHandle
from tests.ivr.conftest import IvrEnv
from vaultline.gen.tokenization.v1 import tokenization_pb2 as pb
from vaultline.ivr.connector import METHOD, ConnectorCredentials
from vaultline.store import Store

PAN = "5555555555554444"
CREDENTIALS = ConnectorCredentials("twilio", "connector-password-for-tests")


def auth(user: str = CREDENTIALS.username, password: str = CREDENTIALS.password) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def card(transaction_id: str, **fields: Any) -> dict[str, Any]:
    body = {"method": "tokenize", "transaction_id": transaction_id, "cardnumber": PAN,
            "cvv": "123", "expiry_month": "08", "expiry_year": "31", "postal_code": "94111",
            "description": "agent-assisted", "parameters": {}}
    body.update(fields)
    return body


@pytest.fixture
async def connector(make_ivr: Callable[..., Any]) -> IvrEnv:
    return await make_ivr(connector_credentials=CREDENTIALS, connector_tenant="demo")


async def post(env: IvrEnv, body: Any, *, authorization: str | None = None,
               raw: bytes | None = None, content_type: str = "application/json"
               ) -> tuple[int, dict[str, Any] | None, str]:
    headers = {"Content-Type": content_type}
    headers["Authorization"] = auth() if authorization is None else authorization
    data = raw if raw is not None else json.dumps(body).encode()
    async with aiohttp.ClientSession() as http, http.post(
            f"{env.ivr.address}/pay/connector", data=data, headers=headers) as response:
        text = await response.text()
        parsed = json.loads(text) if response.content_type == "application/json" else None
        return response.status, parsed, text


async def test_the_security_code_is_held_for_the_payment_service_to_redeem_once(
    connector: IvrEnv, tokenizer: Any,
) -> None:
    """Twilio's `cvv` is not stored with the card: the tokenizer holds it sealed until the
    payment service redeems it, once (PCI DSS 3.3.2)."""
    status, answer, text = await post(connector, card("PKconnector-cvv-1", cvv="739"))
    assert status == 200 and answer is not None and answer["error_code"] is None, text
    redeem = tokenizer.as_("payments/payments-1").RedeemSecurityCode
    request = pb.RedeemSecurityCodeRequest(tenant="demo", token=answer["token_id"])
    assert (await redeem(request)).security_code == "739"
    with pytest.raises(grpc.aio.AioRpcError) as again:
        await redeem(request)
    assert again.value.code() == grpc.StatusCode.NOT_FOUND
    # An American Express card's code has four digits; three is refused, and creates nothing.
    status, amex, _ = await post(connector, card(
        "PKconnector-cvv-2", cardnumber="378282246310005", cvv="739"))
    assert (status, amex and amex["error_code"], amex and amex["token_id"]) == (
        200, "invalid-security-code", "")


async def test_a_card_becomes_a_token_and_a_retry_gets_the_same_one(
    connector: IvrEnv, tokenizer: Any, migrated: PostgresHandle,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    status, answer, text = await post(connector, card("PKconnector-success-1"))
    assert status == 200 and answer is not None, text
    assert answer["error_code"] is None and answer["error_message"] is None
    token = answer["token_id"]
    assert token.startswith("tok_")
    got = await tokenizer.stub.GetToken(pb.GetTokenRequest(tenant="demo", token=token))
    assert (got.token.last4, got.token.expiry_month, got.token.expiry_year) == ("4444", 8, 2031)

    # Twilio's retry: the same transaction_id answers the same token.
    status, again, _ = await post(connector, card("PKconnector-success-1", expiry_year="2031"))
    assert (status, again and again["token_id"]) == (200, token)
    # The same transaction_id with another card is refused, and creates nothing.
    status, reused, _ = await post(connector, card("PKconnector-success-1",
                                                   cardnumber="4111111111111111"))
    assert (status, reused and reused["error_code"]) == (200, "transaction-reused")
    assert reused is not None and reused["token_id"] == ""

    # Every answer is a chained audit record; none holds the transaction id or a card field.
    auditor = await Store.connect(migrated.auditor_dsn, min_size=1, max_size=1)
    try:
        records = [r for r in await auditor.recent_audit(500) if r["method"] == METHOD]
    finally:
        await auditor.close()
    mine = records[-3:]
    outcomes = [(r["outcome"], r["token"]) for r in mine]
    assert outcomes == [("OK", token), ("OK", token), ("transaction-reused", "")]
    for r in mine:
        assert "PKconnector" not in r["request_id"] and r["tenant"] == "demo"
    for secret in (PAN, "4111111111111111", "94111"):
        assert secret not in caplog.text
        assert all(secret not in str(dict(r)) for r in mine)


@pytest.mark.parametrize("authorization", [
    "", "Basic " + base64.b64encode(b"twilio:wrong-password-entirely").decode(),
    auth(user="someone"), "Bearer abc", "Basic !!!notbase64", auth(password=""),
])
async def test_wrong_or_missing_credentials_get_a_bare_401(
    connector: IvrEnv, authorization: str
) -> None:
    status, answer, text = await post(connector, card("PKauth"), authorization=authorization)
    assert (status, answer, text) == (401, None, "")


async def test_an_unconfigured_connector_refuses_everyone(make_ivr: Callable[..., Any]) -> None:
    env = await make_ivr()  # no credentials file
    status, _, text = await post(env, card("PKnone"))
    assert (status, text) == (401, "")


@pytest.mark.parametrize(("body", "raw", "code"), [
    (card("PKcharge", method="charge", amount="10.00", currency_code="usd"), None,
     "charge-not-supported"),
    (card("PKodd", method="refund"), None, "unsupported-method"),
    (None, b"{not json", "malformed-request"),
    (None, b"[1, 2]", "malformed-request"),
    (None, b"x" * 20_000, "malformed-request"),
    (card(""), None, "missing-transaction-id"),
    (card("PKshort", cardnumber="4111"), None, "invalid-card-number"),
    (card("PKluhn", cardnumber="4111111111111112"), None, "invalid-card-number"),
    (card("PKmonth", expiry_month="13"), None, "invalid-expiry"),
    (card("PKyear", expiry_year="3"), None, "invalid-expiry"),
    (card("PKexpired", expiry_year="19"), None, "card-expired"),
    (card("PKcvv", cvv="12a"), None, "invalid-security-code"),
    (card("PKzip", postal_code="<script>"), None, "invalid-postal-code"),
    # A tenant that neither the connector nor any of this IVR's <Pay> flows serves.
    (card("PKtenant", parameters={"vaultline_tenant": "tenant-a"}), None, "unknown-tenant"),
])
async def test_every_bad_request_gets_a_clear_code_that_echoes_nothing(
    connector: IvrEnv, body: Any, raw: bytes | None, code: str
) -> None:
    status, answer, text = await post(connector, body, raw=raw)
    assert status == 200 and answer is not None, text
    assert (answer["token_id"], answer["error_code"]) == ("", code)
    assert answer["error_message"]
    for secret in ("4111", "5555555555554444", "12a", "<script>", "PK"):
        assert secret not in text


async def test_the_body_is_json_whatever_the_content_type(connector: IvrEnv) -> None:
    status, answer, _ = await post(connector, card("PKplain"), content_type="text/plain")
    assert status == 200 and answer is not None and answer["token_id"].startswith("tok_")


async def test_a_tokenizer_outage_is_a_503_twilio_retries(
    make_ivr: Callable[..., Any]
) -> None:
    dead = grpc.aio.insecure_channel("127.0.0.1:9")  # nothing listens there
    try:
        env = await make_ivr(channel=dead, connector_credentials=CREDENTIALS,
                             tokenizer_timeout=0.5)
        status, answer, text = await post(env, card("PKdown"))
    finally:
        await dead.close()
    assert status == 503 and answer is not None, text
    assert (answer["token_id"], answer["error_code"]) == ("", "tokenizer-unavailable")
    assert PAN not in text
