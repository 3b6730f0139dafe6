"""`vaultline serve --workers N` (issue 19, item 1): N processes on one port, the quota shared
by them (a stolen certificate gets its quota once, not N times), one merged metrics endpoint,
a worker killed with -9 mid-BatchTokenize restarted while callers see only UNAVAILABLE and
every acknowledged token stays right, and Ctrl-C stops every process."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import grpc
import pytest
import pytest_asyncio

from tests.fixtures import tokenizer as fixtures
from tests.fixtures.infra import OpenBaoHandle, PostgresHandle
from tests.helpers import luhn_valid, unique_name
from vaultline.gen.admin.v1 import admin_pb2 as admin_pb
from vaultline.gen.admin.v1 import admin_service_pb2_grpc as admin_grpc
from vaultline.gen.tokenization.v1 import tokenization_pb2 as pb
from vaultline.gen.tokenization.v1 import tokenization_service_pb2_grpc as pb_grpc

pytestmark = pytest.mark.integration

VAULTLINE = [sys.executable, "-m", "vaultline.cli"]


class Served:
    def __init__(self, proc: subprocess.Popen[str], status_file: Path,
                 pki: fixtures.TestPki) -> None:
        self.proc = proc
        self.status_file = status_file
        self.pki = pki

    def status(self) -> dict:  # type: ignore[type-arg]
        return json.loads(self.status_file.read_text())

    @property
    def address(self) -> str:
        return str(self.status()["workers"][0]["address"])

    def channel(self, who: str) -> grpc.aio.Channel:
        return grpc.aio.secure_channel(self.address, self.pki.credentials(who))


def _env(openbao: OpenBaoHandle, postgres: PostgresHandle, pki: fixtures.TestPki) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("VAULTLINE_")}
    env.update(
        VAULTLINE_DATABASE_URL=postgres.app_dsn, VAULTLINE_VAULT_ADDR=openbao.addr,
        VAULTLINE_VAULT_ROLE_ID=openbao.tokenizer.role_id,
        VAULTLINE_VAULT_SECRET_ID=openbao.tokenizer.secret_id,
        VAULTLINE_TLS_CA=str(pki.ca), VAULTLINE_TLS_CERT=str(pki.server_cert),
        VAULTLINE_TLS_KEY=str(pki.server_key), VAULTLINE_POLICY_FILE=str(pki.policy),
        VAULTLINE_GRPC_LISTEN="127.0.0.1:0", VAULTLINE_METRICS_LISTEN="127.0.0.1:0")
    return env


@pytest_asyncio.fixture
async def served(openbao: OpenBaoHandle, migrated: PostgresHandle, test_pki: fixtures.TestPki,
                 tmp_path: Path) -> AsyncIterator[Served]:
    status_file = tmp_path / "workers.json"
    proc = subprocess.Popen(
        [*VAULTLINE, "serve", "--workers", "2", "--status-file", str(status_file)],
        env=_env(openbao, migrated, test_pki), stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, start_new_session=True)
    deadline = time.monotonic() + 90
    while not (status_file.exists() and len(json.loads(status_file.read_text())["workers"]) == 2):
        assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
        assert time.monotonic() < deadline, "workers did not start"
        await asyncio.sleep(0.1)
    served = Served(proc, status_file, test_pki)
    try:
        yield served
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as fh:  # a zombie is not alive
        return fh.read().split()[2] != "Z"


async def _tokenize(served: Served, who: str, pan: str, tenant: str) -> pb.TokenizeResponse:
    async with served.channel(who) as channel:  # a new connection: the kernel picks a worker
        return await pb_grpc.TokenizationServiceStub(channel).Tokenize(pb.TokenizeRequest(
            tenant=tenant, card=pb.Card(pan=pan, expiry_month=12, expiry_year=2031)))


def _scrape(served: Served) -> str:
    with urllib.request.urlopen(f"http://{served.status()['metrics']}/metrics",
                                timeout=10) as answer:
        return answer.read().decode()


async def test_workers_share_the_port_the_quota_and_one_metrics_endpoint(
        served: Served) -> None:
    status = served.status()
    pids = [w["pid"] for w in status["workers"]]
    assert len(set(pids)) == 2 and status["supervisor_pid"] == served.proc.pid
    assert {w["address"] for w in status["workers"]} == {served.address}
    tenant = unique_name("wk-", 10)
    for _ in range(12):  # new connections land on both workers
        await _tokenize(served, "intake/intake-1", "4111111111111111", tenant)
    text = _scrape(served)
    served_by = {line.split('worker="')[1].split('"')[0] for line in text.splitlines()
                 if line.startswith("vaultline_grpc_calls_total") and 'method="Tokenize"' in line}
    assert served_by == {"0", "1"}, "both workers answered"

    # ivr-tight may tokenize 10 cards in a burst, 5 a second after. Spread over both
    # workers, it still gets 10 (plus what refilled), not 20.
    accepted, refused = 0, 0
    started = time.monotonic()
    for _ in range(30):
        try:
            await _tokenize(served, "ivr/ivr-tight", "5555555555554444", tenant)
            accepted += 1
        except grpc.aio.AioRpcError as err:
            assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err
            refused += 1
    refill = 5 * (time.monotonic() - started)
    assert accepted <= 10 + refill + 1 and refused >= 30 - (10 + refill + 1)
    # ... while both workers took its calls (each refused some): one bucket for both.
    refusing = {line.split('worker="')[1].split('"')[0] for line in _scrape(served).splitlines()
                if line.startswith("vaultline_quota_refusals_total") and "ivr-tight" in line}
    assert refusing == {"0", "1"}


@pytest.mark.fault
async def test_a_worker_killed_mid_batch_is_restarted_and_no_acknowledged_token_is_lost(
        served: Served, superuser_db: str) -> None:
    tenant = unique_name("wk-", 10)
    victim = served.status()["workers"][1]["pid"]
    acknowledged: dict[str, str] = {}  # pan -> token
    errors: list[grpc.StatusCode] = []
    stop = asyncio.Event()
    t0 = time.monotonic()
    per_second: dict[int, int] = {}

    def pans(caller: int, n: int) -> list[str]:
        """200 distinct Visa-range card numbers for this caller's n-th batch."""
        out = []
        for i in range(200):
            body = f"4{caller:02d}{n:06d}{i:03d}000"[:15]
            out.append(next(body + d for d in "0123456789" if luhn_valid(body + d)))
        return out

    async def caller(index: int) -> None:
        n = 0
        while not stop.is_set():
            n += 1
            batch = pans(index, n)
            try:
                async with served.channel("intake/intake-1") as channel:
                    stub = pb_grpc.TokenizationServiceStub(channel)
                    chunks = [pb.BatchTokenizeRequest(tenant=tenant, items=[
                        pb.BatchTokenizeRequest.Item(reference=pan, card=pb.Card(
                            pan=pan, expiry_month=12, expiry_year=2031)) for pan in batch])]
                    async for response in stub.BatchTokenize(iter(chunks), timeout=20):
                        for result in response.results:
                            assert result.HasField("token"), result
                            acknowledged[result.reference] = result.token.token
                        second = int(time.monotonic() - t0)
                        per_second[second] = per_second.get(second, 0) + len(response.results)
            except grpc.aio.AioRpcError as err:
                errors.append(err.code())
                await asyncio.sleep(0.05)

    tasks = [asyncio.create_task(caller(i)) for i in range(4)]
    await asyncio.sleep(2)
    os.kill(victim, signal.SIGKILL)
    killed_at = time.monotonic()
    while True:  # the supervisor restarts it, and the service answers
        status = served.status()
        if status["restarts"] >= 1 and len(status["workers"]) == 2:
            break
        assert time.monotonic() - killed_at < 30, status
        await asyncio.sleep(0.1)
    recovered = time.monotonic() - killed_at
    before = len(acknowledged)
    await asyncio.sleep(2)
    stop.set()
    await asyncio.gather(*tasks)
    assert len(acknowledged) > before, "callers are served again after the restart"
    assert not _alive(victim) and victim not in [w["pid"] for w in served.status()["workers"]]
    assert set(errors) <= {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED}
    kill_second = int(killed_at - t0)
    print(f"worker restarted and serving {recovered:.2f} s after kill -9; "
          f"{len(errors)} call(s) failed (UNAVAILABLE/DEADLINE_EXCEEDED), "
          f"{len(acknowledged)} tokens acknowledged; cards/s from 2 s before the kill: "
          f"{[per_second.get(s, 0) for s in range(kill_second - 2, kill_second + 4)]}")

    conn = await asyncpg.connect(superuser_db)
    try:
        rows = await conn.fetch("SELECT token, fingerprint FROM tokens WHERE tenant = $1", tenant)
    finally:
        await conn.close()
    assert len({r["fingerprint"] for r in rows}) == len(rows), "no PAN has two tokens"
    assert set(acknowledged.values()) <= {r["token"] for r in rows}
    async with served.channel("bulk/bulk-1") as channel:
        stub = pb_grpc.TokenizationServiceStub(channel)
        sample = list(acknowledged.items())[::25]
        chunk = pb.BatchDetokenizeRequest(tenant=tenant, purpose="fault test", items=[
            pb.BatchDetokenizeRequest.Item(reference=pan, token=token) for pan, token in sample])
        async for response in stub.BatchDetokenize(iter([chunk])):
            for result in response.results:
                assert result.card.card.pan == result.reference  # reveals to the right card
    async with served.channel("admin/admin-1") as channel:
        chain = await admin_grpc.AuditServiceStub(channel).VerifyAuditChain(
            admin_pb.VerifyAuditChainRequest())
    assert chain.intact, chain.problem


async def test_ctrl_c_stops_every_worker(served: Served) -> None:
    pids = [w["pid"] for w in served.status()["workers"]]
    os.killpg(served.proc.pid, signal.SIGINT)  # what Ctrl-C sends to the foreground group
    out, _ = await asyncio.to_thread(served.proc.communicate, timeout=60)
    assert served.proc.returncode == 0, out
    assert "2 worker(s)" in out and "stopping" in out
    assert not any(_alive(pid) for pid in pids)
    assert not served.status_file.exists()
