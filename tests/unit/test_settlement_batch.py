"""Unit tests for vaultline.settlement.batch: validation of capture CSVs (pure), streamed."""

from __future__ import annotations

import hashlib
import tracemalloc
from collections.abc import Iterator

import pytest

from tests.testcards import TEST_CARDS
from vaultline.settlement.batch import (
    CheckedBatch,
    InputChanged,
    Record,
    Source,
    check_captures,
    parse_captures,
)

TOK_A = "tok_" + "A" * 22
TOK_B = "tok_" + "b_-" * 7 + "g"
HEADER = "reference,token,amount_minor,currency,auth_code\n"


def test_valid_file_gives_rows_totals_and_digest() -> None:
    raw = (HEADER + f"r1,{TOK_A},1250,EUR,A1B2C3\nr2,{TOK_B},50,USD,\n"
           f"r3,{TOK_A},10,EUR,\n").encode()
    parsed = parse_captures(raw)
    assert parsed.ok and not parsed.problems
    assert [r.line for r in parsed.rows] == [2, 3, 4]
    assert parsed.rows[0].auth_code == "A1B2C3"
    assert parsed.totals == {"EUR": 1260, "USD": 50}
    assert parsed.counts == {"EUR": 2, "USD": 1}
    assert parsed.sha256 == hashlib.sha256(raw).hexdigest()


def test_four_columns_and_a_bom_are_accepted() -> None:
    raw = f"\ufeffreference,token,amount_minor,currency\nr1,{TOK_A},1,JPY\n".encode()
    parsed = parse_captures(raw)
    assert parsed.ok and parsed.rows[0].auth_code == ""


def test_every_bad_row_is_reported_with_its_line_and_nothing_is_kept_silently() -> None:
    pan = TEST_CARDS["VISA"][0]
    raw = (HEADER
           + f"r1,{TOK_A},100,EUR,\n"            # 2 ok
           + f"r2,{pan},100,EUR,\n"              # 3 a PAN where the token goes
           + f"r3,{TOK_A},0,EUR,\n"              # 4 zero amount
           + f"r4,{TOK_A},12.50,EUR,\n"          # 5 decimal amount
           + f"r5,{TOK_A},100,XYZ,\n"            # 6 unknown currency
           + f"r5,{TOK_A},100,eur,\n"            # 7 duplicate reference + lower-case currency
           + f"r1,{TOK_A},100,EUR,\n"            # 8 duplicate of line 2
           + f"r8,{TOK_A},100\n"                 # 9 missing columns
           + f"{pan},{TOK_A},100,EUR,\n"         # 10 a PAN as reference
           + f"r9,{TOK_A},-5,EUR,bad code!\n"    # 11 negative amount, bad auth code
           ).encode()
    parsed = parse_captures(raw)
    assert not parsed.ok
    got = [(p.line, p.column) for p in parsed.problems]
    assert got == [
        (3, "token"), (4, "amount_minor"), (5, "amount_minor"), (6, "currency"),
        (7, "reference"), (7, "currency"), (8, "reference"), (9, "row"), (10, "reference"),
        (11, "amount_minor"), (11, "auth_code"),
    ]
    assert "duplicate of line 2" in str(parsed.problems[6])
    # Problems never echo values: no PAN, no token.
    text = "\n".join(str(p) for p in parsed.problems)
    assert pan not in text and TOK_A not in text


def test_header_is_required() -> None:
    parsed = parse_captures(f"r1,{TOK_A},100,EUR\n".encode())
    assert [(p.line, p.column) for p in parsed.problems] == [(1, "header")]


def test_not_utf8_and_empty_files() -> None:
    assert parse_captures(HEADER.encode() + b"r1,\xff\xfe,1,EUR,\n").problems[0].line == 2
    assert parse_captures(b"").problems[0].column == "header"
    assert parse_captures(HEADER.encode()).problems[0].problem == "the file has no rows"


def test_problem_list_is_bounded() -> None:
    raw = HEADER + "".join(f"r{i},x,1,EUR,\n" for i in range(50))
    assert len(parse_captures(raw.encode(), max_problems=10).problems) == 10


# ---- streaming: pass 1 (check_captures) and pass 2 (reread) -------------------------------------


def chunked(raw: bytes, *cuts: int) -> Source:
    """A source giving `raw` split at the given offsets, the same chunks at every read."""
    bounds = [0, *cuts, len(raw)]
    return lambda: (raw[a:b] for a, b in zip(bounds, bounds[1:], strict=False))


def every_byte(raw: bytes) -> Source:
    return lambda: (raw[i:i + 1] for i in range(len(raw)))


def outcome(checked: CheckedBatch) -> tuple[object, ...]:
    return ([str(p) for p in checked.problems], checked.sha256, checked.row_count,
            checked.totals, checked.counts)


