"""Card data value types: the PAN (digits, length, Luhn, brand, masking), expiry and the card.

Pure: no I/O, no logging, no state. A `Pan` validates on construction and shows only its brand
and last four when printed; `Pan.reveal()` is the one way to get the digits back. Errors carry a
reason code, a field path and a fixed description, never the input.
"""

from __future__ import annotations

import datetime
import enum
import re
import struct
import unicodedata
from dataclasses import dataclass
from typing import Any, Final, NoReturn, final

__all__ = [
    "Card",
    "CardBrand",
    "CardError",
    "Expiry",
    "Pan",
    "UNKNOWN_EXPIRY",
    "detect_brand",
    "has_digit_run",
    "luhn_ok",
    "luhn_valid",
    "mask_pans",
    "security_code_length",
    "security_code_ok",
    "validate_cardholder_name",
]

PAN_MIN_DIGITS = 12
PAN_MAX_DIGITS = 19
NAME_MAX_CHARS = 100
# Longer raw input is refused before any work; 19 digits with separators fit easily.
_RAW_PAN_MAX_CHARS = 64


class CardBrand(enum.IntEnum):
    """Card network; values equal the proto enum numbers."""

    VISA = 1
    MASTERCARD = 2
    AMEX = 3
    DISCOVER = 4
    JCB = 5
    DINERS = 6
    UNIONPAY = 7
    MAESTRO = 8


class CardError(ValueError):
    """Invalid card input. Carries only a reason code, a field path and a fixed description."""

    reason: str
    field: str
    description: str

    def __init__(self, reason: str, field: str, description: str) -> None:
        super().__init__(reason, field, description)
        self.reason = reason
        self.field = field
        self.description = description

    def __str__(self) -> str:
        return f"{self.reason}: {self.field} {self.description}"


# (reason, field, description) of every CardError raised here: fixed texts, never input.
_INVALID_PAN = ("INVALID_PAN", "card.pan", "must be 12-19 digits and pass the Luhn check")
_UNKNOWN_BRAND = ("UNKNOWN_BRAND", "card.pan", "is not a number range of a supported card brand")
_INVALID_MONTH = ("INVALID_EXPIRY", "card.expiry_month", "must be 1-12")
_INVALID_YEAR = ("INVALID_EXPIRY", "card.expiry_year", "must be 2 digits or 2000-2099")
_EXPIRED = ("EXPIRED_CARD", "card.expiry_year", "the card has expired")
_INVALID_NAME = (
    "INVALID_CARDHOLDER_NAME",
    "card.cardholder_name",
    "must be at most 100 characters without control characters",
)

# ---- Luhn ------------------------------------------------------------------------------------

# Maps an ASCII digit to the ASCII digit of its doubled-and-digit-summed value.
_DOUBLED = bytes.maketrans(b"0123456789", b"0246813579")


def luhn_ok(digits: str) -> bool:
    """Luhn check of a non-empty string already known to hold only ASCII digits (else use
    `luhn_valid`); the per-item path of bulk calls, so it checks nothing else."""
    b = digits.encode("ascii")
    # Summing ASCII codes and removing 48 per digit once is faster than int() per digit.
    return (sum(b[-1::-2]) + sum(b[-2::-2].translate(_DOUBLED)) - 48 * len(b)) % 10 == 0


def luhn_valid(digits: str) -> bool:
    """True when `digits` is a non-empty string of ASCII digits that passes the Luhn check."""
    return bool(digits) and digits.isascii() and digits.isdigit() and luhn_ok(digits)


# ---- brands ----------------------------------------------------------------------------------

_LEN_16_19 = frozenset(range(16, 20))
_Range = tuple[int, int, int, CardBrand, frozenset[int]]

