"""The pure rewrite of stored values (issue 18): cards replaced in place by their tokens, the
text and separators around them kept; JSON rewritten only at the plan's paths."""

from __future__ import annotations

import json

import pytest

from vaultline.descope.detect import find_cards
from vaultline.descope.rewrite import (
    cards_in,
    cards_in_json,
    normalise_path,
    rewrite_json,
    rewrite_text,
)

VISA, MC, AMEX = "4111111111111111", "5555555555554444", "378282246310005"
TOKENS = {VISA: "4111119876541111", MC: "5555553456784444", AMEX: "372345678910005"}


@pytest.mark.parametrize(("before", "after"), [
    (VISA, "4111119876541111"),
    ("4111-1111-1111-1111", "4111-1198-7654-1111"),
    ("4111.1111.1111.1111", "4111.1198.7654.1111"),
    ("  4111 1111 1111 1111 ", "  4111 1198 7654 1111 "),
    ("Kunde zahlte mit 5555 5555 5555 4444, danke", "Kunde zahlte mit 5555 5534 5678 4444, danke"),
    ("顧客 3782 822463 10005 で", "顧客 3723 456789 10005 で"),
    (f"two: {VISA} and {MC}.", "two: 4111119876541111 and 5555553456784444."),
    ("no card 4111111111111112 here", "no card 4111111111111112 here"),  # fails Luhn
])
def test_cards_are_replaced_digit_for_digit(before: str, after: str) -> None:
    text, count = rewrite_text(before, TOKENS)
    assert text == after
    assert count == len(find_cards(before))
    assert len(text) == len(before)
    assert not find_cards(text), "a numeric token is never a card number"


def test_an_opaque_token_replaces_the_card_whole() -> None:
    text, count = rewrite_text("card 4111 1111 1111 1111 on file", {VISA: "tok_abcDEF123"})
    assert (text, count) == ("card tok_abcDEF123 on file", 1)


def test_a_card_without_a_token_is_never_left_silently() -> None:
    with pytest.raises(KeyError):
        rewrite_text(f"paid with {VISA}", {})


def test_text_without_cards_is_returned_as_is() -> None:
    for text in ("", "hello", "2026-12-01 12:00:00.123456", "+49 30 1234567890"):
        assert rewrite_text(text, TOKENS) == (text, 0)
        assert cards_in(text) == []
    assert cards_in(None) == []


def test_json_is_rewritten_only_at_the_paths() -> None:
    doc = {"payment": {"card": "4111-1111-1111-1111", "amount": 12},
           "note": f"also {MC}", "cards": [{"pan": MC}, {"pan": int(VISA)}]}
    paths = {"$.payment.card", "$.cards[*].pan"}
    assert sorted(cards_in_json(json.dumps(doc), paths)) == sorted([VISA, MC, VISA])
    text, count = rewrite_json(json.dumps(doc), paths, TOKENS)
    out = json.loads(text)
    assert count == 3
    assert out["payment"] == {"card": "4111-1198-7654-1111", "amount": 12}
    assert out["cards"] == [{"pan": "5555553456784444"}, {"pan": 4111119876541111}]
    assert out["note"] == f"also {MC}"  # not a planned path: verify would report it


def test_json_without_cards_or_malformed_is_left_alone() -> None:
    assert rewrite_json('{"a": 1}', {"$.a"}, TOKENS) == ('{"a": 1}', 0)
    assert rewrite_json("not json 4111111111111111", {"$.a"}, TOKENS)[1] == 0
    assert cards_in_json("not json 4111111111111111", {"$.a"}) == []


def test_paths_normalise_array_indices() -> None:
    assert normalise_path("$.cards[12].pan[0]") == "$.cards[*].pan[*]"
    assert normalise_path("$.a.b") == "$.a.b"
