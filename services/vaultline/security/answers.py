"""Watching what Tokenize answers tell each caller (pure).

Every Tokenize answer says something about a card: a new token (never seen), a returning one
(seen before), or a request id refused as reused. A caller whose answers suddenly confirm
known cards far more often than usual may be checking a list of card numbers against the
vault. `AnswerWatch` keeps, per identity, the share of confirming answers in fixed windows
and reports a window whose share jumps above that identity's usual one.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["AnswerWatch", "ShareJump"]


@dataclass(frozen=True, slots=True)
class ShareJump:
    identity: str
    share: float  # of the window that just closed
    usual: float  # the identity's usual share before it
    answers: int


class _Window:
    __slots__ = ("confirmed", "start", "total", "usual")

    def __init__(self, start: float) -> None:
        self.start = start
        self.total = 0
        self.confirmed = 0
        self.usual: float | None = None


class AnswerWatch:
    def __init__(
        self,
        *,
        window: float = 60.0,
        min_answers: int = 50,
        jump: float = 0.3,
        weight: float = 0.2,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """A window of at least `min_answers` answers whose confirming share is `jump` (in
        absolute share) above the usual one is reported; the usual share then moves toward
        each closed window by `weight` (an exponential average)."""
        self._window = window
        self._min = min_answers
        self._jump = jump
        self._weight = weight
        self._clock = clock
        self._by_identity: dict[str, _Window] = {}

    def observe(self, identity: str, answers: int, confirmed: int) -> ShareJump | None:
        """Count `answers`, `confirmed` of which confirmed a known card; a report when this
        closes a window whose share jumped."""
        now = self._clock()
        w = self._by_identity.get(identity)
        if w is None:
            w = self._by_identity[identity] = _Window(now)
        report = None
        if now - w.start >= self._window:
            report = self._close(identity, w)
            w.start, w.total, w.confirmed = now, 0, 0
        w.total += answers
        w.confirmed += confirmed
        return report

    def _close(self, identity: str, w: _Window) -> ShareJump | None:
        if w.total < self._min:
            return None
        share = w.confirmed / w.total
        usual = w.usual
        w.usual = share if usual is None else usual + self._weight * (share - usual)
        if usual is not None and share - usual >= self._jump:
            return ShareJump(identity, share, usual, w.total)
        return None
