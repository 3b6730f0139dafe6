"""Unit tests for vaultline.crypto: sealing with associated data, keyed fingerprints."""

from __future__ import annotations

import copy
import hashlib
import hmac
import pickle

import pytest

from tests.testcards import ALL_TEST_PANS
from vaultline.crypto import (
    CIPHERTEXT_VERSION,
    KEY_BYTES,
    NONCE_BYTES,
    CryptoError,
    FingerprintKey,
    OpenFailed,
    SealingKey,
    associated_data,
    associated_data_for,
    associated_data_prefix,
    security_code_associated_data,
)

KEY_A = bytes(range(32))
KEY_B = bytes(range(1, 33))
PLAINTEXT = b"\x01\x01\x0c\x07\xee\x10\x00\x004111111111111111"
AAD = associated_data(1, "acme", "tok_AAAAAAAAAAAAAAAAAAAAAA", 7)


def _open_fails(key: SealingKey, blob: bytes, aad: bytes) -> OpenFailed:
    with pytest.raises(OpenFailed) as info:
        key.open(blob, aad)
    assert str(info.value) == "ciphertext could not be opened"  # never says which check failed
    return info.value


def test_constants() -> None:
    assert (KEY_BYTES, NONCE_BYTES, CIPHERTEXT_VERSION) == (32, 12, 1)


def test_round_trip() -> None:
    key = SealingKey(7, KEY_A)
    blob = key.seal(PLAINTEXT, AAD)
    assert blob[0] == CIPHERTEXT_VERSION
    assert len(blob) == 1 + 12 + len(PLAINTEXT) + 16
    assert PLAINTEXT not in blob and b"4111111111111111" not in blob
    assert key.open(blob, AAD) == PLAINTEXT
    assert SealingKey(7, KEY_A).open(blob, AAD) == PLAINTEXT  # same key bytes, new object
    assert key.open(key.seal(b"", AAD), AAD) == b""


def test_nonces_differ() -> None:
    key = SealingKey(7, KEY_A)
    blobs = [key.seal(PLAINTEXT, AAD) for _ in range(200)]
    assert len({b[1 : 1 + NONCE_BYTES] for b in blobs}) == 200
    assert len(set(blobs)) == 200


def test_open_fails_with_wrong_key() -> None:
    blob = SealingKey(7, KEY_A).seal(PLAINTEXT, AAD)
    _open_fails(SealingKey(7, KEY_B), blob, AAD)


@pytest.mark.parametrize(
    "other",
    [
        associated_data(2, "acme", "tok_AAAAAAAAAAAAAAAAAAAAAA", 7),  # version
        associated_data(1, "acmf", "tok_AAAAAAAAAAAAAAAAAAAAAA", 7),  # tenant
        associated_data(1, "acme", "tok_AAAAAAAAAAAAAAAAAAAAAQ", 7),  # token (row swap)
        associated_data(1, "acme", "tok_AAAAAAAAAAAAAAAAAAAAAA", 8),  # key id
        b"",
    ],
)
def test_open_fails_with_other_associated_data(other: bytes) -> None:
    key = SealingKey(7, KEY_A)
    _open_fails(key, key.seal(PLAINTEXT, AAD), other)


def test_open_fails_on_every_flipped_byte() -> None:
    key = SealingKey(7, KEY_A)
    blob = key.seal(PLAINTEXT, AAD)
    for i in range(len(blob)):
        tampered = bytearray(blob)
        tampered[i] ^= 0x01
        _open_fails(key, bytes(tampered), AAD)


@pytest.mark.parametrize("cut", [0, 1, 12, 13, 28, -1])
def test_open_fails_when_truncated(cut: int) -> None:
    key = SealingKey(7, KEY_A)
    blob = key.seal(PLAINTEXT, AAD)
    _open_fails(key, blob[:cut], AAD)
    _open_fails(key, blob + b"\x00", AAD)


def test_open_failure_hides_its_cause() -> None:
    key = SealingKey(7, KEY_A)
    error = _open_fails(key, key.seal(PLAINTEXT, AAD), b"other")
    assert error.__suppress_context__
    assert isinstance(error, CryptoError)


def test_associated_data_is_unambiguous() -> None:
    # Moving bytes between adjacent fields must change the encoding.
    assert associated_data(1, "ab", "c", 1) != associated_data(1, "a", "bc", 1)
    assert associated_data(1, "", "abc", 1) != associated_data(1, "abc", "", 1)
    assert associated_data(1, "a", "b", 256) != associated_data(1, "a", "b", 1)
    assert associated_data(1, "acme", "t", 7) == b"\x01\x00\x04acme\x00\x01t" + (7).to_bytes(8)


