"""Fuzzing every RPC's inputs (hypothesis): never INTERNAL, never an input echoed back.

Each example goes over real mTLS gRPC to a tokenizer on real OpenBao and PostgreSQL, as a role
allowed to call the method, so what is exercised is validation and the domain, not the gate.
"""

from __future__ import annotations

import grpc
import pytest
from google.protobuf import duration_pb2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.fixtures.tokenizer import Running
from vaultline import errors as domain_errors
from vaultline.api.errors import INTERNAL_MESSAGE
from vaultline.gen.tokenization.v1 import tokenization_pb2 as pb
from vaultline.security import access
from vaultline.service import DataCorrupted

pytestmark = pytest.mark.integration

# Every message the service may answer with: fixed texts, so nothing sent can come back.
FIXED_MESSAGES = {
    cls.message
    for module in (domain_errors, access)
    for cls in vars(module).values()
    if isinstance(cls, type) and issubclass(cls, domain_errors.VaultlineError)
} | {DataCorrupted.message, INTERNAL_MESSAGE}

FUZZ = settings(
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

text = st.text(max_size=80)
digits = st.text(alphabet="0123456789 -", min_size=0, max_size=25)
anything = st.one_of(text, digits, st.sampled_from(["4111111111111111", "tok_", "", " "]))
ints = st.integers(min_value=-(2**31), max_value=2**31 - 1)
durations = st.one_of(st.none(), st.builds(
    duration_pb2.Duration, seconds=st.integers(-(10**11), 10**11),
    nanos=st.integers(-999_999_999, 999_999_999)))
cards = st.builds(pb.Card, pan=anything, expiry_month=ints, expiry_year=ints,
                  cardholder_name=text)


def _checked(err: grpc.aio.AioRpcError, *inputs: object) -> None:
    assert err.code() not in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN), err
    assert err.details() in FIXED_MESSAGES, err.details()
    for value in inputs:
        if isinstance(value, str) and len(value.strip()) >= 6 and not any(
                value in fixed for fixed in FIXED_MESSAGES) and not value.isupper():
            assert value not in err.details()
            assert value.encode() not in err.trailing_metadata().__repr__().encode()


@FUZZ
@given(card=cards, tenant=anything, fmt=ints, request_id=anything, ttl=durations,
       security_code=st.one_of(digits, text))
async def test_fuzz_tokenize(tokenizer: Running, card, tenant, fmt, request_id, ttl,  # type: ignore[no-untyped-def]
                             security_code) -> None:
    request = pb.TokenizeRequest(tenant=tenant, card=card, format=fmt, request_id=request_id,
                                 security_code=security_code)
    if ttl is not None:
        request.ttl.CopyFrom(ttl)
    try:
        await tokenizer.stub.Tokenize(request)
    except grpc.aio.AioRpcError as err:
        _checked(err, card.pan, tenant, request_id, card.cardholder_name, security_code)


@FUZZ
@given(tenant=anything, token=anything, purpose=anything)
async def test_fuzz_token_reads(tokenizer: Running, tenant, token, purpose) -> None:  # type: ignore[no-untyped-def]
    for call in (
        tokenizer.stub.GetToken(pb.GetTokenRequest(tenant=tenant, token=token)),
        tokenizer.stub.Detokenize(pb.DetokenizeRequest(tenant=tenant, token=token,
                                                       purpose=purpose)),
        tokenizer.stub.DeleteToken(pb.DeleteTokenRequest(tenant=tenant, token=token)),
        tokenizer.stub.RedeemSecurityCode(
            pb.RedeemSecurityCodeRequest(tenant=tenant, token=token)),
    ):
        try:
            await call
        except grpc.aio.AioRpcError as err:
            _checked(err, tenant, token, purpose)


@FUZZ
@given(tenant=anything, fmt=ints, items=st.lists(st.tuples(text, cards), max_size=5))
async def test_fuzz_batch_tokenize(tokenizer: Running, tenant, fmt, items) -> None:  # type: ignore[no-untyped-def]
    chunk = pb.BatchTokenizeRequest(tenant=tenant, format=fmt, items=[
        pb.BatchTokenizeRequest.Item(reference=ref, card=card) for ref, card in items])
    try:
        async for response in tokenizer.stub.BatchTokenize(iter([chunk])):
            assert [r.reference for r in response.results] == [ref for ref, _ in items]
            for result, (_, card) in zip(response.results, items, strict=True):
                _checked_item(result, card)
    except grpc.aio.AioRpcError as err:
        _checked(err, tenant)


