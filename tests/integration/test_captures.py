"""CaptureService on the tokenizer (issue 15): starting, commanding and watching captures over
real mTLS and PostgreSQL. The IVR's side of a capture (driving Twilio's Payment) appends
events through `capture_append_event` as the IVR's own database role, as here."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import grpc
import pytest

from tests.fixtures.infra import PostgresHandle
from tests.fixtures.tokenizer import Running
from tests.helpers import rpc_failure, unique_name
from vaultline.gen.capture.v1 import capture_pb2 as pb
from vaultline.gen.tokenization.v1 import tokenization_pb2 as tpb

pytestmark = pytest.mark.integration

CRM = "crm/crm-1"


def call_sid() -> str:
    return "CA" + os.urandom(16).hex()


async def start(tokenizer: Running, sid: str | None = None, **kw: Any) -> pb.Capture:
    request = pb.StartCaptureRequest(call_sid=sid or call_sid(), agent_id="agent-7",
                                     request_id=kw.pop("request_id", unique_name("req", 12)),
                                     **kw)
    return (await tokenizer.capture_as(kw.pop("who", CRM)).StartCapture(request)).capture


class Ivr:
    """Appends events as the IVR does: the IVR's role, the real SQL function."""

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn

    async def event(self, capture_id: str, state: str, field: str = "", digits: int = 0,
                    outcome: str = "", attempt: int = 0, **card: Any) -> int:
        conn = await asyncpg.connect(self.dsn)
        try:
            return await conn.fetchval(
                "SELECT capture_append_event($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)",
                capture_id, state, field, digits, outcome, attempt, card.get("token"),
                card.get("brand"), card.get("last4"), card.get("expiry_month"),
                card.get("expiry_year"), card.get("failure", ""))
        finally:
            await conn.close()


@pytest.fixture
def ivr(migrated: PostgresHandle) -> Ivr:
    return Ivr(migrated.ivr_dsn)


@pytest.fixture(autouse=True)
async def no_capture_left_pending(superuser_db: str) -> AsyncIterator[None]:
    """No IVR drives these captures: end them afterwards, so that an IVR started by a later
    test does not take their start commands for calls its simulator never placed."""
    yield
    conn = await asyncpg.connect(superuser_db)
    try:
        await conn.execute("UPDATE captures SET command = '', state = 'failed'"
                           " WHERE state IN ('started', 'capturing')")
    finally:
        await conn.close()


async def collect(stream: AsyncIterator[pb.WatchCaptureResponse]) -> list[pb.CaptureEvent]:
    return [r.event async for r in stream]


async def test_start_is_idempotent_and_one_per_call(tokenizer: Running) -> None:
    sid = call_sid()
    first = await start(tokenizer, sid, request_id="crm-req-a",
                        fields=pb.CaptureFields(security_code=True))
    assert first.state == pb.CAPTURE_STATE_STARTED and first.capture_id.startswith("cap_")
    assert (first.call_sid, first.agent_id, first.last_seq) == (sid, "agent-7", 1)
    assert first.fields.security_code and not first.fields.postal_code
    again = await start(tokenizer, sid, request_id="crm-req-a")
    assert again.capture_id == first.capture_id
    failure = await rpc_failure(start(tokenizer, sid, request_id="crm-req-b"))
    assert (failure.code, failure.reason) == (grpc.StatusCode.ALREADY_EXISTS,
                                              "CAPTURE_IN_PROGRESS")
    # The same request id for another call is a mistake, not a retry.
    failure = await rpc_failure(start(tokenizer, call_sid(), request_id="crm-req-a"))
    assert (failure.code, failure.reason) == (grpc.StatusCode.ALREADY_EXISTS,
                                              "REQUEST_ID_REUSED")
    got = await tokenizer.capture_as(CRM).GetCapture(
        pb.GetCaptureRequest(capture_id=first.capture_id))
    assert got.capture == first


