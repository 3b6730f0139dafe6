"""TokenizationService over real gRPC, against real OpenBao and PostgreSQL."""

from __future__ import annotations

import asyncio

import asyncpg
import grpc
import pytest
from google.protobuf import duration_pb2

from tests.fixtures.tokenizer import Running
from tests.helpers import luhn_valid, rpc_failure, synthetic_pans, tokenize_request, unique_name
from tests.testcards import ALL_TEST_PANS, TEST_CARDS
from vaultline.gen.tokenization.v1 import tokenization_pb2 as pb

pytestmark = pytest.mark.integration

VISA = "4111111111111111"


@pytest.fixture
def tenant() -> str:
    return unique_name("t-")


async def test_every_brand_tokenizes_and_detokenizes(tokenizer: Running, tenant: str) -> None:
    for brand, pans in TEST_CARDS.items():
        for pan in pans:
            resp = await tokenizer.stub.Tokenize(
                tokenize_request(pan, tenant=tenant, name="A. Cardholder")
            )
            token = resp.token
            assert resp.created
            assert pb.CardBrand.Name(token.brand) == f"CARD_BRAND_{brand}"
            assert token.tenant == tenant
            assert token.format == pb.TOKEN_FORMAT_NUMERIC
            assert len(token.token) == len(pan) and token.token.isdigit()
            assert token.token[-4:] == pan[-4:] == token.last4
            # The BIN is shown only for 16+ digit card numbers (issue 14).
            assert token.bin == (pan[:6] if len(pan) >= 16 else "")
            assert not luhn_valid(token.token), "a numeric token must never pass Luhn"
            assert token.token != pan
            got = await tokenizer.stub.Detokenize(
                pb.DetokenizeRequest(tenant=tenant, token=token.token, purpose="test")
            )
            assert got.card.pan == pan
            assert (got.card.expiry_month, got.card.expiry_year) == (12, 2031)
            assert got.card.cardholder_name == "A. Cardholder"
            assert got.token.token == token.token


async def test_same_pan_same_token_per_tenant(tokenizer: Running, tenant: str) -> None:
    first = await tokenizer.stub.Tokenize(tokenize_request(VISA, tenant=tenant))
    again = await tokenizer.stub.Tokenize(tokenize_request("4111 1111-1111 1111", tenant=tenant))
    other = await tokenizer.stub.Tokenize(tokenize_request(VISA, tenant=tenant + "-b"))
    assert first.created and not again.created and other.created
    assert again.token.token == first.token.token
    assert other.token.token != first.token.token
    # A token of one tenant does not exist for another.
    failure = await rpc_failure(
        tokenizer.stub.GetToken(pb.GetTokenRequest(tenant=tenant + "-b", token=first.token.token))
    )
    assert failure.code == grpc.StatusCode.NOT_FOUND


async def test_empty_tenant_means_default(tokenizer: Running) -> None:
    resp = await tokenizer.stub.Tokenize(tokenize_request("5555555555554444"))
    assert resp.token.tenant == "default"
    got = await tokenizer.stub.GetToken(
        pb.GetTokenRequest(tenant="default", token=resp.token.token)
    )
    assert got.token.last4 == "4444"


async def test_formats(tokenizer: Running, tenant: str) -> None:
    keep = await tokenizer.stub.Tokenize(
        tokenize_request(VISA, tenant=tenant, format=pb.TOKEN_FORMAT_NUMERIC_KEEP_BIN)
    )
    assert keep.token.token[:6] == VISA[:6] and keep.token.token[-4:] == VISA[-4:]
    assert not luhn_valid(keep.token.token)
    assert keep.token.format == pb.TOKEN_FORMAT_NUMERIC_KEEP_BIN
    opaque = await tokenizer.stub.Tokenize(
        tokenize_request(VISA, tenant=tenant, format=pb.TOKEN_FORMAT_OPAQUE)
    )
    assert opaque.token.token.startswith("tok_") and len(opaque.token.token) == 26
    got = await tokenizer.stub.Detokenize(
        pb.DetokenizeRequest(tenant=tenant, token=opaque.token.token, purpose="refund")
    )
    assert got.card.pan == VISA


