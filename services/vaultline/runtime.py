"""Process-wide runtime settings for the long-running, allocation-heavy processes.

The tokenizer and `settle run` allocate tens of thousands of short-lived objects per chunk
(rows, records, messages), almost all freed by reference counting. With CPython's default
collector thresholds (700, 10, 10) the cyclic collector still ran ~1,100 times a second during a
BatchDetokenize stream, and every few seconds a full collection walked the whole heap (~36 ms
each): 13% of the tokenizer's CPU time, for garbage that reference counting had already freed.
Raising the first threshold lets the collector run only when container objects really pile up;
cyclic garbage is still collected, just in larger, rarer passes (see load/README.md).
"""

from __future__ import annotations

import asyncio
import gc
import logging
from collections.abc import Awaitable, Callable
from typing import Final, NoReturn

__all__ = ["GC_THRESHOLDS", "in_batches", "periodically", "tune_gc"]

# Collect the youngest generation after 50,000 net new container objects (default 700); the
# older generations keep their default ratios, so a full collection still happens regularly.
GC_THRESHOLDS: Final = (50_000, 10, 10)


def tune_gc() -> None:
    """Apply GC_THRESHOLDS to this process; call once at start-up of a server or bulk job."""
    gc.set_threshold(*GC_THRESHOLDS)


async def periodically(every_seconds: float, job: Callable[[], Awaitable[object]], what: str,
                       log: logging.Logger) -> NoReturn:
    """Run `job` every `every_seconds` until cancelled. A failure is logged (as `what`) and
    the next pass tries again: the background jobs (purges, sweeps, deadlines) never die."""
    while True:
        await asyncio.sleep(every_seconds)
        try:
            await job()
        except asyncio.CancelledError:
            raise
        except Exception:  # noqa: BLE001 - retried at the next pass; the log says why
            log.warning("%s failed; retrying at the next pass", what, exc_info=True)


async def in_batches(delete: Callable[[int], Awaitable[int]], batch: int) -> int:
    """Repeat `delete(batch)` until a batch comes back short; how many went in all (bounded
    deletes never hold long locks)."""
    total = 0
    while True:
        n = await delete(batch)
        total += n
        if n < batch:
            return total