async def test_watchers_follow_live_events_and_resume_without_loss(
    tokenizer: Running, ivr: Ivr
) -> None:
    capture = await start(tokenizer)
    stub = tokenizer.capture_as(CRM)
    cid = capture.capture_id
    watchers = [asyncio.ensure_future(collect(stub.WatchCapture(
        pb.WatchCaptureRequest(capture_id=cid)))) for _ in range(2)]
    await asyncio.sleep(0.3)
    await ivr.event(cid, "capturing", "card-number", 4, attempt=1)
    # A third watcher joins late and sees the same history.
    late = stub.WatchCapture(pb.WatchCaptureRequest(capture_id=cid))
    first_two = [(await anext(aiter(late))).event.seq for _ in range(2)]
    assert first_two == [1, 2]
    await ivr.event(cid, "capturing", "card-number", 16, "valid", 1)
    await ivr.event(cid, "capturing", "expiration-date", 2, attempt=1)
    await ivr.event(cid, "completed", "", 0, "", 0, token="tok_" + "C" * 22, brand=1,
                    last4="1111", expiry_month=12, expiry_year=2031)
    streams = await asyncio.wait_for(asyncio.gather(*watchers), 10)
    for events in streams:
        assert [e.seq for e in events] == [1, 2, 3, 4, 5]
        assert [e.state for e in events] == [
            pb.CAPTURE_STATE_STARTED, pb.CAPTURE_STATE_CAPTURING, pb.CAPTURE_STATE_CAPTURING,
            pb.CAPTURE_STATE_CAPTURING, pb.CAPTURE_STATE_COMPLETED]
        assert events[2].field_outcome == "valid" and events[1].digits_entered == 4
        assert (events[-1].card.token, events[-1].card.last4, events[-1].card.brand) == (
            "tok_" + "C" * 22, "1111", tpb.CARD_BRAND_VISA)
    # Reconnecting after seq 3 gives exactly the rest, then the stream ends.
    resumed = await collect(stub.WatchCapture(pb.WatchCaptureRequest(capture_id=cid,
                                                                     after_seq=3)))
    assert [e.seq for e in resumed] == [4, 5]
    got = (await stub.GetCapture(pb.GetCaptureRequest(capture_id=cid))).capture
    assert got.state == pb.CAPTURE_STATE_COMPLETED and got.card.expiry_year == 2031


async def test_cancel_and_restart_leave_commands_until_the_capture_ends(
    tokenizer: Running, ivr: Ivr, superuser_db: str
) -> None:
    capture = await start(tokenizer, fields=pb.CaptureFields(postal_code=True))
    stub = tokenizer.capture_as(CRM)
    cid = capture.capture_id
    await stub.RestartCaptureField(pb.RestartCaptureFieldRequest(
        capture_id=cid, field=pb.CAPTURE_FIELD_POSTAL_CODE))
    failure = await rpc_failure(stub.RestartCaptureField(pb.RestartCaptureFieldRequest(
        capture_id=cid, field=pb.CAPTURE_FIELD_SECURITY_CODE)))
    assert (failure.code, failure.reason) == (grpc.StatusCode.INVALID_ARGUMENT,
                                              "FIELD_NOT_REQUESTED")
    await stub.CancelCapture(pb.CancelCaptureRequest(capture_id=cid))
    conn = await asyncpg.connect(superuser_db)
    try:
        assert await conn.fetchval("SELECT command FROM captures WHERE id = $1", cid) == "cancel"
    finally:
        await conn.close()
    await ivr.event(cid, "cancelled", failure="agent-cancelled")
    failure = await rpc_failure(stub.CancelCapture(pb.CancelCaptureRequest(capture_id=cid)))
    assert (failure.code, failure.reason) == (grpc.StatusCode.FAILED_PRECONDITION,
                                              "CAPTURE_ENDED")
    got = (await stub.GetCapture(pb.GetCaptureRequest(capture_id=cid))).capture
    assert (got.state, got.failure_reason) == (pb.CAPTURE_STATE_CANCELLED, "agent-cancelled")
    # A new capture may start on the call once this one has ended.
    assert (await start(tokenizer, capture.call_sid)).capture_id != cid