async def test_request_id_replays_the_first_result(tokenizer: Running, tenant: str) -> None:
    first = await tokenizer.stub.Tokenize(
        tokenize_request("378282246310005", tenant=tenant, request_id="req-1")
    )
    replay = await tokenizer.stub.Tokenize(
        tokenize_request("378282246310005", tenant=tenant, request_id="req-1")
    )
    assert first.created and replay.created, "a replay answers exactly like the first call"
    assert replay.token == first.token
    later = await tokenizer.stub.Tokenize(
        tokenize_request("378282246310005", tenant=tenant, request_id="req-2")
    )
    assert not later.created and later.token.token == first.token.token
    reused = await rpc_failure(
        tokenizer.stub.Tokenize(tokenize_request(VISA, tenant=tenant, request_id="req-1"))
    )
    assert reused.code == grpc.StatusCode.ALREADY_EXISTS
    assert reused.reason == "REQUEST_ID_REUSED"
    assert VISA not in reused.raw


async def test_concurrent_retries_of_one_request_agree(tokenizer: Running, tenant: str) -> None:
    results = await asyncio.gather(*(
        tokenizer.stub.Tokenize(tokenize_request(VISA, tenant=tenant, request_id="same"))
        for _ in range(10)
    ))
    assert len({r.token.token for r in results}) == 1


async def test_ttl_expires_token(tokenizer: Running, tenant: str) -> None:
    resp = await tokenizer.stub.Tokenize(
        tokenize_request(VISA, tenant=tenant, ttl=duration_pb2.Duration(seconds=1))
    )
    assert resp.token.HasField("expire_time")
    token = resp.token.token
    await tokenizer.stub.GetToken(pb.GetTokenRequest(tenant=tenant, token=token))
    await asyncio.sleep(1.3)
    for call in (
        tokenizer.stub.GetToken(pb.GetTokenRequest(tenant=tenant, token=token)),
        tokenizer.stub.Detokenize(pb.DetokenizeRequest(tenant=tenant, token=token, purpose="x")),
        tokenizer.stub.DeleteToken(pb.DeleteTokenRequest(tenant=tenant, token=token)),
    ):
        assert (await rpc_failure(call)).code == grpc.StatusCode.NOT_FOUND
    # The same card tokenized again after expiry gets a fresh token.
    fresh = await tokenizer.stub.Tokenize(tokenize_request(VISA, tenant=tenant))
    assert fresh.created and fresh.token.token != token


async def test_delete_makes_card_unrecoverable(
    tokenizer: Running, tenant: str, superuser_db: str
) -> None:
    resp = await tokenizer.stub.Tokenize(tokenize_request(VISA, tenant=tenant))
    token = resp.token.token
    await tokenizer.stub.DeleteToken(pb.DeleteTokenRequest(tenant=tenant, token=token))
    for call in (
        tokenizer.stub.GetToken(pb.GetTokenRequest(tenant=tenant, token=token)),
        tokenizer.stub.Detokenize(pb.DetokenizeRequest(tenant=tenant, token=token, purpose="x")),
        tokenizer.stub.DeleteToken(pb.DeleteTokenRequest(tenant=tenant, token=token)),
    ):
        assert (await rpc_failure(call)).code == grpc.StatusCode.NOT_FOUND
    conn = await asyncpg.connect(superuser_db)
    try:
        assert await conn.fetchval(
            "SELECT count(*) FROM tokens WHERE tenant = $1", tenant
        ) == 0, "the ciphertext is gone, not just hidden"
    finally:
        await conn.close()


async def test_newer_expiry_updates_the_card(tokenizer: Running, tenant: str) -> None:
    first = await tokenizer.stub.Tokenize(tokenize_request(VISA, tenant=tenant, year=2030))
    renewed = await tokenizer.stub.Tokenize(tokenize_request(VISA, tenant=tenant, year=2033))
    assert renewed.token.token == first.token.token and not renewed.created
    assert renewed.token.expiry_year == 2033
    got = await tokenizer.stub.Detokenize(
        pb.DetokenizeRequest(tenant=tenant, token=first.token.token, purpose="t")
    )
    assert got.card.expiry_year == 2033


