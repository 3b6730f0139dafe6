"""Security codes held until authorisation (issue 15, item 3; PCI DSS 3.3.2), over real mTLS
against a real OpenBao and PostgreSQL: sealed under the tenant's own key, redeemed exactly once
by the payments role, erased when redeemed, expired, tampered with or their token goes, and
never in the audit trail."""

from __future__ import annotations

import asyncio

import asyncpg
import grpc
import pytest

from tests.fixtures.tokenizer import Running
from tests.helpers import rpc_failure, tokenize_request, unique_name
from vaultline.gen.admin.v1 import admin_pb2 as admin_pb
from vaultline.gen.tokenization.v1 import tokenization_pb2 as pb

pytestmark = pytest.mark.integration

VISA = "4111111111111111"
AMEX = "378282246310005"
PAYMENTS = "payments/payments-1"
IVR = "ivr/ivr-1"


async def _tokenize(tokenizer: Running, tenant: str, pan: str, code: str, **kw: object) -> str:
    response = await tokenizer.as_(IVR).Tokenize(
        tokenize_request(pan, tenant=tenant, security_code=code, **kw))
    return response.token.token


async def _redeem(tokenizer: Running, tenant: str, token: str, who: str = PAYMENTS) -> str:
    response = await tokenizer.as_(who).RedeemSecurityCode(
        pb.RedeemSecurityCodeRequest(tenant=tenant, token=token))
    return response.security_code


async def _not_held(tokenizer: Running, tenant: str, token: str) -> None:
    failure = await rpc_failure(_redeem(tokenizer, tenant, token))
    assert (failure.code, failure.reason) == (
        grpc.StatusCode.NOT_FOUND, "SECURITY_CODE_NOT_FOUND")


async def _rows(dsn: str, tenant: str) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(dsn)
    try:
        return await conn.fetch(
            "SELECT s.token, s.ciphertext, s.expires_at - s.created_at AS hold, k.purpose,"
            " s.data_key_id FROM security_codes s JOIN data_keys k ON k.id = s.data_key_id"
            " WHERE s.tenant = $1", tenant)
    finally:
        await conn.close()


async def _sql(dsn: str, sql: str, *args: object) -> str:
    conn = await asyncpg.connect(dsn)
    try:
        return await conn.execute(sql, *args)
    finally:
        await conn.close()


async def test_held_sealed_then_redeemed_exactly_once(
        tokenizer: Running, superuser_db: str) -> None:
    tenant = unique_name("sc-", 10)
    token = await _tokenize(tokenizer, tenant, VISA, "739")
    (row,) = await _rows(superuser_db, tenant)
    # Sealed under the tenant's security-code key (not its card-data key), for 10 minutes.
    assert row["token"] == token and row["purpose"] == "security_code"
    assert b"739" not in bytes(row["ciphertext"]) and len(row["ciphertext"]) > 16
    assert row["hold"].total_seconds() == pytest.approx(600, abs=2)
    assert await _redeem(tokenizer, tenant, token) == "739"
    assert await _rows(superuser_db, tenant) == []  # erased as it was answered
    await _not_held(tokenizer, tenant, token)
    # The card and its token are untouched by the redemption.
    got = await tokenizer.stub.GetToken(pb.GetTokenRequest(tenant=tenant, token=token))
    assert got.token.last4 == "1111"


async def test_american_express_has_four_digits_and_a_new_capture_replaces_the_code(
        tokenizer: Running, superuser_db: str) -> None:
    tenant = unique_name("sc-", 10)
    first = await _tokenize(tokenizer, tenant, AMEX, "7349")
    again = await _tokenize(tokenizer, tenant, AMEX, "2718")  # the same card, keyed again
    assert first == again
    assert len(await _rows(superuser_db, tenant)) == 1
    assert await _redeem(tokenizer, tenant, first) == "2718"


@pytest.mark.parametrize(("pan", "code"), [
    (VISA, "73"), (VISA, "7349"), (AMEX, "739"), (VISA, "7a9"), (VISA, " 739"),
    (VISA, "٧٣٩"),  # Arabic-Indic digits: not ASCII, not a security code
])
async def test_a_malformed_code_is_refused_without_echo_or_a_token(
        tokenizer: Running, superuser_db: str, pan: str, code: str) -> None:
    tenant = unique_name("sc-", 10)
    failure = await rpc_failure(_tokenize(tokenizer, tenant, pan, code))
    assert (failure.code, failure.reason) == (
        grpc.StatusCode.INVALID_ARGUMENT, "INVALID_SECURITY_CODE")
    assert failure.fields == ["security_code"]
    assert code.strip() not in failure.raw
    conn = await asyncpg.connect(superuser_db)
    try:
        assert await conn.fetchval("SELECT count(*) FROM tokens WHERE tenant = $1", tenant) == 0
    finally:
        await conn.close()


async def test_concurrent_redemptions_answer_once(tokenizer: Running) -> None:
    tenant = unique_name("sc-", 10)
    token = await _tokenize(tokenizer, tenant, VISA, "739")
    outcomes = await asyncio.gather(
        *(_redeem(tokenizer, tenant, token) for _ in range(12)), return_exceptions=True)
    assert [o for o in outcomes if o == "739"] == ["739"]
    assert all(isinstance(o, grpc.aio.AioRpcError) and o.code() == grpc.StatusCode.NOT_FOUND
               for o in outcomes if o != "739")


