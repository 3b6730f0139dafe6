"""When a group commit should wait a little before its next chunk: decided by measurement.

After a chunk commits, waiting a couple of milliseconds before sending the next one lets more
calls join it. When the process is CPU-bound (many callers, the event loop never idle) that
makes every chunk, database round trip and burst of gRPC writes serve more calls, and the
service completes more calls per second: +20–25% unary Tokenize at 64 calls in flight on the
2-core benchmark machine. When it is not CPU-bound (a few callers, each waiting on the
database), the same wait only adds latency: −10–20% at 8–16 calls in flight. No signal the
service can read cheaply (queue length, chunk duration, loop utilisation) tells the two
apart reliably, so this measures the one thing that matters: which way more calls complete.

`CommitDelay` alternates short probe phases without and with the wait (off, on, on, off,
twice: a drift in the machine's speed cancels out), then holds the winner for a while and
probes again. The wait wins only if the median rate of its phases beats the median without it
by at least `margin`; a median, because one phase in a loaded process can lose a tenth of its
rate to a pause (a garbage collection, a checkpoint, a neighbour on the host) that has nothing
to do with the wait. On a tie (a service below saturation completes what arrives either way)
no wait is kept, because it would only add latency. Probing costs what the losing choice costs
while it is tried, so the hold doubles (up to `max_hold`) while the answer stays the same.
Pure: the caller passes the clock readings.
"""

from __future__ import annotations

import statistics
from typing import Final

_PROBES: Final = (False, True, True, False) * 2  # wait in each probe phase


class CommitDelay:
    """Say after each chunk whether to wait `delay` seconds before the next one."""

    def __init__(
        self,
        delay: float = 0.002,
        *,
        probe: float = 0.25,
        hold: float = 2.0,
        max_hold: float = 16.0,
        margin: float = 0.03,
    ) -> None:
        if delay < 0 or probe <= 0 or hold < 0 or max_hold < hold or margin < 0:
            raise ValueError("delay, hold and margin must be >= 0, probe > 0, max_hold >= hold")
        self.delay = delay
        self._probe = probe
        self._base_hold = hold
        self._max_hold = max_hold
        self._hold = hold
        self._margin = margin
        self.waiting = False  # the current phase's choice
        self.waiting_held: bool | None = None  # the last decision (None: none yet)
        # Read by the metrics at scrape time (`vaultline.observability`): what was decided.
        self.decisions = {True: 0, False: 0}  # probe sequences that ended waiting / not
        self.last_gain = 0.0  # the last probes' calls/s with the wait over without, minus 1
        self._phase = -1  # index into _PROBES; -1: holding a decision
        self._phase_start: float | None = None
        self._phase_end = 0.0
        self._completed = 0
        self._rates: list[float] = []

    def after_chunk(self, completed: int, now: float) -> float:
        """`completed` calls were just answered at monotonic time `now`: the seconds to wait
        before the next chunk (0.0: none)."""
        if self.delay == 0:
            return 0.0
        if self._phase_start is None or now - self._phase_end > self._probe:
            # First chunk, or the service was idle for a while: what was measured is stale.
            self._hold = self._base_hold
            self._start_probes(now)
        self._completed += completed
        if now >= self._phase_end:
            self._next_phase(now)
        return self.delay if self.waiting else 0.0

    def _start_probes(self, now: float) -> None:
        self._rates = []
        self._enter(0, now, self._probe, _PROBES[0])

    def _enter(self, phase: int, now: float, length: float, waiting: bool) -> None:
        self._phase = phase
        self._phase_start = now
        self._phase_end = now + length
        self._completed = 0
        self.waiting = waiting

    def _next_phase(self, now: float) -> None:
        if self._phase < 0:  # the hold is over: measure again
            self._start_probes(now)
            return
        assert self._phase_start is not None
        self._rates.append(self._completed / max(now - self._phase_start, 1e-9))
        if self._phase + 1 < len(_PROBES):
            self._enter(self._phase + 1, now, self._probe, _PROBES[self._phase + 1])
            return
        phases = list(zip(self._rates, _PROBES, strict=True))
        without = statistics.median(rate for rate, waited in phases if not waited)
        with_wait = statistics.median(rate for rate, waited in phases if waited)
        decided = with_wait > without * (1 + self._margin)
        self.decisions[decided] += 1
        self.last_gain = with_wait / without - 1 if without > 0 else 0.0
        if decided == self.waiting_held:
            self._hold = min(self._hold * 2, self._max_hold)
        else:
            self._hold = self._base_hold
        self.waiting_held = decided
        self._enter(-1, now, self._hold, decided)
