"""The one table that turns domain errors into gRPC statuses with rich details.

Each status carries exactly one `ErrorInfo` (reason, domain `vaultline`) and, for bad input,
a `BadRequest` naming the fields. Messages are fixed strings; nothing a caller sent is ever
echoed. Anything not in the table is a bug: it becomes INTERNAL with a fixed message, and the
log keeps the traceback.
"""

from __future__ import annotations

import logging

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2

from ..errors import (
    BatchNotFound,
    BatchStateConflict,
    CaptureEnded,
    CaptureInProgress,
    CaptureNotFound,
    DailyBudgetExceeded,
    DependencyUnavailable,
    DualControlRefused,
    InvalidInput,
    InvalidPageToken,
    KeyAdminNotConfigured,
    RecordingNotFound,
    RecordingNotPlayable,
    RequestIdReused,
    SecurityCodeNotFound,
    TokenNotFound,
    TokenSpaceExhausted,
    VaultlineError,
)
from ..security.access import AccessDenied, QuotaExceeded, Unauthenticated
from ..service import DataCorrupted

log = logging.getLogger(__name__)

DOMAIN = "vaultline"

# Most specific first: the first matching class wins.
_TABLE: tuple[tuple[type[VaultlineError], grpc.StatusCode], ...] = (
    (Unauthenticated, grpc.StatusCode.UNAUTHENTICATED),
    (AccessDenied, grpc.StatusCode.PERMISSION_DENIED),
    (QuotaExceeded, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (InvalidInput, grpc.StatusCode.INVALID_ARGUMENT),
    (TokenNotFound, grpc.StatusCode.NOT_FOUND),
    (RequestIdReused, grpc.StatusCode.ALREADY_EXISTS),
    (TokenSpaceExhausted, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (DependencyUnavailable, grpc.StatusCode.UNAVAILABLE),
    (DataCorrupted, grpc.StatusCode.DATA_LOSS),
    (KeyAdminNotConfigured, grpc.StatusCode.FAILED_PRECONDITION),
    (InvalidPageToken, grpc.StatusCode.INVALID_ARGUMENT),
    (BatchNotFound, grpc.StatusCode.NOT_FOUND),
    (BatchStateConflict, grpc.StatusCode.FAILED_PRECONDITION),
    (DualControlRefused, grpc.StatusCode.PERMISSION_DENIED),
    (DailyBudgetExceeded, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (CaptureNotFound, grpc.StatusCode.NOT_FOUND),
    (SecurityCodeNotFound, grpc.StatusCode.NOT_FOUND),
    (RecordingNotFound, grpc.StatusCode.NOT_FOUND),
    (RecordingNotPlayable, grpc.StatusCode.FAILED_PRECONDITION),
    (CaptureInProgress, grpc.StatusCode.ALREADY_EXISTS),
    (CaptureEnded, grpc.StatusCode.FAILED_PRECONDITION),
)

INTERNAL_MESSAGE = "internal error"


def code_for(exc: VaultlineError) -> grpc.StatusCode:
    for cls, code in _TABLE:
        if isinstance(exc, cls):
            return code
    return grpc.StatusCode.INTERNAL


def _pack(message: object) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed


def to_rpc_status(exc: BaseException) -> status_pb2.Status:
    """A `google.rpc.Status` for an exception; used for whole calls and for batch items."""
    if not isinstance(exc, VaultlineError):
        return status_pb2.Status(
            code=code_pb2.INTERNAL,
            message=INTERNAL_MESSAGE,
            details=[_pack(error_details_pb2.ErrorInfo(reason="INTERNAL", domain=DOMAIN))],
        )
    code = code_for(exc)
    details = [_pack(error_details_pb2.ErrorInfo(reason=exc.reason, domain=DOMAIN))]
    if isinstance(exc, InvalidInput) and exc.violations:
        details.append(
            _pack(
                error_details_pb2.BadRequest(
                    field_violations=[
                        error_details_pb2.BadRequest.FieldViolation(
                            field=v.field, description=v.description
                        )
                        for v in exc.violations
                    ]
                )
            )
        )
    return status_pb2.Status(code=code.value[0], message=exc.message, details=details)


def to_grpc_status(status: status_pb2.Status) -> grpc.Status:
    from grpc_status import rpc_status

    return rpc_status.to_status(status)