def _checked_item(result: pb.BatchTokenizeResponse.Result, card: pb.Card) -> None:
    """A failed item: a fixed message, never INTERNAL, never the card number."""
    if result.HasField("error"):
        assert result.error.code != grpc.StatusCode.INTERNAL.value[0]
        assert result.error.message in FIXED_MESSAGES
        if len(card.pan) >= 6:
            assert card.pan not in str(result.error)


@FUZZ
@given(tenant=anything, fmt=ints, items=st.lists(st.tuples(text, cards), max_size=5))
async def test_fuzz_batch_tokenize_without_expiry(tokenizer: Running, tenant, fmt, items) -> None:  # type: ignore[no-untyped-def]
    chunk = pb.BatchTokenizeRequest(tenant=tenant, format=fmt, expiry_unknown=True, items=[
        pb.BatchTokenizeRequest.Item(reference=ref, card=card) for ref, card in items])
    try:
        async for response in tokenizer.as_("descope/descope-1").BatchTokenize(iter([chunk])):
            for result, (_, card) in zip(response.results, items, strict=True):
                _checked_item(result, card)
                if not result.HasField("error"):  # only a card given without an expiry
                    assert (card.expiry_month, card.expiry_year) == (0, 0)
                    assert result.token.expiry_month == 0
    except grpc.aio.AioRpcError as err:
        _checked(err, tenant)


counts = st.integers(min_value=-(2**63), max_value=2**63 - 1)


@FUZZ
@given(tenant=anything, run_id=anything, table=anything, chunk=counts, rows=counts,
       cards_replaced=counts)
async def test_fuzz_record_descope_chunk(tokenizer: Running, tenant, run_id, table, chunk,  # type: ignore[no-untyped-def]
                                         rows, cards_replaced) -> None:
    try:
        await tokenizer.as_("descope/descope-1").RecordDescopeChunk(pb.RecordDescopeChunkRequest(
            tenant=tenant, run_id=run_id, table=table, chunk=chunk, rows_read=rows,
            cards_replaced=cards_replaced))
    except grpc.aio.AioRpcError as err:
        _checked(err, tenant, run_id, table)


@FUZZ
@given(tenant=anything, purpose=anything, items=st.lists(st.tuples(text, anything), max_size=5))
async def test_fuzz_batch_detokenize(tokenizer: Running, tenant, purpose, items) -> None:  # type: ignore[no-untyped-def]
    chunk = pb.BatchDetokenizeRequest(tenant=tenant, purpose=purpose, items=[
        pb.BatchDetokenizeRequest.Item(reference=ref, token=token) for ref, token in items])
    try:
        async for response in tokenizer.stub.BatchDetokenize(iter([chunk])):
            for result, (_, token) in zip(response.results, items, strict=True):
                assert result.HasField("error"), "random tokens never exist"
                assert result.error.code != grpc.StatusCode.INTERNAL.value[0]
                assert result.error.message in FIXED_MESSAGES
                if len(token) >= 6:
                    assert token not in str(result.error)
    except grpc.aio.AioRpcError as err:
        _checked(err, tenant, purpose)


@FUZZ
@given(tenant=anything, sid=anything, purpose=anything, page_token=anything,
       page_size=ints, reason=anything, days=ints)
async def test_fuzz_recordings(tokenizer: Running, tenant, sid, purpose, page_token,  # type: ignore[no-untyped-def]
                               page_size, reason, days) -> None:
    from vaultline.gen.recordings.v1 import recordings_pb2 as rpb
    from vaultline.gen.recordings.v1 import recordings_service_pb2_grpc as rpb_grpc

    qa = rpb_grpc.RecordingServiceStub(tokenizer.channel("qa/qa-1"))
    admin = rpb_grpc.RecordingServiceStub(tokenizer.channel("admin/admin-1"))
    calls = [
        qa.ListRecordings(rpb.ListRecordingsRequest(tenant=tenant, page_size=page_size,
                                                    page_token=page_token)),
        qa.GetRecordingKey(rpb.GetRecordingKeyRequest(tenant=tenant, recording_sid=sid,
                                                      purpose=purpose)),
        admin.ReleaseRecording(rpb.ReleaseRecordingRequest(tenant=tenant, recording_sid=sid,
                                                           reason=reason)),
        # Refused, or a century (which deletes nothing another test made).
        admin.PurgeRecordings(rpb.PurgeRecordingsRequest(
            older_than_days=days if days < 1 else 36_500)),
    ]
    for call in calls:
        try:
            await call
        except grpc.aio.AioRpcError as err:
            _checked(err, tenant, sid, purpose, page_token, reason)
    try:
        async for _ in qa.GetRecordingMedia(rpb.GetRecordingMediaRequest(
                tenant=tenant, recording_sid=sid)):
            pass
    except grpc.aio.AioRpcError as err:
        _checked(err, tenant, sid)
