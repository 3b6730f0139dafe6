"""What de-scoping needs of the tokenizer (issue 18): cards found in stored data have no
expiry, so the `descope` role — and only a role the policy allows — tokenizes them with the
expiry unknown; the expiry is recorded once the card is taken again; each rewritten chunk is
an audit record of counts."""

from __future__ import annotations

import asyncpg
import grpc
import pytest

from tests.fixtures.tokenizer import Running
from tests.helpers import rpc_failure, tokenize_request, unique_name
from vaultline.gen.tokenization.v1 import tokenization_pb2 as pb

pytestmark = pytest.mark.integration

VISA = "4111111111111111"
EXPIRED_YEARS_AGO = 2019  # a card in a CRM note from years ago


def _chunk(tenant: str, *pans: str, expiry_unknown: bool = True, month: int = 0,
           year: int = 0) -> pb.BatchTokenizeRequest:
    return pb.BatchTokenizeRequest(
        tenant=tenant, expiry_unknown=expiry_unknown,
        format=pb.TOKEN_FORMAT_NUMERIC_KEEP_BIN,
        items=[pb.BatchTokenizeRequest.Item(
            reference=f"r{i}", card=pb.Card(pan=pan, expiry_month=month, expiry_year=year))
            for i, pan in enumerate(pans)])


async def _batch(stub, chunk: pb.BatchTokenizeRequest) -> pb.BatchTokenizeResponse:  # type: ignore[no-untyped-def]
    (response,) = [r async for r in stub.BatchTokenize(iter([chunk]))]
    return response


async def test_descope_tokenizes_without_expiry_and_the_expiry_comes_later(
        tokenizer: Running) -> None:
    tenant = unique_name("ds-", 10)
    descope = tokenizer.as_("descope/descope-1")
    response = await _batch(descope, _chunk(tenant, VISA, "378282246310005"))
    visa, amex = response.results
    assert visa.created and visa.token.expiry_month == 0 and visa.token.expiry_year == 0
    assert visa.token.token[:6] == VISA[:6] and visa.token.token[-4:] == VISA[-4:]
    # A 15-digit card cannot keep its BIN: that item alone fails, the chunk does not.
    assert amex.error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    # The same card again: the same token, not a second one.
    again = await _batch(descope, _chunk(tenant, VISA))
    assert again.results[0].token.token == visa.token.token and not again.results[0].created
    # The customer pays by phone later: the IVR's Tokenize (same format: a card has one token
    # per format) finds the token and records the expiry it now knows.
    paid = await tokenizer.stub.Tokenize(tokenize_request(
        VISA, tenant=tenant, format=pb.TOKEN_FORMAT_NUMERIC_KEEP_BIN))
    assert paid.token.token == visa.token.token and not paid.created
    assert paid.token.expiry_month != 0
    revealed = await tokenizer.stub.Detokenize(pb.DetokenizeRequest(
        tenant=tenant, token=visa.token.token, purpose="descope test"))
    assert revealed.card.pan == VISA and revealed.card.expiry_month == paid.token.expiry_month


async def test_a_card_without_expiry_reveals_with_expiry_zero(tokenizer: Running) -> None:
    tenant = unique_name("ds-", 10)
    (result,) = (await _batch(tokenizer.as_("descope/descope-1"), _chunk(
        tenant, "5555555555554444"))).results
    revealed = await tokenizer.stub.Detokenize(pb.DetokenizeRequest(
        tenant=tenant, token=result.token.token, purpose="descope test"))
    assert (revealed.card.pan, revealed.card.expiry_month, revealed.card.expiry_year) == (
        "5555555555554444", 0, 0)
    got = await tokenizer.stub.GetToken(pb.GetTokenRequest(tenant=tenant,
                                                           token=result.token.token))
    assert (got.token.expiry_month, got.token.expiry_year, got.token.last4) == (0, 0, "4444")


async def test_only_a_role_the_policy_allows_tokenizes_without_expiry(
        tokenizer: Running) -> None:
    tenant = unique_name("ds-", 10)
    for who in ("intake/intake-1", "ivr/ivr-1"):
        failure = await rpc_failure(_batch(tokenizer.as_(who), _chunk(tenant, VISA)))
        assert (failure.code, failure.reason) == (
            grpc.StatusCode.PERMISSION_DENIED, "EXPIRY_REQUIRED"), who
    # Without the flag, descope must give an expiry like anyone else.
    (result,) = (await _batch(tokenizer.as_("descope/descope-1"), _chunk(
        tenant, VISA, expiry_unknown=False))).results
    assert result.error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]


async def test_an_expiry_in_a_chunk_whose_expiry_is_unknown_is_refused(
        tokenizer: Running) -> None:
    (result,) = (await _batch(tokenizer.as_("descope/descope-1"), _chunk(
        unique_name("ds-", 10), VISA, month=1, year=EXPIRED_YEARS_AGO))).results
    assert result.error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert b"INVALID_EXPIRY" in result.error.SerializeToString()


async def test_each_chunk_is_an_audit_record_of_counts(tokenizer: Running,
                                                       superuser_db: str) -> None:
    tenant = unique_name("ds-", 10)
    stub = tokenizer.as_("descope/descope-1")
    await stub.RecordDescopeChunk(pb.RecordDescopeChunkRequest(
        tenant=tenant, run_id="9f86d081884c7d65" * 2, table="public.notes", chunk=3,
        rows_read=5000, rows_rewritten=37, cards_replaced=40, rows_reread=1))
    conn = await asyncpg.connect(superuser_db)
    try:
        rows = await conn.fetch("SELECT method, outcome, purpose, identity FROM audit_log"
                                " WHERE tenant = $1", tenant)
    finally:
        await conn.close()
    assert [(r["method"], r["outcome"], r["purpose"]) for r in rows] == [(
        "RecordDescopeChunk", "OK",
        "descope run 9f86d081 public.notes chunk 3: read 5000, rewritten 37, cards 40, reread 1")]
    assert rows[0]["identity"] == "spiffe://vaultline/descope/descope-1"


@pytest.mark.parametrize(("field", "value", "reason"), [
    ("table", "public.notes4111111111111111", "INVALID_TABLE"),
    ("table", "notes", "INVALID_TABLE"),
    ("table", "public.notes; DROP TABLE x", "INVALID_TABLE"),
    ("run_id", "not-hex", "INVALID_RUN_ID"),
    ("chunk", 0, "INVALID_COUNT"),
    ("rows_read", -1, "INVALID_COUNT"),
])
async def test_a_malformed_chunk_record_is_refused(tokenizer: Running, field: str,
                                                   value: object, reason: str) -> None:
    request = pb.RecordDescopeChunkRequest(run_id="ab" * 8, table="public.notes", chunk=1)
    setattr(request, field, value)
    failure = await rpc_failure(tokenizer.as_("descope/descope-1").RecordDescopeChunk(request))
    assert (failure.code, failure.reason) == (grpc.StatusCode.INVALID_ARGUMENT, reason)
