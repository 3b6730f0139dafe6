"""The reason code a Vaultline gRPC error carries, for the clients of the tokenizer (the IVR,
settlement runs, de-scoping, the CLI): every error has exactly one `google.rpc.ErrorInfo`
(domain `vaultline`) whose `reason` is stable and never echoes input."""

from __future__ import annotations

from typing import Any

from google.rpc import error_details_pb2
from grpc_status import rpc_status

__all__ = ["call_reason", "status_reason"]


def status_reason(status: Any) -> str:
    """The ErrorInfo reason of a `google.rpc.Status` (a batch item's error); "" if none."""
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return str(info.reason)
    return ""


def call_reason(err: Any) -> str:
    """The ErrorInfo reason of a failed call (its trailing status); "" if none."""
    status = rpc_status.from_call(err)
    return status_reason(status) if status is not None else ""
