"""Audit trail: records, their canonical encoding and hash chain, verification, and the writer.

Each record's content hash is SHA-256 over a versioned, length-prefixed encoding of its
fields; PostgreSQL chains them (`hash = SHA-256(prev_hash || content_hash)`, see
`infra/postgres/0002_audit.sql`) and keeps a head (last seq and hash) so a cut-off tail shows.
Everything above `verify_store` is pure; `AuditWriter` appends through the store's
`append_audit` (the `AuditAppender` protocol), coalescing concurrent callers (`GroupCommit`).
Records never hold a PAN: callers put tokens in them.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, NamedTuple, Protocol

from ..errors import DatabaseUnavailable
from ..group_commit import GroupCommit
from ..store import AUDIT_TEXT_COLUMNS, AuditColumns

__all__ = [
    "FORMAT_VERSION",
    "AuditAppender",
    "AuditColumns",
    "GENESIS_HASH",
    "TOKEN_SEPARATOR",
    "AuditEvent",
    "AuditReceipt",
    "AuditSink",
    "AuditWriter",
    "PendingAudit",
    "AuditLogReader",
    "ChainVerifier",
    "VerifyReport",
    "audit_columns",
    "canonical",
    "chain_hash",
    "content_hash",
    "verify_chain",
    "verify_store",
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


@dataclass(frozen=True, slots=True)
class PendingAudit:
    """The audit record of a call whose token is not known yet: `event` names no token, and
    `with_token` completes it once the call has one (a new card's token is drawn in its chunk;
    a returning card gets the token it already has)."""

    event: AuditEvent

    def with_token(self, token: str) -> AuditEvent:
        # Spelled out: dataclasses.replace costs three times as much, once per Tokenize call.
        e = self.event
        return AuditEvent(e.identity, e.role, e.tenant, e.method, e.outcome, e.request_id,
                          e.peer, token, e.purpose, at=e.at, tokens=e.tokens)


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """Where the chain stood at a moment (the head's seq and hash), filed outside PostgreSQL
    and signed by a key no database role can use: a later rewrite of anything up to `seq`,
    re-chained or not, or a cut below it, contradicts it."""

    seq: int
    hash: bytes
    at: dt.datetime

    @property
    def name(self) -> str:
        """Its path under the checkpoint folder: zero-padded, so names sort by seq."""
        return f"{self.seq:020d}"

    @property
    def when(self) -> str:
        return self.at.astimezone(dt.UTC).isoformat(timespec="seconds")

    def message(self) -> bytes:
        """What the signature covers."""
        return (f"vaultline-audit-checkpoint:v1:{self.seq}:{self.hash.hex()}:"
                f"{_micros(self.at)}").encode("ascii")

    def fields(self, signature: str) -> dict[str, str]:
        return {"seq": str(self.seq), "hash": self.hash.hex(),
                "at": self.at.astimezone(dt.UTC).isoformat(), "signature": signature}

    @classmethod
    def from_fields(cls, fields: Mapping[str, Any]) -> tuple[Checkpoint, str]:
        """The checkpoint and its signature; ValueError if the record is malformed."""
        try:
            checkpoint = cls(int(fields["seq"]), bytes.fromhex(fields["hash"]),
                             dt.datetime.fromisoformat(fields["at"]))
            signature = fields["signature"]
        except (KeyError, TypeError, ValueError):
            raise ValueError("malformed audit checkpoint") from None
        if (checkpoint.seq < 1 or len(checkpoint.hash) != 32 or checkpoint.at.tzinfo is None
                or not isinstance(signature, str)):
            raise ValueError("malformed audit checkpoint")
        return checkpoint, signature


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
    checkpoints: int = 0  # checkpoints the chain was found to pass through


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
        self._checkpoints: dict[int, Checkpoint] = {}
        self.checkpoints_matched = 0

    @property
    def broken(self) -> bool:
        return self.first_broken_seq is not None

    def _break(self, seq: int, problem: str) -> bool:
        self.first_broken_seq = seq
        self.problem = problem
        return False

    def expect_checkpoints(self, checkpoints: Iterable[Checkpoint]) -> None:
        """Points the chain is known to have passed (filed outside PostgreSQL, signatures
        checked): a record whose chain hash differs from one was rewritten, or re-chained."""
        self._checkpoints = {c.seq: c for c in checkpoints}

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
        checkpoint = self._checkpoints.get(seq)
        if checkpoint is not None:
            if digest != checkpoint.hash:
                return self._break(seq, f"record {seq} contradicts the checkpoint filed at"
                                        f" {checkpoint.when}: the chain up to it was rewritten"
                                        " (records edited, removed or re-chained)")
            self.checkpoints_matched += 1
        self.last_seq, self.last_hash = seq, digest
        self.checked += 1
        return True

    def finish(self, head: tuple[int, bytes] | None) -> VerifyReport:
        """Compare the last record with the head (None: no head check, e.g. a range), and
        the chain's end with the last checkpoint."""
        beyond = [c for c in self._checkpoints.values() if c.seq > self.last_seq]
        if not self.broken and head is not None and beyond:
            latest = max(beyond, key=lambda c: c.seq)
            self._break(self.last_seq + 1, f"the chain ends at record {self.last_seq}, but"
                                           f" record {latest.seq} was checkpointed at"
                                           f" {latest.when}: records were cut off")
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
            checkpoints=self.checkpoints_matched,
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


PAGE_SIZE: Final = 5000


class AuditLogReader(Protocol):
    """What verification reads from the store (`Store` implements it)."""

    async def audit_head(self) -> tuple[int, bytes] | None: ...
    async def list_audit(self, after_seq: int, limit: int) -> Sequence[AuditRowLike]: ...


async def verify_store(
    store: AuditLogReader,
    *,
    checkpoints: Sequence[Checkpoint] = (),
    page_size: int = PAGE_SIZE,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[VerifyReport, tuple[int, bytes] | None]:
    """Stream audit_log from seq 1 in pages and verify it against the head and `checkpoints`
    (read before this is called: then none can lie beyond the head legitimately).

    The head is read first: records appended while this runs lie beyond it and are left for
    the next run. Memory stays at one page whatever the table size. Returns the report and
    the head it was checked against."""
    head = await store.audit_head()
    verifier = ChainVerifier()
    verifier.expect_checkpoints(checkpoints)
    if head is None:
        # Only a superuser can remove the head row; without it a cut tail cannot show.
        problem = "the audit head is missing (audit_head was emptied)"
        return VerifyReport(ok=False, checked=0, first_broken_seq=None, problem=problem), None
    head_seq = head[0]
    after = 0
    while after < head_seq:
        rows = await store.list_audit(after, min(page_size, head_seq - after))
        if not rows:
            break
        for row in rows:
            if not verifier.feed(row):
                return verifier.finish(head), head
        after = rows[-1]["seq"]
        if progress is not None:
            progress(verifier.checked, head_seq)
    return verifier.finish(head), head


# ---- the writer -----------------------------------------------------------------------------


class AuditSink(Protocol):
    """Where records go, durably, before `record` returns: `AuditWriter` (the gate writes
    through it; so do the service's coalesced Tokenize chunks, unless their records went in
    with the chunk's tokens, see `Store.insert_tokens`)."""

    async def record(self, events: Sequence[AuditEvent]) -> None: ...


def _column(event: AuditEvent, name: str) -> str:
    return TOKEN_SEPARATOR.join(event.tokens) if name == "tokens" else getattr(event, name)


def audit_columns(events: Sequence[AuditEvent]) -> AuditColumns:
    """Hash and transpose records for one append (`AuditWriter`, or a statement that appends
    them with its own writes, `Store.insert_tokens`)."""
    return AuditColumns(
        [e.at for e in events],
        tuple([_column(e, name) for e in events] for name in AUDIT_TEXT_COLUMNS),
        [content_hash(event) for event in events],
    )


class AuditAppender(Protocol):
    """What `AuditWriter` needs from the store (`Store.append_audit`)."""

    async def append_audit(
        self, records: AuditColumns, *, receipts: bool = True
    ) -> list[tuple[int, bytes]]: ...


class _Records(NamedTuple):
    """One caller's records, already hashed and transposed, and whether it wants receipts."""

    columns: AuditColumns
    wants_receipts: bool


def _size(records: _Records) -> int:
    return records.columns.size


class AuditWriter:
    """Appends records durably, coalescing concurrent calls into one round trip per batch.

    `record()` returns once its records are committed, so a call that reveals card data can
    answer only after its audit trail exists. Calls are never split across batches (one
    call's records commit together); a call's records are written even if the caller is
    cancelled meanwhile. Outages surface as `DatabaseUnavailable`. Two batches may be in
    flight; while one is, the next waits `busy_window` for company (see load/README.md for
    the measurements behind 8 ms); an idle writer never waits.
    """

    def __init__(
        self,
        store: AuditAppender,
        *,
        max_batch: int = 2000,
        max_in_flight: int = 2,
        busy_window: float = 0.008,
    ) -> None:
        self._store = store
        self._commit: GroupCommit[None, _Records, list[AuditReceipt]] = GroupCommit(
            self._append,
            max_batch=max_batch,
            max_in_flight=max_in_flight,
            size=_size,
            busy_window=busy_window,
            closed_error=DatabaseUnavailable,
        )

    async def record(self, events: Sequence[AuditEvent]) -> None:
        """Append `events` (in order, all in one transaction); returns once committed."""
        await self.append(events, receipts=False)

    async def append(
        self, events: Sequence[AuditEvent], *, receipts: bool = True
    ) -> list[AuditReceipt]:
        """`record`, also saying where each record landed in the chain."""
        if not events:
            return []
        # Hashed here, in the caller's task: spreads the CPU and keeps the batches short.
        return await self._commit.submit(None, _Records(audit_columns(events), receipts))

    async def _append(self, _key: None, batch: list[_Records]) -> list[list[AuditReceipt]]:
        # Receipts cost a row per record back over the wire: fetch them only if asked.
        wanted = any(records.wants_receipts for records in batch)
        rows = await self._store.append_audit(
            AuditColumns.concat([records.columns for records in batch]), receipts=wanted
        )
        receipts = [AuditReceipt(seq, digest) for seq, digest in rows]
        out: list[list[AuditReceipt]] = []
        offset = 0
        for records in batch:
            n = records.columns.size
            out.append(receipts[offset : offset + n])
            offset += n
        return out
