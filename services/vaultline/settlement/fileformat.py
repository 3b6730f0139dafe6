"""The processor file, format VLSF version 1: what `settle run` encrypts for the processor.

Pure: builds and parses records as bytes; no I/O. UTF-8 text, one record per line (LF), fields
separated by `|` (no field may contain `|`, CR or LF — `batch.py` guarantees it):

    H|VLSF|1|<batch id>|<created, ISO 8601 UTC>|<input rows>|<header check>
    D|<seq>|<reference>|<PAN>|<expiry MMYY>|<amount minor>|<currency>|<auth code>|<check>
    ...
    T|<detail records>|<CUR>:<count>:<total>[;<CUR>:<count>:<total>...]|<PAN hash total>|<check>

- `seq` numbers detail records 1, 2, 3… with no gap, so a missing record shows.
- `check` (every record) is the CRC-32 of the record's bytes up to and including the `|`
  before it, as 8 upper-case hex digits: a damaged line shows.
- The trailer's totals are per currency (codes in ascending order), over detail records only.
- The PAN hash total is the sum of the last 10 digits of every PAN, modulo 10^10, as 10 digits:
  the classic bank "hash total" that proves the set of PANs without revealing any.
- `input rows` in the header is the batch's row count; rows whose token could not be resolved
  are not in the file (they are in the rejects file) so the trailer count may be lower.

`FileBuilder` produces the records; `parse_file` checks a whole file (the processor's side, and
the tests').
"""

from __future__ import annotations

import datetime as dt
import zlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Final

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "DetailRecord",
    "FileBuilder",
    "FormatError",
    "ParsedFile",
    "parse_file",
]

FORMAT_NAME: Final = "VLSF"
FORMAT_VERSION: Final = 1
_HASH_MOD: Final = 10**10


class FormatError(ValueError):
    """A processor file that does not verify; the message names the line, never a PAN."""


def _check(body: bytes) -> bytes:
    return b"%08X" % zlib.crc32(body)


def _record(fields: Iterable[str]) -> bytes:
    body = "|".join(fields).encode("utf-8") + b"|"
    return body + _check(body) + b"\n"


@dataclass(frozen=True, slots=True)
class DetailRecord:
    seq: int
    reference: str
    pan: str
    expiry: str  # MMYY
    amount_minor: int
    currency: str
    auth_code: str

    def __repr__(self) -> str:  # never print the PAN
        return f"DetailRecord(seq={self.seq}, reference={self.reference!r}, pan=<hidden>)"


@dataclass
class FileBuilder:
    """Turns resolved rows into VLSF records, counting and totalling as it goes."""

    batch_id: str
    created: dt.datetime
    input_rows: int
    records: int = 0
    counts: dict[str, int] = field(default_factory=dict)
    totals: dict[str, int] = field(default_factory=dict)
    pan_hash_total: int = 0

    def header(self) -> bytes:
        created = self.created.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        return _record(("H", FORMAT_NAME, str(FORMAT_VERSION), self.batch_id, created,
                        str(self.input_rows)))

    def detail(self, reference: str, pan: str, expiry_month: int, expiry_year: int,
               amount_minor: int, currency: str, auth_code: str = "") -> bytes:
        # One f-string and one encode per record (the same bytes `_record` would build): this
        # runs once per settled row, beside the gRPC stream, on the same two cores.
        self.records = seq = self.records + 1
        counts, totals = self.counts, self.totals
        counts[currency] = counts.get(currency, 0) + 1
        totals[currency] = totals.get(currency, 0) + amount_minor
        self.pan_hash_total = (self.pan_hash_total + int(pan[-10:])) % _HASH_MOD
        body = (f"D|{seq}|{reference}|{pan}|{expiry_month:02d}{expiry_year % 100:02d}"
                f"|{amount_minor}|{currency}|{auth_code}|").encode()
        return b"%s%08X\n" % (body, zlib.crc32(body))

    def trailer(self) -> bytes:
        return _record(("T", str(self.records), format_totals(self.counts, self.totals),
                        f"{self.pan_hash_total:010d}"))


def format_totals(counts: dict[str, int], totals: dict[str, int]) -> str:
    return ";".join(f"{c}:{counts[c]}:{totals[c]}" for c in sorted(counts))


@dataclass
class ParsedFile:
    batch_id: str
    created: str
    input_rows: int
    details: list[DetailRecord]
    counts: dict[str, int]
    totals: dict[str, int]


def _split(line: bytes, number: int) -> list[str]:
    body, sep, check = line.rpartition(b"|")
    if not sep or _check(body + b"|") != check:
        raise FormatError(f"line {number}: check value does not match")
    return body.decode("utf-8").split("|")


def parse_file(data: bytes) -> ParsedFile:
    """Parse and verify a whole VLSF file: checks, sequence, trailer count and totals."""
    if not data.endswith(b"\n"):
        raise FormatError("the file does not end with a complete record")
    lines = data[:-1].split(b"\n")
    if len(lines) < 2:
        raise FormatError("a file needs a header and a trailer")
    head = _split(lines[0], 1)
    if len(head) != 6 or head[0] != "H" or head[1] != FORMAT_NAME:
        raise FormatError("line 1: not a VLSF header")
    if head[2] != str(FORMAT_VERSION):
        raise FormatError(f"line 1: unsupported version {head[2]}")
    details: list[DetailRecord] = []
    counts: dict[str, int] = {}
    totals: dict[str, int] = {}
    pan_hash = 0
    for number, line in enumerate(lines[1:-1], start=2):
        f = _split(line, number)
        if len(f) != 8 or f[0] != "D":
            raise FormatError(f"line {number}: not a detail record")
        if int(f[1]) != len(details) + 1:
            raise FormatError(f"line {number}: sequence {f[1]} out of order")
        amount = int(f[5])
        details.append(DetailRecord(int(f[1]), f[2], f[3], f[4], amount, f[6], f[7]))
        counts[f[6]] = counts.get(f[6], 0) + 1
        totals[f[6]] = totals.get(f[6], 0) + amount
        pan_hash = (pan_hash + int(f[3][-10:])) % _HASH_MOD
    number = len(lines)
    tail = _split(lines[-1], number)
    if len(tail) != 4 or tail[0] != "T":
        raise FormatError(f"line {number}: not a trailer")
    if int(tail[1]) != len(details):
        raise FormatError(f"line {number}: trailer counts {tail[1]}, file has {len(details)}")
    if tail[2] != format_totals(counts, totals):
        raise FormatError(f"line {number}: trailer totals do not match the detail records")
    if tail[3] != f"{pan_hash:010d}":
        raise FormatError(f"line {number}: PAN hash total does not match")
    return ParsedFile(head[3], head[4], int(head[5]), details, counts, totals)
