"""Audit chain core: canonical encoding, hashes, and verification of tampered chains."""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
from typing import Any

import pytest

from vaultline.security.audit import (
    FIELDS,
    GENESIS_HASH,
    AuditEvent,
    ChainVerifier,
    VerifyReport,
    canonical,
    chain_hash,
    content_hash,
    verify_chain,
)

AT = dt.datetime(2025, 3, 4, 5, 6, 7, 123456, tzinfo=dt.UTC)


def event(i: int = 0, **changes: Any) -> AuditEvent:
    base = AuditEvent(
        identity="spiffe://vaultline/settlement/settlement-1",
        role="settlement",
        tenant="acme",
        method="/vaultline.tokenization.v1.TokenizationService/Detokenize",
        outcome="OK",
        request_id=f"req-{i}",
        peer="ipv4:10.0.0.7:51000",
        token=f"411111000000{i:04d}",
        purpose="settlement batch 42",
        at=AT + dt.timedelta(microseconds=i),
    )
    return dataclasses.replace(base, **changes)


def chain(n: int) -> list[dict[str, Any]]:
    """Rows as audit_append would store them."""
    return build_rows([event(i) for i in range(n)])


def build_rows(events: list[AuditEvent]) -> list[dict[str, Any]]:
    rows, prev = [], GENESIS_HASH
    for i, ev in enumerate(events):
        content = content_hash(ev)
        digest = chain_hash(prev, content)
        row = {name: getattr(ev, name) for name in FIELDS}
        row.update(seq=i + 1, at=ev.at, content_hash=content, prev_hash=prev, hash=digest,
                   tokens=list(ev.tokens))
        rows.append(row)
        prev = digest
    return rows


def head_of(rows: list[dict[str, Any]]) -> tuple[int, bytes]:
    return (rows[-1]["seq"], rows[-1]["hash"]) if rows else (0, GENESIS_HASH)


# ---- encoding ----------------------------------------------------------------------------


def test_canonical_encoding_is_pinned() -> None:
    # A change here breaks verification of every stored record: bump FORMAT_VERSION instead.
    ev = AuditEvent(
        identity="spiffe://vaultline/crm/crm-1", role="crm", tenant="t", method="/m",
        outcome="OK", request_id="r", peer="p", token="", purpose="é",
        at=dt.datetime(1970, 1, 1, 0, 0, 1, 5, tzinfo=dt.UTC),
    )
    expected = (
        b"vaultline-audit\x00" b"\x00\x01"
        b"\x00\x00\x00\x00\x00\x0f\x42\x45"  # 1_000_005 microseconds
        b"\x00\x00\x00\x1cspiffe://vaultline/crm/crm-1"
        b"\x00\x00\x00\x03crm"
        b"\x00\x00\x00\x01t"
        b"\x00\x00\x00\x02/m"
        b"\x00\x00\x00\x00"  # token
        b"\x00\x00\x00\x02\xc3\xa9"  # purpose, UTF-8
        b"\x00\x00\x00\x02OK"
        b"\x00\x00\x00\x01r"
        b"\x00\x00\x00\x01p"
    )
    assert canonical(ev) == expected
    assert content_hash(ev) == hashlib.sha256(expected).digest()


def test_canonical_is_unambiguous_across_field_boundaries() -> None:
    a = event(purpose="ab", request_id="c")
    b = event(purpose="a", request_id="bc")
    assert canonical(a) != canonical(b)
    assert canonical(event(token="")) != canonical(event(purpose="", token="settlement batch 42"))


def test_every_field_and_the_time_are_covered() -> None:
    base = content_hash(event())
    for name in FIELDS:
        assert content_hash(event(**{name: getattr(event(), name) + "x"})) != base, name
    assert content_hash(event(at=AT + dt.timedelta(microseconds=1))) != base


def test_time_zone_does_not_change_the_hash() -> None:
    # PostgreSQL returns timestamptz in UTC: the same instant must hash the same.
    paris = dt.timezone(dt.timedelta(hours=1))
    local = event(at=AT.astimezone(paris))
    assert local.at.tzinfo is dt.UTC
    assert content_hash(local) == content_hash(event())


def test_naive_time_is_refused() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        event(at=dt.datetime(2025, 1, 1))


