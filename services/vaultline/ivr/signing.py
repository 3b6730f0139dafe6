"""`Vaultline-Signature` for CRM callbacks: HMAC-SHA-256 over "timestamp.body", Stripe-style.

Pure. Header: ``Vaultline-Signature: t=<unix seconds>,v1=<hex digest>``; the receiver checks
the digest in constant time and refuses timestamps outside a tolerance (replays).
"""

from __future__ import annotations

import hashlib
import hmac

__all__ = ["HEADER", "SignatureError", "sign", "verify"]

HEADER = "Vaultline-Signature"
DEFAULT_TOLERANCE = 300


class SignatureError(ValueError):
    """A callback signature is missing, malformed, wrong or too old."""


def _digest(secret: bytes, timestamp: int, body: bytes) -> str:
    return hmac.new(secret, str(timestamp).encode() + b"." + body, hashlib.sha256).hexdigest()


def sign(secret: bytes, body: bytes, timestamp: int) -> str:
    """The header value for `body` sent at `timestamp`."""
    return f"t={timestamp},v1={_digest(secret, timestamp, body)}"


def verify(secret: bytes, header: str | None, body: bytes, *, now: int,
           tolerance: int = DEFAULT_TOLERANCE) -> int:
    """Check a header; returns its timestamp or raises SignatureError."""
    if not header:
        raise SignatureError("missing signature")
    timestamp: int | None = None
    candidates: list[str] = []
    for part in header.split(","):
        key, _, value = part.strip().partition("=")
        if key == "t" and value.isdigit():
            timestamp = int(value)
        elif key == "v1":
            candidates.append(value)
    if timestamp is None or not candidates:
        raise SignatureError("malformed signature header")
    if abs(now - timestamp) > tolerance:
        raise SignatureError("signature timestamp outside the tolerance")
    expected = _digest(secret, timestamp, body)
    if not any(hmac.compare_digest(expected, c) for c in candidates):
        raise SignatureError("signature does not match")
    return timestamp
