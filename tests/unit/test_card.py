"""Unit tests for vaultline.card: PAN parsing, brands, masking, expiry, card plaintext."""

from __future__ import annotations

import copy
import datetime
import pickle

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.testcards import ALL_TEST_PANS, TEST_CARDS
from vaultline.card import (
    Card,
    CardBrand,
    CardError,
    Expiry,
    Pan,
    detect_brand,
    has_digit_run,
    luhn_valid,
    mask_pans,
    security_code_ok,
    validate_cardholder_name,
)

VISA = "4111111111111111"
TODAY = datetime.date(2026, 5, 15)


def _luhn_complete(prefix: str) -> str:
    """`prefix` plus the check digit that makes it Luhn-valid."""
    return next(prefix + d for d in "0123456789" if luhn_valid(prefix + d))


def _error(call, *args, **kwargs) -> CardError:
    with pytest.raises(CardError) as info:
        call(*args, **kwargs)
    return info.value


# ---- Luhn and brands -------------------------------------------------------------------------


@pytest.mark.parametrize("pan", ALL_TEST_PANS)
def test_test_cards_are_luhn_valid(pan: str) -> None:
    assert luhn_valid(pan)


@pytest.mark.parametrize(
    ("brand", "pan"), [(brand, pan) for brand, pans in TEST_CARDS.items() for pan in pans]
)
def test_test_cards_have_their_brand(brand: str, pan: str) -> None:
    assert detect_brand(pan) is CardBrand[brand]
    assert Pan.parse(pan).brand is CardBrand[brand]


def test_every_brand_has_test_cards() -> None:
    assert set(TEST_CARDS) == {b.name for b in CardBrand}


def test_brand_values_match_proto() -> None:
    assert [(b.name, b.value) for b in CardBrand] == [
        ("VISA", 1),
        ("MASTERCARD", 2),
        ("AMEX", 3),
        ("DISCOVER", 4),
        ("JCB", 5),
        ("DINERS", 6),
        ("UNIONPAY", 7),
        ("MAESTRO", 8),
    ]


@pytest.mark.parametrize(
    "digits",
    ["4111111111111112", "378282246310006", "1234567890123", "", "41111111111111a1", "٤١١١"],
)
def test_luhn_refuses_bad_check_digits_and_non_digits(digits: str) -> None:
    assert not luhn_valid(digits)


@given(st.text(alphabet="0123456789", min_size=1, max_size=30))
def test_luhn_matches_reference(digits: str) -> None:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch) * (2 if i % 2 else 1)
        total += d - 9 if d > 9 else d
    assert luhn_valid(digits) is (total % 10 == 0)


@pytest.mark.parametrize(
    ("prefix", "length", "brand"),
    [
        ("622126", 16, CardBrand.DISCOVER),  # more specific than UnionPay 62
        ("622925", 19, CardBrand.DISCOVER),
        ("622125", 16, CardBrand.UNIONPAY),
        ("622926", 16, CardBrand.UNIONPAY),
        ("6011", 16, CardBrand.DISCOVER),  # more specific than Maestro 6x
        ("6012", 16, CardBrand.MAESTRO),
        ("644", 16, CardBrand.DISCOVER),
        ("649", 19, CardBrand.DISCOVER),
        ("643", 16, CardBrand.MAESTRO),
        ("65", 16, CardBrand.DISCOVER),
        ("2221", 16, CardBrand.MASTERCARD),
        ("2720", 16, CardBrand.MASTERCARD),
        ("51", 16, CardBrand.MASTERCARD),
        ("55", 16, CardBrand.MASTERCARD),
        ("3528", 16, CardBrand.JCB),
        ("3589", 19, CardBrand.JCB),
        ("300", 14, CardBrand.DINERS),
        ("305", 14, CardBrand.DINERS),
        ("39", 19, CardBrand.DINERS),
        ("34", 15, CardBrand.AMEX),
        ("4", 19, CardBrand.VISA),
        ("50", 12, CardBrand.MAESTRO),
        ("69", 19, CardBrand.MAESTRO),
    ],
)
def test_brand_ranges(prefix: str, length: int, brand: CardBrand) -> None:
    pan = _luhn_complete(prefix + "0" * (length - len(prefix) - 1))
    assert detect_brand(pan) is brand


