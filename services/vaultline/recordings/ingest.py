"""Recording ingest, in the IVR service: Twilio's recording status callback → the encrypted
media stored unchanged and durable → proven free of keypad tones → Twilio's copy deleted.

Each recording's row is its work item, so every step is idempotent and a crash anywhere
resumes where it stopped (the sweeper, `run`, picks up every row Twilio still holds a copy
of):

    received      the callback is in (a retry of it changes nothing)
    → stored      the media is in the recording store: fsync'd, renamed, read back, hashed
    → certified   decrypted in memory (content key unwrapped inside OpenBao), scanned for
      quarantined DTMF: none → certified; any → quarantined, with a WARNING, a metric and an
                  audit record naming the call and where the tones are (never which keys)
    → Twilio's copy deleted, only then (and only once the local copy is durable)

A recording Twilio sent unencrypted is never stored (`unencrypted`: Voice Recording
Encryption must be on); one that does not decrypt is `corrupt`, and Twilio's copy is kept for a
person to look at. Every step is a chained audit record (`ivr/recordings/<step>`).
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import logging
import re
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Final, Protocol

from prometheus_client import CollectorRegistry, Counter

from ..runtime import periodically
from ..security.audit import AuditEvent, AuditWriter
from ..vault import (
    RECORDING_CERT_KEY,
    VaultInvalidResponse,
    VaultPermissionDenied,
    run_transit,
)
from .audio import WavError, channels_of_wav
from .dtmf import ToneSpan, detect_tones
from .envelope import (
    RECORDING_SID,
    EnvelopeError,
    certification_message,
    open_media,
    parse_encryption_details,
    vault_ciphertext,
)
from .files import RecordingFiles

__all__ = ["RecordingIngest", "RecordingKeys", "scan_media", "sign_certification"]

log = logging.getLogger("vaultline.recordings")

_CALL_SID: Final = re.compile(r"CA[0-9a-f]{32}\Z")
METHOD: Final = "ivr/recordings/"


class RecordingKeys(Protocol):
    """The recording key in OpenBao (implemented by `vault.TransitClient`)."""

    def key_versions(self) -> list[int]: ...
    def unwrap_content_key(self, wrapped: str) -> bytes: ...
    def sign(self, message: bytes, key: str = ...) -> str: ...


class ScanFailed(Exception):
    """The media cannot be checked: it does not decrypt or is not audio."""


async def scan_media(keys: RecordingKeys, encrypted_cek: str, iv: bytes, media: bytes
                     ) -> tuple[list[ToneSpan], str]:
    """Decrypt in memory and find every keypad tone; (tones, the content key as OpenBao
    decrypts it). ScanFailed for media that is not this recording's audio."""
    if encrypted_cek.startswith("vault:"):
        candidates = [encrypted_cek]
    else:  # which key version Twilio wrapped to: the newest that unwraps it
        candidates = [vault_ciphertext(encrypted_cek, v)
                      for v in await run_transit(keys.key_versions)]
    for wrapped in candidates:
        try:
            cek = await run_transit(keys.unwrap_content_key, wrapped)
        except (VaultInvalidResponse, VaultPermissionDenied) as exc:
            if isinstance(exc, VaultPermissionDenied):
                raise
            continue  # not this version's
        try:
            channels = channels_of_wav(open_media(cek, iv, media))
        except (EnvelopeError, WavError) as exc:
            raise ScanFailed(str(exc)) from None
        finally:
            del cek
        return await asyncio.to_thread(_tones_in_any, channels), wrapped
    raise ScanFailed("no version of the recording key unwraps its content key")


async def sign_certification(keys: RecordingKeys, sid: str, state: str, media_sha256: bytes,
                             spans: list[list[float]]) -> str:
    """The OpenBao signature of a certification (what GetRecordingKey verifies)."""
    message = certification_message(sid, state, media_sha256,
                                    [(float(s), float(e)) for s, e in spans])
    return await run_transit(keys.sign, message, RECORDING_CERT_KEY)


def _tones_in_any(channels: list[Any]) -> list[ToneSpan]:
    """Every keypad tone on any channel (one per call leg in a dual-channel recording)."""
    spans = [span for samples in channels for span in detect_tones(samples)]
    return sorted(spans, key=lambda s: (s.start, s.end))


