"""Retention: what the vault must not keep is deleted on a schedule (PCI DSS 3.2.1).

Expired tokens go with their ciphertext (until then they answer NOT_FOUND but still hold an
encrypted card), and Tokenize idempotency records (keyed hashes of request ids, the card's
fingerprint and the token) go once older than the retention window: a retry later than
that is a new request, and gets the card's token again. Each pass deletes in bounded
batches so it never holds long locks.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from collections.abc import Awaitable, Callable
from typing import NamedTuple, Protocol

__all__ = ["PurgeStore", "Purged", "Purger"]

log = logging.getLogger(__name__)


class PurgeStore(Protocol):
    """What the purge runs (`store.Store` implements it)."""

    async def purge_expired_tokens(self, limit: int = ...) -> int: ...
    async def purge_tokenize_requests(self, older_than: dt.timedelta, limit: int = ...) -> int: ...


class Purged(NamedTuple):
    tokens: int
    requests: int


class Purger:
    def __init__(
        self,
        store: PurgeStore,
        *,
        every_seconds: float = 300.0,
        request_retention: dt.timedelta = dt.timedelta(hours=24),
        batch: int = 10_000,
    ) -> None:
        self._store = store
        self._every = every_seconds
        self._retention = request_retention
        self._batch = batch

    async def purge_once(self) -> Purged:
        """Delete everything due now, batch by batch."""
        tokens = await self._in_batches(self._store.purge_expired_tokens)
        requests = await self._in_batches(
            lambda limit: self._store.purge_tokenize_requests(self._retention, limit))
        if tokens or requests:
            log.info("purged %d expired tokens and %d idempotency records", tokens, requests)
        return Purged(tokens, requests)

    async def _in_batches(self, delete: Callable[[int], Awaitable[int]]) -> int:
        """Repeat `delete(batch)` until a batch comes back short; how many went in all."""
        total = 0
        while True:
            n = await delete(self._batch)
            total += n
            if n < self._batch:
                return total

    async def run(self) -> None:
        """Until cancelled; an outage is logged and the next pass tries again."""
        while True:
            await asyncio.sleep(self._every)
            try:
                await self.purge_once()
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - retried at the next pass
                log.warning("retention purge failed; retrying at the next pass", exc_info=True)
