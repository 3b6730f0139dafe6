"""One database role per process (issue 14): each role reaches only what its process uses.

An insider with one process's database password gets no more than that process could do:
the IVR's role sees no card data and cannot touch the audit trail but through audit_append;
the tokenizer's no longer reads IVR sessions; the auditor's only reads the trail; the keys
role reads wrapped keys and swaps them, nothing else. `vaultline settle` has none at all.
"""

from __future__ import annotations

import asyncpg
import pytest

from tests.fixtures.infra import PostgresHandle

pytestmark = pytest.mark.integration

# (role DSN attribute, statement) pairs that must be refused.
REFUSED = [
    ("ivr_dsn", "SELECT count(*) FROM tokens"),
    ("ivr_dsn", "SELECT count(*) FROM data_keys"),
    ("ivr_dsn", "SELECT count(*) FROM audit_log"),
    ("ivr_dsn", "SELECT count(*) FROM settlement_rows"),
    ("ivr_dsn", "SELECT count(*) FROM tokenize_requests"),
    ("ivr_dsn", "SELECT shred_tenant('default')"),
    ("ivr_dsn", "SELECT count(*) FROM security_codes"),  # held codes: the tokenizer's alone
    ("auditor_dsn", "SELECT count(*) FROM security_codes"),
    ("keys_dsn", "SELECT count(*) FROM security_codes"),
    ("app_dsn", "SELECT count(*) FROM ivr_sessions"),
    ("app_dsn", "UPDATE settlement_batches SET state = 'approved'"),
    ("auditor_dsn", "SELECT count(*) FROM tokens"),
    ("auditor_dsn", "SELECT count(*) FROM data_keys"),
    ("auditor_dsn", "SELECT count(*) FROM ivr_sessions"),
    ("auditor_dsn", "SELECT count(*) FROM settlement_batches"),
    ("auditor_dsn", "DELETE FROM audit_log"),
    ("keys_dsn", "SELECT count(*) FROM tokens"),
    ("keys_dsn", "SELECT count(*) FROM audit_log"),
    ("keys_dsn", "UPDATE data_keys SET retired_at = now()"),
    ("keys_dsn", "UPDATE data_keys SET tenant = 'x'"),
    ("keys_dsn", "DELETE FROM data_keys"),
]
ALLOWED = [
    ("ivr_dsn", "SELECT count(*) FROM ivr_sessions"),
    ("app_dsn", "SELECT count(*) FROM tokens"),
    ("app_dsn", "DELETE FROM security_codes WHERE false"),
    ("auditor_dsn", "SELECT count(*) FROM audit_log"),
    ("auditor_dsn", "SELECT seq FROM audit_head"),
    ("keys_dsn", "SELECT count(*) FROM data_keys"),
    ("keys_dsn", "UPDATE data_keys SET kek_version = kek_version WHERE false"),
]


async def _run(dsn: str, statement: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(statement)
    finally:
        await conn.close()


@pytest.mark.parametrize(("role", "statement"), REFUSED)
async def test_each_role_is_refused_what_its_process_does_not_use(
    migrated: PostgresHandle, role: str, statement: str
) -> None:
    with pytest.raises(asyncpg.InsufficientPrivilegeError):
        await _run(getattr(migrated, role), statement)


@pytest.mark.parametrize(("role", "statement"), ALLOWED)
async def test_each_role_has_what_its_process_uses(
    migrated: PostgresHandle, role: str, statement: str
) -> None:
    await _run(getattr(migrated, role), statement)


async def test_the_ivr_role_appends_audit_records_only_through_the_function(
    migrated: PostgresHandle,
) -> None:
    conn = await asyncpg.connect(migrated.ivr_dsn)
    try:
        assert await conn.fetchval(
            "SELECT has_function_privilege(current_user, 'audit_append(timestamptz[], text[],"
            " text[], text[], text[], text[], text[], text[], text[], text[], bytea[],"
            " text[])', 'EXECUTE')")
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await conn.execute("INSERT INTO audit_log DEFAULT VALUES")
    finally:
        await conn.close()
