"""`vaultline discover SOURCE…`: where card numbers are stored (PCI DSS 12.5.2); and
`vaultline descope plan|verify`: the plan of what to rewrite, and proof nothing is left.

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
from pathlib import Path
from typing import Any, TextIO

from ..config import ConfigError

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
    verify = sub.add_parser(
        "verify", help="exit 0 only when no card number is left in a plan's columns",
        description="Run discovery again on the plan's tables and report any card number "
        "left in its columns. Exit 0 when none is left, 1 otherwise.")
    verify.add_argument("plan", metavar="PLAN.yaml")
    verify.add_argument("--dsn", help="postgresql://… (or VAULTLINE_DESCOPE_DSN)")
    verify.set_defaults(func=cmd_verify)
