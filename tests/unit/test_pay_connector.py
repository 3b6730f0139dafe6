"""The Generic Pay Connector protocol (pure) and its Basic-auth check."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest

from vaultline.ivr.connector import ConnectorCredentials
from vaultline.ivr.pay_connector import ConnectorRefusal, answer, parse_request


def body(**fields: object) -> bytes:
    doc = {"method": "tokenize", "transaction_id": "t1", "cardnumber": "4111111111111111",
           "cvv": "123", "expiry_month": "08", "expiry_year": "27", "postal_code": "94111"}
    doc.update(fields)
    return json.dumps(doc).encode()


def test_a_tokenize_request_parses_into_a_card_whose_repr_hides_it() -> None:
    card = parse_request(body())
    assert (card.pan, card.expiry, card.security_code, card.postal_code) == (
        "4111111111111111", "0827", "123", "94111")
    assert "4111" not in repr(card) and "123" not in repr(card)
    # Some senders send numbers where Twilio sends strings: the same card.
    assert parse_request(body(cardnumber=4111111111111111, cvv=123)).pan == "4111111111111111"


@pytest.mark.parametrize(("month", "year", "expiry"), [
    ("8", "2027", "0827"), (8, 27, "0827"), ("12", "2099", "1299"), ("01", "00", "0100"),
])
def test_expiry_in_two_or_four_digits_strings_or_numbers(month: object, year: object,
                                                        expiry: str) -> None:
    assert parse_request(body(expiry_month=month, expiry_year=year)).expiry == expiry


@pytest.mark.parametrize(("fields", "code"), [
    ({"method": "charge"}, "charge-not-supported"),
    ({"method": None}, "unsupported-method"),
    ({"transaction_id": "x" * 300}, "missing-transaction-id"),
    ({"transaction_id": "a\nb"}, "missing-transaction-id"),
    ({"cardnumber": "4111 1111 1111 111x"}, "invalid-card-number"),
    ({"expiry_month": "0"}, "invalid-expiry"),
    ({"expiry_year": "1999"}, "invalid-expiry"),
    ({"expiry_month": "１２"}, "invalid-expiry"),  # full-width digits
    ({"cvv": "12345"}, "invalid-security-code"),
    ({"postal_code": "9" * 13}, "invalid-postal-code"),
    ({"parameters": {"vaultline_tenant": "Not A Tenant"}}, "unknown-tenant"),
    ({"parameters": {"vaultline_tenant": ""}}, "unknown-tenant"),
])
def test_bad_fields_are_refused_with_their_code(fields: dict[str, object], code: str) -> None:
    with pytest.raises(ConnectorRefusal) as refused:
        parse_request(body(**fields))
    assert refused.value.code == code
    assert "4111" not in refused.value.message


def test_the_answer_always_carries_token_id() -> None:
    assert json.loads(answer("tok_x")) == {"token_id": "tok_x", "error_code": None,
                                           "error_message": None, "parameters": {}}
    refused = json.loads(answer(refusal=ConnectorRefusal("invalid-expiry", "bad")))
    assert refused["token_id"] == "" and refused["error_code"] == "invalid-expiry"


def test_credentials_file_and_basic_auth(tmp_path: Path) -> None:
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"username": "twilio", "password": "p" * 20}))
    creds = ConnectorCredentials.from_file(path)
    assert "p" * 20 not in repr(creds)
    good = "Basic " + base64.b64encode(b"twilio:" + b"p" * 20).decode()
    assert creds.admits(good)
    assert not creds.admits(good.lower().replace("basic", "bearer"))
    assert not creds.admits("Basic " + base64.b64encode(b"twilio" + b"p" * 20).decode())
    path.write_text(json.dumps({"username": "twilio", "password": "short"}))
    with pytest.raises(ValueError, match="16"):
        ConnectorCredentials.from_file(path)
    path.write_text("not json")
    with pytest.raises(ValueError, match="not a pay connector credentials file"):
        ConnectorCredentials.from_file(path)


def test_a_self_service_pay_names_its_tenant_in_a_parameter() -> None:
    assert parse_request(body(parameters={"vaultline_tenant": "acme-1"})).tenant == "acme-1"
    assert parse_request(body(parameters={"other": "x"})).tenant == ""
    assert parse_request(body()).tenant == ""
