"""Validation of a settlement capture CSV, streamed: every bad row reported with its line.

Pure: the input is a `Source`, a callable that returns the file's bytes from the start as an
iterable of chunks (the caller does the I/O); nothing here keeps the rows. `check_captures` is
pass 1: it validates the whole file and returns the problems, the SHA-256, the totals and the
row count, keeping only a compact index of the references (for duplicates). `CheckedBatch.reread`
is pass 2: the same row parser over a second read, yielding the rows lazily (for COPY) and
verifying afterwards that the bytes were the same. `parse_captures` does both on bytes in
memory, for tests and small files.

Problems name a line and a column, never echo a value (a PAN pasted in the token column must
not reach a terminal).
"""

from __future__ import annotations

import codecs
import csv
import hashlib
import io
import os
from array import array
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Final

from vaultline.batches import (
    ISO_4217,
    MAX_AMOUNT,
    RowsDigest,
    auth_code_problem,
    currency_problem,
    reference_problem,
    token_problem,
)

__all__ = [
    "ISO_4217",
    "BatchRow",
    "CheckedBatch",
    "Digest",
    "InputChanged",
    "ParsedBatch",
    "Record",
    "RowProblem",
    "RowStream",
    "Source",
    "check_captures",
    "keyed_digest",
    "parse_captures",
]

COLUMNS: Final = ("reference", "token", "amount_minor", "currency")
OPTIONAL_COLUMNS: Final = ("auth_code",)
_AMOUNT_DIGITS: Final = len(str(MAX_AMOUNT))
_MASK64: Final = (1 << 64) - 1

Source = Callable[[], Iterable[bytes]]
"""Each call returns the input's bytes from the start, in chunks of any size."""
Digest = Callable[[str], int]
"""A 64-bit digest of a reference (only ever compared, never stored in place of a check)."""
Record = tuple[int, str, str, int, str, str]
"""(line, reference, token, amount_minor, currency, auth_code): one valid row."""


class InputChanged(Exception):
    """Two reads of the input differ (it changed between them, or could not be read again)."""


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


def keyed_digest(key: bytes | None = None) -> Digest:
    """BLAKE2b-64 of the reference under a random (or given) key: collisions cannot be planted."""
    keyed = hashlib.blake2b(digest_size=8, key=os.urandom(16) if key is None else key).copy
    from_bytes = int.from_bytes

    def digest(reference: str) -> int:
        h = keyed()
        h.update(reference.encode())
        return from_bytes(h.digest(), "little")

    return digest


# ---- references: duplicates in bounded memory ------------------------------------------------


class _References:
    """The line on which each reference first appeared, without keeping the references.

    An open-addressing table from a 64-bit digest of the reference to its line, in two arrays
    (12 bytes a slot, at most half full: about 24 MB for a million references, against well over
    100 MB for a dict of the strings). Two rows with the same digest are the same reference *or* a
    digest collision; the table cannot tell, so such a digest is a `hit`: the scan reports a
    provisional duplicate and `check_captures` reads the file again with that digest in
    `exact`, where references are compared as strings (a dict holding only the references whose
    digest repeated). A duplicate is only ever reported after comparing the references.
    """

    def __init__(self, digest: Digest, exact: frozenset[int] = frozenset()) -> None:
        self._digest = digest
        self._exact_digests = exact
        self._exact: dict[str, int] = {}
        self.hits: set[int] = set()
        self._size = 0
        self._mask = (1 << 16) - 1
        self._keys = array("Q", [0]) * (self._mask + 1)  # 0 = empty slot
        self._lines = array("I", [0]) * (self._mask + 1)

    def _key(self, reference: str) -> int:
        return (self._digest(reference) & _MASK64) or 1  # 0 marks an empty slot

    def _slot(self, d: int) -> int:
        """The slot holding digest `d`, or the empty slot where it would go."""
        keys, mask = self._keys, self._mask
        i = d & mask
        while (k := keys[i]) and k != d:
            i = (i + 1) & mask
        return i

    def first_line(self, reference: str, line: int) -> int:
        """Record `reference` on `line` unless seen before; the line it was first seen on."""
        d = self._key(reference)
        if d in self._exact_digests:
            return self._exact.setdefault(reference, line)
        i = self._slot(d)
        if self._keys[i]:  # the same digest: the same reference, or a collision
            self.hits.add(d)
            return self._lines[i]
        self._keys[i] = d
        self._lines[i] = line
        self._size += 1
        if self._size * 2 > self._mask:
            self._grow()
        return line

    def recorded_line(self, reference: str, line: int) -> int:
        """The line `first_line` recorded for `reference` (0 if none); changes nothing."""
        d = self._key(reference)
        if d in self._exact_digests:
            return self._exact.get(reference, 0)
        i = self._slot(d)
        return self._lines[i] if self._keys[i] else 0

    def _grow(self) -> None:
        old_keys, old_lines = self._keys, self._lines
        self._mask = mask = (self._mask + 1) * 2 - 1
        self._keys = keys = array("Q", [0]) * (mask + 1)
        self._lines = lines = array("I", [0]) * (mask + 1)
        for d, line in zip(old_keys, old_lines, strict=True):
            if d:
                i = d & mask
                while keys[i]:
                    i = (i + 1) & mask
                keys[i] = d
                lines[i] = line


