"""Settlement batches: create, approve (dual control) and run into the processor file.

The run streams BatchDetokenize over mTLS as the caller's settlement identity, with the batch id
as `purpose` (so the tokenizer audits every revealed token under it), feeds the VLSF records
straight into `gpg --encrypt` (plaintext only in memory, a few chunks at a time), and publishes
the result atomically: temp file in the output directory, fsync, rename, fsync the directory.
Tokens that do not resolve go to a rejects file (reference, token, reason) and the summary
reconciles input totals = written + rejected.

Crash safety: a batch being run holds a lease (`running`, run id, host, pid). A run killed
mid-way leaves only a `.<batch>…tmp` file (ciphertext, never a final name); the next `run`
takes over (at once if the old process is gone from this host, otherwise when its lease ends),
removes stale temp files and restarts from the first row. A done batch is not run again.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import datetime as dt
import hashlib
import io
import json
import os
import secrets
import socket
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import asyncpg
from google.rpc import error_details_pb2

from vaultline.errors import VaultlineError
from vaultline.gen.tokenization.v1 import tokenization_pb2 as pb
from vaultline.gen.tokenization.v1 import tokenization_service_pb2_grpc as pb_grpc
from vaultline.security.audit import AuditEvent, AuditWriter
from vaultline.security.identity import Identity
from vaultline.store import Store

from . import DEFAULT_CHUNK
from .batch import CheckedBatch, InputChanged, Source
from .fileformat import FileBuilder, format_totals
from .openpgp import GpgStream, check_public_key

__all__ = [
    "RunOptions",
    "RunResult",
    "SettlementError",
    "approve_batch",
    "create_batch",
    "new_batch_id",
    "output_paths",
    "run_batch",
]

PEER: Final = "cli:" + socket.gethostname()


class SettlementError(VaultlineError):
    """A settlement command refused or failed; the message says why, never with card data."""

    reason = "SETTLEMENT_FAILED"


def new_batch_id() -> str:
    # 10 hex digits: never a run of 12 digits, so the id (the reveal `purpose`) is never
    # mistaken for a card number.
    return "sb_" + secrets.token_hex(5)


def _event(who: Identity, tenant: str, method: str, outcome: str, batch_id: str) -> AuditEvent:
    return AuditEvent(identity=who.uri, role=who.role, tenant=tenant, method=method,
                      outcome=outcome, request_id=str(uuid.uuid4()), peer=PEER,
                      purpose=batch_id, at=dt.datetime.now(dt.UTC))


def _require_settlement(who: Identity) -> None:
    if who.role != "settlement":
        raise SettlementError(f"{who.uri} is not a settlement identity")


# ---- create / approve ------------------------------------------------------------------------


async def create_batch(store: Store, audit: AuditWriter, who: Identity, checked: CheckedBatch,
                       source: Source, *, tenant: str = "default", input_name: str = "") -> str:
    """Store a checked batch; audited as SettleCreate.

    `checked` is pass 1 over the input (`check_captures`); this is pass 2: `source` is read
    again and its rows stream into PostgreSQL by COPY in the transaction that creates the batch.
    If the second read is not the checked input (changed since, or unreadable), the transaction
    rolls back and nothing is created.
    """
    _require_settlement(who)
    if not checked.ok:
        raise SettlementError("the input has problems; nothing was created")
    totals = checked.currency_totals()
    for _ in range(3):
        batch_id = new_batch_id()
        rows = checked.reread(source)
        try:
            await store.insert_settlement_batch(batch_id, tenant, who.uri, checked.sha256,
                                                input_name, json.dumps(totals), rows,
                                                row_count=checked.row_count,
                                                before_commit=rows.verify)
            break
        except asyncpg.UniqueViolationError as exc:
            if exc.constraint_name != "settlement_batches_pkey":
                raise
            continue  # the batch id is taken (before any row was read): another id
        except InputChanged as exc:
            raise SettlementError(f"the input {exc}; nothing was created") from None
    else:
        raise SettlementError("could not allocate a batch id")
    await audit.record([_event(who, tenant, "SettleCreate", "OK", batch_id)])
    return batch_id


async def approve_batch(store: Store, audit: AuditWriter, who: Identity, batch_id: str) -> None:
    """created → approved by a second identity; the creator is refused (and audited)."""
    _require_settlement(who)
    batch = await store.find_settlement_batch(batch_id)
    if batch is None:
        raise SettlementError(f"no batch {batch_id}")
    tenant = batch["tenant"]
    if batch["created_by"] == who.uri:
        await audit.record([_event(who, tenant, "SettleApprove", "PERMISSION_DENIED", batch_id)])
        raise SettlementError(
            "dual control: the identity that created a batch cannot approve it; "
            "approve with another settlement identity")
    if batch["state"] != "created":
        await audit.record([_event(who, tenant, "SettleApprove", "FAILED_PRECONDITION",
                                   batch_id)])
        raise SettlementError(f"batch {batch_id} is {batch['state']}, not awaiting approval")
    if not await store.approve_settlement_batch(batch_id, who.uri):
        raise SettlementError(f"batch {batch_id} changed meanwhile; check `settle status`")
    await audit.record([_event(who, tenant, "SettleApprove", "OK", batch_id)])


# ---- run -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunOptions:
    recipient: Path
    output_dir: Path
    signing_key: Path | None = None
    chunk: int = DEFAULT_CHUNK
    in_flight: int = 4
    lease: dt.timedelta = dt.timedelta(seconds=30)


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


def _reason(result: Any) -> str:
    for detail in result.error.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return info.reason
    return "ERROR_" + str(result.error.code)


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


async def run_batch(store: Store, audit: AuditWriter, who: Identity,
                    stub: pb_grpc.TokenizationServiceStub, batch_id: str, options: RunOptions,
                    progress: Progress | None = None) -> RunResult:
    """Run an approved batch (or take over an interrupted run) into the processor file."""
    _require_settlement(who)
    batch = await store.find_settlement_batch(batch_id)
    if batch is None:
        raise SettlementError(f"no batch {batch_id}")
    tenant = batch["tenant"]
    if batch["state"] == "done":
        await audit.record([_event(who, tenant, "SettleRun", "ALREADY_DONE", batch_id)])
        return RunResult(batch_id, True, json.loads(batch["summary"]))
    if batch["state"] == "created":
        await audit.record([_event(who, tenant, "SettleRun", "FAILED_PRECONDITION", batch_id)])
        raise SettlementError(f"batch {batch_id} is not approved; it needs `settle approve` by "
                              "a second settlement identity first")
    await asyncio.to_thread(check_public_key, options.recipient)
    options.output_dir.mkdir(parents=True, exist_ok=True)
    take_over = None
    if (batch["state"] == "running" and batch["run_host"] == socket.gethostname()
            and batch["run_pid"] is not None and not _pid_alive(batch["run_pid"])):
        take_over = str(batch["run_id"])
    run_id = str(uuid.uuid4())
    if not await store.claim_settlement_run(batch_id, run_id, socket.gethostname(), os.getpid(),
                                            options.lease, take_over):
        raise SettlementError(
            f"batch {batch_id} is being run by another process ({batch['run_host']},"
            f" pid {batch['run_pid']}); retry after its lease ends")
    await audit.record([_event(who, tenant, "SettleRun", "STARTED", batch_id)])
    paths = output_paths(options.output_dir, batch_id)
    for stale in options.output_dir.glob(f".{batch_id}.*.tmp"):  # an interrupted earlier run
        stale.unlink(missing_ok=True)
    temps: list[Path] = []
    try:
        summary = await _run(store, stub, batch, run_id, options, paths, temps, progress)
        if not await store.finish_settlement_run(batch_id, run_id, json.dumps(summary)):
            raise SettlementError(f"batch {batch_id}: this run lost its lease to another run")
    except BaseException:
        for tmp in temps:
            tmp.unlink(missing_ok=True)
        with contextlib.suppress(Exception):
            await asyncio.shield(audit.record([_event(who, tenant, "SettleRun", "FAILED",
                                                      batch_id)]))
        raise
    await audit.record([_event(who, tenant, "SettleRun", "OK", batch_id)])
    return RunResult(batch_id, False, summary)


async def _run(store: Store, stub: pb_grpc.TokenizationServiceStub, batch: Any, run_id: str,
               options: RunOptions, paths: dict[str, Path], temps: list[Path],
               progress: Progress | None) -> dict[str, Any]:
    out_tmp, out_fd = _open_temp(options.output_dir, paths["file"])
    temps.append(out_tmp)
    rej_tmp, rej_fd = _open_temp(options.output_dir, paths["rejects"])
    temps.append(rej_tmp)
    rejects = os.fdopen(rej_fd, "w", encoding="utf-8", newline="")
    try:
        return await _stream(store, stub, batch, run_id, options, paths, temps, progress,
                             out_tmp, out_fd, rej_tmp, rejects)
    finally:
        rejects.close()


async def _stream(store: Store, stub: pb_grpc.TokenizationServiceStub, batch: Any, run_id: str,
                  options: RunOptions, paths: dict[str, Path], temps: list[Path],
                  progress: Progress | None, out_tmp: Path, out_fd: int, rej_tmp: Path,
                  rejects: io.TextIOWrapper) -> dict[str, Any]:
    batch_id: str = batch["id"]
    tenant: str = batch["tenant"]
    total_rows: int = batch["row_count"]
    input_totals: dict[str, Any] = json.loads(batch["totals"])
    created = dt.datetime.now(dt.UTC)
    builder = FileBuilder(batch_id, created, total_rows)
    rejected_counts: dict[str, int] = {}
    rejected_totals: dict[str, int] = {}
    rej_csv = csv.writer(rejects, lineterminator="\n")
    rej_csv.writerow(("reference", "token", "reason"))

    window = asyncio.Semaphore(options.in_flight)
    pending: deque[list[Any]] = deque()
    done_rows = 0
    last_renew = time.monotonic()

    async def requests() -> AsyncIterator[pb.BatchDetokenizeRequest]:
        after = 0
        while True:
            rows = await store.settlement_rows_after(batch_id, after, options.chunk)
            if not rows:
                return
            after = rows[-1]["line"]
            await window.acquire()
            pending.append(rows)
            # Filled in place: building each Item and copying the list costs twice as much.
            request = pb.BatchDetokenizeRequest(tenant=tenant, purpose=batch_id)
            add = request.items.add
            for r in rows:
                add(reference=r["reference"], token=r["token"])
            yield request

    async def handle(response: pb.BatchDetokenizeResponse, done_rows: int) -> int:
        nonlocal last_renew
        rows = pending.popleft()
        window.release()
        if len(response.results) != len(rows):
            raise SettlementError("the tokenizer answered a chunk with a wrong count")
        out = bytearray()
        for row, result in zip(rows, response.results, strict=True):
            if result.HasField("card"):
                card = result.card.card
                out += builder.detail(row["reference"], card.pan, card.expiry_month,
                                      card.expiry_year, row["amount_minor"],
                                      row["currency"], row["auth_code"])
            else:
                cur = row["currency"]
                rejected_counts[cur] = rejected_counts.get(cur, 0) + 1
                rejected_totals[cur] = rejected_totals.get(cur, 0) + row["amount_minor"]
                rej_csv.writerow((row["reference"], row["token"], _reason(result)))
        await gpg.write(bytes(out))
        del out
        done_rows += len(rows)
        if progress is not None:
            progress(done_rows, total_rows)
        if time.monotonic() - last_renew > options.lease.total_seconds() / 3:
            last_renew = time.monotonic()
            if not await store.renew_settlement_lease(batch_id, run_id, options.lease):
                raise SettlementError(f"batch {batch_id}: this run lost its lease")
        return done_rows

    try:
        async with GpgStream(options.recipient, out_fd, options.signing_key) as gpg:
            await gpg.write(builder.header())
            call = stub.BatchDetokenize(requests())
            try:
                async for response in call:
                    done_rows = await handle(response, done_rows)
            except BaseException:
                call.cancel()  # stop the stream: no more cards are revealed for this run
                raise
            if done_rows != total_rows:
                raise SettlementError(f"batch {batch_id}: {done_rows} of {total_rows} rows "
                                      "answered")
            await gpg.write(builder.trailer())
        os.fsync(out_fd)
    finally:
        os.close(out_fd)
    rejects.flush()
    os.fsync(rejects.fileno())

    currencies = sorted(set(input_totals) | set(builder.totals) | set(rejected_totals))
    reconciliation = {}
    reconciled = True
    for cur in currencies:
        inp = input_totals.get(cur, {"count": 0, "amount_minor": 0})
        entry = {
            "input": inp,
            "written": {"count": builder.counts.get(cur, 0),
                        "amount_minor": builder.totals.get(cur, 0)},
            "rejected": {"count": rejected_counts.get(cur, 0),
                         "amount_minor": rejected_totals.get(cur, 0)},
        }
        ok = (entry["written"]["count"] + entry["rejected"]["count"] == inp["count"]
              and entry["written"]["amount_minor"] + entry["rejected"]["amount_minor"]
              == inp["amount_minor"])
        entry["reconciled"] = ok
        reconciled = reconciled and ok
        reconciliation[cur] = entry
    summary: dict[str, Any] = {
        "format": "VLSF/1",
        "batch_id": batch_id,
        "created": created.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "input_sha256": batch["input_sha256"],
        "rows": total_rows,
        "records": builder.records,
        "rejected": sum(rejected_counts.values()),
        "totals": format_totals(builder.counts, builder.totals),
        "currencies": reconciliation,
        "reconciled": reconciled,
        "file": paths["file"].name,
        "file_sha256": _sha256_file(out_tmp),
        "rejects_file": paths["rejects"].name,
        "signed": options.signing_key is not None,
    }
    sum_tmp, sum_fd = _open_temp(options.output_dir, paths["summary"])
    temps.append(sum_tmp)
    with os.fdopen(sum_fd, "w", encoding="utf-8") as fh:
        json.dump(summary, fh, indent=2, sort_keys=True)
        fh.write("\n")
        fh.flush()
        os.fsync(fh.fileno())
    # The summary goes last: its presence means the file and the rejects beside it are final.
    os.replace(out_tmp, paths["file"])
    os.replace(rej_tmp, paths["rejects"])
    os.replace(sum_tmp, paths["summary"])
    temps.clear()
    _fsync_dir(options.output_dir)
    return summary

