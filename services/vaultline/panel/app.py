"""The agent panel web app (aiohttp): outside the card data zone, no database, no card data.

It holds one thing of value, the `crm` client identity, and uses it only for
`vaultline.capture.v1.CaptureService` over mTLS. What reaches the browser is masked progress:
field states, digit counts, outcomes, and on completion the brand, last four and token — never
the expiry (the capture events carry it as token metadata; the panel drops it), never a digit.

Routes:

    GET  /panel?call&agent&tenant&exp&sig   sign in with a CRM-signed link (`links.py`); sets
                                            the session cookie, then 303 to /panel/call
    GET  /panel/call                        the page (HTML; script and style from /panel/static)
    GET  /panel/static/{panel.js,panel.css}
    GET  /panel/api/state                   the session's call and its current capture
    POST /panel/api/capture                 start a capture on the call        (CSRF token)
    POST /panel/api/capture/cancel          cancel it                          (CSRF token)
    POST /panel/api/capture/restart         ask for one field again            (CSRF token)
    GET  /panel/api/events                  Server-Sent Events from WatchCapture; resumes
                                            after `Last-Event-ID` (the browser sends it)
    GET  /healthz

Every answer carries a strict Content-Security-Policy (scripts, styles and connections from
this origin only; no inline script), `no-store` caching, `nosniff` and no referrer.
"""

from __future__ import annotations

import asyncio
import contextlib
import html
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import grpc
from aiohttp import web

from ..gen.capture.v1 import capture_pb2 as pb
from ..gen.capture.v1 import capture_service_pb2_grpc as pb_grpc
from ..gen.tokenization.v1 import tokenization_pb2 as tpb
from ..httpserve import ConnectionLimits, serve_app
from .links import LinkRefused, PanelKeys, PanelSession, request_id_for

__all__ = ["COOKIE", "PanelConfig", "PanelService", "RunningPanel", "start_panel"]

log = logging.getLogger("vaultline.panel")

STATIC_DIR: Final = Path(__file__).resolve().parent / "static"
COOKIE: Final = "vaultline_panel"
CSRF_HEADER: Final = "X-CSRF-Token"
KEEPALIVE_SECONDS: Final = 15.0
_STATIC: Final = {"panel.js": "text/javascript", "panel.css": "text/css"}
_STATES: Final = {pb.CAPTURE_STATE_STARTED: "started", pb.CAPTURE_STATE_CAPTURING: "capturing",
                  pb.CAPTURE_STATE_COMPLETED: "completed", pb.CAPTURE_STATE_FAILED: "failed",
                  pb.CAPTURE_STATE_CANCELLED: "cancelled"}
_FIELDS: Final = {pb.CAPTURE_FIELD_CARD_NUMBER: "card-number",
                  pb.CAPTURE_FIELD_EXPIRATION_DATE: "expiration-date",
                  pb.CAPTURE_FIELD_SECURITY_CODE: "security-code",
                  pb.CAPTURE_FIELD_POSTAL_CODE: "postal-code"}