BAD_CARDS = [
    ("4111111111111112", 12, 2031, "INVALID_PAN", "card.pan"),  # Luhn
    ("41111111111", 12, 2031, "INVALID_PAN", "card.pan"),  # too short
    ("41111111111111111111", 12, 2031, "INVALID_PAN", "card.pan"),  # too long
    ("4111x11111111111", 12, 2031, "INVALID_PAN", "card.pan"),  # letters
    ("", 12, 2031, "INVALID_PAN", "card.pan"),
    ("9111111111111110", 12, 2031, "UNKNOWN_BRAND", "card.pan"),
    (VISA, 13, 2031, "INVALID_EXPIRY", "card.expiry_month"),
    (VISA, 0, 0, "INVALID_EXPIRY", "card.expiry_month"),
    (VISA, 1, 2020, "EXPIRED_CARD", "card.expiry_year"),
]


@pytest.mark.parametrize("pan,month,year,reason,field", BAD_CARDS)
async def test_bad_cards_are_invalid_argument_without_echo(
    tokenizer: Running, pan: str, month: int, year: int, reason: str, field: str
) -> None:
    failure = await rpc_failure(
        tokenizer.stub.Tokenize(tokenize_request(pan, month=month, year=year))
    )
    assert failure.code == grpc.StatusCode.INVALID_ARGUMENT
    assert (failure.reason, failure.domain) == (reason, "vaultline")
    assert failure.fields == [field]
    if len(pan) >= 4:
        assert pan not in failure.raw and pan[:-1] not in failure.raw


@pytest.mark.parametrize(
    "request_kwargs,reason,field",
    [
        ({"tenant": "Bad Tenant"}, "INVALID_TENANT", "tenant"),
        ({"tenant": "5555555555554444"}, "INVALID_TENANT", "tenant"),  # a PAN is no tenant
        ({"format": 9}, "INVALID_TOKEN_FORMAT", "format"),
        ({"ttl": duration_pb2.Duration(seconds=-5)}, "INVALID_TTL", "ttl"),
        ({"request_id": "x" * 200}, "INVALID_REQUEST_ID", "request_id"),
    ],
)
async def test_bad_request_fields(
    tokenizer: Running, request_kwargs: dict, reason: str, field: str
) -> None:
    failure = await rpc_failure(tokenizer.stub.Tokenize(tokenize_request(VISA, **request_kwargs)))
    assert failure.code == grpc.StatusCode.INVALID_ARGUMENT
    assert (failure.reason, failure.fields) == (reason, [field])


async def test_detokenize_needs_a_clean_purpose(tokenizer: Running, tenant: str) -> None:
    token = (await tokenizer.stub.Tokenize(tokenize_request(VISA, tenant=tenant))).token.token
    missing = await rpc_failure(
        tokenizer.stub.Detokenize(pb.DetokenizeRequest(tenant=tenant, token=token))
    )
    assert (missing.code, missing.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "PURPOSE_REQUIRED")
    pasted = await rpc_failure(
        tokenizer.stub.Detokenize(
            pb.DetokenizeRequest(tenant=tenant, token=token, purpose=f"refund {VISA}")
        )
    )
    assert pasted.reason == "INVALID_PURPOSE" and VISA not in pasted.raw


