"""Settlement batches, client side: create, approve and run through the tokenizer's
SettlementService. Dual control is the server's: this module holds no database credentials
and decides nothing the tokenizer does not check again.

The run asks the tokenizer for the batch's rows (`ListBatchRows`, tokens only), reveals them
with `BatchDetokenize` naming the batch (the server refuses any token that is not a row of a
batch running under this identity, and audits every reveal under the batch id), feeds the
VLSF records straight into `gpg --encrypt` (plaintext only in memory, a few chunks at a time),
and publishes the result atomically: temp file in the output directory, fsync, rename, fsync
the directory. Tokens that do not resolve go to a rejects file (reference, token, reason) and
the summary reconciles input totals = written + rejected.

Crash safety: a running batch holds a lease the run renews. A run killed mid-way leaves only a
`.<batch>…tmp` file (ciphertext, never a final name); the next `run` takes over (at once if
the old process is gone from this host, otherwise when its lease ends), removes stale temp
files and restarts from the first row. A done batch is not run again.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import datetime as dt
import hashlib
import json
import os
import secrets
import socket
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, TextIO

import grpc

from vaultline.errors import VaultlineError
from vaultline.gen.settlement.v1 import settlement_pb2 as spb
from vaultline.gen.settlement.v1 import settlement_service_pb2_grpc as spb_grpc
from vaultline.gen.tokenization.v1 import tokenization_pb2 as pb
from vaultline.gen.tokenization.v1 import tokenization_service_pb2_grpc as pb_grpc
from vaultline.rpc_reasons import status_reason

from . import DEFAULT_CHUNK
from .batch import CheckedBatch, InputChanged, Record, Source
from .fileformat import FileBuilder, format_totals
from .openpgp import GpgStream, check_public_key

__all__ = [
    "RunOptions",
    "RunResult",
    "SettlementError",
    "approve_batch",
    "create_batch",
    "output_paths",
    "run_batch",
]

STATE_NAMES: Final = {
    spb.BATCH_STATE_CREATED: "created",
    spb.BATCH_STATE_APPROVED: "approved",
    spb.BATCH_STATE_RUNNING: "running",
    spb.BATCH_STATE_DONE: "done",
}
_CREATE_MESSAGE_ROWS: Final = 5000  # rows per CreateBatch message: ~400 KB, well under 4 MiB


class SettlementError(VaultlineError):
    """A settlement command refused or failed; the message says why, never with card data."""

    reason = "SETTLEMENT_FAILED"


# ---- create / approve ------------------------------------------------------------------------


async def create_batch(stub: spb_grpc.SettlementServiceStub, checked: CheckedBatch,
                       source: Source, *, tenant: str = "default", input_name: str = ""
                       ) -> spb.Batch:
    """Store a checked batch through CreateBatch.

    `checked` is pass 1 over the input (`check_captures`); this is pass 2: `source` is read
    again and its rows stream to the tokenizer, which stores them in one transaction. If the
    second read is not the checked input (changed since, or unreadable), the stream is
    cancelled before it ends and nothing is created.
    """
    if not checked.ok:
        raise SettlementError("the input has problems; nothing was created")
    rows = checked.reread(source)
    changed: list[InputChanged] = []

    async def requests() -> AsyncIterator[spb.CreateBatchRequest]:
        message = spb.CreateBatchRequest(tenant=tenant, input_name=input_name,
                                         input_sha256=checked.sha256)
        for record in rows:
            _add_row(message, record)
            if len(message.rows) == _CREATE_MESSAGE_ROWS:
                yield message
                message = spb.CreateBatchRequest()
                await asyncio.sleep(0)  # let the call send while the file is read
        try:
            rows.verify()
        except InputChanged as exc:
            changed.append(exc)
            raise  # cancels the call: the server rolls the batch back
        yield message

    call = stub.CreateBatch(requests())
    try:
        batch = (await call).batch
    except (grpc.aio.AioRpcError, asyncio.CancelledError, InputChanged):
        if changed:
            raise SettlementError(f"the input {changed[0]}; nothing was created") from None
        raise
    if batch.rows_sha256 != checked.rows_sha256 or batch.row_count != checked.row_count:
        raise SettlementError(f"batch {batch.batch_id} was stored with other rows than were"
                              " checked; do not approve it")
    return batch


def _add_row(message: spb.CreateBatchRequest, record: Record) -> None:
    line, reference, token, amount, currency, auth_code = record
    message.rows.add(line=line, reference=reference, token=token, amount_minor=amount,
                     currency=currency, auth_code=auth_code)


async def approve_batch(stub: spb_grpc.SettlementServiceStub, batch_id: str,
                        rows_sha256: str) -> spb.Batch:
    """created → approved by this (second) identity; the server checks dual control and that
    `rows_sha256` is the digest of the stored rows."""
    response = await stub.ApproveBatch(spb.ApproveBatchRequest(batch_id=batch_id,
                                                               rows_sha256=rows_sha256))
    return response.batch


# ---- run -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunOptions:
    recipient: Path
    output_dir: Path
    signing_key: Path | None = None
    chunk: int = DEFAULT_CHUNK
    in_flight: int = 4


@dataclass
class RunResult:
    batch_id: str
    already_done: bool
    summary: dict[str, Any] = field(default_factory=dict)


def output_paths(output_dir: Path, batch_id: str) -> dict[str, Path]:
    return {
        "file": output_dir / f"{batch_id}.vlsf.gpg",
        "rejects": output_dir / f"{batch_id}.rejects.csv",
        "summary": output_dir / f"{batch_id}.summary.json",
    }


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _reason(status: Any) -> str:
    return status_reason(status) or "ERROR_" + str(status.code)


def _open_temp(output_dir: Path, final: Path) -> tuple[Path, int]:
    tmp = output_dir / f".{final.name}.{secrets.token_hex(4)}.tmp"
    return tmp, os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


Progress = Callable[[int, int], None]


@dataclass
class _Stubs:
    settlement: spb_grpc.SettlementServiceStub
    tokens: pb_grpc.TokenizationServiceStub


async def run_batch(settlement: spb_grpc.SettlementServiceStub,
                    tokens: pb_grpc.TokenizationServiceStub, batch_id: str,
                    options: RunOptions, progress: Progress | None = None) -> RunResult:
    """Run an approved batch (or take over an interrupted run) into the processor file."""
    batch = (await settlement.GetBatch(spb.GetBatchRequest(batch_id=batch_id))).batch
    if batch.state == spb.BATCH_STATE_DONE:
        return RunResult(batch_id, True, json.loads(batch.summary_json))
    if batch.state == spb.BATCH_STATE_CREATED:
        raise SettlementError(f"batch {batch_id} is not approved; it needs `settle approve` by "
                              "a second settlement identity first")
    await asyncio.to_thread(check_public_key, options.recipient)
    options.output_dir.mkdir(parents=True, exist_ok=True)
    take_over = ""
    if (batch.state == spb.BATCH_STATE_RUNNING and batch.run_host == socket.gethostname()
            and batch.run_pid and not _pid_alive(batch.run_pid)):
        take_over = batch.run_id  # ours, and its process is gone (the server checks it is ours)
    batch = (await settlement.StartRun(spb.StartRunRequest(
        batch_id=batch_id, host=socket.gethostname(), pid=os.getpid(),
        take_over_run_id=take_over))).batch
    paths = output_paths(options.output_dir, batch_id)
    for stale in options.output_dir.glob(f".{batch_id}.*.tmp"):  # an interrupted earlier run
        stale.unlink(missing_ok=True)
    temps: list[Path] = []
    stubs = _Stubs(settlement, tokens)
    try:
        summary = await _write_outputs(stubs, batch, options, paths, temps, progress)
        await settlement.FinishRun(spb.FinishRunRequest(
            batch_id=batch_id, run_id=batch.run_id, summary_json=json.dumps(summary)))
    except BaseException:
        for tmp in temps:
            tmp.unlink(missing_ok=True)
        with contextlib.suppress(Exception):  # the lease lapses on its own otherwise
            await asyncio.shield(settlement.AbandonRun(spb.AbandonRunRequest(
                batch_id=batch_id, run_id=batch.run_id), timeout=5))
        raise
    _publish(paths, temps, options.output_dir)
    return RunResult(batch_id, False, summary)


class _Rejects:
    """The rejects CSV (reference, token, reason) and the counts and totals it holds."""

    def __init__(self, fh: TextIO) -> None:
        self._csv = csv.writer(fh, lineterminator="\n")
        self._csv.writerow(("reference", "token", "reason"))
        self.counts: dict[str, int] = {}
        self.totals: dict[str, int] = {}

    def add(self, row: spb.BatchRow, reason: str) -> None:
        cur = row.currency
        self.counts[cur] = self.counts.get(cur, 0) + 1
        self.totals[cur] = self.totals.get(cur, 0) + row.amount_minor
        self._csv.writerow((row.reference, row.token, reason))


async def _write_outputs(stubs: _Stubs, batch: spb.Batch, options: RunOptions,
                         paths: dict[str, Path], temps: list[Path],
                         progress: Progress | None) -> dict[str, Any]:
    """The encrypted file, the rejects and the summary, as temp files (listed in `temps`)."""
    created = dt.datetime.now(dt.UTC)
    builder = FileBuilder(batch.batch_id, created, batch.row_count)
    out_tmp, out_fd = _open_temp(options.output_dir, paths["file"])
    temps.append(out_tmp)
    rej_tmp, rej_fd = _open_temp(options.output_dir, paths["rejects"])
    temps.append(rej_tmp)
    with os.fdopen(rej_fd, "w", encoding="utf-8", newline="") as rejects_fh:
        rejects = _Rejects(rejects_fh)
        try:
            async with GpgStream(options.recipient, out_fd, options.signing_key) as gpg:
                await gpg.write(builder.header())
                await _reveal_rows(stubs, batch, options, builder, rejects, gpg, progress)
                await gpg.write(builder.trailer())
            os.fsync(out_fd)
        finally:
            os.close(out_fd)
        rejects_fh.flush()
        os.fsync(rejects_fh.fileno())
    summary = _summary(batch, builder, rejects, created, options, paths)
    summary["file_sha256"] = _sha256_file(out_tmp)
    sum_tmp, sum_fd = _open_temp(options.output_dir, paths["summary"])
    temps.append(sum_tmp)
    with os.fdopen(sum_fd, "w", encoding="utf-8") as fh:
        json.dump(summary, fh, indent=2, sort_keys=True)
        fh.write("\n")
        fh.flush()
        os.fsync(fh.fileno())
    return summary


async def _reveal_rows(stubs: _Stubs, batch: spb.Batch, options: RunOptions,
                       builder: FileBuilder, rejects: _Rejects, gpg: GpgStream,
                       progress: Progress | None) -> None:
    """Stream the batch's rows through BatchDetokenize, `in_flight` chunks deep, into the
    file; renew the run's lease as it goes."""
    window = asyncio.Semaphore(options.in_flight)
    pending: deque[list[spb.BatchRow]] = deque()
    lease = _Lease(stubs.settlement, batch)

    async def requests() -> AsyncIterator[pb.BatchDetokenizeRequest]:
        after = 0
        while True:
            page = await stubs.settlement.ListBatchRows(spb.ListBatchRowsRequest(
                batch_id=batch.batch_id, after_line=after, page_size=options.chunk))
            rows = list(page.rows)
            if not rows:
                return
            after = rows[-1].line
            await window.acquire()
            pending.append(rows)
            # Filled in place: building each Item and copying the list costs twice as much.
            request = pb.BatchDetokenizeRequest(tenant=batch.tenant, batch_id=batch.batch_id)
            add = request.items.add
            for r in rows:
                add(reference=r.reference, token=r.token)
            yield request

    done_rows = 0
    call = stubs.tokens.BatchDetokenize(requests())
    try:
        async for response in call:
            rows = pending.popleft()
            window.release()
            await gpg.write(_records(builder, rejects, rows, response))
            done_rows += len(rows)
            if progress is not None:
                progress(done_rows, batch.row_count)
            await lease.keep()
    except BaseException:
        call.cancel()  # stop the stream: no more cards are revealed for this run
        raise
    if done_rows != batch.row_count:
        raise SettlementError(f"batch {batch.batch_id}: {done_rows} of {batch.row_count} rows"
                              " answered")


