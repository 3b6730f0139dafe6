"""RecordingService (issue 17) over real mTLS, on recordings the ingest stored: `qa` lists,
gets a key for a stated purpose and the encrypted media, and decrypts on its own side; `crm`
and `admin` never get a key; quarantined recordings need an admin's audited release;
retention deletes files and rows."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any

import asyncpg
import grpc
import pytest

from tests.helpers import rpc_failure
from tests.ivr.conftest import IvrEnv
from tests.ivr.test_ivr_calls import card_script
from tests.ivr.test_recordings import rec_env  # noqa: F401 - the fixture
from vaultline.gen.recordings.v1 import recordings_pb2 as pb
from vaultline.gen.recordings.v1 import recordings_service_pb2_grpc as pb_grpc
from vaultline.recordings.audio import from_wav
from vaultline.recordings.dtmf import detect_tones
from vaultline.recordings.envelope import open_media

pytestmark = pytest.mark.integration


@pytest.fixture
async def library(start_tokenizer: Callable[..., Any], rec_env: IvrEnv) -> Any:  # noqa: F811
    """A tokenizer serving the recording store the IVR fills."""
    return await start_tokenizer(recordings_dir=rec_env.config.recordings_dir)


def service(running: Any, who: str) -> pb_grpc.RecordingServiceStub:
    return pb_grpc.RecordingServiceStub(running.channel(who))


async def listen(stub: pb_grpc.RecordingServiceStub, sid: str, purpose: str = "qa review"
                 ) -> bytes:
    """What `vaultline recordings export` does: the key and the media, opened here."""
    key = await stub.GetRecordingKey(pb.GetRecordingKeyRequest(recording_sid=sid,
                                                               purpose=purpose))
    media = b"".join([m.chunk async for m in stub.GetRecordingMedia(
        pb.GetRecordingMediaRequest(recording_sid=sid))])
    assert hashlib.sha256(media).hexdigest() == key.media_sha256
    return open_media(key.content_key, key.iv, media)


async def one_recording(env: IvrEnv, *, broken: bool = False) -> str:
    env.sim.pauses_ignored = broken
    call = await env.call("card_capture", card_script())
    (sid,) = [r.sid for r in env.sim.recordings.recordings.values() if r.call_sid == call.sid]
    return sid


async def audit(dsn: str, sid: str) -> list[tuple[str, str, str, str]]:
    conn = await asyncpg.connect(dsn)
    try:
        return [(r["identity"].rsplit("/", 1)[1], r["method"], r["outcome"], r["purpose"])
                for r in await conn.fetch(
                    "SELECT identity, method, outcome, purpose FROM audit_log"
                    " WHERE token = $1 ORDER BY seq", sid)]
    finally:
        await conn.close()


async def test_qa_lists_and_listens_on_its_own_side(
    rec_env: IvrEnv, library: Any, superuser_db: str,  # noqa: F811
) -> None:
    sid = await one_recording(rec_env)
    qa = service(library, "qa/qa-1")
    listed = (await qa.ListRecordings(pb.ListRecordingsRequest())).recordings
    mine = next(r for r in listed if r.recording_sid == sid)
    assert mine.state == pb.RECORDING_STATE_CERTIFIED and mine.duration_seconds > 0
    assert not mine.tones and len(mine.media_sha256) == 64
    audio = from_wav(await listen(qa, sid))
    assert audio.size > 8000 and detect_tones(audio) == []
    steps = await audit(superuser_db, sid)
    assert ("qa-1", "GetRecordingKey", "OK", "qa review") in steps
    assert ("qa-1", "GetRecordingMedia", "OK", "") in steps


@pytest.mark.parametrize("who", ["crm/crm-1", "admin/admin-1", "settlement/settlement-1",
                                 "ivr/ivr-1"])
async def test_no_other_role_gets_a_key(rec_env: IvrEnv, library: Any,  # noqa: F811
                                        who: str) -> None:
    sid = await one_recording(rec_env)
    failure = await rpc_failure(service(library, who).GetRecordingKey(
        pb.GetRecordingKeyRequest(recording_sid=sid, purpose="curious")))
    assert (failure.code, failure.reason) == (grpc.StatusCode.PERMISSION_DENIED,
                                              "METHOD_NOT_ALLOWED")


async def test_a_quarantined_recording_needs_an_audited_release(
    rec_env: IvrEnv, library: Any, superuser_db: str,  # noqa: F811
) -> None:
    sid = await one_recording(rec_env, broken=True)
    qa, admin = service(library, "qa/qa-1"), service(library, "admin/admin-1")
    failure = await rpc_failure(qa.GetRecordingKey(pb.GetRecordingKeyRequest(
        recording_sid=sid, purpose="qa review")))
    assert (failure.code, failure.reason) == (grpc.StatusCode.FAILED_PRECONDITION,
                                              "RECORDING_QUARANTINED")
    listed = (await admin.ListRecordings(pb.ListRecordingsRequest())).recordings
    mine = next(r for r in listed if r.recording_sid == sid)
    assert mine.state == pb.RECORDING_STATE_QUARANTINED and len(mine.tones) >= 23
    assert (await rpc_failure(admin.ReleaseRecording(pb.ReleaseRecordingRequest(
        recording_sid=sid, reason="")))).code == grpc.StatusCode.INVALID_ARGUMENT
    released = await admin.ReleaseRecording(pb.ReleaseRecordingRequest(
        recording_sid=sid, reason="dispute 17: the customer's own words are needed"))
    assert released.recording.released
    audio = from_wav(await listen(qa, sid))
    assert detect_tones(audio)  # what was released is what was found
    steps = await audit(superuser_db, sid)
    assert ("admin-1", "ReleaseRecording", "OK",
            "dispute 17: the customer's own words are needed") in steps
    assert ("qa-1", "GetRecordingKey", "FAILED_PRECONDITION", "qa review") in steps


async def test_a_purpose_is_required_and_unknown_recordings_are_not_found(
    rec_env: IvrEnv, library: Any,  # noqa: F811
) -> None:
    sid = await one_recording(rec_env)
    qa = service(library, "qa/qa-1")
    assert (await rpc_failure(qa.GetRecordingKey(pb.GetRecordingKeyRequest(
        recording_sid=sid)))).code == grpc.StatusCode.INVALID_ARGUMENT
    unknown = "RE" + "0" * 32
    assert (await rpc_failure(qa.GetRecordingKey(pb.GetRecordingKeyRequest(
        recording_sid=unknown, purpose="qa")))).code == grpc.StatusCode.NOT_FOUND
    assert (await rpc_failure(qa.GetRecordingKey(pb.GetRecordingKeyRequest(
        recording_sid="4111111111111111", purpose="qa")))).code == (
        grpc.StatusCode.INVALID_ARGUMENT)
    # Another tenant's listener sees none of this tenant's recordings, nor their keys.
    bound = service(library, "qa/qa-tenant-a")
    for call in (bound.ListRecordings(pb.ListRecordingsRequest()),
                 bound.GetRecordingKey(pb.GetRecordingKeyRequest(recording_sid=sid,
                                                                 purpose="qa"))):
        failure = await rpc_failure(call)
        assert (failure.code, failure.reason) == (grpc.StatusCode.PERMISSION_DENIED,
                                                  "TENANT_NOT_ALLOWED")


async def test_retention_deletes_files_and_rows(
    rec_env: IvrEnv, library: Any, superuser_db: str,  # noqa: F811
) -> None:
    sid = await one_recording(rec_env)
    directory = rec_env.config.recordings_dir
    assert directory is not None and (directory / f"{sid}.wav.enc").exists()
    conn = await asyncpg.connect(superuser_db)
    try:
        await conn.execute("UPDATE recordings SET created_at = now() - interval '40 days'"
                           " WHERE sid = $1", sid)
    finally:
        await conn.close()
    admin = service(library, "admin/admin-1")
    assert (await rpc_failure(service(library, "qa/qa-1").PurgeRecordings(
        pb.PurgeRecordingsRequest(older_than_days=30)))).code == (
        grpc.StatusCode.PERMISSION_DENIED)
    purged = await admin.PurgeRecordings(pb.PurgeRecordingsRequest(older_than_days=30))
    assert purged.purged >= 1
    assert not (directory / f"{sid}.wav.enc").exists()
    assert (await rpc_failure(admin.ListRecordings(pb.ListRecordingsRequest(
        page_token="not-ours")))).code == grpc.StatusCode.INVALID_ARGUMENT
    listed = (await admin.ListRecordings(pb.ListRecordingsRequest())).recordings
    assert sid not in [r.recording_sid for r in listed]


async def test_the_stored_file_is_not_audio(rec_env: IvrEnv) -> None:  # noqa: F811
    """The leak scan's rule for the store, here per file: no RIFF header, no PCM — the bytes
    look random (AES-GCM), and only the key makes them a WAV."""
    sid = await one_recording(rec_env)
    directory = rec_env.config.recordings_dir
    assert directory is not None
    media = (directory / f"{sid}.wav.enc").read_bytes()
    assert b"RIFF" not in media[:64] and b"WAVE" not in media and b"data" not in media[:64]
    # Byte values spread as encrypted data does (PCM audio clusters near zero).
    counts = [media.count(bytes([b])) for b in range(256)]
    assert max(counts) < 3 * len(media) / 256


RECORDING_ROLES = {
    "qa": {"ListRecordings", "GetRecordingKey", "GetRecordingMedia"},
    "admin": {"ListRecordings", "ReleaseRecording", "PurgeRecordings"},
}
WHO = {"ivr": "ivr/ivr-1", "intake": "intake/intake-1", "crm": "crm/crm-1",
       "settlement": "settlement/settlement-1", "payments": "payments/payments-1",
       "qa": "qa/qa-1", "admin": "admin/admin-1"}


@pytest.mark.parametrize("role", sorted(WHO))
async def test_every_role_and_method(tokenizer: Any, role: str) -> None:
    """The recording methods' role matrix: only what the policy grants is allowed."""
    stub = service(tokenizer, WHO[role])
    unknown = "RE" + "f" * 32

    async def media() -> None:
        async for _ in stub.GetRecordingMedia(pb.GetRecordingMediaRequest(
                recording_sid=unknown)):
            pass

    calls = {
        "ListRecordings": lambda: stub.ListRecordings(pb.ListRecordingsRequest()),
        "GetRecordingKey": lambda: stub.GetRecordingKey(pb.GetRecordingKeyRequest(
            recording_sid=unknown, purpose="matrix")),
        "GetRecordingMedia": media,
        "ReleaseRecording": lambda: stub.ReleaseRecording(pb.ReleaseRecordingRequest(
            recording_sid=unknown, reason="matrix test")),
        "PurgeRecordings": lambda: stub.PurgeRecordings(pb.PurgeRecordingsRequest(
            older_than_days=36_500)),
    }
    for method, call in calls.items():
        try:
            await call()
            code = grpc.StatusCode.OK
        except grpc.aio.AioRpcError as err:
            code = err.code()
        allowed = method in RECORDING_ROLES.get(role, set())
        if allowed:  # answered (an unknown recording is NOT_FOUND), never refused
            assert code in (grpc.StatusCode.OK, grpc.StatusCode.NOT_FOUND), (role, method)
        else:
            assert code == grpc.StatusCode.PERMISSION_DENIED, (role, method, code)


async def test_a_database_password_alone_cannot_release_a_quarantine(
    rec_env: IvrEnv, library: Any, superuser_db: str,  # noqa: F811
) -> None:
    """An insider with the database (not the OpenBao key) flips a quarantined recording to
    certified: its certification signature no longer matches, and no key is handed out."""
    sid = await one_recording(rec_env, broken=True)
    conn = await asyncpg.connect(superuser_db)
    try:
        await conn.execute("UPDATE recordings SET state = 'certified', tones = '[]'::jsonb"
                           " WHERE sid = $1", sid)
    finally:
        await conn.close()
    failure = await rpc_failure(service(library, "qa/qa-1").GetRecordingKey(
        pb.GetRecordingKeyRequest(recording_sid=sid, purpose="qa review")))
    assert (failure.code, failure.reason) == (grpc.StatusCode.FAILED_PRECONDITION,
                                              "RECORDING_NOT_CERTIFIED")
