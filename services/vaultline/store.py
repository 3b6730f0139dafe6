"""The vault's SQL: PostgreSQL access through asyncpg, one method per query, and migrations.

The IVR's session queries live beside it in `ivr_store.py` (a separate service and pool,
sharing `create_pool` and `translated_errors`); no other module holds SQL. Methods are
single-statement primitives named after what they do; the domain (`service.py`,
`keyring.py`, `security.audit`, `dual_control.py`) composes them, through narrow protocols
where it can. Bulk paths take arrays and run one round trip per
chunk. Connection-level failures become `DatabaseUnavailable` through one table
(`_UNAVAILABLE`); nothing here ever sees a PAN in clear.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, NamedTuple

import asyncpg

from .errors import DatabaseUnavailable
from .resources import MIGRATIONS_DIR

# Errors that mean "the database is not there right now" (restart, network, overload), as
# opposed to a bug in a query. Everything else propagates and ends up as INTERNAL.
_UNAVAILABLE: tuple[type[BaseException], ...] = (
    OSError,  # connection refused / reset, including ConnectionError
    TimeoutError,
    asyncpg.PostgresConnectionError,  # class 08
    asyncpg.CannotConnectNowError,  # 57P03: starting up / shutting down
    asyncpg.AdminShutdownError,  # 57P01
    asyncpg.CrashShutdownError,
    asyncpg.TooManyConnectionsError,
    asyncpg.ConnectionDoesNotExistError,
    asyncpg.InterfaceError,  # connection closed underneath a query
    # Given every node of an HA cluster (target_session_attrs=read-write): none is the
    # primary right now (a failover is under way), or a session landed on a node that has
    # just been demoted.
    asyncpg.exceptions.TargetServerAttributeNotMatched,
    asyncpg.ReadOnlySQLTransactionError,
    # A pooled connection left mid-operation when its server died ("cannot switch to state
    # …; another operation is in progress"): refused before anything is sent.
    asyncpg.exceptions.InternalClientError,
)


@contextlib.asynccontextmanager
async def translated_errors() -> AsyncIterator[None]:
    """Outages of PostgreSQL become `DatabaseUnavailable` (shared with `ivr_store`)."""
    try:
        yield
    except _UNAVAILABLE as exc:
        raise DatabaseUnavailable() from exc


_translated = translated_errors


@dataclass(frozen=True, slots=True)
class DataKeyRow:
    id: int
    tenant: str
    purpose: str
    wrapped_key: str
    kek_version: int
    max_uses: int
    uses: int
    created_at: dt.datetime
    retire_at: dt.datetime
    retired_at: dt.datetime | None


@dataclass(frozen=True, slots=True)
class NewTokens:
    """Column arrays for one chunk of candidate token rows (same tenant, format and TTL)."""

    fingerprints: list[bytes]
    tokens: list[str]
    brands: list[int]
    bins: list[str]
    last4s: list[str]
    expiry_months: list[int]
    expiry_years: list[int]
    data_key_ids: list[int]
    ciphertexts: list[bytes]


# The text columns of audit_append() (0002_audit.sql, 0005_audit_reveal_lists.sql) in the order
# `AuditColumns.columns` holds them; "tokens" is each record's reveal list, space-joined.
AUDIT_TEXT_COLUMNS: Final = (
    "identity", "role", "tenant", "method", "token", "purpose", "outcome", "request_id", "peer",
    "tokens",
)


class AuditColumns(NamedTuple):
    """Audit records as audit_append() takes them, a list per column: the timestamps, the
    `AUDIT_TEXT_COLUMNS` in order, and each record's content hash (built by
    `security.audit.audit_columns`)."""

    ats: list[dt.datetime]
    columns: tuple[list[str], ...]
    hashes: list[bytes]

    @property
    def size(self) -> int:
        return len(self.hashes)

    @classmethod
    def concat(cls, parts: Sequence[AuditColumns]) -> AuditColumns:
        """Several callers' records as one append, in order."""
        if len(parts) == 1:
            return parts[0]
        return cls(
            [at for part in parts for at in part.ats],
            tuple([v for part in parts for v in part.columns[i]]
                  for i in range(len(AUDIT_TEXT_COLUMNS))),
            [h for part in parts for h in part.hashes],
        )

    def arguments(self) -> tuple[list[Any], ...]:
        """The arrays in audit_append()'s parameter order (its reveal lists come last)."""
        *texts, token_lists = self.columns
        return (self.ats, *texts, self.hashes, token_lists)


_DATA_KEY_COLUMNS = (
    "id, tenant, purpose, wrapped_key, kek_version, max_uses, uses, created_at, retire_at,"
    " retired_at"
)
_TOKEN_META = (
    "token, fingerprint, brand, bin, last4, expiry_month, expiry_year, format, created_at,"
    " expires_at"
)

