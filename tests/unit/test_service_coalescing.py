"""TokenService's coalescing and audit hand-off, on in-memory stand-ins for its narrow
protocols (TokenStore, DataKeyStore, DataKeySource, AuditSink): the chunking logic without
PostgreSQL or OpenBao. The real queries are tested against the real servers in
tests/integration; these stand-ins implement only the semantics the service relies on.
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import os
from collections.abc import Sequence
from typing import Any

from tests.helpers import synthetic_pans
from vaultline.keyring import Keyring
from vaultline.security.audit import AuditEvent, PendingAudit
from vaultline.service import CardInput, TokenService
from vaultline.store import AUDIT_TEXT_COLUMNS, AuditColumns, DataKeyRow, NewTokens

NOW = dt.datetime(2026, 12, 1, tzinfo=dt.UTC)
_TOKEN = AUDIT_TEXT_COLUMNS.index("token")


class FakeTransit:
    """DataKeySource: random data keys, 'wrapped' reversibly (a stand-in, not encryption)."""

    def generate_data_key(self) -> tuple[bytes, str]:
        key = os.urandom(32)
        return key, "vault:v1:" + base64.b64encode(key).decode()

    def decrypt_data_keys(self, wrapped: Sequence[str]) -> list[bytes]:
        return [base64.b64decode(w.split(":", 2)[2]) for w in wrapped]


class MemoryStore:
    """DataKeyStore and TokenStore over dicts, with the statement semantics the service uses:
    one insert of a chunk keeps the cards whose fingerprint and token are both free, reports
    the existing rows of the others, and appends the chunk's audit records only if every
    card went in."""

    def __init__(self) -> None:
        self.keys: dict[int, DataKeyRow] = {}
        self.tokens: dict[bytes, dict[str, Any]] = {}  # by fingerprint
        self.inserts: list[tuple[int, bool]] = []  # (cards in the statement, audited)
        self.audit_log: list[str] = []  # tokens named by records appended with their tokens

    # DataKeyStore
    async def find_active_data_key(self, tenant: str, purpose: str) -> DataKeyRow | None:
        return next((k for k in self.keys.values() if (k.tenant, k.purpose) == (tenant, purpose)
                     and k.retired_at is None), None)

    async def insert_data_key(self, tenant: str, purpose: str, wrapped_key: str,
                              kek_version: int, max_uses: int,
                              max_age: dt.timedelta) -> DataKeyRow | None:
        row = DataKeyRow(len(self.keys) + 1, tenant, purpose, wrapped_key, kek_version,
                         max_uses, 0, NOW, NOW + max_age, None)
        self.keys[row.id] = row
        return row

    async def reserve_data_key_uses(self, key_id: int, count: int) -> bool:
        return True

    async def retire_data_key(self, key_id: int) -> None:
        raise AssertionError("no key retires in these tests")

    async def find_data_keys(self, ids: Sequence[int]) -> list[DataKeyRow]:
        return [self.keys[i] for i in ids]

    # TokenStore
    async def insert_tokens(self, tenant: str, fmt: int, expires_at: dt.datetime | None,
                            rows: NewTokens, audit: AuditColumns | None = None,
                            ) -> tuple[list[Any], list[Any], bool]:
        await asyncio.sleep(0.005)  # a round trip: calls arriving meanwhile queue
        taken = {row["token"] for row in self.tokens.values()}
        inserted, existing = [], []
        for i, fingerprint in enumerate(rows.fingerprints):
            if fingerprint in self.tokens:
                existing.append({**self.tokens[fingerprint], "inserted": False})
            elif rows.tokens[i] not in taken:
                row = {"token": rows.tokens[i], "fingerprint": fingerprint,
                       "brand": rows.brands[i], "bin": rows.bins[i], "last4": rows.last4s[i],
                       "expiry_month": rows.expiry_months[i],
                       "expiry_year": rows.expiry_years[i], "format": fmt,
                       "created_at": NOW, "expires_at": expires_at}
                self.tokens[fingerprint] = row
                taken.add(row["token"])
                inserted.append({**row, "inserted": True})
        audited = audit is not None and len(inserted) == len(rows.fingerprints)
        if audited:
            assert audit is not None
            self.audit_log += audit.columns[_TOKEN]
        self.inserts.append((len(rows.fingerprints), audited))
        return inserted, existing, audited


class MemoryAuditSink:
    def __init__(self) -> None:
        self.records: list[AuditEvent] = []

    async def record(self, events: Sequence[AuditEvent]) -> None:
        self.records += events


def _service() -> tuple[TokenService, MemoryStore, MemoryAuditSink]:
    store, sink = MemoryStore(), MemoryAuditSink()
    service = TokenService(store, Keyring(store, FakeTransit()), audit=sink,  # type: ignore[arg-type]
                           clock=lambda: NOW)
    return service, store, sink


def _pending(n: int) -> PendingAudit:
    return PendingAudit(AuditEvent(identity="spiffe://vaultline/ivr/ivr-1", role="ivr",
                                   tenant="default", method="/Tokenize", outcome="OK",
                                   request_id=f"req-{n}", peer="test", at=NOW))


async def _tokenize_all(service: TokenService, pans: list[str]) -> list[str]:
    results = await asyncio.gather(*(
        service.tokenize("", CardInput(pan, 12, 2030), audit=_pending(n))
        for n, pan in enumerate(pans)))
    return [r.record.token for r in results]


async def test_concurrent_new_cards_are_one_statement_with_their_audit_records() -> None:
    service, store, sink = _service()
    pans = synthetic_pans(12)
    tokens = await _tokenize_all(service, pans)
    # One chunk, one statement: every card new, so the records went in with the tokens.
    assert store.inserts == [(12, True)]
    assert store.audit_log == tokens and sink.records == []
    assert len(set(tokens)) == 12
    assert [t[-4:] for t in tokens] == [p[-4:] for p in pans]


async def test_a_chunk_with_a_returning_card_appends_its_records_after_the_tokens() -> None:
    service, store, sink = _service()
    first = synthetic_pans(1)
    (known,) = await _tokenize_all(service, first)
    pans = synthetic_pans(4, start=1)
    tokens = await _tokenize_all(service, [*pans, first[0]])
    assert tokens[-1] == known  # the returning card keeps its token
    # The four new cards went in, but the statement could not carry the records (one card
    # had a token already, not the candidate): they come after, through the audit sink,
    # each naming the token its caller got, before anyone is answered.
    assert store.inserts[1:] == [(5, False)]
    assert [e.token for e in sink.records] == tokens
    assert [e.request_id for e in sink.records] == [f"req-{n}" for n in range(5)]


async def test_the_same_card_twice_in_one_chunk_gets_one_token_and_two_records() -> None:
    service, store, _ = _service()
    (pan,) = synthetic_pans(1)
    tokens = await _tokenize_all(service, [pan, pan])
    assert tokens[0] == tokens[1]
    assert store.inserts == [(1, True)]  # one row for the card
    assert store.audit_log == tokens  # each caller has its record
