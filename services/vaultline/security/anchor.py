"""The audit chain's anchor outside PostgreSQL: signed checkpoints filed in OpenBao.

The chain alone proves nothing to whoever holds the database: they can rewrite records,
recompute every hash and move the head. So the tokenizer files, every `every_seconds` or
`every_records` appended records (whichever first), a `Checkpoint` (head seq, head hash, time)
signed by an OpenBao transit key no database role can use, under a KV path its policy lets
it create but never update or delete. `verify_anchored` reads the checkpoints first, checks
their signatures, then walks the chain: a record that differs from a checkpoint, or a chain
that ends before one, shows the rewrite. Records appended since the last checkpoint are only
as safe as the database until the next one.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

from ..errors import KeyServiceUnavailable
from ..vault import run_transit
from .audit import PAGE_SIZE, AuditLogReader, Checkpoint, VerifyReport, verify_store

__all__ = ["AuditCheckpointer", "CheckpointLedger", "read_checkpoints", "verify_anchored"]

log = logging.getLogger(__name__)


class CheckpointLedger(Protocol):
    """Where checkpoints are signed and filed (`vault.TransitClient`; blocking calls)."""

    def sign(self, message: bytes) -> str: ...
    def verify(self, message: bytes, signature: str) -> bool: ...
    def create_checkpoint(self, name: str, fields: Mapping[str, str]) -> None: ...
    def list_checkpoints(self) -> list[str]: ...
    def read_checkpoint(self, name: str) -> dict[str, Any]: ...


async def read_checkpoints(ledger: CheckpointLedger) -> tuple[list[Checkpoint], str]:
    """Every filed checkpoint whose signature holds, in seq order, and the first problem
    found ('' if none): a malformed record, a name that is not its seq, a bad signature."""
    names = sorted(await run_transit(ledger.list_checkpoints))
    good: list[Checkpoint] = []
    for name in names:
        try:
            checkpoint, signature = Checkpoint.from_fields(
                await run_transit(ledger.read_checkpoint, name))
        except ValueError:
            return good, f"checkpoint {name} is malformed"
        if checkpoint.name != name:
            return good, f"checkpoint {name} names another record ({checkpoint.seq})"
        if not await run_transit(ledger.verify, checkpoint.message(), signature):
            return good, f"checkpoint {name} does not carry the audit key's signature"
        good.append(checkpoint)
    return good, ""


async def verify_anchored(
    store: AuditLogReader,
    ledger: CheckpointLedger | None,
    *,
    page_size: int = PAGE_SIZE,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[VerifyReport, tuple[int, bytes] | None]:
    """`verify_store` against every checkpoint (none without a ledger)."""
    checkpoints: Sequence[Checkpoint] = ()
    if ledger is not None:
        checkpoints, problem = await read_checkpoints(ledger)
        if problem:
            return VerifyReport(ok=False, checked=0, first_broken_seq=None,
                                problem=problem), None
    return await verify_store(store, checkpoints=checkpoints, page_size=page_size,
                              progress=progress)


class AuditHead(Protocol):
    async def audit_head(self) -> tuple[int, bytes] | None: ...


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class AuditCheckpointer:
    """Files a checkpoint of the head every `every_seconds` or `every_records` records,
    whichever comes first, while the chain grows (an idle chain is not checkpointed again).
    Several tokenizers may run one each: a checkpoint is filed once per seq, by whichever
    gets there first."""

    def __init__(
        self,
        store: AuditHead,
        ledger: CheckpointLedger,
        *,
        every_seconds: float = 60.0,
        every_records: int = 1000,
        poll_seconds: float = 1.0,
        clock: Callable[[], dt.datetime] = _utcnow,
    ) -> None:
        self._store = store
        self._ledger = ledger
        self._every_seconds = every_seconds
        self._every_records = every_records
        self._poll = min(poll_seconds, every_seconds)
        self._clock = clock
        self._last_seq: int | None = None  # unknown until the ledger was asked
        self._last_at = clock()
        self.filed = 0

    async def checkpoint(self, head: tuple[int, bytes] | None = None) -> Checkpoint | None:
        """File a checkpoint of the head (read now unless given), unless it has one already."""
        if self._last_seq is None:
            names = await run_transit(self._ledger.list_checkpoints)
            self._last_seq = max((int(n) for n in names if n.isdigit()), default=0)
        if head is None:
            head = await self._store.audit_head()
        if head is None or head[0] <= self._last_seq:
            return None
        checkpoint = Checkpoint(head[0], bytes(head[1]), self._clock())
        signature = await run_transit(self._ledger.sign, checkpoint.message())
        try:
            await run_transit(self._ledger.create_checkpoint, checkpoint.name,
                              checkpoint.fields(signature))
        except KeyServiceUnavailable:
            # Filed meanwhile by another tokenizer (create-only path), or OpenBao is down:
            # either way the next tick tries the then-current head.
            self._last_seq = None
            raise
        self._last_seq, self._last_at = checkpoint.seq, checkpoint.at
        self.filed += 1
        return checkpoint

    async def run(self) -> None:
        """Until cancelled; OpenBao or PostgreSQL outages are logged and retried."""
        while True:
            await asyncio.sleep(self._poll)
            try:
                head = await self._store.audit_head()
                if head is None or (self._last_seq is not None and head[0] <= self._last_seq):
                    continue
                due = (self._last_seq is None
                       or head[0] - self._last_seq >= self._every_records
                       or (self._clock() - self._last_at).total_seconds() >= self._every_seconds)
                if due:
                    await self.checkpoint(head)
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - the chain goes on; the next tick retries
                log.warning("could not file an audit checkpoint; retrying", exc_info=True)
