"""`descope run`: replace the card numbers a plan names with tokens, in place, chunk by chunk.

For each table of the plan, rows are read in key order a chunk at a time (no lock held while
reading), their cards tokenized over mTLS (BatchTokenize, the expiry unknown), and then, in one
transaction of the CRM's database:

- the rows are updated only where every planned column still holds what was read (a
  compare-and-set); a row the CRM changed meanwhile is read again under a row lock and
  rewritten from what it holds now — never overwritten;
- the checkpoint (schema `vaultline_descope`, created on first use) records the chunk's last
  key and counts.

So a run killed at any moment resumes after the last committed chunk: no row is rewritten
twice (a rewritten row holds no card: numeric tokens fail Luhn), and a card tokenized before
the kill gets the same token again (one token per card and format in a tenant). Locks are held
for one chunk's transaction only. After each commit the chunk is recorded in Vaultline's audit
trail (RecordDescopeChunk: counts and table); a record not yet sent when the run stopped is
kept in the checkpoint and sent first when it resumes.
"""

# SQL is built from quoted identifiers (the plan's names, checked against the catalog) and
# type names from format_type(); every value is a bind parameter.
# ruff: noqa: S608

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from collections.abc import Awaitable, Callable, Collection, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Protocol

import asyncpg

from .plan import ColumnPlan, Plan, TablePlan
from .rewrite import cards_in, cards_in_json, rewrite_json, rewrite_text

__all__ = ["ChunkCounts", "DescopeError", "TableResult", "Tokenizer", "plan_run_id", "run_plan"]

CHUNK_ROWS: Final = 2000
LOCK_TIMEOUT: Final = "5s"  # a chunk waits this long for a row the CRM holds, then retries
CHUNK_ATTEMPTS: Final = 5
_RETRYABLE: Final = (asyncpg.DeadlockDetectedError, asyncpg.LockNotAvailableError,
                     asyncpg.SerializationError)
_SCHEMA: Final = """
CREATE SCHEMA IF NOT EXISTS vaultline_descope;
CREATE TABLE IF NOT EXISTS vaultline_descope.progress (
    run_id          text        NOT NULL,
    table_name      text        NOT NULL,
    last_key        text[],
    chunks          bigint      NOT NULL DEFAULT 0,
    rows_read       bigint      NOT NULL DEFAULT 0,
    rows_rewritten  bigint      NOT NULL DEFAULT 0,
    cards_replaced  bigint      NOT NULL DEFAULT 0,
    rows_reread     bigint      NOT NULL DEFAULT 0,
    unreported      jsonb,      -- the last chunk's counts until the audit trail has them
    finished_at     timestamptz,
    updated_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (run_id, table_name)
);
COMMENT ON TABLE vaultline_descope.progress IS
    'Vaultline de-scoping checkpoints: one row per plan run and table. Counts only.';
"""


class DescopeError(RuntimeError):
    """The run cannot go on; the message names the table, never a value."""


@dataclass(frozen=True)
class ChunkCounts:
    chunk: int
    rows_read: int
    rows_rewritten: int
    cards_replaced: int
    rows_reread: int

    def as_json(self) -> str:
        return json.dumps(self.__dict__)


class Tokenizer(Protocol):
    async def tokenize(self, pans: Collection[str]) -> dict[str, str]:
        """The token of every card (digits), in the plan's tenant and format."""

    async def record_chunk(self, run_id: str, table: str, counts: ChunkCounts) -> None:
        """The chunk's audit record in Vaultline's chain."""


@dataclass
class TableResult:
    table: str
    rows_read: int = 0
    rows_rewritten: int = 0
    cards_replaced: int = 0
    rows_reread: int = 0
    chunks: int = 0
    already_done: bool = False

    def add(self, done: ChunkCounts) -> None:
        self.chunks = done.chunk
        self.rows_read += done.rows_read
        self.rows_rewritten += done.rows_rewritten
        self.cards_replaced += done.cards_replaced
        self.rows_reread += done.rows_reread


