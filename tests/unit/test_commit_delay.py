"""The group commit's adaptive wait: kept only where it measurably completes more calls."""

from __future__ import annotations

import asyncio

import pytest

from vaultline.commit_delay import CommitDelay
from vaultline.service import Coalescer

STEP = 0.002  # one chunk every 2 ms, as under load
MS = 0.001


def drive(tuner: CommitDelay, rates: dict[float, float], seconds: float,
          start: float = 100.0) -> list[tuple[float, float]]:
    """A service that completes `rates[wait]` calls per second at each wait the tuner picks;
    (time, wait returned) after each chunk. Keep rates multiples of 500: whole calls per chunk."""
    out = []
    now = start
    while now < start + seconds:
        out.append((now, tuner.after_chunk(round(rates[tuner.wait] * STEP), now)))
        now += STEP
    return out


def waits_between(out: list[tuple[float, float]], begin: float, end: float) -> set[float]:
    return {w for t, w in out if begin <= t < end}


# Shapes measured on the benchmark machine (see the module docstring), as calls/s by wait.
MANY_CALLERS = {0.0: 2500, 2 * MS: 3000, 4 * MS: 3500}  # 64 in flight: the longest wait pays
SOME_CALLERS = {0.0: 2500, 2 * MS: 3000, 4 * MS: 2500}  # 32: the middle one
FEW_CALLERS = {0.0: 2000, 2 * MS: 1500, 4 * MS: 1000}  # 8-16: any wait loses
TIED = {0.0: 2000, 2 * MS: 2000, 4 * MS: 2000}  # below saturation


def test_the_levels_are_none_half_and_the_delay() -> None:
    assert CommitDelay(4 * MS).levels == (0.0, 2 * MS, 4 * MS)


def test_climbs_to_the_longest_wait_where_each_step_completes_more_calls() -> None:
    tuner = CommitDelay(4 * MS, probe=0.25, hold=2.0)
    out = drive(tuner, MANY_CALLERS, seconds=8.0)
    # Two probes climb (100-102, 102-104), the third keeps 4 ms against 2 ms (104-106).
    assert tuner.decisions == {"longer": 2, "shorter": 0, "kept": 1}
    assert waits_between(out, 106.05, 107.95) == {4 * MS}
    assert tuner.level == 2


def test_stops_at_the_middle_when_the_longest_wait_loses() -> None:
    tuner = CommitDelay(4 * MS, probe=0.25, hold=2.0)
    out = drive(tuner, SOME_CALLERS, seconds=12.0)
    assert tuner.level == 1
    assert waits_between(out, 104.05, 105.95) == {2 * MS}  # held after 4 ms lost
    # The next probe tries the other side (none), which loses too: held again, longer.
    assert tuner.decisions == {"longer": 1, "shorter": 0, "kept": 2}
    assert waits_between(out, 108.05, 111.95) == {2 * MS}
    assert tuner.last_gain == pytest.approx(2500 / 3000 - 1, abs=0.02)


def test_does_not_wait_where_waiting_completes_fewer() -> None:
    tuner = CommitDelay(4 * MS, probe=0.25, hold=2.0)
    out = drive(tuner, FEW_CALLERS, seconds=4.0)
    assert waits_between(out, 102.05, 103.95) == {0.0}
    assert tuner.decisions == {"longer": 0, "shorter": 0, "kept": 1}
    assert tuner.last_gain == pytest.approx(1500 / 2000 - 1, abs=0.02)


def test_a_tie_keeps_no_wait() -> None:
    tuner = CommitDelay(4 * MS, probe=0.25, hold=2.0, margin=0.03)
    out = drive(tuner, TIED, seconds=10.0)
    assert tuner.level == 0
    assert waits_between(out, 102.05, 103.95) == {0.0}


def test_comes_back_down_when_the_callers_go() -> None:
    tuner = CommitDelay(4 * MS, probe=0.25, hold=2.0)
    drive(tuner, MANY_CALLERS, seconds=6.0)
    assert tuner.level == 2
    # Now a few callers: 4 ms loses, 2 ms ties with none. A tie goes to the shorter wait.
    out = drive(tuner, {0.0: 2500, 2 * MS: 2500, 4 * MS: 2000}, seconds=10.0, start=106.0)
    assert tuner.level == 0
    assert tuner.decisions["shorter"] == 2
    assert out[-1][1] == 0.0


def test_one_phase_hit_by_a_pause_does_not_decide() -> None:
    # A garbage collection or a neighbour on the host stalls most of one phase: the median
    # of each side's four phases ignores it, where their sums would have lost the 20% gain.
    tuner = CommitDelay(4 * MS, probe=0.25, hold=2.0)
    now = 100.0
    while now < 102.1:
        rate = 0 if 100.27 <= now < 100.5 else SOME_CALLERS[tuner.wait]
        tuner.after_chunk(round(rate * STEP), now)
        now += STEP
    assert tuner.decisions["longer"] == 1 and tuner.level == 1


def test_a_probe_alternates_level_and_neighbour_twice_then_holds() -> None:
    tuner = CommitDelay(4 * MS, probe=0.25, hold=1.0)
    waits = dict(drive(tuner, FEW_CALLERS, seconds=6.0))

    def at(t: float) -> float:
        return waits[min(waits, key=lambda x: abs(x - t))]

    pattern = [0.0, 2 * MS, 2 * MS, 0.0] * 2
    assert [at(100.1 + 0.25 * i) for i in range(8)] == pattern
    assert at(102.5) == 0.0  # held
    # The hold ends at ~103.0: at no wait there is only one neighbour to try again.
    assert [at(103.1 + 0.25 * i) for i in range(8)] == pattern


def test_the_hold_doubles_while_the_level_stays() -> None:
    tuner = CommitDelay(4 * MS, probe=0.25, hold=1.0, max_hold=3.0)
    out = drive(tuner, FEW_CALLERS, seconds=24.0)
    # Each probe shows as two spells at 2 ms (phases 2-3 and 6-7); the first starts 0.25 s
    # after the probe does.
    spells = [t for (t, w), (_, before) in zip(out[1:], out[:-1], strict=True)
              if w and not before]
    starts = spells[::2]
    assert starts[0] == pytest.approx(100.25, abs=0.05)
    # A probe is 2 s; the holds after them: 1 s, then 2 s, then 3 s (the cap).
    gaps = [round(b - a, 1) for a, b in zip(starts[:-1], starts[1:], strict=True)]
    assert gaps[:4] == [3.0, 4.0, 5.0, 5.0]


def test_an_idle_spell_discards_the_measurement() -> None:
    tuner = CommitDelay(4 * MS, probe=0.25, hold=10.0)
    drive(tuner, MANY_CALLERS, seconds=6.0)
    assert tuner.level == 2
    # Traffic comes back after a pause longer than a probe: measure afresh, from the level
    # held (4 ms), against the only neighbour it has (2 ms).
    assert tuner.after_chunk(1, 200.0) == 4 * MS
    assert tuner.after_chunk(1, 200.3) == 2 * MS


def test_no_delay_never_waits() -> None:
    tuner = CommitDelay(0.0)
    assert waits_between(drive(tuner, {0.0: 3000}, seconds=2.0), 0, 1e9) == {0.0}


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
