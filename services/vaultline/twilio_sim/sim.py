"""The Twilio simulator: calls (webhooks + TwiML interpretation) and the REST API side.

A call runs on a simulated clock: speech takes time by word count, each key 0.3 s, a Gather
that hears nothing its `timeout`. Every call keeps a timeline of what the caller heard,
which keys were pressed (and whether the recording was running at that moment), the
recording's status changes, webhook requests and REST requests. Pressed digits stay in
memory in the timeline; `transcript()` masks them.

REST paths served (HTTP Basic auth: Account SID / Auth Token, Twilio's error JSON on failure):

    POST /2010-04-01/Accounts/{AccountSid}/Calls/{CallSid}.json                    redirect
    POST /2010-04-01/Accounts/{AccountSid}/Calls/{CallSid}/Recordings.json         start
    GET  /2010-04-01/Accounts/{AccountSid}/Calls/{CallSid}/Recordings.json         list
    POST /2010-04-01/Accounts/{AccountSid}/Calls/{CallSid}/Recordings/{Sid}.json   update
    POST /2010-04-01/Accounts/{AccountSid}/Calls/{CallSid}/Payments.json           create
    POST /2010-04-01/Accounts/{AccountSid}/Calls/{CallSid}/Payments/{Sid}.json     update

Agent-assisted calls (`agent_call`) and the Payment resource are in `payments.py`, with the
`<Pay>` verb's capture and Pay Connector call (`pay_verb`): each field takes the script's next
item (keys ending with `#` where Twilio waits for one), invalid entries are re-prompted with
the matching `<Prompt errorType>` up to `maxAttempts`, and the action URL gets Twilio's
`Result`, `PaymentToken` and masked card fields.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import secrets
import time
import xml.etree.ElementTree as ET  # noqa: S405 TwiML comes from the service under test
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urljoin

import aiohttp
from aiohttp import web

from .payments import PaymentScript, SimPayments, twilio_error, twilio_time
from .recordings import SimRecordings
from .signature import sign

__all__ = ["Call", "Delay", "Event", "HangUp", "Press", "SimCall", "Timeout", "TwilioSim",
           "WaitForRedirect"]

API_VERSION = "2010-04-01"
KEY_SECONDS = 0.3
WORDS_PER_SECOND = 2.5


# ---- the caller's script ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Press:
    """Keys pressed at the next <Gather>; `sensitive` marks card data for timeline checks."""

    keys: str
    sensitive: bool = True

    def __repr__(self) -> str:
        return f"Press(<{len(self.keys)} keys>)"


@dataclass(frozen=True, slots=True)
class Timeout:
    """Say nothing at the next <Gather> until it times out."""


@dataclass(frozen=True, slots=True)
class HangUp:
    """Hang up at the next <Gather>."""


@dataclass(frozen=True, slots=True)
class WaitForRedirect:
    """In a conference or queue: wait (real seconds) for a REST redirect of this call."""

    seconds: float = 10.0


@dataclass(frozen=True, slots=True)
class Delay:
    """Wait this many real seconds before answering the next <Gather> (session expiry)."""

    seconds: float


ScriptItem = Press | Timeout | HangUp | WaitForRedirect | Delay


# ---- timeline --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Event:
    t: float
    kind: str  # heard | pressed | recording | webhook | rest | conference | enqueue | hangup …
    detail: str = ""
    recording: str | None = None  # the recording status at that moment
    sensitive: bool = False
    wall: float = 0.0  # real time (epoch seconds), for latency measurements

    def __repr__(self) -> str:
        detail = "*" * len(self.detail) if self.kind == "pressed" else self.detail
        return f"Event({self.t:.1f}s {self.kind} {detail!r} rec={self.recording})"


@dataclass
class SimCall:
    sid: str
    account_sid: str
    from_: str
    to: str
    recording_sid: str | None = None
    recording: str | None = None  # in-progress | paused | stopped | None (not recorded)
    pause_behavior: str | None = None
    clock: float = 0.0
    status: str = "ringing"
    ended_by: str = ""  # caller | twiml | end-of-twiml | error
    timeline: list[Event] = field(default_factory=list)
    redirects: asyncio.Queue[tuple[str, str]] = field(default_factory=asyncio.Queue)
    responses: list[str] = field(default_factory=list)  # every TwiML document received
    agent: SimCall | None = None  # the agent's leg of a conference with this (customer) call

    def tones_heard_by_agent(self) -> int:
        """Keypad tones the agent's leg heard: Twilio suppresses them during a Payment."""
        return 0 if self.agent is None else len(self.agent.events("tone"))

    def add(self, kind: str, detail: str = "", *, sensitive: bool = False) -> None:
        self.timeline.append(Event(self.clock, kind, detail, self.recording, sensitive,
                                   time.time()))

    # what tests ask
    def heard(self) -> list[str]:
        return [e.detail for e in self.timeline if e.kind == "heard"]

    def events(self, kind: str) -> list[Event]:
        return [e for e in self.timeline if e.kind == kind]

    def recording_timeline(self) -> list[tuple[float, str]]:
        return [(e.t, e.detail) for e in self.timeline if e.kind == "recording"]

    def sensitive_presses_while_recording(self) -> list[Event]:
        """Card-data key presses made while the recording was running: must be empty."""
        return [e for e in self.timeline
                if e.kind == "pressed" and e.sensitive and e.recording == "in-progress"]

    def transcript(self) -> str:
        lines = []
        for e in self.timeline:
            if e.kind == "pressed":
                shown = "".join("*" if c.isdigit() else c for c in e.detail)
                lines.append(f"{e.t:7.1f}s  caller pressed {shown}   (recording {e.recording})")
            elif e.kind == "heard":
                lines.append(f"{e.t:7.1f}s  caller heard: {e.detail}")
            else:
                lines.append(f"{e.t:7.1f}s  [{e.kind}] {e.detail}")
        return "\n".join(lines)


