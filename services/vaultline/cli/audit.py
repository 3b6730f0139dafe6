"""`vaultline audit verify|tail`: check the audit hash chain and show recent records.

Both read PostgreSQL as the read-only auditor role (`VAULTLINE_AUDITOR_DATABASE_URL`, or the
running dev stack's `auditor_database_url`), which may read the audit tables and nothing
else: the auditor checks the chain independently of the tokenizer it audits. `verify` also checks
the chain against the checkpoints the tokenizer files in OpenBao, as the auditor AppRole
(`VAULTLINE_AUDITOR_APPROLE_FILE` and `VAULTLINE_VAULT_ADDR`, or the dev stack's). It never
prints a record's fields, only which record is broken and how.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import functools
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

from ..config import (
    ConfigError,
    audit_chain_from_env,
    auditor_database_url,
    env_or_stack,
    stack_value,
)
from ..security.anchor import CheckpointLedger, verify_anchored
from ..security.audit import FIELDS, PAGE_SIZE, VerifyReport
from ..store import Store
from ..vault import AppRoleCredentials, TransitClient

__all__ = ["add_audit_commands", "recent_records", "run_tail", "run_verify", "verify_database"]


# ---- verify ---------------------------------------------------------------------------------


async def verify_database(
    dsn: str,
    *,
    ledger: CheckpointLedger | None = None,
    page_size: int = PAGE_SIZE,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[VerifyReport, tuple[int, bytes] | None]:
    """`verify_anchored` over a connection of its own to `dsn`."""
    store = await Store.connect(dsn, min_size=1, max_size=1)
    try:
        return await verify_anchored(store, ledger, page_size=page_size, progress=progress)
    finally:
        await store.close()


def auditor_ledger(home: str | Path) -> TransitClient | None:
    """The auditor's OpenBao client, or None when no auditor credentials are configured."""
    approle = (os.environ.get("VAULTLINE_AUDITOR_APPROLE_FILE")
               or stack_value(home, "credentials.auditor_approle"))
    if not approle:
        return None
    addr = env_or_stack("VAULTLINE_VAULT_ADDR", home, "vault_addr")
    try:
        credentials = AppRoleCredentials.from_file(Path(approle))
    except (OSError, ValueError, KeyError):
        raise ConfigError("the auditor AppRole file cannot be read") from None
    return TransitClient(addr, credentials, audit_chain=audit_chain_from_env())


def _tty_progress(stream: TextIO) -> Callable[[int, int], None] | None:
    if not stream.isatty():
        return None

    def show(done: int, total: int) -> None:
        pct = 100 * done // total if total else 100
        stream.write(f"\rverifying audit chain: {done:,} of {total:,} records ({pct}%)")
        stream.flush()

    return show


def run_verify(dsn: str, *, out: TextIO, err: TextIO, page_size: int = PAGE_SIZE,
               ledger: CheckpointLedger | None = None) -> int:
    progress = _tty_progress(err)
    report, head = asyncio.run(verify_database(dsn, ledger=ledger, page_size=page_size,
                                               progress=progress))
    if progress is not None:
        err.write("\r\033[K")
        err.flush()
    if report.ok:
        assert head is not None
        anchors = (f"{report.checkpoints} OpenBao checkpoints matched" if ledger is not None
                   else "checkpoints not checked (no auditor credentials)")
        out.write(
            f"chain intact: {report.checked} records"
            f" (head seq {head[0]}, sha256 {bytes(head[1]).hex()}); {anchors}\n"
        )
        return 0
    where = "" if report.first_broken_seq is None else f" at record {report.first_broken_seq}"
    out.write(
        f"chain BROKEN{where}: {report.problem} ({report.checked} records before it verified)\n"
    )
    return 1


def _home(args: argparse.Namespace, default: str | Path) -> str | Path:
    return getattr(args, "home", None) or default


def cmd_audit_verify(args: argparse.Namespace, home_default: str | Path = ".vaultline") -> int:
    if args.page_size < 1:
        raise ConfigError("--page-size must be at least 1")
    home = _home(args, home_default)
    ledger = auditor_ledger(home)
    try:
        return run_verify(auditor_database_url(home), out=sys.stdout, err=sys.stderr,
                          page_size=args.page_size, ledger=ledger)
    finally:
        if ledger is not None:
            ledger.close()


# ---- tail -----------------------------------------------------------------------------------


