"""The group commit's adaptive wait: kept only where it measurably completes more calls."""

from __future__ import annotations

import asyncio

import pytest

from vaultline.commit_delay import CommitDelay
from vaultline.service import Coalescer

STEP = 0.002  # one chunk every 2 ms, as under load


def drive(tuner: CommitDelay, rate_waiting: float, rate_not: float, seconds: float,
          start: float = 100.0) -> list[tuple[float, float]]:
    """A service that completes `rate_*` calls per second depending on the tuner's choice;
    (time, wait returned) after each chunk."""
    out = []
    now = start
    while now < start + seconds:
        rate = rate_waiting if tuner.waiting else rate_not
        out.append((now, tuner.after_chunk(round(rate * STEP), now)))
        now += STEP
    return out


def test_waits_where_waiting_completes_more_calls() -> None:
    tuner = CommitDelay(0.002, probe=0.25, hold=2.0)
    waits = drive(tuner, rate_waiting=3000, rate_not=2500, seconds=4.0)
    held = [w for t, w in waits if 102.05 <= t < 103.95]  # after the eight probes
    assert held and all(w == 0.002 for w in held)


def test_does_not_wait_where_waiting_completes_fewer() -> None:
    tuner = CommitDelay(0.002, probe=0.25, hold=2.0)
    # 2 calls per 2 ms chunk with the wait, 3 without (whole calls: `drive` rounds).
    waits = drive(tuner, rate_waiting=1000, rate_not=1500, seconds=4.0)
    held = [w for t, w in waits if 102.05 <= t < 103.95]
    assert held and all(w == 0.0 for w in held)
    assert tuner.decisions == {True: 0, False: 1}
    assert tuner.last_gain == pytest.approx(2 / 3 - 1, abs=0.02)


def test_a_tie_keeps_no_wait() -> None:
    # Below saturation every call that arrives completes either way: waiting is pure latency.
    tuner = CommitDelay(0.002, probe=0.25, hold=2.0, margin=0.03)
    waits = drive(tuner, rate_waiting=2010, rate_not=2000, seconds=4.0)
    assert all(w == 0.0 for t, w in waits if 102.05 <= t < 103.95)


def test_one_phase_hit_by_a_pause_does_not_decide() -> None:
    # A garbage collection or a neighbour on the host halves one phase's rate: the median
    # of each group's four phases ignores it, where a sum would have lost the 20% gain.
    tuner = CommitDelay(0.002, probe=0.25, hold=2.0)
    out = []
    now = 100.0
    while now < 104.0:
        rate = 3000 if tuner.waiting else 2500
        if 100.30 <= now < 100.5:  # inside the first phase with the wait
            rate = 1000
        out.append((now, tuner.after_chunk(round(rate * STEP), now)))
        now += STEP
    assert tuner.decisions == {True: 1, False: 0}
    assert all(w == 0.002 for t, w in out if 102.05 <= t < 103.95)


def test_probes_off_on_on_off_twice_then_measures_again_after_the_hold() -> None:
    tuner = CommitDelay(0.002, probe=0.25, hold=1.0)
    waits = dict(drive(tuner, rate_waiting=3000, rate_not=2500, seconds=6.0))

    def at(t: float) -> float:
        return waits[min(waits, key=lambda x: abs(x - t))]

    pattern = [0.0, 0.002, 0.002, 0.0] * 2
    assert [at(100.1 + 0.25 * i) for i in range(8)] == pattern
    assert at(102.5) == 0.002  # held
    # The hold ends at ~103.0: the next probes start without the wait, then with it.
    assert [at(103.1 + 0.25 * i) for i in range(8)] == pattern


def test_the_hold_doubles_while_the_answer_stays_and_resets_when_it_changes() -> None:
    tuner = CommitDelay(0.002, probe=0.25, hold=1.0, max_hold=3.0)
    waits = drive(tuner, rate_waiting=3000, rate_not=2500, seconds=20.0)
    # While the wait is held, each probe sequence shows as three spells without it (phases
    # 1, 4-5 and 8); the first sequence starts without it, so only two of its spells count.
    off_starts = [
        t for (t, w), (_, before) in zip(waits[1:], waits[:-1], strict=True) if not w and before
    ]
    sequences = off_starts[2::3]  # the starts of sequences 2, 3, ...
    # A sequence is 2 s of probing; the holds after them: 1 s, then 2 s, then 3 s (the cap).
    assert sequences[0] == pytest.approx(103.0, abs=0.05)
    gaps = [round(b - a, 1) for a, b in zip(sequences[:-1], sequences[1:], strict=True)]
    assert gaps[:3] == [4.0, 5.0, 5.0]
    assert tuner.waiting_held is True
    flipped = drive(tuner, rate_waiting=1000, rate_not=2500, seconds=10.0, start=120.0)
    assert flipped[-1][1] == 0.0 and tuner.waiting_held is False


def test_an_idle_spell_discards_the_measurement() -> None:
    tuner = CommitDelay(0.002, probe=0.25, hold=10.0)
    drive(tuner, rate_waiting=3000, rate_not=2500, seconds=2.5)
    assert tuner.waiting
    # Traffic comes back after a pause longer than a probe: measure afresh, starting without.
    assert tuner.after_chunk(1, 200.0) == 0.0


def test_no_delay_never_waits() -> None:
    tuner = CommitDelay(0.0)
    assert {w for _, w in drive(tuner, 3000, 1000, seconds=2.0)} == {0.0}


@pytest.mark.parametrize("kwargs", [
    {"delay": -1}, {"probe": 0}, {"hold": -1}, {"hold": 5, "max_hold": 4}, {"margin": -0.1}])
def test_rejects_nonsense(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        CommitDelay(**kwargs)


class _AlwaysWait(CommitDelay):
    def after_chunk(self, completed: int, now: float) -> float:
        return 0.05


async def test_the_coalescer_gathers_during_the_wait_and_answers_everyone() -> None:
    chunks: list[list[str]] = []

    async def run_chunk(key: str, items: list[str]) -> list[str]:
        chunks.append(items)
        await asyncio.sleep(0.02)
        return [item.upper() for item in items]

    coalescer: Coalescer[str, str, str] = Coalescer(run_chunk, delay=_AlwaysWait())
    first = asyncio.ensure_future(coalescer.submit("g", "a"))
    await asyncio.sleep(0.01)  # chunk ["a"] is in flight
    second = asyncio.ensure_future(coalescer.submit("g", "b"))
    await asyncio.sleep(0.03)  # ["a"] is done; "b" waits for company
    third = asyncio.ensure_future(coalescer.submit("g", "c"))
    assert await asyncio.gather(first, second, third) == ["A", "B", "C"]
    assert chunks == [["a"], ["b", "c"]]


async def test_the_coalescer_never_waits_with_nobody_queued() -> None:
    async def run_chunk(key: str, items: list[str]) -> list[str]:
        return items

    coalescer: Coalescer[str, str, str] = Coalescer(run_chunk, delay=_AlwaysWait())
    assert await coalescer.submit("g", "a") == "a"
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert not coalescer._tasks, "the drainer exits at once instead of waiting 50 ms"
