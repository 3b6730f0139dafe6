"""RecordingService servicer: protobuf in, `recordings.library` call, protobuf out.

The wrappers admit the caller (listening: role `qa`; releases and purges: `admin`), check the
tenant, take a unit of the caller's reveal quota for GetRecordingKey, and audit every call
with the recording SID (and the stated purpose or reason).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import AsyncIterator
from typing import Any

from ..errors import FieldViolation, InvalidInput
from ..gen.recordings.v1 import recordings_pb2 as pb
from ..gen.recordings.v1 import recordings_service_pb2_grpc as pb_grpc
from ..recordings.library import RecordingLibrary, released, tones
from ..service import validate_purpose, validate_tenant
from .calls import server_streaming, unary
from .context import admitted
from .gate import Gate

_STATES = {
    "received": pb.RECORDING_STATE_RECEIVED, "stored": pb.RECORDING_STATE_STORED,
    "certified": pb.RECORDING_STATE_CERTIFIED, "quarantined": pb.RECORDING_STATE_QUARANTINED,
    "unencrypted": pb.RECORDING_STATE_UNENCRYPTED, "corrupt": pb.RECORDING_STATE_CORRUPT,
}
MAX_PURGE_DAYS = 36_500


def fill_recording(msg: pb.Recording, row: Any) -> None:
    msg.recording_sid = row["sid"]
    msg.call_sid = row["call_sid"]
    msg.tenant = row["tenant"]
    msg.duration_seconds = row["duration_seconds"]
    msg.state = _STATES.get(row["state"], pb.RECORDING_STATE_UNSPECIFIED)
    for start, end in tones(row):
        msg.tones.add(start_seconds=start, end_seconds=end)
    msg.create_time.FromDatetime(row["created_at"])
    if row["media_sha256"] is not None:
        msg.media_sha256 = bytes(row["media_sha256"]).hex()
    msg.media_bytes = row["media_bytes"]
    msg.released = released(row)


class RecordingServicer(pb_grpc.RecordingServiceServicer):
    def __init__(self, library: RecordingLibrary, gate: Gate) -> None:
        self._library = library
        self._gate = gate

    @unary
    async def ListRecordings(self, request: pb.ListRecordingsRequest, context: Any
                             ) -> pb.ListRecordingsResponse:
        rows, token = await self._library.list(
            validate_tenant(request.tenant), request.page_size, request.page_token)
        response = pb.ListRecordingsResponse(next_page_token=token)
        for row in rows:
            fill_recording(response.recordings.add(), row)
        return response

    @unary
    async def GetRecordingKey(self, request: pb.GetRecordingKeyRequest, context: Any
                              ) -> pb.GetRecordingKeyResponse:
        validate_purpose(request.purpose)
        key = await self._library.key(validate_tenant(request.tenant), request.recording_sid)
        return pb.GetRecordingKeyResponse(content_key=key.content_key, iv=key.iv,
                                          media_sha256=key.media_sha256)

    @server_streaming
    async def GetRecordingMedia(self, request: pb.GetRecordingMediaRequest, context: Any
                                ) -> AsyncIterator[pb.GetRecordingMediaResponse]:
        async for chunk in self._library.media(validate_tenant(request.tenant),
                                               request.recording_sid):
            yield pb.GetRecordingMediaResponse(chunk=chunk)

    @unary
    async def ReleaseRecording(self, request: pb.ReleaseRecordingRequest, context: Any
                               ) -> pb.ReleaseRecordingResponse:
        call, _ = admitted()
        row = await self._library.release(validate_tenant(request.tenant),
                                          request.recording_sid, call.identity or "",
                                          request.reason)
        response = pb.ReleaseRecordingResponse()
        fill_recording(response.recording, row)
        return response

    @unary
    async def PurgeRecordings(self, request: pb.PurgeRecordingsRequest, context: Any
                              ) -> pb.PurgeRecordingsResponse:
        if not 1 <= request.older_than_days <= MAX_PURGE_DAYS:
            raise InvalidInput("INVALID_ARGUMENT", (FieldViolation(
                "older_than_days", f"must be 1-{MAX_PURGE_DAYS}"),))
        purged = await self._library.purge(dt.timedelta(days=request.older_than_days))
        return pb.PurgeRecordingsResponse(purged=purged)
