"""GroupCommit, the one group-commit primitive (the tokenizer's coalesced Tokenize chunks and
the audit writer), and AuditWriter on it, against in-memory fakes: no PostgreSQL needed."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt

import pytest

from vaultline.commit_delay import CommitDelay
from vaultline.errors import DatabaseUnavailable
from vaultline.group_commit import GroupCommit
from vaultline.security.audit import (
    GENESIS_HASH,
    AuditEvent,
    AuditWriter,
    PendingAudit,
    audit_columns,
    chain_hash,
    content_hash,
    verify_chain,
)
from vaultline.store import AUDIT_TEXT_COLUMNS, AuditColumns


class Recorder:
    """A batch runner that remembers its batches and can be held or made to fail."""

    def __init__(self, pause: float = 0.0) -> None:
        self.batches: list[list[str]] = []
        self.pause = pause
        self.in_flight = 0
        self.most_in_flight = 0
        self.fail_next: Exception | None = None

    async def __call__(self, key: str, items: list[str]) -> list[str]:
        self.batches.append(items)
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            await asyncio.sleep(self.pause)
            if self.fail_next is not None:
                exc, self.fail_next = self.fail_next, None
                raise exc
            return [f"{key}:{item}" for item in items]
        finally:
            self.in_flight -= 1


async def test_calls_of_one_loop_turn_leave_as_one_batch_each_with_its_own_result() -> None:
    run = Recorder()
    commit: GroupCommit[str, str, str] = GroupCommit(run)
    results = await asyncio.gather(*(commit.submit("g", str(i)) for i in range(5)))
    assert results == [f"g:{i}" for i in range(5)]
    assert run.batches == [["0", "1", "2", "3", "4"]]


async def test_calls_arriving_while_a_batch_runs_leave_together_as_the_next() -> None:
    run = Recorder(pause=0.02)
    commit: GroupCommit[str, str, str] = GroupCommit(run)
    first = asyncio.ensure_future(commit.submit("g", "a"))
    await asyncio.sleep(0.005)
    later = [asyncio.ensure_future(commit.submit("g", x)) for x in "bcd"]
    assert await asyncio.gather(first, *later) == ["g:a", "g:b", "g:c", "g:d"]
    assert run.batches == [["a"], ["b", "c", "d"]]
    assert run.most_in_flight == 1


async def test_groups_are_independent_and_forgotten_once_drained() -> None:
    run = Recorder(pause=0.01)
    commit: GroupCommit[str, str, str] = GroupCommit(run)
    assert await asyncio.gather(commit.submit("x", "1"), commit.submit("y", "1")) == [
        "x:1", "y:1"]
    assert run.most_in_flight == 2  # one batch per group, both at once
    await asyncio.sleep(0)
    assert commit._groups == {} and not commit._tasks


async def test_batches_hold_at_most_max_batch_and_never_split_an_item() -> None:
    sizes = {"a": 3, "b": 3, "c": 1, "d": 5}
    run = Recorder()
    commit: GroupCommit[str, str, str] = GroupCommit(run, max_batch=4, size=sizes.__getitem__)
    await asyncio.gather(*(commit.submit("g", x) for x in "abcd"))
    # "d" alone exceeds the limit: it still goes, alone, never cut in two.
    assert run.batches == [["a"], ["b", "c"], ["d"]]


async def test_a_failed_batch_fails_each_of_its_callers_and_the_next_batch_runs() -> None:
    run = Recorder(pause=0.01)
    commit: GroupCommit[str, str, str] = GroupCommit(run)
    run.fail_next = DatabaseUnavailable()
    first = [asyncio.ensure_future(commit.submit("g", x)) for x in "ab"]
    await asyncio.sleep(0.002)
    second = asyncio.ensure_future(commit.submit("g", "c"))
    outcomes = await asyncio.gather(*first, second, return_exceptions=True)
    assert [type(o) for o in outcomes[:2]] == [DatabaseUnavailable, DatabaseUnavailable]
    assert outcomes[2] == "g:c"


@pytest.mark.parametrize("skip_cancelled", [True, False])
async def test_a_cancelled_caller_is_skipped_only_when_asked(skip_cancelled: bool) -> None:
    run = Recorder(pause=0.01)
    commit: GroupCommit[str, str, str] = GroupCommit(run, skip_cancelled=skip_cancelled)
    first = asyncio.ensure_future(commit.submit("g", "a"))
    await asyncio.sleep(0.002)  # "a" is in flight; "b" and "c" queue behind it
    gone = asyncio.ensure_future(commit.submit("g", "b"))
    stays = asyncio.ensure_future(commit.submit("g", "c"))
    await asyncio.sleep(0)
    gone.cancel()
    assert await asyncio.gather(first, stays) == ["g:a", "g:c"]
    assert run.batches[1] == (["c"] if skip_cancelled else ["b", "c"])


async def test_max_in_flight_batches_run_at_once() -> None:
    run = Recorder(pause=0.01)
    commit: GroupCommit[str, str, str] = GroupCommit(run, max_in_flight=2, max_batch=1)
    await asyncio.gather(*(commit.submit("g", str(i)) for i in range(6)))
    assert run.most_in_flight == 2
    assert sorted(x for batch in run.batches for x in batch) == [str(i) for i in range(6)]


async def test_the_busy_window_fills_the_next_batch_while_one_is_in_flight() -> None:
    run = Recorder(pause=0.02)
    commit: GroupCommit[str, str, str] = GroupCommit(
        run, max_in_flight=2, busy_window=0.01)
    first = asyncio.ensure_future(commit.submit("g", "a"))
    await asyncio.sleep(0.002)  # "a" in flight: the second drainer waits for company
    second = asyncio.ensure_future(commit.submit("g", "b"))
    await asyncio.sleep(0.004)
    third = asyncio.ensure_future(commit.submit("g", "c"))
    assert await asyncio.gather(first, second, third) == ["g:a", "g:b", "g:c"]
    assert run.batches == [["a"], ["b", "c"]]


async def test_shutdown_answers_every_waiting_caller_with_the_closed_error() -> None:
    run = Recorder(pause=10)
    commit: GroupCommit[str, str, str] = GroupCommit(run, closed_error=DatabaseUnavailable)
    in_flight = asyncio.ensure_future(commit.submit("g", "a"))
    await asyncio.sleep(0.002)
    queued = asyncio.ensure_future(commit.submit("g", "b"))
    await asyncio.sleep(0)
    for task in list(commit._tasks):
        task.cancel()
    outcomes = await asyncio.gather(in_flight, queued, return_exceptions=True)
    assert [type(o) for o in outcomes] == [DatabaseUnavailable, DatabaseUnavailable]


def test_rejects_nonsense_limits() -> None:
    with pytest.raises(ValueError):
        GroupCommit(Recorder(), max_batch=0)
    with pytest.raises(ValueError):
        GroupCommit(Recorder(), max_in_flight=0)


class _AlwaysWait(CommitDelay):
    def after_chunk(self, completed: int, now: float) -> float:
        return 0.05


async def test_after_batch_gathers_during_the_wait_and_answers_everyone() -> None:
    chunks: list[list[str]] = []

    async def run_chunk(key: str, items: list[str]) -> list[str]:
        chunks.append(items)
        await asyncio.sleep(0.02)
        return [item.upper() for item in items]

    coalescer: GroupCommit[str, str, str] = GroupCommit(
        run_chunk, after_batch=_AlwaysWait().after_chunk)
    first = asyncio.ensure_future(coalescer.submit("g", "a"))
    await asyncio.sleep(0.01)  # chunk ["a"] is in flight
    second = asyncio.ensure_future(coalescer.submit("g", "b"))
    await asyncio.sleep(0.03)  # ["a"] is done; "b" waits for company
    third = asyncio.ensure_future(coalescer.submit("g", "c"))
    assert await asyncio.gather(first, second, third) == ["A", "B", "C"]
    assert chunks == [["a"], ["b", "c"]]


async def test_after_batch_never_waits_with_nobody_queued() -> None:
    async def run_chunk(key: str, items: list[str]) -> list[str]:
        return items

    coalescer: GroupCommit[str, str, str] = GroupCommit(
        run_chunk, after_batch=_AlwaysWait().after_chunk)
    assert await coalescer.submit("g", "a") == "a"
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert not coalescer._tasks, "the drainer exits at once instead of waiting 50 ms"


# ---- AuditWriter on GroupCommit ---------------------------------------------------------------


class MemoryAuditLog:
    """audit_append() (0002_audit.sql) in memory: chains each record onto the head."""

    def __init__(self, pause: float = 0.0) -> None:
        self.rows: list[dict[str, object]] = []
        self.head = (0, GENESIS_HASH)
        self.appends = 0
        self.pause = pause

    async def append_audit(
        self, records: AuditColumns, *, receipts: bool = True
    ) -> list[tuple[int, bytes]]:
        self.appends += 1
        await asyncio.sleep(self.pause)
        out = []
        for i, content in enumerate(records.hashes):
            seq, prev = self.head[0] + 1, self.head[1]
            digest = chain_hash(prev, content)
            row: dict[str, object] = {
                name: records.columns[n][i] for n, name in enumerate(AUDIT_TEXT_COLUMNS)}
            row["tokens"] = [t for t in str(row["tokens"]).split(" ") if t]
            row.update(seq=seq, at=records.ats[i], content_hash=content, prev_hash=prev,
                       hash=digest)
            self.rows.append(row)
            self.head = (seq, digest)
            out.append((seq, digest))
        return out if receipts else []


def _event(n: int, **extra: object) -> AuditEvent:
    return AuditEvent(identity="spiffe://vaultline/ivr/test", role="ivr", tenant="t",
                      method="/m", outcome="OK", request_id=f"r{n}", peer="p",
                      at=dt.datetime(2026, 1, 1, tzinfo=dt.UTC), **extra)  # type: ignore[arg-type]


async def test_the_audit_writer_coalesces_callers_into_one_intact_chain() -> None:
    log = MemoryAuditLog(pause=0.005)
    writer = AuditWriter(log)
    receipts = await asyncio.gather(
        *(writer.append([_event(2 * n), _event(2 * n + 1)]) for n in range(20)))
    assert log.appends < 20  # calls shared round trips
    # Each call's records landed together, in order, and the receipts say where.
    for n, pair in enumerate(receipts):
        assert [log.rows[r.seq - 1]["request_id"] for r in pair] == [f"r{2 * n}", f"r{2 * n + 1}"]
        assert pair[1].seq == pair[0].seq + 1
    assert verify_chain(log.rows, log.head).ok  # type: ignore[arg-type]


async def test_the_audit_writer_fetches_receipts_only_when_asked() -> None:
    log = MemoryAuditLog()
    writer = AuditWriter(log)
    assert await writer.record([_event(1)]) is None
    assert await writer.append([]) == []
    (receipt,) = await writer.append([_event(2)])
    assert receipt.seq == 2 and receipt.hash == log.head[1]


def test_a_pending_audit_names_its_token_once_known() -> None:
    pending = PendingAudit(_event(1))
    event = pending.with_token("tok_abc")
    assert event.token == "tok_abc" and pending.event.token == ""
    assert event == dataclasses.replace(pending.event, token="tok_abc")  # every other field kept
    template = _event(2, purpose="p", tokens=("a", "b"))
    assert PendingAudit(template).with_token("t") == dataclasses.replace(template, token="t")
    columns = audit_columns([event])
    assert columns.size == 1 and columns.columns[AUDIT_TEXT_COLUMNS.index("token")] == ["tok_abc"]
    assert columns.hashes == [content_hash(event)]
