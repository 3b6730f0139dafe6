"""Retention: what the vault must not keep is deleted on a schedule (PCI DSS 3.2.1).

Expired tokens go with their ciphertext (until then they answer NOT_FOUND but still hold an
encrypted card), and Tokenize idempotency records (keyed hashes of request ids, the card's
fingerprint and the token) go once older than the retention window: a retry later than
that is a new request, and gets the card's token again. Each pass deletes in bounded
batches so it never holds long locks.
"""

from __future__ import annotations

import datetime as dt
import logging
from typing import NamedTuple, Protocol

from .runtime import in_batches, periodically

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
        tokens = await in_batches(self._store.purge_expired_tokens, self._batch)
        requests = await in_batches(
            lambda limit: self._store.purge_tokenize_requests(self._retention, limit),
            self._batch)
        if tokens or requests:
            log.info("purged %d expired tokens and %d idempotency records", tokens, requests)
        return Purged(tokens, requests)

    async def run(self) -> None:
        """Until cancelled; an outage is logged and the next pass tries again."""
        await periodically(self._every, self.purge_once, "retention purge", log)
