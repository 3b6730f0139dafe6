"""The IVR webhook service (aiohttp): Twilio's form posts in, TwiML out.

Routes (all POST, all checked against `X-Twilio-Signature` with the twilio package's
`RequestValidator`, using the configured public base URL + the raw request path, so a TLS
proxy in front changes nothing; a bad or missing signature is a bare 403 and an audit line):

    /voice/{flow}              a call enters a flow (incoming call, or a redirected leg;
                               `?conference=NAME` says where to send it back)
    /voice/{flow}/input?seq=N  a <Gather> result
    /voice/{flow}/pay?seq=N    a <Pay> result (`mode: pay`): Twilio's Result and the token
    /voice/status              call status callbacks: a finished call ends its capture
    /voice/queue/{name}        hold message + <Enqueue> (a flow's failure path)
    /pay/connector             Twilio's Generic Pay Connector (HTTP Basic, JSON; `connector`)
    /pay/status/{capture}      an agent-assisted capture's Payment StatusCallbacks
                               (`agent_capture`, which also takes the agents' commands)
    /recordings/status         recording status callbacks: the recording vault's ingest
                               (`vaultline.recordings.ingest`)

Each request: load the call's session row, open its sealed fields, run the interpreter,
perform each side effect and feed the result back, then save with compare-and-set on the
row version (a replayed or concurrent request loses and gets 409). Digits are never logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import grpc
from aiohttp import web
from prometheus_client import CollectorRegistry, start_http_server
from twilio.request_validator import RequestValidator

from ..httpserve import ConnectionLimits, serve_app
from ..ivr_store import IvrStore, SessionExists, SessionRow
from ..recordings.files import RecordingFiles
from ..recordings.ingest import RecordingIngest
from ..resources import IVR_FLOWS_DIR
from ..runtime import periodically
from ..security.audit import AuditEvent, AuditWriter
from ..vault import RECORDINGS_KEY, AppRoleCredentials, TransitClient
from . import interpreter as ivr
from .agent_capture import AgentCaptures
from .connector import ConnectorCredentials, PayConnector
from .crm import CrmNotifier, capture_event
from .flows import Flow, load_flows
from .sealing import OpenFailed, SessionSealer
from .tokenizer import IvrTokenizer, TokenizerUnavailable
from .twilio_rest import RecordingNotFound, TwilioRest, TwilioUnavailable
from .twiml import render

__all__ = ["IvrConfig", "IvrService", "RunningIvr", "start_ivr"]

log = logging.getLogger("vaultline.ivr")
audit = logging.getLogger("vaultline.ivr.audit")

_CALL_SID = re.compile(r"CA[0-9a-f]{32}\Z")
_ENDED_STATUSES = frozenset({"completed", "busy", "failed", "no-answer", "canceled"})
_XML = "application/xml"


@dataclass(frozen=True)
class IvrConfig:
    """Everything the webhook service needs; secrets are kept out of the repr."""

    public_base_url: str  # the URL Twilio calls, e.g. https://ivr.example.com
    account_sid: str
    auth_token: str = field(repr=False)
    database_url: str = field(repr=False)
    session_secret: bytes = field(repr=False)
    crm_secret: bytes = field(repr=False)
    flows_dir: Path = IVR_FLOWS_DIR
    twilio_api_base_url: str = "https://api.twilio.com"
    crm_callback_urls: Mapping[str, str] = field(default_factory=dict)  # per-flow override
    session_ttl: dt.timedelta = dt.timedelta(minutes=15)
    crm_attempts: int = 4
    crm_backoff: float = 0.25
    crm_timeout: float = 2.0
    twilio_timeout: float = 5.0
    tokenizer_timeout: float = 5.0
    sweep_interval: float = 60.0
    db_pool_size: int = 10
    # Who the IVR's own audit records name (its capture events, not a caller's call).
    audit_identity: str = "spiffe://vaultline/ivr/ivr-webhook"
    # Connections: at most this many at once, each closed this long after it opened,
    # however slowly it sends (Twilio gives a webhook 15 s).
    max_connections: int = 512
    connection_lifetime: float = 60.0
    # The Generic Pay Connector endpoint: None answers every request 401.
    connector_credentials: ConnectorCredentials | None = None
    connector_tenant: str = "default"
    # Agent-assisted captures: the Pay Connector's unique name on the Twilio account (the one
    # pointing at /pay/connector), and where finished captures are announced.
    pay_connector_name: str = "vaultline"
    capture_crm_callback_url: str = ""
    # The card types each tenant accepts, as Twilio's ValidCardTypes (space-separated, e.g.
    # "visa mastercard"); a tenant not listed gets Twilio's default (visa mastercard amex).
    card_types: Mapping[str, str] = field(default_factory=dict)
    connector_token_format: str = "opaque"  # noqa: S105 - a token format, not a secret
    # The recording vault (issue 17): where encrypted recordings are kept, and the OpenBao
    # login that unwraps their content keys to certify them; None: recordings are not ingested.
    recordings_dir: Path | None = None
    recordings_vault_addr: str = ""
    recordings_credentials: AppRoleCredentials | None = field(default=None, repr=False)
    recordings_tenant: str = "default"  # for a recorded call the IVR never handled
    recordings_sweep_seconds: float = 60.0
    # host:port for Prometheus /metrics of the IVR (recordings ingested by outcome, the
    # quarantines among them); None: not served.
    metrics_listen: str | None = None

    def __post_init__(self) -> None:
        if self.session_ttl > dt.timedelta(minutes=15):
            raise ValueError("session_ttl must be at most 15 minutes")
        if not self.public_base_url.startswith(("http://", "https://")):
            raise ValueError("public_base_url must be an http(s):// URL")


class IvrService:
    """Owns the store, the Twilio REST client, the CRM notifier; serves `app`."""

    def __init__(self, config: IvrConfig, channel: grpc.aio.Channel,
                 flows: Mapping[str, Flow] | None = None) -> None:
        self.config = config
        self.flows = dict(flows) if flows is not None else load_flows(config.flows_dir)
        self._tokenizer = IvrTokenizer(channel, timeout=config.tokenizer_timeout)
        self._validator = RequestValidator(config.auth_token)
        self._sealer = SessionSealer(config.session_secret)
        self._base = config.public_base_url.rstrip("/")
        self.store: IvrStore | None = None
        self._rest: TwilioRest | None = None
        self._http: aiohttp.ClientSession | None = None
        self._crm: CrmNotifier | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self._agent_loop: asyncio.Task[None] | None = None
        self.agent: AgentCaptures | None = None
        self.recordings: RecordingIngest | None = None
        self.registry = CollectorRegistry()
        self._metrics_server: Any = None
        self.metrics_address = ""
        self._recordings_loop: asyncio.Task[None] | None = None
        self._recording_keys: TransitClient | None = None
        self._audit: AuditWriter | None = None
        self.connector = PayConnector(
            config.connector_credentials, self._tokenizer, self._sealer,
            tenant=config.connector_tenant, token_format=config.connector_token_format,
            pay_tenants=frozenset(f.tenant for f in self.flows.values() if f.mode == "pay"))
        self.connector.audit_identity = config.audit_identity
        self.app = web.Application()
        self.app.add_routes([
            web.post("/pay/connector", self.connector.handle),
            web.post("/pay/status/{capture}", self.payment_status),
            web.post("/voice/status", self.status_callback),
            web.post("/recordings/status", self.recording_status),
            web.post("/voice/queue/{queue}", self.queue),
            web.post("/voice/{flow}", self.call_enters),
            web.post("/voice/{flow}/input", self.gather_input),
            web.post("/voice/{flow}/pay", self.pay_result),
            web.get("/healthz", self.health),
        ])

    async def start(self) -> None:
        c = self.config
        self.store = await IvrStore.connect(c.database_url, max_size=c.db_pool_size)
        self._audit = AuditWriter(self.store.audit_appender())
        self.connector.audit = self._audit
        self._rest = TwilioRest(c.account_sid, c.auth_token, c.twilio_api_base_url,
                                timeout=c.twilio_timeout)
        self._http = aiohttp.ClientSession()
        self._crm = CrmNotifier(c.crm_secret, self._http, attempts=c.crm_attempts,
                                backoff=c.crm_backoff, timeout=c.crm_timeout)
        self._sweeper = asyncio.create_task(self._sweep())
        self.agent = AgentCaptures(
            self.store, self._rest, self._tokenizer, self._crm, self._audit,
            base_url=self._base, connector=c.pay_connector_name,
            crm_url=c.capture_crm_callback_url, audit_identity=c.audit_identity,
            card_types=c.card_types)
        self._agent_loop = asyncio.create_task(self.agent.run())
        if c.recordings_dir is not None and c.recordings_credentials is not None:
            self._recording_keys = TransitClient(
                c.recordings_vault_addr, c.recordings_credentials, key_name=RECORDINGS_KEY)
            self.recordings = RecordingIngest(
                self.store, RecordingFiles(c.recordings_dir), self._rest,
                self._recording_keys, self._audit, tenant_of=self._tenant_of_call,
                audit_identity=c.audit_identity, sweep_seconds=c.recordings_sweep_seconds,
                registry=self.registry)
            self._recordings_loop = asyncio.create_task(self.recordings.run())
        if c.metrics_listen:
            host, _, port = c.metrics_listen.rpartition(":")
            self._metrics_server, _thread = start_http_server(int(port), addr=host,
                                                              registry=self.registry)
            self.metrics_address = f"{host}:{self._metrics_server.server_port}"

    async def close(self) -> None:
        for task in (self._sweeper, self._agent_loop, self._recordings_loop):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if self._recording_keys is not None:
            self._recording_keys.close()
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
            self._metrics_server.server_close()
        if self._rest is not None:
            await self._rest.close()
        if self._http is not None:
            await self._http.close()
        if self.store is not None:
            await self.store.close()

    async def _sweep(self) -> None:
        await periodically(self.config.sweep_interval, self._sweep_once, "ivr sweeper", log)

    async def _sweep_once(self) -> None:
        assert self.store is not None
        n = await self.store.end_expired_sessions()
        if n:
            log.info("ivr sweeper erased %d abandoned captures", n)

    # ---- request plumbing --------------------------------------------------------------------

    async def _signed_form(self, request: web.Request) -> Mapping[str, str] | None:
        form = await request.post()
        signature = request.headers.get("X-Twilio-Signature", "")
        url = self._base + request.raw_path
        if not signature or not self._validator.validate(url, form, signature):
            audit.warning("twilio signature rejected: path=%s remote=%s signed=%s",
                          request.path, request.remote, bool(signature))
            return None
        if form.get("AccountSid") != self.config.account_sid:
            audit.warning("twilio request for another account rejected: path=%s",
                          request.path)
            return None
        return {k: str(v) for k, v in form.items()}

    @staticmethod
    def _forbidden() -> web.Response:
        return web.Response(status=403)

    def _twiml(self, flow: Flow, actions: tuple[ivr.Action, ...] | list[ivr.Action]
               ) -> web.Response:
        return web.Response(text=render(actions, base_url=self._base, flow=flow.name,
                                        pay_connector=self.config.pay_connector_name),
                            content_type=_XML)

    # ---- handlers ----------------------------------------------------------------------------

    async def health(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "flows": sorted(self.flows)})

    async def call_enters(self, request: web.Request) -> web.StreamResponse:
        form = await self._signed_form(request)
        if form is None:
            return self._forbidden()
        flow = self.flows.get(request.match_info["flow"])
        call_sid = form.get("CallSid", "")
        if flow is None or not _CALL_SID.match(call_sid):
            return web.Response(status=404)
        assert self.store is not None
        state = ivr.new_state(flow.name, call_sid)
        try:
            row = await self.store.insert_session(call_sid, flow.name, state.public(),
                                                  self.config.session_ttl)
        except SessionExists:
            audit.warning("ivr start refused: capture already in progress call=%s flow=%s",
                          call_sid, flow.name)
            return web.Response(status=409)
        await self._record(flow, row, "capture.started", "OK")
        conference = request.query.get("conference", "")
        return await self._run(flow, row, state, ivr.Start(conference=conference))

    async def gather_input(self, request: web.Request) -> web.StreamResponse:
        return await self._answer(request, lambda seq, form: ivr.Input(
            seq, form.get("Digits", ""), form.get("FinishedOnKey", ""),
            dt.datetime.now(dt.UTC).date()))

    async def pay_result(self, request: web.Request) -> web.StreamResponse:
        # Only the Result and the token are taken; the masked card fields and the expiry
        # Twilio also posts are neither kept nor logged.
        return await self._answer(request, lambda seq, form: ivr.PayResult(
            seq, form.get("Result", ""), form.get("PaymentToken", "")))

    async def _answer(self, request: web.Request,
                      event_of: Callable[[int, Mapping[str, str]], ivr.Event]
                      ) -> web.StreamResponse:
        """A Gather's or Pay's action callback: the event for the call's capture in progress
        (Expired once its session is past its time)."""
        form = await self._signed_form(request)
        if form is None:
            return self._forbidden()
        flow = self.flows.get(request.match_info["flow"])
        call_sid = form.get("CallSid", "")
        seq_raw = request.query.get("seq", "")
        if flow is None or not _CALL_SID.match(call_sid) or not seq_raw.isdigit():
            return web.Response(status=404)
        assert self.store is not None
        row = await self.store.find_active_session(call_sid)
        if row is None or row.flow != flow.name:
            audit.warning("ivr input without a capture in progress call=%s flow=%s",
                          call_sid, flow.name)
            return web.Response(status=409)
        state = self._load(row)
        event: ivr.Event
        if row.expires_at <= dt.datetime.now(dt.UTC):
            event = ivr.Expired()
        else:
            event = event_of(int(seq_raw), form)
        return await self._run(flow, row, state, event)

    async def status_callback(self, request: web.Request) -> web.StreamResponse:
        form = await self._signed_form(request)
        if form is None:
            return self._forbidden()
        call_sid = form.get("CallSid", "")
        if form.get("CallStatus") in _ENDED_STATUSES and _CALL_SID.match(call_sid):
            assert self.store is not None
            row = await self.store.find_active_session(call_sid)
            flow = self.flows.get(row.flow) if row is not None else None
            if row is not None and flow is not None:
                await self._run(flow, row, self._load(row), ivr.HungUp())
            if self.agent is not None:
                await self.agent.call_ended(call_sid)
        return web.Response(status=204)

    async def payment_status(self, request: web.Request) -> web.StreamResponse:
        form = await self._signed_form(request)
        if form is None:
            return self._forbidden()
        assert self.agent is not None
        status = await self.agent.status_callback(request.match_info["capture"], form)
        return web.Response(status=status)

    async def recording_status(self, request: web.Request) -> web.StreamResponse:
        form = await self._signed_form(request)
        if form is None:
            return self._forbidden()
        if self.recordings is None:
            log.error("a recording status callback came in, but recordings are not configured "
                      "(recordings_dir, recordings credentials)")
            return web.Response(status=503)
        return web.Response(status=await self.recordings.callback(form))

    async def _tenant_of_call(self, call_sid: str) -> str:
        """The tenant a recorded call belongs to: its flow's, or its capture's."""
        assert self.store is not None
        known = await self.store.call_tenant(call_sid)
        if known is not None:
            kind, value = known
            if kind == "tenant":
                return value
            flow = self.flows.get(value)
            if flow is not None:
                return flow.tenant
        return self.config.recordings_tenant

    async def queue(self, request: web.Request) -> web.StreamResponse:
        form = await self._signed_form(request)
        if form is None:
            return self._forbidden()
        from twilio.twiml.voice_response import VoiceResponse

        response = VoiceResponse()
        response.say("Please hold for the next available agent.")
        response.enqueue(request.match_info["queue"][:64])
        return web.Response(text=str(response), content_type=_XML)

    # ---- the interpreter loop ----------------------------------------------------------------

    def _load(self, row: SessionRow) -> ivr.State:
        fields = {k: row.state[k] for k in ivr.State.__dataclass_fields__ if k in row.state}
        try:
            secrets = self._sealer.open(row.flow, row.call_sid, row.id, row.sealed)
        except OpenFailed:
            # Wrong secret (rotated mid-call) or tampering: carry on as if nothing was entered.
            log.error("ivr sealed fields did not open call=%s", row.call_sid)
            secrets = ivr.Secrets()
        return ivr.State(**{**fields, "secrets": secrets})

    async def _run(self, flow: Flow, row: SessionRow, state: ivr.State,
                   event: ivr.Event) -> web.StreamResponse:
        t = ivr.step(flow, state, event)
        if t.rejected:
            audit.warning("ivr event refused call=%s flow=%s event=%s reason=%s",
                          row.call_sid, flow.name, type(event).__name__, t.rejected)
            return web.Response(status=409)
        if t.error:
            log.info("ivr input error call=%s step=%d error=%s", row.call_sid, state.step,
                     t.error)
        actions = list(t.actions)
        while t.effect is not None:
            result = await self._perform(flow, row, t.state, t.effect)
            t = ivr.step(flow, t.state, result)
            actions += t.actions
        new = t.state
        assert self.store is not None
        if new.ended:
            saved = await self.store.end_session(
                row.id, row.version, new.public(), new.outcome, new.token or None,
                new.brand or None, new.last4 or None, new.expiry_month or None,
                new.expiry_year or None)
            log.info("ivr capture ended call=%s flow=%s outcome=%s", row.call_sid, flow.name,
                     new.outcome)
        else:
            sealed = self._sealer.seal(flow.name, row.call_sid, row.id, new.secrets)
            saved = await self.store.update_session(row.id, row.version, new.public(), sealed)
        if not saved:
            audit.warning("ivr concurrent or replayed request lost the race call=%s",
                          row.call_sid)
            return web.Response(status=409)
        if new.ended:
            await self._record(flow, row, "capture.ended", new.outcome or "ended")
        return self._twiml(flow, actions)

    async def _record(self, flow: Flow, row: SessionRow, event: str, outcome: str, *,
                      token: str = "") -> None:
        """A chained audit record of a capture event, durable before the call goes on: the
        capture's life (started, recording paused/resumed, tokenized or not, ended) is in the
        same tamper-evident trail as the tokenizer's calls, not only in log lines."""
        assert self._audit is not None
        await self._audit.record([AuditEvent(
            identity=self.config.audit_identity, role="ivr", tenant=flow.tenant,
            method=f"ivr/{flow.name}/{event}", outcome=outcome, request_id=row.id,
            peer=row.call_sid, token=token, at=dt.datetime.now(dt.UTC))])

    async def _perform(self, flow: Flow, row: SessionRow, state: ivr.State,
                       effect: ivr.Effect) -> ivr.Event:
        assert self._rest is not None and self._crm is not None
        if isinstance(effect, ivr.PauseRecording | ivr.ResumeRecording):
            pause = isinstance(effect, ivr.PauseRecording)
            try:
                if pause:
                    await self._rest.pause_recording(row.call_sid)
                else:
                    await self._rest.resume_recording(row.call_sid)
            except RecordingNotFound:
                # Usually: no recording in progress, so nothing can capture the tones. But a
                # 404 is not proof (issue 14: it was fail-open): go on only if Twilio lists
                # no active recording for the call.
                try:
                    active = await self._rest.recording_active(row.call_sid)
                except TwilioUnavailable as exc:
                    log.error("ivr %s call=%s", exc, row.call_sid)
                    return ivr.RecordingUpdated(False)
                if active:
                    log.error("ivr call=%s: recording update refused (404) while a recording"
                              " is active", row.call_sid)
                    return ivr.RecordingUpdated(False)
                log.info("ivr call=%s has no recording in progress", row.call_sid)
            except TwilioUnavailable as exc:
                log.error("ivr %s call=%s", exc, row.call_sid)
                await self._record(flow, row, f"recording.{'paused' if pause else 'resumed'}",
                                   "FAILED")
                return ivr.RecordingUpdated(False)
            await self._record(flow, row, f"recording.{'paused' if pause else 'resumed'}", "OK")
            return ivr.RecordingUpdated(True)
        if isinstance(effect, ivr.Tokenize):
            try:
                result = await self._tokenizer.tokenize(
                    flow.tenant, state.secrets, flow.token_format,
                    self._sealer.request_id(row.id, state.seq))
            except TokenizerUnavailable as exc:
                log.error("ivr tokenize failed call=%s code=%s", row.call_sid, exc.code)
                await self._record(flow, row, "capture.tokenize", exc.code)
                return ivr.TokenizeFailed(exc.code)
            await self._record(flow, row, "capture.tokenize", "OK", token=result.token)
            return ivr.Tokenized(result.token, result.brand, result.last4,
                                 result.expiry_month, result.expiry_year)
        if isinstance(effect, ivr.LookUpToken):
            # <Pay> had the Pay Connector tokenize the card into the flow's tenant.
            try:
                result = await self._tokenizer.get_token(flow.tenant, state.token)
            except TokenizerUnavailable as exc:
                log.error("ivr token look-up failed call=%s code=%s", row.call_sid, exc.code)
                await self._record(flow, row, "capture.pay", exc.code, token=state.token)
                return ivr.TokenizeFailed(exc.code)
            await self._record(flow, row, "capture.pay", "OK", token=result.token)
            return ivr.Tokenized(result.token, result.brand, result.last4,
                                 result.expiry_month, result.expiry_year)
        if isinstance(effect, ivr.NotifyCrm):
            url = self.config.crm_callback_urls.get(flow.name) or flow.crm_callback_url
            if not url:
                return ivr.CrmNotified(True)
            data = {"flow": flow.name, "call_sid": row.call_sid, "session_id": row.id,
                    "outcome": effect.outcome, "token": state.token or None,
                    "brand": state.brand or None, "last4": state.last4 or None,
                    "expiry_month": state.expiry_month or None,
                    "expiry_year": state.expiry_year or None}
            ok = await self._crm.notify(url, capture_event(row.id, data, int(time.time())))
            return ivr.CrmNotified(ok)
        raise AssertionError(f"unknown effect {effect!r}")


