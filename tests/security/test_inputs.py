"""Issue 14, findings 4-6: caller text that holds a card number in any spelling is refused and
never stored; huge inputs are refused before any work; out-of-range values are
INVALID_ARGUMENT, never INTERNAL. Each test failed on the code before the fix.

Over real mTLS gRPC to a tokenizer on real OpenBao and PostgreSQL; the audit table is read as
the superuser (what an insider with the database would see).
"""

from __future__ import annotations

import asyncio
import time

import asyncpg
import grpc
import pytest
from google.protobuf import duration_pb2

from tests.fixtures.tokenizer import Running
from tests.helpers import rpc_failure, tokenize_request, unique_name
from vaultline.gen.admin.v1 import admin_pb2 as admin_pb
from vaultline.gen.tokenization.v1 import tokenization_pb2 as pb

pytestmark = pytest.mark.integration

SETTLEMENT = "settlement/settlement-1"
# One test card written the ways finding 4 got past the old guard.
SPELLINGS = [
    "4111.1111.1111.1111",
    "4111  1111  1111  1111",
    "4111/1111/1111/1111",
    "４１１１１１１１１１１１１１１１",  # full-width digits
    "pay 4111 1111 1111 1112",  # a mistyped card number is card data too (Luhn fails)
]


async def _audit_rows(superuser_db: str, marker: str) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(superuser_db)
    try:
        return await conn.fetch(
            "SELECT method, outcome, purpose, request_id, tenant FROM audit_log"
            " WHERE purpose LIKE $1 OR request_id LIKE $1 OR tenant LIKE $1 ORDER BY seq",
            f"%{marker}%")
    finally:
        await conn.close()


async def _stored_anywhere(superuser_db: str, needle: str) -> bool:
    """Whether `needle` appears in any audit record, in any column."""
    conn = await asyncpg.connect(superuser_db)
    try:
        return bool(await conn.fetchval(
            "SELECT count(*) FROM audit_log WHERE strpos(audit_log::text, $1) > 0", needle))
    finally:
        await conn.close()


@pytest.mark.parametrize("spelling", SPELLINGS)
async def test_a_purpose_holding_a_card_number_in_any_spelling_is_refused_and_not_stored(
    tokenizer: Running, superuser_db: str, spelling: str
) -> None:
    token = (await tokenizer.stub.Tokenize(tokenize_request("5555555555554444"))).token.token
    marker = unique_name("m")
    purpose = f"{marker} {spelling}"
    stub = tokenizer.as_(SETTLEMENT)
    failure = await rpc_failure(stub.Detokenize(pb.DetokenizeRequest(token=token,
                                                                      purpose=purpose)))
    assert failure.code == grpc.StatusCode.INVALID_ARGUMENT and failure.reason == "INVALID_PURPOSE"
    chunk = pb.BatchDetokenizeRequest(purpose=purpose, items=[
        pb.BatchDetokenizeRequest.Item(reference="r", token=token)])
    with pytest.raises(grpc.aio.AioRpcError) as batch:  # a role whose reveals need no batch
        [r async for r in tokenizer.as_("bulk/bulk-1").BatchDetokenize(iter([chunk]))]
    assert batch.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert not await _stored_anywhere(superuser_db, marker)  # refused text is never kept
    assert not await _stored_anywhere(superuser_db, spelling)
    assert not await _stored_anywhere(superuser_db, "4111111111111111")


@pytest.mark.parametrize("spelling", [s for s in SPELLINGS if s.isascii()])  # gRPC: ASCII
async def test_a_request_id_header_holding_a_card_number_is_never_taken(
    tokenizer: Running, superuser_db: str, spelling: str
) -> None:
    token = (await tokenizer.stub.Tokenize(tokenize_request("5555555555554444"))).token.token
    header = spelling.replace(" ", "-").replace("/", ":")
    await tokenizer.stub.GetToken(pb.GetTokenRequest(token=token),
                                  metadata=(("x-request-id", header),))
    assert not await _stored_anywhere(superuser_db, header)
    assert not await _stored_anywhere(superuser_db, "4111111111111111")


@pytest.mark.parametrize("tenant", ["411111111111", "4111-1111-1111", "000000000000"])
async def test_a_tenant_of_twelve_digits_is_refused(tokenizer: Running, tenant: str) -> None:
    failure = await rpc_failure(tokenizer.stub.Tokenize(
        tokenize_request("5555555555554444", tenant=tenant)))
    assert failure.code == grpc.StatusCode.INVALID_ARGUMENT
    assert failure.reason == "INVALID_TENANT"


