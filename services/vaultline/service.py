"""Domain operations of the vault: tokenize, look up, detokenize, delete — single and in bulk.

Composes the pure cores (card, tokens, crypto) with the keyring and the store (through
`TokenStore`, the queries it uses). Speaks domain types only; `api/` translates to and from
protobuf. Bulk operations cost one database round trip per chunk; concurrent single-card calls
are coalesced into such chunks (`GroupCommit`), so the unary path rides on the bulk one — audit
records included: a caller hands `tokenize` a `PendingAudit` (its record, but for the token),
and a chunk's records are appended together, with or right after its tokens and before any of
its callers is answered.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

from .card import (
    UNKNOWN_EXPIRY,
    Card,
    CardBrand,
    CardError,
    Expiry,
    Pan,
    has_digit_run,
    security_code_ok,
    validate_cardholder_name,
)
from .commit_delay import CommitDelay
from .crypto import (
    CIPHERTEXT_VERSION,
    OpenFailed,
    associated_data_for,
    associated_data_prefix,
)
from .errors import (
    DatabaseUnavailable,
    FieldViolation,
    InvalidInput,
    RequestIdReused,
    SecurityCodeNotFound,
    TokenNotFound,
    TokenSpaceExhausted,
    VaultlineError,
)
from .group_commit import GroupCommit
from .keyring import Keyring
from .security.audit import AuditSink, PendingAudit, audit_columns
from .security_codes import SecurityCodes
from .store import REVEAL_COLUMNS, AuditColumns, NewTokens
from .tokens import SHOWS_BIN_FROM, TokenError, TokenFormat, new_tokens, parse_token

log = logging.getLogger(__name__)

DEFAULT_TENANT = "default"
_TENANT = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}\Z")
_REQUEST_ID = re.compile(r"[\x21-\x7e]{1,128}\Z")
MAX_TTL = dt.timedelta(days=3660)
MAX_PURPOSE = 200
# Items in one BatchTokenize / BatchDetokenize chunk: a chunk's answer stays a few MB.
MAX_CHUNK_ITEMS = 20_000
# Fresh candidate tokens drawn for a card before giving up; only the short keep-BIN formats
# can realistically run out.
TOKEN_ATTEMPTS = 8


class DataCorrupted(VaultlineError):
    """A stored ciphertext failed authentication: tampering, a moved row, or a lost key."""

    reason = "CIPHERTEXT_INTEGRITY"
    message = "stored card data failed its integrity check"


@dataclass(frozen=True, slots=True)
class CardInput:
    """A card as a caller sent it, not yet validated. Never printed with its number."""

    pan: str
    expiry_month: int
    expiry_year: int
    cardholder_name: str = ""

    def __repr__(self) -> str:
        return "CardInput(<redacted>)"

    __str__ = __repr__


# Result types are NamedTuples, not frozen dataclasses: equally immutable, and several times
# cheaper to build, which counts on the BatchDetokenize path (load/README.md).


class TokenRecord(NamedTuple):
    """Everything about a token that is safe to show outside the card data environment."""

    token: str
    tenant: str
    brand: CardBrand
    bin: str
    last4: str
    expiry_month: int
    expiry_year: int
    format: TokenFormat
    create_time: dt.datetime
    expire_time: dt.datetime | None


class IssuedToken(NamedTuple):
    """The token a card has, and whether this call created it."""

    record: TokenRecord
    created: bool


class Revealed(NamedTuple):
    card: Card
    record: TokenRecord


# Dict lookups: several times cheaper than calling the enum, on the per-card path.
_BRANDS = {b.value: b for b in CardBrand}
_FORMATS = {f.value: f for f in TokenFormat}
_KEY_ID = REVEAL_COLUMNS.index("data_key_id")
_new_tuple = tuple.__new__  # a NamedTuple from a full tuple, without the generated __new__


def _record(tenant: str, row: Any) -> TokenRecord:
    return TokenRecord(  # positional: keywords double the cost on this per-card path
        row["token"],
        tenant,
        _BRANDS[row["brand"]],
        row["bin"],
        row["last4"],
        row["expiry_month"],
        row["expiry_year"],
        _FORMATS[row["format"]],
        row["created_at"],
        row["expires_at"],
    )


# ---- input validation (pure) -----------------------------------------------------------


def _invalid(reason: str, field: str, description: str) -> InvalidInput:
    return InvalidInput(reason, (FieldViolation(field, description),))


def validate_tenant(tenant: str) -> str:
    if not tenant:
        return DEFAULT_TENANT
    # A card number is all digits, so it would pass the pattern: refuse it explicitly, or a
    # PAN pasted into the tenant field would travel into audit records and logs as a name.
    if not _TENANT.match(tenant) or has_digit_run(tenant):
        raise _invalid(
            "INVALID_TENANT", "tenant", "must be 1-63 of a-z, 0-9, '_' or '-', starting alnum"
        )
    return tenant


def validate_request_id(request_id: str) -> str:
    if not _REQUEST_ID.match(request_id):
        raise _invalid("INVALID_REQUEST_ID", "request_id", "must be 1-128 printable ASCII")
    return request_id


_DESCOPE_TABLE = re.compile(r"[A-Za-z_][A-Za-z0-9_$]{0,62}\.[A-Za-z_][A-Za-z0-9_$]{0,62}\Z")
_RUN_ID = re.compile(r"[0-9a-f]{16,64}\Z")
_MAX_COUNT = 10**9


def describe_descope_chunk(run_id: str, table: str, chunk: int,
                           counts: Sequence[tuple[str, int]]) -> str:
    """The audit purpose of one de-scoping chunk: the run, the table, the chunk and its
    counts. Refused when the table is not schema.table or could hold a card number (a digit
    run), or a count is out of range."""
    if not _RUN_ID.match(run_id):
        raise _invalid("INVALID_RUN_ID", "run_id", "must be 16 to 64 lower-case hex digits")
    if not _DESCOPE_TABLE.match(table) or has_digit_run(table):
        raise _invalid("INVALID_TABLE", "table", "must be schema.table")
    if not 1 <= chunk <= _MAX_COUNT:
        raise _invalid("INVALID_COUNT", "chunk", "must be from 1")
    for name, value in counts:
        if not 0 <= value <= _MAX_COUNT:
            raise _invalid("INVALID_COUNT", name, "must be a count")
    # Words between the numbers, so no two of them read as one digit run; the run's first
    # eight hex digits name it (all of it may be digits).
    described = ", ".join(f"{name} {value}" for name, value in counts)
    return f"descope run {run_id[:8]} {table} chunk {chunk}: {described}"


def validate_purpose(purpose: str) -> str:
    """The purpose, stripped; refused when empty, too long, unprintable or holding a run of
    12 digits in any spelling. The length is checked first, so a huge purpose costs nothing."""
    if len(purpose) > 4 * MAX_PURPOSE:  # even all blanks: no scanning of megabytes
        raise _invalid(
            "INVALID_PURPOSE", "purpose", "must be printable, at most 200 characters, no PAN"
        )
    purpose = purpose.strip()
    if not purpose:
        raise _invalid("PURPOSE_REQUIRED", "purpose", "a purpose is required to detokenize")
    if (
        len(purpose) > MAX_PURPOSE
        or not purpose.isprintable()
        or has_digit_run(purpose)  # a card number pasted into the purpose, however spelled
    ):
        raise _invalid(
            "INVALID_PURPOSE", "purpose", "must be printable, at most 200 characters, no PAN"
        )
    return purpose


def ttl_from_wire(seconds: int, nanos: int) -> dt.timedelta:
    """A protobuf Duration as a TTL, refused (never an overflow) when out of range."""
    if not (0 <= seconds <= MAX_TTL.total_seconds() and 0 <= nanos < 1_000_000_000):
        raise _invalid("INVALID_TTL", "ttl", "must be positive and at most 10 years")
    return dt.timedelta(seconds=seconds, microseconds=nanos // 1000)


def validate_chunk(items: int) -> None:
    if items > MAX_CHUNK_ITEMS:
        raise _invalid("CHUNK_TOO_LARGE", "items", "at most 20,000 items per chunk")


def validate_ttl(ttl: dt.timedelta | None) -> dt.timedelta | None:
    if ttl is None:
        return None
    if ttl <= dt.timedelta(0) or ttl > MAX_TTL:
        raise _invalid("INVALID_TTL", "ttl", "must be positive and at most 10 years")
    return ttl


def validate_format(value: int) -> TokenFormat:
    if value == 0:
        return TokenFormat.NUMERIC
    try:
        return TokenFormat(value)
    except ValueError:
        raise _invalid("INVALID_TOKEN_FORMAT", "format", "unknown token format") from None


def validate_token(token: str) -> str:
    try:
        return parse_token(token)[0]
    except TokenError as exc:
        raise _invalid(exc.reason, "token", exc.description) from None


def check_format_for(card: Card, token_format: TokenFormat) -> None:
    if token_format == TokenFormat.NUMERIC_KEEP_BIN and len(card.pan) < SHOWS_BIN_FROM:
        raise _invalid("KEEP_BIN_NOT_ALLOWED", "format",
                       "a token keeps the BIN only of a card number of 16 or more digits")


def parse_card(raw: CardInput, today: dt.date, *, expiry_unknown: bool = False) -> Card:
    """A validated card; with `expiry_unknown` (a card found in stored data) the expiry must be
    unset and is recorded as unknown."""
    try:
        pan = Pan.parse(raw.pan)
        if expiry_unknown:
            if raw.expiry_month or raw.expiry_year:
                raise _invalid("INVALID_EXPIRY", "card.expiry_month",
                               "must be unset in a chunk whose expiry is unknown")
            expiry = UNKNOWN_EXPIRY
        else:
            expiry = Expiry.parse(raw.expiry_month, raw.expiry_year, today=today)
        name = validate_cardholder_name(raw.cardholder_name)
    except CardError as exc:
        raise _invalid(exc.reason, exc.field, exc.description) from None
    return Card(pan, expiry, name)


def validate_security_code(code: str, brand: CardBrand) -> str:
    """`code` if a card of `brand` can have it; the error never echoes it."""
    if not security_code_ok(code, brand):
        raise _invalid("INVALID_SECURITY_CODE", "security_code",
                       "must be 3 digits (4 for American Express)")
    return code


class _SingleCall(NamedTuple):
    card: Card
    audit: PendingAudit | None


# ---- the service ---------------------------------------------------------------------------


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


@dataclass(slots=True)
class _Pending:
    card: Card
    fingerprint: bytes
    indices: list[int]


def _first_insert_audit(
    audits: Sequence[PendingAudit | None], entries: list[_Pending], tokens: list[str]
) -> AuditColumns | None:
    """A chunk's records as they stand if every card is new (each gets its candidate token):
    they then go in with the tokens, in one statement (`Store.insert_tokens`)."""
    per_card = [""] * len(audits)
    for entry, token in zip(entries, tokens, strict=True):
        for i in entry.indices:
            per_card[i] = token
    events = [a.with_token(t) for a, t in zip(audits, per_card, strict=True) if a is not None]
    return audit_columns(events) if events else None


TokenizeGroup = tuple[str, TokenFormat, dt.timedelta | None]


class TokenStore(Protocol):
    """The queries the service runs (`store.Store` implements them)."""

    async def insert_tokens(
        self, tenant: str, fmt: int, expires_at: dt.datetime | None, rows: NewTokens,
        audit: AuditColumns | None = None,
    ) -> tuple[list[Any], list[Any], bool]: ...
    async def delete_expired_tokens(
        self, tenant: str, fmt: int, fingerprints: Sequence[bytes]
    ) -> int: ...
    async def update_token_cards(
        self, tenant: str, data_key_ids: Sequence[int], tokens: Sequence[str],
        expiry_months: Sequence[int], expiry_years: Sequence[int], ciphertexts: Sequence[bytes],
    ) -> list[Any]: ...
    async def find_live_tokens(self, tenant: str, tokens: Sequence[str]) -> list[Any]: ...
    async def find_live_token(self, tenant: str, token: str) -> Any | None: ...
    async def delete_token(self, tenant: str, token: str) -> bool: ...
    async def find_tokenize_request(
        self, tenant: str, caller: str, request_key: bytes
    ) -> Any | None: ...
    async def insert_tokenize_request(
        self, tenant: str, caller: str, request_key: bytes, fingerprint: bytes, token: str,
        created: bool,
    ) -> bool: ...


class TokenService:
    def __init__(
        self,
        store: TokenStore,
        keyring: Keyring,
        *,
        audit: AuditSink | None = None,
        clock: Callable[[], dt.datetime] = _utcnow,
        randbytes: Callable[[int], bytes] = os.urandom,
        commit_delay: CommitDelay | None = None,
        security_codes: SecurityCodes | None = None,
    ) -> None:
        """`commit_delay`: when the coalesced single calls wait for company after a chunk
        (see `vaultline.commit_delay`); None: never. `security_codes`: where Tokenize holds a
        card's security code until authorisation; None: a security code is refused."""
        self._store = store
        self._codes = security_codes
        self._keyring = keyring
        self._audit = audit
        self._clock = clock
        self._randbytes = randbytes
        # One chunk per group in flight; calls arriving meanwhile leave together as the next.
        self._coalescer: GroupCommit[
            TokenizeGroup, _SingleCall, IssuedToken | VaultlineError
        ] = GroupCommit(
            self._tokenize_calls,
            after_batch=None if commit_delay is None else commit_delay.after_chunk,
            skip_cancelled=True,
            closed_error=DatabaseUnavailable,
        )

    # -- tokenize ------------------------------------------------------------------------

    async def tokenize(
        self,
        tenant: str,
        card: CardInput,
        fmt: int = 0,
        *,
        request_id: str = "",
        caller: str = "",
        ttl: dt.timedelta | None = None,
        audit: PendingAudit | None = None,
        security_code: str = "",
    ) -> IssuedToken:
        """Tokenize one card. With `audit`, the call's audit record (naming the token it gets)
        is durable before this returns; if it cannot be written, this raises.

        A `request_id` makes a retry answer with the first result, for the same `caller`
        (its identity) only: another caller's request ids are not visible, so replaying one
        with a guessed card number confirms nothing.

        A `security_code` is held for the token until redeemed or expired (`SecurityCodes`);
        a retry holds it again, so a first attempt that failed after its token was issued
        loses nothing."""
        if audit is not None and self._audit is None:
            raise TypeError("TokenService was built without an audit recorder")
        tenant = validate_tenant(tenant)
        token_format = validate_format(fmt)
        ttl = validate_ttl(ttl)
        parsed = parse_card(card, self._clock().date())
        check_format_for(parsed, token_format)
        if security_code:
            if self._codes is None:
                raise _invalid("SECURITY_CODE_NOT_ACCEPTED", "security_code",
                               "this server holds no security codes")
            validate_security_code(security_code, parsed.pan.brand)
        group = (tenant, token_format, ttl)
        if not request_id:
            # The common path: the chunk appends this call's audit record with its neighbours'.
            result = self._unwrap(
                await self._coalescer.submit(group, _SingleCall(parsed, audit))
            )
        else:
            request_id = validate_request_id(request_id)
            result = await self._tokenize_once(tenant, caller, request_id, group, parsed)
            if audit is not None and self._audit is not None:
                await self._audit.record([audit.with_token(result.record.token)])
        if security_code and self._codes is not None:
            await self._codes.hold(tenant, result.record.token, security_code)
        return result

    async def redeem_security_code(self, tenant: str, token: str) -> str:
        """The security code held for `token`, once (see `SecurityCodes.redeem`)."""
        tenant = validate_tenant(tenant)
        token = validate_token(token)
        if self._codes is None:
            raise SecurityCodeNotFound()
        return await self._codes.redeem(tenant, token)

    async def _tokenize_once(
        self, tenant: str, caller: str, request_id: str, group: TokenizeGroup, card: Card
    ) -> IssuedToken:
        """A retried `request_id` answers with its first result (or REQUEST_ID_REUSED). It is
        stored only as a keyed hash bound to the caller (`FingerprintKey.request_key`)."""
        keys = await self._keyring.fingerprint_key(tenant)
        fingerprint = keys.fingerprint(card.pan.reveal())
        request_key = keys.request_key(caller, request_id)
        earlier = await self._replay(tenant, caller, request_key, fingerprint)
        if earlier is not None:
            return earlier
        result = self._unwrap(await self._coalescer.submit(group, _SingleCall(card, None)))
        if await self._store.insert_tokenize_request(
            tenant, caller, request_key, fingerprint, result.record.token, result.created
        ):
            return result
        # A concurrent retry of the same request recorded its result first: answer with that.
        earlier = await self._replay(tenant, caller, request_key, fingerprint)
        return earlier if earlier is not None else result

    async def _replay(
        self, tenant: str, caller: str, request_key: bytes, fingerprint: bytes
    ) -> IssuedToken | None:
        row = await self._store.find_tokenize_request(tenant, caller, request_key)
        if row is None:
            return None
        if bytes(row["fingerprint"]) != fingerprint:
            raise RequestIdReused()
        return IssuedToken(await self.get_token(tenant, row["token"]), row["created"])

    @staticmethod
    def _unwrap(result: IssuedToken | VaultlineError) -> IssuedToken:
        if isinstance(result, VaultlineError):
            raise result
        return result

    async def tokenize_batch(
        self,
        tenant: str,
        fmt: int,
        ttl: dt.timedelta | None,
        cards: Sequence[CardInput],
        *,
        expiry_unknown: bool = False,
    ) -> list[IssuedToken | VaultlineError]:
        """Tokenize a chunk; each item answers with its result or its own error, in order.
        With `expiry_unknown`, the cards come without an expiry (de-scoping stored data).

        Raises (for the whole chunk) only on a bad tenant/format/TTL/size or an outage.
        """
        validate_chunk(len(cards))
        tenant = validate_tenant(tenant)
        token_format = validate_format(fmt)
        ttl = validate_ttl(ttl)
        today = self._clock().date()
        results: list[IssuedToken | VaultlineError | None] = [None] * len(cards)
        parsed: list[tuple[int, Card]] = []
        for i, raw in enumerate(cards):
            try:
                card = parse_card(raw, today, expiry_unknown=expiry_unknown)
                check_format_for(card, token_format)
                parsed.append((i, card))
            except InvalidInput as exc:
                results[i] = exc
        if parsed:
            group = (tenant, token_format, ttl)
            outcomes, _ = await self._tokenize_group(group, [c for _, c in parsed])
            for (i, _), outcome in zip(parsed, outcomes, strict=True):
                results[i] = outcome
        return results  # type: ignore[return-value]

    async def _tokenize_calls(
        self, group: TokenizeGroup, calls: list[_SingleCall]
    ) -> list[IssuedToken | VaultlineError]:
        """A chunk of coalesced single calls: their tokens and their audit records.

        When every card is new (the common case), the records are appended in the statement
        that inserts the tokens: one round trip and one commit, and neither without the
        other. Otherwise they are appended once the returning cards' tokens are known. Either
        way in the chunk's task, so a caller that went away meanwhile still has its record;
        if they cannot be written, every caller of the chunk gets the failure (a retry then
        finds the same token, `created` false)."""
        audits = [call.audit for call in calls]
        results, audited = await self._tokenize_group(group, [call.card for call in calls], audits)
        if audited:  # every card was new: the records went in with the tokens
            return results
        records = [
            audit.with_token(result.record.token)
            for audit, result in zip(audits, results, strict=True)
            if audit is not None and type(result) is IssuedToken
        ]
        if records and self._audit is not None:
            await self._audit.record(records)
        return results

    async def _tokenize_group(
        self,
        group: TokenizeGroup,
        cards: list[Card],
        audits: Sequence[PendingAudit | None] | None = None,
    ) -> tuple[list[IssuedToken | VaultlineError], bool]:
        """Each card's token (or error), and whether the records of `audits` (one per card)
        were appended with them (the first insert took every card)."""
        tenant, token_format, ttl = group
        fingerprint_key = await self._keyring.fingerprint_key(tenant)
        pending: dict[bytes, _Pending] = {}
        for i, card in enumerate(cards):
            fp = fingerprint_key.fingerprint(card.pan.reveal())
            entry = pending.get(fp)
            if entry is None:
                pending[fp] = _Pending(card, fp, [i])
            else:
                entry.indices.append(i)
        results: list[IssuedToken | VaultlineError | None] = [None] * len(cards)
        expires_at = self._clock() + ttl if ttl else None

        def resolve(entry: _Pending, record: TokenRecord, created: bool) -> None:
            first, *rest = entry.indices
            results[first] = IssuedToken(record, created)
            for i in rest:
                results[i] = IssuedToken(record, False)

        audited = False
        for _ in range(TOKEN_ATTEMPTS):
            if not pending:
                break
            entries = list(pending.values())
            inserted, existing, audited = await self._insert(
                tenant, token_format, expires_at, entries, audits
            )
            audits = None  # a retry's chunk appends its records afterwards (_tokenize_calls)
            for row in inserted:
                resolve(pending.pop(bytes(row["fingerprint"])), _record(tenant, row), True)
            now = self._clock()
            expired: list[bytes] = []
            stale: list[_Pending] = []
            for row in existing:
                fp = bytes(row["fingerprint"])
                entry = pending[fp]
                if row["expires_at"] is not None and row["expires_at"] <= now:
                    expired.append(fp)  # a TTL token that lapsed: replace it with a new one
                elif (entry.card.expiry.year, entry.card.expiry.month) > (
                    row["expiry_year"],
                    row["expiry_month"],
                ):
                    stale.append(entry)  # the card was reissued: keep the token, new expiry
                else:
                    resolve(pending.pop(fp), _record(tenant, row), False)
            if expired:
                await self._store.delete_expired_tokens(tenant, int(token_format), expired)
            if stale:
                for row in await self._reseal(tenant, stale, existing):
                    resolve(pending.pop(bytes(row["fingerprint"])), _record(tenant, row), False)
        for entry in pending.values():
            for i in entry.indices:
                results[i] = TokenSpaceExhausted()
        return results, audited  # type: ignore[return-value]

    async def _insert(
        self,
        tenant: str,
        token_format: TokenFormat,
        expires_at: dt.datetime | None,
        entries: list[_Pending],
        audits: Sequence[PendingAudit | None] | None = None,
    ) -> tuple[list[Any], list[Any], bool]:
        """Insert candidate tokens; with `audits` (the chunk's first insert), their records
        go in with them when every card is new."""
        cards = [e.card for e in entries]
        tokens = new_tokens([c.pan for c in cards], token_format, self._randbytes)
        audit = None if audits is None else _first_insert_audit(audits, entries, tokens)
        key_ids, ciphertexts = await self._seal(tenant, tokens, cards)
        rows = NewTokens(
            fingerprints=[e.fingerprint for e in entries],
            tokens=tokens,
            brands=[int(c.pan.brand) for c in cards],
            # Metadata shows no more than a token may: no BIN of a short card number.
            bins=[c.pan.bin if len(c.pan) >= SHOWS_BIN_FROM else "" for c in cards],
            last4s=[c.pan.last4 for c in cards],
            expiry_months=[c.expiry.month for c in cards],
            expiry_years=[c.expiry.year for c in cards],
            data_key_ids=key_ids,
            ciphertexts=ciphertexts,
        )
        return await self._store.insert_tokens(tenant, int(token_format), expires_at, rows, audit)

    async def _seal(
        self, tenant: str, tokens: Sequence[str], cards: Sequence[Card]
    ) -> tuple[list[int], list[bytes]]:
        key_ids: list[int] = []
        ciphertexts: list[bytes] = []
        step = self._keyring.max_seal_count
        aad_prefix = associated_data_prefix(CIPHERTEXT_VERSION, tenant)
        for start in range(0, len(cards), step):
            part = range(start, min(start + step, len(cards)))
            key = await self._keyring.sealing_key_for(tenant, len(part))
            seal, key_id = key.seal, key.key_id
            for i in part:
                ciphertexts.append(
                    seal(
                        cards[i].to_plaintext(),
                        associated_data_for(aad_prefix, tokens[i], key_id),
                    )
                )
            key_ids.extend([key_id] * len(part))
        return key_ids, ciphertexts

    async def _reseal(self, tenant: str, stale: list[_Pending], existing: list[Any]) -> list[Any]:
        by_fp = {bytes(r["fingerprint"]): r["token"] for r in existing}
        tokens = [by_fp[e.fingerprint] for e in stale]
        cards = [e.card for e in stale]
        key_ids, ciphertexts = await self._seal(tenant, tokens, cards)
        return await self._store.update_token_cards(
            tenant,
            key_ids,
            tokens,
            [c.expiry.month for c in cards],
            [c.expiry.year for c in cards],
            ciphertexts,
        )

    # -- read, reveal, delete ------------------------------------------------------------

    async def get_token(self, tenant: str, token: str) -> TokenRecord:
        tenant = validate_tenant(tenant)
        row = await self._store.find_live_token(tenant, validate_token(token))
        if row is None:
            raise TokenNotFound()
        return _record(tenant, row)

    async def detokenize(self, tenant: str, token: str, purpose: str) -> Revealed:
        tenant = validate_tenant(tenant)
        validate_purpose(purpose)
        (result,) = await self._reveal(tenant, [validate_token(token)])
        if isinstance(result, VaultlineError):
            raise result
        return result

    async def detokenize_batch(
        self, tenant: str, purpose: str, tokens: Sequence[str]
    ) -> list[Revealed | VaultlineError]:
        """Reveal a chunk; each item answers with its card or its own error, in order."""
        validate_chunk(len(tokens))
        tenant = validate_tenant(tenant)
        validate_purpose(purpose)
        results: list[Revealed | VaultlineError | None] = [None] * len(tokens)
        valid: list[int] = []
        normalised: list[str] = []
        for i, raw in enumerate(tokens):
            try:
                normalised.append(validate_token(raw))
                valid.append(i)
            except InvalidInput as exc:
                results[i] = exc
        for i, outcome in zip(valid, await self._reveal(tenant, normalised), strict=True):
            results[i] = outcome
        return results  # type: ignore[return-value]

    async def _reveal(self, tenant: str, tokens: list[str]) -> list[Revealed | VaultlineError]:
        if not tokens:
            return []
        rows = await self._store.find_live_tokens(tenant, tokens)
        keys = await self._keyring.sealing_keys({row[_KEY_ID] for row in rows})
        out: list[Revealed | VaultlineError | None] = [None] * len(tokens)
        aad_prefix = associated_data_prefix(CIPHERTEXT_VERSION, tenant)
        # Unpacked positionally (store.REVEAL_COLUMNS), and the two tuples built without their
        # Python-level __new__: this loop runs once per revealed card.
        for n, brand, bin_, last4, month, year, fmt, created, expires, key_id, blob in rows:
            token = tokens[n - 1]
            key = keys.get(key_id)
            try:
                if key is None:
                    raise OpenFailed()
                plaintext = key.open(blob, associated_data_for(aad_prefix, token, key_id))
                out[n - 1] = _new_tuple(Revealed, (
                    Card.from_plaintext(plaintext),
                    _new_tuple(TokenRecord, (token, tenant, _BRANDS[brand], bin_, last4, month,
                                             year, _FORMATS[fmt], created, expires)),
                ))
            except (OpenFailed, ValueError):
                log.error("stored card data failed its integrity check (data key %d)", key_id)
                out[n - 1] = DataCorrupted()
        return [TokenNotFound() if o is None else o for o in out]

    async def delete_token(self, tenant: str, token: str) -> None:
        tenant = validate_tenant(tenant)
        if not await self._store.delete_token(tenant, validate_token(token)):
            raise TokenNotFound()
