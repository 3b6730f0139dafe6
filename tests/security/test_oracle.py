"""Issue 14, finding 1: nobody outside the card data zone can confirm a guessed card number.

Before: the CRM could Tokenize, and replaying the IVR's request id (`ivr-<session>-<seq>`,
whose session id reaches the CRM in the capture event) with a candidate PAN answered OK for
the right card and ALREADY_EXISTS otherwise, writing nothing. Each test failed on that code.
"""

from __future__ import annotations

import uuid

import asyncpg
import grpc
import pytest

from tests.fixtures.tokenizer import Running
from tests.helpers import rpc_failure, tokenize_request, unique_name
from vaultline.ivr.sealing import SessionSealer

pytestmark = pytest.mark.integration

RIGHT = "4111111111111111"
WRONG = "4012888888881881"


async def test_the_crm_may_not_tokenize_at_all(tokenizer: Running) -> None:
    crm = tokenizer.as_("crm/crm-1")
    for pan in (RIGHT, WRONG):
        failure = await rpc_failure(crm.Tokenize(tokenize_request(pan)))
        assert (failure.code, failure.reason) == (grpc.StatusCode.PERMISSION_DENIED,
                                                  "METHOD_NOT_ALLOWED")


async def test_another_callers_request_id_confirms_nothing(tokenizer: Running) -> None:
    tenant = unique_name("o-", 10)
    request_id = f"ivr-{uuid.uuid4()}-3"  # as the IVR's ids used to be: known to the CRM
    ivr = tokenizer.as_("ivr/ivr-1")
    first = await ivr.Tokenize(tokenize_request(RIGHT, tenant=tenant, request_id=request_id))
    # The owner's retry still answers with its first result, and a different card under its
    # request id is still refused: idempotency works for the caller that sent it.
    again = await ivr.Tokenize(tokenize_request(RIGHT, tenant=tenant, request_id=request_id))
    assert again.token.token == first.token.token
    reused = await rpc_failure(ivr.Tokenize(tokenize_request(WRONG, tenant=tenant,
                                                             request_id=request_id)))
    assert reused.code == grpc.StatusCode.ALREADY_EXISTS
    # Another tokenizing identity replaying it learns nothing from the request id: a wrong
    # guess is not refused as "reused" (it is simply a new request of its own).
    other = tokenizer.as_("intake/intake-1")
    guess = await other.Tokenize(tokenize_request(WRONG, tenant=tenant, request_id=request_id))
    assert guess.created  # its own new token, not ALREADY_EXISTS


async def test_request_ids_are_stored_only_keyed_and_per_caller(
    tokenizer: Running, superuser_db: str
) -> None:
    tenant = unique_name("o-", 10)
    request_id = "plain-" + uuid.uuid4().hex
    await tokenizer.as_("ivr/ivr-1").Tokenize(
        tokenize_request(RIGHT, tenant=tenant, request_id=request_id))
    await tokenizer.as_("intake/intake-1").Tokenize(
        tokenize_request(RIGHT, tenant=tenant, request_id=request_id))
    conn = await asyncpg.connect(superuser_db)
    try:
        rows = await conn.fetch("SELECT caller, request_key, tokenize_requests::text AS row"
                                " FROM tokenize_requests WHERE tenant = $1 ORDER BY caller",
                                tenant)
    finally:
        await conn.close()
    assert [r["caller"] for r in rows] == ["spiffe://vaultline/intake/intake-1",
                                           "spiffe://vaultline/ivr/ivr-1"]
    assert rows[0]["request_key"] != rows[1]["request_key"]  # bound to the caller
    assert all(request_id not in r["row"] for r in rows)


def test_the_ivr_request_ids_are_unguessable_and_stable_across_replicas() -> None:
    secret = bytes(range(32))
    one, two = SessionSealer(secret), SessionSealer(secret)
    session = str(uuid.uuid4())
    rid = one.request_id(session, 4)
    assert rid == two.request_id(session, 4)  # any replica derives the same id
    assert rid != one.request_id(session, 5) and rid != one.request_id(str(uuid.uuid4()), 4)
    assert session not in rid and rid != SessionSealer(bytes(32)).request_id(session, 4)
