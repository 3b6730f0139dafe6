"""Dual control of settlement, enforced by the tokenizer: batches and the bulk reveals they allow.

A batch is created from rows (tokens, never card numbers), approved by a second settlement
identity naming the SHA-256 of its rows, and run by its creator (or an identity the policy
lets run batches), never by its approver. Only then may `BatchDetokenize` reveal cards, and
only the batch's rows: `check_reveal` refuses a chunk unless the batch is running under the
caller, its approval carries the tokenizer's OpenBao signature, and every (reference, token)
of the chunk is a row of it.

Who may write what is enforced three times: here (for clear answers), by PostgreSQL (the
application role changes batch state only through `settlement_*` functions that check the
state machine and dual control again, 0010_settlement_dual_control.sql), and by OpenBao (an
approval written by anyone but the tokenizer has no valid signature, and no run starts or
reveals without one). Every call is audited by the gRPC edge.

Unary Detokenize's daily budget (`DailyRevealBudget`) lives here too: the other half of
"bulk reveals only under dual control".
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import secrets
import uuid
from collections.abc import AsyncIterable, AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any, Final, Protocol

import asyncpg

from .batches import (
    BATCH_ID,
    amount_problem,
    approval_message,
    auth_code_problem,
    currency_problem,
    reference_problem,
    token_problem,
)
from .card import has_digit_run
from .errors import (
    BatchNotFound,
    BatchStateConflict,
    DailyBudgetExceeded,
    DualControlRefused,
    FieldViolation,
    InvalidInput,
    InvalidPageToken,
)
from .security.access import Grant
from .store import Store
from .vault import run_transit

__all__ = [
    "ApprovalSigner",
    "BatchHeader",
    "BatchService",
    "DailyRevealBudget",
    "RowIn",
]

log = logging.getLogger(__name__)

LEASE: Final = dt.timedelta(seconds=30)
MAX_BATCH_ROWS: Final = 5_000_000
MAX_SUMMARY_BYTES: Final = 64 * 1024
CREATE_TIMEOUT_S: Final = 600.0  # the longest a CreateBatch stream may hold its transaction
_SHA256_HEX: Final = frozenset("0123456789abcdef")
_VERIFIED_CACHE: Final = 1024


class ApprovalSigner(Protocol):
    """Signs and checks approvals with a key only the tokenizer holds (`vault.TransitClient`;
    blocking calls)."""

    def sign(self, message: bytes) -> str: ...
    def verify(self, message: bytes, signature: str) -> bool: ...


@dataclass(frozen=True, slots=True)
class BatchHeader:
    tenant: str
    input_name: str
    input_sha256: str


RowIn = tuple[int, str, str, int, str, str]
"""(line, reference, token, amount_minor, currency, auth_code) as a client sent it."""


def _bad(reason: str, field: str, description: str) -> InvalidInput:
    return InvalidInput(reason, (FieldViolation(field, description),))


def validate_batch_id(batch_id: str) -> str:
    if not BATCH_ID.match(batch_id):
        raise _bad("INVALID_BATCH_ID", "batch_id", "must be sb_ and 10 lower-case hex digits")
    return batch_id


def _validate_sha256(value: str, field: str) -> str:
    if len(value) != 64 or not set(value) <= _SHA256_HEX:
        raise _bad("INVALID_SHA256", field, "must be 64 lower-case hex digits")
    return value


def validate_header(tenant: str, input_name: str, input_sha256: str) -> BatchHeader:
    if len(input_name) > 200 or not input_name.isprintable():
        raise _bad("INVALID_INPUT_NAME", "input_name", "at most 200 printable characters")
    if has_digit_run(input_name):
        raise _bad("INVALID_INPUT_NAME", "input_name", "must not hold a card number")
    return BatchHeader(tenant, input_name, _validate_sha256(input_sha256, "input_sha256"))


async def checked_rows(rows: AsyncIterable[Sequence[RowIn]]) -> AsyncIterator[RowIn]:
    """The rows of a CreateBatch stream, each checked as `settle create` checks a file's
    (`batches`), lines strictly increasing; raising ends the stream and the batch with it."""
    last_line = 0
    count = 0
    async for message in rows:
        for i, (line, reference, token, amount, currency, auth_code) in enumerate(message):
            where = f"rows[{i}]."
            if line <= last_line:
                raise _bad("INVALID_ROW", where + "line", "lines must be strictly increasing")
            last_line = line
            for field, problem in (
                ("reference", reference_problem(reference)),
                ("amount_minor", amount_problem(amount)),
                ("currency", currency_problem(currency)),
                ("auth_code", auth_code_problem(auth_code)),
            ):
                if problem is not None:
                    raise _bad("INVALID_ROW", where + field, f"line {line}: {problem}")
            canonical, problem = token_problem(token)
            if problem is not None:
                raise _bad("INVALID_ROW", where + "token", f"line {line}: {problem}")
            count += 1
            if count > MAX_BATCH_ROWS:
                raise _bad("BATCH_TOO_LARGE", "rows", f"at most {MAX_BATCH_ROWS} rows a batch")
            yield line, reference, canonical, amount, currency, auth_code
    if count == 0:
        raise _bad("EMPTY_BATCH", "rows", "a batch needs at least one row")


def new_batch_id() -> str:
    # 10 hex digits: never a run of 12 digits, so the id (the audited purpose of its reveals)
    # is never mistaken for a card number.
    return "sb_" + secrets.token_hex(5)


class BatchService:
    def __init__(self, store: Store, signer: ApprovalSigner, *, lease: dt.timedelta = LEASE
                 ) -> None:
        self._store = store
        self._signer = signer
        self._lease = lease
        self._verified: dict[tuple[str, str], bool] = {}

    # ---- reading ------------------------------------------------------------------------

    async def get(self, grant: Grant, batch_id: str) -> Any:
        """The batch, if the caller's grant covers its tenant (else as if it did not exist)."""
        row = await self._store.find_settlement_batch(validate_batch_id(batch_id))
        if row is None or not grant.allows_tenant(row["tenant"]):
            raise BatchNotFound()
        return row

    async def page(self, tenant: str, size: int, page_token: str) -> tuple[list[Any], str]:
        before = _parse_cursor(page_token) if page_token else None
        rows = await self._store.list_settlement_batches(tenant, size, before)
        token = ""
        if len(rows) == size:
            last = rows[-1]
            token = f"{int(last['created_at'].timestamp() * 1_000_000)}.{last['id']}"
        return rows, token

    async def rows(self, grant: Grant, batch_id: str, after_line: int, size: int) -> list[Any]:
        await self.get(grant, batch_id)
        return await self._store.settlement_rows_after(batch_id, max(after_line, 0), size)

    # ---- state changes ------------------------------------------------------------------

    async def create(self, grant: Grant, header: BatchHeader,
                     rows: AsyncIterable[Sequence[RowIn]]) -> Any:
        checked = checked_rows(rows)
        for _ in range(3):
            try:
                return await self._store.create_settlement_batch(
                    new_batch_id(), header.tenant, grant.uri, header.input_sha256,
                    header.input_name, checked, copy_timeout=CREATE_TIMEOUT_S)
            except asyncpg.UniqueViolationError as exc:
                if exc.constraint_name == "settlement_batches_pkey":
                    continue  # the id is taken (before any row was read): another one
                raise _bad("DUPLICATE_REFERENCE", "rows",
                           "two rows have the same reference") from None
        raise BatchStateConflict("BATCH_ID_EXHAUSTED", "could not allocate a batch id")

    async def approve(self, grant: Grant, batch_id: str, rows_sha256: str) -> Any:
        batch = await self.get(grant, batch_id)
        _validate_sha256(rows_sha256, "rows_sha256")
        if batch["created_by"] == grant.uri:
            raise DualControlRefused(
                "OWN_BATCH", "the identity that created a batch cannot approve it")
        if batch["state"] != "created" or batch["rows_sha256"] is None:
            raise BatchStateConflict(
                "BATCH_NOT_AWAITING_APPROVAL", f"the batch is {batch['state']}, not awaiting"
                " approval")
        if rows_sha256 != batch["rows_sha256"]:
            raise _bad("ROWS_DIGEST_MISMATCH", "rows_sha256",
                       "is not the digest of this batch's rows: review the batch again")
        message = approval_message(batch_id, batch["tenant"], batch["created_by"], grant.uri,
                                   rows_sha256, batch["row_count"])
        signature = await run_transit(self._signer.sign, message)
        try:
            await self._store.approve_settlement_batch(batch_id, grant.uri, rows_sha256,
                                                       signature)
        except asyncpg.ObjectNotInPrerequisiteStateError:
            raise BatchStateConflict("BATCH_NOT_AWAITING_APPROVAL",
                                     "the batch changed meanwhile") from None
        except asyncpg.DataError:
            raise _bad("ROWS_DIGEST_MISMATCH", "rows_sha256",
                       "the stored rows changed: review the batch again") from None
        return await self.get(grant, batch_id)

    async def start_run(self, grant: Grant, batch_id: str, host: str, pid: int,
                        take_over: str) -> Any:
        batch = await self.get(grant, batch_id)
        self._may_run(grant, batch)
        if not await self._approval_holds(batch):
            raise DualControlRefused("APPROVAL_NOT_SIGNED",
                                     "the batch's approval does not carry the tokenizer's"
                                     " signature; approve it again")
        if not await self._store.settlement_rows_intact(batch_id, batch["rows_sha256"]):
            log.error("settlement batch %s: its rows changed after approval", batch_id)
            raise DualControlRefused("ROWS_CHANGED",
                                     "the batch's rows changed after its approval")
        run_id = str(uuid.uuid4())
        if not await self._store.start_settlement_run(
                batch_id, run_id, grant.uri, host[:200], pid, self._lease,
                _uuid_or_none(take_over, "take_over_run_id")):
            current = await self.get(grant, batch_id)
            if current["state"] == "done":
                raise BatchStateConflict("BATCH_DONE", "the batch is already done")
            raise BatchStateConflict(
                "BATCH_RUN_LEASED", f"the batch is being run by {current['run_by']} on"
                f" {current['run_host']} (pid {current['run_pid']}); retry after its lease"
                " ends")
        return await self.get(grant, batch_id)

    async def renew(self, grant: Grant, batch_id: str, run_id: str) -> dt.datetime:
        await self.get(grant, batch_id)
        until = await self._store.renew_settlement_run(
            batch_id, _run_id(run_id), grant.uri, self._lease)
        if until is None:
            raise BatchStateConflict("RUN_NOT_HELD", "the caller does not hold this run")
        return until

    async def finish(self, grant: Grant, batch_id: str, run_id: str, summary_json: str
                     ) -> Any:
        await self.get(grant, batch_id)
        if len(summary_json.encode()) > MAX_SUMMARY_BYTES:
            raise _bad("INVALID_SUMMARY", "summary_json", "at most 64 KiB")
        try:
            summary = json.loads(summary_json)
        except ValueError:
            summary = None
        if not isinstance(summary, dict):
            raise _bad("INVALID_SUMMARY", "summary_json", "must be a JSON object")
        if not await self._store.finish_settlement_run(
                batch_id, _run_id(run_id), grant.uri, json.dumps(summary)):
            raise BatchStateConflict("RUN_NOT_HELD", "the caller does not hold this run")
        return await self.get(grant, batch_id)

    async def abandon(self, grant: Grant, batch_id: str, run_id: str) -> None:
        await self.get(grant, batch_id)
        if not await self._store.abandon_settlement_run(batch_id, _run_id(run_id), grant.uri):
            raise BatchStateConflict("RUN_NOT_HELD", "the caller does not hold this run")

    # ---- reveals ------------------------------------------------------------------------

    async def check_reveal(self, grant: Grant, tenant: str, batch_id: str,
                           references: Sequence[str], tokens: Sequence[str]) -> None:
        """Refuse a BatchDetokenize chunk unless dual control allows every item of it."""
        validate_batch_id(batch_id)
        if len(set(references)) != len(references):
            raise _bad("DUPLICATE_REFERENCE", "items", "a chunk names each row once")
        row = await self._store.settlement_reveal_check(batch_id, references, tokens)
        if row is None or not grant.allows_tenant(row["tenant"]):
            raise BatchNotFound()
        if row["state"] != "running" or row["run_by"] != grant.uri:
            raise DualControlRefused("RUN_NOT_HELD",
                                     "the batch is not running under this identity")
        self._may_run(grant, row)
        if row["tenant"] != (tenant or "default") or row["matched"] != len(tokens):
            raise DualControlRefused("NOT_IN_BATCH", "a token of the chunk is not a row of"
                                     " the batch")
        if not await self._approval_holds(row):
            raise DualControlRefused("APPROVAL_NOT_SIGNED",
                                     "the batch's approval does not carry the tokenizer's"
                                     " signature")

    @staticmethod
    def _may_run(grant: Grant, batch: Any) -> None:
        if batch["state"] == "done":
            raise BatchStateConflict("BATCH_DONE", "the batch is already done")
        if batch["state"] == "created":
            raise BatchStateConflict("BATCH_NOT_APPROVED", "the batch needs the approval of a"
                                     " second settlement identity first")
        if batch["approved_by"] == grant.uri:
            raise DualControlRefused("APPROVER_CANNOT_RUN",
                                     "the identity that approved a batch cannot run it")
        if batch["created_by"] != grant.uri and not grant.runs_batches:
            raise DualControlRefused("NOT_CREATOR_OR_RUNNER", "only the batch's creator or a"
                                     " configured runner may run it")

    async def _approval_holds(self, batch: Any) -> bool:
        signature = batch["approval_signature"] or ""
        message = approval_message(
            batch["id"], batch["tenant"], batch["created_by"],
            batch["approved_by"] or "", batch["rows_sha256"] or "", batch["row_count"])
        key = (message.decode(), signature)
        known = self._verified.get(key)
        if known is None:
            known = bool(signature) and await run_transit(self._signer.verify, message,
                                                          signature)
            if not known:
                log.error("settlement batch %s: its approval is not signed by this tokenizer's"
                          " key (written outside the SettlementService?)", batch["id"])
            if len(self._verified) >= _VERIFIED_CACHE:
                self._verified.clear()
            self._verified[key] = known
        return known


