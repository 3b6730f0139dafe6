"""Signatures: the simulator's X-Twilio-Signature against twilio's validator and its test
vectors; Vaultline-Signature for CRM callbacks; session sealing; TwiML from the simulator."""

from __future__ import annotations

import os

import pytest
from twilio.request_validator import RequestValidator

from vaultline.crypto import OpenFailed
from vaultline.ivr import signing
from vaultline.ivr.interpreter import Secrets
from vaultline.ivr.sealing import SessionSealer
from vaultline.twilio_sim import sign

# The twilio package's own test vectors (tests/unit/test_request_validator.py).
VECTOR_URL = "https://mycompany.com/myapp.php?foo=1&bar=2"
VECTOR_PARAMS = {"CallSid": "CA1234567890ABCDE", "Caller": "+14158675309", "Digits": "1234",
                 "From": "+14158675309", "To": "+18005551212"}
VECTOR_SIG = "RSOYDt4T1cUTdK1PDd93/VVr8B8="


def test_simulator_signature_matches_twilio_vector() -> None:
    assert sign("12345", VECTOR_URL, VECTOR_PARAMS.items()) == VECTOR_SIG
    validator = RequestValidator("12345")
    assert validator.validate(VECTOR_URL, VECTOR_PARAMS, VECTOR_SIG)


@pytest.mark.parametrize("url", ["https://mycompany.com:443/myapp.php?foo=1&bar=2",
                                 "https://mycompany.com/myapp.php?foo=1&bar=2"])
def test_port_variants_validate_like_twilio(url: str) -> None:
    # Twilio may sign with or without the default port; the validator accepts both.
    assert RequestValidator("12345").validate(url, VECTOR_PARAMS, VECTOR_SIG)


def test_repeated_parameters_sorted_by_value() -> None:
    from multidict import MultiDict

    pairs = [("b", "2"), ("a", "z"), ("a", "y")]
    expected = RequestValidator("tok").compute_signature("https://x/y", MultiDict(pairs))
    assert sign("tok", "https://x/y", pairs) == expected


def test_changed_parameter_fails() -> None:
    sig = sign("secret", "https://ivr/voice/x", [("Digits", "1")])
    assert not RequestValidator("secret").validate("https://ivr/voice/x", {"Digits": "2"}, sig)
    assert not RequestValidator("other").validate("https://ivr/voice/x", {"Digits": "1"}, sig)


def test_crm_signature_roundtrip_and_failures() -> None:
    secret = os.urandom(32)
    body = b'{"id":"evt_1"}'
    header = signing.sign(secret, body, 1_700_000_000)
    assert header.startswith("t=1700000000,v1=")
    assert signing.verify(secret, header, body, now=1_700_000_100) == 1_700_000_000
    with pytest.raises(signing.SignatureError, match="tolerance"):
        signing.verify(secret, header, body, now=1_700_001_000)
    with pytest.raises(signing.SignatureError, match="does not match"):
        signing.verify(secret, header, body + b" ", now=1_700_000_000)
    with pytest.raises(signing.SignatureError, match="missing"):
        signing.verify(secret, None, body, now=0)
    with pytest.raises(signing.SignatureError, match="malformed"):
        signing.verify(secret, "v1=abc", body, now=0)


def test_session_sealing_binds_call_and_session() -> None:
    sealer = SessionSealer(os.urandom(32))
    secrets = Secrets(pan="4111111111111111", expiry="1230")
    blob = sealer.seal("card_capture", "CA" + "1" * 32, "s1", secrets)
    assert blob is not None and b"4111" not in blob
    assert sealer.open("card_capture", "CA" + "1" * 32, "s1", blob) == secrets
    for args in (("card_capture", "CA" + "2" * 32, "s1"), ("card_capture", "CA" + "1" * 32,
                                                            "s2"), ("other", "CA" + "1" * 32,
                                                                    "s1")):
        with pytest.raises(OpenFailed):
            sealer.open(*args, blob)
    # another replica with the same secret opens it; one with another secret does not
    assert SessionSealer(sealer._secret).open("card_capture", "CA" + "1" * 32, "s1", blob)
    with pytest.raises(OpenFailed):
        SessionSealer(os.urandom(32)).open("card_capture", "CA" + "1" * 32, "s1", blob)
    assert sealer.seal("f", "CA" + "1" * 32, "s", Secrets()) is None
    assert sealer.open("f", "CA" + "1" * 32, "s", None) == Secrets()
    assert "hidden" in repr(sealer)
    with pytest.raises(ValueError):
        SessionSealer(b"short")