def test_text_postgresql_cannot_store_is_replaced_not_refused() -> None:
    hostile = event(request_id="a\x00b", purpose="x\ud800y")
    assert hostile.request_id == "a\ufffdb"
    assert "\ud800" not in hostile.purpose
    canonical(hostile)  # encodes


def test_chain_hash_matches_postgresql_definition() -> None:
    content = b"\x01" * 32
    assert chain_hash(GENESIS_HASH, content) == hashlib.sha256(bytes(32) + content).digest()


# ---- verification --------------------------------------------------------------------------


def test_intact_chain_passes() -> None:
    rows = chain(10)
    report = verify_chain(rows, head_of(rows))
    assert report == VerifyReport(ok=True, checked=10, first_broken_seq=None, problem="")


def test_empty_chain_passes_against_genesis_head() -> None:
    assert verify_chain([], (0, GENESIS_HASH)).ok


def test_edited_record_is_named() -> None:
    rows = chain(10)
    rows[4]["purpose"] = "something else"
    report = verify_chain(rows, head_of(rows))
    assert not report.ok
    assert report.first_broken_seq == 5
    assert "edited" in report.problem
    assert report.checked == 4


def test_edit_with_recomputed_content_hash_breaks_the_hash() -> None:
    rows = chain(10)
    rows[4]["outcome"] = "PERMISSION_DENIED"
    rows[4]["content_hash"] = content_hash(event(4, outcome="PERMISSION_DENIED"))
    report = verify_chain(rows, head_of(rows))
    assert report.first_broken_seq == 5
    assert "wrong hash" in report.problem


def test_edit_with_all_hashes_recomputed_breaks_the_next_link() -> None:
    rows = chain(10)
    edited = event(4, token="")
    rows[4]["token"] = ""
    rows[4]["content_hash"] = content_hash(edited)
    rows[4]["hash"] = chain_hash(rows[4]["prev_hash"], rows[4]["content_hash"])
    report = verify_chain(rows, head_of(rows))
    assert report.first_broken_seq == 6
    assert "does not link to record 5" in report.problem


def test_deleted_record_is_named() -> None:
    rows = chain(10)
    del rows[3]
    report = verify_chain(rows, head_of(rows))
    assert report.first_broken_seq == 4
    assert "missing" in report.problem


def test_deleted_record_with_renumbered_seqs_breaks_the_link() -> None:
    rows = chain(10)
    del rows[3]
    for row in rows[3:]:
        row["seq"] -= 1
    report = verify_chain(rows, (9, rows[-1]["hash"]))
    assert report.first_broken_seq == 4
    assert "does not link" in report.problem


def test_reordered_pair_is_named() -> None:
    rows = chain(10)
    # Swap the contents of records 6 and 7, keeping their seqs.
    a, b = rows[5], rows[6]
    rows[5] = {**b, "seq": 6}
    rows[6] = {**a, "seq": 7}
    report = verify_chain(rows, head_of(rows))
    assert report.first_broken_seq == 6
    assert "does not link" in report.problem


def test_rows_out_of_seq_order_are_named() -> None:
    rows = chain(5)
    rows[2], rows[3] = rows[3], rows[2]
    report = verify_chain(rows, head_of(chain(5)))
    # seq 3 expected, seq 4 found: 3 looks missing. (The store always reads in seq order.)
    assert report.first_broken_seq == 3
    assert "missing" in report.problem


def test_truncated_tail_is_named() -> None:
    rows = chain(10)
    head = head_of(rows)
    report = verify_chain(rows[:7], head)
    assert report.first_broken_seq == 8
    assert "records 8-10 missing at the end" in report.problem
    assert report.checked == 7


def test_truncated_to_nothing_is_named() -> None:
    rows = chain(3)
    report = verify_chain([], head_of(rows))
    assert report.first_broken_seq == 1
    assert "missing at the end" in report.problem


def test_rewritten_head_is_named() -> None:
    rows = chain(5)
    report = verify_chain(rows, (5, b"\x07" * 32))
    assert report.first_broken_seq == 5
    assert "head" in report.problem


def test_record_beyond_the_head_is_named() -> None:
    rows = chain(5)
    report = verify_chain(rows, head_of(rows[:4]))
    assert report.first_broken_seq == 5
    assert "beyond the head" in report.problem


