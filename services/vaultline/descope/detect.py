"""The card-number detector for discovery and de-scoping, pure: text in, card spans out.

A card number, for discovery, is a run of 13–19 digits — written plain or with any mix of
single spaces, dashes or dots between digits — that passes Luhn and falls in an issuer range
Vaultline accepts (`card.Pan.parse`), and is not part of a longer digit run or glued to a
letter (a run inside a hex digest or an identifier is not a card). A longer run
(an order number, an IBAN, a timestamp glued to a number) is not a card as a whole; a card
may still be one or more of its separator-delimited groups (e.g. "4111 1111 1111 1111 1230",
a card then an expiry), taken leftmost-longest.

`CardSpan` keeps the card's position in the text (what de-scoping replaces) and never prints
the digits.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Final

from ..card import CardBrand, CardError, Pan

__all__ = ["CardSpan", "MAX_DIGITS", "MIN_DIGITS", "find_cards", "might_hold_card"]

MIN_DIGITS: Final = 13
MAX_DIGITS: Final = 19
# A maximal run of at least 13 digits joined by single separators (space, dash, dot),
# standing on its own: not glued to a letter, digit or underscore (a hex digest, an
# identifier). The engine tries the leftmost start first, so a run is found whole.
_RUN: Final = re.compile(r"(?<![0-9A-Za-z_])[0-9](?:[ .\-]?[0-9]){12,}(?![0-9A-Za-z_])")
_GROUP: Final = re.compile(r"[0-9]+")
# Cheap pre-filter: at least 13 digits joined by at most single separators somewhere.
_MAYBE: Final = re.compile(r"[0-9](?:[ .\-]?[0-9]){12}")


@dataclass(frozen=True, slots=True)
class CardSpan:
    """A card number found at text[start:end] (separators included)."""

    start: int
    end: int
    pan: Pan = field(repr=False)

    @property
    def brand(self) -> CardBrand:
        return self.pan.brand

    def masked(self, *, show_bin: bool = False) -> str:
        """The last four only (or BIN + last four): what a report may show."""
        digits = len(self.pan)
        if show_bin:
            return f"{self.pan.bin}{'*' * (digits - 10)}{self.pan.last4}"
        return f"{'*' * (digits - 4)}{self.pan.last4}"


def might_hold_card(text: str) -> bool:
    """False for text that cannot hold a card number (most values): the fast path."""
    return _MAYBE.search(text) is not None


def _card(digits: str) -> Pan | None:
    if not MIN_DIGITS <= len(digits) <= MAX_DIGITS:
        return None
    try:
        return Pan.parse(digits)
    except CardError:
        return None


def _in_run(text: str, start: int, end: int) -> Iterator[CardSpan]:
    """The cards of one maximal run text[start:end]."""
    run = text[start:end]
    digits = run.replace(" ", "").replace("-", "").replace(".", "")
    if len(digits) <= MAX_DIGITS:
        pan = _card(digits)
        if pan is not None:
            yield CardSpan(start, end, pan)
        return
    # Longer than a card: only whole separator-delimited groups may be one, leftmost-longest.
    groups = [(m.start(), m.end()) for m in _GROUP.finditer(run)]
    i = 0
    while i < len(groups):
        found = None
        for j in range(len(groups) - 1, i - 1, -1):
            s, e = groups[i][0], groups[j][1]
            count = sum(ge - gs for gs, ge in groups[i:j + 1])
            if count < MIN_DIGITS:
                break
            if count <= MAX_DIGITS:
                pan = _card(run[s:e].replace(" ", "").replace("-", "").replace(".", ""))
                if pan is not None:
                    found = (j, CardSpan(start + s, start + e, pan))
                    break
        if found is None:
            i += 1
            continue
        yield found[1]
        i = found[0] + 1


def find_cards(text: str) -> list[CardSpan]:
    """Every card number in `text`, in order, non-overlapping."""
    if not might_hold_card(text):
        return []
    spans: list[CardSpan] = []
    for match in _RUN.finditer(text):
        spans.extend(_in_run(text, match.start(), match.end()))
    return spans
