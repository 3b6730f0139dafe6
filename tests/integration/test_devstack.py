"""vaultline.devstack: local PostgreSQL and OpenBao survive restarts; bootstrap is sound."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import asyncpg  # type: ignore[import-untyped]
import pytest

from tests.fixtures.infra import OpenBaoHandle, PostgresHandle
from vaultline.devstack import DevstackError
from vaultline.devstack.openbao import OpenBaoServer
from vaultline.devstack.postgres import PostgresServer, bootstrap_database
from vaultline.vault import TransitClient

pytestmark = pytest.mark.integration


# -- PostgreSQL ---------------------------------------------------------------------------------

async def test_postgres_restart_keeps_rows(postgres: PostgresHandle) -> None:
    conn = await asyncpg.connect(postgres.owner_dsn)
    try:
        await conn.execute("CREATE TABLE devstack_restart_probe (id int PRIMARY KEY, v text)")
        await conn.executemany("INSERT INTO devstack_restart_probe VALUES ($1, $2)",
                               [(1, "a"), (2, "b"), (3, "c")])
    finally:
        await conn.close()
    try:
        with postgres.stopped():
            with pytest.raises(OSError):
                await asyncpg.connect(postgres.owner_dsn, timeout=2)
        conn = await asyncpg.connect(postgres.owner_dsn)
        try:
            rows = await conn.fetch("SELECT id, v FROM devstack_restart_probe ORDER BY id")
            assert [tuple(r) for r in rows] == [(1, "a"), (2, "b"), (3, "c")]
        finally:
            await conn.close()
    finally:
        conn = await asyncpg.connect(postgres.owner_dsn)
        await conn.execute("DROP TABLE IF EXISTS devstack_restart_probe")
        await conn.close()


async def test_app_role_cannot_create_in_public(postgres: PostgresHandle) -> None:
    conn = await asyncpg.connect(postgres.app_dsn)
    try:
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await conn.execute("CREATE TABLE public.app_may_not (id int)")
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await conn.execute("CREATE SCHEMA app_may_not")
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await conn.execute("CREATE TEMP TABLE app_may_not (id int)")
        role = await conn.fetchrow("SELECT rolsuper, rolcreaterole, rolcreatedb, rolbypassrls "
                                   "FROM pg_roles WHERE rolname = current_user")
        assert not any(role.values())
    finally:
        await conn.close()


async def test_owner_owns_database_and_schema(postgres: PostgresHandle) -> None:
    conn = await asyncpg.connect(postgres.owner_dsn)
    try:
        schema_owner = await conn.fetchval(
            "SELECT nspowner::regrole::text FROM pg_namespace WHERE nspname = 'public'")
        db_owner = await conn.fetchval(
            "SELECT datdba::regrole::text FROM pg_database WHERE datname = current_database()")
        assert (schema_owner, db_owner) == ("vaultline_owner", "vaultline_owner")
        assert await conn.fetchval("SELECT rolsuper FROM pg_roles "
                                   "WHERE rolname = current_user") is False
    finally:
        await conn.close()


async def test_postgres_requires_a_password(postgres: PostgresHandle) -> None:
    dsn = postgres.app_dsn.replace("vaultline_app:", "vaultline_app:wrong", 1)
    with pytest.raises(asyncpg.InvalidPasswordError):
        await asyncpg.connect(dsn)


def test_postgres_bootstrap_is_idempotent(postgres: PostgresHandle) -> None:
    again = bootstrap_database(postgres.superuser_dsn, postgres.dev_dir)
    assert (again.owner_dsn, again.app_dsn) == (postgres.owner_dsn, postgres.app_dsn)
    assert "vaultline_app:" not in repr(again)  # DSNs with passwords stay out of repr


def test_postgres_second_start_is_refused(postgres: PostgresHandle) -> None:
    if postgres.server is None:
        pytest.skip("external PostgreSQL")
    with pytest.raises(DevstackError, match="already runs"):
        PostgresServer(postgres.server.data_dir, dev_dir=postgres.dev_dir).start()


def test_postgres_settings(postgres: PostgresHandle) -> None:
    if postgres.server is None:
        pytest.skip("external PostgreSQL")
    text = (postgres.server.pgdata / "vaultline.conf").read_text()
    assert "listen_addresses = '127.0.0.1'" in text
    assert "fsync = on" in text
    hba = (postgres.server.pgdata / "pg_hba.conf").read_text()
    assert "trust" not in hba.split("METHOD", 1)[1]


# -- OpenBao ------------------------------------------------------------------------------------

def test_openbao_restart_keeps_kek_and_credentials(openbao: OpenBaoHandle) -> None:
    if openbao.server is None:
        pytest.skip("external OpenBao")
    files = [openbao.dev_dir / "approle-tokenizer.json",
             openbao.dev_dir / "approle-keys-admin.json"]
    before = [f.read_bytes() for f in files]
    with TransitClient(openbao.addr, openbao.tokenizer) as client:
        plaintext, wrapped = client.generate_data_key()
        addr = openbao.addr
        with openbao.stopped():
            assert not openbao.server.is_running
        assert openbao.addr == addr  # the port was kept
        assert client.decrypt_data_keys([wrapped]) == [plaintext]
    assert [f.read_bytes() for f in files] == before  # secret ids reused


def test_openbao_reattaches_from_another_instance(openbao: OpenBaoHandle) -> None:
    if openbao.server is None:
        pytest.skip("external OpenBao")
    other = OpenBaoServer(openbao.server.data_dir, dev_dir=openbao.dev_dir)
    assert other.is_running
    assert other.addr == openbao.addr
    with pytest.raises(DevstackError, match="already runs"):
        other.start()


def test_openbao_dev_files_are_private_and_labelled(openbao: OpenBaoHandle) -> None:
    names = ["approle-tokenizer.json", "approle-keys-admin.json"]
    if openbao.server is not None:
        names.append("openbao-init.json")
    for name in names:
        path = openbao.dev_dir / name
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, name
        data = json.loads(path.read_text())
        assert data["WARNING"].startswith("DEV ONLY"), name
    if openbao.server is not None:
        init = json.loads((openbao.dev_dir / "openbao-init.json").read_text())
        assert len(init["unseal_keys_b64"]) == 3 and init["unseal_threshold"] == 2
        assert stat.S_IMODE(openbao.server.audit_log.stat().st_mode) == 0o600
        assert openbao.server.audit_log.stat().st_size > 0


def test_openbao_audit_log_hides_data_keys(openbao: OpenBaoHandle) -> None:
    if openbao.server is None:
        pytest.skip("external OpenBao")
    import base64

    with TransitClient(openbao.addr, openbao.tokenizer) as client:
        plaintext, wrapped = client.generate_data_key()
    audit = openbao.server.audit_log.read_text()
    assert "transit/datakey/plaintext/vaultline-kek" in audit
    assert base64.b64encode(plaintext).decode() not in audit
    assert wrapped not in audit


def test_openbao_refuses_a_busy_port(tmp_path: Path, openbao: OpenBaoHandle) -> None:
    if openbao.server is None:
        pytest.skip("external OpenBao")
    # The session's server holds the port; it must not be mistaken for the new one.
    server = OpenBaoServer(tmp_path / "openbao", port=openbao.server.port,
                           dev_dir=tmp_path / "dev", startup_timeout=20)
    with pytest.raises(DevstackError) as info:
        server.start()
    assert "address already in use" in str(info.value)
    assert not server.is_running


def test_openbao_startup_failure_shows_log_tail(tmp_path: Path) -> None:
    infra = tmp_path / "infra"
    infra.mkdir()
    (infra / "server.hcl.tmpl").write_text('storage "nope" {}\nlistener "tcp" {\n'
                                           '  address = "127.0.0.1:$port"\n'
                                           '  tls_disable = true\n}\n')
    server = OpenBaoServer(tmp_path / "openbao", dev_dir=tmp_path / "dev", infra_dir=infra,
                           startup_timeout=20)
    with pytest.raises(DevstackError, match="exited with code") as info:
        server.start()
    assert "nope" in str(info.value)  # bao's own complaint, from the log tail
    assert not server.is_running