def test_range_verification_from_a_known_record() -> None:
    rows = chain(10)
    start = (rows[3]["seq"], rows[3]["hash"])
    assert verify_chain(rows[4:8], None, start=start).ok
    rows[5]["peer"] = "ipv4:6.6.6.6:1"
    report = verify_chain(rows[4:8], None, start=start)
    assert report.first_broken_seq == 6


def test_problems_never_quote_field_values() -> None:
    rows = chain(4)
    rows[1]["purpose"] = "SECRET-PURPOSE"
    rows[2]["request_id"] = "SECRET-REQUEST"
    for broken in (rows, rows[:1] + rows[2:], rows[:2]):
        report = verify_chain(broken, head_of(chain(4)))
        assert "SECRET" not in report.problem
        for name in FIELDS:
            for row in chain(4):
                if len(str(row[name])) > 3:
                    assert str(row[name]) not in report.problem


def test_verifier_stops_at_the_first_break() -> None:
    rows = chain(6)
    rows[1]["purpose"] = "x"
    rows[3]["purpose"] = "y"
    verifier = ChainVerifier()
    results = [verifier.feed(r) for r in rows]
    assert results == [True, False, False, False, False, False]
    assert verifier.finish(head_of(rows)).first_broken_seq == 2


def _reveal(**changes: Any) -> AuditEvent:
    base = AuditEvent(
        identity="spiffe://vaultline/crm/crm-1", role="crm", tenant="default",
        method="/vaultline.tokenization.v1.TokenizationService/Detokenize", outcome="OK",
        request_id="reqabc", peer="ipv4:127.0.0.1:5000", token="4000123412341111",
        purpose="refund \u2014 \u00e9",
        at=dt.datetime(2026, 11, 25, 12, 0, 0, 123456, tzinfo=dt.UTC))
    return dataclasses.replace(base, **changes)


def test_format_1_records_hash_exactly_as_before_reveal_lists_existed() -> None:
    # Computed by the release before format 2: every record stored then must still verify.
    assert content_hash(_reveal()).hex() == (
        "ee2679db0baf2c5d74161471de4c5ae28fb7ad7978e45c1edbe0d9e0d3f4685c")
    assert canonical(_reveal())[16:18] == b"\x00\x01"


def test_a_reveal_list_is_format_2_and_every_token_and_its_order_count() -> None:
    listed = _reveal(token="", tokens=("4000123412341111", "tok_AAAAAAAAAAAAAAAAAAAAAA"))
    assert canonical(listed)[16:18] == b"\x00\x02"
    hashes = {
        content_hash(listed),
        content_hash(_reveal(token="")),
        content_hash(_reveal(token="", tokens=("4000123412341111",))),
        content_hash(_reveal(token="", tokens=("tok_AAAAAAAAAAAAAAAAAAAAAA", "4000123412341111"))),
        # the boundary between the last field and the list cannot be moved
        content_hash(_reveal(token="", peer="ipv4:127.0.0.1:500",
                             tokens=("04000123412341111", "tok_AAAAAAAAAAAAAAAAAAAAAA"))),
    }
    assert len(hashes) == 5


@pytest.mark.parametrize("bad", ["", "tok_A B", "40001234\x001111", "t\u00f6k"])
def test_a_reveal_list_refuses_what_is_not_a_token(bad: str) -> None:
    with pytest.raises(ValueError, match="well-formed tokens"):
        _reveal(token="", tokens=("4000123412341111", bad))


def test_editing_a_stored_reveal_list_breaks_the_chain() -> None:
    events = [_reveal(token="", tokens=(f"tok_{i}A", f"tok_{i}B"), request_id=f"r{i}")
              for i in range(4)]
    rows = build_rows(events)
    assert all(row["tokens"] for row in rows)
    assert verify_chain(rows, head_of(rows)).ok
    for edit in (lambda t: t[1:], lambda t: t[::-1], lambda t: (), lambda t: (*t, "tok_9Z")):
        forged = [dict(row) for row in rows]
        forged[2]["tokens"] = list(edit(tuple(forged[2]["tokens"])))
        report = verify_chain(forged, head_of(rows))
        assert (report.ok, report.first_broken_seq) == (False, 3)
        assert "was edited" in report.problem
