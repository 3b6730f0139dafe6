"""The card networks' public test card numbers: the only card numbers tests may use.

Keyed by `CardBrand` member name. Every number is Luhn-valid and is detected as its brand
(checked by tests/unit/test_card.py).
"""

from __future__ import annotations

TEST_CARDS: dict[str, list[str]] = {
    "VISA": [
        "4111111111111111",
        "4012888888881881",
        "4242424242424242",
        "4000056655665556",
        "4000000760000002",
        "4222222222222",  # 13 digits
    ],
    "MASTERCARD": [
        "5555555555554444",
        "5105105105105100",
        "5200828282828210",
        "2223003122003222",  # 2-series
    ],
    "AMEX": ["378282246310005", "371449635398431"],
    "DISCOVER": [
        "6011111111111117",
        "6011000990139424",
        "6445644564456445",  # 644-649 range
    ],
    "JCB": ["3530111333300000", "3566002020360505"],
    "DINERS": [
        "30569309025904",  # 14 digits
        "38520000023237",
        "36227206271667",
        "3056930009020004",  # 16 digits
    ],
    "UNIONPAY": [
        "6200000000000005",
        "6250941006528599",
        "6205500000000000004",  # 19 digits
    ],
    "MAESTRO": [
        "6759649826438453",
        "6799990100000000019",  # 19 digits
    ],
}

ALL_TEST_PANS: list[str] = [pan for pans in TEST_CARDS.values() for pan in pans]
