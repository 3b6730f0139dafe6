"""Validation of a settlement capture CSV: every bad row reported with its line, nothing kept.

Pure: takes the raw bytes, returns the rows or the list of problems. Problems name a line and
a column, never echo a value (a PAN pasted in the token column must not reach a terminal).
"""

from __future__ import annotations

import csv
import hashlib
import io
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Final

from vaultline.card import mask_pans
from vaultline.tokens import TokenError, parse_token

__all__ = [
    "ISO_4217",
    "BatchRow",
    "ParsedBatch",
    "RowProblem",
    "parse_captures",
]

COLUMNS: Final = ("reference", "token", "amount_minor", "currency")
OPTIONAL_COLUMNS: Final = ("auth_code",)
MAX_AMOUNT: Final = 10**15 - 1  # 15 digits: fits the file's fixed amount field
_REFERENCE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/-]{0,63}")
_AUTH_CODE: Final = re.compile(r"[A-Za-z0-9]{1,12}")

# Active ISO 4217 alphabetic codes (funds and precious-metal codes excluded).
ISO_4217: Final = frozenset("""
AED AFN ALL AMD ANG AOA ARS AUD AWG AZN BAM BBD BDT BGN BHD BIF BMD BND BOB BRL BSD BTN BWP
BYN BZD CAD CDF CHF CLP CNY COP CRC CUP CVE CZK DJF DKK DOP DZD EGP ERN ETB EUR FJD FKP GBP
GEL GHS GIP GMD GNF GTQ GYD HKD HNL HTG HUF IDR ILS INR IQD IRR ISK JMD JOD JPY KES KGS KHR
KMF KPW KRW KWD KYD KZT LAK LBP LKR LRD LSL LYD MAD MDL MGA MKD MMK MNT MOP MRU MUR MVR MWK
MXN MYR MZN NAD NGN NIO NOK NPR NZD OMR PAB PEN PGK PHP PKR PLN PYG QAR RON RSD RUB RWF SAR
SBD SCR SDG SEK SGD SHP SLE SOS SRD SSP STN SVC SYP SZL THB TJS TMT TND TOP TRY TTD TWD TZS
UAH UGX USD UYU UZS VES VND VUV WST XAF XCD XCG XOF XPF YER ZAR ZMW ZWG
""".split())


@dataclass(frozen=True, slots=True)
class BatchRow:
    line: int  # 1-based line of the CSV (the header is line 1)
    reference: str
    token: str
    amount_minor: int
    currency: str
    auth_code: str = ""


@dataclass(frozen=True, slots=True)
class RowProblem:
    line: int
    column: str
    problem: str

    def __str__(self) -> str:
        return f"line {self.line}: {self.column}: {self.problem}"


@dataclass
class ParsedBatch:
    rows: list[BatchRow]
    problems: list[RowProblem]
    sha256: str
    totals: dict[str, int] = field(default_factory=dict)  # currency -> sum of amount_minor
    counts: dict[str, int] = field(default_factory=dict)  # currency -> rows

    @property
    def ok(self) -> bool:
        return not self.problems and bool(self.rows)


def _rows(text: str) -> Iterator[tuple[int, list[str]]]:
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    for fields in reader:
        yield reader.line_num, fields


def parse_captures(raw: bytes, *, max_problems: int = 1000) -> ParsedBatch:
    """Validate a whole capture file: header `reference,token,amount_minor,currency[,auth_code]`.

    All problems are collected (up to `max_problems`) so finance fixes the file once.
    """
    digest = hashlib.sha256(raw).hexdigest()
    problems: list[RowProblem] = []
    rows: list[BatchRow] = []
    totals: dict[str, int] = {}
    counts: dict[str, int] = {}

    def bad(line: int, column: str, problem: str) -> None:
        if len(problems) < max_problems:
            problems.append(RowProblem(line, column, problem))

    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        return ParsedBatch([], [RowProblem(line, "file", "not valid UTF-8")], digest)
    records = _rows(text)
    try:
        first = next(records, None)
    except csv.Error:
        return ParsedBatch([], [RowProblem(1, "header", "not valid CSV")], digest)
    if first is None:
        return ParsedBatch([], [RowProblem(1, "header", "the file is empty")], digest)
    header = [h.strip().lower() for h in first[1]]
    if header not in (list(COLUMNS), list(COLUMNS + OPTIONAL_COLUMNS)):
        return ParsedBatch([], [RowProblem(
            1, "header", "must be reference,token,amount_minor,currency[,auth_code]")], digest)
    width = len(header)
    seen: dict[str, int] = {}
    line = 1
    while True:
        try:
            item = next(records, None)
        except csv.Error:
            bad(line + 1, "row", "not valid CSV (unbalanced quotes?)")
            break
        if item is None:
            break
        line, fields = item
        if not fields or fields == [""]:
            continue  # blank line
        if len(fields) != width:
            bad(line, "row", f"expected {width} columns, found {len(fields)}")
            continue
        reference, token_raw, amount_raw, currency = (f.strip() for f in fields[:4])
        auth_code = fields[4].strip() if width == 5 else ""
        before = len(problems)
        if not _REFERENCE.fullmatch(reference) or mask_pans(reference) != reference:
            bad(line, "reference", "must be 1-64 of A-Z a-z 0-9 . _ : / - and not a card number")
        elif reference in seen:
            bad(line, "reference", f"duplicate of line {seen[reference]}")
        else:
            seen[reference] = line
        try:
            token, _ = parse_token(token_raw)
        except TokenError:
            token = ""
            bad(line, "token", "not a vaultline token (" + TokenError.description + ")")
        amount = 0
        if not (amount_raw.isascii() and amount_raw.isdigit()) or int(amount_raw) <= 0:
            bad(line, "amount_minor", "must be a positive integer (minor units)")
        elif int(amount_raw) > MAX_AMOUNT:
            bad(line, "amount_minor", f"must be at most {MAX_AMOUNT}")
        else:
            amount = int(amount_raw)
        if currency not in ISO_4217:
            bad(line, "currency", "not an ISO 4217 code (upper case, e.g. EUR)")
        if auth_code and not _AUTH_CODE.fullmatch(auth_code):
            bad(line, "auth_code", "must be 1-12 letters or digits")
        if len(problems) == before:
            rows.append(BatchRow(line, reference, token, amount, currency, auth_code))
            totals[currency] = totals.get(currency, 0) + amount
            counts[currency] = counts.get(currency, 0) + 1
    if not rows and not problems:
        problems.append(RowProblem(2, "row", "the file has no rows"))
    return ParsedBatch(rows, problems, digest, dict(sorted(totals.items())),
                       dict(sorted(counts.items())))
