"""Unit tests for vaultline.tokens: token generation and the shape check of tokens sent in."""

from __future__ import annotations

import base64
import collections
import os
import random
import re

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from tests.testcards import ALL_TEST_PANS
from vaultline.card import Pan, luhn_valid
from vaultline.tokens import (
    SHOWS_BIN_FROM,
    TokenError,
    TokenFormat,
    new_token,
    new_tokens,
    parse_token,
)

NUMERIC_FORMATS = [TokenFormat.NUMERIC, TokenFormat.NUMERIC_KEEP_BIN]


def _allowed(raw: str, fmt: TokenFormat) -> bool:
    """Keep-BIN tokens exist only for 16+ digit card numbers (issue 14)."""
    return fmt != TokenFormat.NUMERIC_KEEP_BIN or len(raw) >= SHOWS_BIN_FROM


def _pans_for(fmt: TokenFormat) -> list[str]:
    return [p for p in ALL_TEST_PANS if _allowed(p, fmt)]
OPAQUE_SHAPE = re.compile(r"tok_[A-Za-z0-9_-]{22}")


class ScriptedBytes:
    """A randbytes that serves a fixed byte stream, whatever sizes are asked for."""

    def __init__(self, stream: bytes, *, fallback: bool = False) -> None:
        self.stream = stream
        self.fallback = fallback

    def __call__(self, n: int) -> bytes:
        if len(self.stream) < n:
            if self.fallback:
                return os.urandom(n)
            raise AssertionError("scripted random stream exhausted")
        out, self.stream = self.stream[:n], self.stream[n:]
        return out


def _check_numeric(token: str, pan: Pan, fmt: TokenFormat) -> None:
    assert token.isascii() and token.isdigit()
    assert len(token) == len(pan)
    assert token.endswith(pan.last4)
    if fmt == TokenFormat.NUMERIC_KEEP_BIN:
        assert token.startswith(pan.bin)
    assert not luhn_valid(token)
    assert token != pan.reveal()


def test_format_values_match_proto() -> None:
    assert [(f.name, f.value) for f in TokenFormat] == [
        ("NUMERIC", 1),
        ("NUMERIC_KEEP_BIN", 2),
        ("OPAQUE", 3),
    ]


@pytest.mark.parametrize(("raw", "fmt"), [(p, f) for f in NUMERIC_FORMATS for p in _pans_for(f)])
def test_numeric_tokens_keep_length_last4_and_bin(raw: str, fmt: TokenFormat) -> None:
    pan = Pan.parse(raw)
    for _ in range(20):
        _check_numeric(new_token(pan, fmt), pan, fmt)


@settings(max_examples=300)
@given(
    st.sampled_from(ALL_TEST_PANS),
    st.sampled_from(NUMERIC_FORMATS),
    st.binary(min_size=0, max_size=512),
)
def test_numeric_tokens_never_pass_luhn(raw: str, fmt: TokenFormat, stream: bytes) -> None:
    # Hypothesis chooses the random bytes (including adversarial ones); once they run out the
    # OS source takes over so every example ends.
    assume(_allowed(raw, fmt))
    pan = Pan.parse(raw)
    _check_numeric(new_token(pan, fmt, ScriptedBytes(stream, fallback=True)), pan, fmt)


def _draw_for(last4: str, *, luhn: bool) -> str:
    """Twelve digits that, followed by `last4`, do (or do not) pass the Luhn check."""
    return next(f"{n:012d}" for n in range(100) if luhn_valid(f"{n:012d}{last4}") is luhn)


def test_luhn_valid_draw_is_redrawn() -> None:
    pan = Pan.parse("4111111111111111")
    draws = iter([_draw_for("1111", luhn=True), _draw_for("1111", luhn=False)])
    calls = 0

    def randbytes(n: int) -> bytes:
        # Byte b < 250 becomes digit b % 10; extra bytes beyond the twelve digits go unused.
        nonlocal calls
        calls += 1
        return bytes(int(d) for d in next(draws)).ljust(n, b"\x00")

    token = new_token(pan, TokenFormat.NUMERIC, randbytes)
    assert token == _draw_for("1111", luhn=False) + "1111"
    assert calls == 2


def test_rejection_sampling_drops_high_bytes() -> None:
    pan = Pan.parse("4111111111111111")
    # Bytes 250-255 must be skipped, not folded into digits 0-5.
    draw = bytes(range(250, 256)) + bytes([1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]) + b"\x00" * 64
    token = new_token(pan, TokenFormat.NUMERIC, ScriptedBytes(draw))
    assert token[:12] == "123456789012"
    assert not luhn_valid(token)


def test_random_digits_are_roughly_uniform() -> None:
    pan = Pan.parse("4111111111111111")
    draws = "".join(new_token(pan, TokenFormat.NUMERIC)[:12] for _ in range(2000))
    counts = collections.Counter(draws)
    # 24,000 digits: each should appear about 2,400 times (bias from the Luhn redraw is tiny).
    assert set(counts) == set("0123456789")
    assert all(2000 < c < 2800 for c in counts.values())


def test_broken_random_source_is_detected() -> None:
    pan = Pan.parse("4111111111111111")
    block = bytes(int(d) for d in _draw_for("1111", luhn=True))

    def stuck(n: int) -> bytes:  # always the same Luhn-valid draw
        return block.ljust(n, b"\x00")

    with pytest.raises(RuntimeError):
        new_token(pan, TokenFormat.NUMERIC, stuck)


def test_opaque_token_shape() -> None:
    pan = Pan.parse("4111111111111111")
    tokens = {new_token(pan, TokenFormat.OPAQUE) for _ in range(100)}
    assert len(tokens) == 100
    for token in tokens:
        assert OPAQUE_SHAPE.fullmatch(token)
        assert parse_token(token) == (token, TokenFormat.OPAQUE)