# The reveal path's row: no token (the caller sent it; `n` says which) and no fingerprint, so
# nothing is decoded that a reveal does not use. Callers unpack it positionally, in this order.
REVEAL_COLUMNS: Final = (
    "n", "brand", "bin", "last4", "expiry_month", "expiry_year", "format", "created_at",
    "expires_at", "data_key_id", "ciphertext",
)
_FIND_LIVE_TOKENS = (
    f"SELECT i.n, t.* FROM unnest($2::text[]) WITH ORDINALITY AS i(token, n)"
    f" CROSS JOIN LATERAL (SELECT {', '.join(REVEAL_COLUMNS[1:])} FROM tokens"
    " WHERE tenant = $1 AND token = i.token"
    " AND (expires_at IS NULL OR expires_at > now()) LIMIT 1) t"
)

_T_TOKEN_META = ", ".join("t." + c.strip() for c in _TOKEN_META.split(","))

# ON CONFLICT DO NOTHING covers both unique keys: a card already tokenized (fingerprint) and a
# candidate token that collided. The second SELECT sees the snapshot from before the INSERT,
# so it returns exactly the rows that were already there. Lookups by an array of keys are
# written as LATERAL ... LIMIT 1: one unique-index probe per key, whatever the statistics say
# (a freshly loaded, not yet analyzed table otherwise gets a plan that scans the tenant).
_INSERT_TOKENS_CTES = f"""
    WITH input AS (
        SELECT * FROM unnest($4::bytea[], $5::text[], $6::int2[], $7::text[], $8::text[],
                             $9::int2[], $10::int2[], $11::int8[], $12::bytea[])
            AS i(fingerprint, token, brand, bin, last4, expiry_month, expiry_year,
                 data_key_id, ciphertext)
    ), ins AS (
        INSERT INTO tokens (tenant, token, fingerprint, format, brand, bin, last4,
                            expiry_month, expiry_year, data_key_id, ciphertext, expires_at)
        SELECT $1, token, fingerprint, $2, brand, bin, last4, expiry_month, expiry_year,
               data_key_id, ciphertext, $3
        FROM input
        ON CONFLICT DO NOTHING
        RETURNING {_TOKEN_META}
    )"""
_EXISTING_TOKENS = f"""
    FROM input i CROSS JOIN LATERAL (
        SELECT {_TOKEN_META} FROM tokens
        WHERE tenant = $1 AND format = $2 AND fingerprint = i.fingerprint LIMIT 1
    ) t
"""
_INSERT_TOKENS = f"""{_INSERT_TOKENS_CTES}
    SELECT true AS inserted, {_TOKEN_META} FROM ins
    UNION ALL
    SELECT false, t.* {_EXISTING_TOKENS}"""

# The same, and the chunk's audit records appended by audit_append() (0002_audit.sql) in the
# same statement and transaction: one round trip and one commit per chunk instead of two.
# Only when every row went in (the records name the new tokens); otherwise audit_append is
# never called (a one-time filter) and the caller appends the records once it knows which
# tokens the returning cards have. `audited` is the number of records appended (0 when
# audit_append was not called), on each inserted row.
_INSERT_TOKENS_AUDITED = f"""{_INSERT_TOKENS_CTES}, audited AS (
        SELECT count(*) AS n
        FROM audit_append($13::timestamptz[], $14::text[], $15::text[], $16::text[],
                          $17::text[], $18::text[], $19::text[], $20::text[], $21::text[],
                          $22::text[], $23::bytea[], $24::text[])
        WHERE (SELECT count(*) FROM ins) = cardinality($4::bytea[])
    )
    SELECT true AS inserted, {_TOKEN_META}, (SELECT n FROM audited) AS audited FROM ins
    UNION ALL
    SELECT false, t.*, NULL {_EXISTING_TOKENS}"""


async def _no_session_reset(conn: asyncpg.Connection) -> None:
    """Skip asyncpg's per-release RESET ALL round trip.

    Nothing in `Store` or `IvrStore` changes session state (no SET, LISTEN or advisory locks),
    so the default reset would only double the round trips per query.
    asyncpg still rolls back a connection released inside a transaction.
    """


async def create_pool(
    dsn: str, *, min_size: int, max_size: int, application_name: str
) -> asyncpg.Pool:
    """A pool with the settings every Vaultline service uses (`Store`, `IvrStore`)."""
    async with _translated():
        return await asyncpg.create_pool(
            dsn,
            min_size=min_size,
            max_size=max_size,
            command_timeout=30,
            # A dead server must fail fast so callers get UNAVAILABLE, not a hang.
            timeout=5,
            server_settings={"application_name": application_name},
            reset=_no_session_reset,
        )