def records(checked: CheckedBatch, source: Source) -> list[Record]:
    stream = checked.reread(source)
    rows = list(stream)
    stream.verify()
    return rows


# U+3000 (3 bytes in UTF-8) and U+00A0 (2 bytes) are whitespace: stripped around a valid value,
# so a valid file can hold multi-byte characters; "é" in a reference is a problem on its line.
MULTIBYTE = ("\ufeff" + HEADER.replace("\n", "\r\n")
             + f"r1,\u3000{TOK_A}\u3000,1250,EUR,A1\r\n"
             + f"r2,\u00a0{TOK_B},50,\u3000USD,\r\n"
             + f"r3,{TOK_A},10,EUR,\r\n").encode()
BAD_MULTIBYTE = MULTIBYTE + f"ré,{TOK_A},1,EUR,\r\n".encode()


def test_every_chunk_boundary_gives_the_same_result() -> None:
    """Splits inside a multi-byte character, the BOM, a \\r\\n and a line: all the same."""
    for raw in (MULTIBYTE, BAD_MULTIBYTE):
        whole = check_captures(chunked(raw))
        for cut in range(1, len(raw)):
            assert outcome(check_captures(chunked(raw, cut))) == outcome(whole), cut
        assert outcome(check_captures(every_byte(raw))) == outcome(whole)
    assert [str(p) for p in check_captures(chunked(BAD_MULTIBYTE)).problems] == [
        "line 5: reference: must be 1-64 of A-Z a-z 0-9 . _ : / - and not a card number"]
    good = check_captures(every_byte(MULTIBYTE))
    assert good.ok and good.sha256 == hashlib.sha256(MULTIBYTE).hexdigest()
    assert good.totals == {"EUR": 1260, "USD": 50} and good.counts == {"EUR": 2, "USD": 1}
    rows = records(good, every_byte(MULTIBYTE))
    assert rows == [(2, "r1", TOK_A, 1250, "EUR", "A1"), (3, "r2", TOK_B, 50, "USD", ""),
                    (4, "r3", TOK_A, 10, "EUR", "")]
    for cut in range(1, len(MULTIBYTE)):  # pass 2 reads in other chunks than pass 1
        assert records(good, chunked(MULTIBYTE, cut)) == rows


def test_a_bom_only_at_the_start_and_lone_cr_line_ends() -> None:
    raw = ("\ufeff" + HEADER + f"r1,{TOK_A},1,EUR,\n").encode()
    assert check_captures(every_byte(raw)).ok
    inner = (HEADER + f"\ufeffr1,{TOK_A},1,EUR,\n").encode()  # a BOM inside is not skipped
    assert [(p.line, p.column) for p in check_captures(chunked(inner, 50)).problems] == [
        (2, "reference")]
    mac = (HEADER + f"r1,{TOK_A},1,EUR,\nr2,{TOK_A},x,EUR,\n").replace("\n", "\r").encode()
    for cut in range(1, len(mac)):
        assert [(p.line, p.column) for p in check_captures(chunked(mac, cut)).problems] == [
            (3, "amount_minor")]


def test_bad_utf8_is_reported_on_its_line_whatever_the_chunks() -> None:
    raw = HEADER.encode() + f"r1,{TOK_A},100,EUR,\n".encode() * 3 + b"r9,\xe2\x82,1,EUR,\n"
    for source in (chunked(raw), every_byte(raw), *(chunked(raw, c) for c in range(1, len(raw)))):
        checked = check_captures(source)
        assert [str(p) for p in checked.problems] == ["line 5: file: not valid UTF-8"]
        assert checked.sha256 == hashlib.sha256(raw).hexdigest()  # the whole file was hashed
    # Other problems before it are replaced: the file is fixed as a whole first.
    bad_amount = HEADER.encode() + f"r1,{TOK_A},0,EUR,\n".encode() + b"r2,\xff,1,EUR,\n"
    assert [str(p) for p in check_captures(chunked(bad_amount, 60)).problems] == [
        "line 3: file: not valid UTF-8"]
    # A character cut short by the end of the file; and a bad byte after a BOM.
    truncated = HEADER.encode() + f"r1,{TOK_A},1,EUR,\nr2,{TOK_A},1,EUR,".encode() + b"\xc3"
    assert check_captures(every_byte(truncated)).problems[0].line == 3
    after_bom = b"\xef\xbb\xbf" + b"x\n\xff\n"
    assert check_captures(every_byte(after_bom)).problems[0].line == 2
    # A bad header does not hide a bad byte further down.
    assert check_captures(chunked(b"bad\nheader\n\xff")).problems[0].problem == "not valid UTF-8"