def test_opaque_token_encodes_128_random_bits() -> None:
    pan = Pan.parse("4111111111111111")
    token = new_token(pan, TokenFormat.OPAQUE, ScriptedBytes(b"\xfb" * 16))
    assert token == "tok_-_v7-_v7-_v7-_v7-_v7-w"
    assert token == "tok_" + base64.urlsafe_b64encode(b"\xfb" * 16).rstrip(b"=").decode()


@pytest.mark.parametrize("fmt", list(TokenFormat))
def test_batch_tokens(fmt: TokenFormat) -> None:
    pans = [Pan.parse(p) for p in _pans_for(fmt)] * 10
    tokens = new_tokens(pans, fmt)
    assert len(tokens) == len(pans)
    # Distinct draws, where the token space is wide enough (>= 6 random digits) for a
    # collision among 10 draws to be negligible; keep-BIN on a 13-digit PAN has only 3.
    kept = 10 if fmt == TokenFormat.NUMERIC_KEEP_BIN else 4
    wide = [t for t, p in zip(tokens, pans, strict=True)
            if fmt == TokenFormat.OPAQUE or len(p) - kept >= 6]
    assert len(set(wide)) == len(wide)
    for token, pan in zip(tokens, pans, strict=True):
        if fmt == TokenFormat.OPAQUE:
            assert OPAQUE_SHAPE.fullmatch(token)
        else:
            _check_numeric(token, pan, fmt)
        assert parse_token(token)[0] == token


@pytest.mark.parametrize("fmt", list(TokenFormat))
def test_batch_draws_randomness_once(fmt: TokenFormat) -> None:
    pans = [Pan.parse(p) for p in _pans_for(fmt)]
    source = random.Random(7)  # deterministic, so the number of Luhn redraws is fixed
    sizes: list[int] = []

    def randbytes(n: int) -> bytes:
        sizes.append(n)
        return source.randbytes(n)

    tokens = new_tokens(pans, fmt, randbytes)
    redraws = len(sizes) - 1
    kept = {TokenFormat.NUMERIC: 4, TokenFormat.NUMERIC_KEEP_BIN: 10, TokenFormat.OPAQUE: 0}[fmt]
    needed = 16 * len(pans) if fmt == TokenFormat.OPAQUE else sum(len(p) - kept for p in pans)
    assert sizes[0] >= needed  # the whole batch in the first draw
    assert redraws <= len(pans) // 4
    assert len(tokens) == len(pans)
    assert new_tokens([], fmt) == []


@pytest.mark.parametrize("raw", [p for p in ALL_TEST_PANS if len(p) < SHOWS_BIN_FROM])
def test_a_short_card_number_gets_no_keep_bin_token(raw: str) -> None:
    # Six and four of twelve digits would leave two hidden (issue 14, finding 1).
    with pytest.raises(ValueError):
        new_token(Pan.parse(raw), TokenFormat.NUMERIC_KEEP_BIN)


def test_unknown_format_is_refused() -> None:
    with pytest.raises(ValueError):
        new_token(Pan.parse("4111111111111111"), 0)  # type: ignore[arg-type]


# ---- parse_token -----------------------------------------------------------------------------


def test_parse_token_normalises() -> None:
    assert parse_token(" 4111112345671112 ") == ("4111112345671112", None)
    assert parse_token("4111-1123-4567-1112") == ("4111112345671112", None)
    opaque = "tok_AAAAAAAAAAAAAAAAAAAAAA"
    assert parse_token(f"\t{opaque}\n") == (opaque, TokenFormat.OPAQUE)


@pytest.mark.parametrize(
    "raw",
    [
        *ALL_TEST_PANS,  # a card number sent where a token belongs
        "",
        "tok_",
        "tok_AAAAAAAAAAAAAAAAAAAAA",  # 21 characters
        "tok_AAAAAAAAAAAAAAAAAAAAAAA",  # 23 characters
        "tok_AAAAAAAAAAAAAAAAAAAAAB",  # not a 128-bit encoding
        "tok_AAAAAAAAAAAAAAAAAAAA+A",  # not URL-safe
        "TOK_AAAAAAAAAAAAAAAAAAAAAA",
        "41111123456",  # 11 digits
        "41111123456711123456",  # 20 digits
        "4111x12345671112",
        "tok_AAAAAAAAAAAAAAAAAAAAAA'; DROP TABLE tokens;--",
        "٤١١١١١٢٣٤٥٦٧١١١٢",  # Arabic-Indic digits
        "1" * 1000,
    ],
)
def test_parse_token_refuses_without_echoing(raw: str) -> None:
    with pytest.raises(TokenError) as info:
        parse_token(raw)
    error = info.value
    assert (error.reason, error.field) == ("INVALID_TOKEN", "token")
    assert error.args == TokenError().args  # a fixed text, whatever was sent
    if len(raw) >= 6:
        assert raw[-6:] not in str(error)


def test_parse_token_refuses_non_strings() -> None:
    with pytest.raises(TokenError):
        parse_token(b"tok_AAAAAAAAAAAAAAAAAAAAAA")  # type: ignore[arg-type]


@settings(max_examples=200)
@given(st.sampled_from(ALL_TEST_PANS), st.sampled_from(list(TokenFormat)))
def test_parse_token_accepts_every_new_token(raw: str, fmt: TokenFormat) -> None:
    assume(_allowed(raw, fmt))
    token = new_token(Pan.parse(raw), fmt)
    expected = TokenFormat.OPAQUE if fmt == TokenFormat.OPAQUE else None
    assert parse_token(token) == (token, expected)