@pytest.mark.parametrize(
    ("prefix", "length"),
    [
        ("2220", 16),  # just below Mastercard 2-series
        ("2721", 16),
        ("3527", 16),  # just below JCB
        ("306", 14),  # between Diners ranges
        ("1", 16),
        ("9", 16),
        ("4", 15),  # Visa is 13, 16 or 19 digits
        ("37", 16),  # Amex is 15 digits
        ("51", 15),  # Mastercard is 16 digits
        ("6011", 15),  # short Discover: the specific range decides, not Maestro
        ("62", 15),
    ],
)
def test_unknown_ranges_and_wrong_lengths_have_no_brand(prefix: str, length: int) -> None:
    pan = _luhn_complete(prefix + "0" * (length - len(prefix) - 1))
    assert detect_brand(pan) is None
    error = _error(Pan.parse, pan)
    assert (error.reason, error.field) == ("UNKNOWN_BRAND", "card.pan")


# ---- Pan.parse -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw", ["4111 1111 1111 1111", "4111-1111-1111-1111", " 4111111111111111 "]
)
def test_parse_strips_spaces_and_dashes(raw: str) -> None:
    pan = Pan.parse(raw)
    assert pan.reveal() == VISA
    assert pan == Pan.parse(VISA)


def test_parse_exposes_bin_last4_length() -> None:
    pan = Pan.parse("378282246310005")
    assert (pan.brand, pan.bin, pan.last4, len(pan)) == (CardBrand.AMEX, "378282", "0005", 15)


@pytest.mark.parametrize(
    "raw",
    [
        "4111111111111112",  # Luhn failure
        "4111x11111111111",  # letter
        "4111\t1111111111111",  # tab is not a separator
        "4111.1111.1111.1111",
        "41111111112",  # 11 digits, Luhn-valid
        "4" + "1" * 19,  # 20 digits
        "",
        "   ",
        "４１１１１１１１１１１１１１１１",  # full-width digits
        "-" * 200 + VISA,  # absurdly long input
    ],
)
def test_parse_refuses_invalid_pans_without_echoing_them(raw: str) -> None:
    error = _error(Pan.parse, raw)
    assert (error.reason, error.field) == ("INVALID_PAN", "card.pan")
    assert error.description == "must be 12-19 digits and pass the Luhn check"
    assert error.args == (error.reason, error.field, error.description)
    digits = raw.replace(" ", "").replace("-", "")
    if digits:
        assert digits[-6:] not in str(error)


def test_parse_refuses_non_strings() -> None:
    error = _error(Pan.parse, 4111111111111111)
    assert error.reason == "INVALID_PAN"


# ---- masking, immutability, serialisation ----------------------------------------------------


def test_pan_never_prints_its_digits() -> None:
    pan = Pan.parse(VISA)
    shown = [str(pan), repr(pan), format(pan), f"{pan}", f"{pan!r}", f"{pan:>30}"]
    assert shown[:6] == ["Pan(VISA ****1111)"] * 5 + [f"{'Pan(VISA ****1111)':>30}"]
    for text in shown + [repr([pan]), repr({"k": pan})]:
        assert "411111" not in text


def test_pan_is_immutable() -> None:
    pan = Pan.parse(VISA)
    with pytest.raises(AttributeError):
        pan._digits = "4242424242424242"  # type: ignore[misc]
    with pytest.raises(AttributeError):
        pan.brand = CardBrand.AMEX  # type: ignore[misc]
    with pytest.raises(AttributeError):
        del pan._digits
    assert not hasattr(pan, "__dict__")
    assert pan.reveal() == VISA


def test_pan_cannot_be_built_unvalidated() -> None:
    with pytest.raises(TypeError):
        Pan()


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_pan_refuses_pickling(protocol: int) -> None:
    with pytest.raises(TypeError):
        pickle.dumps(Pan.parse(VISA), protocol)
    card = Card(Pan.parse(VISA), Expiry(12, 2030))
    with pytest.raises(TypeError):
        pickle.dumps(card, protocol)


