"""`vaultline discover SOURCE…`: where card numbers are stored (PCI DSS 12.5.2); and
`vaultline descope plan|run|verify|csv`: the plan of what to rewrite, the in-place rewrite,
proof nothing is left, and the same for an export file.

A SOURCE is a PostgreSQL DSN (postgresql://…: every text, varchar, char, json and jsonb column
of every table, or those of --tables), a CSV file, a JSONL file or any text file (a log).
Exit code 0: no card number found; 1: card numbers found; 2: a usage or configuration error.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, TextIO

from ..config import ConfigError
from .common import add_identity_option, describe_rpc_error, tokenizer_channel

__all__ = ["add_descope_commands"]


def _is_dsn(source: str) -> bool:
    return source.startswith(("postgresql://", "postgres://"))


class _Report:
    """The affected keys, one JSON line each, in a 0600 file."""

    def __init__(self, path: Path) -> None:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.fchmod(fd, 0o600)  # an existing file keeps its mode otherwise
        self._fh: TextIO = os.fdopen(fd, "w", encoding="utf-8")
        self.lines = 0

    def __call__(self, entry: dict[str, Any]) -> None:
        self._fh.write(json.dumps(entry, default=str) + "\n")
        self.lines += 1

    def close(self) -> None:
        self._fh.close()


def cmd_discover(args: argparse.Namespace) -> int:
    from ..descope.discover import Discovery, discover_file, discover_postgres

    for source in args.sources:
        if not _is_dsn(source) and not Path(source).is_file():
            raise ConfigError(f"{source}: neither a postgresql:// DSN nor a readable file")
    report = _Report(Path(args.report)) if args.report else None
    started = time.monotonic()
    terminal = sys.stderr.isatty()

    def progress(name: str, count: int) -> None:
        if terminal:
            print(f"\r  {name}: {count:,} rows", end="", file=sys.stderr, flush=True)

    found = Discovery()
    try:
        for source in args.sources:
            if _is_dsn(source):
                asyncio.run(discover_postgres(
                    source, tables=args.tables.split(",") if args.tables else None,
                    show_bin=args.bin, report=report, progress=progress, discovery=found))
            else:
                discover_file(Path(source), show_bin=args.bin, report=report,
                              progress=progress, discovery=found)
            if terminal:
                print(file=sys.stderr)
    finally:
        if report is not None:
            report.close()
    findings = sorted(found.found, key=lambda f: (f.source, f.table, f.column))
    elapsed = time.monotonic() - started
    if args.json:
        print(json.dumps({"findings": [f.as_dict() for f in findings],
                          "scanned": dict(found.scanned)}, indent=2))
    else:
        total = sum(found.scanned.values())
        print(f"scanned {len(found.scanned)} table(s)/file(s), {total:,} rows in "
              f"{elapsed:.1f} s")
        if not findings:
            print("no card numbers found")
        for f in findings:
            where = f"{f.table}.{f.column}" if f.column else f.table
            brands = ", ".join(f"{b} {n}" for b, n in sorted(f.brands.items()))
            print(f"  {where}: {f.cards} card number(s) in {f.values_with_cards} value(s) "
                  f"({brands}); e.g. {', '.join(f.examples[:3])}")
        if report is not None:
            print(f"affected keys: {args.report} ({report.lines} line(s), mode 0600)")
    return 1 if findings else 0


def _dsn(args: argparse.Namespace) -> str:
    dsn = args.dsn or os.environ.get("VAULTLINE_DESCOPE_DSN", "")
    if not _is_dsn(dsn):
        raise ConfigError("the CRM database: --dsn postgresql://… (or VAULTLINE_DESCOPE_DSN)")
    return dsn


def cmd_plan(args: argparse.Namespace) -> int:
    from ..descope.discover import discover_postgres, display_source
    from ..descope.plan import FORMATS, dump_plan, make_plan

    if not _is_dsn(args.source):
        raise ConfigError(f"{args.source}: plans are made for a postgresql:// DSN")
    if args.token_format not in FORMATS:
        raise ConfigError(f"--token-format must be one of {', '.join(FORMATS)}")
    output = Path(args.output)
    if output.exists() and not args.force:
        raise ConfigError(f"{output} exists (--force replaces it)")
    found = asyncio.run(discover_postgres(
        args.source, tables=args.tables.split(",") if args.tables else None))
    plan = make_plan(found, display_source(args.source), tenant=args.tenant,
                     token_format=args.token_format)
    missing = [t.table for t in plan.tables if not t.key]
    if missing:
        raise ConfigError(f"no primary key on {', '.join(missing)}: rows cannot be rewritten "
                          "safely in place")
    output.write_text(dump_plan(plan), encoding="utf-8")
    columns = sum(len(t.columns) for t in plan.tables)
    print(f"wrote {output}: {len(plan.tables)} table(s), {columns} column(s) to rewrite; "
          "review it, then `vaultline descope run`")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from ..descope.discover import discover_postgres
    from ..descope.plan import PlanError, load_plan

    try:
        plan = load_plan(Path(args.plan))
    except PlanError as exc:
        raise ConfigError(str(exc)) from None
    found = asyncio.run(discover_postgres(_dsn(args), tables=[t.table for t in plan.tables]))
    planned = {(t.table, c.column) for t in plan.tables for c in t.columns}
    left = [f for f in found.found if (f.table, f.column) in planned]
    for f in left:
        print(f"  {f.table}.{f.column}: {f.cards} card number(s) left in "
              f"{f.values_with_cards} value(s)")
    print("no card number left in the planned columns" if not left
          else f"{sum(f.cards for f in left)} card number(s) left")
    return 1 if left else 0


def _load(args: argparse.Namespace) -> Any:
    from ..descope.plan import PlanError, load_plan

    try:
        return load_plan(Path(args.plan))
    except PlanError as exc:
        raise ConfigError(str(exc)) from None


class _Meter:
    """Progress on stderr: rows done, rows/s and the time left; a line a chunk on a terminal
    (in place), a line every few seconds otherwise."""

    def __init__(self) -> None:
        self._terminal = sys.stderr.isatty()
        self._last = 0.0

    def __call__(self, table: str, done: int, total: int, rate: float) -> None:
        now = time.monotonic()
        if not self._terminal and now - self._last < 5:
            return
        self._last = now
        left = max(total - done, 0)
        eta = f"{left / rate:,.0f} s left" if rate > 0 else "—"
        line = f"  {table}: {done:,}/{total:,} rows, {rate:,.0f} rows/s, {eta}"
        if self._terminal:
            print(f"\r{line}\x1b[K", end="", file=sys.stderr, flush=True)
        else:
            print(f"progress: {line.strip()}", file=sys.stderr, flush=True)

    def end(self) -> None:
        if self._terminal:
            print(file=sys.stderr)


def _run(main: Callable[[], Coroutine[Any, Any, Any]]) -> Any:
    """`asyncio.run(main())`; a run that cannot go on, or the tokenizer's refusal, is a
    one-line error naming the reason (exit 2)."""
    from ..descope.run import DescopeError

    try:
        return asyncio.run(main())
    except DescopeError as exc:
        raise ConfigError(str(exc)) from None
    except Exception as exc:
        if type(exc).__name__ != "AioRpcError":
            raise
        raise ConfigError(f"the tokenizer refused: {describe_rpc_error(exc)}") from None


def cmd_run(args: argparse.Namespace) -> int:
    from ..descope.run import run_plan

    plan = _load(args)
    dsn = _dsn(args)
    if args.chunk < 1 or args.chunk > 20_000:
        raise ConfigError("--chunk must be 1 to 20,000 rows")
    meter = _Meter()

    async def run() -> Any:
        if args.dry_run:
            return await run_plan(plan, dsn, None, chunk_rows=args.chunk, progress=meter)
        from ..descope.client import GrpcTokenizer

        async with tokenizer_channel(args.home, args.as_) as channel:
            tokenizer = GrpcTokenizer(channel, plan.tenant, plan.token_format)
            return await run_plan(plan, dsn, tokenizer, chunk_rows=args.chunk,
                                  again=args.again, progress=meter)

    started = time.monotonic()
    try:
        results = _run(run)
    finally:
        meter.end()
    elapsed = time.monotonic() - started
    verb = "would rewrite" if args.dry_run else "rewrote"
    for r in results:
        if r.already_done:
            print(f"  {r.table}: already de-scoped by this plan ({r.rows_rewritten:,} rows "
                  "rewritten); `--again` scans it once more")
            continue
        reread = f", {r.rows_reread:,} re-read after the CRM changed them" if (
            r.rows_reread) else ""
        print(f"  {r.table}: {r.rows_read:,} rows read, {verb} {r.rows_rewritten:,} "
              f"({r.cards_replaced:,} card numbers){reread}")
    rows = sum(r.rows_read for r in results if not r.already_done)
    rate = rows / elapsed if elapsed > 0 else 0.0
    if args.dry_run:
        print(f"dry run: nothing was changed ({rows:,} rows in {elapsed:.1f} s)")
    else:
        print(f"done: {rows:,} rows in {elapsed:.1f} s ({rate:,.0f} rows/s); now "
              "`vaultline descope verify`")
    return 0


def cmd_csv(args: argparse.Namespace) -> int:
    from ..descope.client import GrpcTokenizer
    from ..descope.discover import discover_file
    from ..descope.files import descope_csv
    from ..descope.plan import FORMATS

    source, target = Path(args.input), Path(args.output)
    if not source.is_file():
        raise ConfigError(f"{source}: not a readable file")
    if target.exists() and (not args.force or target.resolve() == source.resolve()):
        raise ConfigError(f"{target} exists (--force replaces it; never the input itself)")
    if args.token_format not in FORMATS:
        raise ConfigError(f"--token-format must be one of {', '.join(FORMATS)}")

    async def run() -> Any:
        async with tokenizer_channel(args.home, args.as_) as channel:
            tokenizer = GrpcTokenizer(channel, args.tenant, args.token_format)
            return await descope_csv(source, target, tokenizer)

    rows, cards = _run(run)
    left = discover_file(target).found
    print(f"wrote {target}: {rows:,} rows, {cards:,} card numbers replaced (mode 0600)")
    for f in left:
        print(f"  {f.table} {f.column}: {f.cards} card number(s) left")
    print("no card number left" if not left else "card numbers are left")
    return 1 if left else 0


def add_descope_commands(subparsers: Any) -> None:
    discover = subparsers.add_parser(
        "discover", help="find stored card numbers (databases, CSV/JSONL/log files)",
        description=(__doc__ or "").split("\n\n", 1)[1].strip(),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    discover.add_argument("sources", nargs="+", metavar="SOURCE",
                          help="postgresql://… DSN, or a CSV, JSONL or log file")
    discover.add_argument("--tables", help="only these tables (comma-separated; "
                          "schema.table or table)")
    discover.add_argument("--bin", action="store_true",
                          help="show the first six digits too in examples (default: last "
                          "four only)")
    discover.add_argument("--json", action="store_true", help="one JSON object on stdout")
    discover.add_argument("--report", metavar="FILE",
                          help="write the affected rows' keys here (JSON lines, mode 0600)")
    discover.set_defaults(func=cmd_discover)

    descope = subparsers.add_parser("descope", help="replace stored card numbers with tokens")
    sub = descope.add_subparsers(dest="descope_command", required=True, metavar="SUBCOMMAND")
    plan = sub.add_parser(
        "plan", help="write a de-scoping plan (YAML) from a discovery of a database",
        description="Discover the card numbers in a database and write the plan `descope run` "
        "follows: per table its key and the columns to rewrite — whole, embedded or json — "
        "and the token format (format-preserving by default). Review and edit it.")
    plan.add_argument("source", metavar="DSN", help="postgresql://… (read-only access does)")
    plan.add_argument("--output", required=True, metavar="PLAN.yaml")
    plan.add_argument("--force", action="store_true", help="replace --output")
    plan.add_argument("--tables", help="only these tables (comma-separated)")
    plan.add_argument("--tenant", default="default", help="the vault tenant (default: default)")
    plan.add_argument("--token-format", default="numeric_keep_bin",
                      help="numeric_keep_bin (default), numeric or opaque")
    plan.set_defaults(func=cmd_plan)
    run = sub.add_parser(
        "run", help="replace a plan's card numbers with tokens, in place (resumable)",
        description="Tokenize the card numbers of the plan's columns (BatchTokenize over "
        "mTLS as the `descope` identity; cards found in stored data have no expiry) and "
        "rewrite the rows in place, a chunk at a time: each chunk's rows and its checkpoint "
        "commit in one transaction of the CRM database (schema vaultline_descope), so a run "
        "stopped at any moment resumes where it stopped when run again. A row the CRM "
        "changed meanwhile is read again, never overwritten. Each chunk is recorded in "
        "Vaultline's audit trail (counts only). The database user needs UPDATE on the "
        "planned tables and CREATE on the database (for the checkpoint schema).")
    run.add_argument("plan", metavar="PLAN.yaml")
    run.add_argument("--dsn", help="postgresql://… (or VAULTLINE_DESCOPE_DSN)")
    run.add_argument("--dry-run", action="store_true",
                     help="count what would change; write nothing, tokenize nothing")
    run.add_argument("--chunk", type=int, default=2000, metavar="ROWS",
                     help="rows per chunk and transaction (default 2000)")
    run.add_argument("--again", action="store_true",
                     help="scan every table once more, even those this plan finished")
    add_identity_option(run, "descope")
    run.set_defaults(func=cmd_run)
    csv_cmd = sub.add_parser(
        "csv", help="write a copy of a CSV export with its card numbers tokenized",
        description="Read IN (CSV with a header row), replace every card number in any "
        "cell with its token — digits for digits, separators kept — and write OUT (mode "
        "0600, written whole or not at all). Then scan OUT as `discover` does: exit 0 only "
        "when no card number is left.")
    csv_cmd.add_argument("input", metavar="IN")
    csv_cmd.add_argument("output", metavar="OUT")
    csv_cmd.add_argument("--force", action="store_true", help="replace OUT")
    csv_cmd.add_argument("--tenant", default="default", help="the vault tenant")
    csv_cmd.add_argument("--token-format", default="numeric_keep_bin",
                         help="numeric_keep_bin (default), numeric or opaque")
    add_identity_option(csv_cmd, "descope")
    csv_cmd.set_defaults(func=cmd_csv)
    verify = sub.add_parser(
        "verify", help="exit 0 only when no card number is left in a plan's columns",
        description="Run discovery again on the plan's tables and report any card number "
        "left in its columns. Exit 0 when none is left, 1 otherwise.")
    verify.add_argument("plan", metavar="PLAN.yaml")
    verify.add_argument("--dsn", help="postgresql://… (or VAULTLINE_DESCOPE_DSN)")
    verify.set_defaults(func=cmd_verify)
