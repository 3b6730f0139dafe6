"""TokenizationService servicer: protobuf in, domain call, protobuf out — nothing else.

Errors go through `api.errors` in one decorator; batch items carry their own
`google.rpc.Status`. Bulk streams are pipelined a few chunks deep so that parsing, crypto and
the database round trip of consecutive chunks overlap.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import functools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc
from google.protobuf import duration_pb2, timestamp_pb2

from ..errors import VaultlineError
from ..gen.tokenization.v1 import tokenization_pb2 as pb
from ..gen.tokenization.v1 import tokenization_service_pb2_grpc as pb_grpc
from ..service import CardInput, Revealed, Tokenized, TokenRecord, TokenService
from .errors import to_grpc_status, to_rpc_status

log = logging.getLogger(__name__)

PIPELINE_DEPTH = 3

F = TypeVar("F", bound=Callable[..., Any])


# ---- conversions ---------------------------------------------------------------------------


def _timestamp(value: dt.datetime | None) -> timestamp_pb2.Timestamp | None:
    if value is None:
        return None
    seconds = int(value.timestamp())
    return timestamp_pb2.Timestamp(seconds=seconds, nanos=value.microsecond * 1000)


def card_in(card: pb.Card) -> CardInput:
    return CardInput(card.pan, card.expiry_month, card.expiry_year, card.cardholder_name)


def ttl_in(has_ttl: bool, ttl: duration_pb2.Duration) -> dt.timedelta | None:
    if not has_ttl:
        return None
    return dt.timedelta(seconds=ttl.seconds, microseconds=ttl.nanos // 1000)


def token_out(record: TokenRecord) -> pb.CardToken:
    return pb.CardToken(
        token=record.token,
        tenant=record.tenant,
        brand=int(record.brand),  # type: ignore[arg-type]
        bin=record.bin,
        last4=record.last4,
        expiry_month=record.expiry_month,
        expiry_year=record.expiry_year,
        format=int(record.format),  # type: ignore[arg-type]
        create_time=_timestamp(record.create_time),
        expire_time=_timestamp(record.expire_time),
    )


def card_out(revealed: Revealed) -> pb.Card:
    card = revealed.card
    return pb.Card(
        pan=card.pan.reveal(),
        expiry_month=card.expiry.month,
        expiry_year=card.expiry.year,
        cardholder_name=card.cardholder_name,
    )


def _tokenize_result(reference: str, outcome: Tokenized | VaultlineError) -> Any:
    if isinstance(outcome, Tokenized):
        return pb.BatchTokenizeResponse.Result(
            reference=reference, token=token_out(outcome.record), created=outcome.created
        )
    return pb.BatchTokenizeResponse.Result(reference=reference, error=to_rpc_status(outcome))


def _detokenize_result(reference: str, outcome: Revealed | VaultlineError) -> Any:
    if isinstance(outcome, Revealed):
        return pb.BatchDetokenizeResponse.Result(
            reference=reference,
            card=pb.DetokenizedCard(card=card_out(outcome), token=token_out(outcome.record)),
        )
    return pb.BatchDetokenizeResponse.Result(reference=reference, error=to_rpc_status(outcome))


# ---- error translation ---------------------------------------------------------------------


async def _abort(context: grpc.aio.ServicerContext, exc: BaseException) -> None:
    if not isinstance(exc, VaultlineError):
        # The traceback goes to the log (PAN-masked); the caller gets a fixed message.
        log.exception("unexpected error", exc_info=exc)
    await context.abort_with_status(to_grpc_status(to_rpc_status(exc)))


def unary(fn: F) -> F:
    @functools.wraps(fn)
    async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            return await fn(self, request, context)
        except Exception as exc:  # noqa: BLE001 - the translation table decides
            await _abort(context, exc)

    return wrapper  # type: ignore[return-value]


def streaming(fn: F) -> F:
    @functools.wraps(fn)
    async def wrapper(self: Any, requests: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            async for response in fn(self, requests, context):
                yield response
        except Exception as exc:  # noqa: BLE001 - the translation table decides
            await _abort(context, exc)

    return wrapper  # type: ignore[return-value]


_DONE = object()


async def pipelined(
    requests: AsyncIterator[Any], handle: Callable[[Any], Awaitable[Any]], depth: int
) -> AsyncIterator[Any]:
    """Yield handle(r) for each request in order, with up to `depth` chunks in progress."""
    queue: asyncio.Queue[Any] = asyncio.Queue(maxsize=depth)

    async def read() -> None:
        try:
            async for request in requests:
                await queue.put(asyncio.ensure_future(handle(request)))
        except Exception as exc:  # noqa: BLE001 - handed to the consumer below
            failed: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
            failed.set_exception(exc)
            await queue.put(failed)
        await queue.put(_DONE)

    reader = asyncio.create_task(read())
    try:
        while (item := await queue.get()) is not _DONE:
            yield await item
    finally:
        reader.cancel()
        while not queue.empty():
            item = queue.get_nowait()
            if isinstance(item, asyncio.Future):
                item.cancel()


# ---- the servicer --------------------------------------------------------------------------


class TokenizationServicer(pb_grpc.TokenizationServiceServicer):
    def __init__(self, service: TokenService) -> None:
        self._service = service

    @unary
    async def Tokenize(self, request: pb.TokenizeRequest, context: Any) -> pb.TokenizeResponse:
        result = await self._service.tokenize(
            request.tenant,
            card_in(request.card),
            request.format,
            request_id=request.request_id,
            ttl=ttl_in(request.HasField("ttl"), request.ttl),
        )
        return pb.TokenizeResponse(token=token_out(result.record), created=result.created)

    @unary
    async def GetToken(self, request: pb.GetTokenRequest, context: Any) -> pb.GetTokenResponse:
        record = await self._service.get_token(request.tenant, request.token)
        return pb.GetTokenResponse(token=token_out(record))

    @unary
    async def Detokenize(
        self, request: pb.DetokenizeRequest, context: Any
    ) -> pb.DetokenizeResponse:
        revealed = await self._service.detokenize(request.tenant, request.token, request.purpose)
        return pb.DetokenizeResponse(card=card_out(revealed), token=token_out(revealed.record))

    @unary
    async def DeleteToken(
        self, request: pb.DeleteTokenRequest, context: Any
    ) -> pb.DeleteTokenResponse:
        await self._service.delete_token(request.tenant, request.token)
        return pb.DeleteTokenResponse()

    @streaming
    async def BatchTokenize(
        self, requests: AsyncIterator[pb.BatchTokenizeRequest], context: Any
    ) -> AsyncIterator[pb.BatchTokenizeResponse]:
        async def handle(chunk: pb.BatchTokenizeRequest) -> pb.BatchTokenizeResponse:
            items = chunk.items
            outcomes = await self._service.tokenize_batch(
                chunk.tenant,
                chunk.format,
                ttl_in(chunk.HasField("ttl"), chunk.ttl),
                [card_in(item.card) for item in items],
            )
            return pb.BatchTokenizeResponse(
                results=[
                    _tokenize_result(item.reference, outcome)
                    for item, outcome in zip(items, outcomes, strict=True)
                ]
            )

        async for response in pipelined(requests, handle, PIPELINE_DEPTH):
            yield response

    @streaming
    async def BatchDetokenize(
        self, requests: AsyncIterator[pb.BatchDetokenizeRequest], context: Any
    ) -> AsyncIterator[pb.BatchDetokenizeResponse]:
        async def handle(chunk: pb.BatchDetokenizeRequest) -> pb.BatchDetokenizeResponse:
            items = chunk.items
            outcomes = await self._service.detokenize_batch(
                chunk.tenant, chunk.purpose, [item.token for item in items]
            )
            return pb.BatchDetokenizeResponse(
                results=[
                    _detokenize_result(item.reference, outcome)
                    for item, outcome in zip(items, outcomes, strict=True)
                ]
            )

        async for response in pipelined(requests, handle, PIPELINE_DEPTH):
            yield response
