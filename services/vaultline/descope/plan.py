"""De-scoping plans: what `descope run` will rewrite, as a YAML file an operator reviews.

A plan is made from a discovery of a database (`make_plan`): per table, its key and the
columns holding card numbers, each with how it is rewritten —

    whole     the value is a card number (separators allowed): it becomes the token
    embedded  card numbers inside text: only each card's characters are replaced
    json      card numbers at these JSON paths (`[*]` for any array index): each such
              string's cards are replaced

— and the token format (format-preserving by default, so a CRM field that validates card-like
input keeps working). `load_plan` validates an edited plan and names the field of every
problem.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import yaml

from .rewrite import normalise_path

__all__ = ["ColumnPlan", "Plan", "PlanError", "TablePlan", "dump_plan", "load_plan",
           "make_plan"]

REWRITES: Final = ("whole", "embedded", "json")
FORMATS: Final = ("numeric_keep_bin", "numeric", "opaque")
_TABLE: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_$]*\.[A-Za-z_][A-Za-z0-9_$]*\Z")
_COLUMN: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_$]*\Z")
_PATH: Final = re.compile(r"\$(\.[^.\[\]]+|\[(?:[0-9]+|\*)\])+\Z")


class PlanError(ValueError):
    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


@dataclass(frozen=True)
class ColumnPlan:
    column: str
    rewrite: str
    paths: tuple[str, ...] = ()


@dataclass(frozen=True)
class TablePlan:
    table: str
    key: tuple[str, ...]
    columns: tuple[ColumnPlan, ...]


@dataclass(frozen=True)
class Plan:
    source: str
    tenant: str = "default"
    token_format: str = "numeric_keep_bin"  # noqa: S105 - a token format name
    tables: tuple[TablePlan, ...] = field(default_factory=tuple)


_HEADER: Final = """\
# Vaultline de-scoping plan. Review it, edit it, then:
#   vaultline descope run PLAN --dsn postgresql://…   (--dry-run first)
#   vaultline descope verify PLAN --dsn postgresql://…
# rewrite: whole (the value is a card number) | embedded (cards inside text; only their
#          characters change) | json (cards in strings at `paths`)
# token_format: numeric_keep_bin (default: format-preserving, keeps the BIN and last four) |
#               numeric | opaque
"""


def dump_plan(plan: Plan) -> str:
    doc: dict[str, Any] = {
        "version": 1, "source": plan.source, "tenant": plan.tenant,
        "token_format": plan.token_format,
        "tables": [{
            "table": t.table, "key": list(t.key),
            "columns": [{"column": c.column, "rewrite": c.rewrite,
                         **({"paths": list(c.paths)} if c.paths else {})}
                        for c in t.columns],
        } for t in plan.tables],
    }
    return _HEADER + yaml.safe_dump(doc, sort_keys=False, allow_unicode=True)


def load_plan(path: Path) -> Plan:
    """A validated plan; PlanError naming the file and field of every problem."""
    problems: list[str] = []

    def fail(where: str, what: str) -> None:
        problems.append(f"{path}: {where}: {what}")

    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8"
        raise PlanError([f"{path}: cannot be read ({reason})"]) from None
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError:
        raise PlanError([f"{path}: cannot be read as YAML"]) from None
    if not isinstance(doc, dict):
        raise PlanError([f"{path}: not a plan (a YAML mapping)"])
    if doc.get("version") != 1:
        fail("version", "must be 1")
    fmt = doc.get("token_format", "numeric_keep_bin")
    if fmt not in FORMATS:
        fail("token_format", f"must be one of {', '.join(FORMATS)}")
    tenant = doc.get("tenant", "default")
    if not isinstance(tenant, str) or not re.fullmatch(r"[a-z0-9][a-z0-9_-]{0,62}", tenant):
        fail("tenant", "must be a tenant name")
    tables: list[TablePlan] = []
    raw_tables = doc.get("tables")
    if not isinstance(raw_tables, list) or not raw_tables:
        fail("tables", "must be a non-empty list")
        raw_tables = []
    for i, t in enumerate(raw_tables):
        where = f"tables[{i}]"
        if not isinstance(t, dict):
            fail(where, "must be a mapping")
            continue
        name, key, cols = t.get("table"), t.get("key"), t.get("columns")
        if not isinstance(name, str) or not _TABLE.match(name):
            fail(f"{where}.table", "must be schema.table")
        if not isinstance(key, list) or not key or not all(
                isinstance(k, str) and _COLUMN.match(k) for k in key):
            fail(f"{where}.key", "must list the primary key's columns")
            key = []
        columns: list[ColumnPlan] = []
        for j, c in enumerate(cols if isinstance(cols, list) else []):
            cwhere = f"{where}.columns[{j}]"
            if not isinstance(c, dict) or not isinstance(c.get("column"), str) or not (
                    _COLUMN.match(c["column"])):
                fail(cwhere, "must name a column")
                continue
            rewrite, paths = c.get("rewrite"), c.get("paths", [])
            if rewrite not in REWRITES:
                fail(f"{cwhere}.rewrite", f"must be one of {', '.join(REWRITES)}")
            if rewrite == "json" and (not isinstance(paths, list) or not paths or not all(
                    isinstance(p, str) and _PATH.match(p) for p in paths)):
                fail(f"{cwhere}.paths", "json needs JSON paths like $.payment.card")
                paths = []
            if rewrite != "json" and paths:
                fail(f"{cwhere}.paths", "only with rewrite: json")
            columns.append(ColumnPlan(c["column"], str(rewrite), tuple(paths or ())))
        if not columns:
            fail(f"{where}.columns", "must list at least one column")
        tables.append(TablePlan(str(name), tuple(key), tuple(columns)))
    if problems:
        raise PlanError(problems)
    return Plan(str(doc.get("source", "")), tenant, fmt, tuple(tables))


def make_plan(discovery: Any, source: str, *, tenant: str = "default",
              token_format: str = "numeric_keep_bin") -> Plan:  # noqa: S107 - a format
    """The plan for what a discovery found: json for JSON columns (the paths found), whole
    where every value with a card is exactly one card, embedded otherwise."""
    by_table: dict[str, list[ColumnPlan]] = {}
    for finding in sorted(discovery.found, key=lambda f: (f.table, f.column)):
        if finding.data_type in ("json", "jsonb"):
            column = ColumnPlan(finding.column, "json", tuple(sorted(
                {normalise_path(p) for p in finding.json_paths})))
        elif finding.whole_values == finding.values_with_cards:
            column = ColumnPlan(finding.column, "whole")
        else:
            column = ColumnPlan(finding.column, "embedded")
        by_table.setdefault(finding.table, []).append(column)
    return Plan(source, tenant, token_format, tuple(
        TablePlan(table, tuple(discovery.keys.get(table) or ()), tuple(columns))
        for table, columns in by_table.items()))