@pytest.mark.parametrize(("fields", "reason"), [
    ({"call_sid": "CA123"}, "INVALID_CALL_SID"),
    ({"agent_id": "4111 1111 1111 1111"}, "INVALID_AGENT_ID"),
    ({"agent_id": ""}, "INVALID_AGENT_ID"),
    ({"request_id": "4111111111111111"}, "INVALID_REQUEST_ID"),
    ({"request_id": ""}, "INVALID_REQUEST_ID"),
    ({"tenant": "Bad Tenant"}, "INVALID_TENANT"),
    ({"token_format": 99}, "INVALID_TOKEN_FORMAT"),
])
async def test_bad_start_requests_are_refused_without_echo(
    tokenizer: Running, fields: dict[str, Any], reason: str
) -> None:
    request = pb.StartCaptureRequest(call_sid=call_sid(), agent_id="agent-7",
                                     request_id="req-x")
    for key, value in fields.items():
        setattr(request, key, value)
    failure = await rpc_failure(tokenizer.capture_as(CRM).StartCapture(request))
    assert failure.reason == reason and "4111" not in failure.raw


async def test_captures_are_bound_to_tenants_and_ids_are_checked(tokenizer: Running) -> None:
    capture = await start(tokenizer)
    bound = tokenizer.capture_as("crm/crm-tenant-a")
    failure = await rpc_failure(bound.GetCapture(pb.GetCaptureRequest(
        capture_id=capture.capture_id)))
    assert (failure.code, failure.reason) == (grpc.StatusCode.NOT_FOUND, "CAPTURE_NOT_FOUND")
    failure = await rpc_failure(collect(bound.WatchCapture(pb.WatchCaptureRequest(
        capture_id=capture.capture_id))))
    assert failure.code == grpc.StatusCode.NOT_FOUND
    failure = await rpc_failure(bound.StartCapture(pb.StartCaptureRequest(
        call_sid=call_sid(), agent_id="a", request_id="r", tenant="default")))
    assert failure.reason == "TENANT_NOT_ALLOWED"
    failure = await rpc_failure(tokenizer.capture_as(CRM).GetCapture(
        pb.GetCaptureRequest(capture_id="cap_4111111111111111zz")))
    assert failure.reason == "INVALID_CAPTURE_ID" and "4111" not in failure.raw


@pytest.mark.parametrize("who", ["ivr/ivr-1", "intake/intake-1", "settlement/settlement-1",
                                 "admin/admin-1"])
async def test_only_the_crm_role_runs_captures(tokenizer: Running, who: str) -> None:
    stub = tokenizer.capture_as(who)
    calls = [
        stub.StartCapture(pb.StartCaptureRequest(call_sid=call_sid(), agent_id="a",
                                                 request_id="r")),
        stub.GetCapture(pb.GetCaptureRequest(capture_id="cap_" + "a" * 20)),
        stub.CancelCapture(pb.CancelCaptureRequest(capture_id="cap_" + "a" * 20)),
        stub.RestartCaptureField(pb.RestartCaptureFieldRequest(capture_id="cap_" + "a" * 20)),
        collect(stub.WatchCapture(pb.WatchCaptureRequest(capture_id="cap_" + "a" * 20))),
    ]
    for call in calls:
        failure = await rpc_failure(call)
        assert (failure.code, failure.reason) == (grpc.StatusCode.PERMISSION_DENIED,
                                                  "METHOD_NOT_ALLOWED")


async def test_a_capture_no_ivr_starts_fails_instead_of_hanging(
    tokenizer: Running, superuser_db: str
) -> None:
    capture = await start(tokenizer)
    fresh = await start(tokenizer)
    conn = await asyncpg.connect(superuser_db)
    try:  # as if 31 seconds had passed with no IVR replica running
        await conn.execute("UPDATE captures SET created_at = now() - interval '31 seconds'"
                           " WHERE id = $1", capture.capture_id)
    finally:
        await conn.close()
    assert tokenizer.server.captures is not None
    assert await tokenizer.server.captures.expire_unclaimed() >= 1
    stub = tokenizer.capture_as(CRM)
    events = await collect(stub.WatchCapture(pb.WatchCaptureRequest(
        capture_id=capture.capture_id)))
    assert [(e.state, e.failure_reason) for e in events] == [
        (pb.CAPTURE_STATE_STARTED, ""), (pb.CAPTURE_STATE_FAILED, "ivr-unavailable")]
    got = (await stub.GetCapture(pb.GetCaptureRequest(capture_id=fresh.capture_id))).capture
    assert got.state == pb.CAPTURE_STATE_STARTED  # younger than the deadline: untouched