# ---- running it ---------------------------------------------------------------------------


@dataclass
class RunningIvr:
    """A started webhook service (and, in the dev stack, the simulator's REST side)."""

    service: IvrService
    runner: web.AppRunner
    address: str  # http://host:port the webhook listens on
    sim: Any = None  # vaultline.twilio_sim.TwilioSim when started with one

    @property
    def ivr_base_url(self) -> str:
        return self.service.config.public_base_url

    async def stop(self) -> None:
        await self.runner.cleanup()
        await self.service.close()
        if self.sim is not None:
            await self.sim.stop()


async def start_ivr(config: IvrConfig, channel: grpc.aio.Channel, *, host: str = "127.0.0.1",
                    port: int = 0, flows: Mapping[str, Flow] | None = None,
                    reuse_port: bool = False) -> RunningIvr:
    """Start the webhook service on host:port. `config.public_base_url` is what Twilio (or
    the simulator) signs against; when it is empty-ish, pass the bound address yourself."""
    service = IvrService(config, channel, flows)
    await service.start()
    try:
        runner, bound = await serve_app(service.app, host, port, ConnectionLimits(
            config.max_connections, config.connection_lifetime), reuse_port=reuse_port)
    except BaseException:
        await service.close()
        raise
    return RunningIvr(service, runner, f"http://{host}:{bound}")
