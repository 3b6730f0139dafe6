"""Discovery speed: `vaultline discover` over a 1M-row table of free-text notes.

Starts a fresh stack (as `make run` does) for its PostgreSQL, creates a CRM-like table of
`--rows` notes (realistic text with dates, order numbers and phone numbers; one in 1,000
holding a card number, written plainly or with separators), then measures, in this process:

- baseline: the same rows streamed through the same server-side cursor, nothing examined;
- discovery: `discover_postgres` on the table (the detector on every value).

Reports rows/s for both, their ratio, the cards found (must equal those planted) and the
peak RSS of the process. Goal (issue 18): ≥ 200,000 rows/s.

Usage: python load/bench_discover.py [--rows 1000000]
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "services"))
sys.path.insert(0, str(ROOT / "load"))

from bench import start_stack  # noqa: E402

from vaultline.descope.discover import FETCH, discover_postgres  # noqa: E402

CREATE = """
CREATE TABLE bench_notes (id bigint PRIMARY KEY, body text);
INSERT INTO bench_notes
SELECT i, CASE
  WHEN i % 1000 = 0
    THEN 'Customer paid with 4111 1111 1111 1111 on ' || (DATE '2026-01-01' + (i % 300)::int)
  WHEN i % 1000 = 500 THEN 'card 5555-5555-5555-4444 declined, retried'
  ELSE 'Called about order ORD-' || (100000 + i) || ' on ' || (DATE '2026-01-01' + (i % 300)::int)
       || ', call back on +44 20 7946 ' || lpad((i % 10000)::text, 4, '0')
       || '. Ref ' || md5(i::text)
END
FROM generate_series(1, $1::bigint) AS i;
"""


async def run(rows: int) -> None:
    with tempfile.TemporaryDirectory(prefix="vaultline-bench-discover-") as tmpdir:
        tmp = Path(tmpdir)
        tmp.chmod(0o711)
        stack_proc, stack = start_stack(tmp / "home")
        try:
            dsn = stack["owner_dsn"]
            conn = await asyncpg.connect(dsn)
            try:
                statements = CREATE.strip().split(";\n")
                await conn.execute(statements[0])
                started = time.perf_counter()
                await conn.execute(statements[1], rows)
                print(f"created {rows:,} notes in {time.perf_counter() - started:.1f} s")
                started = time.perf_counter()
                seen = 0
                async with conn.transaction(readonly=True):
                    async for _row in conn.cursor(
                            "SELECT id::text, body::text FROM bench_notes", prefetch=FETCH):
                        seen += 1
                baseline = time.perf_counter() - started
            finally:
                await conn.close()
            started = time.perf_counter()
            found = await discover_postgres(dsn, tables=["bench_notes"])
            elapsed = time.perf_counter() - started
        finally:
            stack_proc.terminate()
            stack_proc.wait(60)
    cards = sum(f.cards for f in found.found)
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"baseline (stream only)   {seen / baseline:12,.0f} rows/s  ({baseline:.1f} s)")
    print(f"discovery                {rows / elapsed:12,.0f} rows/s  ({elapsed:.1f} s), "
          f"{cards:,} cards found of {rows // 500:,} planted")
    print(f"ratio discovery/baseline {elapsed / baseline:12.2f}×")
    print(f"peak RSS                 {rss_mb:12,.0f} MB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    asyncio.run(run(parser.parse_args().rows))


if __name__ == "__main__":
    main()
