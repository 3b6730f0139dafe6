"""The IVR's SQL: capture sessions in PostgreSQL through asyncpg, one method per query.

Kept apart from `store.py` (the vault's SQL) on purpose: the vault store and the IVR are
separate services with separate pools, and a separate module lets each evolve without
touching the other's queries. Same rules as `store.py`: single-statement primitives, bind
parameters only, connection failures become `DatabaseUnavailable`. Card fields arrive here
only sealed (`vaultline.ivr.sealing`); nothing here can open them.
"""

from __future__ import annotations

import datetime as dt
import json
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import asyncpg

from .store import Store, create_pool
from .store import translated_errors as _translated

__all__ = ["IvrStore", "SessionExists", "SessionRow"]


class SessionExists(Exception):
    """The call already has a capture in progress."""


@dataclass(frozen=True, slots=True)
class SessionRow:
    id: str
    call_sid: str
    flow: str
    version: int
    state: dict[str, Any]
    sealed: bytes | None
    created_at: dt.datetime
    expires_at: dt.datetime
    ended_at: dt.datetime | None
    outcome: str | None
    token: str | None
    brand: str | None
    last4: str | None
    expiry_month: int | None
    expiry_year: int | None

    def __repr__(self) -> str:
        sealed = "sealed" if self.sealed else "none"
        return (f"SessionRow(id={self.id}, call_sid={self.call_sid}, flow={self.flow}, "
                f"version={self.version}, card_fields=<{sealed}>, outcome={self.outcome})")


_COLUMNS = ("id, call_sid, flow, version, state, sealed, created_at, expires_at, ended_at,"
            " outcome, token, brand, last4, expiry_month, expiry_year")


_INSERT_SESSION = (
    "INSERT INTO ivr_sessions (id, call_sid, flow, state, expires_at)"
    " VALUES ($1, $2, $3, $4::jsonb, now() + $5::interval)"
    " RETURNING id, call_sid, flow, version, state, sealed, created_at, expires_at, ended_at,"
    " outcome, token, brand, last4, expiry_month, expiry_year"
)


def _row(r: asyncpg.Record) -> SessionRow:
    return SessionRow(str(r["id"]), r["call_sid"], r["flow"], r["version"],
                      json.loads(r["state"]), r["sealed"], r["created_at"], r["expires_at"],
                      r["ended_at"], r["outcome"], r["token"], r["brand"], r["last4"],
                      r["expiry_month"], r["expiry_year"])


_CAPTURE_COLUMNS = ("id, tenant, call_sid, agent_id, security_code, postal_code, token_format,"
                    " state, payment_sid, driver, driver_version, last_seq")
_CLAIM_COMMANDS = (
    "WITH picked AS (SELECT id, command FROM captures WHERE command <> ''"
    " AND state IN ('started', 'capturing') ORDER BY updated_at LIMIT $1"
    " FOR UPDATE SKIP LOCKED)"
    " UPDATE captures c SET command = '' FROM picked p WHERE c.id = p.id"
    " RETURNING c.id, c.tenant, c.call_sid, c.agent_id, c.security_code, c.postal_code,"
    " c.token_format, c.state, c.payment_sid, c.driver, c.driver_version, c.last_seq,"
    " p.command AS taken"
)


