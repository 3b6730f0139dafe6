"""The recording vault's ingest (issue 17), end to end: the simulator records the call as real
8 kHz audio and encrypts it to OpenBao's recording key (registered as Twilio's public key);
the IVR's ingest downloads, stores, certifies in memory and deletes Twilio's copy."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest

from tests.fixtures.infra import OpenBaoHandle
from tests.helpers import unique_name
from tests.ivr.conftest import PUBLIC, IvrEnv
from tests.ivr.test_ivr_calls import card_script
from vaultline.gen.capture.v1 import capture_pb2 as pb
from vaultline.ivr.connector import ConnectorCredentials
from vaultline.recordings.audio import from_wav
from vaultline.recordings.dtmf import detect_tones
from vaultline.recordings.envelope import MediaTampered, open_media
from vaultline.recordings.ingest import ScanFailed, scan_media
from vaultline.twilio_sim.payments import ConnectorConfig, PaymentScript
from vaultline.vault import RECORDINGS_KEY, TransitClient

pytestmark = pytest.mark.integration

CREDENTIALS = ConnectorCredentials("twilio", "connector-password-for-recordings")


async def register_key(env: IvrEnv, openbao: OpenBaoHandle) -> None:
    """What an operator does once: OpenBao's recording public key, registered with Twilio."""
    assert openbao.recordings is not None
    with TransitClient(openbao.addr, openbao.recordings, key_name=RECORDINGS_KEY) as keys:
        _, pem = await asyncio.to_thread(keys.public_key_pem)
    async with aiohttp.ClientSession() as http, http.post(
            env.sim.rest_base_url + "/v1/Credentials/PublicKeys",
            auth=aiohttp.BasicAuth(env.sim.account_sid, env.sim.auth_token),
            data={"PublicKey": pem, "FriendlyName": "vaultline"}) as response:
        assert response.status == 201, await response.text()


@pytest.fixture
async def rec_env(make_ivr: Callable[..., Any], openbao: OpenBaoHandle, tmp_path: Path
                  ) -> IvrEnv:
    env: IvrEnv = await make_ivr(
        connector_credentials=CREDENTIALS, recordings_dir=tmp_path / "recordings",
        recordings_vault_addr=openbao.addr, recordings_credentials=openbao.recordings,
        recordings_sweep_seconds=3600, metrics_listen="127.0.0.1:0")
    env.sim.payments.connectors["vaultline"] = ConnectorConfig(
        PUBLIC + "/pay/connector", CREDENTIALS.username, CREDENTIALS.password)
    await register_key(env, openbao)
    env.sim.recordings.status_callback = env.url("/recordings/status")
    return env


async def rows(dsn: str, call_sid: str) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(dsn)
    try:
        return await conn.fetch("SELECT * FROM recordings WHERE call_sid = $1", call_sid)
    finally:
        await conn.close()


async def audit_steps(dsn: str, sid: str) -> list[tuple[str, str]]:
    conn = await asyncpg.connect(dsn)
    try:
        return [(r["method"], r["outcome"]) for r in await conn.fetch(
            "SELECT method, outcome FROM audit_log WHERE request_id = $1 ORDER BY seq", sid)]
    finally:
        await conn.close()


def stored(env: IvrEnv) -> list[Path]:
    assert env.config.recordings_dir is not None
    return sorted(p for p in env.config.recordings_dir.iterdir() if not p.name.startswith("."))


async def cek_of(openbao: OpenBaoHandle, row: Any) -> bytes:
    assert openbao.recordings is not None
    with TransitClient(openbao.addr, openbao.recordings, key_name=RECORDINGS_KEY) as keys:
        return await asyncio.to_thread(keys.unwrap_content_key, row["encrypted_cek"])


async def test_a_gather_call_leaves_one_certified_encrypted_recording(
    rec_env: IvrEnv, superuser_db: str, openbao: OpenBaoHandle,
) -> None:
    call = await rec_env.call("card_capture", card_script())
    (row,) = await rows(superuser_db, call.sid)
    assert row["state"] == "certified" and json.loads(row["tones"]) == []
    assert row["twilio_deleted_at"] is not None and row["tenant"] == "default"
    assert row["encrypted_cek"].startswith("vault:v1:")
    # Twilio's copy is gone; ours is the encrypted media, byte for byte, not audio.
    sim_copy = rec_env.sim.recordings.recordings[row["sid"]]
    assert sim_copy.deleted
    (path,) = stored(rec_env)
    media = path.read_bytes()
    assert not media.startswith(b"RIFF") and len(media) == row["media_bytes"]
    assert path.stat().st_mode & 0o077 == 0
    # Whoever holds the content key (and only then) hears the call: prompts, no tones.
    audio = from_wav(open_media(await cek_of(openbao, row), base64.b64decode(row["iv"]),
                                media))
    assert audio.size > 8000 and detect_tones(audio) == []
    assert await audit_steps(superuser_db, row["sid"]) == [
        ("ivr/recordings/received", "OK"), ("ivr/recordings/stored", "OK"),
        ("ivr/recordings/certified", "OK"), ("ivr/recordings/twilio-deleted", "OK")]


