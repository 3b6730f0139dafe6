"""Twilio REST calls the IVR makes (recording pause/resume, call redirects, agent-assisted
Payments), through the
twilio package's async client, pointed at a configurable API base URL.

The base URL is applied in the client's HTTP layer (`BaseUrlHttpClient`), so the twilio
package builds every path and form body itself and the simulator sees exactly what Twilio
would. Errors become `TwilioUnavailable` or `RecordingNotFound` and carry no request data.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
from twilio.base.exceptions import TwilioRestException
from twilio.http.async_http_client import AsyncTwilioHttpClient
from twilio.http.response import Response
from twilio.rest import Client

__all__ = ["BaseUrlHttpClient", "RecordingNotFound", "TwilioRest", "TwilioUnavailable"]

TWILIO_API = "https://api.twilio.com"
log = logging.getLogger("vaultline.ivr.twilio")


class TwilioUnavailable(Exception):
    """Twilio's REST API did not do what was asked (network, 5xx, auth, …)."""

    def __init__(self, operation: str, status: int | None) -> None:
        super().__init__(f"twilio {operation} failed (status {status})")
        self.operation = operation
        self.status = status


class RecordingNotFound(TwilioUnavailable):
    """Twilio answered 404 to a recording update: usually the call has no recording in
    progress, but a 404 proves nothing by itself (`recording_active` asks)."""


class BaseUrlHttpClient(AsyncTwilioHttpClient):
    """The twilio async HTTP client with `https://api.twilio.com` replaced by `base_url`."""

    def __init__(self, base_url: str, timeout: float = 5.0) -> None:
        super().__init__(timeout=timeout)
        self.base_url = base_url.rstrip("/")

    async def request(self, method: str, url: str, *args: Any, **kwargs: Any) -> Response:
        if url.startswith(TWILIO_API) and self.base_url != TWILIO_API:
            url = self.base_url + url[len(TWILIO_API):]
        return await super().request(method, url, *args, **kwargs)


@dataclass(frozen=True, slots=True)
class RecordingUpdate:
    call_sid: str
    sid: str
    status: str


class TwilioRest:
    """Create inside a running event loop (the HTTP session belongs to it); `close()` it."""

    def __init__(self, account_sid: str, auth_token: str, base_url: str = TWILIO_API,
                 timeout: float = 5.0) -> None:
        self._http = BaseUrlHttpClient(base_url, timeout)
        self._client = Client(account_sid, auth_token, http_client=self._http)
        self._base = base_url.rstrip("/")
        self._auth = aiohttp.BasicAuth(account_sid, auth_token)
        self._media: aiohttp.ClientSession | None = None
        self._timeout = timeout

    async def close(self) -> None:
        await self._http.close()
        if self._media is not None:
            await self._media.close()

    # ---- recordings: the encrypted media, then Twilio's copy deleted (issue 17) ------------

    async def download_recording(self, sid: str, max_bytes: int = 512 << 20) -> bytes:
        """A recording's media (.wav; encrypted when Voice Recording Encryption is on)."""
        if self._media is None:
            self._media = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(
                total=None, sock_connect=self._timeout, sock_read=max(self._timeout, 30.0)))
        account = self._client.account_sid
        url = f"{self._base}/2010-04-01/Accounts/{account}/Recordings/{sid}.wav"
        async with _translated("recording download", not_found=RecordingNotFound):
            async with self._media.get(url, auth=self._auth) as response:
                if response.status == 404:
                    raise RecordingNotFound("recording download", 404)
                if response.status != 200:
                    raise TwilioUnavailable("recording download", response.status)
                body = bytearray()
                async for chunk in response.content.iter_chunked(1 << 16):
                    body += chunk
                    if len(body) > max_bytes:
                        raise TwilioUnavailable("recording download (too large)", None)
        return bytes(body)

    async def delete_recording(self, sid: str) -> bool:
        """Delete Twilio's copy; False when it was gone already (404)."""
        try:
            async with _translated("recording delete", not_found=RecordingNotFound):
                await self._client.recordings(sid).delete_async()
        except RecordingNotFound:
            return False
        return True

    async def _recording(self, call_sid: str, status: str, **extra: Any) -> RecordingUpdate:
        operation = f"recording {status}"
        async with _translated(operation, not_found=RecordingNotFound):
            rec = await self._client.calls(call_sid).recordings("Twilio.CURRENT").update_async(
                status=status, **extra)
        return RecordingUpdate(call_sid, rec.sid or "", rec.status or "")

    async def pause_recording(self, call_sid: str) -> RecordingUpdate:
        """Pause the call's current recording, skipping (not silencing) the paused part."""
        return await self._recording(call_sid, "paused", pause_behavior="skip")

    async def resume_recording(self, call_sid: str) -> RecordingUpdate:
        return await self._recording(call_sid, "in-progress")

    async def recording_active(self, call_sid: str) -> bool:
        """Whether the call has a recording in progress (or paused) right now."""
        async with _translated("recording list"):
            recordings = await self._client.calls(call_sid).recordings.list_async(limit=50)
        return any(r.status in ("in-progress", "paused") for r in recordings)

    async def redirect_call(self, call_sid: str, url: str) -> None:
        """Send a live leg to new TwiML (agent handoff: out of the conference and back)."""
        async with _translated("call redirect"):
            await self._client.calls(call_sid).update_async(url=url, method="POST")

    # ---- agent-assisted Payments (a Payment on the customer's live leg) ------------------

    async def create_payment(self, call_sid: str, *, idempotency_key: str,
                             status_callback: str, connector: str, security_code: bool,
                             postal_code: bool, valid_card_types: str = "") -> str:
        """Start a Payment on the call (tokenize only: ChargeAmount 0); its sid (PK…)."""
        extra: dict[str, Any] = {"valid_card_types": valid_card_types} if valid_card_types \
            else {}
        async with _translated("payment create"):
            payment = await self._client.calls(call_sid).payments.create_async(
                idempotency_key=idempotency_key, status_callback=status_callback,
                payment_connector=connector,
                token_type="reusable",  # noqa: S106 - Twilio's token kind, not a secret
                charge_amount=0,
                payment_method="credit-card", security_code=security_code,
                postal_code=postal_code, **extra)
        if not (payment.sid or "").startswith("PK"):
            raise TwilioUnavailable("payment create", None)
        return str(payment.sid)

    async def update_payment(self, call_sid: str, payment_sid: str, *, idempotency_key: str,
                             status_callback: str, capture: str = "", status: str = "") -> None:
        """`Capture=<field>` (ask the caller for it) or `Status=complete|cancel`."""
        extra: dict[str, Any] = {}
        if capture:
            extra["capture"] = capture
        if status:
            extra["status"] = status
        async with _translated(f"payment {status or capture}"):
            await self._client.calls(call_sid).payments(payment_sid).update_async(
                idempotency_key=idempotency_key, status_callback=status_callback, **extra)


@contextlib.asynccontextmanager
async def _translated(operation: str, *, not_found: type[TwilioUnavailable] | None = None
                      ) -> AsyncIterator[None]:
    """The one translation of Twilio REST failures: an HTTP error (`not_found` for a 404 when
    the caller tells that apart) or no answer at all; nothing of the request is kept."""
    try:
        yield
    except TwilioRestException as exc:
        if not_found is not None and exc.status == 404:
            raise not_found(operation, 404) from None
        raise TwilioUnavailable(operation, exc.status) from None
    except (aiohttp.ClientError, TimeoutError, OSError):
        raise TwilioUnavailable(operation, None) from None
