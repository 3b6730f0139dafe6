"""PostgreSQL under Patroni (issue 19, item 3 and fault test b): a primary and a synchronous
standby on a 3-member etcd cluster. Under continuous Tokenize load the primary's machine is
lost — its postmaster and its Patroni agent killed with -9 together — and the standby is
promoted: callers see only UNAVAILABLE or DEADLINE_EXCEEDED, never a half-written result;
every token acknowledged before or after is there and reveals to its card (synchronous
replication: an acknowledged commit was on both nodes); no card has two tokens; the audit
chain verifies; the service answers again within 30 s."""

from __future__ import annotations

import asyncio
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import pytest

from tests.fixtures.tokenizer import Running
from tests.helpers import luhn_valid, unique_name
from vaultline.devstack.patroni import PatroniCluster
from vaultline.devstack.postgres import PostgresBootstrap
from vaultline.gen.admin.v1 import admin_pb2 as admin_pb
from vaultline.gen.tokenization.v1 import tokenization_pb2 as pb
from vaultline.store import migrate

pytestmark = [pytest.mark.integration, pytest.mark.fault]


@pytest.fixture(scope="module")
def patroni() -> Iterator[tuple[PatroniCluster, PostgresBootstrap]]:
    # In /tmp itself: the PostgreSQL server account must reach it (pytest's tmp is 0700).
    base = Path(tempfile.mkdtemp(prefix="vaultline-patroni-"))
    base.chmod(0o711)
    cluster = PatroniCluster(base / "postgres", dev_dir=base / "dev")
    started = time.monotonic()
    cluster.start()
    try:
        boot = cluster.bootstrap()
        asyncio.run(migrate(boot.owner_dsn))
        print(f"Patroni cluster (primary + sync standby, 3 etcd) ready in "
              f"{time.monotonic() - started:.1f} s")
        yield cluster, boot
    finally:
        cluster.stop()
        shutil.rmtree(base, ignore_errors=True)


def _pan(caller: int, n: int) -> str:
    body = f"5{caller:02d}{n:012d}"[:15]
    return next(body + d for d in "0123456789" if luhn_valid(body + d))


def test_a_primary_and_a_synchronous_standby(
        patroni: tuple[PatroniCluster, PostgresBootstrap]) -> None:
    cluster, boot = patroni
    roles = sorted(n["role"] for n in cluster.describe() if n["kind"] == "postgresql")
    assert roles == ["primary", "sync_standby"]
    assert [n["kind"] for n in cluster.describe()].count("etcd") == 3
    assert "target_session_attrs=read-write" in boot.app_dsn and boot.app_dsn.count(":") >= 4