class Store:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    @classmethod
    async def connect(cls, dsn: str, *, min_size: int = 2, max_size: int = 10) -> Store:
        return cls(await create_pool(
            dsn, min_size=min_size, max_size=max_size, application_name="vaultline"))

    async def close(self) -> None:
        await self._pool.close()

    async def _fetch(self, sql: str, *args: Any) -> list[asyncpg.Record]:
        async with _translated():
            return await self._pool.fetch(sql, *args)

    async def _fetchrow(self, sql: str, *args: Any) -> asyncpg.Record | None:
        async with _translated():
            return await self._pool.fetchrow(sql, *args)

    async def _execute(self, sql: str, *args: Any) -> str:
        async with _translated():
            return await self._pool.execute(sql, *args)

    async def ping(self) -> None:
        await self._fetchrow("SELECT 1")

    # ---- data keys -------------------------------------------------------------------

    async def find_active_data_key(self, tenant: str, purpose: str) -> DataKeyRow | None:
        row = await self._fetchrow(
            f"SELECT {_DATA_KEY_COLUMNS} FROM data_keys"
            " WHERE tenant = $1 AND purpose = $2 AND retired_at IS NULL",
            tenant,
            purpose,
        )
        return DataKeyRow(*row) if row else None

    async def insert_data_key(
        self,
        tenant: str,
        purpose: str,
        wrapped_key: str,
        kek_version: int,
        max_uses: int,
        max_age: dt.timedelta,
    ) -> DataKeyRow | None:
        """Insert a new active key; None if another process made one first."""
        row = await self._fetchrow(
            "INSERT INTO data_keys (tenant, purpose, wrapped_key, kek_version, max_uses,"
            " retire_at) VALUES ($1, $2, $3, $4, $5, now() + $6::interval)"
            " ON CONFLICT (tenant, purpose) WHERE retired_at IS NULL DO NOTHING"
            f" RETURNING {_DATA_KEY_COLUMNS}",
            tenant,
            purpose,
            wrapped_key,
            kek_version,
            max_uses,
            max_age,
        )
        return DataKeyRow(*row) if row else None

    async def reserve_data_key_uses(self, key_id: int, count: int) -> bool:
        """Count `count` encryptions against an active key, if its budget and age allow."""
        row = await self._fetchrow(
            "UPDATE data_keys SET uses = uses + $2"
            " WHERE id = $1 AND retired_at IS NULL AND uses + $2 <= max_uses"
            " AND retire_at > now() RETURNING id",
            key_id,
            count,
        )
        return row is not None

    async def retire_data_key(self, key_id: int) -> None:
        await self._execute(
            "UPDATE data_keys SET retired_at = now() WHERE id = $1 AND retired_at IS NULL",
            key_id,
        )

    async def find_data_keys(self, ids: Sequence[int]) -> list[DataKeyRow]:
        rows = await self._fetch(
            f"SELECT {_DATA_KEY_COLUMNS} FROM data_keys WHERE id = ANY($1::bigint[])", list(ids)
        )
        return [DataKeyRow(*r) for r in rows]

    async def list_data_keys(self, after_id: int, limit: int) -> list[DataKeyRow]:
        rows = await self._fetch(
            f"SELECT {_DATA_KEY_COLUMNS} FROM data_keys WHERE id > $1 ORDER BY id LIMIT $2",
            after_id,
            limit,
        )
        return [DataKeyRow(*r) for r in rows]

    async def update_wrapped_key(
        self, key_id: int, old_wrapped: str, new_wrapped: str, kek_version: int
    ) -> bool:
        """Swap in a rewrapped key, only if nobody changed it meanwhile."""
        row = await self._fetchrow(
            "UPDATE data_keys SET wrapped_key = $3, kek_version = $4"
            " WHERE id = $1 AND wrapped_key = $2 RETURNING id",
            key_id,
            old_wrapped,
            new_wrapped,
            kek_version,
        )
        return row is not None

    async def shred_tenant(self, tenant: str) -> tuple[int, int, list[int]]:
        """Destroy a tenant's data keys and delete its tokens (0009_shred_tenant.sql):
        (data keys destroyed, tokens deleted, the destroyed keys' ids)."""
        row = await self._fetchrow("SELECT * FROM shred_tenant($1)", tenant)
        assert row is not None
        return int(row[0]), int(row[1]), list(row[2])

    async def count_data_keys_by_kek_version(self) -> list[tuple[int, str, int, int]]:
        """(kek_version, purpose, active keys, retired keys) for `keys status`."""
        rows = await self._fetch(
            "SELECT kek_version, purpose, count(*) FILTER (WHERE retired_at IS NULL),"
            " count(*) FILTER (WHERE retired_at IS NOT NULL)"
            " FROM data_keys GROUP BY kek_version, purpose ORDER BY kek_version, purpose"
        )
        return [tuple(r) for r in rows]

    # ---- tokens ----------------------------------------------------------------------

    async def insert_tokens(
        self,
        tenant: str,
        fmt: int,
        expires_at: dt.datetime | None,
        rows: NewTokens,
        audit: AuditColumns | None = None,
    ) -> tuple[list[asyncpg.Record], list[asyncpg.Record], bool]:
        """Insert a chunk of new cards in one round trip.

        Returns (inserted, existing, audited): the rows that went in, the live or expired
        rows already holding one of the fingerprints, and whether `audit` was appended to the
        audit chain in the same transaction, which happens when every row went in. A
        fingerprint in neither list lost a race with a concurrent insert, or its candidate
        token collided: the caller retries it.
        """
        arrays = (
            rows.fingerprints,
            rows.tokens,
            rows.brands,
            rows.bins,
            rows.last4s,
            rows.expiry_months,
            rows.expiry_years,
            rows.data_key_ids,
            rows.ciphertexts,
        )
        if audit is None:
            records = await self._fetch(_INSERT_TOKENS, tenant, fmt, expires_at, *arrays)
        else:
            records = await self._fetch(
                _INSERT_TOKENS_AUDITED, tenant, fmt, expires_at, *arrays, *audit.arguments()
            )
        inserted = [r for r in records if r["inserted"]]
        existing = [r for r in records if not r["inserted"]]
        audited = audit is not None and bool(inserted) and inserted[0]["audited"] > 0
        return inserted, existing, audited

    async def delete_expired_tokens(
        self, tenant: str, fmt: int, fingerprints: Sequence[bytes]
    ) -> int:
        status = await self._execute(
            "DELETE FROM tokens WHERE tenant = $1 AND format = $2"
            " AND fingerprint = ANY($3::bytea[]) AND expires_at <= now()",
            tenant,
            fmt,
            list(fingerprints),
        )
        return int(status.split()[-1])

    async def update_token_cards(
        self,
        tenant: str,
        data_key_ids: Sequence[int],
        tokens: Sequence[str],
        expiry_months: Sequence[int],
        expiry_years: Sequence[int],
        ciphertexts: Sequence[bytes],
    ) -> list[asyncpg.Record]:
        """Re-seal existing tokens whose card came back with a new expiry date."""
        return await self._fetch(
            f"""
            UPDATE tokens t SET expiry_month = u.expiry_month, expiry_year = u.expiry_year,
                                data_key_id = u.data_key_id, ciphertext = u.ciphertext
            FROM unnest($2::int8[], $3::text[], $4::int2[], $5::int2[], $6::bytea[])
                AS u(data_key_id, token, expiry_month, expiry_year, ciphertext)
            WHERE t.tenant = $1 AND t.token = u.token
            RETURNING {_T_TOKEN_META}
            """,
            tenant,
            list(data_key_ids),
            list(tokens),
            list(expiry_months),
            list(expiry_years),
            list(ciphertexts),
        )

    async def find_live_tokens(self, tenant: str, tokens: Sequence[str]) -> list[asyncpg.Record]:
        """Live (not expired) tokens with their ciphertext, in one round trip.

        One row per live token, with the columns of REVEAL_COLUMNS in that order; `n` is the
        token's 1-based position in `tokens` (a token sent twice answers twice).
        """
        return await self._fetch(_FIND_LIVE_TOKENS, tenant, list(tokens))

    async def find_live_token(self, tenant: str, token: str) -> asyncpg.Record | None:
        return await self._fetchrow(
            f"SELECT {_TOKEN_META} FROM tokens WHERE tenant = $1 AND token = $2"
            " AND (expires_at IS NULL OR expires_at > now())",
            tenant,
            token,
        )

    async def delete_token(self, tenant: str, token: str) -> bool:
        """Delete a live token and its ciphertext; the card is then unrecoverable."""
        row = await self._fetchrow(
            "DELETE FROM tokens WHERE tenant = $1 AND token = $2"
            " AND (expires_at IS NULL OR expires_at > now()) RETURNING token",
            tenant,
            token,
        )
        return row is not None

    async def purge_expired_tokens(self, limit: int = 10_000) -> int:
        """Delete up to `limit` expired tokens with their ciphertext; how many went."""
        status = await self._execute(
            "DELETE FROM tokens WHERE ctid = ANY(ARRAY(SELECT ctid FROM tokens"
            " WHERE expires_at <= now() LIMIT $1))",
            limit,
        )
        return int(status.split()[-1])

    # ---- security codes held until authorisation (0013_security_codes.sql) ----------------

    async def hold_security_code(
        self, tenant: str, token: str, key_id: int, ciphertext: bytes, hold: dt.timedelta
    ) -> bool:
        """Hold a sealed security code for a live token (replacing one it held); False when
        the token is not live."""
        row = await self._fetchrow(
            "INSERT INTO security_codes (tenant, token, data_key_id, ciphertext, expires_at)"
            " SELECT $1, $2, $3, $4, now() + $5::interval FROM tokens"
            " WHERE tenant = $1 AND token = $2 AND (expires_at IS NULL OR expires_at > now())"
            " ON CONFLICT (tenant, token) DO UPDATE SET data_key_id = excluded.data_key_id,"
            " ciphertext = excluded.ciphertext, created_at = excluded.created_at,"
            " expires_at = excluded.expires_at RETURNING 1",
            tenant, token, key_id, ciphertext, hold,
        )
        return row is not None

    async def take_security_code(self, tenant: str, token: str) -> tuple[int, bytes] | None:
        """Remove a held, unexpired security code and answer it (key id, ciphertext): one
        statement, so two concurrent redemptions never both get it."""
        row = await self._fetchrow(
            "DELETE FROM security_codes WHERE tenant = $1 AND token = $2"
            " RETURNING data_key_id, ciphertext, expires_at > now() AS live",
            tenant, token,
        )
        if row is None or not row["live"]:
            return None  # an expired one is erased all the same
        return row["data_key_id"], bytes(row["ciphertext"])

    async def purge_expired_security_codes(self, limit: int = 10_000) -> int:
        """Erase up to `limit` expired security codes; how many went."""
        status = await self._execute(
            "DELETE FROM security_codes WHERE ctid = ANY(ARRAY(SELECT ctid FROM security_codes"
            " WHERE expires_at <= now() LIMIT $1))",
            limit,
        )
        return int(status.split()[-1])

    # ---- the recording vault (0014_recordings.sql) -------------------------------------

    async def list_recordings(self, tenant: str, before: tuple[dt.datetime, str] | None,
                              limit: int) -> list[asyncpg.Record]:
        """A tenant's recordings, newest first, after the (created_at, sid) `before`."""
        if before is None:
            return await self._fetch(
                "SELECT * FROM recordings WHERE tenant = $1"
                " ORDER BY created_at DESC, sid DESC LIMIT $2", tenant, limit)
        return await self._fetch(
            "SELECT * FROM recordings WHERE tenant = $1 AND (created_at, sid) < ($2, $3)"
            " ORDER BY created_at DESC, sid DESC LIMIT $4", tenant, before[0], before[1], limit)

    async def find_recording(self, tenant: str, sid: str) -> asyncpg.Record | None:
        return await self._fetchrow(
            "SELECT * FROM recordings WHERE tenant = $1 AND sid = $2", tenant, sid)

    async def release_recording(self, tenant: str, sid: str, by: str, reason: str
                                ) -> asyncpg.Record | None:
        """Release a quarantined recording for listening; None if it is not quarantined."""
        return await self._fetchrow(
            "UPDATE recordings SET override_by = $3, override_reason = $4, updated_at = now()"
            " WHERE tenant = $1 AND sid = $2 AND state = 'quarantined' RETURNING *",
            tenant, sid, by, reason)

    async def purge_recordings(self, older_than: dt.timedelta, limit: int = 1000
                               ) -> list[str]:
        """Delete up to `limit` recordings older than `older_than`; their store file names
        (the caller deletes the files after the rows)."""
        rows = await self._fetch(
            "DELETE FROM recordings WHERE sid = ANY(ARRAY(SELECT sid FROM recordings"
            " WHERE created_at < now() - $1::interval ORDER BY created_at LIMIT $2))"
            " RETURNING media_file", older_than, limit)
        return [r["media_file"] for r in rows]

    # ---- idempotency -----------------------------------------------------------------

    async def purge_tokenize_requests(self, older_than: dt.timedelta, limit: int = 10_000) -> int:
        """Delete up to `limit` idempotency records older than `older_than`; how many went."""
        status = await self._execute(
            "DELETE FROM tokenize_requests WHERE ctid = ANY(ARRAY(SELECT ctid FROM"
            " tokenize_requests WHERE created_at < now() - $1::interval LIMIT $2))",
            older_than,
            limit,
        )
        return int(status.split()[-1])

    async def find_tokenize_request(
        self, tenant: str, caller: str, request_key: bytes
    ) -> asyncpg.Record | None:
        return await self._fetchrow(
            "SELECT fingerprint, token, created FROM tokenize_requests"
            " WHERE tenant = $1 AND caller = $2 AND request_key = $3",
            tenant,
            caller,
            request_key,
        )

    async def insert_tokenize_request(
        self, tenant: str, caller: str, request_key: bytes, fingerprint: bytes, token: str,
        created: bool,
    ) -> bool:
        """Record a request's result; False if the same caller's request was recorded
        meanwhile."""
        row = await self._fetchrow(
            "INSERT INTO tokenize_requests (tenant, caller, request_key, fingerprint, token,"
            " created) VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT DO NOTHING RETURNING token",
            tenant,
            caller,
            request_key,
            fingerprint,
            token,
            created,
        )
        return row is not None

    # ---- audit -----------------------------------------------------------------------
    # Append-only: the one write is audit_append() (0002_audit.sql), which chains the
    # records and moves the head under a lock; the service role may not write the tables.

    async def append_audit(
        self, records: AuditColumns, *, receipts: bool = True
    ) -> list[tuple[int, bytes]]:
        """Chain and commit a batch of records in one round trip; (seq, hash) of each, or
        nothing when `receipts` is false (one row back instead of one per record)."""
        rows = await self._fetch(
            ("SELECT seq, hash" if receipts else "SELECT count(*)")
            + " FROM audit_append($1::timestamptz[], $2::text[], $3::text[],"
            " $4::text[], $5::text[], $6::text[], $7::text[], $8::text[], $9::text[],"
            " $10::text[], $11::bytea[], $12::text[])",
            *records.arguments(),
        )
        return [(r[0], r[1]) for r in rows] if receipts else []

    async def audit_page_before(self, before_seq: int, limit: int) -> list[asyncpg.Record]:
        """Up to `limit` records older than `before_seq`, newest first (admin listing)."""
        return await self._fetch(
            "SELECT seq, at, identity, role, tenant, method, token, purpose, outcome,"
            " request_id, peer, hash, tokens FROM audit_log WHERE seq < $1"
            " ORDER BY seq DESC LIMIT $2",
            before_seq,
            limit,
        )

    async def list_audit(self, after_seq: int, limit: int) -> list[asyncpg.Record]:
        """The next `limit` records after `after_seq`, in seq order (a page of `verify`)."""
        return await self._fetch(
            "SELECT seq, at, identity, role, tenant, method, token, purpose, outcome,"
            " request_id, peer, content_hash, prev_hash, hash, tokens FROM audit_log"
            " WHERE seq > $1 ORDER BY seq LIMIT $2",
            after_seq,
            limit,
        )

    async def audit_head(self) -> tuple[int, bytes] | None:
        """(seq, hash) of the last appended record; (0, 32 zero bytes) before the first."""
        row = await self._fetchrow("SELECT seq, hash FROM audit_head")
        return (row[0], row[1]) if row else None

    async def recent_audit(self, limit: int) -> list[asyncpg.Record]:
        """The last `limit` records, oldest first."""
        return await self._fetch(
            "SELECT * FROM (SELECT seq, at, identity, role, tenant, method, token, purpose,"
            " outcome, request_id, peer, content_hash, prev_hash, hash, tokens FROM audit_log"
            " ORDER BY seq DESC LIMIT $1) r ORDER BY seq",
            limit,
        )

    # ---- settlement ----------------------------------------------------------------------
    # Batches of the SettlementService (0004, 0010). Tokens only, never a PAN. This role
    # cannot write a batch's state: every change goes through a settlement_* function, which
    # checks the state machine and dual control itself.

    _SETTLEMENT_COLUMNS = (
        "id, tenant, state, created_by, created_at, approved_by, approved_at, input_sha256,"
        " input_name, rows_sha256, approval_signature, row_count, totals, run_id, run_by,"
        " run_host, run_pid, run_started_at, lease_until, runs, done_at, summary"
    )

    async def create_settlement_batch(
        self,
        batch_id: str,
        tenant: str,
        created_by: str,
        input_sha256: str,
        input_name: str,
        rows: AsyncIterable[tuple[int, str, str, int, str, str]],
        *,
        copy_timeout: float,
    ) -> asyncpg.Record:
        """The batch and its rows (line, reference, token, amount, currency, auth code), in
        one transaction, sealed: a batch is never visible without all its rows, and its
        counts, totals and digest are PostgreSQL's. `rows` is consumed lazily by one binary
        COPY; an exception raised while producing it rolls the whole batch back."""
        async with _translated(), self._pool.acquire() as conn, conn.transaction():
            await conn.execute("SELECT settlement_create($1, $2, $3, $4, $5)",
                               batch_id, tenant, created_by, input_sha256, input_name)
            await conn.copy_records_to_table(
                "settlement_rows",
                records=_with_batch(batch_id, rows),
                columns=("batch_id", "line", "reference", "token", "amount_minor", "currency",
                         "auth_code"),
                timeout=copy_timeout,
            )
            await conn.execute("SELECT settlement_seal($1)", batch_id)
            row = await conn.fetchrow(
                f"SELECT {self._SETTLEMENT_COLUMNS} FROM settlement_batches WHERE id = $1",
                batch_id)
            assert row is not None
            return row

    async def find_settlement_batch(self, batch_id: str) -> asyncpg.Record | None:
        return await self._fetchrow(
            f"SELECT {self._SETTLEMENT_COLUMNS} FROM settlement_batches WHERE id = $1", batch_id
        )

    async def list_settlement_batches(
        self, tenant: str, limit: int, before: tuple[dt.datetime, str] | None = None
    ) -> list[asyncpg.Record]:
        """A tenant's batches, newest first, after the (created_at, id) cursor if given."""
        if before is None:
            return await self._fetch(
                f"SELECT {self._SETTLEMENT_COLUMNS} FROM settlement_batches WHERE tenant = $1"
                " ORDER BY created_at DESC, id DESC LIMIT $2", tenant, limit)
        return await self._fetch(
            f"SELECT {self._SETTLEMENT_COLUMNS} FROM settlement_batches WHERE tenant = $1"
            " AND (created_at, id) < ($3, $4) ORDER BY created_at DESC, id DESC LIMIT $2",
            tenant, limit, *before)

    async def approve_settlement_batch(
        self, batch_id: str, approver: str, rows_sha256: str, signature: str
    ) -> None:
        """created → approved (settlement_approve checks dual control and the digest)."""
        await self._execute("SELECT settlement_approve($1, $2, $3, $4)",
                            batch_id, approver, rows_sha256, signature)

    async def start_settlement_run(
        self, batch_id: str, run_id: str, run_by: str, host: str, pid: int,
        lease: dt.timedelta, take_over: str | None,
    ) -> bool:
        """approved → running under `run_id` for `run_by`; or take over a running batch whose
        lease ran out, or whose run `take_over` is `run_by`'s own."""
        async with _translated():
            return bool(await self._pool.fetchval(
                "SELECT settlement_start_run($1, $2::uuid, $3, $4, $5, $6, $7::uuid)",
                batch_id, run_id, run_by, host, pid, lease, take_over))

    async def renew_settlement_run(
        self, batch_id: str, run_id: str, run_by: str, lease: dt.timedelta
    ) -> dt.datetime | None:
        async with _translated():
            value: dt.datetime | None = await self._pool.fetchval(
                "SELECT settlement_renew_run($1, $2::uuid, $3, $4)",
                batch_id, run_id, run_by, lease)
            return value

    async def finish_settlement_run(
        self, batch_id: str, run_id: str, run_by: str, summary_json: str
    ) -> bool:
        async with _translated():
            return bool(await self._pool.fetchval(
                "SELECT settlement_finish_run($1, $2::uuid, $3, $4::jsonb)",
                batch_id, run_id, run_by, summary_json))

    async def abandon_settlement_run(self, batch_id: str, run_id: str, run_by: str) -> bool:
        async with _translated():
            return bool(await self._pool.fetchval(
                "SELECT settlement_abandon_run($1, $2::uuid, $3)", batch_id, run_id, run_by))

    async def settlement_rows_after(
        self, batch_id: str, after_line: int, limit: int
    ) -> list[asyncpg.Record]:
        """The next `limit` rows of a batch after `after_line`, in line order."""
        return await self._fetch(
            "SELECT line, reference, token, amount_minor, currency, auth_code"
            " FROM settlement_rows WHERE batch_id = $1 AND line > $2 ORDER BY line LIMIT $3",
            batch_id, after_line, limit,
        )

    async def settlement_reveal_check(
        self, batch_id: str, references: Sequence[str], tokens: Sequence[str]
    ) -> asyncpg.Record | None:
        """In one round trip: the batch's state, tenant, runner and signed approval, and how
        many of the (reference, token) pairs are rows of it (None: no such batch)."""
        return await self._fetchrow(
            "SELECT b.id, b.state, b.tenant, b.run_by, b.created_by, b.approved_by, b.rows_sha256,"
            " b.row_count, b.approval_signature, (SELECT count(*)"
            " FROM unnest($2::text[], $3::text[]) AS i(reference, token)"
            # One index probe per item (batch_id, reference): a plain join hashed the whole
            # batch for every chunk, 85 ms for 5,000 of 300,000 rows against 10-20 ms.
            " CROSS JOIN LATERAL (SELECT 1 FROM settlement_rows r WHERE r.batch_id = $1"
            " AND r.reference = i.reference AND r.token = i.token LIMIT 1) AS m)"
            " AS matched FROM settlement_batches b WHERE b.id = $1",
            batch_id, references, tokens)

    async def settlement_rows_intact(self, batch_id: str, rows_sha256: str) -> bool:
        """Whether the batch's rows still have the digest its approval names."""
        async with _translated():
            return bool(await self._pool.fetchval(
                "SELECT settlement_rows_sha256($1) = $2", batch_id, rows_sha256))

    # ---- the daily Detokenize budget -------------------------------------------------------

    async def spend_daily_reveal(self, identity: str, limit: int) -> bool:
        """Count one reveal against `identity`'s budget for today (UTC); False, counting
        nothing, once `limit` are spent."""
        async with _translated():
            used = await self._pool.fetchval(
                "INSERT INTO detokenize_budget (identity, day, used)"
                " VALUES ($1, (now() AT TIME ZONE 'UTC')::date, 1)"
                " ON CONFLICT (identity, day) DO UPDATE SET used = detokenize_budget.used + 1"
                " WHERE detokenize_budget.used < $2 RETURNING used",
                identity, limit)
        return used is not None


    # ---- captures --------------------------------------------------------------------------
    # Agent-assisted captures (0012_captures.sql): started and commanded here, driven by the
    # IVR, followed through their events. No card data: tokens and masked progress only.

    _CAPTURE_COLUMNS = (
        "id, tenant, call_sid, agent_id, requested_by, request_id, security_code, postal_code,"
        " token_format, state, field, command, payment_sid, token, brand, last4, expiry_month,"
        " expiry_year, failure_reason, last_seq, created_at, updated_at"
    )
    _EVENT_COLUMNS = (
        "capture_id, seq, at, state, field, digits_entered, field_outcome, attempt, token,"
        " brand, last4, expiry_month, expiry_year, failure_reason"
    )

    async def insert_capture(
        self, capture_id: str, tenant: str, call_sid: str, agent_id: str, requested_by: str,
        request_id: str, security_code: bool, postal_code: bool, token_format: int,
    ) -> asyncpg.Record:
        """A new capture in state started, with its first event; raises UniqueViolationError
        (constraint name tells which) for a reused request id or a call already capturing."""
        async with _translated(), self._pool.acquire() as conn, conn.transaction():
            await conn.execute(
                "INSERT INTO captures (id, tenant, call_sid, agent_id, requested_by,"
                " request_id, security_code, postal_code, token_format)"
                " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
                capture_id, tenant, call_sid, agent_id, requested_by, request_id,
                security_code, postal_code, token_format)
            await conn.execute(
                "SELECT capture_append_event($1, 'started', '', 0, '', 0, NULL, NULL, NULL,"
                " NULL, NULL, '')", capture_id)
            await conn.execute("SELECT pg_notify('vaultline_capture_command', $1)", capture_id)
            row = await conn.fetchrow(
                f"SELECT {self._CAPTURE_COLUMNS} FROM captures WHERE id = $1", capture_id)
            assert row is not None
            return row

    async def find_capture(self, capture_id: str) -> asyncpg.Record | None:
        return await self._fetchrow(
            f"SELECT {self._CAPTURE_COLUMNS} FROM captures WHERE id = $1", capture_id)

    async def find_capture_by_request(self, requested_by: str, request_id: str
                                      ) -> asyncpg.Record | None:
        return await self._fetchrow(
            f"SELECT {self._CAPTURE_COLUMNS} FROM captures"
            " WHERE requested_by = $1 AND request_id = $2", requested_by, request_id)

    async def capture_events_after(self, capture_id: str, after_seq: int, limit: int
                                   ) -> list[asyncpg.Record]:
        return await self._fetch(
            f"SELECT {self._EVENT_COLUMNS} FROM capture_events"
            " WHERE capture_id = $1 AND seq > $2 ORDER BY seq LIMIT $3",
            capture_id, after_seq, limit)

    async def command_capture(self, capture_id: str, command: str) -> asyncpg.Record | None:
        """Leave a command for the IVR (cancel, restart:<field>) on a capture in progress and
        wake the IVR replicas; None if the capture has ended."""
        async with _translated(), self._pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(
                f"UPDATE captures SET command = $2, updated_at = now() WHERE id = $1"
                f" AND state IN ('started', 'capturing') RETURNING {self._CAPTURE_COLUMNS}",
                capture_id, command)
            if row is not None:
                await conn.execute("SELECT pg_notify('vaultline_capture_command', $1)",
                                   capture_id)
            return row

    async def fail_unclaimed_captures(self, older_than: dt.timedelta, reason: str) -> int:
        """Captures whose start no IVR replica took within `older_than`: failed with
        `reason`, each with its event (the watchers learn it). How many."""
        async with _translated(), self._pool.acquire() as conn, conn.transaction():
            ids = [r["id"] for r in await conn.fetch(
                "SELECT id FROM captures WHERE command = 'start' AND state = 'started'"
                " AND created_at < now() - $1::interval FOR UPDATE SKIP LOCKED", older_than)]
            for capture_id in ids:
                await conn.execute("UPDATE captures SET command = '' WHERE id = $1", capture_id)
                await conn.execute(
                    "SELECT capture_append_event($1, 'failed', '', 0, '', 0, NULL, NULL, NULL,"
                    " NULL, NULL, $2)", capture_id, reason)
            return len(ids)

    async def listen(self, channel: str, on_notify: Callable[[str], None]
                     ) -> Callable[[], Awaitable[None]]:
        """Call `on_notify(payload)` for each NOTIFY on `channel`, on a connection held for
        it; returns the coroutine function that stops listening."""
        async with _translated():
            conn = await self._pool.acquire()

        def relay(_conn: Any, _pid: int, _channel: str, payload: str) -> None:
            on_notify(payload)

        try:
            async with _translated():
                await conn.add_listener(channel, relay)
        except BaseException:
            await self._pool.release(conn)
            raise

        async def stop() -> None:
            with contextlib.suppress(Exception):
                await conn.remove_listener(channel, relay)
            with contextlib.suppress(Exception):
                await self._pool.release(conn)

        return stop


