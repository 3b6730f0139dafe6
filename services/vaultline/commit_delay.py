"""How long a group commit should wait before its next chunk: decided by measurement.

After a chunk commits, waiting a few milliseconds before sending the next one lets more calls
join it. When the process is CPU-bound (many callers, the event loop never idle) that makes
every chunk, database round trip and burst of gRPC writes serve more calls, and the service
completes more calls per second. When it is not, the same wait only adds latency. How long
pays depends on how many calls are in flight (the paired-window measurements are in
load/README.md, "Group commit waits for company only where it measurably pays").

No signal the service can read cheaply (queue length, chunk duration, loop utilisation) tells
these cases apart, so this measures the one thing that matters: which wait completes more
calls. The waits tried are none, half of `delay` and `delay` (the levels). A probe alternates
phases at the current level and at a neighbouring one (current, neighbour, neighbour,
current, twice: a drift in the machine's speed cancels out) and compares the median rate of
each; a median, because one phase in a loaded process can lose a tenth of its rate to a pause
(a garbage collection, a checkpoint, a neighbour on the host) that has nothing to do with the
wait. A longer wait must win by `margin`; a shorter one is taken when it completes at least
as many calls, because below saturation every call completes either way and the wait is only
latency (a true tie measures either way round; the shorter wait wins one of the probes and
no longer one ever wins by `margin`). Taking the shorter wait on anything short of a clear
loss walked busy services down on noise.

It starts in the middle and first tries the longer wait, so a busy service reaches the
longest after one probe; a few callers pay the middle wait until the probes have walked it
down. After a move the next probe follows at once in the same direction; a move that reaches
either end of the range holds there first. After a probe that keeps the level, the next one
tries the other neighbour, after a hold that doubles (up to `max_hold`) while the level
stays: probing costs what the losing wait costs while it is tried. A service idle for longer
than a phase starts measuring afresh, from the level it held.

Phases last `probe` seconds: half a second, because quarter-second phases at the same wait
differed enough in rate to walk the level back and forth (load/README.md).

Pure: the caller passes the clock readings.
"""

from __future__ import annotations

import statistics
from typing import Final

_PATTERN: Final = (False, True, True, False) * 2  # each probe phase: at the neighbour?


class CommitDelay:
    """Say after each chunk how long to wait before the next one."""

    def __init__(
        self,
        delay: float = 0.004,
        *,
        probe: float = 0.5,
        hold: float = 2.0,
        max_hold: float = 16.0,
        margin: float = 0.03,
    ) -> None:
        if delay < 0 or probe <= 0 or hold < 0 or max_hold < hold or margin < 0:
            raise ValueError("delay, hold and margin must be >= 0, probe > 0, max_hold >= hold")
        self.delay = delay
        self.levels: tuple[float, ...] = (0.0, delay / 2, delay)
        self._probe = probe
        self._base_hold = hold
        self._max_hold = max_hold
        self._hold = hold
        self._margin = margin
        self.level = 1  # index into `levels`: the wait decided on; first, the middle one
        self.wait = self.levels[1]  # the current phase's wait (a probe may try a neighbour)
        # Read by the metrics at scrape time (`vaultline.observability`).
        self.decisions = {"longer": 0, "shorter": 0, "kept": 0}
        self.last_gain = 0.0  # the last probe: the neighbour's median rate over the level's, - 1
        self._step = 1  # the neighbour the next probe tries: +1 longer, -1 shorter
        self._neighbour = 0
        self._phase = -1  # index into _PATTERN; -1: holding the level
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
            self._start_probe(now)
        self._completed += completed
        if now >= self._phase_end:
            self._next_phase(now)
        return self.wait

    def _can_step(self) -> bool:
        return 0 <= self.level + self._step < len(self.levels)

    def _start_probe(self, now: float) -> None:
        if not self._can_step():
            self._step = -self._step
        self._neighbour = self.level + self._step
        self._rates = []
        self._enter(0, now, self._probe)

    def _enter(self, phase: int, now: float, length: float) -> None:
        self._phase = phase
        self._phase_start = now
        self._phase_end = now + length
        self._completed = 0
        at_neighbour = phase >= 0 and _PATTERN[phase]
        self.wait = self.levels[self._neighbour if at_neighbour else self.level]

    def _next_phase(self, now: float) -> None:
        if self._phase < 0:  # the hold is over: measure again
            self._start_probe(now)
            return
        assert self._phase_start is not None
        self._rates.append(self._completed / max(now - self._phase_start, 1e-9))
        if self._phase + 1 < len(_PATTERN):
            self._enter(self._phase + 1, now, self._probe)
            return
        phases = list(zip(self._rates, _PATTERN, strict=True))
        current = statistics.median(rate for rate, neighbour in phases if not neighbour)
        neighbour = statistics.median(rate for rate, neighbour in phases if neighbour)
        self.last_gain = neighbour / current - 1 if current > 0 else 0.0
        if self._step > 0:  # a longer wait must earn its latency
            move = neighbour > current * (1 + self._margin)
        else:  # a shorter one, when it completes at least as many
            move = neighbour >= current
        if move:
            self.decisions["longer" if self._step > 0 else "shorter"] += 1
            self.level = self._neighbour
            self._hold = self._base_hold
            if self._can_step():
                self._start_probe(now)  # keep going the same way at once
                return
            # At the end of the range: hold there, rather than probe straight back.
        else:
            self.decisions["kept"] += 1
        self._step = -self._step  # next time, try the other side
        hold, self._hold = self._hold, min(self._hold * 2, self._max_hold)
        self._enter(-1, now, hold)
