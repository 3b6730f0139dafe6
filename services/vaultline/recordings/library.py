"""The recording vault as the tokenizer serves it (RecordingService): metadata, the encrypted
media as stored, and — for an allowed, audited listener — a recording's content key, unwrapped
inside OpenBao. The server never decrypts audio for anyone: the listener's machine does.

A recording's key is handed out only once it is stored and certified free of keypad tones, or,
quarantined, once an admin released it (audited with the reason). Retention deletes rows
first, then files, so a crash in between leaves only files no row points to (deleted on the
next pass, never a row without its file).
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import json
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Final, Protocol

from ..errors import FieldViolation, InvalidInput, RecordingNotFound, RecordingNotPlayable
from ..runtime import periodically
from ..vault import RECORDING_CERT_KEY, run_transit
from .envelope import RECORDING_SID, certification_message
from .files import RecordingFiles

__all__ = ["RecordingKey", "RecordingLibrary"]

log = logging.getLogger("vaultline.recordings")

CHUNK: Final = 64 * 1024
MAX_PAGE: Final = 500


class LibraryStore(Protocol):
    """What the library needs from PostgreSQL (implemented by `store.Store`)."""

    async def list_recordings(self, tenant: str, before: tuple[dt.datetime, str] | None,
                              limit: int) -> list[Any]: ...
    async def find_recording(self, tenant: str, sid: str) -> Any | None: ...
    async def release_recording(self, tenant: str, sid: str, by: str, reason: str
                                ) -> Any | None: ...
    async def purge_recordings(self, older_than: dt.timedelta, limit: int = ...
                               ) -> list[str]: ...


class ContentKeys(Protocol):
    def unwrap_content_key(self, wrapped: str) -> bytes: ...
    def verify(self, message: bytes, signature: str, key: str = ...) -> bool: ...


@dataclass(frozen=True, slots=True)
class RecordingKey:
    content_key: bytes
    iv: bytes
    media_sha256: str

    def __repr__(self) -> str:
        return "RecordingKey(<hidden>)"


def _invalid(field: str, description: str) -> InvalidInput:
    return InvalidInput("INVALID_ARGUMENT", (FieldViolation(field, description),))


def validate_sid(sid: str) -> str:
    if not RECORDING_SID.match(sid):
        raise _invalid("recording_sid", "must be a recording SID (RE and 32 hex digits)")
    return sid


def released(row: Any) -> bool:
    return bool(row["override_by"])


def tones(row: Any) -> list[tuple[float, float]]:
    value = row["tones"]
    spans = json.loads(value) if isinstance(value, str) else value
    return [(float(s), float(e)) for s, e in spans]


class RecordingLibrary:
    def __init__(self, store: LibraryStore, files: RecordingFiles | None,
                 keys: ContentKeys | None, *, retention: dt.timedelta = dt.timedelta(days=365)
                 ) -> None:
        self._store = store
        self._files = files
        self._keys = keys
        self.retention = retention

    async def list(self, tenant: str, page_size: int, page_token: str
                   ) -> tuple[list[Any], str]:
        size = page_size or 100
        if not 1 <= size <= MAX_PAGE:
            raise _invalid("page_size", f"must be 1-{MAX_PAGE}")
        before = None
        if page_token:
            try:
                stamp, _, sid = base64.urlsafe_b64decode(page_token.encode()).decode().partition(
                    "|")
                before = (dt.datetime.fromisoformat(stamp), validate_sid(sid))
            except (ValueError, InvalidInput):
                raise _invalid("page_token", "not a page token this service issued") from None
        rows = await self._store.list_recordings(tenant, before, size)
        token = ""
        if len(rows) == size:
            last = rows[-1]
            token = base64.urlsafe_b64encode(
                f"{last['created_at'].isoformat()}|{last['sid']}".encode()).decode()
        return rows, token

    async def find(self, tenant: str, sid: str) -> Any:
        row = await self._store.find_recording(tenant, validate_sid(sid))
        if row is None:
            raise RecordingNotFound()
        return row

    async def key(self, tenant: str, sid: str) -> RecordingKey:
        """The content key of a playable recording (see the module doc)."""
        row = await self.find(tenant, sid)
        if row["state"] == "quarantined" and not released(row):
            raise RecordingNotPlayable("RECORDING_QUARANTINED")
        if row["state"] not in ("certified", "quarantined") or self._keys is None:
            raise RecordingNotPlayable("RECORDING_NOT_READY")
        message = certification_message(row["sid"], row["state"],
                                         bytes(row["media_sha256"] or b""), tones(row))
        if not row["certification"] or not await run_transit(
                self._keys.verify, message, row["certification"], RECORDING_CERT_KEY):
            # Written around the ingest (a database password, not the OpenBao key).
            log.error("recording %s: its certification is not signed by the ingest; refused",
                      sid)
            raise RecordingNotPlayable("RECORDING_NOT_CERTIFIED")
        cek = await run_transit(self._keys.unwrap_content_key, row["encrypted_cek"])
        return RecordingKey(cek, base64.b64decode(row["iv"]),
                            bytes(row["media_sha256"]).hex())

    async def media(self, tenant: str, sid: str) -> AsyncIterator[bytes]:
        """The stored (encrypted) media, in chunks."""
        row = await self.find(tenant, sid)
        if self._files is None or not row["media_file"]:
            raise RecordingNotPlayable("RECORDING_NOT_READY")
        files = self._files
        data = await asyncio.to_thread(files.get, row["media_file"])
        for offset in range(0, len(data), CHUNK):
            yield data[offset:offset + CHUNK]

    async def release(self, tenant: str, sid: str, by: str, reason: str) -> Any:
        reason = reason.strip()
        if not 3 <= len(reason) <= 200:
            raise _invalid("reason", "say why, in 3-200 characters")
        row = await self._store.release_recording(tenant, validate_sid(sid), by, reason)
        if row is None:
            await self.find(tenant, sid)  # NOT_FOUND for an unknown one
            raise RecordingNotPlayable("RECORDING_NOT_QUARANTINED")
        log.warning("recording %s released from quarantine by %s", sid, by)
        return row

    async def purge(self, older_than: dt.timedelta) -> int:
        """Delete every recording older than `older_than`: rows first, then their files."""
        total = 0
        while names := await self._store.purge_recordings(older_than):
            total += len(names)
            if self._files is not None:
                files = self._files
                for name in names:
                    if name:
                        await asyncio.to_thread(files.delete, name)
        if total:
            log.info("purged %d recordings older than %s", total, older_than)
        return total

    async def run(self, every_seconds: float = 3600.0) -> None:
        """The scheduled retention run, until cancelled."""
        await periodically(every_seconds, lambda: self.purge(self.retention),
                           "recording retention", log)