def _records(builder: FileBuilder, rejects: _Rejects, rows: list[spb.BatchRow],
             response: pb.BatchDetokenizeResponse) -> bytes:
    """The file's detail records of one answered chunk; its failed items go to the rejects."""
    if len(response.results) != len(rows):
        raise SettlementError("the tokenizer answered a chunk with a wrong count")
    out = bytearray()
    for row, result in zip(rows, response.results, strict=True):
        if result.HasField("card") and not result.card.card.expiry_month:
            # Tokenized from stored data by de-scoping: the processor needs an expiry the
            # vault does not have until the customer's card is taken again.
            rejects.add(row, "EXPIRY_UNKNOWN")
        elif result.HasField("card"):
            card = result.card.card
            out += builder.detail(row.reference, card.pan, card.expiry_month, card.expiry_year,
                                  row.amount_minor, row.currency, row.auth_code)
        else:
            rejects.add(row, _reason(result.error))
    return bytes(out)


class _Lease:
    """Renews the run's lease a third of the way through it."""

    def __init__(self, stub: spb_grpc.SettlementServiceStub, batch: spb.Batch) -> None:
        self._stub = stub
        self._batch = batch
        self._last = time.monotonic()
        lease_end = batch.lease_expire_time.ToDatetime(tzinfo=dt.UTC)
        self._every = max((lease_end - dt.datetime.now(dt.UTC)).total_seconds() / 3, 1.0)

    async def keep(self) -> None:
        if time.monotonic() - self._last < self._every:
            return
        self._last = time.monotonic()
        try:
            await self._stub.RenewRun(spb.RenewRunRequest(batch_id=self._batch.batch_id,
                                                          run_id=self._batch.run_id))
        except grpc.aio.AioRpcError as err:
            if err.code() == grpc.StatusCode.FAILED_PRECONDITION:
                raise SettlementError(
                    f"batch {self._batch.batch_id}: this run lost its lease") from None
            raise


