"""`vaultline ivr serve --workers N` (issue 19, item 1): the webhook service as N processes on
one port. Calls are answered whichever worker takes each webhook (sessions live in
PostgreSQL); a worker killed with -9 is restarted and calls go on; Ctrl-C stops them all."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from tests.fixtures.infra import PostgresHandle
from tests.ivr.conftest import FLOWS, PUBLIC, CrmReceiver
from tests.ivr.test_ivr_calls import card_script
from vaultline.twilio_sim import TwilioSim

pytestmark = pytest.mark.integration

VAULTLINE = [sys.executable, "-m", "vaultline.cli"]


@pytest_asyncio.fixture
async def workers(migrated: PostgresHandle, tokenizer: Any, tmp_path: Path
                  ) -> AsyncIterator[tuple[TwilioSim, subprocess.Popen[str], Path]]:
    sim = TwilioSim()
    await sim.start()
    crm = CrmReceiver(os.urandom(32).hex().encode())
    await crm.start()
    (tmp_path / "token").write_text(sim.auth_token)
    (tmp_path / "session").write_bytes(os.urandom(32).hex().encode())
    (tmp_path / "crm").write_bytes(crm.secret)
    flows = tmp_path / "flows"  # the shipped flows, their CRM callbacks to this test's CRM
    flows.mkdir()
    for flow in FLOWS.glob("*.yaml"):
        (flows / flow.name).write_text(flow.read_text().replace(
            "http://127.0.0.1:8089/vaultline/ivr-captures", crm.url))
    ivr_cert = tokenizer.pki.certs["ivr/ivr-1"]
    (tmp_path / "ivr.crt").write_bytes(ivr_cert.cert_pem)
    (tmp_path / "ivr.key").write_bytes(ivr_cert.key_pem)
    env = {k: v for k, v in os.environ.items() if not k.startswith("VAULTLINE_")}
    env.update(
        VAULTLINE_IVR_PUBLIC_BASE_URL=PUBLIC, VAULTLINE_IVR_LISTEN="127.0.0.1:0",
        VAULTLINE_TWILIO_ACCOUNT_SID=sim.account_sid,
        VAULTLINE_TWILIO_AUTH_TOKEN_FILE=str(tmp_path / "token"),
        VAULTLINE_TWILIO_API_BASE_URL=sim.rest_base_url,
        VAULTLINE_DATABASE_URL=migrated.ivr_dsn,
        VAULTLINE_IVR_SESSION_SECRET_FILE=str(tmp_path / "session"),
        VAULTLINE_IVR_CRM_SECRET_FILE=str(tmp_path / "crm"),
        VAULTLINE_IVR_FLOWS_DIR=str(flows),
        VAULTLINE_TOKENIZER_ADDRESS=tokenizer.server.address,
        VAULTLINE_TOKENIZER_CA=str(tokenizer.pki.ca),
        VAULTLINE_TOKENIZER_CERT=str(tmp_path / "ivr.crt"),
        VAULTLINE_TOKENIZER_KEY=str(tmp_path / "ivr.key"))
    status = tmp_path / "ivr-workers.json"
    proc = subprocess.Popen(
        [*VAULTLINE, "ivr", "serve", "--workers", "2", "--status-file", str(status)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True)
    deadline = time.monotonic() + 90
    while not (status.exists() and len(json.loads(status.read_text())["workers"]) == 2):
        assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
        assert time.monotonic() < deadline
        await asyncio.sleep(0.1)
    sim.route[PUBLIC] = json.loads(status.read_text())["workers"][0]["address"]
    try:
        yield sim, proc, status
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)
        await sim.stop()
        await crm.stop()


async def _call(sim: TwilioSim) -> Any:
    return await sim.call(PUBLIC + "/voice/card_capture", card_script(),
                          status_callback=PUBLIC + "/voice/status")


async def test_ivr_workers_answer_calls_survive_a_kill_and_stop_on_ctrl_c(
        workers: tuple[TwilioSim, subprocess.Popen[str], Path]) -> None:
    sim, proc, status_file = workers
    status = json.loads(status_file.read_text())
    assert len({w["pid"] for w in status["workers"]}) == 2
    assert len({w["address"] for w in status["workers"]}) == 1  # one port
    calls = await asyncio.gather(*(_call(sim) for _ in range(4)))
    for call in calls:
        assert call.heard()[-1].startswith("Thank you. Your card has been saved"), call.heard()

    victim = status["workers"][0]["pid"]
    os.kill(victim, signal.SIGKILL)
    killed = time.monotonic()
    while json.loads(status_file.read_text())["restarts"] < 1 or len(
            json.loads(status_file.read_text())["workers"]) < 2:
        assert time.monotonic() - killed < 30
        await asyncio.sleep(0.1)
    call = await _call(sim)  # the service answers whole calls again
    assert call.heard()[-1].startswith("Thank you. Your card has been saved"), call.heard()

    pids = [w["pid"] for w in json.loads(status_file.read_text())["workers"]]
    assert victim not in pids
    os.killpg(proc.pid, signal.SIGINT)
    out, _ = await asyncio.to_thread(proc.communicate, timeout=60)
    assert proc.returncode == 0, out
    assert "ivr webhooks on" in out and "2 worker(s)" in out
    for pid in pids:
        assert not Path(f"/proc/{pid}").exists() or "Z" in Path(
            f"/proc/{pid}/stat").read_text().split()[2]
