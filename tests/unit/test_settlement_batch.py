"""Unit tests for vaultline.settlement.batch: validation of capture CSVs (pure)."""

from __future__ import annotations

import hashlib

from tests.testcards import TEST_CARDS
from vaultline.settlement.batch import parse_captures

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
