"""Data keys: created and unwrapped through OpenBao transit, stored wrapped, cached in memory.

Per tenant there is one active key per purpose: `pan` (AES-256-GCM for card data),
`fingerprint` (HMAC-SHA-256 for the one-token-per-card lookup) and `security_code`
(AES-256-GCM for security codes held until authorisation, retired after `max_age` like a
`pan` key). OpenBao is called only to make
or unwrap a key — never once per card. A `pan` key retires after `max_uses` encryptions or
`max_age`, whichever comes first; retired keys still decrypt. Uses are reserved from the
database in blocks, so the limit holds across every tokenizer replica. The fingerprint key
never retires: fingerprints must stay stable for the life of the tenant.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

from .crypto import FingerprintKey, SealingKey
from .errors import KeyServiceUnavailable
from .store import DataKeyRow
from .vault import run_transit, wrapped_version

log = logging.getLogger(__name__)

PAN = "pan"
FINGERPRINT = "fingerprint"
SECURITY_CODE = "security_code"


class DataKeySource(Protocol):
    """What the keyring needs from OpenBao (implemented by `vault.TransitClient`)."""

    def generate_data_key(self) -> tuple[bytes, str]: ...
    def decrypt_data_keys(self, wrapped: Sequence[str]) -> list[bytes]: ...


class DataKeyStore(Protocol):
    """What the keyring needs from PostgreSQL (implemented by `store.Store`)."""

    async def find_active_data_key(self, tenant: str, purpose: str) -> DataKeyRow | None: ...
    async def insert_data_key(
        self, tenant: str, purpose: str, wrapped_key: str, kek_version: int, max_uses: int,
        max_age: dt.timedelta,
    ) -> DataKeyRow | None: ...
    async def reserve_data_key_uses(self, key_id: int, count: int) -> bool: ...
    async def retire_data_key(self, key_id: int) -> None: ...
    async def find_data_keys(self, ids: Sequence[int]) -> list[DataKeyRow]: ...


class WrappedKeyStore(Protocol):
    """What a rewrap needs from PostgreSQL (implemented by `store.Store`)."""

    async def list_data_keys(self, after_id: int, limit: int) -> list[DataKeyRow]: ...
    async def update_wrapped_key(
        self, key_id: int, old_wrapped: str, new_wrapped: str, kek_version: int
    ) -> bool: ...


@dataclass(frozen=True, slots=True)
class KeyPolicy:
    """When a card-data key stops encrypting (PCI DSS 3.7.4 cryptoperiod)."""

    max_uses: int = 10_000_000
    max_age: dt.timedelta = dt.timedelta(days=90)
    # Encryptions reserved per database round trip; bounds how far replicas overshoot.
    reserve_block: int = 4096


class _Lease:
    """The active sealing key of a tenant and how many encryptions this process may still do."""

    __slots__ = ("key", "remaining", "retire_at")

    def __init__(self, key: SealingKey, remaining: int, retire_at: dt.datetime) -> None:
        self.key = key
        self.remaining = remaining
        self.retire_at = retire_at

    def take(self, count: int) -> SealingKey | None:
        if self.remaining < count or dt.datetime.now(dt.UTC) >= self.retire_at:
            return None
        self.remaining -= count
        return self.key


class Keyring:
    def __init__(
        self, store: DataKeyStore, vault: DataKeySource, policy: KeyPolicy = KeyPolicy()
    ) -> None:
        self._store = store
        self._vault = vault
        self._policy = policy
        self._sealing: dict[int, SealingKey] = {}  # every unwrapped pan key, by id
        self._fingerprint: dict[str, FingerprintKey] = {}  # by tenant
        self._leases: dict[str, _Lease] = {}  # active pan key per tenant
        self._codes: dict[str, tuple[SealingKey, dt.datetime]] = {}  # security_code, retire_at
        self._locks: dict[tuple[str, str], asyncio.Lock] = {}
        self.cache_hits = 0
        self.cache_misses = 0

    @property
    def max_seal_count(self) -> int:
        """The most cards one `sealing_key_for` call may ask for."""
        return min(self._policy.max_uses, 8192)

    def forget_tenant(self, tenant: str, key_ids: Iterable[int] = ()) -> None:
        """Drop a shredded tenant's keys from this process's cache."""
        self._fingerprint.pop(tenant, None)
        self._leases.pop(tenant, None)
        self._codes.pop(tenant, None)
        for key_id in key_ids:
            self._sealing.pop(key_id, None)

    def clear(self) -> None:
        """Forget every plaintext key (tests; operators after a KEK compromise)."""
        self._sealing.clear()
        self._fingerprint.clear()
        self._leases.clear()
        self._codes.clear()

    def _lock(self, tenant: str, purpose: str) -> asyncio.Lock:
        return self._locks.setdefault((tenant, purpose), asyncio.Lock())

    async def _create_or_find(self, tenant: str, purpose: str) -> tuple[DataKeyRow, bytes]:
        plaintext, wrapped = await run_transit(self._vault.generate_data_key)
        row = await self._store.insert_data_key(
            tenant,
            purpose,
            wrapped,
            wrapped_version(wrapped),
            self._policy.max_uses if purpose == PAN else 2**62,
            dt.timedelta(days=365_000) if purpose == FINGERPRINT else self._policy.max_age,
        )
        if row is not None:
            log.info("created %s data key %d for tenant %s", purpose, row.id, tenant)
            return row, plaintext
        # Another replica created it first: use theirs.
        found = await self._store.find_active_data_key(tenant, purpose)
        if found is None:  # retired between the two statements; try once more
            return await self._create_or_find(tenant, purpose)
        return found, (await self._unwrap([found]))[0]

    async def _unwrap(self, rows: Sequence[DataKeyRow]) -> list[bytes]:
        self.cache_misses += len(rows)
        return await run_transit(self._vault.decrypt_data_keys, [r.wrapped_key for r in rows])

    async def fingerprint_key(self, tenant: str) -> FingerprintKey:
        key = self._fingerprint.get(tenant)
        if key is not None:
            self.cache_hits += 1
            return key
        async with self._lock(tenant, FINGERPRINT):
            key = self._fingerprint.get(tenant)
            if key is None:
                row = await self._store.find_active_data_key(tenant, FINGERPRINT)
                if row is not None:
                    plaintext = (await self._unwrap([row]))[0]
                else:
                    row, plaintext = await self._create_or_find(tenant, FINGERPRINT)
                key = FingerprintKey(plaintext)
                self._fingerprint[tenant] = key
            return key

    async def security_code_key(self, tenant: str) -> SealingKey:
        """The tenant's key for sealing security codes (never its card-data key)."""
        cached = self._codes.get(tenant)
        if cached is not None and dt.datetime.now(dt.UTC) < cached[1]:
            self.cache_hits += 1
            return cached[0]
        async with self._lock(tenant, SECURITY_CODE):
            cached = self._codes.get(tenant)
            if cached is not None and dt.datetime.now(dt.UTC) < cached[1]:
                return cached[0]
            row = await self._store.find_active_data_key(tenant, SECURITY_CODE)
            if row is not None and dt.datetime.now(dt.UTC) >= row.retire_at:
                await self._store.retire_data_key(row.id)  # still opens what it sealed
                log.info("retired security_code data key %d for tenant %s", row.id, tenant)
                row = None
            if row is None:
                row, plaintext = await self._create_or_find(tenant, SECURITY_CODE)
            else:
                plaintext = (await self._unwrap([row]))[0]
            key = self._sealing.setdefault(row.id, SealingKey(row.id, plaintext))
            self._codes[tenant] = (key, row.retire_at)
            return key

    async def sealing_key_for(self, tenant: str, count: int) -> SealingKey:
        """The key to seal `count` new cards with, counted against its budget."""
        if count > self._policy.max_uses:
            raise ValueError("count exceeds the key's whole budget; seal in smaller parts")
        lease = self._leases.get(tenant)
        if lease is not None and (key := lease.take(count)) is not None:
            self.cache_hits += 1
            return key
        async with self._lock(tenant, PAN):
            lease = self._leases.get(tenant)
            if lease is not None and (key := lease.take(count)) is not None:
                return key
            block = max(count, self._policy.reserve_block)
            for _ in range(3):
                row = await self._store.find_active_data_key(tenant, PAN)
                if row is None:
                    row, plaintext = await self._create_or_find(tenant, PAN)
                    key = self._sealing.get(row.id) or SealingKey(row.id, plaintext)
                else:
                    key = self._sealing.get(row.id) or SealingKey(
                        row.id, (await self._unwrap([row]))[0]
                    )
                self._sealing[row.id] = key
                block = min(block, max(count, row.max_uses - row.uses))
                if await self._store.reserve_data_key_uses(row.id, block):
                    self._leases[tenant] = _Lease(key, block - count, row.retire_at)
                    return key
                # Used up or too old: retire it (it still decrypts) and start a new one.
                await self._store.retire_data_key(row.id)
                log.info("retired pan data key %d for tenant %s", row.id, tenant)
                self._leases.pop(tenant, None)
                block = max(count, self._policy.reserve_block)
            raise KeyServiceUnavailable("could not obtain a data key; retry later")

    async def sealing_keys(self, ids: Iterable[int]) -> dict[int, SealingKey]:
        """Keys by id for opening ciphertexts; unwraps every missing one in one OpenBao call."""
        missing = [i for i in set(ids) if i not in self._sealing]
        if missing:
            rows = await self._store.find_data_keys(missing)
            plaintexts = await self._unwrap(rows)
            for row, plaintext in zip(rows, plaintexts, strict=True):
                self._sealing.setdefault(row.id, SealingKey(row.id, plaintext))
        else:
            self.cache_hits += 1
        return self._sealing