def _summary(batch: spb.Batch, builder: FileBuilder, rejects: _Rejects, created: dt.datetime,
             options: RunOptions, paths: dict[str, Path]) -> dict[str, Any]:
    """Counts, totals and the per-currency reconciliation input = written + rejected."""
    input_totals = {t.currency: {"count": t.count, "amount_minor": t.amount_minor}
                    for t in batch.totals}
    currencies = sorted(set(input_totals) | set(builder.totals) | set(rejects.totals))
    reconciliation = {}
    for cur in currencies:
        inp = input_totals.get(cur, {"count": 0, "amount_minor": 0})
        written = {"count": builder.counts.get(cur, 0),
                   "amount_minor": builder.totals.get(cur, 0)}
        rejected = {"count": rejects.counts.get(cur, 0),
                    "amount_minor": rejects.totals.get(cur, 0)}
        reconciliation[cur] = {
            "input": inp, "written": written, "rejected": rejected,
            "reconciled": all(written[k] + rejected[k] == inp[k]
                              for k in ("count", "amount_minor")),
        }
    return {
        "format": "VLSF/1",
        "batch_id": batch.batch_id,
        "created": created.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "input_sha256": batch.input_sha256,
        "rows_sha256": batch.rows_sha256,
        "rows": batch.row_count,
        "records": builder.records,
        "rejected": sum(rejects.counts.values()),
        "totals": format_totals(builder.counts, builder.totals),
        "currencies": reconciliation,
        "reconciled": all(c["reconciled"] for c in reconciliation.values()),
        "file": paths["file"].name,
        "rejects_file": paths["rejects"].name,
        "signed": options.signing_key is not None,
    }