def test_copies_are_the_same_masked_value() -> None:
    pan = Pan.parse(VISA)
    assert copy.copy(pan) is pan
    assert copy.deepcopy(pan) is pan
    card = Card(pan, Expiry(12, 2030), "Ada Lovelace")
    assert copy.deepcopy(card) == card


def test_equality_and_hash() -> None:
    a, b, c = Pan.parse(VISA), Pan.parse("4111-1111-1111-1111"), Pan.parse("4242424242424242")
    assert a == b and hash(a) == hash(b)
    assert a != c
    assert a != VISA  # never equal to the bare digits
    assert len({a, b, c}) == 2


# ---- expiry ----------------------------------------------------------------------------------


def test_expiry_this_month_is_valid() -> None:
    assert Expiry.parse(5, 2026, today=TODAY) == Expiry(5, 2026)
    assert Expiry.parse(5, 2026, today=datetime.date(2026, 5, 31)) == Expiry(5, 2026)


def test_expiry_last_month_is_expired() -> None:
    error = _error(Expiry.parse, 4, 2026, today=TODAY)
    assert (error.reason, error.field) == ("EXPIRED_CARD", "card.expiry_year")
    error = _error(Expiry.parse, 12, 2025, today=datetime.date(2026, 1, 1))
    assert error.reason == "EXPIRED_CARD"


def test_expiry_two_digit_year() -> None:
    assert Expiry.parse(1, 30, today=TODAY) == Expiry(1, 2030)
    assert Expiry.parse(12, 99, today=TODAY).year == 2099


@pytest.mark.parametrize(
    ("month", "year", "field"),
    [
        (0, 2030, "card.expiry_month"),
        (13, 2030, "card.expiry_month"),
        (-1, 2030, "card.expiry_month"),
        (True, 2030, "card.expiry_month"),
        (0, 0, "card.expiry_month"),  # expiry is required
        (6, 0, "card.expiry_year"),  # unset proto3 field, not the year 2000
        (6, 100, "card.expiry_year"),
        (6, 1999, "card.expiry_year"),
        (6, 2100, "card.expiry_year"),
        (6, -26, "card.expiry_year"),
    ],
)
def test_expiry_invalid(month: int, year: int, field: str) -> None:
    error = _error(Expiry.parse, month, year, today=TODAY)
    assert (error.reason, error.field) == ("INVALID_EXPIRY", field)


# ---- cardholder name -------------------------------------------------------------------------


def test_cardholder_name_is_stripped() -> None:
    assert validate_cardholder_name("  Zoë O'Brien-Łukasz \n") == "Zoë O'Brien-Łukasz"
    assert validate_cardholder_name("") == ""
    assert validate_cardholder_name("A" * 100) == "A" * 100


@pytest.mark.parametrize(
    "name",
    ["A" * 101, "Ada\x00Lovelace", "Ada\x1b[31m", "Ada\u202eecalevol", "Ada\u2028X", "\ud800"],
)
def test_cardholder_name_refused(name: str) -> None:
    error = _error(validate_cardholder_name, name)
    assert (error.reason, error.field) == ("INVALID_CARDHOLDER_NAME", "card.cardholder_name")
    assert "Ada" not in str(error)


# ---- Card ------------------------------------------------------------------------------------


def test_card_repr_masks_pan_and_name() -> None:
    card = Card(Pan.parse(VISA), Expiry(12, 2030), "Ada Lovelace")
    text = repr(card)
    assert text == (
        "Card(pan=Pan(VISA ****1111), expiry=Expiry(month=12, year=2030), "
        "cardholder_name='<redacted>')"
    )
    assert str(card) == text
    assert repr(Card(Pan.parse(VISA), Expiry(12, 2030))).endswith("cardholder_name='')")


