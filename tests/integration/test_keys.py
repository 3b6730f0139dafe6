"""Key management against real OpenBao: KEK rotation, data-key retirement, OpenBao off the
per-card path, and tokens surviving a tokenizer restart."""

from __future__ import annotations

import asyncio
import datetime as dt

import asyncpg
import pytest

from tests.fixtures.infra import OpenBaoHandle
from tests.helpers import synthetic_pans, tokenize_request, unique_name
from vaultline.gen.tokenization.v1 import tokenization_pb2 as pb
from vaultline.keyring import KeyPolicy, rewrap_all
from vaultline.store import Store
from vaultline.vault import TransitClient, wrapped_version

pytestmark = pytest.mark.integration


@pytest.fixture
def tenant() -> str:
    return unique_name("k-")


async def _tokenize_batch(stub, tenant: str, pans: list[str]) -> list[str]:  # type: ignore[no-untyped-def]
    request = pb.BatchTokenizeRequest(tenant=tenant, items=[
        pb.BatchTokenizeRequest.Item(reference=p, card=pb.Card(
            pan=p, expiry_month=12, expiry_year=2031)) for p in pans])
    (response,) = [r async for r in stub.BatchTokenize(iter([request]))]
    assert all(r.WhichOneof("outcome") == "token" for r in response.results)
    return [r.token.token for r in response.results]


async def _reveal_all(stub, tenant: str, tokens: list[str]) -> list[str]:  # type: ignore[no-untyped-def]
    request = pb.BatchDetokenizeRequest(tenant=tenant, purpose="key test", items=[
        pb.BatchDetokenizeRequest.Item(reference=t, token=t) for t in tokens])
    (response,) = [r async for r in stub.BatchDetokenize(iter([request]))]
    assert all(r.WhichOneof("outcome") == "card" for r in response.results), response.results[:3]
    return [r.card.card.pan for r in response.results]


async def test_kek_rotation_rewraps_every_data_key_online(
    start_tokenizer, openbao: OpenBaoHandle, migrated, tenant: str
) -> None:
    running = await start_tokenizer()
    pans = synthetic_pans(50, start=500_000)
    tokens = await _tokenize_batch(running.stub, tenant, pans)

    admin = TransitClient(openbao.addr, openbao.keys_admin)
    before = admin.key_status().latest_version
    await asyncio.to_thread(admin.rotate_key)
    latest = admin.key_status().latest_version
    assert latest == before + 1

    store = await Store.connect(migrated.keys_dsn, min_size=1, max_size=2)  # `keys`' own role
    try:
        report = await rewrap_all(store, admin, latest)
        assert report.rewrapped >= 2  # this tenant's pan and fingerprint keys at least
        rows = await store.list_data_keys(0, 10_000)
        assert rows and all(wrapped_version(r.wrapped_key) == latest for r in rows)
        assert all(r.kek_version == latest for r in rows)
        again = await rewrap_all(store, admin, latest)
        assert again.rewrapped == 0, "re-running is a no-op"
    finally:
        await store.close()

    # A fresh tokenizer (empty key cache) unwraps the rewrapped keys: old tokens still open,
    # and the same PAN still finds the same token (the fingerprint key is unchanged).
    fresh = await start_tokenizer()
    assert await _reveal_all(fresh.stub, tenant, tokens) == pans
    same = await fresh.stub.Tokenize(tokenize_request(pans[0], tenant=tenant))
    assert same.token.token == tokens[0] and not same.created
    # The still-running old tokenizer keeps working with its cached keys too.
    assert await _reveal_all(running.stub, tenant, tokens[:5]) == pans[:5]


async def test_data_keys_retire_after_their_budget(
    start_tokenizer, superuser_db: str, tenant: str
) -> None:
    running = await start_tokenizer(KeyPolicy(max_uses=40, reserve_block=10))
    pans = synthetic_pans(100, start=600_000)
    tokens: list[str] = []
    for i in range(0, 100, 20):  # five chunks of 20 → 100 encryptions, 40 per key at most
        tokens += await _tokenize_batch(running.stub, tenant, pans[i:i + 20])
    conn = await asyncpg.connect(superuser_db)
    try:
        keys = await conn.fetch(
            "SELECT id, uses, max_uses, retired_at FROM data_keys"
            " WHERE tenant = $1 AND purpose = 'pan' ORDER BY id", tenant)
        per_key = await conn.fetch(
            "SELECT data_key_id, count(*) FROM tokens WHERE tenant = $1 GROUP BY 1", tenant)
    finally:
        await conn.close()
    assert len(keys) >= 3
    assert all(k["uses"] <= k["max_uses"] == 40 for k in keys)
    assert sum(1 for k in keys if k["retired_at"] is None) == 1
    assert all(count <= 40 for _, count in per_key)
    # Retired keys still decrypt, from a tokenizer that never saw them.
    fresh = await start_tokenizer()
    assert await _reveal_all(fresh.stub, tenant, tokens) == pans


async def test_data_keys_retire_after_their_age(
    start_tokenizer, superuser_db: str, tenant: str
) -> None:
    running = await start_tokenizer(KeyPolicy(max_age=dt.timedelta(seconds=1)))
    first = await _tokenize_batch(running.stub, tenant, synthetic_pans(3, start=700_000))
    await asyncio.sleep(1.2)
    second = await _tokenize_batch(running.stub, tenant, synthetic_pans(3, start=700_010))
    conn = await asyncpg.connect(superuser_db)
    try:
        ids = await conn.fetch(
            "SELECT DISTINCT data_key_id FROM tokens WHERE tenant = $1", tenant)
    finally:
        await conn.close()
    assert len(ids) == 2
    assert len(await _reveal_all(running.stub, tenant, first + second)) == 6


async def test_openbao_is_not_called_per_card(start_tokenizer, tenant: str) -> None:
    running = await start_tokenizer()
    vault = running.server.keyring._vault  # the real TransitClient
    calls: list[str] = []
    for name in ("generate_data_key", "decrypt_data_keys"):
        original = getattr(vault, name)

        def counted(*args, _original=original, _name=name):  # type: ignore[no-untyped-def]
            calls.append(_name)
            return _original(*args)

        setattr(vault, name, counted)
    pans = synthetic_pans(3000, start=800_000)
    tokens = []
    for i in range(0, 3000, 1000):
        tokens += await _tokenize_batch(running.stub, tenant, pans[i:i + 1000])
    for pan in pans[:50]:
        await running.stub.Tokenize(tokenize_request(pan, tenant=tenant))
    assert await _reveal_all(running.stub, tenant, tokens) == pans
    # One key per purpose for the new tenant, then nothing more for 3,050 cards.
    assert calls == ["generate_data_key", "generate_data_key"]


async def test_tokens_survive_a_tokenizer_restart(start_tokenizer, tenant: str) -> None:
    first = await start_tokenizer()
    pans = synthetic_pans(20, start=900_000)
    tokens = await _tokenize_batch(first.stub, tenant, pans)
    await first.close()
    await first.server.stop(grace=0)
    second = await start_tokenizer()
    assert await _reveal_all(second.stub, tenant, tokens) == pans
    again = await _tokenize_batch(second.stub, tenant, pans)
    assert again == tokens