def _run_id(value: str) -> str:
    run_id = _uuid_or_none(value, "run_id")
    if run_id is None:
        raise _bad("INVALID_RUN_ID", "run_id", "must be the run id StartRun answered")
    return run_id


def _uuid_or_none(value: str, field: str) -> str | None:
    if not value:
        return None
    try:
        return str(uuid.UUID(value))
    except ValueError:
        raise _bad("INVALID_RUN_ID", field, "must be a run id StartRun answered") from None


def _parse_cursor(token: str) -> tuple[dt.datetime, str]:
    micros, _, batch_id = token.partition(".")
    if not (micros.isascii() and micros.isdigit() and len(micros) <= 18
            and BATCH_ID.match(batch_id)):
        raise InvalidPageToken()
    return dt.datetime.fromtimestamp(int(micros) / 1_000_000, dt.UTC), batch_id


class DailyRevealBudget:
    """Unary Detokenize calls per identity and UTC day, counted in PostgreSQL (so restarts
    and replicas share it). Bulk reveals go through settlement batches instead."""

    def __init__(self, store: Store) -> None:
        self._store = store

    async def spend(self, grant: Grant) -> None:
        if grant.daily_reveals is None:
            return
        if not await self._store.spend_daily_reveal(grant.uri, grant.daily_reveals):
            raise DailyBudgetExceeded()

