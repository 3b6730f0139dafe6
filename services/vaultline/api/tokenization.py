"""TokenizationService servicer: protobuf in, domain call, protobuf out — nothing else.

Errors go through `api.errors` in one decorator; batch items carry their own
`google.rpc.Status`. Bulk streams are pipelined a few chunks deep so that parsing, crypto and
the database round trip of consecutive chunks overlap.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from google.protobuf import duration_pb2, timestamp_pb2

from ..dual_control import BatchService, DailyRevealBudget
from ..errors import DailyBudgetExceeded, DualControlRefused, RequestIdReused, VaultlineError
from ..gen.tokenization.v1 import tokenization_pb2 as pb
from ..gen.tokenization.v1 import tokenization_service_pb2_grpc as pb_grpc
from ..security.access import AccessDenied
from ..security.audit import PendingAudit
from ..service import (
    CardInput,
    IssuedToken,
    Revealed,
    TokenRecord,
    TokenService,
    describe_descope_chunk,
    ttl_from_wire,
    validate_chunk,
    validate_purpose,
    validate_tenant,
)
from .calls import streaming, unary, unary_audited_by_method
from .context import admitted, current_call
from .errors import to_rpc_status
from .gate import Gate

log = logging.getLogger(__name__)

PIPELINE_DEPTH = 3


# ---- conversions ---------------------------------------------------------------------------


def _fill_timestamp(msg: timestamp_pb2.Timestamp, value: dt.datetime) -> None:
    msg.seconds = int(value.timestamp())
    msg.nanos = value.microsecond * 1000


def card_in(card: pb.Card) -> CardInput:
    return CardInput(card.pan, card.expiry_month, card.expiry_year, card.cardholder_name)


def ttl_in(has_ttl: bool, ttl: duration_pb2.Duration) -> dt.timedelta | None:
    if not has_ttl:
        return None
    return ttl_from_wire(ttl.seconds, ttl.nanos)


# Responses are filled in place (`results.add()`, field assignment): building sub-messages with
# keyword arguments and copying them into a parent costs more than twice as much per item.


def fill_token(msg: pb.CardToken, record: TokenRecord) -> None:
    msg.token = record.token
    msg.tenant = record.tenant
    msg.brand = record.brand  # type: ignore[assignment]
    msg.bin = record.bin
    msg.last4 = record.last4
    msg.expiry_month = record.expiry_month
    msg.expiry_year = record.expiry_year
    msg.format = record.format  # type: ignore[assignment]
    _fill_timestamp(msg.create_time, record.create_time)
    if record.expire_time is not None:
        _fill_timestamp(msg.expire_time, record.expire_time)


def fill_card(msg: pb.Card, revealed: Revealed) -> None:
    card = revealed.card
    msg.pan = card.pan.reveal()
    msg.expiry_month = card.expiry.month
    msg.expiry_year = card.expiry.year
    if card.cardholder_name:  # most stored cards have none: skip the no-op assignment
        msg.cardholder_name = card.cardholder_name


def tokenize_results(
    items: Any, outcomes: list[IssuedToken | VaultlineError]
) -> pb.BatchTokenizeResponse:
    response = pb.BatchTokenizeResponse()
    add = response.results.add
    for item, outcome in zip(items, outcomes, strict=True):
        result = add(reference=item.reference)
        if isinstance(outcome, IssuedToken):
            fill_token(result.token, outcome.record)
            result.created = outcome.created
        else:
            result.error.CopyFrom(to_rpc_status(outcome))
    return response


def detokenize_results(
    items: Any, outcomes: list[Revealed | VaultlineError]
) -> pb.BatchDetokenizeResponse:
    response = pb.BatchDetokenizeResponse()
    add = response.results.add
    for item, outcome in zip(items, outcomes, strict=True):
        result = add(reference=item.reference)
        if isinstance(outcome, VaultlineError):
            result.error.CopyFrom(to_rpc_status(outcome))
        else:
            revealed = result.card  # one sub-message wrapper, not two
            fill_card(revealed.card, outcome)
            fill_token(revealed.token, outcome.record)
    return response


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
    def __init__(self, service: TokenService, gate: Gate, batches: BatchService,
                 budget: DailyRevealBudget) -> None:
        self._service = service
        self._gate = gate
        self._batches = batches
        self._budget = budget

    @unary_audited_by_method
    async def Tokenize(self, request: pb.TokenizeRequest, context: Any) -> pb.TokenizeResponse:
        call = current_call.get()
        assert call is not None
        tenant = request.tenant or "default"
        try:
            result = await self._service.tokenize(
                request.tenant,
                card_in(request.card),
                request.format,
                request_id=request.request_id,
                caller=call.identity or "",
                ttl=ttl_in(request.HasField("ttl"), request.ttl),
                # Written with the other records of its coalesced chunk, before the answer.
                audit=PendingAudit(self._gate.event(call, "OK", tenant=tenant)),
                security_code=request.security_code,
            )
        except RequestIdReused:
            self._gate.observe_tokenize(call, reused=1)
            raise
        if result.created:
            self._gate.observe_tokenize(call, new=1)
        else:
            self._gate.observe_tokenize(call, returning=1)
        response = pb.TokenizeResponse(created=result.created)
        fill_token(response.token, result.record)
        return response

    @unary
    async def GetToken(self, request: pb.GetTokenRequest, context: Any) -> pb.GetTokenResponse:
        record = await self._service.get_token(request.tenant, request.token)
        response = pb.GetTokenResponse()
        fill_token(response.token, record)
        return response

    @unary
    async def Detokenize(
        self, request: pb.DetokenizeRequest, context: Any
    ) -> pb.DetokenizeResponse:
        call, grant = admitted()
        validate_purpose(request.purpose)  # a refused request spends no budget
        try:
            await self._budget.spend(grant)
        except DailyBudgetExceeded:
            log.warning("daily Detokenize budget spent", extra={"identity": call.identity})
            if self._gate.metrics is not None:
                self._gate.metrics.observe_quota_refusal(call.identity or "", "Detokenize")
            raise
        revealed = await self._service.detokenize(request.tenant, request.token, request.purpose)
        response = pb.DetokenizeResponse()
        fill_card(response.card, revealed)
        fill_token(response.token, revealed.record)
        return response

    @unary
    async def RedeemSecurityCode(
        self, request: pb.RedeemSecurityCodeRequest, context: Any
    ) -> pb.RedeemSecurityCodeResponse:
        code = await self._service.redeem_security_code(request.tenant, request.token)
        return pb.RedeemSecurityCodeResponse(security_code=code)

    @unary_audited_by_method
    async def RecordDescopeChunk(
        self, request: pb.RecordDescopeChunkRequest, context: Any
    ) -> pb.RecordDescopeChunkResponse:
        call, _ = admitted()
        tenant = validate_tenant(request.tenant)
        purpose = describe_descope_chunk(request.run_id, request.table, request.chunk, (
            ("read", request.rows_read), ("rewritten", request.rows_rewritten),
            ("cards", request.cards_replaced), ("reread", request.rows_reread)))
        await self._gate.audit([self._gate.event(call, "OK", tenant=tenant, purpose=purpose)])
        return pb.RecordDescopeChunkResponse()

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
        call = current_call.get()
        assert call is not None

        async def handle(chunk: pb.BatchTokenizeRequest) -> pb.BatchTokenizeResponse:
            self._gate.check_tenant(call, chunk.tenant)
            if chunk.expiry_unknown and not (
                    call.grant is not None and call.grant.tokenizes_without_expiry):
                raise AccessDenied("EXPIRY_REQUIRED")
            items = chunk.items
            validate_chunk(len(items))
            self._gate.take_quota(call, len(items))
            outcomes = await self._service.tokenize_batch(
                chunk.tenant,
                chunk.format,
                ttl_in(chunk.HasField("ttl"), chunk.ttl),
                [card_in(item.card) for item in items],
                expiry_unknown=chunk.expiry_unknown,
            )
            issued = [o.created for o in outcomes if type(o) is IssuedToken]
            new = sum(issued)
            self._gate.observe_tokenize(call, new=new, returning=len(issued) - new)
            return tokenize_results(items, outcomes)

        async for response in pipelined(requests, handle, PIPELINE_DEPTH):
            yield response

    @streaming
    async def BatchDetokenize(
        self, requests: AsyncIterator[pb.BatchDetokenizeRequest], context: Any
    ) -> AsyncIterator[pb.BatchDetokenizeResponse]:
        call, grant = admitted()

        async def handle(chunk: pb.BatchDetokenizeRequest) -> pb.BatchDetokenizeResponse:
            self._gate.check_tenant(call, chunk.tenant)
            items = chunk.items
            # Refused before any quota is spent, and recorded as validated, never as sent.
            validate_chunk(len(items))
            if chunk.batch_id or grant.reveals_need_batch:
                # Dual control: only rows of a batch running under this caller, and the
                # batch id is the purpose every reveal is audited with.
                if not chunk.batch_id:
                    raise DualControlRefused(
                        "BATCH_REQUIRED", "bulk reveals need a running settlement batch")
                await self._batches.check_reveal(
                    grant, chunk.tenant, chunk.batch_id,
                    [item.reference for item in items], [item.token for item in items])
                purpose = chunk.batch_id
            else:
                purpose = validate_purpose(chunk.purpose)
            self._gate.take_quota(call, len(items))
            outcomes = await self._service.detokenize_batch(
                chunk.tenant, purpose, [item.token for item in items]
            )
            # Every revealed token is audited, durably, before the chunk is answered; the
            # response is built while PostgreSQL commits the records, and dropped if it fails.
            audited = asyncio.ensure_future(self._gate.audit_reveals(
                call,
                chunk.tenant,
                purpose,
                [o.record.token for o in outcomes if isinstance(o, Revealed)],
            ))
            try:
                response = detokenize_results(items, outcomes)
            finally:
                await audited
            return response

        async for response in pipelined(requests, handle, PIPELINE_DEPTH):
            yield response
