"""Security codes held until authorisation (PCI DSS 3.3.2), then gone.

A capture that collects a card's security code hands it to Tokenize with the card. It is not
stored with the card: it is sealed under the tenant's own `security_code` data key, bound to
its token (`crypto.security_code_associated_data`), and held at most `hold` (default 10
minutes, never more than an hour). The merchant's payment service redeems it once
(RedeemSecurityCode): the row is deleted in the statement that reads it, so a second
redemption — or a concurrent one — finds nothing. Expired codes are erased by `run`.

No log line, audit field, metric or error carries a code; `HeldCode` never prints it.
"""

from __future__ import annotations

import datetime as dt
import logging
from typing import Protocol

from .crypto import OpenFailed, security_code_associated_data
from .errors import SecurityCodeNotFound
from .keyring import Keyring
from .runtime import in_batches, periodically

__all__ = ["DEFAULT_HOLD", "MAX_HOLD", "SecurityCodeStore", "SecurityCodes"]

log = logging.getLogger(__name__)

DEFAULT_HOLD = dt.timedelta(minutes=10)
MAX_HOLD = dt.timedelta(hours=1)


class SecurityCodeStore(Protocol):
    """What held codes need from PostgreSQL (implemented by `store.Store`)."""

    async def hold_security_code(
        self, tenant: str, token: str, key_id: int, ciphertext: bytes, hold: dt.timedelta
    ) -> bool: ...
    async def take_security_code(self, tenant: str, token: str) -> tuple[int, bytes] | None: ...
    async def purge_expired_security_codes(self, limit: int = ...) -> int: ...


class SecurityCodes:
    def __init__(
        self,
        store: SecurityCodeStore,
        keyring: Keyring,
        *,
        hold: dt.timedelta = DEFAULT_HOLD,
        sweep_every_seconds: float = 30.0,
        batch: int = 10_000,
    ) -> None:
        if not dt.timedelta(0) < hold <= MAX_HOLD:
            raise ValueError("a security code may be held for at most one hour")
        self._store = store
        self._keyring = keyring
        self._hold = hold
        self._every = sweep_every_seconds
        self._batch = batch

    async def hold(self, tenant: str, token: str, code: str) -> None:
        """Seal and hold `code` (already validated) for `token`, replacing any it held."""
        key = await self._keyring.security_code_key(tenant)
        blob = key.seal(code.encode("ascii"),
                        security_code_associated_data(tenant, token, key.key_id))
        if not await self._store.hold_security_code(tenant, token, key.key_id, blob,
                                                    self._hold):
            # The token went between Tokenize and here (deleted, shredded): nothing to hold.
            log.warning("security code not held: its token is gone (tenant %s)", tenant)

    async def redeem(self, tenant: str, token: str) -> str:
        """The held code, erased as it is read; SecurityCodeNotFound when none is held."""
        taken = await self._store.take_security_code(tenant, token)
        if taken is None:
            raise SecurityCodeNotFound()
        key_id, blob = taken
        key = (await self._keyring.sealing_keys([key_id])).get(key_id)
        try:
            if key is None:
                raise OpenFailed()
            return key.open(blob, security_code_associated_data(tenant, token, key_id)).decode(
                "ascii")
        except (OpenFailed, UnicodeDecodeError):
            # Tampered or moved: it was erased all the same, and nothing usable is answered.
            log.error("a held security code failed its integrity check (data key %d)", key_id)
            raise SecurityCodeNotFound() from None

    async def sweep_once(self) -> int:
        """Erase every expired code, batch by batch; how many went."""
        total = await in_batches(self._store.purge_expired_security_codes, self._batch)
        if total:
            log.info("erased %d expired security codes", total)
        return total

    async def run(self) -> None:
        """Sweep until cancelled; an outage is logged and the next sweep tries again."""
        await periodically(self._every, self.sweep_once, "security code sweep", log)
