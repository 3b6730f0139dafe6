"""`vaultline discover` against a real PostgreSQL holding a CRM-like schema the test creates
(contacts, orders with a card column, multilingual notes, JSONB payloads), and against CSV,
JSONL and log files: exactly the planted cards are found, nothing else; the source is only
read; the report holds keys, never card digits (issue 18, part 1)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.parse
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest
import pytest_asyncio

from tests.fixtures.infra import PostgresHandle
from tests.helpers import unique_name
from tests.unit.test_descope_detect import VISA19

pytestmark = pytest.mark.integration

VAULTLINE = [sys.executable, "-m", "vaultline.cli"]
PLANTED = {  # where each card is, as discovery must report it
    ("public.orders", "card_number"): ["4111111111111111", "5555-5555-5555-4444",
                                       "3782 822463 10005"],
    ("public.notes", "body"): ["6011111111111117", "3566 0020 2036 0505", VISA19],
    ("public.payloads", "doc"): ["4111.1111.1111.1111"],
}


@pytest_asyncio.fixture
async def crm(postgres: PostgresHandle) -> AsyncIterator[str]:
    """A fresh CRM database; its DSN (a read-only role: discovery needs no more)."""
    name = unique_name("crm", 10)
    admin = await asyncpg.connect(postgres.superuser_dsn)
    await admin.execute(f"CREATE DATABASE {name}")
    reader = unique_name("reader", 10)
    await admin.execute(f"CREATE ROLE {reader} LOGIN PASSWORD 'discover-reader-pw'")
    parts = urllib.parse.urlsplit(postgres.superuser_dsn)
    crm_dsn = urllib.parse.urlunsplit(parts._replace(path=f"/{name}"))
    conn = await asyncpg.connect(crm_dsn)
    try:
        await conn.execute("""
            CREATE TABLE contacts (id serial PRIMARY KEY, name text, phone text, iban text);
            CREATE TABLE orders (id bigint PRIMARY KEY, card_number varchar(40), amount numeric,
                                 reference text);
            CREATE TABLE notes (id uuid PRIMARY KEY DEFAULT gen_random_uuid(), body text);
            CREATE TABLE payloads (id int PRIMARY KEY, doc jsonb);
        """)
        await conn.executemany("INSERT INTO contacts (name, phone, iban) VALUES ($1, $2, $3)", [
            ("Ana García", "+34 612 345 678", "ES91 2100 0418 4502 0005 1332"),
            ("Jean Dupont", "+33 1 23 45 67 89", "FR14 2004 1010 0505 0001 3M02 606"),
        ])
        await conn.executemany("INSERT INTO orders VALUES ($1, $2, $3, $4)", [
            (1, "4111111111111111", 10, "ORD-2026-12-01-000123"),
            (2, "5555-5555-5555-4444", 20, "4111111111111112"),  # a Luhn-invalid ref
            (3, "3782 822463 10005", 30, "20261201120000123456"),
            (4, None, 40, "no card"),
        ])
        await conn.executemany("INSERT INTO notes (body) VALUES ($1)", [
            ("Customer paid with 6011111111111117 over the phone",),
            ("顧客はカード 3566 0020 2036 0505 で支払いました",),
            (f"cliente pagó con {VISA19}",),
            ("Order 1701234567890123 shipped 2026-12-01 12:00:00.123456",),
            ("Rückruf unter +49 30 1234567890 erbeten",),
        ])
        await conn.executemany("INSERT INTO payloads VALUES ($1, $2::jsonb)", [
            (1, json.dumps({"payment": {"card": "4111.1111.1111.1111", "amount": 12}})),
            (2, json.dumps({"uuid": "550e8400-e29b-41d4-a716-446655440000"})),
        ])
        await conn.execute(f"GRANT USAGE ON SCHEMA public TO {reader}")
        await conn.execute(f"GRANT SELECT ON ALL TABLES IN SCHEMA public TO {reader}")
    finally:
        await conn.close()
    netloc = f"{reader}:discover-reader-pw@{parts.hostname}:{parts.port}"
    yield urllib.parse.urlunsplit(parts._replace(netloc=netloc, path=f"/{name}"))
    await admin.execute(f"DROP DATABASE {name} WITH (FORCE)")
    await admin.execute(f"DROP ROLE {reader}")
    await admin.close()


def discover(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("VAULTLINE_")}
    return subprocess.run([*VAULTLINE, "discover", *args], capture_output=True, text=True,
                          timeout=120, check=False, env=env)


def digits(text: str) -> str:
    return "".join(c for c in text if c.isdigit())


def test_exactly_the_planted_cards_are_found(crm: str, tmp_path: Path) -> None:
    report = tmp_path / "affected.jsonl"
    done = discover(crm, "--json", "--report", str(report))
    assert done.returncode == 1, done.stderr  # card data found
    result = json.loads(done.stdout)
    found = {(f["table"], f["column"]): f for f in result["findings"]}
    assert set(found) == set(PLANTED)
    for where, cards in PLANTED.items():
        finding = found[where]
        assert finding["cards"] == len(cards) == finding["values_with_cards"]
        assert sorted(e[-4:] for e in finding["examples"]) == sorted(
            digits(c)[-4:] for c in cards)
        assert all(set(e[:-4]) == {"*"} for e in finding["examples"])  # last four only
    assert found[("public.orders", "card_number")]["brands"] == {
        "AMEX": 1, "MASTERCARD": 1, "VISA": 1}
    assert result["scanned"]["public.orders"] == 4
    # The report: the keys of the affected rows (mode 0600), never card digits.
    assert report.stat().st_mode & 0o777 == 0o600
    keys = [json.loads(line) for line in report.read_text().splitlines()]
    assert sorted(k["key"]["id"] for k in keys if k["table"] == "public.orders") == [
        "1", "2", "3"]
    for card in (c for cards in PLANTED.values() for c in cards):
        assert digits(card) not in report.read_text() and digits(card) not in done.stdout
        assert card not in done.stdout and card not in done.stderr


def test_bin_mode_and_human_output(crm: str) -> None:
    done = discover(crm, "--bin", "--tables", "orders")
    assert done.returncode == 1
    assert "public.orders.card_number: 3 card number(s) in 3 value(s)" in done.stdout
    assert "411111******1111" in done.stdout and "378282*****0005" in done.stdout
    assert "notes" not in done.stdout


async def test_discovery_only_reads(crm: str) -> None:
    """A read-only transaction: the source is byte for byte what it was."""
    conn = await asyncpg.connect(crm)
    try:
        before = await conn.fetch("SELECT * FROM orders ORDER BY id")
        assert discover(crm).returncode == 1
        assert await conn.fetch("SELECT * FROM orders ORDER BY id") == before
        assert not await conn.fetchval(
            "SELECT count(*) FROM pg_namespace WHERE nspname = 'vaultline_descope'")
    finally:
        await conn.close()


def test_files_csv_jsonl_and_logs(tmp_path: Path) -> None:
    (tmp_path / "export.csv").write_text(
        "id,name,card,notes\n1,Ana,4111 1111 1111 1111,call back\n"
        "2,Bo,,order 20261201120000123456\n3,Cy,,paid 5555555555554444\n")
    (tmp_path / "events.jsonl").write_text(
        json.dumps({"event": "pay", "card": {"number": "378282246310005"}}) + "\n"
        + json.dumps({"event": "view", "ts": 1701234567890123}) + "\n")
    (tmp_path / "app.log").write_text(
        "2026-12-01T12:00:00Z INFO charge ok card=6011-1111-1111-1117\n"
        "2026-12-01T12:00:01Z INFO request id 550e8400-e29b-41d4-a716-446655440000\n")
    done = discover(str(tmp_path / "export.csv"), str(tmp_path / "events.jsonl"),
                    str(tmp_path / "app.log"), "--json")
    assert done.returncode == 1
    found = {(f["table"], f["column"]): f["cards"] for f in json.loads(done.stdout)["findings"]}
    assert found == {("export.csv", "card"): 1, ("export.csv", "notes"): 1,
                     ("events.jsonl", "$.card.number"): 1, ("app.log", ""): 1}


def test_nothing_found_is_exit_zero_and_bad_sources_are_usage_errors(tmp_path: Path) -> None:
    clean = tmp_path / "clean.log"
    clean.write_text("nothing here but 2026-12-01 and order 123456\n")
    assert discover(str(clean)).returncode == 0
    missing = discover(str(tmp_path / "nope.csv"))
    assert missing.returncode == 2 and "neither a postgresql:// DSN nor a readable file" in (
        missing.stderr)


def descope(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("VAULTLINE_")}
    return subprocess.run([*VAULTLINE, "descope", *args], capture_output=True, text=True,
                          timeout=120, check=False, env=env)


def test_a_plan_says_how_each_column_is_rewritten(crm: str, tmp_path: Path) -> None:
    import yaml

    plan_file = tmp_path / "plan.yaml"
    made = descope("plan", crm, "--output", str(plan_file))
    assert made.returncode == 0, made.stderr
    assert "3 table(s), 3 column(s)" in made.stdout
    text = plan_file.read_text()
    assert "discover-reader-pw" not in text  # the DSN's password stays out of the plan
    plan = yaml.safe_load(text)
    assert plan["token_format"] == "numeric_keep_bin" and plan["tenant"] == "default"
    tables = {t["table"]: t for t in plan["tables"]}
    assert tables["public.orders"]["key"] == ["id"]
    assert tables["public.orders"]["columns"] == [{"column": "card_number", "rewrite": "whole"}]
    assert tables["public.notes"]["columns"] == [{"column": "body", "rewrite": "embedded"}]
    assert tables["public.payloads"]["columns"] == [
        {"column": "doc", "rewrite": "json", "paths": ["$.payment.card"]}]
    # An edited plan is checked, every problem named with its field.
    plan["tables"][0]["columns"][0]["rewrite"] = "shred"
    plan["token_format"] = "base64"
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(plan))
    refused = descope("verify", str(bad), "--dsn", crm)
    assert refused.returncode == 2
    assert "token_format: must be one of" in refused.stderr
    assert "tables[0].columns[0].rewrite: must be one of whole, embedded, json" in (
        refused.stderr)


async def test_verify_exits_zero_only_when_no_card_is_left(
    crm: str, tmp_path: Path, postgres: PostgresHandle,
) -> None:
    plan_file = tmp_path / "plan.yaml"
    assert descope("plan", crm, "--output", str(plan_file)).returncode == 0
    before = descope("verify", str(plan_file), "--dsn", crm)
    assert before.returncode == 1 and "7 card number(s) left" in before.stdout
    # What `descope run` will do, done by hand here: every planted card replaced.
    parts = urllib.parse.urlsplit(crm)
    owner = urllib.parse.urlunsplit(urllib.parse.urlsplit(postgres.superuser_dsn)._replace(
        path=parts.path))
    conn = await asyncpg.connect(owner)
    try:
        await conn.execute("UPDATE orders SET card_number = 'tok' WHERE card_number IS NOT NULL")
        await conn.execute("UPDATE notes SET body = 'paid by card (tokenized)'"
                           " WHERE body ~ '[0-9]{4}[ -]?[0-9]{4}'")
        await conn.execute("UPDATE payloads SET doc = '{}'::jsonb WHERE id = 1")
    finally:
        await conn.close()
    after = descope("verify", str(plan_file), "--dsn", crm)
    assert after.returncode == 0, after.stdout
    assert "no card number left in the planned columns" in after.stdout
