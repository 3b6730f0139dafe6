"""Panel sign-in links and sessions, pure: HMAC-SHA-256 over exact strings, no I/O.

A CRM opens the agent panel with a link it signs with the secret it shares with the panel:

    /panel?call=CA…&agent=A123&tenant=default&exp=1767225600&sig=<hex>

`sig` is the lowercase hex HMAC-SHA-256, keyed with the secret (the secret file's text,
surrounding whitespace stripped, UTF-8), of `call=<call>&agent=<agent>&tenant=<tenant>&exp=<exp>`
with the values as they appear in the URL. A link is good until `exp`, which may be at most
`MAX_LINK_SECONDS` ahead (a link is a bearer credential: it must not live long).

The session that a good link opens is a cookie the panel signs with a key derived from the same
secret (never the secret itself): `base64url(json).hex-hmac`, bound to the call, agent and
tenant, with its own expiry and a CSRF token derived from it. Nothing in it is secret from the
agent, and nothing in it can be changed without the key.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import secrets
from dataclasses import dataclass, replace
from typing import Final
from urllib.parse import quote

__all__ = [
    "MAX_LINK_SECONDS",
    "SESSION_SECONDS",
    "LinkRefused",
    "PanelKeys",
    "PanelSession",
    "link_message",
    "request_id_for",
    "sign_link",
]

MAX_LINK_SECONDS: Final = 15 * 60
SESSION_SECONDS: Final = 4 * 60 * 60  # a long call, and its wrap-up
_CALL: Final = re.compile(r"CA[0-9a-f]{32}\Z")
# An opaque label for the audit trail: letters, digits and `.`, `_`, `~`, `-` (characters a
# URL carries as they are, so the signed text and the URL's text are the same), no digit run.
_AGENT: Final = re.compile(r"[A-Za-z0-9._~-]{1,64}\Z")
_DIGIT_RUN: Final = re.compile(r"[0-9]{12,}")
_TENANT: Final = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}\Z")
_HEX64: Final = re.compile(r"[0-9a-f]{64}\Z")
_CAPTURE: Final = re.compile(r"(cap_[0-9a-f]{20})?\Z")


class LinkRefused(ValueError):
    """A link or session that does not admit; the reason is for the log, never the page."""


def request_id_for(prefix: str, *parts: str) -> str:
    """A StartCapture request id derived from `parts` (a retry of the same start is the same
    request), in letters and 2-7 only: hex or a call SID could hold the 12-digit run that
    request ids refuse."""
    digest = hashlib.sha256("\x00".join(parts).encode()).digest()
    return prefix + base64.b32encode(digest).decode().lower().rstrip("=")[:24]


def link_message(call: str, agent: str, tenant: str, exp: str) -> bytes:
    return f"call={call}&agent={agent}&tenant={tenant}&exp={exp}".encode()


def sign_link(secret: bytes, call: str, agent: str, tenant: str, exp: int) -> str:
    """The query string of a panel link (what `vaultline panel link` prints after /panel?)."""
    sig = hmac.new(secret, link_message(call, agent, tenant, str(exp)), hashlib.sha256)
    return (f"call={quote(call)}&agent={quote(agent)}&tenant={quote(tenant)}&exp={exp}"
            f"&sig={sig.hexdigest()}")


@dataclass(frozen=True, slots=True)
class PanelSession:
    call: str
    agent: str
    tenant: str
    exp: int  # Unix time the session ends
    nonce: str  # random per sign-in: one CSRF token per session
    capture: str = ""  # the capture this session started, once it has

    def with_capture(self, capture_id: str) -> PanelSession:
        return replace(self, capture=capture_id)


class PanelKeys:
    """Checks links, and signs and checks session cookies and CSRF tokens."""

    def __init__(self, secret: bytes) -> None:
        if len(secret) < 32:
            raise ValueError("the panel link secret must be at least 32 bytes")
        self._secret = secret
        # Derived keys: a leaked session cookie or CSRF token says nothing about the secret.
        self._session_key = hmac.new(secret, b"vaultline-panel/session", hashlib.sha256).digest()
        self._csrf_key = hmac.new(secret, b"vaultline-panel/csrf", hashlib.sha256).digest()

    def __repr__(self) -> str:
        return "PanelKeys(<hidden>)"

    def admit_link(self, query: dict[str, str], now: int) -> PanelSession:
        """The session a good link opens; LinkRefused otherwise."""
        call, agent = query.get("call", ""), query.get("agent", "")
        tenant, exp_raw, sig = query.get("tenant", ""), query.get("exp", ""), query.get("sig", "")
        if set(query) != {"call", "agent", "tenant", "exp", "sig"}:
            raise LinkRefused("unexpected or missing parameters")
        if not _HEX64.match(sig):
            raise LinkRefused("malformed signature")
        expected = hmac.new(self._secret, link_message(call, agent, tenant, exp_raw),
                            hashlib.sha256).hexdigest()
        if not hmac.compare_digest(expected, sig):
            raise LinkRefused("bad signature")
        if not (exp_raw.isascii() and exp_raw.isdigit() and len(exp_raw) <= 12):
            raise LinkRefused("malformed expiry")
        exp = int(exp_raw)
        if exp <= now:
            raise LinkRefused("expired")
        if exp > now + MAX_LINK_SECONDS:
            raise LinkRefused("expiry too far ahead")
        if not _CALL.match(call) or not _TENANT.match(tenant) or not _AGENT.match(agent) \
                or _DIGIT_RUN.search(agent):
            raise LinkRefused("malformed call, agent or tenant")
        return PanelSession(call, agent, tenant, now + SESSION_SECONDS, secrets.token_hex(16))

    def cookie(self, session: PanelSession) -> str:
        body = base64.urlsafe_b64encode(json.dumps(
            [session.call, session.agent, session.tenant, session.exp, session.nonce,
             session.capture], separators=(",", ":")).encode()).decode().rstrip("=")
        mac = hmac.new(self._session_key, body.encode(), hashlib.sha256).hexdigest()
        return f"{body}.{mac}"

    def session(self, cookie: str, now: int) -> PanelSession:
        """The session a cookie carries; LinkRefused when missing, forged or expired."""
        body, _, mac = cookie.rpartition(".")
        if not body or len(cookie) > 1024 or not _HEX64.match(mac):
            raise LinkRefused("no session")
        expected = hmac.new(self._session_key, body.encode(), hashlib.sha256).hexdigest()
        if not hmac.compare_digest(expected, mac):
            raise LinkRefused("forged session")
        try:
            call, agent, tenant, exp, nonce, capture = json.loads(
                base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
        except (ValueError, TypeError):
            raise LinkRefused("malformed session") from None
        if not isinstance(exp, int) or exp <= now:
            raise LinkRefused("session expired")
        if not isinstance(capture, str) or not _CAPTURE.match(capture):
            raise LinkRefused("malformed session")
        return PanelSession(str(call), str(agent), str(tenant), exp, str(nonce), capture)

    def csrf_token(self, session: PanelSession) -> str:
        return hmac.new(self._csrf_key, session.nonce.encode(), hashlib.sha256).hexdigest()

    def csrf_ok(self, session: PanelSession, token: str) -> bool:
        return hmac.compare_digest(self.csrf_token(session), token)
