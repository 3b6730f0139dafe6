"""Unit tests for vaultline.settlement.fileformat: the VLSF v1 processor file (pure)."""

from __future__ import annotations

import datetime as dt
import zlib

import pytest

from tests.testcards import TEST_CARDS
from vaultline.settlement.fileformat import DetailRecord, FileBuilder, FormatError, parse_file

CREATED = dt.datetime(2026, 11, 25, 19, 0, 0, tzinfo=dt.UTC)
VISA, MC, AMEX = TEST_CARDS["VISA"][0], TEST_CARDS["MASTERCARD"][0], TEST_CARDS["AMEX"][0]


def build() -> bytes:
    b = FileBuilder("sb_0123456789", CREATED, input_rows=4)
    parts = [b.header(),
             b.detail("r1", VISA, 12, 2031, 1250, "EUR", "A1"),
             b.detail("r2", MC, 1, 2030, 50, "USD"),
             b.detail("r4", AMEX, 6, 2029, 10, "EUR", "Z9")]
    parts.append(b.trailer())
    return b"".join(parts)


def test_layout_is_as_documented() -> None:
    lines = build().decode().splitlines()
    assert lines[0].startswith("H|VLSF|1|sb_0123456789|2026-11-25T19:00:00Z|4|")
    assert lines[1].startswith(f"D|1|r1|{VISA}|1231|1250|EUR|A1|")
    assert lines[2].startswith(f"D|2|r2|{MC}|0130|50|USD||")
    hash_total = (int(VISA[-10:]) + int(MC[-10:]) + int(AMEX[-10:])) % 10**10
    assert lines[3].startswith(f"D|3|r4|{AMEX}|0629|10|EUR|Z9|")
    assert lines[4].startswith(f"T|3|EUR:2:1260;USD:1:50|{hash_total:010d}|")
    for line in lines:  # each check is CRC-32 of everything before it
        body, check = line.rsplit("|", 1)
        assert check == f"{zlib.crc32((body + '|').encode()):08X}"


def test_round_trip_verifies() -> None:
    parsed = parse_file(build())
    assert parsed.batch_id == "sb_0123456789" and parsed.input_rows == 4
    assert [d.reference for d in parsed.details] == ["r1", "r2", "r4"]
    assert parsed.details[0].pan == VISA and parsed.details[0].expiry == "1231"
    assert parsed.totals == {"EUR": 1260, "USD": 50}
    assert parsed.counts == {"EUR": 2, "USD": 1}


@pytest.mark.parametrize("damage", ["flip", "drop", "swap", "truncate"])
def test_damage_is_detected(damage: str) -> None:
    lines = build().split(b"\n")[:-1]
    if damage == "flip":
        lines[2] = lines[2].replace(b"|50|", b"|60|")
    elif damage == "drop":
        del lines[2]
    elif damage == "swap":
        lines[1], lines[2] = lines[2], lines[1]
    else:
        lines = lines[:-1]
    with pytest.raises(FormatError) as err:
        parse_file(b"\n".join(lines) + b"\n")
    assert VISA not in str(err.value) and MC not in str(err.value)


def test_empty_file_has_header_and_zero_trailer() -> None:
    b = FileBuilder("sb_x", CREATED, input_rows=2)
    parsed = parse_file(b.header() + b.trailer())
    assert parsed.details == [] and parsed.totals == {}


def test_detail_record_repr_hides_the_pan() -> None:
    assert VISA not in repr(DetailRecord(1, "r", VISA, "1231", 1, "EUR", ""))


def test_a_card_without_expiry_is_rejected_not_settled() -> None:
    """De-scoping tokenizes cards found in stored data without their expiry (issue 18): the
    processor needs one, so the row is rejected (EXPIRY_UNKNOWN) rather than sent as 0000."""
    import io

    from vaultline.gen.settlement.v1 import settlement_pb2 as spb
    from vaultline.gen.tokenization.v1 import tokenization_pb2 as pb
    from vaultline.settlement.fileformat import FileBuilder
    from vaultline.settlement.job import _records, _Rejects

    rows = [spb.BatchRow(reference=f"r{i}", token=f"tok_{i}", amount_minor=100, currency="EUR")
            for i in range(2)]
    response = pb.BatchDetokenizeResponse()
    known = response.results.add(reference="r0")
    known.card.card.pan, known.card.card.expiry_month = "4111111111111111", 12
    known.card.card.expiry_year = 2031
    unknown = response.results.add(reference="r1")
    unknown.card.card.pan = "5555555555554444"  # expiry 0/0: unknown
    out = io.StringIO()
    rejects = _Rejects(out)
    builder = FileBuilder("b-1", dt.datetime.now(dt.UTC), 2)
    records = _records(builder, rejects, rows, response)
    assert b"|r0|4111111111111111|1231|" in records
    assert b"5555555555554444" not in records and builder.records == 1
    assert out.getvalue().splitlines()[1:] == ["r1,tok_1,EXPIRY_UNKNOWN"]
