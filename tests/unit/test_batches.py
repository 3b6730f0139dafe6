"""The settlement row checks and the rows digest (pure), shared by `settle` and the server."""

from __future__ import annotations

import hashlib

from vaultline.batches import (
    RowsDigest,
    amount_problem,
    approval_message,
    auth_code_problem,
    currency_problem,
    reference_problem,
    token_problem,
)
from vaultline.settlement.batch import parse_captures


def test_the_rows_digest_is_the_documented_encoding() -> None:
    digest = RowsDigest()
    digest.update("r1", "tok_abc", 100, "EUR", "")
    digest.update("r2", "tok_def", 5, "USD", "AC1")
    want = hashlib.sha256(b"r1\ttok_abc\t100\tEUR\t\nr2\ttok_def\t5\tUSD\tAC1\n").hexdigest()
    assert digest.hexdigest() == want


def test_the_file_parser_computes_the_same_digest_over_its_valid_rows() -> None:
    token = "tok_" + "A" * 22
    parsed = parse_captures(
        f"reference,token,amount_minor,currency\nr1,{token},0100,EUR\n\nr2,{token},5,USD\n"
        .encode())
    assert parsed.ok
    digest = RowsDigest()
    digest.update("r1", token, 100, "EUR", "")  # amounts as numbers: leading zeros go
    digest.update("r2", token, 5, "USD", "")
    assert parsed.rows_sha256 == digest.hexdigest()


def test_each_check_refuses_without_echoing_the_value() -> None:
    pan = "4111111111111111"
    for problem in (reference_problem(pan), reference_problem("4111 1111 1111 1111"),
                    token_problem(pan + "x")[1], amount_problem(0),
                    amount_problem(10**15), currency_problem("eur"),
                    auth_code_problem("ab-c")):
        assert problem and pan not in problem
    assert reference_problem("INV-2026/001") is None
    assert token_problem("tok_" + "A" * 22) == ("tok_" + "A" * 22, None)
    assert (amount_problem(1), currency_problem("EUR"), auth_code_problem("")) == (
        None, None, None)


def test_the_approval_message_binds_every_fact_of_the_approval() -> None:
    base = ("sb_0123456789", "default", "spiffe://vaultline/settlement/a",
            "spiffe://vaultline/settlement/b", "0" * 64, 3)
    message = approval_message(*base)
    for i in range(len(base)):
        changed = list(base)
        changed[i] = 4 if i == 5 else str(changed[i]) + "x"
        assert approval_message(*changed) != message  # type: ignore[arg-type]