# (table, rows done so far, rows estimated in all, rows per second)
Progress = Callable[[str, int, int, float], None]
AfterRead = Callable[[str, int], Awaitable[None]]


def plan_run_id(plan: Plan) -> str:
    """A plan's run identifier: the hash of what it rewrites, so the same plan resumes and an
    edited one starts afresh."""
    canonical = json.dumps({
        "tenant": plan.tenant, "token_format": plan.token_format,
        "tables": [[t.table, list(t.key), [[c.column, c.rewrite, list(c.paths)]
                                           for c in t.columns]] for t in plan.tables],
    }, sort_keys=True)
    return hashlib.sha256(canonical.encode()).hexdigest()[:32]


def _ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _qualified(table: str) -> str:
    schema, name = table.split(".", 1)
    return f"{_ident(schema)}.{_ident(name)}"


@dataclass
class _Table:
    """A planned table and the SQL that reads and rewrites it."""

    plan: TablePlan
    key_types: list[str]
    column_types: list[str]
    select: str = ""
    select_after: str = ""
    select_locked: str = ""
    update: str = ""
    columns: tuple[ColumnPlan, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        t, plan = _qualified(self.plan.table), self.plan
        self.columns = plan.columns
        keys = [_ident(k) for k in plan.key]
        cols = [_ident(c.column) for c in plan.columns]
        width = len(keys)
        key_list = ", ".join(keys)

        def key_text(prefix: str) -> str:
            return "ARRAY[" + ", ".join(f"{prefix}{k}::text" for k in keys) + "]"

        read = (f"SELECT {key_text('')}, " + ", ".join(f"{c}::text" for c in cols)
                + f" FROM {t}")
        typed = ", ".join(f"${i + 1}::text::{ty}" for i, ty in enumerate(self.key_types))
        self.select = read + f" ORDER BY {key_list} LIMIT $1"
        self.select_after = (read + f" WHERE ({key_list}) > ({typed}) ORDER BY {key_list}"
                             f" LIMIT ${width + 1}")
        unnest_keys = ", ".join(f"u.k{i}::{ty}" for i, ty in enumerate(self.key_types))
        key_names = ", ".join(f"k{i}" for i in range(width))
        self.select_locked = (
            read + f" WHERE ({key_list}) IN (SELECT {unnest_keys} FROM unnest("
            + ", ".join(f"${i + 1}::text[]" for i in range(width))
            + f") AS u({key_names})) ORDER BY {key_list} FOR UPDATE")
        arrays = ", ".join(f"${i + 1}::text[]" for i in range(width + 2 * len(cols)))
        names = [key_names, *(f"o{j}, n{j}" for j in range(len(cols)))]
        sets = ", ".join(f"{c} = u.n{j}::{ty}"
                         for j, (c, ty) in enumerate(zip(cols, self.column_types, strict=True)))
        unchanged = " AND ".join(f"t.{c}::text IS NOT DISTINCT FROM u.o{j}"
                                 for j, c in enumerate(cols))
        self.update = (
            f"UPDATE {t} AS t SET {sets} FROM unnest({arrays}) AS u({', '.join(names)})"
            f" WHERE ({', '.join(f't.{k}' for k in keys)}) = ({unnest_keys}) AND {unchanged}"
            f" RETURNING {key_text('t.')}")


async def _describe(conn: asyncpg.Connection, plan: TablePlan) -> _Table:
    """The table's key and column types; DescopeError when the plan does not fit it."""
    rows = await conn.fetch(
        "SELECT a.attname, format_type(a.atttypid, NULL) AS type FROM pg_attribute a"
        " WHERE a.attrelid = to_regclass($1) AND a.attnum > 0 AND NOT a.attisdropped",
        _qualified(plan.table))
    if not rows:
        raise DescopeError(f"{plan.table}: no such table")
    types = {r["attname"]: r["type"] for r in rows}
    for name in (*plan.key, *(c.column for c in plan.columns)):
        if name not in types:
            raise DescopeError(f"{plan.table}: no column {name!r}")
    unique = await conn.fetch(
        "SELECT array_agg(a.attname::text) AS cols FROM pg_index i"
        " JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey)"
        " WHERE i.indrelid = to_regclass($1) AND i.indisunique GROUP BY i.indexrelid",
        _qualified(plan.table))
    if not any(set(r["cols"]) == set(plan.key) for r in unique):
        raise DescopeError(f"{plan.table}: the plan's key ({', '.join(plan.key)}) is not a "
                           "unique key of the table")
    for c in plan.columns:
        if c.rewrite == "json" and types[c.column] not in ("json", "jsonb", "text",
                                                           "character varying"):
            raise DescopeError(f"{plan.table}.{c.column}: json rewrite of a "
                               f"{types[c.column]} column")
    return _Table(plan, [types[k] for k in plan.key], [types[c.column] for c in plan.columns])


def _cards_of(columns: Sequence[ColumnPlan], row: Any) -> list[str]:
    out: list[str] = []
    for j, column in enumerate(columns):
        value = row[j + 1]
        if value is None:
            continue
        if column.rewrite == "json":
            out.extend(cards_in_json(value, column.paths))
        else:
            out.extend(cards_in(value))
    return out


def _rewrite(columns: Sequence[ColumnPlan], row: Any, tokens: dict[str, str]
             ) -> tuple[list[str | None], int]:
    """The row's planned columns rewritten, and the cards replaced."""
    new: list[str | None] = []
    replaced = 0
    for j, column in enumerate(columns):
        value = row[j + 1]
        if value is None:
            new.append(None)
            continue
        if column.rewrite == "json":
            text, count = rewrite_json(value, column.paths, tokens)
        else:
            text, count = rewrite_text(value, tokens)
        new.append(text)
        replaced += count
    return new, replaced


class _Chunk:
    """What one chunk rewrites: for each changed row its key, old and new values."""

    def __init__(self, width: int, columns: int) -> None:
        self.keys: list[list[str]] = [[] for _ in range(width)]
        self.values: list[list[str | None]] = [[] for _ in range(2 * columns)]
        self.rows: list[tuple[str, ...]] = []
        self.row_cards: list[int] = []

    @property
    def cards(self) -> int:
        return sum(self.row_cards)

    def add(self, row: Any, new: list[str | None], replaced: int) -> None:
        key = tuple(row[0])
        self.rows.append(key)
        self.row_cards.append(replaced)
        for i, k in enumerate(key):
            self.keys[i].append(k)
        for j, value in enumerate(new):
            self.values[2 * j].append(row[j + 1])
            self.values[2 * j + 1].append(value)

    def arguments(self) -> list[list[Any]]:
        return [*self.keys, *self.values]

    def cards_in_rows(self, keys: Collection[tuple[str, ...]]) -> int:
        return sum(n for key, n in zip(self.rows, self.row_cards, strict=True) if key in keys)


async def _changes(table: _Table, rows: Sequence[Any], tokenizer: Tokenizer | None
                   ) -> _Chunk:
    """The rows of `rows` that hold cards, rewritten (tokenized unless a dry run)."""
    columns = table.columns
    holding = [(row, cards) for row in rows if (cards := _cards_of(columns, row))]
    chunk = _Chunk(len(table.plan.key), len(columns))
    if not holding:
        return chunk
    pans = {pan for _, cards in holding for pan in cards}
    if tokenizer is None:  # a dry run: count, do not tokenize
        for row, cards in holding:
            chunk.rows.append(tuple(row[0]))
            chunk.row_cards.append(len(cards))
        return chunk
    tokens = await tokenizer.tokenize(pans)
    for row, _ in holding:
        new, replaced = _rewrite(columns, row, tokens)
        chunk.add(row, new, replaced)
    return chunk


async def _estimate(conn: asyncpg.Connection, table: str) -> int:
    estimate = await conn.fetchval(
        "SELECT reltuples::bigint FROM pg_class WHERE oid = to_regclass($1)", _qualified(table))
    if estimate is None or estimate < 0:
        estimate = await conn.fetchval(f"SELECT count(*) FROM {_qualified(table)}")
    return int(estimate)


async def _read(conn: asyncpg.Connection, table: _Table, last_key: list[str] | None,
                limit: int) -> list[Any]:
    if last_key is None:
        return list(await conn.fetch(table.select, limit))
    return list(await conn.fetch(table.select_after, *last_key, limit))


async def _commit_chunk(conn: asyncpg.Connection, table: _Table, chunk: _Chunk,
                        tokenizer: Tokenizer, run_id: str, number: int, rows_read: int,
                        last_key: list[str]) -> ChunkCounts:
    """One transaction: the rows (compare-and-set; changed ones re-read under lock) and the
    checkpoint."""
    async with conn.transaction():
        await conn.execute(f"SET LOCAL lock_timeout = '{LOCK_TIMEOUT}'")
        rewritten, cards, reread = 0, 0, 0
        if chunk.rows:
            done = {tuple(r[0]) for r in await conn.fetch(table.update, *chunk.arguments())}
            rewritten, cards = len(done), chunk.cards_in_rows(done)
            missed = [key for key in chunk.rows if key not in done]
            if missed:
                # Changed by the CRM since it was read (or deleted): read it again, locked,
                # and rewrite what it holds now.
                width = len(table.plan.key)
                rows = await conn.fetch(table.select_locked,
                                        *[[k[i] for k in missed] for i in range(width)])
                again = await _changes(table, rows, tokenizer)
                reread = len(missed)
                if again.rows:
                    redone = await conn.fetch(table.update, *again.arguments())
                    if len(redone) != len(again.rows):
                        raise DescopeError(f"{table.plan.table}: rows changed under a lock")
                    rewritten += len(redone)
                    cards += again.cards
        result = ChunkCounts(number, rows_read, rewritten, cards, reread)
        await conn.execute(
            "INSERT INTO vaultline_descope.progress AS p (run_id, table_name, last_key, chunks,"
            " rows_read, rows_rewritten, cards_replaced, rows_reread, unreported)"
            " VALUES ($1, $2, $3, 1, $4, $5, $6, $7, $8::jsonb)"
            " ON CONFLICT (run_id, table_name) DO UPDATE SET last_key = EXCLUDED.last_key,"
            " chunks = p.chunks + 1, rows_read = p.rows_read + EXCLUDED.rows_read,"
            " rows_rewritten = p.rows_rewritten + EXCLUDED.rows_rewritten,"
            " cards_replaced = p.cards_replaced + EXCLUDED.cards_replaced,"
            " rows_reread = p.rows_reread + EXCLUDED.rows_reread,"
            " unreported = EXCLUDED.unreported, updated_at = now()",
            run_id, table.plan.table, last_key, result.rows_read, rewritten, cards, reread,
            result.as_json())
    return result


async def _report(conn: asyncpg.Connection, tokenizer: Tokenizer, run_id: str,
                  table: str) -> None:
    """Send the checkpoint's unreported chunk record, then clear it."""
    pending = await conn.fetchval(
        "SELECT unreported::text FROM vaultline_descope.progress"
        " WHERE run_id = $1 AND table_name = $2", run_id, table)
    if pending is None:
        return
    await tokenizer.record_chunk(run_id, table, ChunkCounts(**json.loads(pending)))
    await conn.execute("UPDATE vaultline_descope.progress SET unreported = NULL"
                       " WHERE run_id = $1 AND table_name = $2", run_id, table)


async def run_plan(plan: Plan, dsn: str, tokenizer: Tokenizer | None, *,
                   chunk_rows: int = CHUNK_ROWS, again: bool = False,
                   progress: Progress | None = None,
                   after_read: AfterRead | None = None) -> list[TableResult]:
    """Run (or resume) the plan; `tokenizer=None` is a dry run, which writes nothing.
    `after_read(table, chunk)` is awaited between reading a chunk and rewriting it."""
    run_id = plan_run_id(plan)
    conn = await asyncpg.connect(dsn)
    try:
        dry = tokenizer is None
        if not dry:
            await conn.execute(_SCHEMA)
            if not await conn.fetchval("SELECT pg_try_advisory_lock(hashtextextended($1, 0))",
                                       run_id):
                raise DescopeError("another `descope run` of this plan is in progress")
            if again:
                await conn.execute("DELETE FROM vaultline_descope.progress WHERE run_id = $1",
                                   run_id)
        tables = [await _describe(conn, t) for t in plan.tables]
        results = []
        for table in tables:
            results.append(await _run_table(conn, table, tokenizer, run_id, chunk_rows,
                                            progress, after_read))
        return results
    finally:
        await conn.close()


async def _run_table(conn: asyncpg.Connection, table: _Table, tokenizer: Tokenizer | None,
                     run_id: str, chunk_rows: int, progress: Progress | None,
                     after_read: AfterRead | None) -> TableResult:
    name = table.plan.table
    result = TableResult(name)
    last_key: list[str] | None = None
    if tokenizer is not None:
        state = await conn.fetchrow(
            "SELECT last_key, chunks, rows_read, rows_rewritten, cards_replaced, rows_reread,"
            " finished_at FROM vaultline_descope.progress WHERE run_id = $1 AND table_name = $2",
            run_id, name)
        await _report(conn, tokenizer, run_id, name)
        if state is not None:
            last_key = list(state["last_key"]) if state["last_key"] is not None else None
            result.chunks, result.rows_read = state["chunks"], state["rows_read"]
            result.rows_rewritten, result.cards_replaced = (state["rows_rewritten"],
                                                            state["cards_replaced"])
            result.rows_reread = state["rows_reread"]
            if state["finished_at"] is not None:
                result.already_done = True
                return result
    total = await _estimate(conn, name)
    started, done_before = time.monotonic(), result.rows_read
    while True:
        rows = await _read(conn, table, last_key, chunk_rows)
        if not rows:
            break
        if after_read is not None:
            await after_read(name, result.chunks + 1)
        if tokenizer is None:
            chunk = await _changes(table, rows, None)
            done = ChunkCounts(result.chunks + 1, len(rows), len(chunk.rows), chunk.cards, 0)
        else:
            for attempt in range(CHUNK_ATTEMPTS):
                if attempt:  # a lock the CRM held, or a deadlock: read the chunk afresh
                    await asyncio.sleep(0.2 * attempt)
                    rows = await _read(conn, table, last_key, chunk_rows)
                    if not rows:
                        break
                chunk = await _changes(table, rows, tokenizer)
                try:
                    done = await _commit_chunk(conn, table, chunk, tokenizer, run_id,
                                               result.chunks + 1, len(rows), list(rows[-1][0]))
                    break
                except _RETRYABLE:
                    if attempt == CHUNK_ATTEMPTS - 1:
                        raise DescopeError(f"{name}: rows stayed locked by others through "
                                           f"{CHUNK_ATTEMPTS} attempts; run again later"
                                           ) from None
            if not rows:
                break
            await _report(conn, tokenizer, run_id, name)
        result.add(done)
        last_key = list(rows[-1][0])
        if progress is not None:
            elapsed = time.monotonic() - started
            rate = (result.rows_read - done_before) / elapsed if elapsed > 0 else 0.0
            progress(name, result.rows_read, max(total, result.rows_read), rate)
    if tokenizer is not None:  # done (an empty table too: no chunk wrote its row)
        await conn.execute(
            "INSERT INTO vaultline_descope.progress (run_id, table_name, finished_at)"
            " VALUES ($1, $2, now()) ON CONFLICT (run_id, table_name)"
            " DO UPDATE SET finished_at = now()", run_id, name)
    return result
