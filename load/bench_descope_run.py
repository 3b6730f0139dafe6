"""De-scoping speed: `descope run` over a 1M-row CRM notes table, and a card column.

Starts a fresh stack (as `make run` does), creates in its PostgreSQL (as the CRM's database):

- `bench_notes`: `--rows` free-text notes, one in `--every` holding a distinct card number
  (written with spaces), the rest dates, order numbers, phone numbers and digests;
- `bench_cards`: `--card-rows` rows whose card column is a distinct card number each (the
  worst case: every row is tokenized and rewritten).

Then measures, in this process, as the stack's `descope` identity:

- baseline: the same keyset-ordered chunks read, nothing examined or written;
- run: `run_plan` on each table (detect, BatchTokenize with new tokens, compare-and-set
  UPDATE + checkpoint per chunk, audit record per chunk).

Reports rows/s for each, their ratio to the baseline, the cards replaced (must equal those
planted) and the peak RSS. Goal (issue 18): ≥ 30,000 rows/s on the notes table.

Usage: python load/bench_descope_run.py [--rows 1000000] [--every 100] [--card-rows 100000]
Record the printed figures in load/README.md. A measurement, never a test assertion.
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import sys
import tempfile
import time
from pathlib import Path

import asyncpg
import grpc

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "services"))
sys.path.insert(0, str(ROOT / "load"))

from bench import credentials, start_stack, unique_pans  # noqa: E402

from vaultline.descope.client import GrpcTokenizer  # noqa: E402
from vaultline.descope.plan import ColumnPlan, Plan, TablePlan  # noqa: E402
from vaultline.descope.run import CHUNK_ROWS, run_plan  # noqa: E402

FILLER = ("SELECT i, 'Called about order ORD-' || (100000 + i) || ' on '"
          " || (DATE '2026-01-01' + (i % 300)::int) || ', call back on +44 20 7946 '"
          " || lpad((i % 10000)::text, 4, '0') || '. Ref ' || md5(i::text)"
          " FROM generate_series(1, $1::bigint) AS i")


async def create(dsn: str, rows: int, every: int, card_rows: int) -> None:
    cards = unique_pans(rows // every + card_rows, seed=18)
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("CREATE TABLE bench_notes (id bigint PRIMARY KEY, body text);"
                           "CREATE TABLE bench_cards (id bigint PRIMARY KEY,"
                           " card_number varchar(19), note text)")
        await conn.execute(f"INSERT INTO bench_notes {FILLER}", rows)  # noqa: S608 - constant
        planted = [(i * every, "Customer paid with " + " ".join(
            cards[i - 1][j:j + 4] for j in range(0, 16, 4)) + " today, thanks")
            for i in range(1, rows // every + 1)]
        await conn.executemany("UPDATE bench_notes SET body = $2 WHERE id = $1", planted)
        await conn.copy_records_to_table("bench_cards", records=[
            (i + 1, card, "on file") for i, card in enumerate(cards[rows // every:])])
        # The CRM's tables only: analyzing the vault's empty `tokens` table too leaves the
        # tokenizer planning for an empty table (see load/README.md, de-scoping).
        await conn.execute("ANALYZE bench_notes, bench_cards")
    finally:
        await conn.close()


async def baseline(dsn: str, table: str) -> float:
    """Rows/s of reading the table in the run's keyset chunks, nothing else."""
    conn = await asyncpg.connect(dsn)
    try:
        last, seen = 0, 0
        started = time.perf_counter()
        while rows := await conn.fetch(
                f"SELECT ARRAY[id::text], * FROM {table} WHERE id > $1 ORDER BY id LIMIT $2",  # noqa: S608 - constant
                last, CHUNK_ROWS):
            seen += len(rows)
            last = rows[-1]["id"]
        return seen / (time.perf_counter() - started)
    finally:
        await conn.close()


async def run(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix="vaultline-bench-descope-") as tmpdir:
        tmp = Path(tmpdir)
        tmp.chmod(0o711)
        stack_proc, stack = start_stack(tmp / "home")
        try:
            dsn = stack["owner_dsn"]
            started = time.perf_counter()
            await create(dsn, args.rows, args.every, args.card_rows)
            print(f"created {args.rows:,} notes and {args.card_rows:,} card rows in "
                  f"{time.perf_counter() - started:.1f} s", flush=True)
            figures = []
            async with grpc.aio.secure_channel(stack["grpc_address"],
                                               credentials(stack, "descope")) as channel:
                for table, column, rewrite, rows in (
                        ("public.bench_notes", "body", "embedded", args.rows),
                        ("public.bench_cards", "card_number", "whole", args.card_rows)):
                    base = await baseline(dsn, table)
                    plan = Plan("bench", "default", "numeric_keep_bin", (
                        TablePlan(table, ("id",), (ColumnPlan(column, rewrite),)),))
                    tokenizer = GrpcTokenizer(channel, plan.tenant, plan.token_format)
                    started = time.perf_counter()
                    (result,) = await run_plan(plan, dsn, tokenizer)
                    elapsed = time.perf_counter() - started
                    figures.append((table, rows, base, rows / elapsed, elapsed, result))
        except Exception:
            print((tmp / "stack.log").read_text()[-4000:], file=sys.stderr)
            raise
        finally:
            stack_proc.terminate()
            stack_proc.wait(60)
    for table, rows, base, rate, elapsed, result in figures:
        print(f"{table}: baseline (keyset read only) {base:10,.0f} rows/s")
        print(f"{table}: descope run                 {rate:10,.0f} rows/s  ({elapsed:.1f} s,"
              f" {rows:,} rows), {result.cards_replaced:,} cards replaced in "
              f"{result.rows_rewritten:,} rows, {result.chunks} chunks")
        print(f"{table}: ratio run/baseline          {base / rate:10.2f}×")
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak RSS of this process {rss_mb:,.0f} MB")


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--every", type=int, default=100,
                        help="one note in this many holds a card (default 100)")
    parser.add_argument("--card-rows", type=int, default=100_000)
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