# (first IIN, last IIN, IIN length, brand, allowed PAN lengths), most specific range first: the
# first range whose prefix matches decides the brand, and the length must then fit that brand.
# A too-short 6011… is an invalid Discover number, not a Maestro one.
_BRAND_RANGES: tuple[_Range, ...] = (
    (622126, 622925, 6, CardBrand.DISCOVER, _LEN_16_19),
    (6011, 6011, 4, CardBrand.DISCOVER, _LEN_16_19),
    (644, 649, 3, CardBrand.DISCOVER, _LEN_16_19),
    (65, 65, 2, CardBrand.DISCOVER, _LEN_16_19),
    (62, 62, 2, CardBrand.UNIONPAY, _LEN_16_19),
    (3528, 3589, 4, CardBrand.JCB, _LEN_16_19),
    (300, 305, 3, CardBrand.DINERS, frozenset(range(14, 20))),
    (36, 36, 2, CardBrand.DINERS, frozenset(range(14, 20))),
    (38, 39, 2, CardBrand.DINERS, frozenset(range(14, 20))),
    (34, 34, 2, CardBrand.AMEX, frozenset({15})),
    (37, 37, 2, CardBrand.AMEX, frozenset({15})),
    (2221, 2720, 4, CardBrand.MASTERCARD, frozenset({16})),
    (51, 55, 2, CardBrand.MASTERCARD, frozenset({16})),
    (4, 4, 1, CardBrand.VISA, frozenset({13, 16, 19})),
    (50, 50, 2, CardBrand.MAESTRO, frozenset(range(12, 20))),
    (56, 69, 2, CardBrand.MAESTRO, frozenset(range(12, 20))),
)


def _ranges_by_first_two() -> tuple[tuple[_Range, ...], ...]:
    """For each two-digit prefix 00-99, the ranges that can match it, in priority order."""
    table: list[tuple[_Range, ...]] = []
    for prefix in range(100):
        rules: list[_Range] = []
        for rule in _BRAND_RANGES:
            lo, hi, size, _, _ = rule
            if size == 1:
                hit = lo == prefix // 10
            else:
                scale = 10 ** (size - 2)
                hit = lo // scale <= prefix <= hi // scale
            if hit:
                rules.append(rule)
        table.append(tuple(rules))
    return tuple(table)


_BY_FIRST_TWO = _ranges_by_first_two()


def detect_brand(digits: str) -> CardBrand | None:
    """The brand of an all-digit PAN from its IIN range and length, or None if unsupported."""
    if len(digits) < PAN_MIN_DIGITS or not (digits.isascii() and digits.isdigit()):
        return None
    for lo, hi, size, brand, lengths in _BY_FIRST_TWO[int(digits[:2])]:
        if lo <= int(digits[:size]) <= hi:
            return brand if len(digits) in lengths else None
    return None


# ---- PAN -------------------------------------------------------------------------------------


@final
class Pan:
    """A validated primary account number. Immutable; prints as e.g. 'Pan(VISA ****1111)'."""

    __slots__ = ("_digits", "_brand")
    _digits: str
    _brand: CardBrand

    def __init__(self) -> None:
        raise TypeError("use Pan.parse() to make a Pan")

    @classmethod
    def parse(cls, raw: str) -> Pan:
        """Validate a card number; spaces and dashes are removed first."""
        if not isinstance(raw, str) or len(raw) > _RAW_PAN_MAX_CHARS:
            raise CardError(*_INVALID_PAN)
        digits = raw.replace(" ", "").replace("-", "")
        if not (
            PAN_MIN_DIGITS <= len(digits) <= PAN_MAX_DIGITS
            and digits.isascii()
            and digits.isdigit()
            and luhn_ok(digits)
        ):
            raise CardError(*_INVALID_PAN)
        brand = detect_brand(digits)
        if brand is None:
            raise CardError(*_UNKNOWN_BRAND)
        return _make_pan(digits, brand)

    @property
    def brand(self) -> CardBrand:
        return self._brand

    @property
    def bin(self) -> str:
        """The first six digits (issuer identification)."""
        return self._digits[:6]

    @property
    def last4(self) -> str:
        return self._digits[-4:]

    def reveal(self) -> str:
        """The full card number. The only way to get it; keep every call site reviewable."""
        return self._digits

    def __len__(self) -> int:
        return len(self._digits)

    def __eq__(self, other: object) -> bool:
        if type(other) is Pan:
            return self._digits == other._digits
        return NotImplemented

    def __hash__(self) -> int:
        # str hashing is SipHash keyed per process: fine for dicts, useless for reversing.
        return hash(self._digits)

    def __repr__(self) -> str:
        return f"Pan({self._brand.name} ****{self._digits[-4:]})"

    __str__ = __repr__

    def __format__(self, spec: str) -> str:
        return format(repr(self), spec)

    def __setattr__(self, name: str, value: Any) -> NoReturn:
        raise AttributeError("Pan is immutable")

    def __delattr__(self, name: str) -> NoReturn:
        raise AttributeError("Pan is immutable")

    # Serialising a PAN by accident (pickle, a cache, a queue) must fail loudly; copies of an
    # immutable value can simply be the value itself.
    def __reduce__(self) -> NoReturn:
        raise TypeError("a Pan cannot be pickled")

    def __reduce_ex__(self, protocol: Any) -> NoReturn:
        raise TypeError("a Pan cannot be pickled")

    def __copy__(self) -> Pan:
        return self

    def __deepcopy__(self, memo: Any) -> Pan:
        return self