async def recent_records(dsn: str, limit: int) -> list[dict[str, Any]]:
    """The last `limit` records as plain dicts (hashes as hex), oldest first."""
    store = await Store.connect(dsn, min_size=1, max_size=1)
    try:
        rows = await store.recent_audit(limit)
    finally:
        await store.close()
    return [
        {
            "seq": row["seq"],
            "at": row["at"].astimezone(dt.UTC).isoformat(timespec="microseconds"),
            **{name: row[name] for name in FIELDS},
            "tokens": list(row["tokens"]),
            "hash": bytes(row["hash"]).hex(),
        }
        for row in rows
    ]


def _printable(value: str, width: int) -> str:
    # Fields such as request_id come from clients: never let them drive the terminal.
    text = "".join(
        ch if ch.isprintable() else ch.encode("unicode_escape").decode("ascii") for ch in value
    )
    return text if len(text) <= width else text[: width - 1] + "…"


_COLUMNS = (
    ("seq", 12), ("at", 27), ("identity", 44), ("role", 10), ("tenant", 16), ("method", 36),
    ("token", 24), ("purpose", 24), ("outcome", 18), ("request_id", 24), ("peer", 22),
)


def _cell(record: dict[str, Any], name: str) -> str:
    value = str(record[name])
    if name == "at":  # 2025-01-02T03:04:05.123456+00:00 -> 2025-01-02 03:04:05.123456Z
        return value.replace("T", " ").removesuffix("+00:00") + "Z"
    if name == "method":  # /pkg.v1.TokenizationService/Detokenize -> TokenizationService/...
        return value.rsplit(".", 1)[-1]
    if name == "token" and not value and record.get("tokens"):  # a batch chunk's reveal list
        count = len(record["tokens"])
        return f"[{count} token{'s' if count != 1 else ''}]"
    return value


def render_table(records: list[dict[str, Any]]) -> str:
    """A readable table; `--json` has the full values and the hashes."""
    rows = [[_printable(_cell(rec, name), width) for name, width in _COLUMNS] for rec in records]
    header = [name for name, _ in _COLUMNS]
    widths = [max([len(header[i])] + [len(r[i]) for r in rows]) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip()
             for line in [header, *rows]]
    return "\n".join(lines) + "\n"


def run_tail(dsn: str, limit: int, *, as_json: bool, out: TextIO) -> int:
    records = asyncio.run(recent_records(dsn, limit))
    if as_json:
        out.write(json.dumps(records, indent=2) + "\n")
    elif not records:
        out.write("(no audit records yet)\n")
    else:
        out.write(render_table(records))
    return 0


def cmd_audit_tail(args: argparse.Namespace, home_default: str | Path = ".vaultline") -> int:
    if args.n < 1:
        raise ConfigError("-n must be at least 1")
    dsn = auditor_database_url(_home(args, home_default))
    return run_tail(dsn, args.n, as_json=args.json, out=sys.stdout)


# ---- parser ---------------------------------------------------------------------------------


def add_audit_commands(subparsers: Any, home_option_default: str | Path) -> None:
    """Add `audit verify` and `audit tail` to the `vaultline` parser's subcommands.

    Uses `args.home` from the top-level `--home` when present, else `home_option_default`
    (not a subparser default: that would overwrite the top-level option's value)."""
    audit = subparsers.add_parser("audit", help="the hash-chained audit trail")
    audit_sub = audit.add_subparsers(dest="audit_command", required=True, metavar="SUBCOMMAND")

    verify = audit_sub.add_parser(
        "verify",
        help="recompute the audit hash chain and report the first broken record",
        description="Read every audit record in seq order (in pages, so any size works) and "
        "recompute its content hash and chain link, then compare the last one with the head "
        "and the whole chain with the checkpoints the tokenizer signs and files in OpenBao "
        "(a rewrite of the database, re-chained or cut short, contradicts them). Exit 0 when "
        "intact, 1 naming the first broken record or checkpoint. Uses VAULTLINE_DATABASE_URL, "
        "VAULTLINE_VAULT_ADDR and VAULTLINE_AUDITOR_APPROLE_FILE, or the running dev stack; "
        "without auditor credentials it checks the chain alone and says so.",
    )
    verify.add_argument(
        "--page-size", type=int, default=PAGE_SIZE, help=f"records per query (default {PAGE_SIZE})"
    )
    verify.set_defaults(func=functools.partial(cmd_audit_verify, home_default=home_option_default))

    tail = audit_sub.add_parser(
        "tail",
        help="show the most recent audit records",
        description="Show the last N audit records, oldest first. Uses VAULTLINE_DATABASE_URL, "
        "or the running dev stack.",
    )
    tail.add_argument("-n", type=int, default=20, help="how many records (default 20)")
    tail.add_argument("--json", action="store_true", help="machine-readable output")
    tail.set_defaults(func=functools.partial(cmd_audit_tail, home_default=home_option_default))