async def test_expired_codes_are_never_answered_and_are_swept(
        tokenizer: Running, superuser_db: str) -> None:
    tenant = unique_name("sc-", 10)
    kept = await _tokenize(tokenizer, tenant, VISA, "739")
    stale = await _tokenize(tokenizer, tenant, "5555555555554444", "738")
    swept = await _tokenize(tokenizer, tenant, "6011111111111117", "737")
    await _sql(superuser_db, "UPDATE security_codes SET created_at = created_at - interval"
               " '20 minutes', expires_at = expires_at - interval '20 minutes'"
               " WHERE tenant = $1 AND token = ANY($2)", tenant, [stale, swept])
    await _not_held(tokenizer, tenant, stale)  # past its hold: gone, and erased on the way
    assert tokenizer.server.security_codes is not None
    assert await tokenizer.server.security_codes.sweep_once() >= 1
    assert [r["token"] for r in await _rows(superuser_db, tenant)] == [kept]
    await _not_held(tokenizer, tenant, swept)
    assert await _redeem(tokenizer, tenant, kept) == "739"


async def test_the_database_refuses_a_hold_longer_than_an_hour(
        tokenizer: Running, superuser_db: str) -> None:
    tenant = unique_name("sc-", 10)
    await _tokenize(tokenizer, tenant, VISA, "739")
    with pytest.raises(asyncpg.CheckViolationError):
        await _sql(superuser_db, "UPDATE security_codes SET expires_at = expires_at"
                   " + interval '2 hours' WHERE tenant = $1", tenant)


async def test_a_code_moved_to_another_token_does_not_open_and_is_erased(
        tokenizer: Running, superuser_db: str) -> None:
    """An insider with the database password swaps ciphertexts between tokens: the code is
    bound to its token, so the redemption answers nothing (and the moved code is gone)."""
    tenant = unique_name("sc-", 10)
    victim = await _tokenize(tokenizer, tenant, VISA, "739")
    mine = await _tokenize(tokenizer, tenant, "5555555555554444", "738")
    await _sql(superuser_db, "UPDATE security_codes SET ciphertext = (SELECT ciphertext FROM"
               " security_codes WHERE tenant = $1 AND token = $2) WHERE tenant = $1"
               " AND token = $3", tenant, victim, mine)
    await _not_held(tokenizer, tenant, mine)
    assert [r["token"] for r in await _rows(superuser_db, tenant)] == [victim]
    assert await _redeem(tokenizer, tenant, victim) == "739"


async def test_deleting_the_token_erases_its_code(tokenizer: Running, superuser_db: str) -> None:
    tenant = unique_name("sc-", 10)
    token = await _tokenize(tokenizer, tenant, VISA, "739")
    await tokenizer.stub.DeleteToken(pb.DeleteTokenRequest(tenant=tenant, token=token))
    assert await _rows(superuser_db, tenant) == []


async def test_shredding_the_tenant_erases_codes_and_their_key(
        tokenizer: Running, superuser_db: str) -> None:
    tenant = unique_name("sc-", 10)
    await _tokenize(tokenizer, tenant, VISA, "739")
    await tokenizer.keys_as("admin/admin-1").ShredTenant(
        admin_pb.ShredTenantRequest(tenant=tenant, confirm_tenant=tenant))
    conn = await asyncpg.connect(superuser_db)
    try:
        assert await conn.fetchval(
            "SELECT count(*) FROM security_codes WHERE tenant = $1", tenant) == 0
        assert await conn.fetchval(
            "SELECT count(*) FROM data_keys WHERE tenant = $1", tenant) == 0
    finally:
        await conn.close()


async def test_a_retried_request_holds_the_code_again(tokenizer: Running) -> None:
    """The first attempt may have issued its token and lost its answer before the code was
    held: the retry (same request id) holds it, and the token is the first one."""
    tenant = unique_name("sc-", 10)
    first = await _tokenize(tokenizer, tenant, VISA, "739", request_id="req-a")
    assert await _redeem(tokenizer, tenant, first) == "739"
    again = await _tokenize(tokenizer, tenant, VISA, "739", request_id="req-a")
    assert again == first
    assert await _redeem(tokenizer, tenant, first) == "739"


async def test_the_code_is_in_no_audit_record(tokenizer: Running, superuser_db: str) -> None:
    tenant = unique_name("sc-", 10)
    token = await _tokenize(tokenizer, tenant, AMEX, "7349")
    assert await _redeem(tokenizer, tenant, token) == "7349"
    await _not_held(tokenizer, tenant, token)
    conn = await asyncpg.connect(superuser_db)
    try:
        rows = await conn.fetch(
            "SELECT method, outcome, token, concat_ws(' ', identity, role, tenant, method,"
            " token, purpose, outcome, request_id, peer) AS line"
            " FROM audit_log WHERE tenant = $1 ORDER BY seq", tenant)
    finally:
        await conn.close()
    assert [(r["method"], r["outcome"], r["token"]) for r in rows] == [
        ("Tokenize", "OK", token), ("RedeemSecurityCode", "OK", token),
        ("RedeemSecurityCode", "NOT_FOUND", token)]
    assert not any("7349" in r["line"] for r in rows)


async def test_only_its_tenant_can_redeem(tokenizer: Running) -> None:
    token = await _tokenize(tokenizer, "tenant-a", VISA, "739")
    other = unique_name("sc-", 10)
    # The same token string in another tenant is another token: nothing held there.
    await _not_held(tokenizer, other, token)
    bound = "payments/payments-tenant-a"
    assert await _redeem(tokenizer, "tenant-a", token, bound) == "739"