_new_object = object.__new__
# The slot descriptors write past Pan.__setattr__, which refuses every assignment.
_set_digits = Pan.__dict__["_digits"].__set__
_set_brand = Pan.__dict__["_brand"].__set__


def _make_pan(digits: str, brand: CardBrand) -> Pan:
    """Build a Pan from already validated parts (bypasses the immutability guard)."""
    pan = _new_object(Pan)
    _set_digits(pan, digits)
    _set_brand(pan, brand)
    return pan


# ---- expiry, name, card ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Expiry:
    """Card expiry; the card is valid through the last day of `month` in `year` (4 digits)."""

    month: int
    year: int

    def __post_init__(self) -> None:
        # type() rather than isinstance(): bool is an int subclass and never a valid month.
        if type(self.month) is not int or not 1 <= self.month <= 12:
            raise CardError(*_INVALID_MONTH)
        if type(self.year) is not int or not 2000 <= self.year <= 2099:
            raise CardError(*_INVALID_YEAR)

    @property
    def known(self) -> bool:
        """False only for `UNKNOWN_EXPIRY`: a card found in stored data without its expiry."""
        return self.month != 0

    @classmethod
    def parse(cls, month: int, year: int, *, today: datetime.date) -> Expiry:
        """Validate an expiry as entered; 2-digit years are 20YY; refuses expired cards."""
        # 0 stays invalid rather than meaning 2000: it is what an unset proto3 field reads as.
        if type(year) is int and 0 < year < 100:
            year += 2000
        expiry = cls(month, year)
        if (expiry.year, expiry.month) < (today.year, today.month):
            raise CardError(*_EXPIRED)
        return expiry


# Control characters (C0, DEL, C1), lone surrogates (not encodable), line/paragraph separators
# and bidi embedding/override/isolate controls, which can forge log lines or reorder what an
# agent sees on screen.
_FORBIDDEN_NAME_CHARS = re.compile(
    r"[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069\ud800-\udfff]"
)


def security_code_length(brand: CardBrand) -> int:
    """Digits in a card's security code: 4 for American Express (CID), else 3 (CVV2/CVC2)."""
    return 4 if brand is CardBrand.AMEX else 3


def security_code_ok(code: str, brand: CardBrand) -> bool:
    """Whether `code` is a well-formed security code for a card of `brand` (ASCII digits)."""
    return (len(code) == security_code_length(brand) and code.isascii() and code.isdigit())


def _name_ok(name: object) -> bool:
    return (
        isinstance(name, str)
        and len(name) <= NAME_MAX_CHARS
        and (not name or _FORBIDDEN_NAME_CHARS.search(name) is None)
    )


def validate_cardholder_name(name: str) -> str:
    """The name stripped of surrounding whitespace; at most 100 characters, no controls."""
    stripped = name.strip() if isinstance(name, str) else name
    if not _name_ok(stripped):
        raise CardError(*_INVALID_NAME)
    return stripped


# Plaintext format version 1: a fixed header, then the PAN digits (ASCII), then the name (UTF-8).
# The brand is stored rather than re-derived so that later changes to the brand table never make
# an old card unreadable.
_PLAINTEXT_V1 = 1
_HEADER = struct.Struct(">BBBHBH")  # version, brand, month, year, PAN length, name length
_MALFORMED = "malformed card plaintext"
# A dict lookup is several times faster than calling the enum.
_BRAND_BY_VALUE: dict[int, CardBrand] = {brand.value: brand for brand in CardBrand}


