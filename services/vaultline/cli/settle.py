"""`vaultline settle create|approve|run|status|list`: the finance settlement job's commands.

Who you are is the mTLS client identity you pick with `--as` (a key of the dev stack's
`clients`, e.g. `settlement` or `settlement-2`, or VAULTLINE_CLIENT_CERT/KEY): its
certificate's SAN URI is the identity in the batch and the audit trail, and its private key
proves it. Every command is a client of the tokenizer's SettlementService (VAULTLINE_GRPC_ADDRESS
or the dev stack), which enforces dual control and audits every step; none of them holds
database credentials.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TextIO

from ..config import ConfigError
from ..runtime import tune_gc
from ..settlement import DEFAULT_CHUNK, MAX_CHUNK
from .common import add_identity_option, tokenizer_channel

__all__ = ["add_settle_commands"]


def _fmt_totals(totals: dict[str, Any]) -> str:
    return ", ".join(f"{c} {v['count']} rows {v['amount_minor']}" for c, v in totals.items())


def _settlement_stub(channel: Any) -> Any:
    from ..gen.settlement.v1 import settlement_service_pb2_grpc as spb_grpc

    return spb_grpc.SettlementServiceStub(channel)


def _check_file(path: Path) -> Any:
    """Pass 1 over a capture file; None (problems printed) unless it is valid."""
    from ..settlement.batch import InputChanged, check_captures

    try:
        checked = check_captures(_file_source(path, "checking"))
    except OSError as exc:
        print(f"vaultline: cannot read {path}: {exc.strerror}", file=sys.stderr)
        return None
    except InputChanged as exc:
        print(f"vaultline: {path} {exc}; nothing was done", file=sys.stderr)
        return None
    if not checked.ok:
        print(f"vaultline: {path} has {len(checked.problems)} problem(s); nothing was done:",
              file=sys.stderr)
        for problem in checked.problems:
            print(f"  {problem}", file=sys.stderr)
        return None
    return checked


# ---- commands --------------------------------------------------------------------------------


_CHUNK = 1 << 20
_PROGRESS_MIN_BYTES = 8 << 20  # `create` shows progress from 8 MiB (about 150,000 rows)


def _file_source(path: Path, task: str) -> Callable[[], Iterator[bytes]]:
    """The file's bytes from the start in 1 MiB chunks, at every call; a big file's read shows
    its progress (bytes, never content) on stderr."""

    def chunks() -> Iterator[bytes]:
        with path.open("rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            show = None
            if size >= _PROGRESS_MIN_BYTES:
                show = _ProgressPrinter(sys.stderr, 2.0, task=task, unit="MiB", scale=1 << 20)
            done = 0
            try:
                while block := fh.read(_CHUNK):
                    yield block
                    done += len(block)  # counted once the reader is done with it
                    if show is not None:
                        show(done, size)
            finally:
                if show is not None:
                    show.close()

    return chunks


def cmd_create(args: argparse.Namespace) -> int:
    from ..settlement.job import create_batch

    path = Path(args.input)
    # Pass 1 reads the file once, keeping no rows: problems, totals, digests. Pass 2 (in
    # create_batch) reads it again into the CreateBatch stream and checks it is the same.
    checked = _check_file(path)
    if checked is None:
        return 1

    async def main() -> Any:
        async with tokenizer_channel(args.home, args.as_) as channel:
            return await create_batch(_settlement_stub(channel), checked,
                                      _file_source(path, "storing"), tenant=args.tenant,
                                      input_name=path.name)

    batch = asyncio.run(main())
    totals = checked.currency_totals()
    print(f"created batch {batch.batch_id}: {batch.row_count} rows ({_fmt_totals(totals)}),"
          f" input sha256 {checked.sha256}, rows sha256 {batch.rows_sha256}, by"
          f" {batch.created_by}")
    print(f"next: `vaultline settle approve {batch.batch_id} --input {path.name}"
          " --as <another settlement identity>`")
    return 0


def cmd_approve(args: argparse.Namespace) -> int:
    from ..settlement.job import approve_batch

    if args.input:
        checked = _check_file(Path(args.input))
        if checked is None:
            return 1
        rows_sha256 = checked.rows_sha256
        print(f"{args.input}: {checked.row_count} rows"
              f" ({_fmt_totals(checked.currency_totals())}), rows sha256 {rows_sha256}")
    else:
        rows_sha256 = args.rows_sha256

    async def main() -> Any:
        async with tokenizer_channel(args.home, args.as_) as channel:
            return await approve_batch(_settlement_stub(channel), args.batch, rows_sha256)

    batch = asyncio.run(main())
    print(f"approved batch {batch.batch_id} ({batch.row_count} rows) by {batch.approved_by}")
    return 0


class _ProgressPrinter:
    """A bar with rate and ETA on a terminal; a plain line every few seconds otherwise.

    Called with (done, total) counts: rows by default, or e.g. bytes shown as MiB with
    `unit="MiB", scale=2**20`. Only counts are ever printed, never data.
    """

    def __init__(self, stream: TextIO, interval: float = 5.0, *, task: str = "",
                 unit: str = "rows", scale: int = 1,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._stream = stream
        self._tty = stream.isatty()
        self._clock = clock
        self._start = clock()
        self._last: float | None = None
        self._interval = 0.2 if self._tty else interval
        self._task = f"{task} " if task else ""
        self._unit = unit
        self._scale = scale
        self._drawn = 0  # length of the bar on screen (a terminal); 0 when none is
        self._finished = False

    def _count(self, n: float) -> str:
        return f"{n / self._scale:,.1f}" if self._scale != 1 else f"{n:,.0f}"

    def __call__(self, done: int, total: int) -> None:
        now = self._clock()
        if self._finished or (done < total and self._last is not None
                              and now - self._last < self._interval):
            return
        self._last = now
        elapsed = max(now - self._start, 1e-6)
        rate = done / elapsed
        left = max(total - done, 0)
        eta_text = str(dt.timedelta(seconds=round(left / rate))) if rate > 0 else "?"
        pct = 100.0 * done / total if total else 100.0
        count = (f"{done}/{total}" if self._scale == 1
                 else f"{done / self._scale:.1f}/{total / self._scale:.1f}")
        unit, speed = self._unit, self._count(rate)
        if self._tty:
            width = 30
            filled = min(width, int(width * done / total) if total else width)
            bar = "#" * filled + "." * (width - filled)
            text = (f"\r{self._task}[{bar}] {pct:5.1f}% {count} {unit} {speed} {unit}/s"
                    f" ETA {eta_text}")
            self._stream.write(text.ljust(self._drawn) + " ")
            self._drawn = len(text)
            if done >= total:
                self._stream.write("\n")
                self._drawn = 0
        else:
            self._stream.write(f"progress: {self._task}{count} {unit} ({pct:.1f}%),"
                               f" {speed} {unit}/s, ETA {eta_text}\n")
        self._finished = done >= total
        self._stream.flush()

    def close(self) -> None:
        """End a bar left unfinished (the work stopped early) with its line."""
        if self._drawn:
            self._stream.write("\n")
            self._stream.flush()
            self._drawn = 0


def cmd_run(args: argparse.Namespace) -> int:
    from ..gen.tokenization.v1 import tokenization_service_pb2_grpc as pb_grpc
    from ..settlement.job import RunOptions, run_batch

    if not 1 <= args.chunk <= MAX_CHUNK:
        raise ConfigError(f"--chunk must be between 1 and {MAX_CHUNK}, not {args.chunk}")
    options = RunOptions(
        recipient=Path(args.recipient),
        output_dir=Path(args.output),
        signing_key=Path(args.sign_key) if args.sign_key else None,
        chunk=args.chunk,
    )
    if not options.recipient.is_file():
        raise ConfigError(f"--recipient {options.recipient} is not a file")
    tune_gc()

    async def main() -> Any:
        async with tokenizer_channel(args.home, args.as_) as channel:
            return await run_batch(_settlement_stub(channel),
                                   pb_grpc.TokenizationServiceStub(channel), args.batch,
                                   options, _ProgressPrinter(sys.stderr))

    result = asyncio.run(main())
    s = result.summary
    if result.already_done:
        print(f"batch {args.batch} is already done ({s['file']}, sha256 {s['file_sha256']});"
              " nothing to do")
        return 0
    print(f"done: {s['records']} records written to {Path(args.output) / s['file']},"
          f" {s['rejected']} rejected ({s['rejects_file']}); totals {s['totals'] or 'none'};"
          f" reconciled={s['reconciled']}; sha256 {s['file_sha256']}")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from ..gen.settlement.v1 import settlement_pb2 as spb
    from ..settlement.job import describe

    async def main() -> Any:
        async with tokenizer_channel(args.home, args.as_) as channel:
            return (await _settlement_stub(channel).GetBatch(
                spb.GetBatchRequest(batch_id=args.batch))).batch

    info = describe(asyncio.run(main()))
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"batch {info['id']} ({info['tenant']}): {info['state']}")
    print(f"  rows       {info['rows']} ({_fmt_totals(info['totals'])})")
    print(f"  input      {info['input_name']} sha256 {info['input_sha256']}")
    print(f"  rows sha256 {info['rows_sha256']}")
    print(f"  created    {info['created_at']} by {info['created_by']}")
    print(f"  approved   {info['approved_at'] or '-'} by {info['approved_by'] or '-'}")
    if info["running_on"]:
        print(f"  running on {info['running_on']}")
    if info["summary"]:
        s = info["summary"]
        print(f"  done       {info['done_at']}: {s['records']} records, {s['rejected']}"
              f" rejected, reconciled={s['reconciled']}, file {s['file']} sha256"
              f" {s['file_sha256']}")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    from ..gen.settlement.v1 import settlement_pb2 as spb
    from ..settlement.job import describe

    if not 1 <= args.limit <= 1000:
        raise ConfigError(f"--limit must be between 1 and 1000, not {args.limit}")

    async def main() -> Any:
        async with tokenizer_channel(args.home, args.as_) as channel:
            return (await _settlement_stub(channel).ListBatches(spb.ListBatchesRequest(
                tenant=args.tenant, page_size=args.limit))).batches

    rows = [describe(b) for b in asyncio.run(main())]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print("no batches")
    for r in rows:
        print(f"{r['id']}  {r['state']:<8}  {r['rows']:>9} rows  {r['created_at'][:19]}"
              f"  {_fmt_totals(r['totals'])}")
    return 0


# ---- parser ----------------------------------------------------------------------------------


def add_settle_commands(sub: Any) -> None:
    settle = sub.add_parser(
        "settle",
        help="finance settlement: dual-controlled bulk detokenization into a processor file",
        description="Settlement batches: `create` from a capture CSV, `approve` by a second "
        "settlement identity (dual control), `run` into an OpenPGP-encrypted processor file "
        "(format VLSF v1, see vaultline.settlement.fileformat), `status`, `list`. The "
        "tokenizer's SettlementService enforces dual control (the creator never approves, "
        "the approver never runs, only a running batch's rows are revealed) and audits every "
        "step and every revealed token, with the batch id as purpose. No database "
        "credentials are needed.",
    )
    s = settle.add_subparsers(dest="settle_command", required=True, metavar="SUBCOMMAND")

    identity_option = add_identity_option

    create = s.add_parser(
        "create", help="validate a capture CSV and store it as a batch awaiting approval",
        description="Read `reference,token,amount_minor,currency[,auth_code]` (header "
        "required, UTF-8). Every row is checked (token shape, positive integer amount in minor "
        "units, ISO 4217 currency, unique reference); all problems are listed with their line "
        "numbers and nothing is created unless the whole file is valid. The file is streamed "
        "in bounded memory, read twice: checked, then streamed to the tokenizer; if it changes "
        "in between, nothing is created. Prints the batch id and the SHA-256 of its rows, "
        "which the approver names.")
    create.add_argument("--input", required=True, metavar="CSV", help="the capture file")
    create.add_argument("--tenant", default="default", help="tenant of the tokens")
    identity_option(create, "settlement")
    create.set_defaults(func=cmd_create)

    approve = s.add_parser(
        "approve", help="approve a batch (must be a different identity than its creator)",
        description="Dual control: a batch is approved by a settlement identity other than "
        "the one that created it, naming what it approves: the capture file it reviewed "
        "(--input, whose rows' SHA-256 is computed here) or that digest (--rows-sha256). The "
        "tokenizer refuses the approval unless the digest is that of the stored rows, and "
        "refuses your own batch; both are audited.")
    approve.add_argument("batch", metavar="BATCH", help="batch id (sb_…)")
    what = approve.add_mutually_exclusive_group(required=True)
    what.add_argument("--input", metavar="CSV", help="the capture file you reviewed")
    what.add_argument("--rows-sha256", metavar="HEX",
                      help="the SHA-256 of the batch's rows (`settle create` prints it)")
    identity_option(approve, "settlement-2")
    approve.set_defaults(func=cmd_approve)

    run = s.add_parser(
        "run", help="detokenize an approved batch into an encrypted processor file",
        description="Start a run of the batch (only its creator, or an identity the policy "
        "lets run batches, and never its approver), read its rows from the tokenizer and "
        "stream them through BatchDetokenize naming the batch (audited under its id), "
        "write the VLSF file encrypted to the processor's OpenPGP key (gpg --decrypt reads it) "
        "into DIR through a temp file, fsync and atomic rename, with BATCH.rejects.csv "
        "(reference, token, reason) and BATCH.summary.json (rows, totals per currency, "
        "reconciliation, SHA-256 of the encrypted file). Only approved batches run; a done "
        "batch is not run again; an interrupted run is restarted cleanly by running again.")
    run.add_argument("batch", metavar="BATCH", help="batch id (sb_…)")
    run.add_argument("--recipient", required=True, metavar="KEY.asc",
                     help="the processor's OpenPGP public key file")
    run.add_argument("--output", required=True, metavar="DIR", help="output directory")
    run.add_argument("--sign-key", metavar="SECRET.asc",
                     help="optionally sign with this (unprotected) OpenPGP secret key file")
    run.add_argument("--chunk", type=int, default=DEFAULT_CHUNK, metavar="N",
                     help=f"tokens per BatchDetokenize chunk, 1..{MAX_CHUNK}"
                          f" (default {DEFAULT_CHUNK})")
    identity_option(run, "settlement")
    run.set_defaults(func=cmd_run)

    status = s.add_parser("status", help="one batch's state, counts and totals",
                          description="Show a batch: state, rows, totals per currency, "
                          "creator, approver and, once done, the summary.")
    status.add_argument("batch", metavar="BATCH", help="batch id (sb_…)")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    identity_option(status, "settlement")
    status.set_defaults(func=cmd_status)

    lst = s.add_parser("list", help="recent batches, newest first",
                       description="List recent batches with state, rows and totals.")
    lst.add_argument("--limit", type=int, default=50, help="how many, 1..1000 (default 50)")
    lst.add_argument("--tenant", default="default", help="whose batches (default: default)")
    lst.add_argument("--json", action="store_true", help="machine-readable output")
    identity_option(lst, "settlement")
    lst.set_defaults(func=cmd_list)

