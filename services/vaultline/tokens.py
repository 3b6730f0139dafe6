"""Token formats and their rules: making new tokens and checking the shape of tokens sent in.

Pure: randomness comes from an injected `randbytes` (the OS CSPRNG by default). A numeric token
never passes the Luhn check, so it can never be mistaken for, or equal, a card number.
"""

from __future__ import annotations

import binascii
import enum
import os
import re
from collections.abc import Callable, Sequence

from vaultline.card import PAN_MAX_DIGITS, PAN_MIN_DIGITS, Pan, luhn_ok, luhn_valid

__all__ = ["TokenError", "TokenFormat", "new_token", "new_tokens", "parse_token"]

RandBytes = Callable[[int], bytes]

OPAQUE_PREFIX = "tok_"
OPAQUE_RANDOM_BYTES = 16  # 128 bits
# The shortest card number whose BIN (first six) may be shown beside its last four, in a token
# or in metadata: for a shorter one that would leave too few digits hidden (PCI DSS 3.4.1 allows
# at most first six and last four; a 12-digit number would then show ten).
SHOWS_BIN_FROM = 16
_OPAQUE_LEN = len(OPAQUE_PREFIX) + 22  # base64url of 16 bytes without padding

# A redraw is needed one time in ten, so this many in a row means the source is broken.
_MAX_DRAWS = 64


class TokenFormat(enum.IntEnum):
    """How a token looks; values equal the proto enum numbers."""

    NUMERIC = 1
    NUMERIC_KEEP_BIN = 2
    OPAQUE = 3


class TokenError(ValueError):
    """A token sent by a caller has an impossible shape. Never carries the input."""

    reason = "INVALID_TOKEN"
    field = "token"
    description = "must be 'tok_' and 22 URL-safe characters, or 12-19 digits failing Luhn"

    def __init__(self) -> None:
        super().__init__(f"{self.reason}: {self.field} {self.description}")


# Rejection sampling without modulo bias: bytes 0-249 map to digit b % 10 (25 bytes per digit),
# bytes 250-255 are dropped. translate() does both in C.
_BYTE_TO_DIGIT = bytes(48 + b % 10 if b < 250 else 0 for b in range(256))
_REJECTED_BYTES = bytes(range(250, 256))
_URLSAFE = bytes.maketrans(b"+/", b"-_")


def _random_digits(count: int, randbytes: RandBytes) -> str:
    """`count` independent uniform decimal digits."""
    out = b""
    while len(out) < count:
        # About 2.3 % of bytes are rejected; the slack makes a second draw rare.
        need = count - len(out)
        out += randbytes(need + need // 16 + 4).translate(_BYTE_TO_DIGIT, _REJECTED_BYTES)
    return out[:count].decode("ascii")


def _numeric_parts(pan: Pan, fmt: TokenFormat) -> tuple[str, int, str]:
    """(kept head, number of random digits, kept tail) of a numeric token for `pan`."""
    if fmt == TokenFormat.NUMERIC:
        return "", len(pan) - 4, pan.last4
    if fmt == TokenFormat.NUMERIC_KEEP_BIN:
        if len(pan) < SHOWS_BIN_FROM:  # six and four of twelve digits would leave two
            raise ValueError("a token keeps the BIN only of a card number of 16+ digits")
        return pan.bin, len(pan) - 10, pan.last4
    raise ValueError("unsupported token format")


def _opaque(random16: bytes) -> str:
    # b2a_base64 + translate is faster than base64.urlsafe_b64encode; [:22] drops the padding.
    encoded = binascii.b2a_base64(random16, newline=False)[:22].translate(_URLSAFE)
    return OPAQUE_PREFIX + encoded.decode("ascii")


def _numeric(head: str, size: int, tail: str, randbytes: RandBytes) -> str:
    # Redrawing the whole random part keeps the token uniform over all Luhn-failing values.
    for _ in range(_MAX_DRAWS):
        token = head + _random_digits(size, randbytes) + tail
        if not luhn_valid(token):
            return token
    raise RuntimeError("random source keeps producing Luhn-valid tokens")


def new_token(pan: Pan, fmt: TokenFormat, randbytes: RandBytes = os.urandom) -> str:
    """A new random token for `pan` in format `fmt` (uniqueness is the caller's concern)."""
    if fmt == TokenFormat.OPAQUE:
        return _opaque(randbytes(OPAQUE_RANDOM_BYTES))
    head, size, tail = _numeric_parts(pan, fmt)
    return _numeric(head, size, tail, randbytes)


def new_tokens(
    pans: Sequence[Pan], fmt: TokenFormat, randbytes: RandBytes = os.urandom
) -> list[str]:
    """`new_token` for many PANs, drawing the randomness in one call."""
    if fmt == TokenFormat.OPAQUE:
        step = OPAQUE_RANDOM_BYTES
        pool = randbytes(step * len(pans))
        return [_opaque(pool[i : i + step]) for i in range(0, step * len(pans), step)]
    parts = [_numeric_parts(pan, fmt) for pan in pans]
    digits = _random_digits(sum(size for _, size, _ in parts), randbytes)
    tokens = []
    offset = 0
    for head, size, tail in parts:
        token = head + digits[offset : offset + size] + tail
        offset += size
        if luhn_valid(token):  # one in ten: redraw this one alone
            token = _numeric(head, size, tail, randbytes)
        tokens.append(token)
    return tokens


# 16 random bytes leave the 22nd character's low four bits zero: only A, Q, g or w can end it.
_OPAQUE_SHAPE = re.compile(r"tok_[A-Za-z0-9_-]{21}[AQgw]")


def parse_token(raw: str) -> tuple[str, TokenFormat | None]:
    """Check the shape of a token sent by a caller.

    Returns the normalised token (surrounding whitespace removed; for numeric tokens also the
    spaces and dashes a card number may carry) and OPAQUE, or None for a numeric token (whether
    its BIN was kept cannot be seen). A Luhn-valid number is refused: it may be a card number.
    """
    if not isinstance(raw, str) or len(raw) > 64:
        raise TokenError()
    token = raw.strip()
    if token.startswith(OPAQUE_PREFIX):
        if len(token) == _OPAQUE_LEN and _OPAQUE_SHAPE.fullmatch(token):
            return token, TokenFormat.OPAQUE
        raise TokenError()
    if " " in token or "-" in token:
        token = token.replace(" ", "").replace("-", "")
    if (
        PAN_MIN_DIGITS <= len(token) <= PAN_MAX_DIGITS
        and token.isascii()
        and token.isdigit()
        and not luhn_ok(token)
    ):
        return token, None
    raise TokenError()