@pytest.mark.parametrize(
    ("version", "tenant", "key_id"),
    [(256, "acme", 1), (-1, "acme", 1), (1, "acme", -1), (1, "a" * 70000, 1)],
)
def test_associated_data_refuses_out_of_range(version: int, tenant: str, key_id: int) -> None:
    with pytest.raises(CryptoError):
        associated_data(version, tenant, "tok", key_id)


@pytest.mark.parametrize("key", [b"", bytes(16), bytes(31), bytes(33), "k" * 32])
def test_keys_must_be_32_bytes(key: bytes) -> None:
    with pytest.raises(CryptoError):
        SealingKey(1, key)
    with pytest.raises(CryptoError):
        FingerprintKey(key)


def test_key_id_must_be_non_negative_int() -> None:
    with pytest.raises(CryptoError):
        SealingKey(-1, KEY_A)
    with pytest.raises(CryptoError):
        SealingKey("7", KEY_A)  # type: ignore[arg-type]
    assert SealingKey(7, KEY_A).key_id == 7


def test_keys_are_not_shown_or_serialised() -> None:
    sealing, fingerprinting = SealingKey(7, KEY_A), FingerprintKey(KEY_A)
    assert repr(sealing) == "SealingKey(key_id=7)"
    assert repr(fingerprinting) == "FingerprintKey(<hidden>)"
    for obj in (sealing, fingerprinting):
        text = repr(obj) + str(obj) + f"{obj}"
        assert KEY_A.hex() not in text and repr(KEY_A) not in text
        with pytest.raises(TypeError):
            pickle.dumps(obj)
        with pytest.raises(TypeError):
            copy.copy(obj)
        with pytest.raises(AttributeError):
            obj.key_id = 8  # type: ignore[misc]


@pytest.mark.parametrize("pan", ALL_TEST_PANS)
def test_fingerprint_is_hmac_sha256(pan: str) -> None:
    key = FingerprintKey(KEY_A)
    expected = hmac.new(KEY_A, pan.encode(), hashlib.sha256).digest()
    assert key.fingerprint(pan) == expected
    assert key.fingerprint(pan) == expected  # the keyed state is reused, not consumed
    assert len(expected) == 32
    assert key.fingerprint(pan) != hashlib.sha256(pan.encode()).digest()  # keyed, not bare


def test_fingerprints_equal_per_key_and_differ_across_keys() -> None:
    a1, a2, b = FingerprintKey(KEY_A), FingerprintKey(KEY_A), FingerprintKey(KEY_B)
    pan = "4111111111111111"
    assert a1.fingerprint(pan) == a2.fingerprint(pan)
    assert a1.fingerprint(pan) != b.fingerprint(pan)
    fingerprints = {a1.fingerprint(p) for p in ALL_TEST_PANS}
    assert len(fingerprints) == len(ALL_TEST_PANS)


def test_associated_data_in_two_parts_is_the_same_bytes() -> None:
    for tenant, token, key_id in [("default", "4111110000001234", 7), ("t-é", "tok_" + "A" * 22, 0),
                                  ("", "", 2**63)]:
        prefix = associated_data_prefix(CIPHERTEXT_VERSION, tenant)
        assert associated_data_for(prefix, token, key_id) == associated_data(
            CIPHERTEXT_VERSION, tenant, token, key_id)


def test_a_security_code_never_opens_as_card_data_nor_under_another_token() -> None:
    key = SealingKey(7, KEY_A)
    token = "tok_AAAAAAAAAAAAAAAAAAAAAA"
    code_aad = security_code_associated_data("acme", token, 7)
    assert code_aad != associated_data(CIPHERTEXT_VERSION, "acme", token, 7)
    assert code_aad[0] != CIPHERTEXT_VERSION  # domain label first: no card AAD starts so
    blob = key.seal(b"739", code_aad)
    assert key.open(blob, code_aad) == b"739"
    for wrong in (associated_data(CIPHERTEXT_VERSION, "acme", token, 7),
                  security_code_associated_data("acme", "tok_BAAAAAAAAAAAAAAAAAAAAA", 7),
                  security_code_associated_data("other", token, 7)):
        with pytest.raises(OpenFailed):
            key.open(blob, wrong)
    card = key.seal(PLAINTEXT, associated_data(CIPHERTEXT_VERSION, "acme", token, 7))
    with pytest.raises(OpenFailed):
        key.open(card, code_aad)
