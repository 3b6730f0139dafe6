"""Group commit: concurrent callers' items leave together, one round trip per batch (no I/O).

Callers `submit(key, item)` and await their own result. Per key (a group), at most
`max_in_flight` batches run at a time; items that arrive meanwhile queue and leave together as
the next batch, up to `max_batch` (counted by `size(item)`; an item is never split). An idle
group answers at once (a batch leaves after one loop turn); a busy one makes one round trip
per batch instead of one per call, and its batches grow with the load.

Two ways to wait for company, each only while callers are queued:

- `busy_window`: while another batch of the group is in flight and the queue holds less than
  `max_batch`, wait this long before taking the next batch (fewer, larger batches).
- `after_batch(n, now)`: after a batch of `n` items completes, how long to wait before the next
  one (`CommitDelay.after_chunk`, which measures whether waiting pays).

Failures: a batch that raises fails each of its callers with that exception. A caller that is
cancelled before its batch leaves is skipped only with `skip_cancelled` (nothing was done for
it yet); otherwise its item still runs (an audit record must be written whoever waits for it).
When a running batch is cancelled (shutdown), its callers, and the queued ones once no other
batch of the group is left to take them, get `closed_error()`.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable, Hashable, Sequence
from typing import Generic, NamedTuple, TypeVar

__all__ = ["GroupCommit"]

K = TypeVar("K", bound=Hashable)
I = TypeVar("I")  # noqa: E741 - the item, as K the key and R the result
R = TypeVar("R")


class _Queued(NamedTuple, Generic[I, R]):
    item: I
    future: asyncio.Future[R]
    size: int


class _Group(Generic[I, R]):
    __slots__ = ("draining", "queue", "queued")

    def __init__(self) -> None:
        self.queue: deque[_Queued[I, R]] = deque()
        self.queued = 0  # the sizes of the queued items, summed
        self.draining = 0  # drainer tasks running for this group


class GroupCommit(Generic[K, I, R]):
    def __init__(
        self,
        run_batch: Callable[[K, list[I]], Awaitable[Sequence[R]]],
        *,
        max_batch: int = 512,
        max_in_flight: int = 1,
        size: Callable[[I], int] | None = None,
        busy_window: float = 0.0,
        after_batch: Callable[[int, float], float] | None = None,
        skip_cancelled: bool = False,
        closed_error: Callable[[], BaseException] = lambda: RuntimeError("shut down"),
    ) -> None:
        """`run_batch(key, items)` answers one result per item, in order."""
        if max_batch < 1 or max_in_flight < 1:
            raise ValueError("max_batch and max_in_flight must be at least 1")
        self._run_batch = run_batch
        self._max_batch = max_batch
        self._max_in_flight = max_in_flight
        self._size = size
        self._busy_window = busy_window
        self._after_batch = after_batch
        self._skip_cancelled = skip_cancelled
        self._closed_error = closed_error
        self._groups: dict[K, _Group[I, R]] = {}
        self._tasks: set[asyncio.Task[None]] = set()  # strong references to the drainers

    async def submit(self, key: K, item: I) -> R:
        """Queue `item` in its group; returns its result once its batch has run."""
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        group = self._groups.get(key)
        if group is None:
            group = self._groups[key] = _Group()
        size = 1 if self._size is None else self._size(item)
        group.queue.append(_Queued(item, future, size))
        group.queued += size
        if group.draining < self._max_in_flight:
            group.draining += 1
            task = asyncio.create_task(self._drain(key, group))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return await future

    async def _drain(self, key: K, group: _Group[I, R]) -> None:
        try:
            # One loop turn first: calls made in the same turn join this batch.
            await asyncio.sleep(0)
            loop = asyncio.get_running_loop()
            while group.queue:
                if (self._busy_window and group.draining > 1
                        and group.queued < self._max_batch):
                    await asyncio.sleep(self._busy_window)
                batch = self._take(group)
                if not batch:
                    continue
                await self._run(key, batch)
                if self._after_batch is not None:
                    wait = self._after_batch(len(batch), loop.time())
                    if wait and group.queue:  # never waits for nobody
                        await asyncio.sleep(wait)
        except asyncio.CancelledError:
            if group.draining == 1:  # the last drainer: nobody else will take the queue
                self._fail(self._take_all(group), self._closed_error())
            raise
        finally:
            group.draining -= 1
            if not group.draining and not group.queue and self._groups.get(key) is group:
                del self._groups[key]

    def _take(self, group: _Group[I, R]) -> list[_Queued[I, R]]:
        taken: list[_Queued[I, R]] = []
        size = 0
        queue = group.queue
        while queue and (not taken or size + queue[0].size <= self._max_batch):
            queued = queue.popleft()
            taken.append(queued)
            size += queued.size
        group.queued -= size
        if self._skip_cancelled:
            return [q for q in taken if not q.future.cancelled()]
        return taken

    @staticmethod
    def _take_all(group: _Group[I, R]) -> list[_Queued[I, R]]:
        taken = list(group.queue)
        group.queue.clear()
        group.queued = 0
        return taken

    @staticmethod
    def _fail(batch: list[_Queued[I, R]], exc: BaseException) -> None:
        for queued in batch:
            if not queued.future.done():
                queued.future.set_exception(exc)

    async def _run(self, key: K, batch: list[_Queued[I, R]]) -> None:
        try:
            results = await self._run_batch(key, [queued.item for queued in batch])
        except Exception as exc:  # every caller of the batch gets its failure
            self._fail(batch, exc)
            return
        except asyncio.CancelledError:  # shutting down: nobody may wait forever
            self._fail(batch, self._closed_error())
            raise
        for queued, result in zip(batch, results, strict=True):
            if not queued.future.done():
                queued.future.set_result(result)