async def test_losing_the_primary_under_load(
        patroni: tuple[PatroniCluster, PostgresBootstrap],
        start_tokenizer: Callable[..., Any]) -> None:
    cluster, boot = patroni
    tokenizer: Running = await start_tokenizer(
        database_url=boot.app_dsn, audit_chain=unique_name("patroni", 8))
    tenant = unique_name("pg-", 10)
    acknowledged: dict[str, str] = {}
    errors: list[grpc.StatusCode] = []
    answered_at: list[float] = []
    stop = asyncio.Event()
    t0 = time.monotonic()

    async def caller(index: int) -> None:
        n = 0
        while not stop.is_set():
            n += 1
            pan = _pan(index, n)
            try:
                got = await tokenizer.stub.Tokenize(pb.TokenizeRequest(
                    tenant=tenant, card=pb.Card(pan=pan, expiry_month=12, expiry_year=2031)),
                    timeout=10)
                acknowledged[pan] = got.token.token
                answered_at.append(time.monotonic())
            except grpc.aio.AioRpcError as err:
                errors.append(err.code())
                await asyncio.sleep(0.05)

    callers = [asyncio.create_task(caller(i)) for i in range(4)]
    await asyncio.sleep(2)
    primary = cluster.leader()
    assert primary is not None
    cluster.kill_node(primary)  # the machine: postmaster and Patroni agent, -9
    killed = time.monotonic()
    while not [t for t in answered_at if t > killed + 0.5] or cluster.leader() in (None,
                                                                                    primary):
        assert time.monotonic() - killed < 30, f"no answer 30 s after the kill: {errors[-3:]}"
        await asyncio.sleep(0.1)
    recovered = min(t for t in answered_at if t > killed + 0.5) - killed
    await asyncio.sleep(2)
    stop.set()
    await asyncio.gather(*callers)
    new_primary = cluster.leader()
    per_second: dict[int, int] = {}
    for t in answered_at:
        per_second[int(t - t0)] = per_second.get(int(t - t0), 0) + 1
    kill_second = int(killed - t0)
    dip = [per_second.get(s, 0) for s in range(kill_second - 2, kill_second + 24)]
    print(f"PostgreSQL primary lost: {new_primary} promoted; Tokenize answered again "
          f"{recovered:.1f} s after the kill; {len(errors)} failed call(s) "
          f"({sorted({e.name for e in errors})}); {len(acknowledged)} tokens acknowledged; "
          f"tokens/s from 2 s before the kill: {dip}")
    assert new_primary not in (None, primary)
    assert recovered < 30
    assert set(errors) <= {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED}

    superuser = boot.superuser_dsn.replace("/postgres?", "/vaultline?")
    conn = await asyncpg.connect(superuser)
    try:
        rows = await conn.fetch("SELECT token, fingerprint FROM tokens WHERE tenant = $1",
                                tenant)
    finally:
        await conn.close()
    assert len({r["fingerprint"] for r in rows}) == len(rows), "no card has two tokens"
    assert set(acknowledged.values()) <= {r["token"] for r in rows}, "an acknowledged token lost"
    sample = list(acknowledged.items())[::max(1, len(acknowledged) // 300)]
    chunk = pb.BatchDetokenizeRequest(tenant=tenant, purpose="fault test", items=[
        pb.BatchDetokenizeRequest.Item(reference=pan, token=token) for pan, token in sample])
    async for response in tokenizer.as_("bulk/bulk-1").BatchDetokenize(iter([chunk])):
        assert all(r.card.card.pan == r.reference for r in response.results)
    chain = await tokenizer.audit_as("admin/admin-1").VerifyAuditChain(
        admin_pb.VerifyAuditChainRequest())
    assert chain.intact, chain.problem

    cluster.restart_node(primary)  # the machine comes back: it rejoins as the standby
    cluster.wait_healthy(90)
    assert sorted(n["role"] for n in cluster.describe() if n["kind"] == "postgresql") == [
        "primary", "sync_standby"]


def test_a_stopped_cluster_comes_back() -> None:
    """`dev up --ha` after Ctrl-C: etcd's members and Patroni's nodes restart on their data,
    elect a primary and a synchronous standby again, and the database is still there."""
    base = Path(tempfile.mkdtemp(prefix="vaultline-patroni-"))
    base.chmod(0o711)
    cluster = PatroniCluster(base / "postgres", dev_dir=base / "dev")
    try:
        cluster.start()
        first = cluster.bootstrap()
        cluster.stop()
        cluster = PatroniCluster(base / "postgres", dev_dir=base / "dev")
        cluster.start()
        again = cluster.bootstrap()  # idempotent: the roles keep their passwords
        assert again.app_dsn == first.app_dsn
        assert sorted(n["role"] for n in cluster.describe() if n["kind"] == "postgresql") == [
            "primary", "sync_standby"]

        async def count() -> int:
            conn = await asyncpg.connect(again.owner_dsn)
            try:
                return int(await conn.fetchval("SELECT count(*) FROM pg_database"
                                               " WHERE datname = 'vaultline'"))
            finally:
                await conn.close()

        assert asyncio.run(count()) == 1
    finally:
        cluster.stop()
        shutil.rmtree(base, ignore_errors=True)
