"""Data discovery (PCI DSS 12.5.2): where card numbers are stored, and how many.

Sources: a PostgreSQL database (every text, varchar, char, json and jsonb column of every
table outside the system schemas, or the `tables` asked for), a CSV file (per column), a JSONL
file (per top-level key) or any other text file such as a log (per file). A database is read in
one read-only transaction through server-side cursors, a few thousand rows at a time, so
memory stays bounded whatever the table's size; nothing is ever written to a source.

A `Finding` per table.column (or file column) counts the values holding card numbers, the
cards, their brands, and keeps a few masked examples. The keys of the affected rows (primary
key values; line numbers for files) go to the report sink, never card digits: a key that itself
holds a card number is masked.
"""

from __future__ import annotations

import csv
import json
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import asyncpg

from .detect import CardSpan, find_cards, might_hold_card

__all__ = ["Discovery", "Finding", "discover_file", "discover_postgres", "display_source",
           "mask_value"]

EXAMPLES: Final = 5
FETCH: Final = 5000
TEXT_TYPES: Final = ("text", "character varying", "character", "json", "jsonb")
_SYSTEM_SCHEMAS: Final = ("pg_catalog", "information_schema", "vaultline_descope",
                          "pg_toast")


@dataclass
class Finding:
    source: str
    table: str
    column: str
    values_with_cards: int = 0
    cards: int = 0
    brands: Counter[str] = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)
    # For a de-scoping plan: values that are a card number and nothing else, the column's
    # type, and (JSON columns) the paths whose strings hold cards.
    whole_values: int = 0
    data_type: str = ""
    json_paths: set[str] = field(default_factory=set)

    def add(self, spans: list[CardSpan], show_bin: bool) -> None:
        self.values_with_cards += 1
        self.cards += len(spans)
        for span in spans:
            self.brands[span.brand.name] += 1
            example = span.masked(show_bin=show_bin)
            if len(self.examples) < EXAMPLES and example not in self.examples:
                self.examples.append(example)

    def as_dict(self) -> dict[str, Any]:
        return {"source": self.source, "table": self.table, "column": self.column,
                "values_with_cards": self.values_with_cards, "cards": self.cards,
                "brands": dict(sorted(self.brands.items())), "examples": self.examples}


ReportSink = Callable[[dict[str, Any]], None]
Progress = Callable[[str, int], None]


@dataclass
class Discovery:
    """Everything one run found, and what it looked at."""

    findings: dict[tuple[str, str, str], Finding] = field(default_factory=dict)
    scanned: Counter[str] = field(default_factory=Counter)  # rows (or lines) per table/file
    keys: dict[str, list[str]] = field(default_factory=dict)  # primary key columns per table

    def finding(self, source: str, table: str, column: str) -> Finding:
        key = (source, table, column)
        if key not in self.findings:
            self.findings[key] = Finding(source, table, column)
        return self.findings[key]

    @property
    def found(self) -> list[Finding]:
        return [f for f in self.findings.values() if f.cards]


def mask_value(value: Any) -> Any:
    """A key value as a report may hold it: any card number inside masked."""
    text = str(value)
    spans = find_cards(text)
    for span in reversed(spans):
        text = text[:span.start] + span.masked() + text[span.end:]
    return text if spans else value


def display_source(dsn: str) -> str:
    """The DSN without its password."""
    try:
        from urllib.parse import urlsplit, urlunsplit

        parts = urlsplit(dsn)
        host = parts.hostname or ""
        netloc = f"{parts.username}@{host}" if parts.username else host
        if parts.port:
            netloc += f":{parts.port}"
        return urlunsplit(parts._replace(netloc=netloc))
    except ValueError:
        return "postgresql"


async def _tables(conn: asyncpg.Connection, only: set[str] | None
                  ) -> list[tuple[str, str, list[str], list[tuple[str, str]]]]:
    """(schema, table, primary key columns, text-like (column, type)) of every table."""
    rows = await conn.fetch(
        "SELECT c.table_schema, c.table_name, c.column_name, c.data_type"
        " FROM information_schema.columns c"
        " JOIN information_schema.tables t ON t.table_schema = c.table_schema"
        " AND t.table_name = c.table_name AND t.table_type = 'BASE TABLE'"
        " WHERE c.data_type = ANY($1) AND NOT c.table_schema = ANY($2)"
        " ORDER BY c.table_schema, c.table_name, c.ordinal_position",
        list(TEXT_TYPES), list(_SYSTEM_SCHEMAS))
    columns: dict[tuple[str, str], list[tuple[str, str]]] = {}
    for r in rows:
        name = f"{r['table_schema']}.{r['table_name']}"
        if only is None or name in only or r["table_name"] in only:
            columns.setdefault((r["table_schema"], r["table_name"]), []).append(
                (r["column_name"], r["data_type"]))
    out = []
    for (schema, table), cols in columns.items():
        keys = await conn.fetch(
            "SELECT a.attname FROM pg_index i JOIN pg_attribute a ON a.attrelid = i.indrelid"
            " AND a.attnum = ANY(i.indkey) WHERE i.indrelid = $1::regclass AND i.indisprimary"
            " ORDER BY array_position(i.indkey, a.attnum)", _qualified(schema, table))
        out.append((schema, table, [k["attname"] for k in keys], cols))
    return out


