"""Panel sign-in links and session cookies (pure): exact HMAC strings, expiry, tampering."""

from __future__ import annotations

import hashlib
import hmac
from urllib.parse import parse_qsl

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vaultline.panel.links import (
    MAX_LINK_SECONDS,
    LinkRefused,
    PanelKeys,
    request_id_for,
    sign_link,
)

SECRET = b"a-shared-secret-of-at-least-32-bytes!!"
CALL = "CA" + "0123456789abcdef" * 2
NOW = 1_800_000_000


def query(**over: str) -> dict[str, str]:
    q = dict(parse_qsl(sign_link(SECRET, CALL, "A123", "default", NOW + 120)))
    q.update(over)
    return q


def test_the_signature_is_the_documented_hmac() -> None:
    q = query()
    message = f"call={CALL}&agent=A123&tenant=default&exp={NOW + 120}".encode()
    assert q["sig"] == hmac.new(SECRET, message, hashlib.sha256).hexdigest()
    session = PanelKeys(SECRET).admit_link(q, NOW)
    assert (session.call, session.agent, session.tenant, session.capture) == (
        CALL, "A123", "default", "")


@pytest.mark.parametrize(("over", "now"), [
    ({"sig": "0" * 64}, NOW),  # forged
    ({"agent": "A124"}, NOW),  # a value changed after signing
    ({}, NOW + 120),  # expired (exp is exclusive)
    ({"extra": "1"}, NOW),  # an unexpected parameter
    ({"sig": "ABC"}, NOW),  # malformed
])
def test_bad_links_are_refused(over: dict[str, str], now: int) -> None:
    with pytest.raises(LinkRefused):
        PanelKeys(SECRET).admit_link(query(**over), now)


def test_a_link_may_not_live_long() -> None:
    q = dict(parse_qsl(sign_link(SECRET, CALL, "A1", "default", NOW + MAX_LINK_SECONDS + 1)))
    with pytest.raises(LinkRefused, match="too far"):
        PanelKeys(SECRET).admit_link(q, NOW)


@pytest.mark.parametrize(("call", "agent", "tenant"), [
    ("CA123", "A1", "default"), (CALL, "4111111111111111", "default"),
    (CALL, "agent one", "default"), (CALL, "A1", "Default"),
])
def test_malformed_fields_are_refused_even_when_signed(call: str, agent: str, tenant: str
                                                       ) -> None:
    q = dict(parse_qsl(sign_link(SECRET, call, agent, tenant, NOW + 60)))
    with pytest.raises(LinkRefused):
        PanelKeys(SECRET).admit_link(q, NOW)


def test_the_session_cookie_round_trips_and_cannot_be_changed() -> None:
    keys = PanelKeys(SECRET)
    session = keys.admit_link(query(), NOW).with_capture("cap_" + "ab" * 10)
    cookie = keys.cookie(session)
    assert keys.session(cookie, NOW) == session
    body, mac = cookie.rsplit(".", 1)
    for forged in (body + "x." + mac, body + "." + "0" * 64, "", "no-dot"):
        with pytest.raises(LinkRefused):
            keys.session(forged, NOW)
    with pytest.raises(LinkRefused, match="expired"):
        keys.session(cookie, session.exp)
    # Another secret's panel does not accept it.
    with pytest.raises(LinkRefused):
        PanelKeys(b"another-secret-of-at-least-32-bytes!!!").session(cookie, NOW)


def test_csrf_tokens_are_per_session() -> None:
    keys = PanelKeys(SECRET)
    one, two = keys.admit_link(query(), NOW), keys.admit_link(query(), NOW)
    assert keys.csrf_ok(one, keys.csrf_token(one))
    assert not keys.csrf_ok(one, keys.csrf_token(two)) and not keys.csrf_ok(one, "")
    assert SECRET.decode() not in keys.csrf_token(one) + keys.cookie(one) + repr(keys)


def test_a_short_secret_is_refused() -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        PanelKeys(b"short")


@given(st.text(max_size=80), st.text(max_size=80))
def test_request_ids_never_hold_a_digit_run(a: str, b: str) -> None:
    rid = request_id_for("panel-", a, b)
    assert rid.startswith("panel-") and not any(c.isdigit() and c not in "234567"
                                                 for c in rid[6:])
    assert request_id_for("panel-", a, b) == rid