class RecordingIngest:
    def __init__(self, store: Any, files: RecordingFiles, twilio: Any, keys: RecordingKeys,
                 audit: AuditWriter, *, tenant_of: Callable[[str], Awaitable[str]],
                 audit_identity: str, registry: CollectorRegistry | None = None,
                 sweep_seconds: float = 60.0) -> None:
        self._store = store
        self._files = files
        self._twilio = twilio
        self._keys = keys
        self._audit = audit
        self._tenant_of = tenant_of
        self._identity = audit_identity
        self._sweep_seconds = sweep_seconds
        self._locks: dict[str, asyncio.Lock] = {}
        self.recordings = Counter(
            "vaultline_recordings_ingested", "Recordings ingested, by the state they ended in",
            ["state"], registry=registry or CollectorRegistry())

    # ---- the callback ------------------------------------------------------------------------

    async def callback(self, form: Mapping[str, str]) -> int:
        """Twilio's recording status callback (already signature-checked); an HTTP status."""
        if form.get("RecordingStatus") != "completed":
            return 204
        sid, call_sid = form.get("RecordingSid", ""), form.get("CallSid", "")
        if not RECORDING_SID.match(sid) or not _CALL_SID.match(call_sid):
            return 400
        tenant = await self._tenant_of(call_sid)
        duration = form.get("RecordingDuration", "0")
        seconds = int(duration) if duration.isascii() and duration.isdigit() else 0
        details_text = form.get("EncryptionDetails", "")
        if not details_text:
            if await self._store.insert_recording(sid, call_sid, tenant, "", seconds, "", "",
                                                  "", state="unencrypted"):
                log.error("recording %s of call %s arrived unencrypted: not stored; turn on "
                          "Voice Recording Encryption with `vaultline recordings public-key`",
                          sid, call_sid)
                await self._record(tenant, sid, call_sid, "received", "UNENCRYPTED")
                self.recordings.labels("unencrypted").inc()
            return 204
        try:
            details = parse_encryption_details(details_text)
        except EnvelopeError as exc:
            log.error("recording %s of call %s: %s", sid, call_sid, exc)
            return 400
        if await self._store.insert_recording(
                sid, call_sid, tenant, form.get("RecordingUrl", ""), seconds,
                details.public_key_sid, details.encrypted_cek,
                base64.b64encode(details.iv).decode()):
            await self._record(tenant, sid, call_sid, "received", "OK")
        try:
            await self.process(sid)
        except Exception:  # noqa: BLE001 - the sweeper retries; the row says what failed
            log.warning("recording %s: ingest failed; retried by the sweeper", sid,
                        exc_info=True)
            return 500
        return 204

    # ---- one recording, as far as it can go ----------------------------------------------------

    async def process(self, sid: str) -> str:
        """Take the recording through every step still due; the state it ends in."""
        lock = self._locks.setdefault(sid, asyncio.Lock())
        async with lock:
            try:
                return await self._process(sid)
            except Exception as exc:
                await self._store.recording_failed(sid, type(exc).__name__)
                raise
            finally:
                self._locks.pop(sid, None)

    async def _process(self, sid: str) -> str:
        row = await self._store.find_recording(sid)
        if row is None:
            return "unknown"
        tenant, call_sid = row["tenant"], row["call_sid"]
        media: bytes | None = None
        if row["twilio_deleted_at"] is None and (
                row["state"] == "received"
                or not await asyncio.to_thread(self._files.exists, row["media_file"])):
            media = await self._twilio.download_recording(sid)
            name, digest = await asyncio.to_thread(self._files.put, sid, media)
            await self._store.recording_stored(sid, name, digest, len(media))
            await self._record(tenant, sid, call_sid, "stored", "OK")
            row = await self._store.find_recording(sid)
        if row["state"] == "stored":
            if media is None:
                media = await asyncio.to_thread(self._files.get, row["media_file"])
            await self._certify(row, media)
            row = await self._store.find_recording(sid)
        if row["state"] in ("certified", "quarantined") and row["twilio_deleted_at"] is None:
            gone_before = not await self._twilio.delete_recording(sid)
            await self._store.recording_twilio_deleted(sid)
            await self._record(tenant, sid, call_sid, "twilio-deleted",
                               "ALREADY_GONE" if gone_before else "OK")
        return str(row["state"])

    async def _certify(self, row: Any, media: bytes) -> None:
        sid, call_sid, tenant = row["sid"], row["call_sid"], row["tenant"]
        try:
            tones, wrapped = await scan_media(self._keys, row["encrypted_cek"],
                                              base64.b64decode(row["iv"]), media)
        except ScanFailed as exc:
            log.error("recording %s of call %s does not decrypt (%s): kept at Twilio for "
                      "review", sid, call_sid, exc)
            await self._store.recording_scanned(sid, "corrupt", [], row["encrypted_cek"])
            await self._record(tenant, sid, call_sid, "certified", "CORRUPT")
            self.recordings.labels("corrupt").inc()
            return
        spans = [[round(t.start, 2), round(t.end, 2)] for t in tones]
        state = "quarantined" if tones else "certified"
        signature = await sign_certification(self._keys, sid, state,
                                             bytes(row["media_sha256"]), spans)
        await self._store.recording_scanned(sid, state, spans, wrapped, signature)
        if tones:
            where = ", ".join(f"{s:.2f}-{e:.2f}s" for s, e in spans)
            log.warning("recording %s of call %s QUARANTINED: %d keypad tone(s) at %s — the "
                        "recording ran during card entry", sid, call_sid, len(tones), where)
            await self._record(tenant, sid, call_sid, "quarantined", "TONES_FOUND",
                               purpose=f"tones at {where}"[:200])
        else:
            await self._record(tenant, sid, call_sid, "certified", "OK")
        self.recordings.labels(state).inc()

    # ---- retries -------------------------------------------------------------------------------

    async def sweep_once(self) -> int:
        """Take every unfinished recording as far as it goes now; how many finished."""
        done = 0
        for sid in await self._store.pending_recordings():
            try:
                state = await self.process(sid)
            except Exception:  # noqa: BLE001 - logged; the next sweep tries again
                log.warning("recording %s: ingest retry failed", sid, exc_info=True)
                continue
            done += state in ("certified", "quarantined")
        return done

    async def run(self) -> None:
        await periodically(self._sweep_seconds, self.sweep_once, "recording ingest sweep", log)

    async def _record(self, tenant: str, sid: str, call_sid: str, step: str, outcome: str, *,
                      purpose: str = "") -> None:
        await self._audit.record([AuditEvent(
            identity=self._identity, role="ivr", tenant=tenant, method=METHOD + step,
            outcome=outcome, request_id=sid, peer=call_sid, purpose=purpose,
            at=dt.datetime.now(dt.UTC))])

