"""Dual control enforced by the tokenizer (issue 14, finding 2): the SettlementService over
real mTLS, PostgreSQL and OpenBao, and the three bypasses the review found — each a
regression test that the old code failed:

(a) `settlement-1` alone revealed any token in bulk with a made-up purpose;
(b) approving needed only the second identity's public certificate;
(c) the application's database role approved a batch with one SQL UPDATE.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Sequence

import asyncpg
import grpc
import pytest

from tests.fixtures.infra import PostgresHandle
from tests.fixtures.tokenizer import Running
from tests.helpers import rpc_failure, synthetic_pans, unique_name
from vaultline.batches import RowsDigest
from vaultline.gen.settlement.v1 import settlement_pb2 as spb
from vaultline.gen.settlement.v1 import settlement_service_pb2_grpc as sgrpc
from vaultline.gen.tokenization.v1 import tokenization_pb2 as pb
from vaultline.gen.tokenization.v1 import tokenization_service_pb2_grpc as pb_grpc
from vaultline.security.tls import channel_credentials

pytestmark = pytest.mark.integration

CREATOR = "settlement/settlement-1"
APPROVER = "settlement/settlement-2"
RUNNER = "settlement/settlement-runner"
INPUT_SHA = "0" * 64


async def tokens_for(tokenizer: Running, n: int, start: int) -> list[str]:
    items = [pb.BatchTokenizeRequest.Item(reference=str(i), card=pb.Card(
        pan=pan, expiry_month=1 + i % 12, expiry_year=2031))
        for i, pan in enumerate(synthetic_pans(n, start=start, prefix="4000"))]
    out = []
    async for response in tokenizer.stub.BatchTokenize(iter([pb.BatchTokenizeRequest(
            items=items)])):
        out += [r.token.token for r in response.results]
    return out


def rows_of(tokens: Sequence[str], prefix: str) -> list[spb.BatchRow]:
    return [spb.BatchRow(line=i + 2, reference=f"{prefix}{i}", token=t, amount_minor=100 + i,
                         currency="EUR") for i, t in enumerate(tokens)]


def digest(rows: Sequence[spb.BatchRow]) -> str:
    d = RowsDigest()
    for r in rows:
        d.update(r.reference, r.token, r.amount_minor, r.currency, r.auth_code)
    return d.hexdigest()


async def create(tokenizer: Running, rows: list[spb.BatchRow], who: str = CREATOR,
                 tenant: str = "") -> spb.Batch:
    async def stream() -> AsyncIterator[spb.CreateBatchRequest]:
        yield spb.CreateBatchRequest(tenant=tenant, input_name="captures.csv",
                                     input_sha256=INPUT_SHA, rows=rows[:3])
        for o in range(3, len(rows), 3):
            yield spb.CreateBatchRequest(rows=rows[o:o + 3])

    return (await tokenizer.settlement_as(who).CreateBatch(stream())).batch


async def approved(tokenizer: Running, n: int = 5, start: int = 0) -> tuple[spb.Batch, list[
        spb.BatchRow]]:
    tokens = await tokens_for(tokenizer, n, start)
    rows = rows_of(tokens, unique_name("ref", 8) + "-")
    batch = await create(tokenizer, rows)
    await tokenizer.settlement_as(APPROVER).ApproveBatch(
        spb.ApproveBatchRequest(batch_id=batch.batch_id, rows_sha256=digest(rows)))
    return batch, rows


def chunk(batch_id: str, rows: Sequence[spb.BatchRow], **kw: str) -> pb.BatchDetokenizeRequest:
    return pb.BatchDetokenizeRequest(batch_id=batch_id, items=[
        pb.BatchDetokenizeRequest.Item(reference=r.reference, token=r.token) for r in rows],
        **kw)


async def reveal(stub: pb_grpc.TokenizationServiceStub,
                 *chunks: pb.BatchDetokenizeRequest) -> list[pb.BatchDetokenizeResponse]:
    return [r async for r in stub.BatchDetokenize(iter(chunks))]


async def start(tokenizer: Running, batch_id: str, who: str = CREATOR) -> spb.Batch:
    return (await tokenizer.settlement_as(who).StartRun(
        spb.StartRunRequest(batch_id=batch_id, host="test", pid=1))).batch


async def test_create_approve_run_reveal_finish(tokenizer: Running, superuser_db: str) -> None:
    tokens = await tokens_for(tokenizer, 7, 100)
    rows = rows_of(tokens, "full-")
    batch = await create(tokenizer, rows)
    assert batch.state == spb.BATCH_STATE_CREATED
    assert batch.row_count == 7 and batch.rows_sha256 == digest(rows)
    assert [(t.currency, t.count, t.amount_minor) for t in batch.totals] == [
        ("EUR", 7, sum(100 + i for i in range(7)))]
    assert batch.created_by == "spiffe://vaultline/" + CREATOR

    got = await tokenizer.settlement_as(APPROVER).ApproveBatch(
        spb.ApproveBatchRequest(batch_id=batch.batch_id, rows_sha256=digest(rows)))
    assert got.batch.state == spb.BATCH_STATE_APPROVED
    assert got.batch.approved_by == "spiffe://vaultline/" + APPROVER

    running = await start(tokenizer, batch.batch_id)
    assert running.state == spb.BATCH_STATE_RUNNING and running.run_by.endswith(CREATOR)
    listed = await tokenizer.settlement_as(CREATOR).ListBatchRows(
        spb.ListBatchRowsRequest(batch_id=batch.batch_id, page_size=4))
    assert [r.reference for r in listed.rows] == [r.reference for r in rows[:4]]

    answers = await reveal(tokenizer.as_(CREATOR), chunk(batch.batch_id, rows[:4]),
                           chunk(batch.batch_id, rows[4:]))
    cards = [r.card.card.pan for a in answers for r in a.results]
    assert cards == synthetic_pans(7, start=100, prefix="4000")

    await tokenizer.settlement_as(CREATOR).RenewRun(
        spb.RenewRunRequest(batch_id=batch.batch_id, run_id=running.run_id))
    done = await tokenizer.settlement_as(CREATOR).FinishRun(spb.FinishRunRequest(
        batch_id=batch.batch_id, run_id=running.run_id, summary_json='{"records": 7}'))
    assert done.batch.state == spb.BATCH_STATE_DONE
    # A done batch reveals nothing more, and is never run again.
    failure = await rpc_failure(reveal(tokenizer.as_(CREATOR), chunk(batch.batch_id, rows)))
    assert failure.code == grpc.StatusCode.PERMISSION_DENIED
    failure = await rpc_failure(start(tokenizer, batch.batch_id))
    assert (failure.code, failure.reason) == (grpc.StatusCode.FAILED_PRECONDITION,
                                              "BATCH_DONE")

    # Every state change is an audit record of the tokenizer, naming the batch and who.
    conn = await asyncpg.connect(superuser_db)
    try:
        trail = [(r["method"], r["outcome"], r["identity"].rsplit("/", 1)[1])
                 for r in await conn.fetch(
                     "SELECT method, outcome, identity FROM audit_log WHERE purpose = $1"
                     " ORDER BY seq", batch.batch_id)]
    finally:
        await conn.close()
    for step in [("CreateBatch", "OK", "settlement-1"), ("ApproveBatch", "OK", "settlement-2"),
                 ("StartRun", "OK", "settlement-1"), ("BatchDetokenize", "OK", "settlement-1"),
                 ("FinishRun", "OK", "settlement-1")]:
        assert step in trail, step


# ---- bypass (a): one settlement identity alone ------------------------------------------------


async def test_bulk_reveal_without_a_batch_is_refused(tokenizer: Running) -> None:
    tokens = await tokens_for(tokenizer, 3, 200)
    items = [pb.BatchDetokenizeRequest.Item(reference=str(i), token=t)
             for i, t in enumerate(tokens)]
    failure = await rpc_failure(reveal(tokenizer.as_(CREATOR), pb.BatchDetokenizeRequest(
        purpose="made-up purpose", items=items)))
    assert (failure.code, failure.reason) == (grpc.StatusCode.PERMISSION_DENIED,
                                              "BATCH_REQUIRED")


async def test_creator_alone_cannot_approve_or_reveal(tokenizer: Running) -> None:
    tokens = await tokens_for(tokenizer, 3, 300)
    rows = rows_of(tokens, "alone-")
    batch = await create(tokenizer, rows)
    creator = tokenizer.settlement_as(CREATOR)
    failure = await rpc_failure(creator.ApproveBatch(
        spb.ApproveBatchRequest(batch_id=batch.batch_id, rows_sha256=digest(rows))))
    assert (failure.code, failure.reason) == (grpc.StatusCode.PERMISSION_DENIED, "OWN_BATCH")
    failure = await rpc_failure(start(tokenizer, batch.batch_id))
    assert (failure.code, failure.reason) == (grpc.StatusCode.FAILED_PRECONDITION,
                                              "BATCH_NOT_APPROVED")
    failure = await rpc_failure(reveal(tokenizer.as_(CREATOR), chunk(batch.batch_id, rows)))
    assert (failure.code, failure.reason) == (grpc.StatusCode.PERMISSION_DENIED,
                                              "RUN_NOT_HELD")


async def test_only_rows_of_the_running_batch_are_revealed(tokenizer: Running) -> None:
    batch, rows = await approved(tokenizer, 4, 400)
    # Approved but not started: nothing.
    failure = await rpc_failure(reveal(tokenizer.as_(CREATOR), chunk(batch.batch_id, rows)))
    assert failure.reason == "RUN_NOT_HELD"
    await start(tokenizer, batch.batch_id)
    stranger = (await tokens_for(tokenizer, 1, 450))[0]
    smuggled = [*rows[:2], spb.BatchRow(reference=rows[2].reference, token=stranger)]
    failure = await rpc_failure(reveal(tokenizer.as_(CREATOR), chunk(batch.batch_id, smuggled)))
    assert (failure.code, failure.reason) == (grpc.StatusCode.PERMISSION_DENIED,
                                              "NOT_IN_BATCH")
    twice = [rows[0], rows[0]]
    failure = await rpc_failure(reveal(tokenizer.as_(CREATOR), chunk(batch.batch_id, twice)))
    assert failure.reason == "DUPLICATE_REFERENCE"
    # The approver may not run or reveal it; nor may a third settlement identity.
    for who in (APPROVER, "settlement/settlement-tight"):
        failure = await rpc_failure(reveal(tokenizer.as_(who), chunk(batch.batch_id, rows)))
        assert failure.code == grpc.StatusCode.PERMISSION_DENIED, who
    failure = await rpc_failure(start(tokenizer, batch.batch_id, APPROVER))
    assert failure.reason in ("APPROVER_CANNOT_RUN", "BATCH_RUN_LEASED")
    # The creator gets exactly its rows.
    answers = await reveal(tokenizer.as_(CREATOR), chunk(batch.batch_id, rows))
    assert len([r for r in answers[0].results if r.HasField("card")]) == 4


async def test_the_approver_never_runs_and_a_runner_may(tokenizer: Running) -> None:
    batch, rows = await approved(tokenizer, 2, 500)
    failure = await rpc_failure(start(tokenizer, batch.batch_id, APPROVER))
    assert (failure.code, failure.reason) == (grpc.StatusCode.PERMISSION_DENIED,
                                              "APPROVER_CANNOT_RUN")
    failure = await rpc_failure(start(tokenizer, batch.batch_id, "settlement/settlement-tight"))
    assert failure.reason == "NOT_CREATOR_OR_RUNNER"
    running = await start(tokenizer, batch.batch_id, RUNNER)
    assert running.run_by.endswith(RUNNER)
    answers = await reveal(tokenizer.as_(RUNNER), chunk(batch.batch_id, rows))
    assert all(r.HasField("card") for r in answers[0].results)


async def test_a_run_is_leased_abandoned_and_taken_over(tokenizer: Running) -> None:
    batch, _ = await approved(tokenizer, 2, 600)
    first = await start(tokenizer, batch.batch_id)
    failure = await rpc_failure(start(tokenizer, batch.batch_id, RUNNER))
    assert (failure.code, failure.reason) == (grpc.StatusCode.FAILED_PRECONDITION,
                                              "BATCH_RUN_LEASED")
    # Its own crashed run the caller may take over at once; someone else's, not.
    failure = await rpc_failure(tokenizer.settlement_as(RUNNER).StartRun(spb.StartRunRequest(
        batch_id=batch.batch_id, take_over_run_id=first.run_id)))
    assert failure.reason == "BATCH_RUN_LEASED"
    second = (await tokenizer.settlement_as(CREATOR).StartRun(spb.StartRunRequest(
        batch_id=batch.batch_id, take_over_run_id=first.run_id))).batch
    assert second.run_id != first.run_id and second.runs == 2
    failure = await rpc_failure(tokenizer.settlement_as(CREATOR).RenewRun(
        spb.RenewRunRequest(batch_id=batch.batch_id, run_id=first.run_id)))
    assert failure.reason == "RUN_NOT_HELD"
    await tokenizer.settlement_as(CREATOR).AbandonRun(
        spb.AbandonRunRequest(batch_id=batch.batch_id, run_id=second.run_id))
    third = await start(tokenizer, batch.batch_id, RUNNER)
    assert third.run_by.endswith(RUNNER)


# ---- bypass (b): approving takes the second identity's private key ---------------------------


async def test_approving_needs_the_approvers_private_key(tokenizer: Running) -> None:
    tokens = await tokens_for(tokenizer, 2, 700)
    rows = rows_of(tokens, "key-")
    batch = await create(tokenizer, rows)
    pki = tokenizer.pki
    # settlement-2's certificate, presented with settlement-1's key: the handshake fails.
    forged = channel_credentials(pki.ca_pem, pki.certs[APPROVER].cert_pem,
                                 pki.certs[CREATOR].key_pem)
    async with grpc.aio.secure_channel(tokenizer.server.address, forged) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await sgrpc.SettlementServiceStub(channel).ApproveBatch(spb.ApproveBatchRequest(
                batch_id=batch.batch_id, rows_sha256=digest(rows)), timeout=10)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    got = await tokenizer.settlement_as(CREATOR).GetBatch(
        spb.GetBatchRequest(batch_id=batch.batch_id))
    assert got.batch.state == spb.BATCH_STATE_CREATED


async def test_approval_names_the_rows_it_approves(tokenizer: Running) -> None:
    tokens = await tokens_for(tokenizer, 3, 800)
    rows = rows_of(tokens, "digest-")
    batch = await create(tokenizer, rows)
    other = digest([*rows[:2], spb.BatchRow(reference=rows[2].reference, token=rows[2].token,
                                            amount_minor=999_999, currency="EUR")])
    failure = await rpc_failure(tokenizer.settlement_as(APPROVER).ApproveBatch(
        spb.ApproveBatchRequest(batch_id=batch.batch_id, rows_sha256=other)))
    assert (failure.code, failure.reason, failure.fields) == (
        grpc.StatusCode.INVALID_ARGUMENT, "ROWS_DIGEST_MISMATCH", ["rows_sha256"])


# ---- bypass (c): the database role -----------------------------------------------------------


async def test_the_app_database_role_cannot_approve(
    tokenizer: Running, migrated: PostgresHandle, superuser_db: str
) -> None:
    tokens = await tokens_for(tokenizer, 2, 900)
    rows = rows_of(tokens, "sql-")
    batch = await create(tokenizer, rows)
    conn = await asyncpg.connect(migrated.app_dsn)
    try:
        # The one UPDATE of the review: refused outright.
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await conn.execute("UPDATE settlement_batches SET state = 'approved',"
                               " approved_by = 'nobody' WHERE id = $1", batch.batch_id)
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await conn.execute("DELETE FROM settlement_rows WHERE batch_id = $1",
                               batch.batch_id)
        # The functions check dual control themselves.
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await conn.execute("SELECT settlement_approve($1, $2, $3, 'vault:v1:x')",
                               batch.batch_id, "spiffe://vaultline/" + CREATOR, digest(rows))
        # An approval written through the function by the role itself has no valid signature.
        await conn.execute("SELECT settlement_approve($1, $2, $3, 'vault:v1:Zm9yZ2Vk')",
                           batch.batch_id, "spiffe://vaultline/" + APPROVER, digest(rows))
        # Rows no longer go into an approved batch.
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await conn.execute(
                "INSERT INTO settlement_rows (batch_id, line, reference, token, amount_minor,"
                " currency) VALUES ($1, 999, 'extra', $2, 1, 'EUR')", batch.batch_id, tokens[0])
    finally:
        await conn.close()
    failure = await rpc_failure(start(tokenizer, batch.batch_id))
    assert (failure.code, failure.reason) == (grpc.StatusCode.PERMISSION_DENIED,
                                              "APPROVAL_NOT_SIGNED")


async def test_rows_added_after_approval_stop_the_run(
    tokenizer: Running, superuser_db: str
) -> None:
    batch, rows = await approved(tokenizer, 2, 1000)
    conn = await asyncpg.connect(superuser_db)  # above the application role: the owner
    try:
        await conn.execute("SET session_replication_role = replica")  # triggers off
        extra = (await tokens_for(tokenizer, 1, 1050))[0]
        await conn.execute(
            "INSERT INTO settlement_rows (batch_id, line, reference, token, amount_minor,"
            " currency) VALUES ($1, 999, 'extra', $2, 1, 'EUR')", batch.batch_id, extra)
    finally:
        await conn.close()
    failure = await rpc_failure(start(tokenizer, batch.batch_id))
    assert (failure.code, failure.reason) == (grpc.StatusCode.PERMISSION_DENIED,
                                              "ROWS_CHANGED")


# ---- input, tenants, budget -------------------------------------------------------------------


@pytest.mark.parametrize("bad,field", [
    (dict(reference="4111 1111 1111 1111"), "rows[0].reference"),
    (dict(token="4111111111111111"), "rows[0].token"),
    (dict(amount_minor=0), "rows[0].amount_minor"),
    (dict(currency="XXX"), "rows[0].currency"),
    (dict(auth_code="not-alnum!"), "rows[0].auth_code"),
])
async def test_a_bad_row_creates_nothing(tokenizer: Running, bad: dict, field: str) -> None:  # type: ignore[type-arg]
    token = (await tokens_for(tokenizer, 1, 1100))[0]
    row = dict(line=2, reference="ok", token=token, amount_minor=1, currency="EUR")
    row.update(bad)
    tenant = unique_name("bad", 8)
    failure = await rpc_failure(create(tokenizer, [spb.BatchRow(**row)], tenant=tenant))
    assert (failure.code, failure.reason, failure.fields) == (
        grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ROW", [field])
    assert "4111" not in failure.raw
    listed = await tokenizer.settlement_as(CREATOR).ListBatches(
        spb.ListBatchesRequest(tenant=tenant))
    assert list(listed.batches) == []


async def test_duplicate_references_and_empty_batches_are_refused(tokenizer: Running) -> None:
    tokens = await tokens_for(tokenizer, 2, 1200)
    rows = rows_of(tokens, "dup-")
    rows[1].reference = rows[0].reference
    failure = await rpc_failure(create(tokenizer, rows))
    assert failure.reason == "DUPLICATE_REFERENCE"
    failure = await rpc_failure(create(tokenizer, []))
    assert failure.reason == "EMPTY_BATCH"


async def test_batches_are_bound_to_tenants(tokenizer: Running) -> None:
    batch, _ = await approved(tokenizer, 1, 1300)
    bound = tokenizer.settlement_as("settlement/settlement-tenant-a")
    failure = await rpc_failure(bound.GetBatch(spb.GetBatchRequest(batch_id=batch.batch_id)))
    assert (failure.code, failure.reason) == (grpc.StatusCode.NOT_FOUND, "BATCH_NOT_FOUND")
    failure = await rpc_failure(bound.ListBatches(spb.ListBatchesRequest(tenant="default")))
    assert failure.reason == "TENANT_NOT_ALLOWED"


async def test_list_batches_pages_newest_first(tokenizer: Running) -> None:
    tenant = unique_name("page", 8)
    tokens = await tokens_for(tokenizer, 3, 1400)
    made = [(await create(tokenizer, rows_of([t], f"p{i}-"), tenant=tenant)).batch_id
            for i, t in enumerate(tokens)]
    stub = tokenizer.settlement_as(CREATOR)
    first = await stub.ListBatches(spb.ListBatchesRequest(tenant=tenant, page_size=2))
    second = await stub.ListBatches(spb.ListBatchesRequest(
        tenant=tenant, page_size=2, page_token=first.next_page_token))
    assert [b.batch_id for b in (*first.batches, *second.batches)] == made[::-1]
    failure = await rpc_failure(stub.ListBatches(spb.ListBatchesRequest(
        tenant=tenant, page_token="99999999999999999999999.sb_0")))
    assert (failure.code, failure.reason) == (grpc.StatusCode.INVALID_ARGUMENT,
                                              "INVALID_PAGE_TOKEN")


async def test_unary_detokenize_has_a_daily_budget(tokenizer: Running) -> None:
    token = (await tokens_for(tokenizer, 1, 1500))[0]
    stub = tokenizer.as_("settlement/settlement-daily")
    request = pb.DetokenizeRequest(token=token, purpose="chargeback look-up")
    for _ in range(3):
        await stub.Detokenize(request)
    failure = await rpc_failure(stub.Detokenize(request))
    assert (failure.code, failure.reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED,
                                              "DETOKENIZE_DAILY_BUDGET_EXCEEDED")


async def test_bad_ids_are_invalid_arguments(tokenizer: Running) -> None:
    stub = tokenizer.settlement_as(CREATOR)
    failure = await rpc_failure(stub.GetBatch(spb.GetBatchRequest(batch_id="4111111111111111")))
    assert (failure.code, failure.reason) == (grpc.StatusCode.INVALID_ARGUMENT,
                                              "INVALID_BATCH_ID")
    assert "4111" not in failure.raw
    batch, _ = await approved(tokenizer, 1, 1600)
    failure = await rpc_failure(stub.RenewRun(spb.RenewRunRequest(
        batch_id=batch.batch_id, run_id="nope")))
    assert failure.reason == "INVALID_RUN_ID"
    failure = await rpc_failure(stub.FinishRun(spb.FinishRunRequest(
        batch_id=batch.batch_id, run_id=str(uuid.uuid4()), summary_json="[1]")))
    assert failure.reason == "INVALID_SUMMARY"
