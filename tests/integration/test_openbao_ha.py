"""OpenBao on a 3-node Raft cluster (issue 19, item 2 and fault test a): the tokenizer is given
every node, follows the active one, and rides out the loss of the leader. Under continuous
Tokenize load the leader is killed with -9: Raft elects another, cards keep being tokenized
from cached data keys meanwhile, calls that need OpenBao (a new tenant's keys, an audit
checkpoint) fail over to a live node, callers see only UNAVAILABLE or DEADLINE_EXCEEDED, every
acknowledged token reveals to its card and the audit chain verifies."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import pytest

from tests.fixtures.tokenizer import Running
from tests.helpers import luhn_valid, unique_name
from vaultline.devstack.openbao import OpenBaoBootstrap, OpenBaoCluster
from vaultline.gen.admin.v1 import admin_pb2 as admin_pb
from vaultline.gen.tokenization.v1 import tokenization_pb2 as pb

pytestmark = [pytest.mark.integration, pytest.mark.fault]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory
            ) -> Iterator[tuple[OpenBaoCluster, OpenBaoBootstrap]]:
    base = tmp_path_factory.mktemp("openbao-ha")
    base.chmod(0o711)
    cluster = OpenBaoCluster(base / "openbao", dev_dir=base / "dev")
    cluster.start()
    try:
        started = time.monotonic()
        boot = cluster.bootstrap()
        print(f"3-node OpenBao cluster bootstrapped in {time.monotonic() - started:.1f} s")
        yield cluster, boot
    finally:
        cluster.stop()


def _pan(caller: int, n: int) -> str:
    body = f"4{caller:02d}{n:012d}"[:15]
    return next(body + d for d in "0123456789" if luhn_valid(body + d))


async def test_cluster_nodes_are_raft_voters_and_any_node_serves(
        cluster: tuple[OpenBaoCluster, OpenBaoBootstrap],
        start_tokenizer: Callable[..., Any]) -> None:
    nodes, boot = cluster
    assert len([s for s in nodes.raft_peers() if s.get("voter")]) == 3
    roles = sorted(n["role"] for n in nodes.describe())
    assert roles == ["follower", "follower", "leader"]
    # The tokenizer given a follower first still works: the follower forwards.
    leader = nodes.leader()
    assert leader is not None
    followers_first = ",".join([a for a in nodes.addrs if a != leader.addr] + [leader.addr])
    tokenizer: Running = await start_tokenizer(
        vault_addr=followers_first, vault_credentials=boot.tokenizer,
        keys_admin_credentials=boot.keys_admin)
    tenant = unique_name("ha-", 10)
    got = await tokenizer.stub.Tokenize(pb.TokenizeRequest(tenant=tenant, card=pb.Card(
        pan="4111111111111111", expiry_month=12, expiry_year=2031)))
    assert got.token.last4 == "1111"


async def test_killing_the_openbao_leader_under_load(
        cluster: tuple[OpenBaoCluster, OpenBaoBootstrap],
        start_tokenizer: Callable[..., Any], superuser_db: str) -> None:
    nodes, boot = cluster
    tokenizer: Running = await start_tokenizer(
        vault_addr=nodes.addr, vault_credentials=boot.tokenizer,
        keys_admin_credentials=boot.keys_admin)
    tenant = unique_name("ha-", 10)
    acknowledged: dict[str, str] = {}
    errors: list[grpc.StatusCode] = []
    per_second: dict[int, int] = {}
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
                second = int(time.monotonic() - t0)
                per_second[second] = per_second.get(second, 0) + 1
            except grpc.aio.AioRpcError as err:
                errors.append(err.code())

    revealed: dict[int, int] = {}

    async def revealer() -> None:  # reveals of earlier tokens go on from cached keys too
        while not stop.is_set():
            for pan, token in list(acknowledged.items())[:50]:
                try:
                    got = await tokenizer.stub.Detokenize(pb.DetokenizeRequest(
                        tenant=tenant, token=token, purpose="fault test"), timeout=10)
                    assert got.card.pan == pan
                    second = int(time.monotonic() - t0)
                    revealed[second] = revealed.get(second, 0) + 1
                except grpc.aio.AioRpcError as err:
                    errors.append(err.code())
                if stop.is_set():
                    break
            await asyncio.sleep(0.01)

    callers = [asyncio.create_task(caller(i)) for i in range(4)]
    await asyncio.sleep(1)
    callers.append(asyncio.create_task(revealer()))
    await asyncio.sleep(1)
    leader = nodes.leader()
    assert leader is not None and leader.pid is not None
    os.kill(leader.pid, signal.SIGKILL)
    killed = time.monotonic()
    kill_second = int(killed - t0)
    # A call that needs OpenBao now — a new tenant's data keys — fails over to a live node.
    other = unique_name("ha-", 10)
    fresh = await tokenizer.stub.Tokenize(pb.TokenizeRequest(tenant=other, card=pb.Card(
        pan="5555555555554444", expiry_month=12, expiry_year=2031)), timeout=30)
    openbao_back = time.monotonic() - killed
    while nodes.leader() in (None, leader):
        assert time.monotonic() - killed < 30
        await asyncio.sleep(0.05)
    elected = time.monotonic() - killed
    checkpointer = tokenizer.server.checkpointer
    assert checkpointer is not None
    filed = await checkpointer.checkpoint()  # the audit anchor files on the new leader
    await asyncio.sleep(2)
    stop.set()
    await asyncio.gather(*callers)
    assert fresh.token.last4 == "4444" and filed is not None
    assert set(errors) <= {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED}
    during = sum(per_second.get(s, 0) for s in range(kill_second, kill_second + 2))
    print(f"OpenBao leader killed: new leader in {elected:.2f} s; a call needing OpenBao "
          f"answered {openbao_back:.2f} s after the kill; tokens/s around the kill: "
          f"{[per_second.get(s, 0) for s in range(kill_second - 2, kill_second + 4)]}; "
          f"{len(errors)} failed call(s)")
    assert during > 0, "cached data keys keep tokenizing while Raft elects"
    reveals = sum(revealed.get(s, 0) for s in range(kill_second, kill_second + 2))
    print(f"reveals/s around the kill: "
          f"{[revealed.get(s, 0) for s in range(kill_second - 2, kill_second + 4)]}")
    assert reveals > 0, "... and revealing"
    assert elected < 30 and openbao_back < 30

    conn = await asyncpg.connect(superuser_db)
    try:
        rows = await conn.fetch("SELECT token, fingerprint FROM tokens WHERE tenant = $1",
                                tenant)
    finally:
        await conn.close()
    assert len({r["fingerprint"] for r in rows}) == len(rows)
    assert set(acknowledged.values()) <= {r["token"] for r in rows}
    bulk = tokenizer.as_("bulk/bulk-1")
    sample = list(acknowledged.items())[::max(1, len(acknowledged) // 200)]
    chunk = pb.BatchDetokenizeRequest(tenant=tenant, purpose="fault test", items=[
        pb.BatchDetokenizeRequest.Item(reference=pan, token=token) for pan, token in sample])
    async for response in bulk.BatchDetokenize(iter([chunk])):
        assert all(r.card.card.pan == r.reference for r in response.results)
    chain = await tokenizer.audit_as("admin/admin-1").VerifyAuditChain(
        admin_pb.VerifyAuditChainRequest())
    assert chain.intact, chain.problem

    # The killed node comes back and rejoins as a follower.
    leader.start()
    leader.unseal(wait_active=False)
    nodes.wait_voters(3)
    assert sorted(n["role"] for n in nodes.describe()) == ["follower", "follower", "leader"]


def test_a_cluster_restart_unseals_every_node(tmp_path: Path) -> None:
    """`dev up --ha` after Ctrl-C: all nodes come back sealed; bootstrap opens them all."""
    tmp_path.chmod(0o711)
    cluster = OpenBaoCluster(tmp_path / "openbao", dev_dir=tmp_path / "dev")
    cluster.start()
    try:
        cluster.bootstrap()
        cluster.stop()
        cluster.start()
        cluster.bootstrap()
        assert len([s for s in cluster.raft_peers() if s.get("voter")]) == 3
        assert cluster.leader() is not None
    finally:
        cluster.stop()
