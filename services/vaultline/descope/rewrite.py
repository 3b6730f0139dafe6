"""Replacing card numbers with their tokens inside stored values, pure: text in, text out.

A card found by the detector (`detect.find_cards`) is replaced where it stands. A numeric token
with as many digits as the card takes the card's digits one for one, so separators and the
text around stay exactly as they were ("paid with 4111-1111-1111-1111 ok" keeps its dashes);
any other token (opaque, or a token of another length) replaces the card's characters whole.

`cards_in` lists what a value needs tokenized; `rewrite_text` and `rewrite_json` apply the
tokens. A JSON value is rewritten only in the strings (and numbers) at the plan's paths, where
an array index in a path stands for any index: `$.cards[0]` also covers `$.cards[3]`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Collection, Iterator, Mapping
from typing import Any, Final

from .detect import CardSpan, find_cards, might_hold_card

__all__ = ["cards_in", "cards_in_json", "normalise_path", "rewrite_json", "rewrite_text",
           "token_for_span"]

_INDEX: Final = re.compile(r"\[[0-9]+\]")


def normalise_path(path: str) -> str:
    """A JSON path with every array index as `[*]`."""
    return _INDEX.sub("[*]", path)


def token_for_span(text: str, span: CardSpan, token: str) -> str:
    """What replaces text[span.start:span.end]: the token's digits in the card's digits'
    places when they are as many, else the token."""
    card = text[span.start:span.end]
    if not token.isdigit() or len(token) != len(span.pan):
        return token
    digits = iter(token)
    return "".join(next(digits) if ch.isdigit() else ch for ch in card)


def cards_in(text: str | None) -> list[str]:
    """The card numbers (digits) of a text value."""
    if not text or not might_hold_card(text):
        return []
    return [span.pan.reveal() for span in find_cards(text)]


def rewrite_text(text: str, tokens: Mapping[str, str]) -> tuple[str, int]:
    """`text` with every card replaced by its token in `tokens` (by card digits), and how
    many were replaced. A card missing from `tokens` is a KeyError: never left silently."""
    if not might_hold_card(text):
        return text, 0
    spans = find_cards(text)
    if not spans:
        return text, 0
    parts: list[str] = []
    at = 0
    for span in spans:
        parts.append(text[at:span.start])
        parts.append(token_for_span(text, span, tokens[span.pan.reveal()]))
        at = span.end
    parts.append(text[at:])
    return "".join(parts), len(spans)


def _at_paths(doc: Any, paths: Collection[str], path: str = "$"
              ) -> Iterator[tuple[Any, Any, Any]]:
    """(container, key, value) of every string or number at one of `paths` (normalised)."""
    items: Iterator[tuple[Any, Any]]
    if isinstance(doc, dict):
        items = iter(doc.items())
        step = ".{}"
    elif isinstance(doc, list):
        items = enumerate(doc)
        step = "[{}]"
    else:
        return
    for key, value in items:
        here = path + step.format(key)
        if isinstance(value, dict | list):
            yield from _at_paths(value, paths, here)
        elif (isinstance(value, str) or (isinstance(value, int) and not isinstance(value, bool))
              ) and normalise_path(here) in paths:
            yield doc, key, value


def _parse(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return None


def cards_in_json(text: str | None, paths: Collection[str]) -> list[str]:
    """The card numbers at `paths` (normalised) of a JSON value."""
    if not text or not might_hold_card(text):
        return []
    doc = _parse(text)
    return [pan for _, _, value in _at_paths(doc, paths) for pan in cards_in(str(value))]


def rewrite_json(text: str, paths: Collection[str], tokens: Mapping[str, str]
                 ) -> tuple[str, int]:
    """The JSON value with the cards at `paths` (normalised) replaced, and how many. A card
    stored as a JSON number becomes a number again when its token is all digits."""
    if not might_hold_card(text):
        return text, 0
    doc = _parse(text)
    replaced = 0
    for container, key, value in list(_at_paths(doc, paths)):
        new, count = rewrite_text(str(value), tokens)
        if count:
            replaced += count
            container[key] = int(new) if isinstance(value, int) and new.isdigit() else new
    if not replaced:
        return text, 0
    return json.dumps(doc, ensure_ascii=False), replaced
