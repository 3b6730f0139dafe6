"""De-scoping's side of the tokenizer: BatchTokenize (the expiry unknown) and RecordDescopeChunk,
over an mTLS channel of the `descope` identity.

Both are safe to repeat — a card tokenized again gets the token it has, and a chunk record
names its chunk — so a call the tokenizer answers UNAVAILABLE or DEADLINE_EXCEEDED (a restart,
a failover, a slow database) is tried again a few times, with a growing pause, before the run
stops (and can be resumed)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Collection
from typing import Any, Final, TypeVar

import grpc

from ..gen.tokenization.v1 import tokenization_pb2 as pb
from ..gen.tokenization.v1 import tokenization_service_pb2_grpc as pb_grpc
from ..rpc_reasons import status_reason
from .run import ChunkCounts, DescopeError

__all__ = ["GrpcTokenizer"]

log = logging.getLogger(__name__)

ITEMS_PER_CHUNK: Final = 5000
ATTEMPTS: Final = 4
CALL_TIMEOUT: Final = 120.0  # seconds for one call; a chunk of 5,000 cards takes well under 1
_TRANSIENT: Final = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
T = TypeVar("T")
# A token keeps the BIN only of a card of 16 digits or more; shorter cards get the plain
# numeric format (still format-preserving).
_KEEP_BIN_FROM: Final = 16
_FORMATS: Final = {
    "numeric_keep_bin": pb.TOKEN_FORMAT_NUMERIC_KEEP_BIN,
    "numeric": pb.TOKEN_FORMAT_NUMERIC,
    "opaque": pb.TOKEN_FORMAT_OPAQUE,
}


async def _retried(what: str, call: Callable[[], Awaitable[T]], pause: float = 1.0) -> T:
    for attempt in range(1, ATTEMPTS + 1):
        try:
            return await call()
        except grpc.aio.AioRpcError as err:
            if err.code() not in _TRANSIENT or attempt == ATTEMPTS:
                raise
            log.warning("%s: the tokenizer answered %s; trying again (%d of %d)", what,
                        err.code().name, attempt + 1, ATTEMPTS)
            await asyncio.sleep(pause * 2 ** (attempt - 1))
    raise AssertionError("unreachable")


class GrpcTokenizer:
    def __init__(self, channel: Any, tenant: str, token_format: str, *,
                 retry_pause: float = 1.0) -> None:
        self._stub = pb_grpc.TokenizationServiceStub(channel)
        self._tenant = tenant
        self._format = _FORMATS[token_format]
        self._pause = retry_pause
        self.tokenized = 0

    def _format_for(self, pan: str) -> int:
        if self._format == pb.TOKEN_FORMAT_NUMERIC_KEEP_BIN and len(pan) < _KEEP_BIN_FROM:
            return pb.TOKEN_FORMAT_NUMERIC
        return self._format

    async def tokenize(self, pans: Collection[str]) -> dict[str, str]:
        tokens = await _retried("BatchTokenize", lambda: self._tokenize(pans), self._pause)
        self.tokenized += len(tokens)
        return tokens

    async def _tokenize(self, pans: Collection[str]) -> dict[str, str]:
        by_format: dict[int, list[str]] = {}
        for pan in pans:
            by_format.setdefault(self._format_for(pan), []).append(pan)
        chunks = [(fmt, group[i:i + ITEMS_PER_CHUNK])
                  for fmt, group in by_format.items()
                  for i in range(0, len(group), ITEMS_PER_CHUNK)]

        async def requests() -> AsyncIterator[pb.BatchTokenizeRequest]:
            for fmt, part in chunks:
                yield pb.BatchTokenizeRequest(
                    tenant=self._tenant, format=fmt, expiry_unknown=True,  # type: ignore[arg-type]
                    items=[pb.BatchTokenizeRequest.Item(reference=str(i), card=pb.Card(pan=pan))
                           for i, pan in enumerate(part)])

        tokens: dict[str, str] = {}
        answered = 0
        async for response in self._stub.BatchTokenize(requests(), timeout=CALL_TIMEOUT):
            _, part = chunks[answered]
            answered += 1
            if len(response.results) != len(part):
                raise DescopeError("the tokenizer answered a chunk with a wrong count")
            for pan, result in zip(part, response.results, strict=True):
                if result.HasField("error"):
                    # The reason only: the item's card never goes into a message.
                    reason = status_reason(result.error) or f"code {result.error.code}"
                    raise DescopeError(f"the vault refused a card: {reason}")
                tokens[pan] = result.token.token
        if answered != len(chunks):
            raise DescopeError("the tokenizer ended the stream early")
        return tokens

    async def record_chunk(self, run_id: str, table: str, counts: ChunkCounts) -> None:
        request = pb.RecordDescopeChunkRequest(
            tenant=self._tenant, run_id=run_id, table=table, chunk=counts.chunk,
            rows_read=counts.rows_read, rows_rewritten=counts.rows_rewritten,
            cards_replaced=counts.cards_replaced, rows_reread=counts.rows_reread)
        await _retried("RecordDescopeChunk", lambda: self._stub.RecordDescopeChunk(
            request, timeout=CALL_TIMEOUT), self._pause)