# ---- KEK rotation (run by `vaultline keys rotate`, with the keys-admin AppRole) -------------


class KekAdmin(Protocol):
    """What rotation needs from OpenBao (implemented by `vault.TransitClient`)."""

    def rotate_key(self) -> None: ...
    def rewrap_data_keys(self, wrapped: Sequence[str]) -> list[str]: ...
    def set_min_decryption_version(self, version: int) -> None: ...


@dataclass(frozen=True, slots=True)
class RewrapReport:
    scanned: int
    rewrapped: int
    latest_version: int


async def rewrap_all(
    store: WrappedKeyStore,
    admin: KekAdmin,
    latest_version: int,
    *,
    page: int = 500,
    progress: Callable[[int, int], None] | None = None,
) -> RewrapReport:
    """Rewrap every stored data key still wrapped under an older KEK version, online.

    Plaintext keys never leave OpenBao during a rewrap; each row is swapped only if nobody
    changed it meanwhile, so it is safe beside running tokenizers and safe to run again.
    """
    scanned = rewrapped = 0
    after = 0
    while rows := await store.list_data_keys(after, page):
        after = rows[-1].id
        scanned += len(rows)
        old = [r for r in rows if wrapped_version(r.wrapped_key) < latest_version]
        if old:
            new = await run_transit(admin.rewrap_data_keys, [r.wrapped_key for r in old])
            for row, wrapped in zip(old, new, strict=True):
                if await store.update_wrapped_key(
                    row.id, row.wrapped_key, wrapped, wrapped_version(wrapped)
                ):
                    rewrapped += 1
        if progress is not None:
            progress(scanned, rewrapped)
    return RewrapReport(scanned, rewrapped, latest_version)