@pytest.mark.parametrize("pan", ALL_TEST_PANS)
@pytest.mark.parametrize("name", ["", "Ada Lovelace", "李小龙", "Z" * 100])
def test_card_plaintext_round_trip(pan: str, name: str) -> None:
    card = Card(Pan.parse(pan), Expiry(3, 2031), name)
    data = card.to_plaintext()
    assert data[0] == 1
    back = Card.from_plaintext(data)
    assert back == card
    assert back.pan.brand is card.pan.brand
    assert back.pan.reveal() == pan


def test_card_plaintext_of_expired_card_still_decodes() -> None:
    card = Card(Pan.parse(VISA), Expiry(1, 2001))
    assert Card.from_plaintext(card.to_plaintext()).expiry == Expiry(1, 2001)


def test_card_plaintext_is_compact() -> None:
    card = Card(Pan.parse(VISA), Expiry(12, 2030), "Ada")
    assert len(card.to_plaintext()) == 8 + 16 + 3


def _malformed_plaintexts() -> list[bytes]:
    good = Card(Pan.parse(VISA), Expiry(12, 2030), "Ada").to_plaintext()
    # No Luhn case: from_plaintext reads only AES-GCM-authenticated plaintext, so it checks
    # the shape and does not re-run Luhn on the per-card detokenize path.
    return [
        b"",
        good[:7],
        good[:-1],  # truncated name
        good + b"x",  # trailing bytes
        b"\x02" + good[1:],  # unknown version
        good[:1] + b"\x00" + good[2:],  # brand 0
        good[:1] + b"\x09" + good[2:],  # brand 9
        good[:2] + b"\x0d" + good[3:],  # month 13
        good[:3] + b"\x07\xcf" + good[5:],  # year 1999
        good.replace(b"4111111111111111", b"41111111111111x1"),
        good.replace(b"Ada", b"A\xffa"),  # invalid UTF-8
        good.replace(b"Ada", b"A\x00a"),  # control character
    ]


@pytest.mark.parametrize("data", _malformed_plaintexts())
def test_card_from_plaintext_refuses_malformed(data: bytes) -> None:
    with pytest.raises(ValueError) as info:
        Card.from_plaintext(data)
    # A plain ValueError: stored data gone bad must not surface as the caller's bad input.
    assert type(info.value) is ValueError
    assert str(info.value) == "malformed card plaintext"
    assert info.value.__context__ is None or info.value.__suppress_context__


def test_card_checks_its_fields() -> None:
    with pytest.raises(TypeError):
        Card(VISA, Expiry(12, 2030))  # type: ignore[arg-type]
    with pytest.raises(CardError):
        Card(Pan.parse(VISA), Expiry(12, 2030), "x" * 101)
    with pytest.raises(CardError):
        Expiry(13, 2030)


# ---- mask_pans -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "masked"),
    [
        ("pan=4111111111111111 ok", "pan=411111******1111 ok"),
        ("4111 1111 1111 1111", "4111 11** **** 1111"),
        ("4111-1111-1111-1111.", "4111-11**-****-1111."),
        ("378282246310005", "37828******0005"),  # 15 digits: at least six stay hidden
        ("x6799990100000000019x", "x679999*********0019x"),
        # a PAN run into another number by a single space is still found
        ("charge 4111111111111111 100 EUR", "charge 411111******1111 100 EUR"),
        ("ref 12 4242424242424242", "ref 12 424242******4242"),
        ("a 4111111111111111, b 5555555555554444", "a 411111******1111, b 555555******4444"),
        # other spellings (issue 14): any separators of up to three characters, other digits
        ("4111  1111  1111  1111", "4111  11**  ****  1111"),
        ("4111.1111.1111.1111", "4111.11**.****.1111"),
        ("4111 / 1111 / 1111 / 1111", "4111 / 11** / **** / 1111"),
        ("４１１１１１１１１１１１１１１１", "411111******1111"),  # full-width
        ("٤١١١١١١١١١١١١١١١", "411111******1111"),  # Arabic-Indic
    ],
)
def test_mask_pans(text: str, masked: str) -> None:
    assert mask_pans(text) == masked