class IvrStore:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    @classmethod
    async def connect(cls, dsn: str, *, min_size: int = 1, max_size: int = 10) -> IvrStore:
        return cls(await create_pool(
            dsn, min_size=min_size, max_size=max_size, application_name="vaultline-ivr"))

    async def close(self) -> None:
        await self._pool.close()

    def audit_appender(self) -> Store:
        """The audit chain's append, over this pool (`AuditWriter` needs only that)."""
        return Store(self._pool)

    async def insert_session(self, call_sid: str, flow: str, state: Mapping[str, Any],
                             ttl: dt.timedelta) -> SessionRow:
        """A new capture; SessionExists if the call already has one in progress."""
        try:
            async with _translated():
                r = await self._pool.fetchrow(
                    _INSERT_SESSION,
                    uuid.uuid4(), call_sid, flow, json.dumps(state), ttl)
        except asyncpg.UniqueViolationError:
            raise SessionExists() from None
        assert r is not None
        return _row(r)

    async def find_active_session(self, call_sid: str) -> SessionRow | None:
        async with _translated():
            r = await self._pool.fetchrow(
                f"SELECT {_COLUMNS} FROM ivr_sessions"  # noqa: S608 constant columns
                " WHERE call_sid = $1 AND ended_at IS NULL", call_sid)
        return _row(r) if r is not None else None

    async def find_sessions_by_call_sid(self, call_sid: str) -> list[SessionRow]:
        async with _translated():
            rows = await self._pool.fetch(
                f"SELECT {_COLUMNS} FROM ivr_sessions"  # noqa: S608 constant columns
                " WHERE call_sid = $1 ORDER BY created_at", call_sid)
        return [_row(r) for r in rows]

    async def update_session(self, session_id: str, version: int, state: Mapping[str, Any],
                             sealed: bytes | None) -> bool:
        """Compare-and-set on `version`; False when another replica got there first."""
        async with _translated():
            status = await self._pool.execute(
                "UPDATE ivr_sessions SET state = $3::jsonb, sealed = $4, version = version + 1,"
                " updated_at = now() WHERE id = $1 AND version = $2 AND ended_at IS NULL",
                uuid.UUID(session_id), version, json.dumps(state), sealed)
        return status == "UPDATE 1"

    async def end_session(self, session_id: str, version: int, state: Mapping[str, Any],
                          outcome: str, token: str | None, brand: str | None,
                          last4: str | None, expiry_month: int | None,
                          expiry_year: int | None) -> bool:
        """Record the result and erase the sealed fields, compare-and-set on `version`."""
        async with _translated():
            status = await self._pool.execute(
                "UPDATE ivr_sessions SET state = $3::jsonb, sealed = NULL,"
                " version = version + 1, updated_at = now(), ended_at = now(), outcome = $4,"
                " token = $5, brand = $6, last4 = $7, expiry_month = $8, expiry_year = $9"
                " WHERE id = $1 AND version = $2 AND ended_at IS NULL",
                uuid.UUID(session_id), version, json.dumps(state), outcome, token, brand,
                last4, expiry_month, expiry_year)
        return status == "UPDATE 1"

    # ---- agent-assisted captures (0012_captures.sql) --------------------------------------

    async def claim_capture_commands(self, limit: int = 20) -> list[tuple[Any, str]]:
        """Take the pending agent commands (start, cancel, restart:<field>) of captures in
        progress: each is taken by one replica only. (capture row, command) pairs."""
        async with _translated():
            rows = await self._pool.fetch(_CLAIM_COMMANDS, limit)
        return [(r, r["taken"]) for r in rows]

    async def find_capture(self, capture_id: str) -> Any | None:
        async with _translated():
            return await self._pool.fetchrow(
                f"SELECT {_CAPTURE_COLUMNS} FROM captures WHERE id = $1",  # noqa: S608 constant
                capture_id)

    async def find_active_capture(self, call_sid: str) -> Any | None:
        """The call's capture in progress, if any."""
        async with _translated():
            return await self._pool.fetchrow(
                f"SELECT {_CAPTURE_COLUMNS} FROM captures"  # noqa: S608 constant columns
                " WHERE call_sid = $1 AND state IN ('started', 'capturing')", call_sid)

    async def save_capture_driver(self, capture_id: str, version: int,
                                  driver: Mapping[str, Any]) -> bool:
        """Compare-and-set the driver state on `driver_version`."""
        async with _translated():
            status = await self._pool.execute(
                "UPDATE captures SET driver = $3::jsonb, driver_version = driver_version + 1,"
                " updated_at = now() WHERE id = $1 AND driver_version = $2",
                capture_id, version, json.dumps(driver))
        return status == "UPDATE 1"

    async def set_capture_payment(self, capture_id: str, payment_sid: str) -> None:
        async with _translated():
            await self._pool.execute(
                "UPDATE captures SET payment_sid = $2 WHERE id = $1", capture_id, payment_sid)

    async def append_capture_event(
        self, capture_id: str, state: str, field: str = "", digits: int = 0,
        outcome: str = "", attempt: int = 0, *, token: str | None = None,
        brand: int | None = None, last4: str | None = None, expiry_month: int | None = None,
        expiry_year: int | None = None, failure: str = "",
    ) -> int:
        async with _translated():
            seq: int = await self._pool.fetchval(
                "SELECT capture_append_event($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)",
                capture_id, state, field, digits, outcome, attempt, token, brand, last4,
                expiry_month, expiry_year, failure)
        return seq

    async def listen_commands(self, on_notify: Any) -> Any:
        """NOTIFY vaultline_capture_command wakes `on_notify(capture_id)`; returns stop()."""
        return await Store(self._pool).listen("vaultline_capture_command", on_notify)

    async def end_expired_sessions(self) -> int:
        """Erase and close captures past their deadline that nobody finished (the sweeper)."""
        async with _translated():
            status = await self._pool.execute(
                "UPDATE ivr_sessions SET sealed = NULL, ended_at = now(), updated_at = now(),"
                " outcome = 'session-timeout' WHERE ended_at IS NULL AND expires_at < now()")
        return int(status.split()[-1])

    # ---- the recording vault's ingest (0014_recordings.sql) --------------------------------

    async def call_tenant(self, call_sid: str) -> tuple[str, str] | None:
        """What the IVR knows of a call: ("flow", name) from its IVR session, or ("tenant", t)
        from its agent-assisted capture; None for a call it never handled."""
        async with _translated():
            session = await self._pool.fetchval(
                "SELECT flow FROM ivr_sessions WHERE call_sid = $1 ORDER BY created_at DESC"
                " LIMIT 1", call_sid)
            if session is not None:
                return "flow", str(session)
            tenant = await self._pool.fetchval(
                "SELECT tenant FROM captures WHERE call_sid = $1 ORDER BY created_at DESC"
                " LIMIT 1", call_sid)
        return ("tenant", str(tenant)) if tenant is not None else None

    async def insert_recording(self, sid: str, call_sid: str, tenant: str, media_url: str,
                               duration: int, public_key_sid: str, encrypted_cek: str,
                               iv: str, state: str = "received") -> bool:
        """A recording announced by Twilio; False when it was known already (a retry)."""
        async with _translated():
            status = await self._pool.execute(
                "INSERT INTO recordings (sid, call_sid, tenant, media_url, duration_seconds,"
                " public_key_sid, encrypted_cek, iv, state) VALUES ($1, $2, $3, $4, $5, $6, $7,"
                " $8, $9) ON CONFLICT (sid) DO NOTHING",
                sid, call_sid, tenant, media_url, duration, public_key_sid, encrypted_cek, iv,
                state)
        return status == "INSERT 0 1"

    async def find_recording(self, sid: str) -> Any | None:
        async with _translated():
            return await self._pool.fetchrow("SELECT * FROM recordings WHERE sid = $1", sid)

    async def pending_recordings(self, limit: int = 20) -> list[str]:
        """Recordings whose ingest has not finished (Twilio still holds a copy), oldest
        first; not the ones that need a person (unencrypted, corrupt)."""
        async with _translated():
            rows = await self._pool.fetch(
                "SELECT sid FROM recordings WHERE twilio_deleted_at IS NULL"
                " AND state NOT IN ('unencrypted', 'corrupt') ORDER BY created_at LIMIT $1",
                limit)
        return [r["sid"] for r in rows]

    async def recording_stored(self, sid: str, media_file: str, sha256: bytes,
                               size: int) -> None:
        async with _translated():
            await self._pool.execute(
                "UPDATE recordings SET state = 'stored', media_file = $2, media_sha256 = $3,"
                " media_bytes = $4, last_error = '', updated_at = now() WHERE sid = $1"
                " AND state = 'received'", sid, media_file, sha256, size)

    async def recording_scanned(self, sid: str, state: str, tones: list[list[float]],
                                wrapped_cek: str, certification: str = "") -> None:
        """certified / quarantined (with where the tones are, and the certification's OpenBao
        signature) / corrupt; the content key as OpenBao decrypts it (its key version)."""
        async with _translated():
            await self._pool.execute(
                "UPDATE recordings SET state = $2, tones = $3::jsonb, encrypted_cek = $4,"
                " certification = $5, certified_at = now(), last_error = '', updated_at = now()"
                " WHERE sid = $1", sid, state, json.dumps(tones), wrapped_cek, certification)

    async def recording_twilio_deleted(self, sid: str) -> None:
        async with _translated():
            await self._pool.execute(
                "UPDATE recordings SET twilio_deleted_at = now(), media_url = '',"
                " updated_at = now() WHERE sid = $1", sid)

    async def recording_failed(self, sid: str, error: str) -> None:
        """One more failed attempt (the sweeper tries again); `error` is a fixed text."""
        async with _translated():
            await self._pool.execute(
                "UPDATE recordings SET attempts = attempts + 1, last_error = $2,"
                " updated_at = now() WHERE sid = $1", sid, error[:200])

    async def scannable_recordings(self) -> list[Any]:
        """Every stored recording (`vaultline recordings scan`)."""
        async with _translated():
            return list(await self._pool.fetch(
                "SELECT * FROM recordings WHERE media_file <> ''"
                " AND state IN ('stored', 'certified', 'quarantined', 'corrupt')"
                " ORDER BY created_at"))