def test_duplicates_across_the_file_name_the_first_line() -> None:
    n = 40_000  # enough references to make the index grow
    lines = [HEADER] + [f"ref-{i},{TOK_A},1,EUR,\n" for i in range(n)]
    lines += [f"ref-0,{TOK_A},1,EUR,\n", f"ref-{n - 1},{TOK_A},1,EUR,\n",
              f"ref-0,{TOK_A},1,EUR,\n"]
    raw = "".join(lines).encode()
    checked = check_captures(chunked(raw, *range(4096, len(raw), 4096)))
    assert [str(p) for p in checked.problems] == [
        f"line {n + 2}: reference: duplicate of line 2",
        f"line {n + 3}: reference: duplicate of line {n + 1}",
        f"line {n + 4}: reference: duplicate of line 2",
    ]
    assert check_captures(chunked("".join(lines[:-3]).encode())).row_count == n


def test_digest_collisions_never_give_a_false_duplicate() -> None:
    """The index compares 64-bit digests; equal digests are re-checked on the references."""
    raw = (HEADER + "".join(f"r{i},{TOK_A},{i + 1},EUR,\n" for i in range(50))).encode()
    reads = 0

    def source() -> list[bytes]:
        nonlocal reads
        reads += 1
        return [raw[:100], raw[100:]]

    for digest in (lambda ref: 7, len, lambda ref: 0):  # all collide / same length collide
        reads = 0
        checked = check_captures(source, digest=digest)
        assert checked.ok and checked.row_count == 50 and reads == 2  # re-read once, exactly
        assert [r[1] for r in records(checked, source)] == [f"r{i}" for i in range(50)]
    reads = 0
    assert check_captures(source).ok and reads == 1  # no repeated digest: one read
    dup = raw + f"r17,{TOK_A},1,EUR,\nr3,{TOK_B},1,EUR,\n".encode()
    for digest in (lambda ref: 7, len, None):
        checked = check_captures(chunked(dup, 33), digest=digest)
        assert [str(p) for p in checked.problems] == [
            "line 52: reference: duplicate of line 19", "line 53: reference: duplicate of line 5"]
    assert parse_captures(raw, digest=lambda ref: 7).rows[49].reference == "r49"


def test_a_file_that_changes_between_reads_is_refused() -> None:
    raw = (HEADER + "".join(f"r{i},{TOK_A},{i + 1},EUR,\n" for i in range(20))).encode()
    checked = check_captures(chunked(raw))
    assert checked.ok

    def second(other: bytes) -> list[Record]:
        stream = checked.reread(chunked(other, 40))
        rows = list(stream)
        with pytest.raises(InputChanged):
            stream.verify()
        return rows

    second(raw.replace(b"r5,", b"r5x,"))  # same rows, other bytes
    second(raw[:-20])  # truncated
    assert len(second(raw + f"r99,{TOK_A},1,EUR,\n".encode() * 5)) <= 20  # longer: stops
    # A reference repeated in the new content is never yielded twice (COPY would fail on it).
    dup = second(raw.replace(b"r7,", b"r3,"))
    assert len({r[1] for r in dup}) == len(dup)
    second(raw.replace(b",3,EUR", b",0,EUR"))  # a row now invalid

    def unreadable() -> Iterator[bytes]:
        yield raw[:50]
        raise OSError(5, "Input/output error")

    stream = checked.reread(unreadable)
    list(stream)
    with pytest.raises(InputChanged, match="could not be read again: Input/output error"):
        stream.verify()
    # Pass 1 re-reads on a repeated digest: a change then is caught too.
    contents = iter([raw, raw.replace(b"r5,", b"r6,")])
    with pytest.raises(InputChanged):
        check_captures(lambda: [next(contents)], digest=lambda ref: 1)


def test_rows_are_not_kept_in_memory() -> None:
    raw = (HEADER + "".join(f"ref-{i:06d},{TOK_A},{i + 1},EUR,A{i}\n"
                            for i in range(30_000))).encode()
    source = chunked(raw, *range(65536, len(raw), 65536))
    tracemalloc.start()
    try:
        checked = check_captures(source)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert checked.ok and checked.row_count == 30_000
    # The reference index (12 bytes a slot) and one chunk in flight; keeping the rows as
    # objects would take well over 10 MB.
    assert peak < 4 << 20, peak


@pytest.mark.parametrize("reference", [
    "4111.1111.1111.1111", "4111/1111/1111/1111", "ref:4111-1111-1111-1112", "000000000000"])
def test_a_reference_with_a_card_number_in_any_spelling_is_refused(reference: str) -> None:
    # Issue 14, finding 4: only single spaces or dashes were recognised, and only Luhn-valid
    # numbers; the reference would have been stored in clear.
    parsed = parse_captures((HEADER + f"{reference},{TOK_A},100,EUR,\n").encode())
    assert [(p.line, p.column) for p in parsed.problems] == [(2, "reference")]
