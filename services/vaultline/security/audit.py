"""Audit trail: records, their canonical encoding and hash chain, verification, and the writer.

Each record's content hash is SHA-256 over a versioned, length-prefixed encoding of its
fields; PostgreSQL chains them (`hash = SHA-256(prev_hash || content_hash)`, see
`infra/postgres/0002_audit.sql`) and keeps a head (last seq and hash) so a cut-off tail shows.
Everything above `AuditWriter` is pure. Records never hold a PAN: callers put tokens in them.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final, NamedTuple, Protocol

from ..errors import DatabaseUnavailable

if TYPE_CHECKING:
    from ..store import Store

__all__ = [
    "FORMAT_VERSION",
    "GENESIS_HASH",
    "TOKEN_SEPARATOR",
    "AuditEvent",
    "AuditReceipt",
    "AuditSink",
    "AuditWriter",
    "ChainVerifier",
    "VerifyReport",
    "canonical",
    "chain_hash",
    "content_hash",
    "verify_chain",
]

# Format 1: a record without a token list (every record before reveal lists existed, and
# every one since that names at most one token). Format 2: format 1's fields, then the list.
FORMAT_VERSION: Final = 2
GENESIS_HASH: Final = bytes(32)
# Text fields in encoding order. Changing the order or the set means a new FORMAT_VERSION.
FIELDS: Final = (
    "identity", "role", "tenant", "method", "token", "purpose", "outcome", "request_id", "peer",
)
_MAGIC: Final = b"vaultline-audit\x00" + (1).to_bytes(2, "big")
_MAGIC_V2: Final = b"vaultline-audit\x00" + (2).to_bytes(2, "big")
# Stored space-separated on the way into PostgreSQL (0005_audit_reveal_lists.sql).
TOKEN_SEPARATOR: Final = " "  # noqa: S105 - a separator, not a secret
_EPOCH: Final = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)


def _clean(value: object, name: str) -> str:
    """Text PostgreSQL can store and UTF-8 can encode, so the hash survives the round trip.

    Values may come from a hostile client (request id, purpose of a denied call): an audit
    record must still be written, so bad characters are replaced rather than refused."""
    if not isinstance(value, str):
        raise TypeError(f"AuditEvent.{name} must be str")
    value = str.__str__(value)  # a plain str, not an enum member that prints differently
    if "\x00" in value:  # PostgreSQL text cannot hold NUL
        value = value.replace("\x00", "\ufffd")
    if not value.isascii():  # lone surrogates cannot be encoded
        value = value.encode("utf-8", "replace").decode("utf-8")
    return value


def _token_list(tokens: Iterable[str]) -> tuple[str, ...]:
    """A reveal list as it can be stored: non-empty tokens without the separator (tokens the
    service issued never have one; anything else is a caller bug, not data to repair)."""
    out = tuple(tokens)
    for token in out:
        if type(token) is not str or not token or TOKEN_SEPARATOR in token or (
            not token.isascii()) or "\x00" in token:
            raise ValueError("AuditEvent.tokens holds only well-formed tokens")
    return out


@dataclass(frozen=True, slots=True)
class AuditEvent:
    """One audit record before it is chained. `at` is an aware datetime (stored as UTC)."""

    identity: str
    role: str
    tenant: str
    method: str
    outcome: str
    request_id: str
    peer: str
    token: str = ""
    purpose: str = ""
    at: dt.datetime = field(kw_only=True)
    # Every token a chunk revealed, in order (format 2); empty for every other record.
    tokens: tuple[str, ...] = field(default=(), kw_only=True)

    def __post_init__(self) -> None:
        for name in FIELDS:
            value = getattr(self, name)
            # The common case (plain ASCII text) costs three cheap checks per field.
            if type(value) is not str or not value.isascii() or "\x00" in value:
                object.__setattr__(self, name, _clean(value, name))
        if self.tokens:
            object.__setattr__(self, "tokens", _token_list(self.tokens))
        at = self.at
        if not isinstance(at, dt.datetime) or at.utcoffset() is None:
            raise ValueError("AuditEvent.at must be a timezone-aware datetime")
        if at.tzinfo is not dt.UTC:
            object.__setattr__(self, "at", at.astimezone(dt.UTC))


class AuditReceipt(NamedTuple):
    """Where a record landed in the chain."""

    seq: int
    hash: bytes


def _micros(at: dt.datetime) -> int:
    # Whole microseconds since the epoch: exactly what timestamptz stores, whatever the zone.
    delta = at - _EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def _put_texts(parts: list[bytes], texts: Iterable[str]) -> None:
    for text in texts:
        raw = text.encode("utf-8")
        parts.append(len(raw).to_bytes(4, "big"))
        parts.append(raw)


def _encode(at: dt.datetime, values: Iterable[str], tokens: Sequence[str] = ()) -> bytes:
    parts = [_MAGIC_V2 if tokens else _MAGIC, _micros(at).to_bytes(8, "big", signed=True)]
    _put_texts(parts, values)
    if tokens:
        parts.append(len(tokens).to_bytes(4, "big"))
        _put_texts(parts, tokens)
    return b"".join(parts)


def canonical(event: AuditEvent) -> bytes:
    """Format 1 (no token list): magic+version, time as int64 µs since the epoch, then each of
    `FIELDS` as a 4-byte big-endian length and its UTF-8 bytes. Format 2 (a token list): the
    same with version 2, then the number of tokens (4 bytes) and each token, length-prefixed.
    Unambiguous, and stable across releases: records of both formats verify forever."""
    return _encode(event.at, (getattr(event, name) for name in FIELDS), event.tokens)


def content_hash(event: AuditEvent) -> bytes:
    return hashlib.sha256(canonical(event)).digest()


def chain_hash(prev: bytes, content: bytes) -> bytes:
    """The hash a record gets in the chain; PostgreSQL computes the same with sha256()."""
    return hashlib.sha256(prev + content).digest()


# ---- verification (pure) ------------------------------------------------------------------


class AuditRowLike(Protocol):
    """A stored record: an asyncpg Record or a dict with the audit_log columns."""

    def __getitem__(self, key: str, /) -> Any: ...


def _row_tokens(row: AuditRowLike) -> Sequence[str]:
    try:
        tokens = row["tokens"]
    except KeyError:  # a row read before reveal lists existed
        return ()
    return tokens or ()


@dataclass
class VerifyReport:
    ok: bool
    checked: int
    first_broken_seq: int | None
    problem: str


class ChainVerifier:
    """Incremental verification, so a caller can stream millions of rows in pages.

    Feed rows in seq order; `feed` returns False at the first broken record, after which the
    report says which one and why. Problems name seqs and columns, never field values.
    `start` is the (seq, hash) of the record before the first one fed: genesis by default.
    """

    def __init__(self, start: tuple[int, bytes] = (0, GENESIS_HASH)) -> None:
        self.last_seq, self.last_hash = start
        self.checked = 0
        self.first_broken_seq: int | None = None
        self.problem = ""
        self._head_seq: int | None = None

    @property
    def broken(self) -> bool:
        return self.first_broken_seq is not None

    def _break(self, seq: int, problem: str) -> bool:
        self.first_broken_seq = seq
        self.problem = problem
        return False

    def expect_head(self, head: tuple[int, bytes] | None) -> None:
        """Rows beyond the head's seq were not written by audit_append: flag them in `feed`."""
        self._head_seq = None if head is None else head[0]

    def feed(self, row: AuditRowLike) -> bool:
        if self.broken:
            return False
        seq: int = row["seq"]
        expected = self.last_seq + 1
        if seq < expected:
            return self._break(seq, f"record {seq} is out of order (after record {expected - 1})")
        if seq > expected:
            missing = f"record {expected}" if seq == expected + 1 else (
                f"records {expected}-{seq - 1}"
            )
            return self._break(expected, f"{missing} missing (deleted)")
        if self._head_seq is not None and seq > self._head_seq:
            return self._break(
                seq, f"record {seq} is beyond the head (seq {self._head_seq}): not appended"
                " through audit_append"
            )
        try:
            content = hashlib.sha256(
                _encode(row["at"], (row[name] for name in FIELDS), _row_tokens(row))
            ).digest()
        except (TypeError, AttributeError, UnicodeEncodeError, OverflowError):
            content = b""
        if content != bytes(row["content_hash"]):
            return self._break(
                seq, f"record {seq} was edited: its fields do not match its content_hash"
            )
        prev = bytes(row["prev_hash"])
        if prev != self.last_hash:
            return self._break(
                seq,
                f"record {seq} does not link to record {seq - 1}: prev_hash differs from that"
                " record's hash (a record replaced, reordered or rewritten with new hashes)",
            )
        digest = chain_hash(prev, content)
        if digest != bytes(row["hash"]):
            return self._break(seq, f"record {seq} has a wrong hash (hash column edited)")
        self.last_seq, self.last_hash = seq, digest
        self.checked += 1
        return True

    def finish(self, head: tuple[int, bytes] | None) -> VerifyReport:
        """Compare the last record with the head (None: no head check, e.g. a range)."""
        if not self.broken and head is not None:
            head_seq, head_hash = head[0], bytes(head[1])
            if self.last_seq < head_seq:
                missing = f"record {head_seq}" if head_seq == self.last_seq + 1 else (
                    f"records {self.last_seq + 1}-{head_seq}"
                )
                self._break(
                    self.last_seq + 1,
                    f"{missing} missing at the end (tail deleted); the head is at {head_seq}",
                )
            elif self.last_seq > head_seq:
                self._break(head_seq + 1, f"records after the head (seq {head_seq}) exist")
            elif self.last_hash != head_hash:
                self._break(
                    head_seq,
                    f"record {head_seq} differs from the head's hash (tail or head rewritten)",
                )
        return VerifyReport(
            ok=not self.broken,
            checked=self.checked,
            first_broken_seq=self.first_broken_seq,
            problem=self.problem,
        )