async def test_a_huge_purpose_is_refused_at_once_and_audited_as_malformed(
    tokenizer: Running, superuser_db: str
) -> None:
    token = (await tokenizer.stub.Tokenize(tokenize_request("5555555555554444"))).token.token
    marker = unique_name("m")
    purpose = marker + " " + "1 " * 499_990  # ~1 MB that every old guard masked in full
    stub = tokenizer.as_(SETTLEMENT)
    started = time.perf_counter()
    refused = asyncio.ensure_future(rpc_failure(stub.Detokenize(
        pb.DetokenizeRequest(token=token, purpose=purpose))))
    other = await tokenizer.stub.GetToken(pb.GetTokenRequest(token=token))
    waited = time.perf_counter() - started
    failure = await refused
    assert failure.reason == "INVALID_PURPOSE" and other.token.token == token
    # The figure, for the record (finding 5: 2.4 s before); not an assertion on time.
    print(f"GetToken beside a 1 MB purpose: {waited * 1000:.0f} ms")
    records = await _audit_rows(superuser_db, token)
    assert all(len(r["purpose"]) <= 200 for r in records)
    assert not await _stored_anywhere(superuser_db, marker)


async def test_a_detokenize_purpose_is_audited_as_validated(
    tokenizer: Running, superuser_db: str
) -> None:
    token = (await tokenizer.stub.Tokenize(tokenize_request("5555555555554444"))).token.token
    marker = unique_name("m")
    await tokenizer.as_(SETTLEMENT).Detokenize(pb.DetokenizeRequest(
        token=token, purpose=f"   refund {marker}" + " " * 600))
    (record,) = await _audit_rows(superuser_db, marker)
    assert record["purpose"] == f"refund {marker}"


async def test_a_unary_request_over_the_limit_is_refused(tokenizer: Running) -> None:
    token = (await tokenizer.stub.Tokenize(tokenize_request("5555555555554444"))).token.token
    failure = await rpc_failure(tokenizer.as_(SETTLEMENT).Detokenize(pb.DetokenizeRequest(
        token=token, purpose="x" * (1 << 20))))
    assert failure.code == grpc.StatusCode.INVALID_ARGUMENT
    assert failure.reason == "MESSAGE_TOO_LARGE"


async def test_a_stream_message_over_four_mib_is_refused_by_grpc(tokenizer: Running) -> None:
    chunk = pb.BatchTokenizeRequest(items=[pb.BatchTokenizeRequest.Item(
        reference="r" * 200, card=pb.Card(pan="4" * 19)) for _ in range(20_000)])
    assert chunk.ByteSize() > 4 << 20
    with pytest.raises(grpc.aio.AioRpcError) as err:
        [r async for r in tokenizer.stub.BatchTokenize(iter([chunk]))]
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


async def test_a_chunk_of_more_than_twenty_thousand_items_is_refused(tokenizer: Running) -> None:
    chunk = pb.BatchTokenizeRequest(items=[pb.BatchTokenizeRequest.Item(
        reference="", card=pb.Card(pan="1")) for _ in range(20_001)])
    with pytest.raises(grpc.aio.AioRpcError) as err:
        [r async for r in tokenizer.stub.BatchTokenize(iter([chunk]))]
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    detokenize = pb.BatchDetokenizeRequest(purpose="settle", items=[
        pb.BatchDetokenizeRequest.Item(reference="", token="1") for _ in range(20_001)])
    with pytest.raises(grpc.aio.AioRpcError) as err:
        [r async for r in tokenizer.as_(SETTLEMENT).BatchDetokenize(iter([detokenize]))]
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.parametrize("seconds", [2**63 - 1, 10**12, -1])
async def test_an_out_of_range_ttl_is_invalid_not_internal(
    tokenizer: Running, seconds: int
) -> None:
    failure = await rpc_failure(tokenizer.stub.Tokenize(tokenize_request(
        "5555555555554444", ttl=duration_pb2.Duration(seconds=seconds))))
    assert failure.code == grpc.StatusCode.INVALID_ARGUMENT and failure.reason == "INVALID_TTL"


@pytest.mark.parametrize("page_token", ["²", "9999999999999999999", "٣", "-1", "1e3"])
async def test_a_foreign_page_token_is_invalid_not_internal(
    tokenizer: Running, page_token: str
) -> None:
    failure = await rpc_failure(tokenizer.audit_as("admin/admin-1").ListAuditRecords(
        admin_pb.ListAuditRecordsRequest(page_token=page_token)))
    assert failure.code == grpc.StatusCode.INVALID_ARGUMENT
    assert failure.reason == "INVALID_PAGE_TOKEN"
