"""`vaultline descope run` against a real PostgreSQL CRM and a real tokenizer (issue 18, part 3):
run + verify leaves no card; the tokens GetToken back to each card's last four; a dry run
changes nothing; a row the CRM changes mid-run keeps the CRM's change; kill -9 at random
moments then a rerun ends exactly where an uninterrupted run does, no row rewritten twice;
every chunk is an audit record of counts; `descope csv` does the same for an export."""

from __future__ import annotations

import asyncio
import csv
import json
import os
import random
import signal
import subprocess
import sys
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import asyncpg
import pytest
import pytest_asyncio

from tests.fixtures.infra import PostgresHandle
from tests.fixtures.tokenizer import Running
from tests.helpers import unique_name
from tests.unit.test_descope_detect import VISA19
from vaultline.descope.client import GrpcTokenizer
from vaultline.descope.detect import find_cards
from vaultline.descope.discover import discover_postgres
from vaultline.descope.plan import ColumnPlan, Plan, TablePlan, dump_plan, make_plan
from vaultline.descope.run import DescopeError, plan_run_id, run_plan
from vaultline.gen.tokenization.v1 import tokenization_pb2 as pb

pytestmark = pytest.mark.integration

VAULTLINE = [sys.executable, "-m", "vaultline.cli"]
CARDS = ["4111111111111111", "5555555555554444", "378282246310005", "6011111111111117",
         "3566002020360505", VISA19, "4012888888881881", "5105105105105100"]
SEPARATORS = ["", " ", "-", "."]
NOT_CARDS = ["order 1701234567890123 shipped", "ts 2026-12-01 12:00:00.123456",
             "IBAN DE89 3704 0044 0532 0130 00", "call +49 30 1234567890", "plain note"]


def _spell(card: str, rng: random.Random) -> str:
    sep = rng.choice(SEPARATORS)
    return sep.join(card[i:i + 4] for i in range(0, len(card), 4))


def _rows(count: int, seed: int) -> dict[str, list[tuple[object, ...]]]:
    """A CRM's rows: about a third hold a card somewhere, the rest digits that are not."""
    rng = random.Random(seed)
    orders, notes, payloads = [], [], []
    for i in range(1, count + 1):
        card = rng.choice(CARDS)
        orders.append((i, _spell(card, rng) if i % 3 == 0 else None, rng.choice(NOT_CARDS)))
        body = (f"Kunde zahlte mit {_spell(card, rng)}, {rng.choice(NOT_CARDS)}"
                if i % 4 == 0 else rng.choice(NOT_CARDS) + " 顧客")
        notes.append((i, body))
        doc = json.dumps({"payment": {"card": _spell(card, rng), "amount": i},
                          "ref": rng.choice(NOT_CARDS)} if i % 5 == 0
                         else {"payment": {"amount": i}})
        payloads.append((i, doc))
    return {"orders": orders, "notes": notes, "payloads": payloads}


async def _create(admin_dsn: str, name: str, rows: dict[str, list[tuple[object, ...]]]) -> str:
    admin = await asyncpg.connect(admin_dsn)
    try:
        await admin.execute(f"CREATE DATABASE {name}")
    finally:
        await admin.close()
    dsn = urllib.parse.urlunsplit(urllib.parse.urlsplit(admin_dsn)._replace(path=f"/{name}"))
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("""
            CREATE TABLE orders (id bigint PRIMARY KEY, card_number varchar(40), ref text);
            CREATE TABLE notes (id int PRIMARY KEY, body text, edited_by text);
            CREATE TABLE payloads (id int PRIMARY KEY, doc jsonb);
            -- Every rewrite of a row, counted in the same transaction (a kill rolls it back).
            CREATE TABLE row_updates (tbl text, id bigint);
            CREATE FUNCTION count_update() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN INSERT INTO row_updates VALUES (TG_TABLE_NAME, NEW.id); RETURN NEW; END $$;
            CREATE TRIGGER o AFTER UPDATE ON orders FOR EACH ROW EXECUTE FUNCTION count_update();
            CREATE TRIGGER n AFTER UPDATE ON notes FOR EACH ROW EXECUTE FUNCTION count_update();
            CREATE TRIGGER p AFTER UPDATE ON payloads FOR EACH ROW
                EXECUTE FUNCTION count_update();
        """)
        await conn.copy_records_to_table("orders", records=rows["orders"])
        await conn.copy_records_to_table("notes", records=rows["notes"],
                                         columns=["id", "body"])
        await conn.executemany("INSERT INTO payloads VALUES ($1, $2::jsonb)", rows["payloads"])
        await conn.execute("ANALYZE")
    finally:
        await conn.close()
    return dsn


