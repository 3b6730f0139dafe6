"""Outages of OpenBao and PostgreSQL mid-run: UNAVAILABLE, nothing half-written, and recovery
without restarting the tokenizer."""

from __future__ import annotations

import asyncio

import asyncpg
import grpc
import pytest

from tests.fixtures.infra import OpenBaoHandle, PostgresHandle
from tests.helpers import rpc_failure, synthetic_pans, tokenize_request, unique_name
from vaultline.gen.tokenization.v1 import tokenization_pb2 as pb

pytestmark = pytest.mark.integration

VISA = "4111111111111111"


def _tenant() -> str:
    return unique_name("f-")


async def _rows(superuser_db: str, tenant: str) -> tuple[int, int]:
    conn = await asyncpg.connect(superuser_db)
    try:
        tokens = await conn.fetchval("SELECT count(*) FROM tokens WHERE tenant = $1", tenant)
        keys = await conn.fetchval("SELECT count(*) FROM data_keys WHERE tenant = $1", tenant)
        return tokens, keys
    finally:
        await conn.close()


async def _eventually(call, attempts: int = 40):  # type: ignore[no-untyped-def]
    """The call succeeds again within a few seconds once the dependency is back."""
    for _ in range(attempts):
        try:
            return await call()
        except grpc.aio.AioRpcError as err:
            assert err.code() == grpc.StatusCode.UNAVAILABLE, err.code()
            await asyncio.sleep(0.25)
    raise AssertionError("did not recover")


async def _batch(stub, tenant: str, pans: list[str]) -> pb.BatchTokenizeResponse:  # type: ignore[no-untyped-def]
    request = pb.BatchTokenizeRequest(tenant=tenant, items=[
        pb.BatchTokenizeRequest.Item(reference=p, card=pb.Card(
            pan=p, expiry_month=12, expiry_year=2031)) for p in pans])
    (response,) = [r async for r in stub.BatchTokenize(iter([request]))]
    return response


@pytest.mark.parametrize("outage", ["sealed", "stopped"])
async def test_openbao_outage(
    start_tokenizer, openbao: OpenBaoHandle, superuser_db: str, outage: str
) -> None:
    warm_tenant, cold_tenant = _tenant(), _tenant()
    running = await start_tokenizer()
    warm = await running.stub.Tokenize(tokenize_request(VISA, tenant=warm_tenant))
    cold_reader = await start_tokenizer()  # has never unwrapped a key

    with openbao.sealed() if outage == "sealed" else openbao.stopped():
        # A tenant without keys needs OpenBao: UNAVAILABLE, and nothing written.
        failure = await rpc_failure(
            running.stub.Tokenize(tokenize_request(VISA, tenant=cold_tenant))
        )
        assert (failure.code, failure.reason) == (
            grpc.StatusCode.UNAVAILABLE, "KEY_SERVICE_UNAVAILABLE")
        assert await _rows(superuser_db, cold_tenant) == (0, 0)
        batch_failure = await rpc_failure(_batch(running.stub, cold_tenant, [VISA]))
        assert batch_failure.code == grpc.StatusCode.UNAVAILABLE
        # Detokenizing needs the data key unwrapped: a cold tokenizer cannot.
        cold = await rpc_failure(cold_reader.stub.Detokenize(pb.DetokenizeRequest(
            tenant=warm_tenant, token=warm.token.token, purpose="fault test")))
        assert cold.code == grpc.StatusCode.UNAVAILABLE
        # Keys already in memory keep working: OpenBao is off the per-card path.
        more = await running.stub.Tokenize(tokenize_request("5555555555554444", tenant=warm_tenant))
        assert more.created

    # Back: both tokenizers recover on their own.
    created = await _eventually(
        lambda: running.stub.Tokenize(tokenize_request(VISA, tenant=cold_tenant)))
    assert created.created
    revealed = await _eventually(lambda: cold_reader.stub.Detokenize(pb.DetokenizeRequest(
        tenant=warm_tenant, token=warm.token.token, purpose="fault test")))
    assert revealed.card.pan == VISA


async def test_postgres_stopped_mid_run(
    start_tokenizer, migrated: PostgresHandle, superuser_db: str
) -> None:
    tenant = _tenant()
    running = await start_tokenizer()
    first = await running.stub.Tokenize(tokenize_request(VISA, tenant=tenant))
    pans = synthetic_pans(200, start=1_000_000)

    with migrated.stopped():
        for call in (
            running.stub.Tokenize(tokenize_request("5555555555554444", tenant=tenant)),
            running.stub.GetToken(pb.GetTokenRequest(tenant=tenant, token=first.token.token)),
            running.stub.Detokenize(pb.DetokenizeRequest(
                tenant=tenant, token=first.token.token, purpose="fault test")),
            _batch(running.stub, tenant, pans),
        ):
            failure = await rpc_failure(call)
            assert (failure.code, failure.reason) == (
                grpc.StatusCode.UNAVAILABLE, "DATABASE_UNAVAILABLE"), failure

    # Nothing of the failed batch was half-written; the service recovers without restart.
    assert await _rows(superuser_db, tenant) == (1, 2)
    response = await _eventually(lambda: _batch(running.stub, tenant, pans))
    assert all(r.created for r in response.results)
    got = await running.stub.Detokenize(pb.DetokenizeRequest(
        tenant=tenant, token=first.token.token, purpose="fault test"))
    assert got.card.pan == VISA


@pytest.mark.parametrize("store", ["vault", "ivr"])
async def test_a_silent_database_fails_fast_for_the_vault_and_the_ivr(store: str) -> None:
    """A server that accepts connections and never answers (a hung PostgreSQL, a black-holed
    network path): both services' pools give up after their 5 s connect timeout with
    DatabaseUnavailable, rather than asyncpg's 60 s default that would hold a Twilio webhook."""
    from vaultline.errors import DatabaseUnavailable
    from vaultline.ivr_store import IvrStore
    from vaultline.store import Store

    accepted: list[asyncio.StreamWriter] = []

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer)  # keep it open, say nothing

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    dsn = f"postgresql://nobody:x@127.0.0.1:{port}/vaultline"
    connect = Store.connect if store == "vault" else IvrStore.connect
    try:
        with pytest.raises(DatabaseUnavailable):
            # Well below asyncpg's 60 s default: only the configured timeout ends this.
            await asyncio.wait_for(connect(dsn, min_size=1, max_size=1), timeout=30)
    finally:
        for writer in accepted:
            writer.close()
        server.close()
        await server.wait_closed()
    assert accepted, "the pool did try to connect"