@pytest.mark.parametrize("pan", ALL_TEST_PANS)
def test_mask_pans_hides_every_test_card(pan: str) -> None:
    masked = mask_pans(f"card {pan} end")
    assert pan not in masked
    assert masked.startswith("card ") and masked.endswith(f"{pan[-4:]} end")
    assert masked.count("*") >= 6


@pytest.mark.parametrize(
    "text",
    [
        "",
        "short 123",
        "4111111111111112",  # not Luhn-valid
        "41111111111",  # 11 digits
        "4111 a 1111 b 1111 c 1111",  # words split it into short numbers
        "4111    1111    1111    1111",  # four spaces do too
        "2026-05-15T12:00:00Z request 123456",
        "1" * 25,  # one long number is not a PAN
        "tok_AAAAAAAAAAAAAAAAAAAAAA",
    ],
)
def test_mask_pans_leaves_other_text_alone(text: str) -> None:
    assert mask_pans(text) == text


@given(
    st.integers(min_value=12, max_value=19).flatmap(
        lambda n: st.text(alphabet="0123456789", min_size=n - 1, max_size=n - 1)
    ),
    st.lists(st.sampled_from(["", "", "", " ", "-"]), min_size=19, max_size=19),
    st.text(alphabet="ab ,:=", max_size=5),
    st.text(alphabet="ab ,:=", max_size=5),
)
def test_mask_pans_hides_any_luhn_valid_number(
    body: str, separators: list[str], before: str, after: str
) -> None:
    pan = _luhn_complete(body)
    formatted = pan[0] + "".join(sep + d for sep, d in zip(separators, pan[1:], strict=False))
    masked = mask_pans(before + formatted + after)
    shown = "".join(ch for ch in masked if ch.isdigit() or ch == "*")
    assert pan not in shown
    assert shown.count("*") >= 6


def test_a_date_and_time_may_be_masked_like_a_card_number() -> None:
    # The price of catching every spelling: '2026-05-15 12:00' reads as 202605151200, which
    # happens to pass Luhn. A masked timestamp in a log is harmless; a leaked PAN is not.
    assert mask_pans("2026-05-15 12:00:00 request 123456") == "20**-**-** **:00:00 request 123456"


def test_mask_pans_masks_a_very_long_run_whole_in_linear_time() -> None:
    text = "purpose " + "1 " * 500_000
    masked = mask_pans(text)
    assert masked.count("*") == 500_000 and "1" not in masked


@pytest.mark.parametrize(
    "text",
    [
        "4111111111111111", "4111111111111112", "4111 1111 1111", "4111.1111.1111.1111",
        "4111  1111  1111  1111", "4111:1111:1111:1111", "ref ４１１１１１１１１１１１",
        "٤١١١١١١١١١١١", "1-2-3-4-5-6-7-8-9-0-1-2", "000000000000",
    ],
)
def test_has_digit_run_finds_twelve_digits_however_spelled(text: str) -> None:
    assert has_digit_run(text)


@pytest.mark.parametrize(
    "text",
    ["", "12345678901", "invoice 2026-05 batch 7", "4111 a 1111 b 1111", "1234    56789012",
     "tok_AAAAAAAAAAAAAAAAAAAAAA", "req_abcdefghij_b"],
)
def test_has_digit_run_leaves_shorter_numbers_alone(text: str) -> None:
    assert not has_digit_run(text)


def test_mask_pans_fast_path_returns_same_object() -> None:
    text = "no card numbers in here, just 12 34 56"
    assert mask_pans(text) is text


@pytest.mark.parametrize(("code", "brand", "ok"), [
    ("739", CardBrand.VISA, True), ("0739", CardBrand.AMEX, True),
    ("0739", CardBrand.VISA, False), ("739", CardBrand.AMEX, False), ("73", CardBrand.JCB, False),
    ("7a9", CardBrand.MASTERCARD, False), ("٧٣٩", CardBrand.VISA, False),
    ("", CardBrand.VISA, False),
])
def test_security_codes_have_the_length_of_their_brand(
        code: str, brand: CardBrand, ok: bool) -> None:
    assert security_code_ok(code, brand) is ok