async def test_malformed_tokens(tokenizer: Running) -> None:
    for bad in ("", "abc", "tok_short", VISA):  # a PAN is never a valid token
        failure = await rpc_failure(tokenizer.stub.GetToken(pb.GetTokenRequest(token=bad)))
        assert (failure.code, failure.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_TOKEN")
        if bad:
            assert bad not in failure.raw
    unknown = await rpc_failure(
        tokenizer.stub.GetToken(pb.GetTokenRequest(token="4111111111111112"))
    )
    assert (unknown.code, unknown.reason) == (grpc.StatusCode.NOT_FOUND, "TOKEN_NOT_FOUND")


async def test_batch_tokenize_answers_every_item_in_order(
    tokenizer: Running, tenant: str
) -> None:
    pans = synthetic_pans(2500, start=10_000)
    chunks = []
    for c in range(3):
        part = pans[c * 1000:(c + 1) * 1000]
        items = [
            pb.BatchTokenizeRequest.Item(reference=f"r{c}-{i}", card=pb.Card(
                pan=p, expiry_month=12, expiry_year=2031))
            for i, p in enumerate(part)
        ]
        # A bad card and a duplicate in the middle of the chunk.
        items.insert(5, pb.BatchTokenizeRequest.Item(reference=f"bad{c}", card=pb.Card(
            pan="4111111111111112", expiry_month=12, expiry_year=2031)))
        if part:
            items.insert(7, pb.BatchTokenizeRequest.Item(reference=f"dup{c}", card=pb.Card(
                pan=part[0], expiry_month=12, expiry_year=2031)))
        chunks.append(pb.BatchTokenizeRequest(tenant=tenant, items=items))
    responses = [r async for r in tokenizer.stub.BatchTokenize(iter(chunks))]
    assert len(responses) == 3
    by_pan: dict[str, str] = {}
    for chunk, response in zip(chunks, responses, strict=True):
        assert [r.reference for r in response.results] == [i.reference for i in chunk.items]
        for item, result in zip(chunk.items, response.results, strict=True):
            if item.reference.startswith("bad"):
                assert result.WhichOneof("outcome") == "error"
                assert result.error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
                assert "4111111111111112" not in str(result.error)
            elif item.reference.startswith("dup"):
                assert not result.created
                assert result.token.token == by_pan[item.card.pan]
            else:
                assert result.created and result.token.last4 == item.card.pan[-4:]
                by_pan[item.card.pan] = result.token.token
    assert len(set(by_pan.values())) == len(by_pan) == 2500

    # BatchDetokenize gives every card back, and per-item errors for unknown tokens; a token
    # sent twice in one chunk is answered twice.
    tokens = list(by_pan.items())
    tokens.insert(7, tokens[1])
    det_items = [pb.BatchDetokenizeRequest.Item(reference=pan, token=tok) for pan, tok in tokens]
    det_items.insert(3, pb.BatchDetokenizeRequest.Item(reference="gone", token="4000000000000001"))
    det_items.insert(4, pb.BatchDetokenizeRequest.Item(reference="junk", token="nope"))
    request = pb.BatchDetokenizeRequest(tenant=tenant, purpose="settlement", items=det_items)
    (response,) = [r async for r in tokenizer.stub.BatchDetokenize(iter([request]))]
    assert [r.reference for r in response.results] == [i.reference for i in det_items]
    for result in response.results:
        if result.reference == "gone":
            assert result.error.code == grpc.StatusCode.NOT_FOUND.value[0]
        elif result.reference == "junk":
            assert result.error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
        else:
            assert result.card.card.pan == result.reference


async def test_batch_detokenize_without_purpose_fails_the_stream(
    tokenizer: Running, tenant: str
) -> None:
    request = pb.BatchDetokenizeRequest(
        tenant=tenant, items=[pb.BatchDetokenizeRequest.Item(reference="a", token="tok_x")]
    )

    async def consume() -> None:
        async for _ in tokenizer.stub.BatchDetokenize(iter([request])):
            pass

    failure = await rpc_failure(consume())
    assert (failure.code, failure.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "PURPOSE_REQUIRED")


async def test_ciphertext_moved_to_another_row_fails_to_open(
    tokenizer: Running, tenant: str, superuser_db: str
) -> None:
    a = (await tokenizer.stub.Tokenize(tokenize_request(VISA, tenant=tenant))).token.token
    b = (
        await tokenizer.stub.Tokenize(tokenize_request("5555555555554444", tenant=tenant))
    ).token.token
    conn = await asyncpg.connect(superuser_db)
    try:
        await conn.execute(
            "UPDATE tokens SET ciphertext = (SELECT ciphertext FROM tokens WHERE tenant = $1"
            " AND token = $2) WHERE tenant = $1 AND token = $3", tenant, a, b,
        )
    finally:
        await conn.close()
    failure = await rpc_failure(
        tokenizer.stub.Detokenize(pb.DetokenizeRequest(tenant=tenant, token=b, purpose="t"))
    )
    assert (failure.code, failure.reason) == (grpc.StatusCode.DATA_LOSS, "CIPHERTEXT_INTEGRITY")
    assert VISA not in failure.raw
    ok = await tokenizer.stub.Detokenize(pb.DetokenizeRequest(tenant=tenant, token=a, purpose="t"))
    assert ok.card.pan == VISA


async def test_database_holds_no_pan_in_clear(
    tokenizer: Running, tenant: str, superuser_db: str
) -> None:
    for pan in ALL_TEST_PANS:
        await tokenizer.stub.Tokenize(tokenize_request(pan, tenant=tenant, name="Jane Roe"))
    conn = await asyncpg.connect(superuser_db)
    try:
        rows = [
            r
            for table in ("tokens", "data_keys", "tokenize_requests")
            for r in await conn.fetch(f"SELECT * FROM {table}")  # noqa: S608 - fixed names
        ]
        dump = "\n".join(
            str(tuple(r)) + repr([bytes(v) for v in r if isinstance(v, bytes | memoryview)])
            for r in rows
        )
    finally:
        await conn.close()
    for pan in ALL_TEST_PANS:
        assert pan not in dump
        assert pan.encode() not in dump.encode()
    assert "Jane Roe" not in dump


async def test_health_and_reflection(tokenizer: Running) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    health = health_pb2_grpc.HealthStub(tokenizer.channel_any)
    for _ in range(50):
        resp = await health.Check(health_pb2.HealthCheckRequest(service=""))
        if resp.status == health_pb2.HealthCheckResponse.SERVING:
            break
        await asyncio.sleep(0.1)
    assert resp.status == health_pb2.HealthCheckResponse.SERVING
    reflect = reflection_pb2_grpc.ServerReflectionStub(tokenizer.channel_any)
    responses = reflect.ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")])
    )
    names = [s.name async for r in responses for s in r.list_services_response.service]
    assert "vaultline.tokenization.v1.TokenizationService" in names