def _publish(paths: dict[str, Path], temps: list[Path], output_dir: Path) -> None:
    """Rename the temp files to their final names; the summary goes last: its presence means
    the file and the rejects beside it are final."""
    file_tmp, rejects_tmp, summary_tmp = temps
    os.replace(file_tmp, paths["file"])
    os.replace(rejects_tmp, paths["rejects"])
    os.replace(summary_tmp, paths["summary"])
    temps.clear()
    _fsync_dir(output_dir)


def batch_state(batch: spb.Batch) -> str:
    return STATE_NAMES.get(batch.state, "unknown")


def describe(batch: spb.Batch) -> dict[str, Any]:
    """A batch as `settle status --json` and `settle list --json` print it."""
    def when(ts: Any, present: bool) -> str | None:
        return ts.ToDatetime(tzinfo=dt.UTC).isoformat() if present else None

    return {
        "id": batch.batch_id,
        "tenant": batch.tenant,
        "state": batch_state(batch),
        "rows": batch.row_count,
        "totals": {t.currency: {"count": t.count, "amount_minor": t.amount_minor}
                   for t in batch.totals},
        "input_sha256": batch.input_sha256,
        "input_name": batch.input_name,
        "rows_sha256": batch.rows_sha256,
        "created_by": batch.created_by,
        "created_at": when(batch.create_time, batch.HasField("create_time")),
        "approved_by": batch.approved_by or None,
        "approved_at": when(batch.approve_time, batch.HasField("approve_time")),
        "runs": batch.runs,
        "running_on": (f"{batch.run_host} pid {batch.run_pid} as {batch.run_by}"
                       if batch.state == spb.BATCH_STATE_RUNNING else None),
        "done_at": when(batch.done_time, batch.HasField("done_time")),
        "summary": json.loads(batch.summary_json) if batch.summary_json else None,
    }