@dataclass(frozen=True, slots=True, repr=False)
class Card:
    """A card as captured: PAN, expiry and optional cardholder name."""

    pan: Pan
    expiry: Expiry
    cardholder_name: str = ""

    def __post_init__(self) -> None:
        if type(self.pan) is not Pan:
            raise TypeError("Card.pan must be a Pan")
        if type(self.expiry) is not Expiry:
            raise TypeError("Card.expiry must be an Expiry")
        # Checked here so that to_plaintext() can never write what from_plaintext() refuses.
        if not _name_ok(self.cardholder_name):
            raise CardError(*_INVALID_NAME)

    def __repr__(self) -> str:
        name = "'<redacted>'" if self.cardholder_name else "''"
        return f"Card(pan={self.pan!r}, expiry={self.expiry!r}, cardholder_name={name})"

    def to_plaintext(self) -> bytes:
        """Versioned binary encoding for sealing (inverse of `from_plaintext`)."""
        digits = self.pan._digits.encode("ascii")
        name = self.cardholder_name.encode("utf-8")
        header = _HEADER.pack(
            _PLAINTEXT_V1,
            self.pan._brand,
            self.expiry.month,
            self.expiry.year,
            len(digits),
            len(name),
        )
        return header + digits + name

    @classmethod
    def from_plaintext(cls, data: bytes) -> Card:
        """Decode `to_plaintext` output. No date check: expired cards must stay readable.

        Raises a plain ValueError (never CardError: stored data is not caller input).
        """
        try:
            version, brand, month, year, pan_len, name_len = _HEADER.unpack_from(data)
        except (struct.error, TypeError):
            raise ValueError(_MALFORMED) from None
        start = _HEADER.size
        if version != _PLAINTEXT_V1 or len(data) != start + pan_len + name_len:
            raise ValueError(_MALFORMED)
        try:
            digits = data[start : start + pan_len].decode("ascii")
            name = data[start + pan_len :].decode("utf-8")
            card_brand = _BRAND_BY_VALUE.get(brand)
            # No Luhn re-check: this plaintext comes out of an authenticated (AES-GCM) seal,
            # so it is exactly what a validated Card wrote; the shape checks stay as a guard.
            if card_brand is None or not (
                PAN_MIN_DIGITS <= len(digits) <= PAN_MAX_DIGITS and digits.isdigit()
            ):
                raise ValueError(_MALFORMED)
            expiry = _EXPIRIES.get((month, year)) or _known_expiry(month, year)
            if name and not _name_ok(name):
                raise ValueError(_MALFORMED)
        except ValueError:  # also CardError and UnicodeDecodeError, whose texts show input bytes
            raise ValueError(_MALFORMED) from None
        # Every part is checked above: build the Card without running the checks again (this
        # is the per-card path of every bulk reveal).
        card = _new_object(Card)
        _set_card_pan(card, _make_pan(digits, card_brand))
        _set_card_expiry(card, expiry)
        _set_card_name(card, name)
        return card


_set_card_pan = Card.__dict__["pan"].__set__
_set_card_expiry = Card.__dict__["expiry"].__set__
_set_card_name = Card.__dict__["cardholder_name"].__set__

# The expiry of a card found in stored data without one (de-scoping a CRM): month and year 0,
# which no entered expiry can be. It sorts before every real expiry, so tokenizing the card
# again with its expiry records it (see TokenService: a newer expiry re-seals the card).
UNKNOWN_EXPIRY: Final[Expiry] = _new_object(Expiry)
object.__setattr__(UNKNOWN_EXPIRY, "month", 0)
object.__setattr__(UNKNOWN_EXPIRY, "year", 0)

# Expiry is immutable, so decoded cards share one object per month (a bounded set: only the
# valid ones, at most 12 x 100, and the unknown one are kept).
_EXPIRIES: dict[tuple[int, int], Expiry] = {(0, 0): UNKNOWN_EXPIRY}


def _known_expiry(month: int, year: int) -> Expiry:
    expiry = Expiry(month, year)  # raises CardError on an invalid month or year
    _EXPIRIES[(month, year)] = expiry
    return expiry