# ---- one read of the input -------------------------------------------------------------------


class _Scan:
    """One read: hash, decode UTF-8 incrementally, split lines, parse CSV, validate every row.

    Pass 1 and pass 2 are both this; they differ only in `seen(reference, line)`, which returns
    the line a reference first appeared on (pass 1 records, pass 2 looks up pass 1's record).
    Once `max_problems` are found rows are no longer validated, but the rest is still decoded
    (an encoding error anywhere replaces every other problem) and hashed.
    """

    def __init__(self, seen: Callable[[str, int], int], max_problems: int) -> None:
        self._seen = seen
        self._max_problems = max_problems
        self._sha = hashlib.sha256()
        self._encoding: RowProblem | None = None
        self.problems: list[RowProblem] = []
        self.row_count = 0
        self.totals: dict[str, int] = {}
        self.counts: dict[str, int] = {}
        self.rows_digest = RowsDigest()

    @property
    def sha256(self) -> str:
        return self._sha.hexdigest()

    @property
    def encoding_error(self) -> bool:
        return self._encoding is not None

    def rows(self, chunks: Iterable[bytes]) -> Iterator[Record]:
        """The valid rows, in order; problems, totals and the digest are complete at the end."""
        lines = self._lines(iter(chunks))
        yield from self._records(lines)
        for _ in lines:  # the rest after a fatal problem or the problem cap: decode and hash
            pass
        if self._encoding is not None:
            self.problems = [self._encoding]
        elif not self.problems and not self.row_count:
            self.problems.append(RowProblem(2, "row", "the file has no rows"))

    def _bad(self, line: int, column: str, problem: str) -> None:
        if len(self.problems) < self._max_problems:
            self.problems.append(RowProblem(line, column, problem))

    def _lines(self, chunks: Iterator[bytes]) -> Iterator[str]:
        """Text lines as `open(newline="")` gives them (ending in \\n, \\r\\n or \\r), across
        chunk boundaries (a character or a \\r\\n split between two chunks); a leading BOM is
        dropped. Stops at the first byte that is not UTF-8, noting its line."""
        decoder = codecs.getincrementaldecoder("utf-8")("strict")
        sha = self._sha
        newlines = 0  # b"\n" in the chunks before this one
        tail = ""  # an unfinished line (or one ending in \r: a \n may follow in the next chunk)
        start = True
        final = False
        while not final:
            chunk = next(chunks, None)
            try:
                if chunk is None:
                    final = True
                    text = decoder.decode(b"", final=True)
                else:
                    sha.update(chunk)
                    text = decoder.decode(chunk)
            except UnicodeDecodeError as exc:
                # `exc.object` is the decoder's held-back bytes (a partial character, never a
                # newline) followed by this chunk.
                line = newlines + exc.object[:exc.start].count(b"\n") + 1
                self._encoding = RowProblem(line, "file", "not valid UTF-8")
                for rest in chunks:
                    sha.update(rest)
                return
            if chunk is not None:
                newlines += chunk.count(b"\n")
            if start and text:
                start = False
                if text[0] == "\ufeff":
                    text = text[1:]
            if not text:
                continue
            lines = io.StringIO(tail + text, newline="").readlines()
            tail = "" if lines[-1].endswith("\n") else lines.pop()
            yield from lines
        if tail:
            yield tail

    def _records(self, lines: Iterator[str]) -> Iterator[Record]:
        reader = csv.reader(lines, strict=True)
        try:
            first = next(reader, None)
        except csv.Error:
            self.problems = [RowProblem(1, "header", "not valid CSV")]
            return
        if first is None:
            self.problems = [RowProblem(1, "header", "the file is empty")]
            return
        header = [h.strip().lower() for h in first]
        if header not in (list(COLUMNS), list(COLUMNS + OPTIONAL_COLUMNS)):
            self.problems = [RowProblem(
                1, "header", "must be reference,token,amount_minor,currency[,auth_code]")]
            return
        width = len(header)
        seen, bad, problems = self._seen, self._bad, self.problems
        totals, counts = self.totals, self.counts
        rows_digest = self.rows_digest
        line = 1
        while len(problems) < self._max_problems:
            try:
                fields = next(reader, None)
            except csv.Error:
                bad(line + 1, "row", "not valid CSV (unbalanced quotes?)")
                return
            if fields is None:
                return
            line = reader.line_num
            if not fields or fields == [""]:
                continue  # blank line
            if len(fields) != width:
                bad(line, "row", f"expected {width} columns, found {len(fields)}")
                continue
            reference = fields[0].strip()
            amount_raw = fields[2].strip()
            currency = fields[3].strip()
            auth_code = fields[4].strip() if width == 5 else ""
            ok = True
            if (problem := reference_problem(reference)) is not None:
                ok = False
                bad(line, "reference", problem)
            elif (first_line := seen(reference, line)) != line:
                ok = False
                bad(line, "reference", f"duplicate of line {first_line}")
            token, problem = token_problem(fields[1].strip())
            if problem is not None:
                ok = False
                bad(line, "token", problem)
            amount = 0
            digits = amount_raw.lstrip("0")  # compared by length: no int() of a huge string
            if not (amount_raw.isascii() and amount_raw.isdigit()) or not digits:
                ok = False
                bad(line, "amount_minor", "must be a positive integer (minor units)")
            elif len(digits) > _AMOUNT_DIGITS:
                ok = False
                bad(line, "amount_minor", f"must be at most {MAX_AMOUNT}")
            else:
                amount = int(digits)
            if (problem := currency_problem(currency)) is not None:
                ok = False
                bad(line, "currency", problem)
            if (problem := auth_code_problem(auth_code)) is not None:
                ok = False
                bad(line, "auth_code", problem)
            if ok:
                self.row_count += 1
                totals[currency] = totals.get(currency, 0) + amount
                counts[currency] = counts.get(currency, 0) + 1
                rows_digest.update(reference, token, amount, currency, auth_code)
                yield line, reference, token, amount, currency, auth_code


