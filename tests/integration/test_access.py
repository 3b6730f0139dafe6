"""Access control over real mTLS: every role × method × tenant, bad certificates, unknown and
revoked identities, quotas — and every answer, allowed or refused, in the audit trail."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import asyncpg
import grpc
import pytest

from tests.fixtures.tokenizer import Running
from tests.helpers import RpcFailure, rpc_failure, tokenize_request, unique_name
from vaultline.gen.admin.v1 import admin_pb2 as admin_pb
from vaultline.gen.settlement.v1 import settlement_pb2 as spb
from vaultline.gen.tokenization.v1 import tokenization_pb2 as pb
from vaultline.gen.tokenization.v1 import tokenization_service_pb2_grpc as pb_grpc
from vaultline.security.tls import channel_credentials

pytestmark = pytest.mark.integration

VISA = "4111111111111111"
ALLOWED = {
    "ivr": {"Tokenize", "BatchTokenize", "GetToken"},
    "intake": {"Tokenize", "BatchTokenize", "GetToken"},
    # Issue 14: the CRM may no longer tokenize (a PAN-confirmation oracle).
    "crm": {"GetToken", "DeleteToken"},
    "settlement": {"Detokenize", "BatchDetokenize", "GetToken"},
    # Issue 15: only the payment service redeems a held security code.
    "payments": {"RedeemSecurityCode", "GetToken"},
    "qa": set(),  # recordings only (tests/ivr/test_recording_service.py)
    # Issue 18: de-scoping tokenizes what a CRM stores and audits its chunks; reveals nothing.
    "descope": {"BatchTokenize", "GetToken", "RecordDescopeChunk"},
    "admin": set(),  # no TokenizationService method at all
}
METHODS = ["Tokenize", "BatchTokenize", "GetToken", "Detokenize", "BatchDetokenize", "DeleteToken",
           "RedeemSecurityCode", "RecordDescopeChunk"]
IDENTITY = {"ivr": "ivr/ivr-1", "intake": "intake/intake-1", "crm": "crm/crm-1",
            "settlement": "settlement/settlement-1", "payments": "payments/payments-1",
            "qa": "qa/qa-1", "admin": "admin/admin-1", "descope": "descope/descope-1"}


async def _invoke(stub: pb_grpc.TokenizationServiceStub, method: str, tenant: str, token: str):  # type: ignore[no-untyped-def]
    if method == "Tokenize":
        return await stub.Tokenize(tokenize_request(VISA, tenant=tenant))
    if method == "GetToken":
        return await stub.GetToken(pb.GetTokenRequest(tenant=tenant, token=token))
    if method == "Detokenize":
        return await stub.Detokenize(
            pb.DetokenizeRequest(tenant=tenant, token=token, purpose="access test"))
    if method == "DeleteToken":
        # Deleting a token nobody else uses: an unknown one is NOT_FOUND, which is "allowed".
        return await stub.DeleteToken(
            pb.DeleteTokenRequest(tenant=tenant, token="4000000000000001"))
    if method == "RedeemSecurityCode":  # none held: NOT_FOUND, which is "allowed"
        return await stub.RedeemSecurityCode(
            pb.RedeemSecurityCodeRequest(tenant=tenant, token=token))
    if method == "RecordDescopeChunk":
        return await stub.RecordDescopeChunk(pb.RecordDescopeChunkRequest(
            tenant=tenant, run_id="0123abcd" * 4, table="public.notes", chunk=1, rows_read=10))
    if method == "BatchTokenize":
        chunk = pb.BatchTokenizeRequest(tenant=tenant, items=[pb.BatchTokenizeRequest.Item(
            reference="a", card=pb.Card(pan=VISA, expiry_month=12, expiry_year=2031))])
        return [r async for r in stub.BatchTokenize(iter([chunk]))]
    if method == "BatchDetokenize":
        chunk = pb.BatchDetokenizeRequest(tenant=tenant, purpose="access test", items=[
            pb.BatchDetokenizeRequest.Item(reference="a", token=token)])
        return [r async for r in stub.BatchDetokenize(iter([chunk]))]
    raise AssertionError(method)


async def _outcome(call) -> grpc.StatusCode:  # type: ignore[no-untyped-def]
    try:
        await call
    except grpc.aio.AioRpcError as err:
        return err.code()
    return grpc.StatusCode.OK


async def _assert_allowed(call, role: str, method: str) -> None:  # type: ignore[no-untyped-def]
    """The role may call the method: the answer is OK or NOT_FOUND (an unknown token) — or,
    for a settlement identity's bulk reveal without a batch, dual control's refusal, which
    comes after authorization."""
    if (role, method) == ("settlement", "BatchDetokenize"):
        failure = await rpc_failure(call)
        assert (failure.code, failure.reason) == (
            grpc.StatusCode.PERMISSION_DENIED, "BATCH_REQUIRED"), (role, method)
        return
    code = await _outcome(call)
    assert code in (grpc.StatusCode.OK, grpc.StatusCode.NOT_FOUND), (role, method, code)


async def _audit_rows(superuser_db: str, identity: str) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(superuser_db)
    try:
        return await conn.fetch(
            "SELECT method, outcome, tenant, token FROM audit_log WHERE identity = $1"
            " ORDER BY seq", identity)
    finally:
        await conn.close()


@pytest.mark.parametrize("role", sorted(ALLOWED))
async def test_role_method_matrix(tokenizer: Running, role: str, superuser_db: str) -> None:
    tenant = unique_name("m-", 10)
    token = (await tokenizer.stub.Tokenize(tokenize_request(VISA, tenant=tenant))).token.token
    stub = tokenizer.as_(IDENTITY[role])
    for method in METHODS:
        if method in ALLOWED[role]:
            await _assert_allowed(_invoke(stub, method, tenant, token), role, method)
        else:
            failure = await rpc_failure(_invoke(stub, method, tenant, token))
            assert (failure.code, failure.reason) == (
                grpc.StatusCode.PERMISSION_DENIED, "METHOD_NOT_ALLOWED"), (role, method)
    rows = await _audit_rows(superuser_db, f"spiffe://vaultline/{IDENTITY[role]}")
    # A refused stream reads no chunk, so its record names no tenant.
    audited = {(r["method"], r["outcome"]) for r in rows if r["tenant"] in (tenant, "")}
    for method in METHODS:
        if method not in ALLOWED[role]:
            assert (method, "PERMISSION_DENIED") in audited, (role, method)
        else:
            assert any(m == method for m, _ in audited), (role, method)


@pytest.mark.parametrize("role", ["ivr", "crm", "settlement", "payments", "descope"])
async def test_tenant_binding(tokenizer: Running, role: str) -> None:
    # The -tenant-a identities may use tenant-a only.
    bound = tokenizer.as_(f"{role}/{role}-tenant-a")
    own = await tokenizer.stub.Tokenize(tokenize_request(VISA, tenant="tenant-a"))
    other = await tokenizer.stub.Tokenize(tokenize_request(VISA, tenant="tenant-b"))
    for method in sorted(ALLOWED[role]):
        await _assert_allowed(_invoke(bound, method, "tenant-a", own.token.token), role, method)
        failure = await rpc_failure(_invoke(bound, method, "tenant-b", other.token.token))
        assert (failure.code, failure.reason) == (
            grpc.StatusCode.PERMISSION_DENIED, "TENANT_NOT_ALLOWED"), (role, method)
        # The empty tenant is "default", which is not granted either.
        failure = await rpc_failure(_invoke(bound, method, "", other.token.token))
        assert failure.code == grpc.StatusCode.PERMISSION_DENIED


async def test_batch_chunk_for_another_tenant_ends_the_stream(tokenizer: Running) -> None:
    bound = tokenizer.as_("ivr/ivr-tenant-a")  # a role that may BatchTokenize
    item = pb.BatchTokenizeRequest.Item(
        reference="x", card=pb.Card(pan=VISA, expiry_month=12, expiry_year=2031))
    chunks = [pb.BatchTokenizeRequest(tenant="tenant-a", items=[item]),
              pb.BatchTokenizeRequest(tenant="tenant-b", items=[item])]

    async def consume() -> None:
        async for _ in bound.BatchTokenize(iter(chunks)):
            pass

    failure = await rpc_failure(consume())
    assert (failure.code, failure.reason) == (grpc.StatusCode.PERMISSION_DENIED,
                                              "TENANT_NOT_ALLOWED")


@pytest.mark.parametrize(
    "who,code,reason",
    [
        ("crm/crm-unlisted", grpc.StatusCode.PERMISSION_DENIED, "UNKNOWN_IDENTITY"),
        ("auditor/auditor-1", grpc.StatusCode.PERMISSION_DENIED, "UNKNOWN_ROLE"),
        ("crm/crm-revoked", grpc.StatusCode.UNAUTHENTICATED, "IDENTITY_REVOKED"),
    ],
)
async def test_unknown_and_revoked_identities(
    tokenizer: Running, who: str, code: grpc.StatusCode, reason: str, superuser_db: str
) -> None:
    failure = await rpc_failure(tokenizer.as_(who).Tokenize(tokenize_request(VISA)))
    assert (failure.code, failure.reason) == (code, reason)
    assert VISA not in failure.raw
    rows = await _audit_rows(superuser_db, f"spiffe://vaultline/{who}")
    assert rows and rows[-1]["outcome"] == code.name and rows[-1]["method"] == "Tokenize"


@pytest.mark.parametrize("case", ["no certificate", "another CA", "expired"])
async def test_bad_certificates_are_refused_at_the_handshake(tokenizer: Running, case: str) -> None:
    pki = tokenizer.pki
    if case == "no certificate":
        credentials = grpc.ssl_channel_credentials(root_certificates=pki.ca_pem)
    elif case == "another CA":
        cert = pki.certs["crm/wrong-ca"]
        credentials = channel_credentials(pki.ca_pem, cert.cert_pem, cert.key_pem)
    else:
        credentials = pki.credentials("crm/crm-expired")
    async with grpc.aio.secure_channel(tokenizer.server.address, credentials) as channel:
        stub = pb_grpc.TokenizationServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.Tokenize(tokenize_request(VISA), timeout=5)
    # The TLS handshake fails before any RPC exists: grpc reports UNAVAILABLE.
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_plaintext_clients_are_refused(tokenizer: Running) -> None:
    async with grpc.aio.insecure_channel(tokenizer.server.address) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await pb_grpc.TokenizationServiceStub(channel).Tokenize(
                tokenize_request(VISA), timeout=5)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE


async def spend_burst(call: Any, burst: int = 10, rate: float = 5.0) -> RpcFailure:
    """Call until the quota refuses; the refusal. At least `burst` calls pass, and no more
    than the bucket could have refilled meanwhile (the calls take time on a busy machine)."""
    started, passed = time.monotonic(), 0
    while True:
        try:
            await call()
        except grpc.aio.AioRpcError as err:
            refused = err
            break
        passed += 1
        assert passed <= burst + rate * (time.monotonic() - started) + 1, "never refused"
    assert passed >= burst, f"refused after {passed} calls, within the burst of {burst}"

    async def the_refusal() -> None:
        raise refused
    return await rpc_failure(the_refusal())


async def test_detokenize_quota_trips_and_recovers(tokenizer: Running) -> None:
    tenant = unique_name("q-", 10)
    token = (await tokenizer.stub.Tokenize(tokenize_request(VISA, tenant=tenant))).token.token
    tight = tokenizer.as_("bulk/bulk-tight")  # burst 10, 5 per second
    request = pb.DetokenizeRequest(tenant=tenant, token=token, purpose="quota test")
    failure = await spend_burst(lambda: tight.Detokenize(request))
    assert (failure.code, failure.reason) == (
        grpc.StatusCode.RESOURCE_EXHAUSTED, "DETOKENIZE_QUOTA_EXCEEDED")
    # A batch counts one per token: 4 tokens need 4 units.
    chunk = pb.BatchDetokenizeRequest(tenant=tenant, purpose="quota test", items=[
        pb.BatchDetokenizeRequest.Item(reference=str(i), token=token) for i in range(4)])

    async def batch() -> list[pb.BatchDetokenizeResponse]:
        return [r async for r in tight.BatchDetokenize(iter([chunk]))]

    assert (await rpc_failure(batch())).code == grpc.StatusCode.RESOURCE_EXHAUSTED
    # Another identity is unaffected.
    assert (await tokenizer.stub.Detokenize(request)).card.pan == VISA
    await asyncio.sleep(1.0)  # refills ~5
    (response,) = await batch()
    assert all(r.card.card.pan == VISA for r in response.results)
    refusals = tokenizer.server.metrics.registry.get_sample_value(
        "vaultline_quota_refusals_total",
        {"identity": "spiffe://vaultline/bulk/bulk-tight", "method": "Detokenize"})
    assert refusals and refusals >= 1


async def test_tokenize_quota_refuses_beyond_burst_and_is_per_identity(
    tokenizer: Running,
) -> None:
    # Issue 14: every Tokenize answer tells the caller something about a card (its token, or
    # that it was seen before), so a tokenizing identity has a bucket of its own.
    tenant = unique_name("q-", 10)
    tight = tokenizer.as_("ivr/ivr-tight")  # tokenize burst 10, 5 per second
    request = tokenize_request(VISA, tenant=tenant)
    failure = await spend_burst(lambda: tight.Tokenize(request))
    assert (failure.code, failure.reason) == (
        grpc.StatusCode.RESOURCE_EXHAUSTED, "TOKENIZE_QUOTA_EXCEEDED")
    chunk = pb.BatchTokenizeRequest(tenant=tenant, items=[pb.BatchTokenizeRequest.Item(
        reference=str(i), card=pb.Card(pan=VISA, expiry_month=12, expiry_year=2031))
        for i in range(4)])

    async def batch() -> list[pb.BatchTokenizeResponse]:
        return [r async for r in tight.BatchTokenize(iter([chunk]))]

    assert (await rpc_failure(batch())).reason == "TOKENIZE_QUOTA_EXCEEDED"  # one per card
    await tokenizer.as_("ivr/ivr-1").Tokenize(request)  # another identity is unaffected
    await asyncio.sleep(1.0)  # refills ~5
    (response,) = await batch()
    assert len(response.results) == 4
    refusals = tokenizer.server.metrics.registry.get_sample_value(
        "vaultline_quota_refusals_total",
        {"identity": "spiffe://vaultline/ivr/ivr-tight", "method": "Tokenize"})
    assert refusals and refusals >= 1


async def test_tokenize_answers_are_counted_per_identity_and_kind(tokenizer: Running) -> None:
    tenant = unique_name("a-", 10)
    intake = tokenizer.as_("intake/intake-1")
    metric = tokenizer.server.metrics.registry.get_sample_value
    labels = {"identity": "spiffe://vaultline/intake/intake-1"}
    before = {a: metric("vaultline_tokenize_answers_total", {**labels, "answer": a}) or 0
              for a in ("new", "returning")}
    await intake.Tokenize(tokenize_request(VISA, tenant=tenant))
    await intake.Tokenize(tokenize_request(VISA, tenant=tenant))
    after = {a: metric("vaultline_tokenize_answers_total", {**labels, "answer": a})
             for a in ("new", "returning")}
    assert after == {"new": before["new"] + 1, "returning": before["returning"] + 1}


# ---- the administration API: admin only, and every other role refused -----------------------

ADMIN_METHODS = ["GetKeyStatus", "ListAuditRecords", "VerifyAuditChain", "RotateKek",
                 "ShredTenant"]


async def _invoke_admin(running: Running, who: str, method: str):  # type: ignore[no-untyped-def]
    if method in ("GetKeyStatus", "RotateKek", "ShredTenant"):
        stub = running.keys_as(who)
        request = {"GetKeyStatus": admin_pb.GetKeyStatusRequest(),
                   "RotateKek": admin_pb.RotateKekRequest(),
                   # a tenant nobody uses: refused before anything, whoever asks
                   "ShredTenant": admin_pb.ShredTenantRequest(
                       tenant="never-used", confirm_tenant="never-used")}[method]
    else:
        stub = running.audit_as(who)
        request = (admin_pb.ListAuditRecordsRequest(page_size=5) if method == "ListAuditRecords"
                   else admin_pb.VerifyAuditChainRequest())
    return await getattr(stub, method)(request)


@pytest.mark.parametrize("role", ["ivr", "crm", "settlement"])
async def test_admin_methods_are_refused_to_other_roles(tokenizer: Running, role: str) -> None:
    for method in ADMIN_METHODS:
        failure = await rpc_failure(_invoke_admin(tokenizer, IDENTITY[role], method))
        assert (failure.code, failure.reason) == (
            grpc.StatusCode.PERMISSION_DENIED, "METHOD_NOT_ALLOWED"), (role, method)


SETTLEMENT_METHODS = {
    "CreateBatch": None, "ApproveBatch": spb.ApproveBatchRequest, "GetBatch": spb.GetBatchRequest,
    "ListBatches": spb.ListBatchesRequest, "ListBatchRows": spb.ListBatchRowsRequest,
    "StartRun": spb.StartRunRequest, "RenewRun": spb.RenewRunRequest,
    "FinishRun": spb.FinishRunRequest, "AbandonRun": spb.AbandonRunRequest,
}
NO_BATCH = "sb_0000000000"


async def _invoke_settlement(tokenizer: Running, who: str, method: str):  # type: ignore[no-untyped-def]
    stub = tokenizer.settlement_as(who)
    if method == "CreateBatch":
        async def empty():  # type: ignore[no-untyped-def]
            return
            yield

        return await stub.CreateBatch(empty())
    request_type = SETTLEMENT_METHODS[method]
    assert request_type is not None
    fields = {"batch_id": NO_BATCH} if "batch_id" in request_type.DESCRIPTOR.fields_by_name \
        else {}
    return await getattr(stub, method)(request_type(**fields))


@pytest.mark.parametrize("role", sorted(ALLOWED))
async def test_settlement_service_role_matrix(tokenizer: Running, role: str) -> None:
    """Only settlement identities reach the SettlementService (a bogus batch is then a plain
    NOT_FOUND, an empty one INVALID_ARGUMENT); for everyone else every method is refused."""
    for method in SETTLEMENT_METHODS:
        if role == "settlement":
            code = await _outcome(_invoke_settlement(tokenizer, IDENTITY[role], method))
            assert code in (grpc.StatusCode.OK, grpc.StatusCode.NOT_FOUND,
                            grpc.StatusCode.INVALID_ARGUMENT), (method, code)
        else:
            failure = await rpc_failure(_invoke_settlement(tokenizer, IDENTITY[role], method))
            assert (failure.code, failure.reason) == (
                grpc.StatusCode.PERMISSION_DENIED, "METHOD_NOT_ALLOWED"), (role, method)


async def test_admin_reads_keys_and_audit_and_rotates(tokenizer: Running) -> None:
    await tokenizer.stub.Tokenize(tokenize_request(VISA))
    who = IDENTITY["admin"]
    status = await _invoke_admin(tokenizer, who, "GetKeyStatus")
    assert status.kek_name == "vaultline-kek" and status.latest_version >= 1
    assert {d.purpose for d in status.data_keys} >= {"pan", "fingerprint"}
    page = await _invoke_admin(tokenizer, who, "ListAuditRecords")
    assert len(page.records) == 5 and page.next_page_token
    seqs = [r.seq for r in page.records]
    assert seqs == sorted(seqs, reverse=True)
    older = await tokenizer.audit_as(who).ListAuditRecords(
        admin_pb.ListAuditRecordsRequest(page_size=5, page_token=page.next_page_token))
    assert older.records[0].seq < seqs[-1]
    bad = await rpc_failure(tokenizer.audit_as(who).ListAuditRecords(
        admin_pb.ListAuditRecordsRequest(page_token="nope")))
    assert (bad.code, bad.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_PAGE_TOKEN")
    chain = await _invoke_admin(tokenizer, who, "VerifyAuditChain")
    assert chain.intact and chain.checked > 0, chain.problem
    rotated = await _invoke_admin(tokenizer, who, "RotateKek")
    assert rotated.latest_version == status.latest_version + 1
    after = await _invoke_admin(tokenizer, who, "GetKeyStatus")
    assert {d.kek_version for d in after.data_keys} == {rotated.latest_version}
    # The admin's own calls are audit records too.
    latest = await _invoke_admin(tokenizer, who, "ListAuditRecords")
    assert latest.records[0].identity == f"spiffe://vaultline/{who}"
    assert latest.records[0].method in ADMIN_METHODS


async def test_bound_admin_still_reads_tenantless_admin_api(tokenizer: Running) -> None:
    status = await _invoke_admin(tokenizer, "admin/admin-tenant-a", "GetKeyStatus")
    assert status.latest_version >= 1


async def test_each_revealed_chunk_is_one_record_listing_its_tokens(
    tokenizer: Running, superuser_db: str
) -> None:
    tenant = unique_name("r-", 10)
    pans = ["4111111111111111", "5555555555554444", "378282246310005", "6011111111111117"]
    tokens = [(await tokenizer.stub.Tokenize(tokenize_request(p, tenant=tenant))).token.token
              for p in pans]
    purpose = "reveal-list " + tenant
    chunks = [
        pb.BatchDetokenizeRequest(tenant=tenant, purpose=purpose, items=[
            pb.BatchDetokenizeRequest.Item(reference=str(i), token=t)
            for i, t in enumerate(tokens[:3])]),
        pb.BatchDetokenizeRequest(tenant=tenant, purpose=purpose, items=[
            pb.BatchDetokenizeRequest.Item(reference="unknown", token="4000000000000002"),
            pb.BatchDetokenizeRequest.Item(reference="3", token=tokens[3])]),
    ]
    stub = tokenizer.as_("bulk/bulk-1")  # no batch: the chunk mechanics alone
    answers = [r async for r in stub.BatchDetokenize(iter(chunks))]
    assert [len(a.results) for a in answers] == [3, 2]

    conn = await asyncpg.connect(superuser_db)
    try:
        rows = await conn.fetch(
            "SELECT seq, identity, method, outcome, token, tokens FROM audit_log"
            " WHERE purpose = $1 ORDER BY seq", purpose)
    finally:
        await conn.close()
    # One record per chunk, naming exactly the tokens revealed (not the unknown one), then the
    # call's own record. Chunks are pipelined, so their two records may commit in either order.
    records = [(r["method"], r["outcome"], r["token"], list(r["tokens"])) for r in rows]
    assert sorted(records[:2], key=lambda r: -len(r[3])) + records[2:] == [
        ("BatchDetokenize", "OK", "", tokens[:3]),
        ("BatchDetokenize", "OK", "", tokens[3:]),
        ("BatchDetokenize", "OK", "", []),
    ]
    assert {r["identity"] for r in rows} == {"spiffe://vaultline/bulk/bulk-1"}

    page = await tokenizer.audit_as(IDENTITY["admin"]).ListAuditRecords(
        admin_pb.ListAuditRecordsRequest(page_size=500))
    listed = {r.seq: list(r.tokens) for r in page.records}
    # The API lists each chunk's record with the tokens the database holds for it (in
    # whichever order the pipelined chunks committed).
    assert [listed.get(r["seq"]) for r in rows[:2]] == [list(r["tokens"]) for r in rows[:2]]
    chain = await tokenizer.audit_as(IDENTITY["admin"]).VerifyAuditChain(
        admin_pb.VerifyAuditChainRequest())
    assert chain.intact, chain.problem


async def test_the_tokenizer_checkpoints_the_chain_and_verifies_against_it(
    tokenizer: Running,
) -> None:
    await tokenizer.stub.Tokenize(tokenize_request(VISA))
    checkpointer = tokenizer.server.checkpointer
    assert checkpointer is not None
    filed = await checkpointer.checkpoint()  # as its loop does every minute / 1,000 records
    assert filed is not None and filed.seq >= 1
    chain = await tokenizer.audit_as(IDENTITY["admin"]).VerifyAuditChain(
        admin_pb.VerifyAuditChainRequest())
    assert chain.intact, chain.problem
    assert chain.checked >= filed.seq


async def test_concurrent_tokenize_calls_each_get_one_record_naming_their_token(
    tokenizer: Running, superuser_db: str
) -> None:
    # Concurrent unary calls are coalesced into shared chunks, and each chunk appends its
    # callers' records together: every call must still get exactly its own record.
    tenant = unique_name("u-", 10)
    pans = ["4111111111111111", "5555555555554444", "378282246310005", "6011111111111117"]
    callers = {"intake": "intake/intake-1", "ivr": "ivr/ivr-1"}
    calls = []
    for i in range(24):
        role = "intake" if i % 2 else "ivr"
        request = tokenize_request(pans[i % len(pans)], tenant=tenant)
        if i % 6 == 0:
            request.request_id = f"idem-{tenant}-{i % 12}"  # the idempotent path, replayed once
        calls.append((role, f"conc-{tenant}-{i}", request))
    answers = await asyncio.gather(*(
        tokenizer.as_(callers[role]).Tokenize(request, metadata=(("x-request-id", rid),))
        for role, rid, request in calls))

    conn = await asyncpg.connect(superuser_db)
    try:
        rows = await conn.fetch(
            "SELECT request_id, identity, method, outcome, tenant, token FROM audit_log"
            " WHERE request_id LIKE $1 ORDER BY seq", f"conc-{tenant}-%")
    finally:
        await conn.close()
    recorded: dict[str, list[tuple[str, str, str, str, str]]] = {}
    for r in rows:
        recorded.setdefault(r["request_id"], []).append(
            (r["identity"], r["method"], r["outcome"], r["tenant"], r["token"]))
    assert recorded == {
        rid: [(f"spiffe://vaultline/{callers[role]}", "Tokenize", "OK", tenant,
               answer.token.token)]
        for (role, rid, _), answer in zip(calls, answers, strict=True)
    }
    # One token per card, however the calls were grouped.
    assert len({a.token.token for a in answers}) == len(pans)


async def test_shredding_a_tenant_destroys_its_keys_and_tokens(
    tokenizer: Running, superuser_db: str
) -> None:
    tenant = unique_name("s-", 10)
    intake = tokenizer.as_("intake/intake-1")
    pans = ["4111111111111111", "5555555555554444", "378282246310005"]
    tokens = [(await intake.Tokenize(tokenize_request(p, tenant=tenant))).token.token
              for p in pans]
    keys = tokenizer.keys_as(IDENTITY["admin"])
    mismatch = await rpc_failure(keys.ShredTenant(admin_pb.ShredTenantRequest(
        tenant=tenant, confirm_tenant=tenant + "x")))
    assert (mismatch.code, mismatch.reason) == (grpc.StatusCode.INVALID_ARGUMENT,
                                                "CONFIRMATION_MISMATCH")
    bound = await rpc_failure(tokenizer.keys_as("admin/admin-tenant-a").ShredTenant(
        admin_pb.ShredTenantRequest(tenant=tenant, confirm_tenant=tenant)))
    assert bound.reason == "TENANT_NOT_ALLOWED"
    conn = await asyncpg.connect(superuser_db)
    try:
        destroyed = {r["id"] for r in await conn.fetch(
            "SELECT id FROM data_keys WHERE tenant = $1", tenant)}
        shred = await keys.ShredTenant(admin_pb.ShredTenantRequest(
            tenant=tenant, confirm_tenant=tenant))
        assert (shred.data_keys_destroyed, shred.tokens_deleted) == (len(destroyed), 3)
        assert await conn.fetchval(
            "SELECT count(*) FROM data_keys WHERE tenant = $1", tenant) == 0
        for token in tokens:
            failure = await rpc_failure(tokenizer.as_(IDENTITY["settlement"]).Detokenize(
                pb.DetokenizeRequest(tenant=tenant, token=token, purpose="after shred")))
            assert failure.code == grpc.StatusCode.NOT_FOUND
        # The tenant starts again from nothing: new keys, a new token for the same card.
        again = await intake.Tokenize(tokenize_request(pans[0], tenant=tenant))
        assert again.created and again.token.token != tokens[0]
        fresh = {r["id"] for r in await conn.fetch(
            "SELECT id FROM data_keys WHERE tenant = $1", tenant)}
        assert fresh and not fresh & destroyed
        audited = await conn.fetchval(
            "SELECT count(*) FROM audit_log WHERE method LIKE '%ShredTenant' AND tenant = $1"
            " AND outcome = 'OK'", tenant)
        assert audited == 1
    finally:
        await conn.close()