# ---- card numbers in free text -----------------------------------------------------------------

# A card number however it is spelled: digits joined by up to three characters that are neither
# letters nor digits ('4111 1111 1111 1111', '4111.1111.1111.1111', double spaces, dashes,
# slashes...), after full-width and other compatibility digits become ASCII (`_ascii_digits`).
# Each repetition consumes exactly one digit and the separators cannot be digits, so matching
# is linear (no backtracking blow-up).
_DIGIT_RUN = re.compile(r"[0-9](?:[\W_]{0,3}[0-9]){11,}")
_DIGIT_GROUP = re.compile(r"[0-9]+")
# A run longer than this is no card number, only somewhere to hide one: all of it is masked,
# which also bounds the work per run whatever the input.
_LONGEST_RUN = 64


def _ascii_digits(text: str) -> str:
    """`text` with compatibility forms folded (NFKC: full-width '４', superscript '²' become
    '4', '2') and every other decimal digit (Arabic-Indic, Devanagari…) made ASCII. ASCII
    text is returned as it is, at no cost."""
    if text.isascii():
        return text
    folded = unicodedata.normalize("NFKC", text)
    if folded.isascii():
        return folded
    return "".join(
        str(unicodedata.decimal(ch)) if not ch.isascii() and ch.isdecimal() else ch
        for ch in folded
    )


def has_digit_run(text: str) -> bool:
    """Whether `text` holds 12 or more digits in one run, whatever the separators or digit
    forms: the test for caller text that must never carry a card number (purposes, request
    ids, references, names). Luhn is not asked: a mistyped card number is card data too.
    Callers bound the length first; the scan is linear."""
    return len(text) >= PAN_MIN_DIGITS and _DIGIT_RUN.search(_ascii_digits(text)) is not None


def _masked_span(length: int) -> tuple[int, int]:
    """Offsets [start, end) of the digits to hide in a PAN of `length` digits.

    Keeps at most the first six and the last four, and always hides at least six digits so a
    short PAN is not all but revealed (with Luhn, two hidden digits leave ten candidates).
    """
    return max(0, min(6, length - 10)), length - 4


def _mask_run(match: re.Match[str]) -> str:
    run = match.group()
    if len(run) <= PAN_MAX_DIGITS and run.isdigit():  # the common case: one unbroken number
        if not luhn_ok(run):
            return run
        start, end = _masked_span(len(run))
        return run[:start] + "*" * (end - start) + run[end:]

    groups = [len(g) for g in _DIGIT_GROUP.findall(run)]
    total = sum(groups)
    if total > _LONGEST_RUN:
        return _DIGIT_GROUP.sub(lambda g: "*" * len(g.group()), run)
    # Separated groups, e.g. '4111 1111 1111 1111' or a PAN followed by ' 100': every window of
    # whole consecutive groups that is 12-19 digits long and Luhn-valid is masked.
    digits = "".join(_DIGIT_GROUP.findall(run))
    hidden = bytearray(total)
    offset = 0
    for i in range(len(groups)):
        end = offset
        for j in range(i, len(groups)):
            end += groups[j]
            size = end - offset
            if size > PAN_MAX_DIGITS:
                break
            if size >= PAN_MIN_DIGITS and luhn_ok(digits[offset:end]):
                lo, hi = _masked_span(size)
                hidden[offset + lo : offset + hi] = b"\x01" * (hi - lo)
        offset += groups[i]
    if not any(hidden):
        return run
    out = []
    k = 0
    for ch in run:
        if "0" <= ch <= "9":
            out.append("*" if hidden[k] else ch)
            k += 1
        else:
            out.append(ch)
    return "".join(out)


def mask_pans(text: str) -> str:
    """`text` with every Luhn-valid 12-19 digit number masked (first six and last four kept),
    however it is spelled (see `_DIGIT_RUN`); runs of more than 64 digits are masked whole.
    Text with other digit forms comes back with them made ASCII. Linear in the text."""
    if len(text) < PAN_MIN_DIGITS:
        return text
    text = _ascii_digits(text)
    return _DIGIT_RUN.sub(_mask_run, text)
