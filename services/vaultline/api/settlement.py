"""SettlementService servicer: protobuf in, `dual_control.BatchService` call, protobuf out.

The call wrappers admit the caller (role `settlement` in the policy), check the tenant of
requests that name one, and write the audit record of every call with the batch id as its
purpose; `BatchService` checks the tenant of the batch a request names, and dual control.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import AsyncIterator
from typing import Any

from google.protobuf import timestamp_pb2

from ..dual_control import BatchService, RowIn, validate_header
from ..errors import FieldViolation, InvalidInput
from ..gen.settlement.v1 import settlement_pb2 as pb
from ..gen.settlement.v1 import settlement_service_pb2_grpc as pb_grpc
from ..service import validate_chunk, validate_tenant
from .calls import client_streaming, unary
from .context import admitted, admitted_grant
from .gate import Gate

MAX_PAGE = 1000
MAX_ROWS_PAGE = 20_000

_STATES = {
    "created": pb.BATCH_STATE_CREATED,
    "approved": pb.BATCH_STATE_APPROVED,
    "running": pb.BATCH_STATE_RUNNING,
    "done": pb.BATCH_STATE_DONE,
}


def _stamp(msg: timestamp_pb2.Timestamp, value: dt.datetime | None) -> None:
    if value is not None:
        msg.FromDatetime(value)


def fill_batch(msg: pb.Batch, row: Any) -> None:
    msg.batch_id = row["id"]
    msg.tenant = row["tenant"]
    msg.state = _STATES[row["state"]]
    msg.created_by = row["created_by"]
    _stamp(msg.create_time, row["created_at"])
    msg.approved_by = row["approved_by"] or ""
    _stamp(msg.approve_time, row["approved_at"])
    msg.input_sha256 = row["input_sha256"]
    msg.input_name = row["input_name"]
    msg.rows_sha256 = row["rows_sha256"] or ""
    msg.row_count = row["row_count"]
    for currency, total in sorted(json.loads(row["totals"]).items()):
        msg.totals.add(currency=currency, count=total["count"],
                       amount_minor=total["amount_minor"])
    msg.runs = row["runs"]
    msg.run_id = str(row["run_id"] or "")
    msg.run_by = row["run_by"] or ""
    msg.run_host = row["run_host"] or ""
    msg.run_pid = row["run_pid"] or 0
    if row["state"] == "running":
        _stamp(msg.lease_expire_time, row["lease_until"])
    _stamp(msg.done_time, row["done_at"])
    msg.summary_json = row["summary"] or ""


def _page_size(value: int, default: int, largest: int, field: str) -> int:
    if value < 0 or value > largest:
        raise InvalidInput("INVALID_PAGE_SIZE", (FieldViolation(
            field, f"must be between 1 and {largest} (0: {default})"),))
    return value or default


class SettlementServicer(pb_grpc.SettlementServiceServicer):
    def __init__(self, batches: BatchService, gate: Gate) -> None:
        self._batches = batches
        self._gate = gate

    @client_streaming
    async def CreateBatch(
        self, requests: AsyncIterator[pb.CreateBatchRequest], context: Any
    ) -> pb.CreateBatchResponse:
        call, grant = admitted()
        first = await anext(aiter(requests), None)
        if first is None:
            raise InvalidInput("EMPTY_BATCH", (FieldViolation(
                "rows", "a batch needs at least one row"),))
        tenant = validate_tenant(first.tenant)
        self._gate.check_tenant(call, tenant)
        header = validate_header(tenant, first.input_name, first.input_sha256)

        async def rows() -> AsyncIterator[list[RowIn]]:
            message: pb.CreateBatchRequest | None = first
            while message is not None:
                validate_chunk(len(message.rows))
                yield [(r.line, r.reference, r.token, r.amount_minor, r.currency, r.auth_code)
                       for r in message.rows]
                message = await anext(aiter(requests), None)

        assert call.grant is not None
        batch = await self._batches.create(grant, header, rows())
        response = pb.CreateBatchResponse()
        fill_batch(response.batch, batch)
        return response

    @unary
    async def ApproveBatch(
        self, request: pb.ApproveBatchRequest, context: Any
    ) -> pb.ApproveBatchResponse:
        grant = admitted_grant()
        batch = await self._batches.approve(grant, request.batch_id, request.rows_sha256)
        response = pb.ApproveBatchResponse()
        fill_batch(response.batch, batch)
        return response

    @unary
    async def GetBatch(self, request: pb.GetBatchRequest, context: Any) -> pb.GetBatchResponse:
        grant = admitted_grant()
        response = pb.GetBatchResponse()
        fill_batch(response.batch, await self._batches.get(grant, request.batch_id))
        return response

    @unary
    async def ListBatches(
        self, request: pb.ListBatchesRequest, context: Any
    ) -> pb.ListBatchesResponse:
        # The wrapper checked the caller's grant of the request's tenant.
        size = _page_size(request.page_size, 50, MAX_PAGE, "page_size")
        rows, token = await self._batches.page(validate_tenant(request.tenant), size,
                                               request.page_token)
        response = pb.ListBatchesResponse(next_page_token=token)
        for row in rows:
            fill_batch(response.batches.add(), row)
        return response

    @unary
    async def ListBatchRows(
        self, request: pb.ListBatchRowsRequest, context: Any
    ) -> pb.ListBatchRowsResponse:
        grant = admitted_grant()
        size = _page_size(request.page_size, 5000, MAX_ROWS_PAGE, "page_size")
        rows = await self._batches.rows(grant, request.batch_id, request.after_line, size)
        response = pb.ListBatchRowsResponse()
        add = response.rows.add
        for r in rows:
            add(line=r["line"], reference=r["reference"], token=r["token"],
                amount_minor=r["amount_minor"], currency=r["currency"],
                auth_code=r["auth_code"])
        return response

    @unary
    async def StartRun(self, request: pb.StartRunRequest, context: Any) -> pb.StartRunResponse:
        grant = admitted_grant()
        batch = await self._batches.start_run(grant, request.batch_id, request.host,
                                              request.pid, request.take_over_run_id)
        response = pb.StartRunResponse()
        fill_batch(response.batch, batch)
        return response

    @unary
    async def RenewRun(self, request: pb.RenewRunRequest, context: Any) -> pb.RenewRunResponse:
        grant = admitted_grant()
        until = await self._batches.renew(grant, request.batch_id, request.run_id)
        response = pb.RenewRunResponse()
        response.lease_expire_time.FromDatetime(until)
        return response

    @unary
    async def FinishRun(
        self, request: pb.FinishRunRequest, context: Any
    ) -> pb.FinishRunResponse:
        grant = admitted_grant()
        batch = await self._batches.finish(grant, request.batch_id, request.run_id,
                                           request.summary_json)
        response = pb.FinishRunResponse()
        fill_batch(response.batch, batch)
        return response

    @unary
    async def AbandonRun(
        self, request: pb.AbandonRunRequest, context: Any
    ) -> pb.AbandonRunResponse:
        grant = admitted_grant()
        await self._batches.abandon(grant, request.batch_id, request.run_id)
        return pb.AbandonRunResponse()
