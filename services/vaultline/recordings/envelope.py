"""Twilio's recording encryption envelope, pure: `EncryptionDetails` parsed and checked, and the
media opened with its content key. AES-256-GCM, 96-bit IV, the 16-byte tag appended, no
associated data (as Twilio encrypts). Errors never carry key bytes.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from dataclasses import dataclass, field
from typing import Final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

__all__ = ["RECORDING_SID", "EncryptionDetails", "EnvelopeError", "MediaMismatch",
           "MediaTampered",
           "certification_message", "open_media", "parse_encryption_details",
           "vault_ciphertext"]

_KEY_SID: Final = re.compile(r"CR[0-9a-f]{32}\Z")
RECORDING_SID: Final = re.compile(r"RE[0-9a-f]{32}\Z")  # Twilio's recording SIDs
_WRAPPED: Final = re.compile(r"vault:v[1-9][0-9]{0,5}:[A-Za-z0-9+/=]{16,2048}\Z")


class EnvelopeError(ValueError):
    """EncryptionDetails that cannot be used."""


class MediaTampered(EnvelopeError):
    """The media did not authenticate under its content key: altered, truncated or swapped."""

    def __init__(self) -> None:
        super().__init__("the recording failed its integrity check (AES-GCM): it was altered, "
                         "truncated, or belongs to another recording")


class MediaMismatch(MediaTampered):
    """The media is not the one the vault stored (its SHA-256 differs)."""

    def __init__(self) -> None:
        EnvelopeError.__init__(self, "the recording is not the one stored (its SHA-256 "
                                     "differs): it was altered or truncated")


@dataclass(frozen=True, slots=True)
class EncryptionDetails:
    public_key_sid: str
    encrypted_cek: str = field(repr=False)  # base64 RSA-OAEP ciphertext
    iv: bytes = field(repr=False)


def parse_encryption_details(text: str) -> EncryptionDetails:
    """The JSON Twilio sends (extra keys ignored); EnvelopeError when unusable."""
    try:
        doc = json.loads(text)
    except ValueError:
        raise EnvelopeError("EncryptionDetails is not JSON") from None
    if not isinstance(doc, dict):
        raise EnvelopeError("EncryptionDetails is not a JSON object")
    key_sid, cek, iv_text = doc.get("public_key_sid"), doc.get("encrypted_cek"), doc.get("iv")
    if not (isinstance(key_sid, str) and _KEY_SID.match(key_sid)):
        raise EnvelopeError("EncryptionDetails.public_key_sid is not a CR… sid")
    if not isinstance(cek, str) or not isinstance(iv_text, str):
        raise EnvelopeError("EncryptionDetails lacks encrypted_cek or iv")
    try:
        wrapped = base64.b64decode(cek, validate=True)
        iv = base64.b64decode(iv_text, validate=True)
    except (binascii.Error, ValueError):
        raise EnvelopeError("EncryptionDetails fields are not base64") from None
    if not 256 <= len(wrapped) <= 1024 or len(iv) != 12:
        raise EnvelopeError("EncryptionDetails: unexpected key or IV length")
    return EncryptionDetails(key_sid, cek, iv)


def vault_ciphertext(encrypted_cek: str, version: int) -> str:
    """The wrapped content key as OpenBao transit takes it for decryption."""
    wrapped = f"vault:v{version}:{encrypted_cek}"
    if not _WRAPPED.match(wrapped):
        raise EnvelopeError("not a wrapped content key")
    return wrapped


def open_media(cek: bytes, iv: bytes, media: bytes) -> bytes:
    """The plaintext media; MediaTampered if it does not authenticate."""
    if len(cek) != 32 or len(iv) != 12:
        raise EnvelopeError("a content key is 32 bytes and its IV 12")
    try:
        return AESGCM(cek).decrypt(iv, media, None)
    except (InvalidTag, ValueError):
        raise MediaTampered() from None


def certification_message(sid: str, state: str, media_sha256: bytes,
                          tones: list[tuple[float, float]]) -> bytes:
    """What a recording's certification signature covers, canonically (domain-separated:
    it can be no other signed message)."""
    spans = ";".join(f"{start:.2f}-{end:.2f}" for start, end in tones)
    return (b"vaultline-recording-certification\x00v1\x00" + sid.encode() + b"\x00"
            + state.encode() + b"\x00" + media_sha256.hex().encode() + b"\x00"
            + spans.encode())