# ---- pass 1 and pass 2 -----------------------------------------------------------------------


@dataclass
class CheckedBatch:
    """Pass 1's verdict on an input: problems, digest, totals and counts; not the rows."""

    problems: list[RowProblem]
    sha256: str
    row_count: int
    totals: dict[str, int] = field(default_factory=dict)  # currency -> sum of amount_minor
    counts: dict[str, int] = field(default_factory=dict)  # currency -> rows
    references: _References | None = field(default=None, repr=False)
    rows_sha256: str = ""  # `batches.RowsDigest` of the valid rows: what an approver names

    @property
    def ok(self) -> bool:
        return not self.problems and self.row_count > 0

    def currency_totals(self) -> dict[str, dict[str, int]]:
        """{currency: {"count": rows, "amount_minor": sum}}, as batches store and print them."""
        return {c: {"count": self.counts[c], "amount_minor": self.totals[c]} for c in self.totals}

    def reread(self, source: Source) -> RowStream:
        """Pass 2: the rows of the same input, read again; call `verify()` after the last."""
        if not self.ok or self.references is None:
            raise ValueError("only a valid checked batch can be read again")
        return RowStream(self, source)


def check_captures(source: Source, *, max_problems: int = 1000,
                   digest: Digest | None = None) -> CheckedBatch:
    """Pass 1: validate a capture file, header `reference,token,amount_minor,currency[,auth_code]`.

    All problems are collected (up to `max_problems`) so finance fixes the file once. Memory is
    bounded by the reference index, whatever the file's size. A file whose reference digests
    repeat (duplicates, or a collision) is read again, comparing those references exactly;
    raises InputChanged if that read differs from the first.
    """
    digest = digest or keyed_digest()
    exact: frozenset[int] = frozenset()
    sha = None
    while True:
        references = _References(digest, exact)
        scan = _Scan(references.first_line, max_problems)
        for _ in scan.rows(source()):
            pass
        if sha is not None and scan.sha256 != sha:
            raise InputChanged("changed while it was being read")
        sha = scan.sha256
        if not references.hits or scan.encoding_error:
            break
        exact = exact | references.hits  # undecided duplicates: compare those exactly
        del references, scan
    return CheckedBatch(scan.problems, scan.sha256, scan.row_count,
                        dict(sorted(scan.totals.items())), dict(sorted(scan.counts.items())),
                        references, scan.rows_digest.hexdigest())


