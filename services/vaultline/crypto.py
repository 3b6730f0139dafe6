"""Card data cryptography: AES-256-GCM seal/open bound to associated data, keyed PAN fingerprints.

Pure: keys are handed in already unwrapped (see keyring.py); nonces come from the OS CSPRNG.
Errors have fixed messages and never say why an open failed.

    CryptoError     a key or associated-data field is unusable
     └── OpenFailed wrong key, wrong associated data, truncated or tampered ciphertext
"""

from __future__ import annotations

import hmac
import os
import struct
from typing import Any, NoReturn

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

__all__ = [
    "CIPHERTEXT_VERSION",
    "KEY_BYTES",
    "NONCE_BYTES",
    "CryptoError",
    "FingerprintKey",
    "OpenFailed",
    "SealingKey",
    "associated_data",
    "associated_data_for",
    "associated_data_prefix",
    "security_code_associated_data",
]

KEY_BYTES = 32
NONCE_BYTES = 12
TAG_BYTES = 16
CIPHERTEXT_VERSION = 1

_VERSION_PREFIX = bytes([CIPHERTEXT_VERSION])
_BODY_START = 1 + NONCE_BYTES
_MIN_BLOB = _BODY_START + TAG_BYTES


class CryptoError(Exception):
    """A cryptographic operation could not be done. Messages are fixed texts."""


class OpenFailed(CryptoError):
    """A ciphertext did not open; deliberately never says which check failed."""

    def __init__(self) -> None:
        super().__init__("ciphertext could not be opened")


# version (1 byte) | tenant length (2) | tenant | token length (2) | token | key id (8)
_U8_U16 = struct.Struct(">BH")
_U16 = struct.Struct(">H")
_U64 = struct.Struct(">Q")


def associated_data(version: int, tenant: str, token: str, key_id: int) -> bytes:
    """Associated data binding a ciphertext to its format version, row and data key.

    Every variable field is length-prefixed, so no two argument tuples encode alike and a
    ciphertext moved to another row, tenant or key id fails to open.
    """
    return associated_data_for(associated_data_prefix(version, tenant), token, key_id)


def associated_data_prefix(version: int, tenant: str) -> bytes:
    """The leading part of `associated_data`, the same for every row of one tenant: bulk
    paths compute it once per chunk and finish each row's with `associated_data_for`."""
    t = tenant.encode("utf-8")
    try:
        return _U8_U16.pack(version, len(t)) + t
    except struct.error:
        raise CryptoError("associated data field out of range") from None


def associated_data_for(prefix: bytes, token: str, key_id: int) -> bytes:
    """`associated_data` of one row, from its tenant's `associated_data_prefix`."""
    k = token.encode("utf-8")
    try:
        return prefix + _U16.pack(len(k)) + k + _U64.pack(key_id)
    except struct.error:
        raise CryptoError("associated data field out of range") from None


_SECURITY_CODE_DOMAIN = b"vaultline/security-code\x00"


def security_code_associated_data(tenant: str, token: str, key_id: int) -> bytes:
    """Associated data of a held security code: its token's row fields behind a domain label
    (card data's starts with its version byte, 1, never with the label), so a security code
    never opens as a card, nor a card as a security code, nor either under another token."""
    return _SECURITY_CODE_DOMAIN + associated_data(CIPHERTEXT_VERSION, tenant, token, key_id)


class SealingKey:
    """A 256-bit AES-GCM data key with its id; keeps the AESGCM object."""

    __slots__ = ("_key_id", "_aead")
    _key_id: int
    _aead: AESGCM

    def __init__(self, key_id: int, key: bytes) -> None:
        if not isinstance(key, bytes | bytearray) or len(key) != KEY_BYTES:
            raise CryptoError("a data key must be 32 bytes")
        if type(key_id) is not int or key_id < 0:
            raise CryptoError("a data key id must be a non-negative integer")
        # The raw key is not kept here; only the AESGCM object holds it.
        object.__setattr__(self, "_key_id", key_id)
        object.__setattr__(self, "_aead", AESGCM(bytes(key)))

    @property
    def key_id(self) -> int:
        return self._key_id

    def seal(self, plaintext: bytes, aad: bytes) -> bytes:
        """Version byte, 96-bit random nonce, then ciphertext and tag."""
        nonce = os.urandom(NONCE_BYTES)
        return _VERSION_PREFIX + nonce + self._aead.encrypt(nonce, plaintext, aad)

    def open(self, blob: bytes, aad: bytes) -> bytes:
        """The plaintext of a `seal` result, or OpenFailed."""
        if len(blob) < _MIN_BLOB or blob[0] != CIPHERTEXT_VERSION:
            raise OpenFailed()
        try:
            return self._aead.decrypt(blob[1:_BODY_START], blob[_BODY_START:], aad)
        except (InvalidTag, ValueError):
            raise OpenFailed() from None

    def __repr__(self) -> str:
        return f"SealingKey(key_id={self._key_id})"

    def __setattr__(self, name: str, value: Any) -> NoReturn:
        raise AttributeError("SealingKey is immutable")

    def __reduce__(self) -> NoReturn:
        raise TypeError("a SealingKey cannot be pickled")


class FingerprintKey:
    """HMAC-SHA-256 key for PAN fingerprints (PCI DSS 3.5.1.1: keyed, never a bare hash)."""

    __slots__ = ("_mac",)
    _mac: hmac.HMAC

    def __init__(self, key: bytes) -> None:
        if not isinstance(key, bytes | bytearray) or len(key) != KEY_BYTES:
            raise CryptoError("a fingerprint key must be 32 bytes")
        # Keyed once; each fingerprint copies the keyed state instead of re-deriving the pads.
        object.__setattr__(self, "_mac", hmac.new(bytes(key), digestmod="sha256"))

    def fingerprint(self, digits: str) -> bytes:
        """The 32-byte HMAC-SHA-256 of the PAN digits."""
        mac = self._mac.copy()
        mac.update(digits.encode("ascii"))
        return mac.digest()

    def request_key(self, caller: str, request_id: str) -> bytes:
        """How a Tokenize request id is stored: keyed, and bound to the caller that sent it
        (a NUL-led, NUL-separated message, so it can never equal a PAN's fingerprint)."""
        mac = self._mac.copy()
        mac.update(b"\x00tokenize-request\x00" + caller.encode("utf-8") + b"\x00"
                   + request_id.encode("utf-8"))
        return mac.digest()

    def __repr__(self) -> str:
        return "FingerprintKey(<hidden>)"

    def __setattr__(self, name: str, value: Any) -> NoReturn:
        raise AttributeError("FingerprintKey is immutable")

    def __reduce__(self) -> NoReturn:
        raise TypeError("a FingerprintKey cannot be pickled")
