"""Twilio's Generic Pay Connector protocol: the JSON request Twilio posts, and the answer.

Pure: bytes in, values out. Twilio posts one JSON object per card (`method`, `transaction_id`,
`cardnumber`, `cvv`, `expiry_month`, `expiry_year` in 2 or 4 digits, `postal_code`,
`parameters`, …) with HTTP Basic auth, whatever its Content-Type header says, and expects
`{"token_id", "error_code", "error_message"}` back; a non-null `error_code` reaches the call
as `ConnectorError`. Every refusal is a fixed code and phrase that never echoes a value.

`transaction_id` is Twilio's idempotency key (it retries with the same one); the webhook
derives the Tokenize request id from it under its own secret, so it is never stored.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any, Final

__all__ = [
    "MAX_BODY_BYTES",
    "ConnectorRefusal",
    "ConnectorTokenize",
    "answer",
    "parse_request",
]

MAX_BODY_BYTES: Final = 16 * 1024
_MAX_TRANSACTION_ID: Final = 256


class ConnectorRefusal(Exception):
    """An `error_code` and `error_message` for Twilio; neither ever holds request data."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


MALFORMED: Final = ("malformed-request", "the request is not a Generic Pay Connector JSON object")
CHARGE: Final = ("charge-not-supported",
                 "this connector tokenizes only; charge through the payment processor")
UNKNOWN_METHOD: Final = ("unsupported-method", "method must be tokenize")
NO_TRANSACTION: Final = ("missing-transaction-id",
                         "transaction_id is required: it makes a retry safe")
BAD_CARD: Final = ("invalid-card-number", "the card number is not valid")
BAD_EXPIRY: Final = ("invalid-expiry", "the expiry month or year is not valid")
BAD_SECURITY_CODE: Final = ("invalid-security-code",
                             "the security code must be 3 digits (4 for American Express)")
BAD_POSTAL_CODE: Final = ("invalid-postal-code", "the postal code is not valid")
UNKNOWN_TENANT: Final = ("unknown-tenant", "this connector does not serve that tenant")
TENANT_PARAMETER: Final = "vaultline_tenant"
_TENANT: Final = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}\Z")


@dataclass(frozen=True, slots=True)
class ConnectorTokenize:
    """One card to tokenize. The repr shows no card field."""

    transaction_id: str = field(repr=False)
    pan: str = field(repr=False)
    expiry: str = field(repr=False)  # MMYY
    security_code: str = field(repr=False, default="")
    postal_code: str = field(repr=False, default="")
    # The tenant a self-service <Pay> asked for (its `vaultline_tenant` <Parameter>), or "".
    tenant: str = ""

    def __repr__(self) -> str:
        return "ConnectorTokenize(<card fields hidden>)"


def _text(doc: dict[str, Any], key: str) -> str:
    """A field as text: Twilio sends strings, some senders numbers; anything else is absent."""
    value = doc.get(key)
    if isinstance(value, bool) or value is None:
        return ""
    if isinstance(value, int):
        return str(value)
    return value.strip() if isinstance(value, str) else ""


def _expiry(month_raw: str, year_raw: str) -> str:
    if not (month_raw.isascii() and month_raw.isdigit() and year_raw.isascii()
            and year_raw.isdigit()):
        raise ConnectorRefusal(*BAD_EXPIRY)
    month = int(month_raw)
    if not 1 <= month <= 12 or len(month_raw) > 2:
        raise ConnectorRefusal(*BAD_EXPIRY)
    if len(year_raw) == 4 and year_raw.startswith("20"):
        year_raw = year_raw[2:]
    if len(year_raw) != 2:
        raise ConnectorRefusal(*BAD_EXPIRY)
    return f"{month:02d}{year_raw}"


def parse_request(body: bytes) -> ConnectorTokenize:
    """The card of a tokenize request; raises ConnectorRefusal for anything else."""
    if len(body) > MAX_BODY_BYTES:
        raise ConnectorRefusal(*MALFORMED)
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise ConnectorRefusal(*MALFORMED) from None
    if not isinstance(doc, dict):
        raise ConnectorRefusal(*MALFORMED)
    method = _text(doc, "method").lower()
    if method == "charge":
        raise ConnectorRefusal(*CHARGE)
    if method != "tokenize":
        raise ConnectorRefusal(*UNKNOWN_METHOD)
    transaction_id = _text(doc, "transaction_id")
    if not transaction_id or len(transaction_id) > _MAX_TRANSACTION_ID \
            or not transaction_id.isprintable():
        raise ConnectorRefusal(*NO_TRANSACTION)
    pan = _text(doc, "cardnumber").replace(" ", "").replace("-", "")
    if not (pan.isascii() and pan.isdigit() and 12 <= len(pan) <= 19):
        raise ConnectorRefusal(*BAD_CARD)
    expiry = _expiry(_text(doc, "expiry_month"), _text(doc, "expiry_year"))
    security_code = _text(doc, "cvv")
    if security_code and not (security_code.isascii() and security_code.isdigit()
                              and 3 <= len(security_code) <= 4):
        raise ConnectorRefusal(*BAD_SECURITY_CODE)
    postal_code = _text(doc, "postal_code")
    if len(postal_code) > 12 or not all(c.isascii() and (c.isalnum() or c in " -")
                                        for c in postal_code):
        raise ConnectorRefusal(*BAD_POSTAL_CODE)
    parameters = doc.get("parameters")
    tenant = ""
    if isinstance(parameters, dict) and TENANT_PARAMETER in parameters:
        tenant = _text(parameters, TENANT_PARAMETER)
        if not _TENANT.match(tenant):
            raise ConnectorRefusal(*UNKNOWN_TENANT)
    return ConnectorTokenize(transaction_id, pan, expiry, security_code, postal_code, tenant)


def answer(token_id: str = "", refusal: ConnectorRefusal | None = None) -> bytes:
    """The JSON answer: `token_id` always present (empty on errors), as Twilio requires."""
    return json.dumps({
        "token_id": token_id,
        "error_code": refusal.code if refusal else None,
        "error_message": refusal.message if refusal else None,
        "parameters": {},
    }).encode()