async def test_an_agent_assisted_call_leaves_one_certified_recording(
    rec_env: IvrEnv, superuser_db: str, tokenizer: Any,
) -> None:
    call = rec_env.sim.agent_call(PaymentScript.card("4111111111111111", "1230", cvv="123"))
    stub = tokenizer.capture_as("crm/crm-1")
    started = (await stub.StartCapture(pb.StartCaptureRequest(
        call_sid=call.sid, agent_id="agent-7", request_id=unique_name("req", 12),
        fields=pb.CaptureFields(security_code=True)))).capture
    async for response in stub.WatchCapture(pb.WatchCaptureRequest(
            capture_id=started.capture_id)):
        last = response.event
    assert last.state == pb.CAPTURE_STATE_COMPLETED
    await rec_env.sim.hang_up(call, rec_env.url("/voice/status"))
    (row,) = await rows(superuser_db, call.sid)
    assert (row["state"], json.loads(row["tones"])) == ("certified", [])
    assert rec_env.sim.recordings.recordings[row["sid"]].deleted


async def test_a_recording_that_ran_during_card_entry_is_quarantined(
    rec_env: IvrEnv, superuser_db: str, caplog: pytest.LogCaptureFixture,
) -> None:
    """A broken set-up: the recording keeps running while the card is keyed. The tones are
    in the audio, and the detector finds them."""
    rec_env.sim.pauses_ignored = True
    call = await rec_env.call("card_capture", card_script())
    assert call.sensitive_presses_while_recording()  # the broken recording heard the card
    (row,) = await rows(superuser_db, call.sid)
    assert row["state"] == "quarantined"
    tones = json.loads(row["tones"])
    assert len(tones) >= 16 + 4 + 3  # every card, expiry and security code key
    assert all(end > start for start, end in tones)
    assert "QUARANTINED" in caplog.text and "4111" not in caplog.text
    steps = await audit_steps(superuser_db, row["sid"])
    assert ("ivr/recordings/quarantined", "TONES_FOUND") in steps
    # The metric, as Prometheus scrapes it from the IVR.
    async with aiohttp.ClientSession() as http, http.get(
            f"http://{rec_env.ivr.service.metrics_address}/metrics") as response:
        scraped = await response.text()
    assert 'vaultline_recordings_ingested_total{state="quarantined"} 1.0' in scraped


async def test_a_retried_callback_changes_nothing(rec_env: IvrEnv, superuser_db: str
                                                  ) -> None:
    call = await rec_env.call("card_capture", card_script())
    (row,) = await rows(superuser_db, call.sid)
    before = await audit_steps(superuser_db, row["sid"])
    for _ in range(3):
        await rec_env.sim.recordings.resend_callback(row["sid"])
    assert [r["sid"] for r in await rows(superuser_db, call.sid)] == [row["sid"]]
    assert await audit_steps(superuser_db, row["sid"]) == before
    assert len(stored(rec_env)) == 1


async def test_a_crash_before_twilio_deletes_leaves_one_copy(
    rec_env: IvrEnv, superuser_db: str,
) -> None:
    """Twilio's DELETE fails (as if the IVR died right after storing): the local copy is
    durable and certified, Twilio's kept; the sweeper finishes, and one copy remains."""
    rec_env.sim.recordings.delete_fault = 500
    call = await rec_env.call("card_capture", card_script())
    (row,) = await rows(superuser_db, call.sid)
    assert row["state"] == "certified" and row["twilio_deleted_at"] is None
    assert not rec_env.sim.recordings.recordings[row["sid"]].deleted
    assert len(stored(rec_env)) == 1
    rec_env.sim.recordings.delete_fault = None
    assert rec_env.ivr.service.recordings is not None
    assert await rec_env.ivr.service.recordings.sweep_once() == 1
    (row,) = await rows(superuser_db, call.sid)
    assert row["twilio_deleted_at"] is not None
    assert rec_env.sim.recordings.recordings[row["sid"]].deleted
    assert len(stored(rec_env)) == 1


async def test_a_tampered_file_fails_authentication_clearly(
    rec_env: IvrEnv, superuser_db: str, openbao: OpenBaoHandle,
) -> None:
    call = await rec_env.call("card_capture", card_script())
    (row,) = await rows(superuser_db, call.sid)
    (path,) = stored(rec_env)
    media = bytearray(path.read_bytes())
    media[len(media) // 2] ^= 0x01
    with pytest.raises(MediaTampered, match="integrity check"):
        open_media(await cek_of(openbao, row), base64.b64decode(row["iv"]), bytes(media))
    assert openbao.recordings is not None
    with TransitClient(openbao.addr, openbao.recordings, key_name=RECORDINGS_KEY) as keys:
        with pytest.raises(ScanFailed, match="integrity check"):
            await scan_media(keys, row["encrypted_cek"], base64.b64decode(row["iv"]),
                             bytes(media))


async def test_an_unencrypted_recording_is_never_stored(
    make_ivr: Callable[..., Any], openbao: OpenBaoHandle, superuser_db: str,
    tmp_path: Path,
) -> None:
    env: IvrEnv = await make_ivr(
        recordings_dir=tmp_path / "recordings", recordings_vault_addr=openbao.addr,
        recordings_credentials=openbao.recordings)
    env.sim.recordings.status_callback = env.url("/recordings/status")  # no key registered
    call = await env.call("card_capture", card_script())
    (row,) = await rows(superuser_db, call.sid)
    assert row["state"] == "unencrypted" and row["media_file"] == ""
    assert not (tmp_path / "recordings").exists() or stored(env) == []
    # Twilio's copy stays until a person fixes the set-up: nothing is lost.
    assert not env.sim.recordings.recordings[row["sid"]].deleted
