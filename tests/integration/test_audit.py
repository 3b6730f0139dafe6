"""Audit trail against a real PostgreSQL: chained appends, insert-only grants, tamper detection.

Appends and grants are tested on the session database (`migrated`), whose audit chain other
tests share and must stay intact. Tampering happens only in a throwaway database per test,
migrated the same way, so no restore is needed and nothing leaks into other tests.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime as dt
import io
import json
import random
import urllib.parse
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import pytest_asyncio

from tests.fixtures.infra import OpenBaoHandle, PostgresHandle
from tests.helpers import unique_name
from vaultline.cli import audit as audit_cli
from vaultline.errors import DatabaseUnavailable
from vaultline.security.anchor import AuditCheckpointer, verify_anchored
from vaultline.security.audit import (
    FIELDS,
    GENESIS_HASH,
    AuditEvent,
    AuditReceipt,
    AuditWriter,
    Checkpoint,
    VerifyReport,
    audit_columns,
    chain_hash,
    content_hash,
    verify_chain,
    verify_store,
)
from vaultline.store import NewTokens, Store, migrate
from vaultline.vault import TransitClient, VaultError

pytestmark = pytest.mark.integration


def _with_db(dsn: str, database: str) -> str:
    return urllib.parse.urlunsplit(urllib.parse.urlsplit(dsn)._replace(path=f"/{database}"))


def make_events(
    n: int, *, tenant: str, identity: str = "spiffe://vaultline/settlement/settlement-1"
) -> list[AuditEvent]:
    now = dt.datetime.now(dt.UTC)
    return [
        AuditEvent(
            identity=identity,
            role=identity.split("/")[-2],
            tenant=tenant,
            method="/vaultline.tokenization.v1.TokenizationService/BatchDetokenize",
            outcome="OK" if i % 5 else "PERMISSION_DENIED",
            request_id=f"req-{uuid.uuid4().hex[:8]}",
            peer="ipv4:127.0.0.1:50123",
            token=f"tok_{i:06d}" if i % 3 and i % 4 != 1 else "",
            purpose="settlement" if i % 2 else "",
            at=now + dt.timedelta(microseconds=i * 7 + 1),
            # every fourth record is a chunk's reveal list (format 2)
            tokens=(f"tok_{i:06d}a", f"tok_{i:06d}b", f"{i:016d}") if i % 4 == 1 else (),
        )
        for i in range(n)
    ]


class CountingStore(Store):
    """A real store that counts append round trips."""

    appends = 0

    async def append_audit(self, *args: Any, **kwargs: Any) -> list[tuple[int, bytes]]:
        self.appends += 1
        return await super().append_audit(*args, **kwargs)


@pytest_asyncio.fixture
async def app_store(migrated: PostgresHandle) -> AsyncIterator[CountingStore]:
    store = await CountingStore.connect(migrated.app_dsn, min_size=2, max_size=4)
    yield store  # type: ignore[misc]
    await store.close()


@pytest.fixture
def tenant() -> str:
    return unique_name("audit-", 10)


async def _rows_by_seq(dsn: str, seqs: list[int]) -> dict[int, asyncpg.Record]:
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch("SELECT * FROM audit_log WHERE seq = ANY($1::bigint[])", seqs)
    finally:
        await conn.close()
    return {r["seq"]: r for r in rows}


async def _verify_range(store: Store, first: int, last: int) -> VerifyReport:
    """Verify records first..last of the shared chain, linked from record first-1.

    The whole shared chain is not ours to judge: other tests write to it too."""
    start = (0, GENESIS_HASH)
    if first > 1:
        (before,) = await store.list_audit(first - 2, 1)
        start = (before["seq"], bytes(before["hash"]))
    rows = await store.list_audit(first - 1, last - first + 1)
    return verify_chain(rows, None, start=start)


# ---- appends -------------------------------------------------------------------------------


async def test_concurrent_appends_are_contiguous_chained_and_coalesced(
    app_store: CountingStore, migrated: PostgresHandle, superuser_db: str, tenant: str
) -> None:
    writer = AuditWriter(app_store)
    rng = random.Random(7)
    sizes = [rng.choice([1, 1, 1, 2, 5, 40]) for _ in range(400)]
    calls = [make_events(n, tenant=tenant) for n in sizes]

    async def worker(part: list[list[AuditEvent]]) -> list[list[AuditReceipt]]:
        return [await writer.append(events) for events in part]

    parts = await asyncio.gather(*(worker(calls[i::16]) for i in range(16)))
    receipts = {
        id(events): got
        for i, part in enumerate(parts)
        for events, got in zip(calls[i::16], part, strict=True)
    }
    every = [r for got in receipts.values() for r in got]
    seqs = sorted(r.seq for r in every)
    assert len(seqs) == sum(sizes) and len(set(seqs)) == len(seqs)
    # Nothing else appends while this test runs, so our records fill one contiguous range.
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))
    assert app_store.appends < len(calls) // 4, "concurrent calls must share round trips"

    stored = await _rows_by_seq(superuser_db, seqs)
    for events in calls:
        got = receipts[id(events)]
        # One call's records are consecutive and in call order.
        assert [r.seq for r in got] == list(range(got[0].seq, got[0].seq + len(events)))
        for event, receipt in zip(events, got, strict=True):
            row = stored[receipt.seq]
            assert bytes(row["hash"]) == receipt.hash
            assert bytes(row["content_hash"]) == content_hash(event)
            assert row["at"] == event.at  # microseconds survive timestamptz exactly
            assert {n: row[n] for n in FIELDS} == {n: getattr(event, n) for n in FIELDS}

    report = await _verify_range(app_store, seqs[0], seqs[-1])
    assert report.ok and report.checked == len(seqs), report


async def test_record_returns_only_after_commit(
    app_store: CountingStore, superuser_db: str, tenant: str
) -> None:
    writer = AuditWriter(app_store)
    events = make_events(3, tenant=tenant)
    receipts = await writer.append(events)
    # Visible to another session at once: committed, not merely sent.
    rows = await _rows_by_seq(superuser_db, [r.seq for r in receipts])
    assert sorted(rows) == [r.seq for r in receipts]
    assert await writer.record([]) is None


async def test_large_call_is_one_atomic_batch(app_store: CountingStore, tenant: str) -> None:
    writer = AuditWriter(app_store, max_batch=100)
    before = app_store.appends
    receipts = await writer.append(make_events(1000, tenant=tenant))
    assert app_store.appends == before + 1
    assert [r.seq for r in receipts] == list(range(receipts[0].seq, receipts[0].seq + 1000))


async def test_hostile_text_is_stored_and_verifies(
    app_store: CountingStore, migrated: PostgresHandle, superuser_db: str, tenant: str
) -> None:
    paris = dt.timezone(dt.timedelta(hours=2))
    event = dataclasses.replace(
        make_events(1, tenant=tenant)[0],
        request_id="a\x00b\x1b[31m",
        purpose="é ✓ \ud800",
        # Another zone and every microsecond (audit_append takes only records dated now).
        at=dt.datetime.now(paris).replace(microsecond=999999),
    )
    (receipt,) = await AuditWriter(app_store).append([event])
    row = (await _rows_by_seq(superuser_db, [receipt.seq]))[receipt.seq]
    assert row["request_id"] == "a\ufffdb\x1b[31m"
    assert row["at"] == event.at
    report = await _verify_range(app_store, receipt.seq, receipt.seq)
    assert report.ok, report


@pytest.mark.parametrize("age", [dt.timedelta(days=365), dt.timedelta(hours=1),
                                 -dt.timedelta(hours=1)])
async def test_the_application_role_cannot_date_a_record_in_the_past_or_future(
    app_store: CountingStore, tenant: str, age: dt.timedelta
) -> None:
    # Issue 14, finding 3a: the role every service shares appended a "settlement-2 approved"
    # record dated last year.
    (event,) = make_events(1, tenant=tenant, identity="spiffe://vaultline/settlement/settlement-2")
    forged = dataclasses.replace(event, outcome="APPROVED", at=event.at - age)
    with pytest.raises(asyncpg.InvalidParameterValueError, match="not dated now"):
        await app_store.append_audit(audit_columns([forged]))


async def test_audit_append_recomputes_every_content_hash(
    app_store: CountingStore, tenant: str
) -> None:
    honest, other = make_events(2, tenant=tenant)
    columns = audit_columns([honest])
    columns.hashes[0] = content_hash(other)  # a hash of something else than the fields
    with pytest.raises(asyncpg.InvalidParameterValueError, match="content hash"):
        await app_store.append_audit(columns)
    # Every record appended in these tests passed the same check: the SQL encoding is the
    # Python one, byte for byte, for both formats and hostile text.
    assert (await app_store.append_audit(audit_columns([honest])))[0][0] >= 1


async def test_cancelled_caller_still_gets_its_record_written(
    app_store: CountingStore, superuser_db: str, tenant: str
) -> None:
    writer = AuditWriter(app_store)
    (event,) = make_events(1, tenant=tenant)
    task = asyncio.create_task(writer.record([event]))
    await asyncio.sleep(0)
    task.cancel()
    conn = await asyncpg.connect(superuser_db)
    try:
        for _ in range(200):
            if await conn.fetchval(
                "SELECT count(*) FROM audit_log WHERE request_id = $1", event.request_id
            ):
                break
            await asyncio.sleep(0.01)
        else:
            pytest.fail("a denied or revealing call must be audited even if its caller left")
    finally:
        await conn.close()


async def test_outage_surfaces_as_database_unavailable(
    migrated: PostgresHandle, tenant: str
) -> None:
    store = await Store.connect(migrated.app_dsn, min_size=1, max_size=1)
    await store.close()
    writer = AuditWriter(store)
    calls = [writer.record(make_events(2, tenant=tenant)) for _ in range(5)]
    results = await asyncio.gather(*calls, return_exceptions=True)
    assert all(isinstance(r, DatabaseUnavailable) for r in results), results


# ---- grants --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "sql",
    [
        "UPDATE audit_log SET purpose = 'x' WHERE seq = 1",
        "DELETE FROM audit_log WHERE seq = 1",
        "TRUNCATE audit_log",
        "INSERT INTO audit_log (seq, at, identity, role, tenant, method, token, purpose, outcome,"
        " request_id, peer, content_hash, prev_hash, hash) SELECT seq + 1000000, at, identity,"
        " role, tenant, method, token, purpose, outcome, request_id, peer, content_hash,"
        " prev_hash, hash FROM audit_log LIMIT 1",
        "UPDATE audit_head SET seq = 0",
        "DELETE FROM audit_head",
        "INSERT INTO audit_head (singleton, seq, hash) VALUES (false, 0, '\\x00')",
        "TRUNCATE audit_head",
        "ALTER TABLE audit_log DISABLE TRIGGER USER",
        "DROP FUNCTION audit_append",
    ],
)
async def test_service_role_cannot_change_the_trail(
    app_store: CountingStore, migrated: PostgresHandle, tenant: str, sql: str
) -> None:
    await AuditWriter(app_store).record(make_events(1, tenant=tenant))  # seq 1 exists
    conn = await asyncpg.connect(migrated.app_dsn)
    try:
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await conn.execute(sql)
        # ...while it may read both tables and append through the function.
        assert await conn.fetchval("SELECT count(*) FROM audit_log WHERE seq = 1") == 1
        assert await conn.fetchval("SELECT seq FROM audit_head") >= 1
    finally:
        await conn.close()


@pytest.mark.parametrize(
    "sql",
    ["UPDATE audit_log SET purpose = 'x' WHERE seq = 1", "DELETE FROM audit_log WHERE seq = 1",
     "TRUNCATE audit_log"],
)
async def test_even_the_owner_is_refused_by_the_append_only_triggers(
    app_store: CountingStore, migrated: PostgresHandle, tenant: str, sql: str
) -> None:
    await AuditWriter(app_store).record(make_events(1, tenant=tenant))
    conn = await asyncpg.connect(migrated.owner_dsn)
    try:
        tx = conn.transaction()
        await tx.start()
        try:
            with pytest.raises(asyncpg.InsufficientPrivilegeError, match="append-only"):
                await conn.execute(sql)
        finally:
            await tx.rollback()  # whatever happened, the shared trail is left as it was
    finally:
        await conn.close()


async def test_append_function_is_not_executable_by_public(superuser_db: str) -> None:
    conn = await asyncpg.connect(superuser_db)
    try:
        rows = await conn.fetch(
            "SELECT p.prosecdef, p.proconfig, pg_get_userbyid(p.proowner) AS owner,"
            " has_function_privilege('public', p.oid, 'EXECUTE') AS public_exec,"
            " has_function_privilege('vaultline_app', p.oid, 'EXECUTE') AS app_exec"
            " FROM pg_proc p WHERE p.proname = 'audit_append'"
        )
        app_can_insert = await conn.fetchval(
            "SELECT has_table_privilege('vaultline_app', 'audit_log', 'INSERT')"
        )
    finally:
        await conn.close()
    assert len(rows) == 1
    (fn,) = rows
    assert fn["prosecdef"] and fn["owner"] == "vaultline_owner"
    assert fn["proconfig"] == ["search_path=public, pg_temp"]
    assert fn["app_exec"] and not fn["public_exec"]
    assert not app_can_insert, "the only write path is audit_append"


# ---- tampering, in a database of its own -------------------------------------------------------


@dataclasses.dataclass
class Scratch:
    app_dsn: str = dataclasses.field(repr=False)
    superuser_dsn: str = dataclasses.field(repr=False)
    receipts: list[AuditReceipt]
    auditor_dsn: str = dataclasses.field(repr=False, default="")  # read-only: the CLI's

    async def sql(self, *statements: str) -> None:
        """Run statements as a superuser with the append-only triggers off, as an attacker."""
        conn = await asyncpg.connect(self.superuser_dsn)
        try:
            await conn.execute("SET session_replication_role = replica")
            for statement in statements:
                await conn.execute(statement)
        finally:
            await conn.close()


@pytest_asyncio.fixture
async def scratch(migrated: PostgresHandle) -> AsyncIterator[Scratch]:
    """A fresh, migrated vault database holding 30 chained records (seq 1-30)."""
    name = "vaultline_audit_" + uuid.uuid4().hex[:10]
    root = await asyncpg.connect(migrated.superuser_dsn)
    try:
        await root.execute(f'CREATE DATABASE "{name}" OWNER vaultline_owner TEMPLATE template0')
        db = await asyncpg.connect(_with_db(migrated.superuser_dsn, name))
        try:  # as bootstrap_database sets up the real one
            await db.execute("ALTER SCHEMA public OWNER TO vaultline_owner")
            await db.execute("REVOKE CREATE ON SCHEMA public FROM PUBLIC")
        finally:
            await db.close()
        await migrate(_with_db(migrated.owner_dsn, name))
        app_dsn = _with_db(migrated.app_dsn, name)
        store = await Store.connect(app_dsn, min_size=1, max_size=2)
        try:
            writer = AuditWriter(store)
            receipts = await writer.append(make_events(10, tenant="scratch"))
            receipts += [
                r for batch in await asyncio.gather(
                    *(writer.append(make_events(5, tenant="scratch")) for _ in range(4))
                ) for r in batch
            ]
        finally:
            await store.close()
        yield Scratch(app_dsn, _with_db(migrated.superuser_dsn, name), receipts,
                      _with_db(migrated.auditor_dsn, name))
    finally:
        await root.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await root.close()


def _verify_cli(dsn: str) -> tuple[int, str]:
    out = io.StringIO()
    code = audit_cli.run_verify(dsn, out=out, err=io.StringIO(), page_size=7)
    return code, out.getvalue()


async def test_untouched_chain_verifies(scratch: Scratch) -> None:
    assert sorted(r.seq for r in scratch.receipts) == list(range(1, 31))
    code, out = await asyncio.to_thread(_verify_cli, scratch.auditor_dsn)
    assert code == 0
    assert out.startswith("chain intact: 30 records (head seq 30, sha256 ")
    report, head = await audit_cli.verify_database(scratch.app_dsn, page_size=4)
    assert report.ok and report.checked == 30
    assert head == (30, max(scratch.receipts).hash)


async def test_empty_chain_verifies(migrated: PostgresHandle, scratch: Scratch) -> None:
    await scratch.sql("DELETE FROM audit_log",
                      "UPDATE audit_head SET seq = 0, hash = decode(repeat('00', 32), 'hex')")
    report, head = await audit_cli.verify_database(scratch.app_dsn)
    assert report.ok and report.checked == 0 and head == (0, GENESIS_HASH)


_ALL = "at, " + ", ".join(FIELDS) + ", tokens, content_hash, prev_hash, hash"

TAMPERING: dict[str, tuple[list[str], int, str]] = {
    "edit a field": (
        ["UPDATE audit_log SET outcome = 'UNKNOWN' WHERE seq = 12"], 12, "was edited"),
    "edit the time": (
        ["UPDATE audit_log SET at = at + interval '1 microsecond' WHERE seq = 3"], 3,
        "was edited"),
    "edit the hash column": (
        ["UPDATE audit_log SET hash = sha256('x') WHERE seq = 9"], 9, "wrong hash"),
    "delete one": (["DELETE FROM audit_log WHERE seq = 17"], 17, "record 17 missing (deleted)"),
    "delete one and renumber": (
        ["DELETE FROM audit_log WHERE seq = 17",
         "UPDATE audit_log SET seq = seq - 1 WHERE seq > 17",
         "UPDATE audit_head SET seq = seq - 1"], 17, "does not link to record 16"),
    "swap two rows' contents": (
        [f"UPDATE audit_log a SET ({_ALL}) = (SELECT {_ALL} FROM audit_log b"
         " WHERE b.seq = CASE a.seq WHEN 20 THEN 21 ELSE 20 END) WHERE a.seq IN (20, 21)"],
        20, "does not link to record 19"),
    "delete the tail": (["DELETE FROM audit_log WHERE seq > 26"], 27,
                        "records 27-30 missing at the end"),
    "delete the last one": (["DELETE FROM audit_log WHERE seq = 30"], 30,
                            "record 30 missing at the end"),
    "rewrite the head": (["UPDATE audit_head SET hash = sha256('forged')"], 30, "head"),
    # seq 2, 6 and 10 are reveal lists (make_events: i % 4 == 1)
    "drop a token from a reveal list": (
        ["UPDATE audit_log SET tokens = tokens[2:] WHERE seq = 6"], 6, "was edited"),
    "reorder a reveal list": (
        ["UPDATE audit_log SET tokens = ARRAY[tokens[2], tokens[1], tokens[3]] WHERE seq = 2"],
        2, "was edited"),
    "empty a reveal list": (["UPDATE audit_log SET tokens = '{}' WHERE seq = 10"], 10,
                            "was edited"),
    "add a token to a record": (
        ["UPDATE audit_log SET tokens = ARRAY['tok_000009x'] WHERE seq = 9"], 9, "was edited"),
}


@pytest.mark.parametrize("case", list(TAMPERING))
async def test_tampering_is_found_at_the_first_broken_record(scratch: Scratch, case: str) -> None:
    statements, first_broken, problem = TAMPERING[case]
    await scratch.sql(*statements)
    report, _ = await audit_cli.verify_database(scratch.app_dsn, page_size=5)
    assert not report.ok
    assert report.first_broken_seq == first_broken, report
    assert problem in report.problem
    code, out = await asyncio.to_thread(_verify_cli, scratch.auditor_dsn)
    assert code == 1
    assert out.startswith(f"chain BROKEN at record {first_broken}: ")
    assert "spiffe" not in out and "req-" not in out and "tok_" not in out


async def test_record_rewritten_with_recomputed_hashes_breaks_the_next_link(
    scratch: Scratch,
) -> None:
    conn = await asyncpg.connect(scratch.superuser_dsn)
    try:
        row = await conn.fetchrow("SELECT * FROM audit_log WHERE seq = 9")
        forged = AuditEvent(**{n: row[n] for n in FIELDS if n != "outcome"},
                            outcome="PERMISSION_DENIED", at=row["at"])
        content = content_hash(forged)
        await conn.execute("SET session_replication_role = replica")
        await conn.execute(
            "UPDATE audit_log SET outcome = $2, content_hash = $3, hash = $4 WHERE seq = $1",
            9, forged.outcome, content, chain_hash(bytes(row["prev_hash"]), content),
        )
    finally:
        await conn.close()
    report, _ = await audit_cli.verify_database(scratch.app_dsn)
    assert report.first_broken_seq == 10
    assert "does not link to record 9" in report.problem


async def test_missing_head_is_reported(scratch: Scratch) -> None:
    await scratch.sql("DELETE FROM audit_head")
    code, out = await asyncio.to_thread(_verify_cli, scratch.auditor_dsn)
    assert code == 1 and "audit head is missing" in out


async def test_records_appended_during_verification_are_left_for_the_next_run(
    scratch: Scratch,
) -> None:
    store = await Store.connect(scratch.app_dsn, min_size=1, max_size=2)
    writer = AuditWriter(store)
    appended = 0

    def progress(done: int, total: int) -> None:
        nonlocal appended
        assert total == 30
        appended += 1
        asyncio.get_running_loop().create_task(writer.record(make_events(3, tenant="late")))

    try:
        report, head = await audit_cli.verify_database(
            scratch.app_dsn, page_size=4, progress=progress
        )
        assert report.ok and report.checked == 30 and head is not None and head[0] == 30
        await asyncio.sleep(0.2)
        report, head = await audit_cli.verify_database(scratch.app_dsn)
        assert report.ok and head is not None and report.checked == head[0] > 30
    finally:
        await store.close()


# ---- the CLI functions -------------------------------------------------------------------------


def _parse(home: Path, argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="vaultline")
    parser.add_argument("--home", default=None)
    sub = parser.add_subparsers(dest="command", required=True)
    audit_cli.add_audit_commands(sub, str(home))
    return parser.parse_args(argv)


async def _run(args: argparse.Namespace, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    func: Callable[[argparse.Namespace], int] = args.func
    code = await asyncio.to_thread(func, args)
    return code, capsys.readouterr().out


async def test_cli_tail_and_verify_from_the_dev_stack_file(
    scratch: Scratch,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.delenv("VAULTLINE_AUDITOR_DATABASE_URL", raising=False)
    (tmp_path / "dev").mkdir()
    (tmp_path / "dev" / "stack.json").write_text(
        json.dumps({"auditor_database_url": scratch.auditor_dsn}))
    await scratch.sql("UPDATE audit_log SET request_id = E'evil\\x1b[2J' WHERE seq = 30")

    code, out = await _run(_parse(tmp_path, ["audit", "tail", "-n", "3", "--json"]), capsys)
    assert code == 0
    records = json.loads(out)
    assert [r["seq"] for r in records] == [28, 29, 30]
    assert records[0]["identity"] == "spiffe://vaultline/settlement/settlement-1"
    assert records[-1]["hash"] == max(scratch.receipts).hash.hex()

    code, out = await _run(_parse(tmp_path, ["audit", "tail"]), capsys)
    lines = out.splitlines()
    assert code == 0 and len(lines) == 21 and lines[0].split()[:3] == ["seq", "at", "identity"]
    assert "\x1b" not in out and "evil\\x1b[2J" in out  # escapes cannot reach the terminal

    code, out = await _run(_parse(tmp_path, ["audit", "verify"]), capsys)
    assert code == 1 and out.startswith("chain BROKEN at record 30: record 30 was edited")


async def test_cli_prefers_the_environment_and_the_top_level_home(
    scratch: Scratch, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("VAULTLINE_AUDITOR_DATABASE_URL", scratch.auditor_dsn)
    code, out = await _run(_parse(tmp_path / "nowhere", ["audit", "verify"]), capsys)
    assert code == 0 and out.startswith("chain intact: 30 records")

    monkeypatch.delenv("VAULTLINE_AUDITOR_DATABASE_URL")
    args = _parse(tmp_path / "nowhere", ["--home", str(tmp_path / "also-nowhere"), "audit", "tail"])
    with pytest.raises(audit_cli.ConfigError):
        await _run(args, capsys)



# ---- a chunk's records appended with its tokens (Store.insert_tokens) ----------------------
# In a scratch database: the rows carry a made-up wrapped data key, which a KEK rotation
# test scanning the shared database could not rewrap.


@pytest_asyncio.fixture
async def scratch_store(scratch: Scratch) -> AsyncIterator[CountingStore]:
    store = await CountingStore.connect(scratch.app_dsn, min_size=1, max_size=2)
    yield store  # type: ignore[misc]
    await store.close()


async def _new_token_rows(store: Store, tenant: str, n: int) -> NewTokens:
    key = await store.find_active_data_key(tenant, "pan") or await store.insert_data_key(
        tenant, "pan", "vault:v1:dGVzdA==", 1, 1000, dt.timedelta(days=1))
    assert key is not None
    return NewTokens(
        fingerprints=[uuid.uuid4().bytes * 2 for _ in range(n)],
        tokens=[f"tok_{uuid.uuid4().hex}" for _ in range(n)],
        brands=[1] * n, bins=["411111"] * n, last4s=["1111"] * n,
        expiry_months=[12] * n, expiry_years=[2030] * n,
        data_key_ids=[key.id] * n, ciphertexts=[b"\x00" * 40] * n,
    )


def _token_events(tenant: str, tokens: list[str]) -> list[AuditEvent]:
    now = dt.datetime.now(dt.UTC)
    return [AuditEvent(identity="spiffe://vaultline/crm/crm-1", role="crm", tenant=tenant,
                       method="Tokenize", outcome="OK", request_id=f"chunk-{tenant}-{i}",
                       peer="ipv4:127.0.0.1:50123", token=token, at=now)
            for i, token in enumerate(tokens)]


async def _audited_tokens(dsn: str, tenant: str) -> list[str]:
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch("SELECT token FROM audit_log WHERE tenant = $1 ORDER BY seq",
                                tenant)
    finally:
        await conn.close()
    return [r["token"] for r in rows]


async def test_a_chunk_of_new_tokens_appends_its_records_in_the_same_statement(
    scratch_store: CountingStore, scratch: Scratch, tenant: str
) -> None:
    rows = await _new_token_rows(scratch_store, tenant, 5)
    inserted, existing, audited = await scratch_store.insert_tokens(
        tenant, 1, None, rows, audit_columns(_token_events(tenant, rows.tokens)))
    assert audited and len(inserted) == 5 and existing == []
    assert scratch_store.appends == 0  # no separate append round trip
    assert await _audited_tokens(scratch.superuser_dsn, tenant) == rows.tokens
    head = await scratch_store.audit_head()
    assert head is not None
    assert (await _verify_range(scratch_store, head[0] - 4, head[0])).ok


async def test_a_chunk_with_a_returning_card_leaves_its_records_to_the_caller(
    scratch_store: CountingStore, scratch: Scratch, tenant: str
) -> None:
    first = await _new_token_rows(scratch_store, tenant, 1)
    await scratch_store.insert_tokens(tenant, 1, None, first)
    rows = await _new_token_rows(scratch_store, tenant, 3)
    rows.fingerprints[1] = first.fingerprints[0]  # this card already has a token
    inserted, existing, audited = await scratch_store.insert_tokens(
        tenant, 1, None, rows, audit_columns(_token_events(tenant, rows.tokens)))
    # The records would name a token the returning card does not have: none are appended.
    assert not audited
    assert [r["token"] for r in existing] == first.tokens
    assert len(inserted) == 2
    assert await _audited_tokens(scratch.superuser_dsn, tenant) == []


async def test_tokens_are_not_kept_when_their_records_cannot_be_appended(
    scratch_store: CountingStore, scratch: Scratch, tenant: str
) -> None:
    rows = await _new_token_rows(scratch_store, tenant, 3)
    broken = audit_columns(_token_events(tenant, rows.tokens))
    broken.hashes.pop()  # audit_append refuses arrays of different lengths
    with pytest.raises(asyncpg.InvalidParameterValueError):
        await scratch_store.insert_tokens(tenant, 1, None, rows, broken)
    conn = await asyncpg.connect(scratch.superuser_dsn)
    try:
        assert await conn.fetchval("SELECT count(*) FROM tokens WHERE tenant = $1", tenant) == 0
    finally:
        await conn.close()


# ---- the anchor outside PostgreSQL (issue 14, finding 3) -------------------------------------


async def _rechain(scratch: Scratch, keep: Callable[[asyncpg.Record], bool],
                   forge: int = 0) -> None:
    """What a superuser can do with the triggers off: drop records, renumber and re-chain the
    rest with correct hashes, append `forge` made-up records, and move the head, so that the
    chain alone verifies again."""
    conn = await asyncpg.connect(scratch.superuser_dsn)
    try:
        await conn.execute("SET session_replication_role = replica")
        rows = [r for r in await conn.fetch("SELECT * FROM audit_log ORDER BY seq") if keep(r)]
        forged = make_events(forge, tenant="forged") if forge else []
        async with conn.transaction():
            await conn.execute("DELETE FROM audit_log")
            prev = GENESIS_HASH
            records = [dict(r) for r in rows] + [
                {"at": e.at, **{f: getattr(e, f) for f in FIELDS}, "tokens": list(e.tokens),
                 "content_hash": content_hash(e)} for e in forged]
            for seq, r in enumerate(records, start=1):
                digest = chain_hash(prev, bytes(r["content_hash"]))
                await conn.execute(
                    "INSERT INTO audit_log (seq, at, identity, role, tenant, method, token,"
                    " purpose, outcome, request_id, peer, tokens, content_hash, prev_hash, hash)"
                    " VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10,$11,$12,$13,$14,$15)",
                    seq, r["at"], *(r[f] for f in FIELDS), r["tokens"], r["content_hash"],
                    prev, digest)
                prev = digest
            await conn.execute("UPDATE audit_head SET seq = $1, hash = $2", len(records), prev)
    finally:
        await conn.close()


@pytest_asyncio.fixture
async def anchored(scratch: Scratch, openbao: OpenBaoHandle
                   ) -> AsyncIterator[tuple[Store, TransitClient]]:
    """The scratch chain (30 records) with a checkpoint of its head filed in OpenBao, under a
    folder of its own; the ledger is the tokenizer's own OpenBao client."""
    store = await Store.connect(scratch.app_dsn, min_size=1, max_size=2)
    ledger = TransitClient(openbao.addr, openbao.tokenizer, audit_chain=unique_name("t-"))
    try:
        filed = await AuditCheckpointer(store, ledger).checkpoint()
        assert filed is not None and filed.seq == 30
        yield store, ledger
    finally:
        ledger.close()
        await store.close()


