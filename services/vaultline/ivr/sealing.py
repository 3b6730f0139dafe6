"""Interim card fields sealed for PostgreSQL: AES-256-GCM under a per-call key.

Pure. The per-call key is HKDF-SHA-256(session secret, salt, info=call SID): every webhook
replica holding the secret derives the same key, so any replica can serve any request of a
call, while the database only ever holds ciphertext and never the key or the secret. The
secret lives with the webhook service (a 0600 file under `.vaultline/dev/` in the dev stack,
a secret manager in production); rotating it only affects captures in flight (at most 15
minutes). The ciphertext is bound to the flow, call SID and session id through associated
data, so a row swapped onto another session does not open.
"""

from __future__ import annotations

import hashlib
import hmac
import json

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from ..crypto import KEY_BYTES, OpenFailed, SealingKey, associated_data
from .interpreter import Secrets

__all__ = ["OpenFailed", "SessionSealer"]

_SALT = b"vaultline-ivr-session-v1"
_AD_VERSION = 1
_KEY_ID = 1  # version of the session secret; a rotation would bump it


class SessionSealer:
    def __init__(self, secret: bytes) -> None:
        if not isinstance(secret, bytes) or len(secret) < KEY_BYTES:
            raise ValueError("the IVR session secret must be at least 32 bytes")
        self._secret = secret

    def __repr__(self) -> str:
        return "SessionSealer(<hidden>)"

    def request_id(self, session_id: str, seq: int) -> str:
        """The Tokenize request id of a capture step: the same on every replica (a retry gets
        the first token), unguessable without the session secret, and unrelated to anything
        the CRM sees (the session id reaches it in the capture event)."""
        return self._request_id(f"tokenize-request:{session_id}:{seq}")

    def connector_request_id(self, transaction_id: str) -> str:
        """The Tokenize request id of a Pay Connector transaction: Twilio's retry (same
        `transaction_id`) gets the first token; the transaction id itself is never stored."""
        return self._request_id("pay-connector:" + transaction_id)

    def _request_id(self, label: str) -> str:
        mac = hmac.new(self._secret, label.encode("utf-8"), hashlib.sha256)
        return "ivr_" + mac.hexdigest()[:32]

    def _key(self, call_sid: str) -> SealingKey:
        hkdf = HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=_SALT,
                    info=b"ivr-session:" + call_sid.encode("ascii"))
        return SealingKey(_KEY_ID, hkdf.derive(self._secret))

    @staticmethod
    def _aad(flow: str, call_sid: str, session_id: str) -> bytes:
        return associated_data(_AD_VERSION, flow, f"{call_sid}/{session_id}", _KEY_ID)

    def seal(self, flow: str, call_sid: str, session_id: str, secrets: Secrets) -> bytes | None:
        """The sealed fields, or None when there is nothing to keep."""
        if not secrets:
            return None
        plaintext = json.dumps(secrets.to_dict(), separators=(",", ":")).encode("ascii")
        return self._key(call_sid).seal(plaintext, self._aad(flow, call_sid, session_id))

    def open(self, flow: str, call_sid: str, session_id: str, blob: bytes | None) -> Secrets:
        if blob is None:
            return Secrets()
        plaintext = self._key(call_sid).open(blob, self._aad(flow, call_sid, session_id))
        try:
            fields = json.loads(plaintext)
            return Secrets(**{k: str(fields[k]) for k in ("pan", "expiry", "security_code",
                                                           "postal_code")})
        except (ValueError, KeyError, TypeError):
            raise OpenFailed() from None
