"""CRM callbacks: one signed JSON event per finished capture, retried with backoff.

The event id is derived from the session id, so every retry (and any replica that repeats
the delivery) sends the same id and the CRM can deduplicate. The payload holds the token,
brand, last four and expiry, never a card number or security code.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from collections.abc import Callable, Mapping
from typing import Any

import aiohttp

from . import signing

__all__ = ["CrmNotifier", "agent_capture_event", "capture_event"]

log = logging.getLogger("vaultline.ivr.crm")
_RETRY_STATUSES = frozenset({408, 425, 429, 500, 502, 503, 504})


def capture_event(session_id: str, data: Mapping[str, Any], created: int) -> dict[str, Any]:
    return {"id": f"evt_{session_id.replace('-', '')}", "type": "ivr.capture.completed",
            "created": created, "data": dict(data)}


def agent_capture_event(capture_id: str, data: Mapping[str, Any], created: int
                        ) -> dict[str, Any]:
    """The event of a finished agent-assisted capture (one id per capture, for dedup)."""
    return {"id": f"evt_{capture_id}", "type": "capture.completed", "created": created,
            "data": dict(data)}


class CrmNotifier:
    def __init__(self, secret: bytes, session: aiohttp.ClientSession, *, attempts: int = 4,
                 backoff: float = 0.25, timeout: float = 2.0,
                 clock: Callable[[], float] = time.time) -> None:
        if len(secret) < 32:
            raise ValueError("the CRM signing secret must be at least 32 bytes")
        self._secret = secret
        self._session = session
        self._attempts = attempts
        self._backoff = backoff
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._clock = clock

    def __repr__(self) -> str:
        return "CrmNotifier(<secret hidden>)"

    async def notify(self, url: str, event: Mapping[str, Any]) -> bool:
        """POST the event until a 2xx; False once the attempts are spent or on a 4xx."""
        body = json.dumps(event, separators=(",", ":"), sort_keys=True).encode()
        for attempt in range(1, self._attempts + 1):
            # Signed afresh per attempt, as Stripe does: the timestamp says when it was sent.
            headers = {"Content-Type": "application/json",
                       signing.HEADER: signing.sign(self._secret, body, int(self._clock())),
                       "Vaultline-Event-Id": str(event["id"])}
            status: int | None = None
            try:
                # Never followed: a redirect would carry the signed event to a URL nobody
                # configured (issue 14). A 3xx is a refusal like a 4xx.
                async with self._session.post(url, data=body, headers=headers,
                                              timeout=self._timeout,
                                              allow_redirects=False) as response:
                    status = response.status
            except (aiohttp.ClientError, TimeoutError, OSError):
                status = None
            if status is not None and 200 <= status < 300:
                return True
            retriable = status is None or status in _RETRY_STATUSES
            log.warning("crm callback attempt %d/%d failed (status %s) event=%s", attempt,
                        self._attempts, status, event["id"])
            if not retriable or attempt == self._attempts:
                return False
            delay = self._backoff * 2 ** (attempt - 1)
            await asyncio.sleep(delay * (0.8 + 0.4 * random.random()))  # noqa: S311 jitter
        return False