async def test_an_intact_chain_matches_its_checkpoints(
    anchored: tuple[Store, TransitClient],
) -> None:
    store, ledger = anchored
    report, head = await verify_anchored(store, ledger)
    assert report.ok and report.checked == 30 and report.checkpoints == 1
    # Nothing new: no second checkpoint of the same head.
    assert await AuditCheckpointer(store, ledger).checkpoint() is None


async def test_deleting_records_and_rechaining_the_rest_is_caught(
    scratch: Scratch, anchored: tuple[Store, TransitClient],
) -> None:
    store, ledger = anchored
    await _rechain(scratch, keep=lambda r: r["seq"] % 7 != 3)  # drops records 3, 10, 17, 24
    # The chain alone is consistent again: this is what `audit verify` reported before.
    alone, _ = await verify_store(store)
    assert alone.ok and alone.checked == 26
    report, _ = await verify_anchored(store, ledger)
    assert not report.ok and report.first_broken_seq == 27
    assert "record 30 was checkpointed" in report.problem and "cut off" in report.problem


async def test_a_rechained_chain_padded_back_to_length_contradicts_the_checkpoint(
    scratch: Scratch, anchored: tuple[Store, TransitClient],
) -> None:
    store, ledger = anchored
    await _rechain(scratch, keep=lambda r: r["seq"] != 12, forge=1)  # still 30 records
    alone, _ = await verify_store(store)
    assert alone.ok and alone.checked == 30
    report, _ = await verify_anchored(store, ledger)
    assert not report.ok and report.first_broken_seq == 30
    assert "contradicts the checkpoint" in report.problem


async def test_a_checkpoint_without_the_audit_keys_signature_is_refused(
    anchored: tuple[Store, TransitClient],
) -> None:
    store, ledger = anchored
    fake = Checkpoint(31, bytes(32), dt.datetime.now(dt.UTC))
    ledger.create_checkpoint(fake.name, fake.fields(ledger.sign(b"something else")))
    report, _ = await verify_anchored(store, ledger)
    assert not report.ok and "does not carry the audit key's signature" in report.problem


async def test_a_filed_checkpoint_cannot_be_overwritten_with_the_tokenizers_credentials(
    anchored: tuple[Store, TransitClient],
) -> None:
    _, ledger = anchored
    (name,) = ledger.list_checkpoints()
    original = ledger.read_checkpoint(name)
    with pytest.raises(VaultError):
        ledger.create_checkpoint(name, {**original, "hash": "00" * 32})
    assert ledger.read_checkpoint(name) == original