@pytest_asyncio.fixture
async def crm_factory(postgres: PostgresHandle
                      ) -> AsyncIterator[Callable[[int, int], Awaitable[str]]]:
    names: list[str] = []

    async def make(count: int, seed: int) -> str:
        name = unique_name("crmrun", 10)
        names.append(name)
        return await _create(postgres.superuser_dsn, name, _rows(count, seed))

    yield make
    admin = await asyncpg.connect(postgres.superuser_dsn)
    try:
        for name in names:
            await admin.execute(f"DROP DATABASE {name} WITH (FORCE)")
    finally:
        await admin.close()


async def _plan(dsn: str, tenant: str) -> Plan:
    found = await discover_postgres(dsn, tables=["orders", "notes", "payloads"])
    return make_plan(found, "crm", tenant=tenant)


async def _snapshot(dsn: str) -> dict[str, list[tuple[object, ...]]]:
    conn = await asyncpg.connect(dsn)
    try:
        return {t: [tuple(r) for r in await conn.fetch(f"SELECT * FROM {t} ORDER BY id")]
                for t in ("orders", "notes", "payloads")}
    finally:
        await conn.close()


def _digits(text: str) -> str:
    return "".join(c for c in text if c.isdigit())


async def test_run_replaces_every_card_and_verify_finds_none(
        tokenizer: Running, crm_factory: Callable[[int, int], Awaitable[str]],
        superuser_db: str) -> None:
    dsn = await crm_factory(1200, 1)
    tenant = unique_name("dsr-", 10)
    plan = await _plan(dsn, tenant)
    assert {(t.table, c.column, c.rewrite) for t in plan.tables for c in t.columns} == {
        ("public.orders", "card_number", "whole"), ("public.notes", "body", "embedded"),
        ("public.payloads", "doc", "json")}
    before = await _snapshot(dsn)

    # A dry run counts and changes nothing — not even the checkpoint schema.
    dry = await run_plan(plan, dsn, None, chunk_rows=300)
    assert {r.table: r.rows_rewritten for r in dry} == {
        "public.orders": 400, "public.notes": 300, "public.payloads": 240}
    assert await _snapshot(dsn) == before
    conn = await asyncpg.connect(dsn)
    try:
        assert not await conn.fetchval(
            "SELECT count(*) FROM pg_namespace WHERE nspname = 'vaultline_descope'")
    finally:
        await conn.close()

    client = GrpcTokenizer(tokenizer.channel("descope/descope-1"), tenant, plan.token_format)
    results = await run_plan(plan, dsn, client, chunk_rows=300)
    assert {r.table: (r.rows_read, r.rows_rewritten, r.cards_replaced) for r in results} == {
        "public.orders": (1200, 400, 400), "public.notes": (1200, 300, 300),
        "public.payloads": (1200, 240, 240)}
    assert not (await discover_postgres(dsn)).found  # verify: nothing left anywhere

    after = await _snapshot(dsn)
    crm = tokenizer.as_("crm/crm-1")
    for table, column in (("orders", 1), ("notes", 1), ("payloads", 1)):
        for old, new in zip(before[table], after[table], strict=True):
            if old[column] is None or not find_cards(str(old[column])):
                assert old == new, "a row without a card is untouched"
                continue
            (span,) = find_cards(str(old[column]))
            # Only the card's digits changed: same length, same separators, same text.
            assert len(str(new[column])) == len(str(old[column])) or table == "payloads"
            if table != "payloads":
                token = _digits(str(new[column])[span.start:span.end])
                assert str(new[column])[:span.start] == str(old[column])[:span.start]
                assert str(new[column])[span.end:] == str(old[column])[span.end:]
            else:
                token = _digits(json.loads(str(new[column]))["payment"]["card"])
            got = await crm.GetToken(pb.GetTokenRequest(tenant=tenant, token=token))
            assert got.token.last4 == span.pan.last4 and got.token.expiry_month == 0
    # Each chunk is one audit record: counts and table, no value.
    conn = await asyncpg.connect(superuser_db)
    try:
        purposes = [r["purpose"] for r in await conn.fetch(
            "SELECT purpose FROM audit_log WHERE tenant = $1 AND method = 'RecordDescopeChunk'"
            " ORDER BY seq", tenant)]
    finally:
        await conn.close()
    assert len(purposes) == sum(r.chunks for r in results) == 12
    assert (f"descope run {plan_run_id(plan)[:8]} public.orders chunk 1: "
            "read 300, rewritten 100, cards 100, reread 0") in purposes
    assert not any(find_cards(p) for p in purposes)

    # Run again: the plan is done; nothing is read or rewritten twice.
    again = await run_plan(plan, dsn, client, chunk_rows=300)
    assert all(r.already_done for r in again)
    assert await _snapshot(dsn) == after
    conn = await asyncpg.connect(dsn)
    try:
        twice = await conn.fetchval(
            "SELECT count(*) FROM (SELECT tbl, id FROM row_updates GROUP BY 1, 2"
            " HAVING count(*) > 1) x")
    finally:
        await conn.close()
    assert twice == 0