# ---- retention (issue 14) ------------------------------------------------------------------


async def test_expired_tokens_and_old_request_ids_are_purged(
    tokenizer: Running, tenant: str, superuser_db: str
) -> None:
    expiring = await tokenizer.stub.Tokenize(tokenize_request(
        VISA, tenant=tenant, ttl=duration_pb2.Duration(seconds=1)))
    kept = await tokenizer.stub.Tokenize(tokenize_request(
        "5555555555554444", tenant=tenant, request_id="order-1"))
    conn = await asyncpg.connect(superuser_db)
    try:
        # A day and more ago, as far as the retention window can tell.
        await conn.execute("UPDATE tokenize_requests SET created_at = now() - interval '25 hours'"
                           " WHERE tenant = $1", tenant)
        await asyncio.sleep(1.1)  # the TTL token expires
        purger = tokenizer.server.purger
        assert purger is not None
        purged = await purger.purge_once()
        assert purged.tokens >= 1 and purged.requests >= 1
        tokens = {r["token"] for r in await conn.fetch(
            "SELECT token FROM tokens WHERE tenant = $1", tenant)}
        requests = await conn.fetchval(
            "SELECT count(*) FROM tokenize_requests WHERE tenant = $1", tenant)
    finally:
        await conn.close()
    assert expiring.token.token not in tokens  # gone, with its ciphertext
    assert tokens == {kept.token.token}
    assert requests == 0
    # The old request id no longer binds: the same id with another card is a new request.
    again = await tokenizer.stub.Tokenize(tokenize_request(
        "4012888888881881", tenant=tenant, request_id="order-1"))
    assert again.created