class RowStream:
    """Pass 2: iterate once for the valid rows as records; then `verify()`.

    The same parser as pass 1, with pass 1's reference index for duplicates: a row whose
    reference pass 1 recorded on another line (or not at all) is a changed file, so a reference
    is never yielded twice. Stops at the first problem or beyond pass 1's row count. Read errors
    are kept for `verify()` rather than raised into the consumer (a database COPY)."""

    def __init__(self, checked: CheckedBatch, source: Source) -> None:
        assert checked.references is not None
        self._checked = checked
        self._source = source
        self._scan = _Scan(checked.references.recorded_line, max_problems=1)
        self._complete = False
        self.read_error: OSError | None = None
        self.rows = 0

    def _chunks(self) -> Iterator[bytes]:
        try:
            yield from self._source()
        except OSError as exc:
            self.read_error = exc

    def __iter__(self) -> Iterator[Record]:
        expected = self._checked.row_count
        for record in self._scan.rows(self._chunks()):
            if self._scan.problems or self.rows >= expected:
                return
            self.rows += 1
            yield record
        self._complete = True

    def verify(self) -> None:
        """Raise InputChanged unless this read gave exactly pass 1's bytes and rows."""
        if self.read_error is not None:
            raise InputChanged(f"could not be read again: {self.read_error.strerror}")
        if (not self._complete or self._scan.problems or self.rows != self._checked.row_count
                or self._scan.sha256 != self._checked.sha256):
            raise InputChanged("changed while it was being read (the second read differs from"
                               " the checked one)")


@dataclass
class ParsedBatch:
    rows: list[BatchRow]
    problems: list[RowProblem]
    sha256: str
    totals: dict[str, int] = field(default_factory=dict)  # currency -> sum of amount_minor
    counts: dict[str, int] = field(default_factory=dict)  # currency -> rows
    rows_sha256: str = ""

    @property
    def ok(self) -> bool:
        return not self.problems and bool(self.rows)


def parse_captures(raw: bytes, *, max_problems: int = 1000,
                   digest: Digest | None = None) -> ParsedBatch:
    """Both passes over bytes in memory: the rows when valid, else the problems (no rows)."""

    def source() -> Iterable[bytes]:
        return (raw,)

    checked = check_captures(source, max_problems=max_problems, digest=digest)
    rows: list[BatchRow] = []
    if checked.ok:
        stream = checked.reread(source)
        rows = [BatchRow(*record) for record in stream]
        stream.verify()
    return ParsedBatch(rows, checked.problems, checked.sha256, checked.totals, checked.counts,
                       checked.rows_sha256)