def verify_chain(
    rows: Iterable[AuditRowLike],
    head: tuple[int, bytes] | None,
    *,
    start: tuple[int, bytes] = (0, GENESIS_HASH),
) -> VerifyReport:
    """Walk `rows` in seq order from `start` and check every link, then the head.

    Detects an edited record (content hash), a deleted one (seq gap, or a broken link if
    seqs were renumbered), a reordered pair (broken link) and a cut-off tail (head)."""
    verifier = ChainVerifier(start)
    verifier.expect_head(head)
    for row in rows:
        if not verifier.feed(row):
            break
    return verifier.finish(head)


# ---- the writer -----------------------------------------------------------------------------


class AuditSink(Protocol):
    """Where records go, durably, before `record` returns: `AuditWriter` (the gate writes
    through it; so do the service's coalesced Tokenize chunks, unless their records went in
    with the chunk's tokens, see `Store.insert_tokens`)."""

    async def record(self, events: Sequence[AuditEvent]) -> None: ...


# Column order of `Store.append_audit` (after the timestamps); "tokens" is the joined list.
_COLUMNS: Final = (
    "identity", "role", "tenant", "method", "token", "purpose", "outcome", "request_id", "peer",
    "tokens",
)


def _column(event: AuditEvent, name: str) -> str:
    return TOKEN_SEPARATOR.join(event.tokens) if name == "tokens" else getattr(event, name)