def _ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _qualified(schema: str, table: str) -> str:
    return f"{_ident(schema)}.{_ident(table)}"


async def discover_postgres(dsn: str, *, tables: Iterable[str] | None = None,
                            show_bin: bool = False, report: ReportSink | None = None,
                            progress: Progress | None = None,
                            discovery: Discovery | None = None) -> Discovery:
    """Scan a database, read-only; the discovery so far (extended when one is given)."""
    found = discovery or Discovery()
    source = display_source(dsn)
    conn = await asyncpg.connect(dsn)
    try:
        async with conn.transaction(readonly=True, isolation="repeatable_read"):
            only = set(tables) if tables else None
            for schema, table, keys, typed in await _tables(conn, only):
                name = f"{schema}.{table}"
                found.keys[name] = keys
                cols = [c for c, _ in typed]
                types = dict(typed)
                key_sql = ", ".join(f"{_ident(k)}::text" for k in keys) or "ctid::text"
                select = ", ".join(f"{_ident(c)}::text" for c in cols)
                query = f"SELECT {key_sql}, {select} FROM {_qualified(schema, table)}"  # noqa: S608 - quoted identifiers from the catalog
                nkeys = max(len(keys), 1)
                key_names = keys or ["ctid"]
                count = 0
                cursor = await conn.cursor(query)
                while rows := await cursor.fetch(FETCH):
                    count += len(rows)
                    for i, column in enumerate(cols):
                        for index, spans in _cards_by_row(rows, nkeys + i):
                            finding = found.finding(source, name, column)
                            finding.add(spans, show_bin)
                            _shape(finding, types[column], rows[index][nkeys + i])
                            if report is not None:
                                row = rows[index]
                                report({"source": source, "table": name, "column": column,
                                        "key": {k: mask_value(row[j])
                                                for j, k in enumerate(key_names)},
                                        "cards": len(spans)})
                    if progress is not None:
                        progress(name, count)
                found.scanned[name] += count
                if progress is not None:
                    progress(name, count)
    finally:
        await conn.close()
    return found


def _shape(finding: Finding, data_type: str, value: str) -> None:
    """What a plan needs to know of a value with cards: is it a card and nothing else, and
    (JSON) at which paths are the cards."""
    finding.data_type = data_type
    if data_type in ("json", "jsonb"):
        try:
            doc = json.loads(value)
        except ValueError:
            return
        for path, text in _json_strings(doc):
            if find_cards(text):
                finding.json_paths.add(path)
        return
    stripped = value.strip()
    spans = find_cards(stripped)
    if len(spans) == 1 and spans[0].start == 0 and spans[0].end == len(stripped):
        finding.whole_values += 1


def _cards_by_row(rows: list[Any], column: int) -> Iterator[tuple[int, list[CardSpan]]]:
    """(row index, its cards) for one column of a chunk of rows. The chunk's values are
    searched as one text joined by NUL — which PostgreSQL text never holds, so it marks
    where each value starts — leaving the regular expressions to do the per-row work."""
    joined = "\x00".join([row[column] or "" for row in rows])
    if not might_hold_card(joined):
        return
    by_row: dict[int, list[CardSpan]] = {}
    for span in find_cards(joined):
        by_row.setdefault(joined.count("\x00", 0, span.start), []).append(span)
    yield from by_row.items()


def _json_strings(value: Any, path: str = "$") -> Iterator[tuple[str, str]]:
    if isinstance(value, str):
        yield path, value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _json_strings(item, f"{path}.{key}")
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from _json_strings(item, f"{path}[{i}]")
    elif isinstance(value, int | float) and not isinstance(value, bool):
        yield path, str(value)


def discover_file(path: Path, *, show_bin: bool = False, report: ReportSink | None = None,
                  progress: Progress | None = None,
                  discovery: Discovery | None = None) -> Discovery:
    """Scan a CSV (per column), JSONL (per JSON path) or any text file (per file)."""
    found = discovery or Discovery()
    source, name = str(path), path.name
    kind = path.suffix.lower()
    lines = 0
    with path.open("r", encoding="utf-8", errors="replace", newline="") as fh:
        if kind == ".csv":
            reader = csv.reader(fh)
            header = next(reader, [])
            for lines, record in enumerate(reader, 2):
                for i, value in enumerate(record):
                    column = header[i] if i < len(header) else f"column {i + 1}"
                    _check(found, source, name, column, value, lines, show_bin, report)
        else:
            for lines, line in enumerate(fh, 1):
                if kind == ".jsonl":
                    try:
                        doc = json.loads(line)
                    except ValueError:
                        doc = line
                    for column, value in _json_strings(doc):
                        column = column.split("[", 1)[0]
                        _check(found, source, name, column, value, lines, show_bin, report)
                else:
                    _check(found, source, name, "", line, lines, show_bin, report)
                if progress is not None and lines % 100_000 == 0:
                    progress(name, lines)
    found.scanned[name] += lines
    if progress is not None:
        progress(name, lines)
    return found


def _check(found: Discovery, source: str, name: str, column: str, value: str, line: int,
           show_bin: bool, report: ReportSink | None) -> None:
    if not might_hold_card(value):
        return
    spans = find_cards(value)
    if spans:
        found.finding(source, name, column).add(spans, show_bin)
        if report is not None:
            report({"source": source, "table": name, "column": column,
                    "key": {"line": line}, "cards": len(spans)})