async def test_a_row_the_crm_changes_mid_run_keeps_the_change(
        tokenizer: Running, crm_factory: Callable[[int, int], Awaitable[str]]) -> None:
    dsn = await crm_factory(200, 2)
    tenant = unique_name("dsr-", 10)
    plan = Plan("crm", tenant, "numeric_keep_bin", (
        TablePlan("public.notes", ("id",), (ColumnPlan("body", "embedded"),)),))
    writer = await asyncpg.connect(dsn)

    async def crm_writes(table: str, chunk: int) -> None:
        if chunk == 1:  # between the run's read of chunk 1 and its rewrite
            await writer.execute("UPDATE notes SET body = $1, edited_by = 'agent 7'"
                                 " WHERE id = 4", "Neue Karte: 5105-1051-0510-5100 (alt gesperrt)")
            await writer.execute("UPDATE notes SET body = 'card removed by agent' WHERE id = 8")

    try:
        client = GrpcTokenizer(tokenizer.channel("descope/descope-1"), tenant,
                               plan.token_format)
        (result,) = await run_plan(plan, dsn, client, chunk_rows=50, after_read=crm_writes)
        row4 = await writer.fetchrow("SELECT body, edited_by FROM notes WHERE id = 4")
        row8 = await writer.fetchval("SELECT body FROM notes WHERE id = 8")
    finally:
        await writer.close()
    assert result.rows_reread == 2
    # The CRM's new text and its other column are kept; only the new card became a token.
    assert row4["edited_by"] == "agent 7"
    assert row4["body"].startswith("Neue Karte: 5105-10") and row4["body"].endswith(
        "-5100 (alt gesperrt)")
    assert not find_cards(row4["body"]) and "5105-1051-0510-5100" not in row4["body"]
    assert row8 == "card removed by agent"
    assert not (await discover_postgres(dsn, tables=["notes"])).found


def _cli_env(tokenizer: Running, tmp_path: Path) -> dict[str, str]:
    cert = tokenizer.pki.certs["descope/descope-1"]
    (tmp_path / "descope.crt").write_bytes(cert.cert_pem)
    (tmp_path / "descope.key").write_bytes(cert.key_pem)
    env = {k: v for k, v in os.environ.items() if not k.startswith("VAULTLINE_")}
    env.update(VAULTLINE_GRPC_ADDRESS=tokenizer.server.address,
               VAULTLINE_CA_FILE=str(tokenizer.pki.ca),
               VAULTLINE_CLIENT_CERT=str(tmp_path / "descope.crt"),
               VAULTLINE_CLIENT_KEY=str(tmp_path / "descope.key"),
               VAULTLINE_HOME=str(tmp_path / "no-stack"))
    return env


async def _cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    proc = await asyncio.create_subprocess_exec(
        *VAULTLINE, "descope", *args, env=env, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 300)
    assert proc.returncode is not None
    return subprocess.CompletedProcess(args, proc.returncode, out.decode(), err.decode())


async def _chunks_done(dsn: str) -> int:
    conn = await asyncpg.connect(dsn)
    try:
        return int(await conn.fetchval(
            "SELECT coalesce(sum(chunks), 0) FROM vaultline_descope.progress") or 0)
    except asyncpg.UndefinedTableError:
        return 0
    finally:
        await conn.close()