_FIELD_OF: Final = {name: number for number, name in _FIELDS.items()}
# What the page says for a gRPC failure (its code), in words an agent can act on.
_FAILURES: Final = {
    grpc.StatusCode.ALREADY_EXISTS: (409, "capture-in-progress",
                                     "A card capture is already in progress on this call."),
    grpc.StatusCode.FAILED_PRECONDITION: (409, "capture-ended", "This capture has ended."),
    grpc.StatusCode.NOT_FOUND: (404, "not-found", "The capture was not found."),
    grpc.StatusCode.INVALID_ARGUMENT: (400, "invalid", "The call cannot take a card capture."),
    grpc.StatusCode.PERMISSION_DENIED: (403, "not-allowed",
                                        "The panel may not take cards for this tenant."),
    grpc.StatusCode.UNAVAILABLE: (503, "unavailable",
                                  "The card vault cannot be reached. Try again shortly."),
    grpc.StatusCode.DEADLINE_EXCEEDED: (503, "unavailable",
                                        "The card vault did not answer in time. Try again."),
}
_REFUSED_PAGE: Final = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Link not valid</title></head>
<body><h1>This link is not valid</h1>
<p>It may have expired. Open the card panel again from the CRM.</p></body></html>
"""


class PanelError(Exception):
    """An answer to the page: an HTTP status, a code and words an agent can act on."""

    def __init__(self, status: int, code: str, words: str) -> None:
        super().__init__(code)
        self.status, self.code, self.words = status, code, words


@dataclass(frozen=True)
class PanelConfig:
    link_secret: bytes
    secure_cookies: bool = True  # set False only behind plain http on loopback (dev)
    frame_ancestors: str = "'none'"  # the CRM origin(s) that may embed the panel
    grpc_timeout: float = 5.0

    def __repr__(self) -> str:
        return f"PanelConfig(frame_ancestors={self.frame_ancestors!r}, <secret hidden>)"


def masked_event(event: pb.CaptureEvent) -> dict[str, Any]:
    """A capture event as the page gets it: progress, never a digit, never the expiry."""
    out: dict[str, Any] = {
        "seq": event.seq, "state": _STATES.get(event.state, "unknown"),
        "field": _FIELDS.get(event.field, ""), "digits": event.digits_entered,
        "outcome": event.field_outcome, "attempt": event.attempt,
        "reason": event.failure_reason,
    }
    if event.state == pb.CAPTURE_STATE_COMPLETED and event.card.token:
        out["card"] = _card(event.card)
    return out


def _card(card: pb.CapturedCard) -> dict[str, str]:
    return {"token": card.token, "last4": card.last4,
            "brand": tpb.CardBrand.Name(card.brand).removeprefix("CARD_BRAND_")}


def masked_capture(capture: pb.Capture) -> dict[str, Any]:
    out: dict[str, Any] = {
        "id": capture.capture_id, "state": _STATES.get(capture.state, "unknown"),
        "field": _FIELDS.get(capture.field, ""), "seq": capture.last_seq,
        "security_code": capture.fields.security_code,
        "postal_code": capture.fields.postal_code, "reason": capture.failure_reason,
    }
    if capture.state == pb.CAPTURE_STATE_COMPLETED and capture.card.token:
        out["card"] = _card(capture.card)
    return out


class PanelService:
    def __init__(self, config: PanelConfig, channel: grpc.aio.Channel) -> None:
        self.config = config
        self._keys = PanelKeys(config.link_secret)
        # The page, its script and its style, read once.
        self._page = (STATIC_DIR / "panel.html").read_text(encoding="utf-8")
        self._static = {name: (STATIC_DIR / name).read_bytes() for name in _STATIC}
        self._stub = pb_grpc.CaptureServiceStub(channel)
        self._csp = ("default-src 'none'; script-src 'self'; style-src 'self'; "
                     "connect-src 'self'; img-src 'self'; base-uri 'none'; "
                     f"form-action 'self'; frame-ancestors {config.frame_ancestors}")
        self.app = web.Application(middlewares=[self._headers])
        self.app.add_routes([
            web.get("/panel", self.sign_in),
            web.get("/panel/call", self.page),
            web.get("/panel/static/{name}", self.static),
            web.get("/panel/api/state", self.state),
            web.post("/panel/api/capture", self.start),
            web.post("/panel/api/capture/cancel", self.cancel),
            web.post("/panel/api/capture/restart", self.restart),
            web.get("/panel/api/events", self.events),
            web.get("/healthz", self.health),
        ])

    @web.middleware
    async def _headers(self, request: web.Request,
                       handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                       ) -> web.StreamResponse:
        try:
            response = await handler(request)
        except PanelError as exc:
            response = web.json_response({"error": exc.code, "message": exc.words},
                                         status=exc.status)
        except web.HTTPException as exc:  # aiohttp's own answers (404, 405, …)
            self._lock_down(exc.headers)
            raise
        self._lock_down(response.headers)
        return response

    def _lock_down(self, headers: Any) -> None:
        headers["Content-Security-Policy"] = self._csp
        headers["X-Content-Type-Options"] = "nosniff"
        headers["Referrer-Policy"] = "no-referrer"
        headers["Cache-Control"] = "no-store"
        headers["Cross-Origin-Opener-Policy"] = "same-origin"
        if self.config.frame_ancestors == "'none'":
            headers["X-Frame-Options"] = "DENY"

    # ---- sessions --------------------------------------------------------------------------

    def _session(self, request: web.Request) -> PanelSession | None:
        try:
            return self._keys.session(request.cookies.get(COOKIE, ""), int(time.time()))
        except LinkRefused:
            return None

    def _set_cookie(self, response: web.StreamResponse, session: PanelSession) -> None:
        response.set_cookie(COOKIE, self._keys.cookie(session), path="/panel", httponly=True,
                            secure=self.config.secure_cookies, samesite="Strict",
                            max_age=max(0, session.exp - int(time.time())))

    @staticmethod
    def _refused() -> web.Response:
        return web.Response(status=403, text=_REFUSED_PAGE, content_type="text/html")

    def _write_allowed(self, request: web.Request) -> PanelSession | None:
        """The session of a state-changing request carrying its CSRF token, else None."""
        session = self._session(request)
        if session is None or not self._keys.csrf_ok(session,
                                                     request.headers.get(CSRF_HEADER, "")):
            return None
        return session

    # ---- pages -----------------------------------------------------------------------------

    async def health(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def sign_in(self, request: web.Request) -> web.Response:
        query = {k: v for k, v in request.query.items()}
        try:
            if len(query) != len(request.query):
                raise LinkRefused("repeated parameters")
            session = self._keys.admit_link(query, int(time.time()))
        except LinkRefused as refused:
            log.warning("panel link refused: %s remote=%s", refused, request.remote)
            return self._refused()
        log.info("panel sign-in agent=%s call=%s tenant=%s", session.agent, session.call,
                 session.tenant)
        # Off the URL at once: the signed link stays out of the history and any referrer.
        response = web.Response(status=303, headers={"Location": "/panel/call"})
        self._set_cookie(response, session)
        return response

    async def page(self, request: web.Request) -> web.Response:
        session = self._session(request)
        if session is None:
            return self._refused()
        text = self._page
        for key, value in (("csrf", self._keys.csrf_token(session)), ("call", session.call),
                           ("agent", session.agent), ("tenant", session.tenant)):
            text = text.replace("{{" + key + "}}", html.escape(value, quote=True))
        return web.Response(text=text, content_type="text/html")

    async def static(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if name not in _STATIC:
            raise web.HTTPNotFound()
        return web.Response(body=self._static[name], content_type=_STATIC[name])

    # ---- the API ---------------------------------------------------------------------------

    async def _call(self, method: Any, request: Any) -> Any:
        """One CaptureService call; a gRPC failure becomes the page's words (HTTPException)."""
        try:
            return await method(request, timeout=self.config.grpc_timeout)
        except grpc.aio.AioRpcError as exc:
            status, code, words = _FAILURES.get(
                exc.code(), (502, "failed", "Something went wrong. Try again."))
            log.warning("panel: CaptureService %s answered %s", type(request).__name__,
                        exc.code().name)
            raise PanelError(status, code, words) from None

    async def state(self, request: web.Request) -> web.Response:
        session = self._session(request)
        if session is None:
            raise PanelError(403, "signed-out", "Open the card panel again from the CRM.")
        capture = None
        if session.capture:
            got = await self._call(self._stub.GetCapture,
                                   pb.GetCaptureRequest(capture_id=session.capture))
            if got.capture.call_sid == session.call:
                capture = masked_capture(got.capture)
        return web.json_response({"call": session.call, "agent": session.agent,
                                  "tenant": session.tenant, "capture": capture})

    async def start(self, request: web.Request) -> web.Response:
        session = self._write_allowed(request)
        if session is None:
            raise PanelError(403, "forbidden", "Open the card panel again from the CRM.")
        body = await _json_body(request)
        click = str(body.get("request", ""))[:64]
        if not click.isprintable() or not click:
            raise PanelError(400, "invalid", "The request was not understood.")
        started = await self._call(self._stub.StartCapture, pb.StartCaptureRequest(
            tenant=session.tenant, call_sid=session.call, agent_id=session.agent,
            fields=pb.CaptureFields(security_code=bool(body.get("security_code", True)),
                                    postal_code=bool(body.get("postal_code", False))),
            # Opaque tokens: a numeric token ends with the card's last four and looks like one.
            token_format=tpb.TOKEN_FORMAT_OPAQUE,
            request_id=request_id_for("panel-", session.nonce, click)))
        log.info("panel capture started agent=%s call=%s capture=%s", session.agent,
                 session.call, started.capture.capture_id)
        response = web.json_response({"capture": masked_capture(started.capture)})
        self._set_cookie(response, session.with_capture(started.capture.capture_id))
        return response

    async def cancel(self, request: web.Request) -> web.Response:
        session = self._write_allowed(request)
        if session is None or not session.capture:
            raise PanelError(403, "forbidden", "There is no capture to cancel.")
        done = await self._call(self._stub.CancelCapture,
                                pb.CancelCaptureRequest(capture_id=session.capture))
        return web.json_response({"capture": masked_capture(done.capture)})

    async def restart(self, request: web.Request) -> web.Response:
        session = self._write_allowed(request)
        if session is None or not session.capture:
            raise PanelError(403, "forbidden", "There is no capture to change.")
        field = _FIELD_OF.get(str((await _json_body(request)).get("field", "")))
        if field is None:
            raise PanelError(400, "invalid", "Unknown field.")
        done = await self._call(self._stub.RestartCaptureField, pb.RestartCaptureFieldRequest(
            capture_id=session.capture, field=field))
        return web.json_response({"capture": masked_capture(done.capture)})

    async def events(self, request: web.Request) -> web.StreamResponse:
        """Server-Sent Events: one `capture` event per CaptureEvent (id = its seq), `end`
        once the capture has ended; a reconnect resumes after `Last-Event-ID`."""
        session = self._session(request)
        if session is None or not session.capture:
            raise PanelError(403, "forbidden", "There is no capture to follow.")
        raw = request.headers.get("Last-Event-ID") or request.query.get("after", "0")
        after = int(raw) if raw.isascii() and raw.isdigit() and len(raw) < 15 else 0
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                               "X-Accel-Buffering": "no"})
        await response.prepare(request)
        await response.write(b"retry: 1000\n\n")  # reconnect within a second if dropped
        call = self._stub.WatchCapture(pb.WatchCaptureRequest(capture_id=session.capture,
                                                              after_seq=after))
        try:
            async for chunk in _with_keepalive(call):
                if chunk is None:
                    await response.write(b": keepalive\n\n")
                    continue
                event = masked_event(chunk.event)
                await response.write(
                    f"id: {event['seq']}\nevent: capture\ndata: {json.dumps(event)}\n\n"
                    .encode())
            await response.write(b"event: end\ndata: {}\n\n")
        except grpc.aio.AioRpcError as exc:
            _, code, words = _FAILURES.get(exc.code(), (502, "failed", "The stream broke."))
            with contextlib.suppress(ConnectionError):
                await response.write(
                    f"event: problem\ndata: {json.dumps({'error': code, 'message': words})}"
                    "\n\n".encode())
        except ConnectionError:
            pass  # the page went away (or reconnects, with Last-Event-ID)
        finally:
            call.cancel()
        return response