async def _with_batch(
    batch_id: str, rows: AsyncIterable[tuple[int, str, str, int, str, str]]
) -> AsyncIterator[tuple[Any, ...]]:
    async for row in rows:
        yield (batch_id, *row)


# ---- migrations ----------------------------------------------------------------------



def _read_migrations(directory: Path) -> list[tuple[str, str]]:
    files = sorted(directory.glob("[0-9][0-9][0-9][0-9]_*.sql"))
    if not files:
        raise RuntimeError(f"no migrations found in {directory}")
    return [(path.name, path.read_text(encoding="utf-8")) for path in files]


async def migrate(owner_dsn: str, directory: Path = MIGRATIONS_DIR) -> list[str]:
    """Apply pending `NNNN_*.sql` files in order, each in its own transaction, as the owner.

    A checksum per applied file catches a migration edited after it ran. Returns the names
    applied now. An advisory lock keeps concurrent starters from racing.
    """
    applied_now: list[str] = []
    files = _read_migrations(directory)
    async with _translated():
        conn = await asyncpg.connect(owner_dsn, timeout=10)
    try:
        async with _translated():
            await conn.execute("SELECT pg_advisory_lock(7461)")
            await conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations (name text PRIMARY KEY,"
                " sha256 text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())"
            )
            done = {r["name"]: r["sha256"] for r in await conn.fetch(
                "SELECT name, sha256 FROM schema_migrations")}
        for name, sql in files:
            digest = hashlib.sha256(sql.encode()).hexdigest()
            if name in done:
                if done[name] != digest:
                    raise RuntimeError(f"migration {name} changed after it was applied")
                continue
            async with _translated(), conn.transaction():
                await conn.execute(sql)
                await conn.execute(
                    "INSERT INTO schema_migrations (name, sha256) VALUES ($1, $2)",
                    name,
                    digest,
                )
            applied_now.append(name)
    finally:
        with contextlib.suppress(Exception):
            await conn.close()
    return applied_now