async def test_kill_9_at_random_moments_then_rerun_is_exact(
        tokenizer: Running, crm_factory: Callable[[int, int], Awaitable[str]],
        tmp_path: Path) -> None:
    whole, killed = await crm_factory(3000, 3), await crm_factory(3000, 3)
    assert await _snapshot(whole) == await _snapshot(killed)
    tenant = unique_name("dsr-", 10)
    env = _cli_env(tokenizer, tmp_path)
    plan_file = tmp_path / "plan.yaml"
    plan_file.write_text(dump_plan(await _plan(whole, tenant)))

    done = await _cli(env, "run", str(plan_file), "--dsn", whole, "--chunk", "100")
    assert done.returncode == 0, done.stderr
    assert "public.notes: 3,000 rows read, rewrote 750 (750 card numbers)" in done.stdout

    rng = random.Random(18)
    kills = 0
    for target in (3, 25, 50):  # chunks done before each kill (of 90), plus a random delay
        proc = await asyncio.create_subprocess_exec(
            *VAULTLINE, "descope", "run", str(plan_file), "--dsn", killed, "--chunk", "100",
            env=env, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
        while await _chunks_done(killed) < target and proc.returncode is None:
            await asyncio.sleep(0.01)
        await asyncio.sleep(rng.uniform(0, 0.05))
        if proc.returncode is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        await proc.wait()
    assert kills >= 2
    final = await _cli(env, "run", str(plan_file), "--dsn", killed, "--chunk", "100")
    assert final.returncode == 0, final.stderr
    for out in (done.stdout, done.stderr, final.stdout, final.stderr):
        assert not find_cards(out) and not any(card in out for card in CARDS)
    assert "rows/s" in done.stdout and "progress: public." in done.stderr  # rows/s, ETA
    assert " left" in done.stderr

    assert await _snapshot(killed) == await _snapshot(whole)  # the same end state
    verify = await _cli(env, "verify", str(plan_file), "--dsn", killed)
    assert verify.returncode == 0 and "no card number left" in verify.stdout
    conn = await asyncpg.connect(killed)
    try:
        twice = await conn.fetch("SELECT tbl, id, count(*) FROM row_updates"
                                 " GROUP BY 1, 2 HAVING count(*) > 1")
        progress = await conn.fetch("SELECT table_name, rows_read, rows_rewritten,"
                                    " cards_replaced, unreported FROM vaultline_descope.progress")
    finally:
        await conn.close()
    assert twice == []  # no row rewritten twice
    assert {r["table_name"]: (r["rows_read"], r["rows_rewritten"]) for r in progress} == {
        "public.orders": (3000, 1000), "public.notes": (3000, 750),
        "public.payloads": (3000, 600)}
    assert all(r["unreported"] is None for r in progress)  # every chunk reached the audit


async def test_plans_that_do_not_fit_the_table_are_refused(
        tokenizer: Running, crm_factory: Callable[[int, int], Awaitable[str]]) -> None:
    dsn = await crm_factory(10, 4)
    client = GrpcTokenizer(tokenizer.channel("descope/descope-1"), "default", "numeric")
    for table, match in ((TablePlan("public.notes", ("body",), (ColumnPlan("body", "whole"),)),
                          "not a unique key"),
                         (TablePlan("public.nope", ("id",), (ColumnPlan("x", "whole"),)),
                          "no such table"),
                         (TablePlan("public.notes", ("id",), (ColumnPlan("bdy", "whole"),)),
                          "no column 'bdy'")):
        with pytest.raises(DescopeError, match=match):
            await run_plan(Plan("crm", "default", "numeric", (table,)), dsn, client)


async def test_descope_csv_writes_a_tokenized_copy(tokenizer: Running, tmp_path: Path) -> None:
    source = tmp_path / "export.csv"
    rows = [["id", "name", "card", "notes"],
            ["1", "Ana", "4111 1111 1111 1111", "call back"],
            ["2", "Bo", "", "order 20261201120000123456"],
            ["3", "Cy", "", "paid 5555-5555-5555-4444, thanks"]]
    with source.open("w", newline="") as fh:
        csv.writer(fh).writerows(rows)
    env = _cli_env(tokenizer, tmp_path)
    target = tmp_path / "export.tokens.csv"
    done = await _cli(env, "csv", str(source), str(target), "--tenant", "demo")
    assert done.returncode == 0, done.stderr
    assert "3 rows, 2 card numbers replaced" in done.stdout and "no card number left" in (
        done.stdout)
    assert target.stat().st_mode & 0o777 == 0o600
    out = list(csv.reader(target.open(newline="")))
    assert out[0] == rows[0] and out[2] == rows[2]
    assert out[1][2].startswith("4111 11") and out[1][2].endswith(" 1111") and (
        out[1][2] != rows[1][2])
    assert out[3][3].startswith("paid 5555-55") and out[3][3].endswith("-4444, thanks")
    assert not any(find_cards(cell) for row in out for cell in row)
    again = await _cli(env, "csv", str(source), str(target))
    assert again.returncode == 2 and "exists" in again.stderr


async def test_a_tokenizer_that_is_away_is_tried_again_then_the_run_stops(
        tokenizer: Running, caplog: pytest.LogCaptureFixture) -> None:
    """UNAVAILABLE is tried again (a restart or failover passes); one that lasts stops the run,
    which resumes from its checkpoint when run again (test above)."""
    import grpc

    from vaultline.security.tls import channel_credentials

    cert = tokenizer.pki.certs["descope/descope-1"]
    creds = channel_credentials(tokenizer.pki.ca_pem, cert.cert_pem, cert.key_pem)
    async with grpc.aio.secure_channel("127.0.0.1:9", creds) as channel:  # nobody listens
        client = GrpcTokenizer(channel, "default", "numeric", retry_pause=0.01)
        with caplog.at_level("WARNING", logger="vaultline.descope.client"), pytest.raises(
                grpc.aio.AioRpcError) as failed:
            await client.tokenize({"4111111111111111"})
    assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
    retries = [r for r in caplog.records if "trying again" in r.getMessage()]
    assert len(retries) == 3  # four attempts in all
    assert not any("4111111111111111" in r.getMessage() for r in caplog.records)