async def _with_keepalive(call: Any) -> AsyncIterator[Any]:
    """The stream's messages, with None whenever it has been quiet for KEEPALIVE_SECONDS."""
    iterator = call.__aiter__()
    pending: asyncio.Future[Any] | None = None
    try:
        while True:
            if pending is None:
                pending = asyncio.ensure_future(iterator.__anext__())
            done, _ = await asyncio.wait({pending}, timeout=KEEPALIVE_SECONDS)
            if not done:
                yield None
                continue
            try:
                message = pending.result()
            except StopAsyncIteration:
                return
            pending = None
            yield message
    finally:
        if pending is not None:
            pending.cancel()


async def _json_body(request: web.Request) -> dict[str, Any]:
    if request.content_length is not None and request.content_length > 4096:
        raise PanelError(413, "too-large", "The request is too large.")
    try:
        body = json.loads(await request.content.read(4097) or b"{}")
    except ValueError:
        raise PanelError(400, "invalid", "The request was not understood.") from None
    if not isinstance(body, dict):
        raise PanelError(400, "invalid", "The request was not understood.")
    return body


@dataclass
class RunningPanel:
    service: PanelService
    runner: web.AppRunner
    url: str

    async def stop(self) -> None:
        await self.runner.cleanup()


async def start_panel(config: PanelConfig, channel: grpc.aio.Channel, *,
                      host: str = "127.0.0.1", port: int = 0) -> RunningPanel:
    service = PanelService(config, channel)
    # An event stream reconnects on its own (resuming after its last event), so connections
    # may be closed after a few minutes like any other.
    runner, bound = await serve_app(service.app, host, port,
                                    ConnectionLimits(max_connections=256, lifetime=300.0))
    return RunningPanel(service, runner, f"http://{host}:{bound}")
