"""The discovery detector (pure): planted cards in every written form are found, exactly;
digit runs that are not cards are not."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vaultline.card import CardBrand
from vaultline.descope.detect import find_cards, might_hold_card


def with_check_digit(body: str) -> str:
    digits = [int(d) for d in body]
    total = 0
    for i, d in enumerate(reversed(digits)):
        if i % 2 == 0:
            d *= 2
            d -= 9 if d > 9 else 0
        total += d
    return body + str((10 - total % 10) % 10)


VISA19 = with_check_digit("411111111111111111")
assert len(VISA19) == 19


@pytest.mark.parametrize(("text", "found"), [
    ("4111111111111111", ["4111111111111111"]),
    ("paid with 4111 1111 1111 1111 yesterday", ["4111111111111111"]),
    ("card: 4111-1111-1111-1111.", ["4111111111111111"]),
    ("4111.1111.1111.1111", ["4111111111111111"]),
    ("Amex 3782 822463 10005 exp 12/30", ["378282246310005"]),
    ("le client a payé avec la carte 5555555555554444 merci", ["5555555555554444"]),
    ("Kunde zahlte mit 6011-1111-1111-1117, Danke", ["6011111111111117"]),
    ("顧客のカード 3566 0020 2036 0505 です", ["3566002020360505"]),
    (f"a 19-digit card {VISA19} on file", [VISA19]),
    ("two: 4111111111111111 and 5555 5555 5555 4444", ["4111111111111111",
                                                        "5555555555554444"]),
    # A card followed by its expiry, joined by a space: the card is still found.
    ("4111 1111 1111 1111 1230", ["4111111111111111"]),
    ('{"card": "4111111111111111", "amount": 12}', ["4111111111111111"]),
    ("card:4111111111111111;exp=1230", ["4111111111111111"]),
])
def test_cards_are_found_in_every_written_form(text: str, found: list[str]) -> None:
    assert [s.pan.reveal() for s in find_cards(text)] == found
    for span in find_cards(text):
        assert "".join(c for c in text[span.start:span.end] if c.isdigit()) == \
            span.pan.reveal()


@pytest.mark.parametrize("text", [
    "order 4111111111111112",  # not Luhn-valid
    "41111111111111111111111",  # a card's digits inside a longer run
    "ref 004111111111111111",  # embedded: preceded by more digits
    "2026-12-01 12:00:00.123456",  # a timestamp
    "1701234567890123",  # epoch microseconds (no issuer starts with 1)
    "+1 (415) 555-0100 / +44 20 7946 0958",  # phone numbers
    "GB82 WEST 1234 5698 7654 32",  # an IBAN
    "9999999999999995",  # Luhn-valid, no issuer
    "3.14159265358979323846",  # a long decimal
    "550e8400-e29b-41d4-a716-446655440000",  # a UUID
    "ref 9a4111111111111111f0c3",  # digits inside a hex digest
    "user_4111111111111111",  # inside an identifier
])
def test_digit_runs_that_are_not_cards_are_not_reported(text: str) -> None:
    assert find_cards(text) == []


def test_reports_show_last_four_or_bin() -> None:
    (span,) = find_cards("x 378282246310005 y")
    assert span.brand is CardBrand.AMEX
    assert span.masked() == "***********0005"
    assert span.masked(show_bin=True) == "378282*****0005"
    assert "3782822" not in repr(span)


@given(st.text(max_size=200))
def test_never_a_span_that_is_not_a_valid_card(text: str) -> None:
    for span in find_cards(text):
        digits = "".join(c for c in text[span.start:span.end] if c.isdigit())
        assert digits == span.pan.reveal() and 13 <= len(digits) <= 19


def test_the_fast_path_only_skips_text_without_long_runs() -> None:
    assert not might_hold_card("call me at 555-0100 about order 123456")
    assert might_hold_card("4111 1111 1111 1111")
