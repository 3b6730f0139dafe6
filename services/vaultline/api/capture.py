"""CaptureService servicer: protobuf in, `captures.CaptureService` call, protobuf out.

The wrappers admit the caller (role `crm` in the policy), check the tenant of StartCapture,
and audit every call with the capture id as purpose; `CaptureService` checks the tenant of
the capture every other request names.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import AsyncIterator
from typing import Any

from google.protobuf import timestamp_pb2

from ..captures import CaptureService, validate_capture_request
from ..errors import FieldViolation, InvalidInput
from ..gen.capture.v1 import capture_pb2 as pb
from ..gen.capture.v1 import capture_service_pb2_grpc as pb_grpc
from ..gen.tokenization.v1 import tokenization_pb2 as tpb
from .calls import server_streaming, unary
from .context import admitted_grant
from .gate import Gate

_STATES = {
    "started": pb.CAPTURE_STATE_STARTED,
    "capturing": pb.CAPTURE_STATE_CAPTURING,
    "completed": pb.CAPTURE_STATE_COMPLETED,
    "failed": pb.CAPTURE_STATE_FAILED,
    "cancelled": pb.CAPTURE_STATE_CANCELLED,
}
FIELDS = {
    "": pb.CAPTURE_FIELD_UNSPECIFIED,
    "card-number": pb.CAPTURE_FIELD_CARD_NUMBER,
    "expiration-date": pb.CAPTURE_FIELD_EXPIRATION_DATE,
    "security-code": pb.CAPTURE_FIELD_SECURITY_CODE,
    "postal-code": pb.CAPTURE_FIELD_POSTAL_CODE,
}
_FIELD_NAMES = {number: name for name, number in FIELDS.items()}
_FORMATS = frozenset({tpb.TOKEN_FORMAT_NUMERIC, tpb.TOKEN_FORMAT_NUMERIC_KEEP_BIN,
                      tpb.TOKEN_FORMAT_OPAQUE})


def _stamp(msg: timestamp_pb2.Timestamp, value: dt.datetime | None) -> None:
    if value is not None:
        msg.FromDatetime(value)


def _fill_card(msg: pb.CapturedCard, row: Any) -> None:
    msg.token = row["token"]
    msg.brand = row["brand"] or 0  # type: ignore[assignment]
    msg.last4 = row["last4"] or ""
    msg.expiry_month = row["expiry_month"] or 0
    msg.expiry_year = row["expiry_year"] or 0


def fill_capture(msg: pb.Capture, row: Any) -> None:
    msg.capture_id = row["id"]
    msg.tenant = row["tenant"]
    msg.call_sid = row["call_sid"]
    msg.agent_id = row["agent_id"]
    msg.state = _STATES[row["state"]]
    msg.field = FIELDS[row["field"]]
    msg.fields.security_code = row["security_code"]
    msg.fields.postal_code = row["postal_code"]
    _stamp(msg.create_time, row["created_at"])
    _stamp(msg.update_time, row["updated_at"])
    if row["token"]:
        _fill_card(msg.card, row)
    msg.failure_reason = row["failure_reason"]
    msg.last_seq = row["last_seq"]


def fill_event(msg: pb.CaptureEvent, row: Any) -> None:
    msg.capture_id = row["capture_id"]
    msg.seq = row["seq"]
    _stamp(msg.time, row["at"])
    msg.state = _STATES[row["state"]]
    msg.field = FIELDS[row["field"]]
    msg.digits_entered = row["digits_entered"]
    msg.field_outcome = row["field_outcome"]
    msg.attempt = row["attempt"]
    if row["token"]:
        _fill_card(msg.card, row)
    msg.failure_reason = row["failure_reason"]


class CaptureServicer(pb_grpc.CaptureServiceServicer):
    def __init__(self, captures: CaptureService, gate: Gate) -> None:
        self._captures = captures
        self._gate = gate

    @unary
    async def StartCapture(
        self, request: pb.StartCaptureRequest, context: Any
    ) -> pb.StartCaptureResponse:
        # The wrapper has checked the caller's grant of the request's tenant.
        token_format = request.token_format or tpb.TOKEN_FORMAT_OPAQUE
        if token_format not in _FORMATS:
            raise InvalidInput("INVALID_TOKEN_FORMAT", (FieldViolation(
                "token_format", "must be a TokenFormat value"),))
        capture = await self._captures.start(admitted_grant(), validate_capture_request(
            request.tenant, request.call_sid, request.agent_id, request.fields.security_code,
            request.fields.postal_code, token_format, request.request_id))
        response = pb.StartCaptureResponse()
        fill_capture(response.capture, capture)
        return response

    @unary
    async def GetCapture(self, request: pb.GetCaptureRequest, context: Any
                         ) -> pb.GetCaptureResponse:
        response = pb.GetCaptureResponse()
        fill_capture(response.capture,
                     await self._captures.get(admitted_grant(), request.capture_id))
        return response

    @unary
    async def CancelCapture(self, request: pb.CancelCaptureRequest, context: Any
                            ) -> pb.CancelCaptureResponse:
        response = pb.CancelCaptureResponse()
        fill_capture(response.capture,
                     await self._captures.cancel(admitted_grant(), request.capture_id))
        return response

    @unary
    async def RestartCaptureField(self, request: pb.RestartCaptureFieldRequest, context: Any
                                  ) -> pb.RestartCaptureFieldResponse:
        response = pb.RestartCaptureFieldResponse()
        fill_capture(response.capture, await self._captures.restart_field(
            admitted_grant(), request.capture_id, _FIELD_NAMES.get(request.field, "")))
        return response

    @server_streaming
    async def WatchCapture(self, request: pb.WatchCaptureRequest, context: Any
                           ) -> AsyncIterator[pb.WatchCaptureResponse]:
        async for event in self._captures.watch(admitted_grant(), request.capture_id,
                                                request.after_seq):
            response = pb.WatchCaptureResponse()
            fill_event(response.event, event)
            yield response