Call = SimCall


def _sid(prefix: str) -> str:
    return prefix + secrets.token_hex(16)


# ---- the simulator ---------------------------------------------------------------------------


class TwilioSim:
    """Use inside a running loop: `await sim.start()`, `await sim.call(...)`, `await sim.stop()`.

    `route` maps public base URLs (what gets signed) to where the webhook really listens,
    as a TLS-terminating proxy would.
    """

    def __init__(self, account_sid: str | None = None, auth_token: str | None = None, *,
                 route: Mapping[str, str] | None = None) -> None:
        self.account_sid = account_sid or _sid("AC")
        self.auth_token = auth_token or secrets.token_hex(16)
        self.route = dict(route or {})
        self.calls: dict[str, SimCall] = {}
        self.rest_requests: list[tuple[str, str, dict[str, str]]] = []
        self.recording_fault: int | None = None  # answer Recordings updates with this status
        # A broken recording set-up (tests): pause requests are answered but the recording
        # keeps running — what a flow that forgets to pause does to the audio.
        self.pauses_ignored = False
        self.webhook_timeout = 15.0  # Twilio's default for voice webhooks
        self._runner: web.AppRunner | None = None
        self._http: aiohttp.ClientSession | None = None
        self.rest_base_url = ""
        self.crm_events: list[dict[str, Any]] = []  # what the demo CRM sink received
        self.payments = SimPayments(self)
        self.recordings = SimRecordings(self)

    def __repr__(self) -> str:
        return f"TwilioSim(account_sid={self.account_sid}, rest={self.rest_base_url})"

    # ---- lifecycle ----------------------------------------------------------------------------

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        self._http = aiohttp.ClientSession()
        app = web.Application()
        base = f"/{API_VERSION}/Accounts/{{account}}/Calls/{{call}}"
        recordings = f"/{API_VERSION}/Accounts/{{account}}/Recordings/{{rec}}"
        app.add_routes([
            web.post("/v1/Credentials/PublicKeys", self.recordings.register_key),
            web.get(recordings, self.recordings.get),
            web.delete(recordings, self.recordings.delete),
            web.post(base + "/Recordings/{rec}.json", self._rest_recording_update),
            web.post(base + "/Recordings.json", self._rest_recording_create),
            web.get(base + "/Recordings.json", self._rest_recording_list),
            web.post(base + ".json", self._rest_call_update),
            web.post(base + "/Payments.json", self.payments.create),
            web.post(base + "/Payments/{payment}.json", self.payments.update),
            # Not Twilio: control paths so `vaultline sim call` (another process) can place a
            # call through this simulator, and a demo CRM sink for the dev stack.
            web.post("/_sim/calls", self._control_call),
            web.post("/_sim/agent-calls", self._control_agent_call),
            web.get("/_sim/calls/{call}", self._control_call_state),
            web.post("/_sim/calls/{call}/hangup", self._control_hang_up),
            web.get("/_sim/payments", self.payments.listing),
            web.post("/_sim/recordings", self.recordings.control_synthetic),
            web.get("/_sim/recordings", self.recordings.control_state),
            web.post("/_sim/crm", self._crm_sink),
        ])
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port)
        await site.start()
        bound = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.rest_base_url = f"http://{host}:{bound}"
        return self.rest_base_url

    async def stop(self) -> None:
        await self.payments.drain()
        if self._runner is not None:
            await self._runner.cleanup()
        if self._http is not None:
            await self._http.close()

    # ---- webhooks -----------------------------------------------------------------------------

    def call_params(self, call: SimCall) -> dict[str, str]:
        return {
            "AccountSid": self.account_sid, "CallSid": call.sid, "From": call.from_,
            "To": call.to, "Caller": call.from_, "Called": call.to,
            "CallStatus": call.status, "Direction": "inbound", "ApiVersion": API_VERSION,
            "FromCountry": "US", "ToCountry": "US",
        }

    def _target(self, url: str) -> str:
        for public, real in self.route.items():
            if url.startswith(public):
                return real + url[len(public):]
        return url

    async def post(self, url: str, params: Mapping[str, str] | Sequence[tuple[str, str]], *,
                   signature: str | None = None) -> tuple[int, str]:
        """A form POST as Twilio sends it, signed unless `signature` is given ('' = none)."""
        assert self._http is not None, "start() the simulator first"
        pairs = list(params.items()) if isinstance(params, Mapping) else list(params)
        headers = {"User-Agent": "TwilioProxy/1.1", "I-Twilio-Idempotency-Token":
                   secrets.token_hex(16)}
        sig = sign(self.auth_token, url, pairs) if signature is None else signature
        if sig:
            headers["X-Twilio-Signature"] = sig
        timeout = aiohttp.ClientTimeout(total=self.webhook_timeout)
        async with self._http.post(self._target(url), data=pairs, headers=headers,
                                   timeout=timeout) as response:
            return response.status, await response.text()

    async def call(self, url: str | None, script: Sequence[ScriptItem] = (), *,
                   twiml: str | None = None, from_: str = "+14155550100",
                   to: str = "+18005550199", record: bool = True,
                   status_callback: str | None = None) -> SimCall:
        """Place an inbound call to `url` (or start it on `twiml`) and run it to its end."""
        call = self.new_call(from_=from_, to=to, record=record)
        await self.run(call, url, script, twiml=twiml, status_callback=status_callback)
        return call

    def agent_call(self, script: PaymentScript, *, record: bool = True,
                   from_: str = "+14155550100", to: str = "+18005550199") -> SimCall:
        """A live conference: the customer's PSTN leg (recorded, in progress; returned) and
        an agent's leg (`call.agent`). The customer keys what `script` says when a Payment
        asks for each field."""
        call = self.new_call(from_=from_, to=to, record=record)
        call.status = "in-progress"
        call.add("conference", "customer joined")
        # The conversation before the card (in the recording, as speech).
        call.add("heard", "Agent: thanks for calling, how can I help you today?")
        call.clock += 3.0
        agent = SimCall(_sid("CA"), self.account_sid, "client:agent", to, status="in-progress")
        agent.add("conference", "agent joined")
        call.agent = agent
        self.calls[agent.sid] = agent
        self.payments.scripts[call.sid] = script
        return call

    async def hang_up(self, call: SimCall, status_callback: str | None = None) -> None:
        """The customer hangs up a live (conference) call: Twilio's status callback follows."""
        if call.agent is not None and call.status == "in-progress":
            call.add("heard", "Agent: that's all done, thank you. Goodbye.")
            call.clock += 2.0
        call.status = "completed"
        call.ended_by = "caller"
        call.add("hangup", "caller")
        if status_callback:
            await self._call_completed(call, status_callback)
        await self._recording_done(call)

    async def _recording_done(self, call: SimCall) -> None:
        """A recorded call has ended: its recording completes (rendered, encrypted, announced)
        when the account has a recording status callback or an encryption key set up."""
        if call.recording_sid and (self.recordings.status_callback
                                   or self.recordings.current_key):
            await self.recordings.finish(call)

    async def _call_completed(self, call: SimCall, status_callback: str) -> None:
        """Twilio's call status callback for a call that has ended."""
        params = {**self.call_params(call), "CallDuration": str(int(call.clock)),
                  "CallbackSource": "call-progress-events", "SequenceNumber": "0",
                  "Timestamp": twilio_time()}
        status, _ = await self.post(status_callback, params)
        call.add("status-callback", f"completed -> {status}")

    def press_in_conference(self, call: SimCall, keys: str) -> None:
        """The customer presses keys with no Payment capturing them: a conference carries
        the tones to everyone on it, the agent included (what a Payment prevents)."""
        for key in keys:
            call.clock += KEY_SECONDS
            call.add("pressed", key, sensitive=False)
            if call.agent is not None:
                call.agent.clock = call.clock
                call.agent.add("tone", "*")  # the tone, never which key

    def new_call(self, *, from_: str = "+14155550100", to: str = "+18005550199",
                 record: bool = True) -> SimCall:
        call = SimCall(_sid("CA"), self.account_sid, from_, to)
        if record:
            call.recording_sid, call.recording = _sid("RE"), "in-progress"
            call.add("recording", "in-progress")
        self.calls[call.sid] = call
        return call

    async def run(self, call: SimCall, url: str | None, script: Sequence[ScriptItem] = (), *,
                  twiml: str | None = None, status_callback: str | None = None) -> None:
        todo = list(script)
        doc: str | None = twiml
        current = url or ""
        try:
            if doc is None:
                assert url is not None
                doc = await self._fetch(call, url, {})
                call.status = "in-progress"
            else:
                call.status = "in-progress"
            while doc is not None:
                doc, current = await self._execute(call, doc, current, todo)
        finally:
            call.status = "completed"
            call.add("hangup", call.ended_by or "end-of-twiml")
            if status_callback:
                await self._call_completed(call, status_callback)
            await self._recording_done(call)

    async def _fetch(self, call: SimCall, url: str, extra: Mapping[str, str]) -> str | None:
        params = {**self.call_params(call), **extra}
        status, body = await self.post(url, params)
        call.add("webhook", f"POST {url} -> {status}")
        if status != 200:
            call.add("heard", "An application error has occurred. Goodbye.")
            call.ended_by = "error"
            return None
        call.responses.append(body)
        return body

    async def _execute(self, call: SimCall, doc: str, url: str,
                       todo: list[ScriptItem]) -> tuple[str | None, str]:
        """Run one TwiML document; returns the next document to run (and its URL) or None."""
        root = ET.fromstring(doc)  # noqa: S314 our own service's answer, in tests and demos
        if root.tag != "Response":
            call.add("error", f"not TwiML: <{root.tag}>")
            call.ended_by = "error"
            return None, url
        for verb in root:
            tag = verb.tag
            if tag in ("Say", "Play", "Pause"):
                self._speak(call, verb)
            elif tag == "Gather":
                for child in verb:
                    self._speak(call, child)
                item = todo.pop(0) if todo else HangUp()
                while isinstance(item, Delay):
                    await asyncio.sleep(item.seconds)
                    call.clock += item.seconds
                    item = todo.pop(0) if todo else HangUp()
                result = self._gather(call, verb, item)
                if result is None:
                    call.ended_by = "caller"
                    return None, url
                if result or verb.get("actionOnEmptyResult") == "true":
                    action = urljoin(url, verb.get("action") or url)
                    nxt = await self._fetch(call, action, result)
                    return nxt, action
                # no input and no actionOnEmptyResult: fall through to the next verb
            elif tag == "Pay":
                params = await self.payments.pay_verb(
                    call, verb, functools.partial(self._next_item, call, todo))
                action = urljoin(url, verb.get("action") or url)
                nxt = await self._fetch(call, action, params)
                if params.get("Result") == "caller-hung-up":
                    call.ended_by = "caller"
                    return None, url
                return nxt, action
            elif tag == "Redirect":
                target = urljoin(url, (verb.text or "").strip())
                call.add("redirect", target)
                return await self._fetch(call, target, {}), target
            elif tag == "Hangup":
                call.ended_by = "twiml"
                return None, url
            elif tag in ("Dial", "Enqueue"):
                if tag == "Enqueue":
                    call.add("enqueue", (verb.text or "").strip())
                else:
                    for child in verb:
                        call.add(child.tag.lower(), (child.text or "").strip())
                    if len(verb) == 0:
                        call.add("dial", (verb.text or "").strip())
                return await self._wait_for_redirect(call, todo)
            else:
                call.add("error", f"unsupported verb <{tag}>")
        call.ended_by = "end-of-twiml"
        return None, url

    @staticmethod
    async def _next_item(call: SimCall, todo: list[ScriptItem]) -> str | None:
        """The keys of the script's next item for a <Pay> field: "" for silence, None for a
        hang-up (or an exhausted script)."""
        item = todo.pop(0) if todo else HangUp()
        while isinstance(item, Delay):
            await asyncio.sleep(item.seconds)
            call.clock += item.seconds
            item = todo.pop(0) if todo else HangUp()
        if isinstance(item, Press):
            return item.keys
        if isinstance(item, Timeout):
            return ""
        return None

    def _speak(self, call: SimCall, verb: ET.Element) -> None:
        if verb.tag == "Say":
            text = (verb.text or "").strip()
            call.add("heard", text)
            call.clock += max(1.0, len(text.split()) / WORDS_PER_SECOND)
        elif verb.tag == "Play":
            call.add("heard", f"[audio {(verb.text or '').strip()}]")
            call.clock += 3.0
        elif verb.tag == "Pause":
            call.clock += float(verb.get("length", "1"))

    def _gather(self, call: SimCall, verb: ET.Element, item: ScriptItem
                ) -> dict[str, str] | None:
        """The Digits/FinishedOnKey a Gather reports, {} for nothing, None if hung up."""
        finish = verb.get("finishOnKey", "#")
        num = int(verb.get("numDigits", "0") or 0)
        timeout = float(verb.get("timeout", "5"))
        if isinstance(item, HangUp | WaitForRedirect | Delay):
            return None
        if isinstance(item, Timeout):
            call.clock += timeout
            call.add("silence", f"gather timed out after {timeout:g}s")
            return {}
        digits, finished = "", ""
        for key in item.keys:
            call.clock += KEY_SECONDS
            call.add("pressed", key, sensitive=item.sensitive)
            if finish and key == finish:
                finished = key
                break
            digits += key
            if num and len(digits) >= num:
                break
        else:
            if not finished and not (num and len(digits) >= num):
                call.clock += timeout  # stopped pressing: the Gather waits out its timeout
        if not digits and not finished:
            return {}
        return {"Digits": digits, "FinishedOnKey": finished}

    async def _wait_for_redirect(self, call: SimCall, todo: list[ScriptItem]
                                 ) -> tuple[str | None, str]:
        if not todo or not isinstance(todo[0], WaitForRedirect):
            call.ended_by = "caller"
            return None, ""
        item = todo.pop(0)
        assert isinstance(item, WaitForRedirect)
        try:
            url, _method = await asyncio.wait_for(call.redirects.get(), item.seconds)
        except TimeoutError:
            call.ended_by = "caller"
            return None, ""
        return await self._fetch(call, url, {}), url

    # ---- control (not Twilio) -----------------------------------------------------------------

    async def _control_call(self, request: web.Request) -> web.Response:
        """Run a scripted call here and answer its timeline (digits masked) as JSON."""
        if request.remote not in ("127.0.0.1", "::1"):
            return web.Response(status=403)
        spec = await request.json()
        script: list[ScriptItem] = []
        for item in spec.get("script", []):
            if "press" in item:
                script.append(Press(str(item["press"]), bool(item.get("sensitive", True))))
            elif item.get("timeout"):
                script.append(Timeout())
            elif item.get("hangup"):
                script.append(HangUp())
        call = await self.call(spec["url"], script, record=bool(spec.get("record", True)),
                               status_callback=spec.get("status_callback"))
        return web.json_response({
            "call_sid": call.sid, "ended_by": call.ended_by, "transcript": call.transcript(),
            "recording": call.recording_timeline(),
            "card_digits_while_recording": len(call.sensitive_presses_while_recording()),
            "crm_events": [e for e in self.crm_events
                           if e.get("data", {}).get("call_sid") == call.sid],
        })

    async def _control_hang_up(self, request: web.Request) -> web.Response:
        """The customer of a live call hangs up (`{"status_callback": url}` optional): the
        call's status callback follows, and its recording completes."""
        if request.remote not in ("127.0.0.1", "::1"):
            return web.Response(status=403)
        call = self.calls.get(request.match_info["call"])
        if call is None:
            return web.Response(status=404)
        spec = await request.json() if request.can_read_body else {}
        if call.status != "completed":
            await self.hang_up(call, spec.get("status_callback") or None)
        return web.json_response({"status": call.status})

    async def _control_agent_call(self, request: web.Request) -> web.Response:
        """Place a conference (customer + agent legs) whose customer keys `attempts`."""
        if request.remote not in ("127.0.0.1", "::1"):
            return web.Response(status=403)
        spec = await request.json()
        attempts = {str(k): [str(a) for a in v] for k, v in spec.get("attempts", {}).items()}
        delays = {str(k): float(v) for k, v in spec.get("key_delays", {}).items()}
        call = self.agent_call(PaymentScript(attempts, delays),
                               record=bool(spec.get("record", True)))
        return web.json_response({"call_sid": call.sid})

    async def _control_call_state(self, request: web.Request) -> web.Response:
        """A call's timeline so far, keys masked (a CLI in another process follows it)."""
        if request.remote not in ("127.0.0.1", "::1"):
            return web.Response(status=403)
        call = self.calls.get(request.match_info["call"])
        if call is None:
            return web.Response(status=404)
        presses = [{"t": round(e.t, 1), "key": "*" if e.detail.isdigit() else e.detail,
                    "recording": e.recording, "wall": e.wall} for e in call.events("pressed")]
        return web.json_response({
            "status": call.status, "presses": presses, "recording": call.recording_timeline(),
            "tones_heard_by_agent": call.tones_heard_by_agent(),
            "card_digits_while_recording": len(call.sensitive_presses_while_recording()),
        })

    async def _crm_sink(self, request: web.Request) -> web.Response:
        body = await request.json()
        if isinstance(body, dict):
            self.crm_events.append(body)
            del self.crm_events[:-1000]
        return web.Response(status=200)

    # ---- REST ---------------------------------------------------------------------------------

    def _authorised(self, request: web.Request) -> bool:
        header = request.headers.get("Authorization", "")
        if not header.startswith("Basic "):
            return False
        try:
            user, _, password = base64.b64decode(header[6:]).decode().partition(":")
        except (ValueError, UnicodeDecodeError):
            return False
        # The accounts API (Credentials/PublicKeys) names no account in its path.
        return (user == self.account_sid
                and request.match_info.get("account", self.account_sid) == self.account_sid
                and secrets.compare_digest(password, self.auth_token))

    async def _rest_common(self, request: web.Request
                           ) -> tuple[SimCall | None, dict[str, str], web.Response | None]:
        form = {k: str(v) for k, v in (await request.post()).items()}
        self.rest_requests.append((request.method, request.path, form))
        if not self._authorised(request):
            return None, form, twilio_error(401, 20003, "Authenticate")
        call = self.calls.get(request.match_info["call"])
        if call is None:
            return None, form, twilio_error(404, 20404, "The requested resource "
                                             f"{request.path} was not found")
        call.add("rest", f"{request.method} {request.path.split('/Calls/')[1]} "
                         + " ".join(f"{k}={v}" for k, v in sorted(form.items())))
        return call, form, None

    def _recording_json(self, call: SimCall) -> dict[str, Any]:
        now = twilio_time()
        return {
            "account_sid": self.account_sid, "api_version": API_VERSION, "call_sid": call.sid,
            "conference_sid": None, "channels": 1, "date_created": now, "date_updated": now,
            "start_time": now, "duration": "-1", "sid": call.recording_sid, "price": None,
            "price_unit": "USD", "status": call.recording, "source": "StartCallRecordingAPI",
            "error_code": None, "encryption_details": None, "track": "both",
            "uri": f"/{API_VERSION}/Accounts/{self.account_sid}/Calls/{call.sid}/Recordings/"
                   f"{call.recording_sid}.json",
        }

    async def _rest_recording_list(self, request: web.Request) -> web.Response:
        """A call's recordings, one page, as Twilio lists them (the one the call has)."""
        call, _, error = await self._rest_common(request)
        if error is not None:
            return error
        assert call is not None
        path = request.path
        recordings = [] if call.recording is None else [self._recording_json(call)]
        return web.json_response({
            "recordings": recordings, "start": 0, "end": max(len(recordings) - 1, 0),
            "page": 0, "page_size": 50, "uri": path, "first_page_uri": path + "?PageSize=50&Page=0",
            "next_page_uri": None, "previous_page_uri": None,
        })

    async def _rest_recording_update(self, request: web.Request) -> web.Response:
        call, form, error = await self._rest_common(request)
        if error is not None:
            return error
        assert call is not None
        if self.recording_fault is not None:
            return twilio_error(self.recording_fault, 20500 if self.recording_fault != 404
                                 else 20404, "Internal Server Error")
        rec = request.match_info["rec"]
        if call.recording is None or call.recording == "stopped" or (
                rec != "Twilio.CURRENT" and rec != call.recording_sid):
            return twilio_error(404, 20404, "The requested resource was not found")
        status = form.get("Status", "")
        behavior = form.get("PauseBehavior")
        if status not in ("paused", "in-progress", "stopped"):
            return twilio_error(400, 21220, "Invalid Status")
        if behavior is not None and (status != "paused" or behavior not in ("skip", "silence")):
            return twilio_error(400, 21220, "Invalid PauseBehavior")
        if self.pauses_ignored and status == "paused":
            call.add("rest", "pause answered but ignored (broken recording set-up)")
            return web.json_response({**self._recording_json(call), "status": "paused"})
        call.recording = status
        call.pause_behavior = (behavior or "silence") if status == "paused" else None
        call.add("recording", status + (f" ({call.pause_behavior})" if status == "paused"
                                        else ""))
        return web.json_response(self._recording_json(call))

    async def _rest_recording_create(self, request: web.Request) -> web.Response:
        call, _form, error = await self._rest_common(request)
        if error is not None:
            return error
        assert call is not None
        call.recording_sid, call.recording = _sid("RE"), "in-progress"
        call.add("recording", "in-progress")
        return web.json_response(self._recording_json(call), status=201)

    async def _rest_call_update(self, request: web.Request) -> web.Response:
        call, form, error = await self._rest_common(request)
        if error is not None:
            return error
        assert call is not None
        if "Url" in form:
            call.add("redirected", form["Url"])
            await call.redirects.put((form["Url"], form.get("Method", "POST")))
        now = twilio_time()
        return web.json_response({
            "sid": call.sid, "account_sid": self.account_sid, "to": call.to,
            "from": call.from_, "status": call.status, "direction": "inbound",
            "api_version": API_VERSION, "date_created": now, "date_updated": now,
            "uri": f"/{API_VERSION}/Accounts/{self.account_sid}/Calls/{call.sid}.json",
        })

