"""Helpers for asserting on gRPC answers: codes, ErrorInfo reasons, field violations."""

from __future__ import annotations

import secrets
import string
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Any

import grpc
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from vaultline.gen.tokenization.v1 import tokenization_pb2 as pb


@dataclass
class RpcFailure:
    code: grpc.StatusCode
    message: str
    reason: str
    domain: str
    fields: list[str]
    raw: str  # everything the caller received, for leak checks


def unpack(status: status_pb2.Status) -> tuple[str, str, list[str]]:
    reason = domain = ""
    fields: list[str] = []
    infos = 0
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            reason, domain = info.reason, info.domain
            infos += 1
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            fields += [v.field for v in bad.field_violations]
    assert infos == 1, "every error carries exactly one ErrorInfo"
    return reason, domain, fields


async def rpc_failure(call: Awaitable[Any]) -> RpcFailure:
    try:
        await call
    except grpc.aio.AioRpcError as err:
        status = rpc_status.from_call(err)
        assert status is not None, "error without google.rpc.Status details"
        reason, domain, fields = unpack(status)
        raw = f"{err.details()} {status}"
        return RpcFailure(err.code(), err.details() or "", reason, domain, fields, raw)
    raise AssertionError("the call succeeded but should have failed")


def card(pan: str, month: int = 12, year: int = 2031, name: str = "") -> pb.Card:
    return pb.Card(pan=pan, expiry_month=month, expiry_year=year, cardholder_name=name)


def tokenize_request(pan: str, **kwargs: Any) -> pb.TokenizeRequest:
    month = kwargs.pop("month", 12)
    year = kwargs.pop("year", 2031)
    name = kwargs.pop("name", "")
    return pb.TokenizeRequest(card=card(pan, month, year, name), **kwargs)


def luhn_valid(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def synthetic_pans(n: int, start: int = 0, prefix: str = "4000") -> list[str]:
    """Distinct Luhn-valid 16-digit numbers in a Visa test range (never real cards)."""
    out = []
    for i in range(start, start + n):
        body = f"{prefix}{i:011d}"
        for check in "0123456789":
            if luhn_valid(body + check):
                out.append(body + check)
                break
    return out


def unique_name(prefix: str, length: int = 12) -> str:
    """`prefix` and random lower-case letters: a fresh tenant, marker or purpose word. Not hex:
    twelve hex characters are all digits one time in 280, and caller text holding a run of 12
    digits is refused as a possible card number (issue 14)."""
    return prefix + "".join(secrets.choice(string.ascii_lowercase) for _ in range(length))