class AuditColumns(NamedTuple):
    """Records as audit_append() takes them: timestamps, the `_COLUMNS` text columns (the
    joined token lists last), and each record's content hash."""

    ats: list[dt.datetime]
    columns: tuple[list[str], ...]
    hashes: list[bytes]


def audit_columns(events: Sequence[AuditEvent]) -> AuditColumns:
    """Hash and transpose records for one append (`AuditWriter`, or a statement that appends
    them with its own writes, `Store.insert_tokens`)."""
    return AuditColumns(
        [e.at for e in events],
        tuple([_column(e, name) for e in events] for name in _COLUMNS),
        [content_hash(event) for event in events],
    )


class _Pending(NamedTuple):
    """One caller's records, already as columns (so a batch is joined by list concatenation)."""

    ats: list[dt.datetime]
    columns: tuple[list[str], ...]  # in _COLUMNS order
    hashes: list[bytes]
    future: asyncio.Future[list[AuditReceipt]]
    wants_receipts: bool

    @property
    def size(self) -> int:
        return len(self.hashes)


class AuditWriter:
    """Appends records durably, coalescing concurrent calls into one round trip per batch.

    `record()` returns once its records are committed, so a call that reveals card data can
    answer only after its audit trail exists. Calls are never split across batches (one
    call's records commit together); a call's records are written even if the caller is
    cancelled meanwhile. Outages surface as `DatabaseUnavailable`.
    """

    def __init__(
        self,
        store: Store,
        *,
        max_batch: int = 2000,
        max_in_flight: int = 2,
        # 8 ms: fewer, larger appends while another is in flight. Server CPU per unary
        # Tokenize in back-to-back pairs: 2 ms 524/572/571 µs, 4 ms 517/480/395 µs; 4 ms
        # 461/560 µs, 8 ms 376/459 µs. An idle service never waits (first batch: one loop turn).
        busy_window: float = 0.008,
    ) -> None:
        self._store = store
        self._max_batch = max_batch
        self._max_in_flight = max_in_flight
        self._busy_window = busy_window
        self._queue: deque[_Pending] = deque()
        self._queued = 0  # records waiting in _queue
        self._draining = 0
        self._tasks: set[asyncio.Task[None]] = set()

    async def record(self, events: Sequence[AuditEvent]) -> None:
        """Append `events` (in order, all in one transaction); returns once committed."""
        await self.append(events, receipts=False)

    async def append(
        self, events: Sequence[AuditEvent], *, receipts: bool = True
    ) -> list[AuditReceipt]:
        """`record`, also saying where each record landed in the chain."""
        if not events:
            return []
        # Hash here, in the caller's task: spreads the CPU and keeps the drain loop short.
        ats, columns, hashes = audit_columns(events)
        return await self._enqueue(ats, columns, hashes, receipts)

    async def _enqueue(
        self,
        ats: list[dt.datetime],
        columns: tuple[list[str], ...],
        hashes: list[bytes],
        receipts: bool,
    ) -> list[AuditReceipt]:
        future: asyncio.Future[list[AuditReceipt]] = asyncio.get_running_loop().create_future()
        self._queue.append(_Pending(ats, columns, hashes, future, receipts))
        self._queued += len(hashes)
        if self._draining < self._max_in_flight:
            self._draining += 1
            task = asyncio.create_task(self._drain())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return await future

    def _take(self) -> list[_Pending]:
        taken: list[_Pending] = []
        size = 0
        while self._queue and (not taken or size + self._queue[0].size <= self._max_batch):
            pending = self._queue.popleft()
            taken.append(pending)
            size += pending.size
        self._queued -= size
        return taken

    async def _drain(self) -> None:
        try:
            # One loop turn first: calls made in the same turn join this batch.
            await asyncio.sleep(0)
            while self._queue:
                if self._draining > 1 and self._queued < self._max_batch:
                    # Another batch is in flight: waiting a little fills this one for free.
                    await asyncio.sleep(self._busy_window)
                batch = self._take()
                if not batch:
                    continue
                await self._append(batch)
        except asyncio.CancelledError:
            if self._draining == 1:  # the last drainer: fail what is still queued
                self._fail(self._take_all(), DatabaseUnavailable())
            raise
        finally:
            self._draining -= 1

    def _take_all(self) -> list[_Pending]:
        taken = list(self._queue)
        self._queue.clear()
        self._queued = 0
        return taken

    @staticmethod
    def _fail(batch: list[_Pending], exc: BaseException) -> None:
        for pending in batch:
            if not pending.future.done():
                pending.future.set_exception(exc)

    async def _append(self, batch: list[_Pending]) -> None:
        if len(batch) == 1:
            ats, columns, hashes = batch[0].ats, batch[0].columns, batch[0].hashes
        else:
            ats = [at for pending in batch for at in pending.ats]
            columns = tuple(
                [v for pending in batch for v in pending.columns[i]] for i in range(len(_COLUMNS))
            )
            hashes = [h for pending in batch for h in pending.hashes]
        # Receipts cost a row per record back over the wire: fetch them only if asked.
        receipts_wanted = any(pending.wants_receipts for pending in batch)
        try:
            rows = await self._store.append_audit(
                ats, *columns, hashes, receipts=receipts_wanted
            )
        except Exception as exc:  # every waiter of the batch gets its failure
            self._fail(batch, exc)
            return
        except asyncio.CancelledError:  # shutting down: nobody may wait forever
            self._fail(batch, DatabaseUnavailable())
            raise
        receipts = [AuditReceipt(seq, digest) for seq, digest in rows] if receipts_wanted else []
        offset = 0
        for pending in batch:
            n = pending.size
            if not pending.future.done():
                pending.future.set_result(receipts[offset : offset + n])
            offset += n
