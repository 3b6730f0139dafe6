"""`POST /pay/connector`: Vaultline as Twilio's Generic Pay Connector endpoint.

Twilio's `<Pay>` and agent-assisted Payments hand the card they captured to this endpoint;
it tokenizes it over mTLS as the `ivr` identity, inside the card data zone, and answers the
token. The protocol is `pay_connector` (pure); this module is the HTTP edge:

- HTTP Basic auth against the connector's credentials (a JSON file `{"username", "password"}`),
  compared in constant time; wrong or missing → 401 with no detail.
- The body is read up to 16 KiB and parsed as JSON whatever its Content-Type.
- `transaction_id` is the idempotency key: the Tokenize request id is an HMAC of it under the
  IVR's secret, so Twilio's retry gets the first token and creates nothing.
- Every answer is a chained audit record (`ivr/pay-connector/tokenize`, the token, the outcome
  code; never the transaction id in clear, never a card field). A tokenizer outage is a 503
  with `error_code` set, so Twilio retries; every other refusal is a 200 with `error_code`.
- The security code Twilio sends goes to Tokenize with the card: the tokenizer holds it
  sealed until the payment service redeems it once (RedeemSecurityCode), or it expires.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import hmac
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from aiohttp import web

from ..security.audit import AuditEvent, AuditWriter
from .interpreter import Secrets
from .pay_connector import (
    BAD_SECURITY_CODE,
    MAX_BODY_BYTES,
    UNKNOWN_TENANT,
    ConnectorRefusal,
    answer,
    parse_request,
)
from .sealing import SessionSealer
from .tokenizer import IvrTokenizer, TokenizeRefused, TokenizerUnavailable

__all__ = ["ConnectorCredentials", "PayConnector"]

log = logging.getLogger("vaultline.ivr.connector")

METHOD: Final = "ivr/pay-connector/tokenize"
# The tokenizer's refusal reasons, as the connector's error codes.
_REFUSED: Final = {
    "INVALID_PAN": ("invalid-card-number", "the card number is not valid"),
    "UNKNOWN_BRAND": ("invalid-card-type", "the card type is not accepted"),
    "INVALID_EXPIRY": ("invalid-expiry", "the expiry month or year is not valid"),
    "EXPIRED_CARD": ("card-expired", "the card has expired"),
    "INVALID_SECURITY_CODE": BAD_SECURITY_CODE,
    "REQUEST_ID_REUSED": ("transaction-reused",
                          "this transaction_id was already used for another card"),
}
_UNAVAILABLE: Final = ("tokenizer-unavailable", "the card vault is unavailable; retry")
_FAILED: Final = ("tokenize-failed", "the card could not be tokenized")


@dataclass(frozen=True)
class ConnectorCredentials:
    username: str
    password: str = field(repr=False)

    @classmethod
    def from_file(cls, path: Path) -> ConnectorCredentials:
        """`{"username": …, "password": …}`; the message names the file, never its content."""
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
            username, password = doc["username"], doc["password"]
        except (OSError, ValueError, KeyError, TypeError):
            raise ValueError(f"{path}: not a pay connector credentials file") from None
        if not (isinstance(username, str) and isinstance(password, str) and username
                and len(password) >= 16):
            raise ValueError(f"{path}: username and a password of 16+ characters required")
        return cls(username, password)

    def admits(self, authorization: str) -> bool:
        """Whether an `Authorization: Basic …` header carries these credentials."""
        scheme, _, encoded = authorization.partition(" ")
        if scheme.lower() != "basic":
            return False
        try:
            user, sep, password = base64.b64decode(encoded.strip(), validate=True).decode(
                "utf-8").partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return False
        # Both compared, always, in constant time.
        user_ok = hmac.compare_digest(user.encode(), self.username.encode())
        password_ok = hmac.compare_digest(password.encode(), self.password.encode())
        return bool(sep) and user_ok and password_ok


class PayConnector:
    def __init__(self, credentials: ConnectorCredentials | None, tokenizer: IvrTokenizer,
                 sealer: SessionSealer, *, tenant: str = "default",
                 token_format: str = "opaque",  # noqa: S107 - a format name
                 pay_tenants: frozenset[str] = frozenset()) -> None:
        """`tenant`: where cards go unless a self-service <Pay> names one of `pay_tenants`
        (the tenants of this IVR's `mode: pay` flows) in its `vaultline_tenant` parameter."""
        self._credentials = credentials
        self._tokenizer = tokenizer
        self._sealer = sealer
        self._tenant = tenant
        self._tenants = pay_tenants | {tenant}
        self._format = token_format
        self.audit: AuditWriter | None = None  # set when the service starts
        self.audit_identity = "spiffe://vaultline/ivr/ivr-webhook"

    async def handle(self, request: web.Request) -> web.Response:
        if self._credentials is None or not self._credentials.admits(
                request.headers.get("Authorization", "")):
            log.warning("pay connector: unauthorised request remote=%s", request.remote)
            return web.Response(status=401, headers={"WWW-Authenticate": 'Basic realm="pay"'})
        body = await request.content.read(MAX_BODY_BYTES + 1)
        try:
            card = parse_request(body)
        except ConnectorRefusal as malformed:
            log.info("pay connector refused a request: %s", malformed.code)
            await self._record("", malformed.code)
            return _json(answer(refusal=malformed))
        tenant = card.tenant or self._tenant
        if tenant not in self._tenants:
            log.warning("pay connector refused a tenant it does not serve")
            await self._record("", UNKNOWN_TENANT[0])
            return _json(answer(refusal=ConnectorRefusal(*UNKNOWN_TENANT)))
        request_id = self._sealer.connector_request_id(card.transaction_id)
        try:
            result = await self._tokenizer.tokenize(
                tenant,
                Secrets(pan=card.pan, expiry=card.expiry, security_code=card.security_code),
                self._format, request_id)
        except TokenizeRefused as exc:
            refusal = ConnectorRefusal(*_REFUSED.get(exc.reason, _FAILED))
            await self._record(request_id, refusal.code, tenant=tenant)
            return _json(answer(refusal=refusal))
        except TokenizerUnavailable as exc:
            log.warning("pay connector: tokenizer unavailable (%s)", exc.code)
            await self._record(request_id, _UNAVAILABLE[0], tenant=tenant)
            return _json(answer(refusal=ConnectorRefusal(*_UNAVAILABLE)), status=503)
        await self._record(request_id, "OK", token=result.token, tenant=tenant)
        return _json(answer(result.token))

    async def _record(self, request_id: str, outcome: str, *, token: str = "",
                      tenant: str = "") -> None:
        """A chained audit record of the answer, durable before Twilio gets it."""
        if self.audit is None:
            return
        await self.audit.record([AuditEvent(
            identity=self.audit_identity, role="ivr", tenant=tenant or self._tenant,
            method=METHOD,
            outcome=outcome, request_id=request_id, peer="twilio-pay-connector", token=token,
            at=dt.datetime.now(dt.UTC))])


def _json(body: bytes, status: int = 200) -> web.Response:
    return web.Response(body=body, status=status, content_type="application/json")
