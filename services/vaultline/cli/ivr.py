"""`vaultline ivr serve`, `vaultline sim call` and `vaultline sim agent-call`: added to the
main parser by `add_ivr_commands(subparsers)`.

`ivr serve` reads (all `VAULTLINE_`-prefixed):
  IVR_PUBLIC_BASE_URL      the URL Twilio calls (signatures are checked against it)
  IVR_LISTEN               host:port to listen on (default 127.0.0.1:8080)
  TWILIO_ACCOUNT_SID, TWILIO_AUTH_TOKEN_FILE, TWILIO_API_BASE_URL (default Twilio's)
  DATABASE_URL             the IVR role's DSN (vaultline_ivr: its sessions only)
  IVR_SESSION_SECRET_FILE  >= 32 bytes; the same file on every replica
  IVR_CRM_SECRET_FILE      the CRM callbacks' HMAC key
  TOKENIZER_ADDRESS        host:port of the tokenizer; with TOKENIZER_CA, TOKENIZER_CERT,
                           TOKENIZER_KEY (the `ivr` client certificate) for mTLS
  IVR_FLOWS_DIR            default: the flows shipped with vaultline (ivr_flows/)
  PAY_CONNECTOR_CREDENTIALS_FILE
                           {"username", "password"} Twilio's Generic Pay Connector sends to
                           POST /pay/connector (HTTP Basic); unset: the endpoint answers 401
  PAY_CONNECTOR_TENANT     the tenant its cards are tokenized into (default: default)
  PAY_CONNECTOR_TOKEN_FORMAT  opaque (default), numeric or numeric_keep_bin
  PAY_CARD_TYPES           the card types each tenant accepts in agent-assisted captures,
                           e.g. "default=visa mastercard;demo=visa" (Twilio's ValidCardTypes
                           names; a tenant not listed gets visa mastercard amex)
  RECORDINGS_DIR           the recording vault's store: with RECORDINGS_APPROLE_FILE (the
                           `recordings` AppRole) and VAULT_ADDR, recording status callbacks
                           (POST /recordings/status) are ingested; unset: answered 503
  RECORDINGS_TENANT        the tenant of recorded calls the IVR never handled (default:
                           default)
  IVR_METRICS_LISTEN       host:port for Prometheus /metrics (unset: not served)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import logging
import os
import time
import urllib.request
from pathlib import Path
from typing import Any

from ..config import ConfigError, read_secret_file, read_stack, stack_file
from ..panel.links import request_id_for, sign_link
from ..resources import IVR_FLOWS_DIR
from ..twilio_sim import DEMO_CARD
from .common import add_worker_options, run_until_signalled, worker_count

__all__ = ["add_ivr_commands"]

log = logging.getLogger(__name__)


def _env(name: str, default: str | None = None) -> str:
    value = os.environ.get("VAULTLINE_" + name, default)
    if not value:
        raise ConfigError(f"VAULTLINE_{name} is not set")
    return value


_CARD_TYPE_NAMES = frozenset({"visa", "mastercard", "amex", "maestro", "discover", "optima",
                              "jcb", "diners-club", "enroute", "unionpay"})


def parse_card_types(text: str) -> dict[str, str]:
    """`tenant=type type;tenant=type` → {tenant: "type type"}; ConfigError naming the part."""
    out: dict[str, str] = {}
    for part in filter(None, (p.strip() for p in text.split(";"))):
        tenant, sep, types = part.partition("=")
        names = types.split()
        if not sep or not tenant.strip() or not names:
            raise ConfigError(f"VAULTLINE_PAY_CARD_TYPES: {part!r} is not tenant=type [type…]")
        unknown = [n for n in names if n not in _CARD_TYPE_NAMES]
        if unknown:
            raise ConfigError(f"VAULTLINE_PAY_CARD_TYPES: unknown card type {unknown[0]!r}")
        out[tenant.strip()] = " ".join(names)
    return out


def _recordings_config() -> dict[str, Any]:
    """The recording vault's IvrConfig settings from the environment (all or nothing)."""
    from ..vault import AppRoleCredentials

    directory = os.environ.get("VAULTLINE_RECORDINGS_DIR")
    if not directory:
        return {}
    approle = _env("RECORDINGS_APPROLE_FILE")
    try:
        credentials = AppRoleCredentials.from_file(approle)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"VAULTLINE_RECORDINGS_APPROLE_FILE: {exc}") from None
    return {"recordings_dir": Path(directory), "recordings_vault_addr": _env("VAULT_ADDR"),
            "recordings_credentials": credentials,
            "recordings_tenant": _env("RECORDINGS_TENANT", "default")}


def _ivr_config(metrics_listen: str | None) -> Any:
    from ..ivr.app import IvrConfig
    from ..ivr.connector import ConnectorCredentials

    connector_file = os.environ.get("VAULTLINE_PAY_CONNECTOR_CREDENTIALS_FILE")
    try:
        connector = (ConnectorCredentials.from_file(Path(connector_file))
                     if connector_file else None)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    return IvrConfig(
        public_base_url=_env("IVR_PUBLIC_BASE_URL"),
        account_sid=_env("TWILIO_ACCOUNT_SID"),
        auth_token=read_secret_file(Path(_env("TWILIO_AUTH_TOKEN_FILE"))).decode(),
        twilio_api_base_url=_env("TWILIO_API_BASE_URL", "https://api.twilio.com"),
        database_url=_env("DATABASE_URL"),
        session_secret=read_secret_file(Path(_env("IVR_SESSION_SECRET_FILE"))),
        crm_secret=read_secret_file(Path(_env("IVR_CRM_SECRET_FILE"))),
        flows_dir=Path(_env("IVR_FLOWS_DIR", str(IVR_FLOWS_DIR))),
        connector_credentials=connector,
        connector_tenant=_env("PAY_CONNECTOR_TENANT", "default"),
        connector_token_format=_env("PAY_CONNECTOR_TOKEN_FORMAT", "opaque"),
        card_types=parse_card_types(os.environ.get("VAULTLINE_PAY_CARD_TYPES", "")),
        **_recordings_config(),
        metrics_listen=metrics_listen,
    )


def _tokenizer_channel() -> Any:
    import grpc

    address = _env("TOKENIZER_ADDRESS")
    if os.environ.get("VAULTLINE_TOKENIZER_CA"):
        from ..security.tls import load_client_credentials

        return grpc.aio.secure_channel(address, load_client_credentials(
            _env("TOKENIZER_CA"), _env("TOKENIZER_CERT"), _env("TOKENIZER_KEY")))
    return grpc.aio.insecure_channel(address)


def cmd_ivr_serve(args: argparse.Namespace) -> int:
    from ..workers import Supervisor, reserve_port
    from .tokenizer import run_supervised

    listen = _env("IVR_LISTEN", "127.0.0.1:8080")
    if ":" not in listen:
        raise ConfigError("VAULTLINE_IVR_LISTEN must be host:port")
    metrics = os.environ.get("VAULTLINE_IVR_METRICS_LISTEN") or None
    _ivr_config(metrics)  # every variable checked before a worker starts
    count = worker_count(args)
    listen, reservation = reserve_port(listen)
    supervisor = Supervisor(
        "ivr", ivr_worker, (listen, args.verbose), count,
        status_file=Path(args.status_file) if args.status_file else None,
        metrics_listen=metrics)
    return run_supervised(supervisor, reservation, "ivr webhooks")


def ivr_worker(index: int, listen: str, verbose: bool, ready: Any) -> None:
    """One IVR worker process (spawned by `vaultline ivr serve`). Its state is in PostgreSQL
    (sessions, captures compare-and-set), so any worker answers any webhook."""
    from ..ivr.app import start_ivr
    from ..workers import WorkerReady
    from .common import setup_logging

    setup_logging(verbose)
    host, _, port = listen.rpartition(":")
    config = _ivr_config("127.0.0.1:0" if os.environ.get("VAULTLINE_IVR_METRICS_LISTEN")
                         else None)

    async def main() -> None:
        channel = _tokenizer_channel()
        running = await start_ivr(config, channel, host=host, port=int(port), reuse_port=True)
        log.info("ivr worker %d: webhooks on %s (public %s); flows: %s", index,
                 running.address, config.public_base_url,
                 ", ".join(sorted(running.service.flows)))
        ready.put(WorkerReady(index, os.getpid(), running.address,
                              running.service.metrics_address))
        try:
            await run_until_signalled()
        finally:
            await running.stop()
            await channel.close()

    asyncio.run(main())


def _stack(home: str) -> dict[str, Any]:
    info = read_stack(home)
    if info is None:
        raise ConfigError(
            f"no running dev stack ({stack_file(home)} not found): run `make run`"
        )
    if "ivr_base_url" not in info or "twilio_api_base_url" not in info:
        raise ConfigError("the running dev stack has no IVR (ivr_base_url missing)")
    return info


def cmd_sim_call(args: argparse.Namespace) -> int:
    info = _stack(args.home)
    base = info["ivr_base_url"].rstrip("/")
    script: list[dict[str, Any]] = []
    if args.card:
        script.append({"press": args.card + "#"})
    if args.expiry:
        script.append({"press": args.expiry})
    if args.cvv:
        script.append({"press": args.cvv})
    if args.postal:
        script.append({"press": args.postal + "#"})
    if args.confirm:
        script.append({"press": "1", "sensitive": False})
    spec = {"url": f"{base}/voice/{args.flow}", "status_callback": f"{base}/voice/status",
            "script": script, "record": not args.no_recording}
    request = urllib.request.Request(  # noqa: S310 a loopback URL from our own stack.json
        info["twilio_api_base_url"].rstrip("/") + "/_sim/calls",
        data=json.dumps(spec).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:  # noqa: S310
        result = json.loads(response.read())
    print(f"call {result['call_sid']} (flow {args.flow})\n")
    print(result["transcript"])
    print("\nrecording timeline:")
    for t, status in result["recording"]:
        print(f"  {t:7.1f}s  {status}")
    print(f"card digits pressed while recording: {result['card_digits_while_recording']}")
    events = result["crm_events"]
    if events:
        data = events[-1]["data"]
        print(f"\noutcome {data['outcome']}: token {data['token']} ({data['brand']} "
              f"ending {data['last4']}, expires {data['expiry_month']}/{data['expiry_year']})")
        return 0 if data["outcome"] == "success" else 1
    print("\nno CRM event received")
    return 1


def _sim_request(info: dict[str, Any], path: str, body: dict[str, Any] | None = None
                 ) -> dict[str, Any]:
    url = info["twilio_api_base_url"].rstrip("/") + path
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(  # noqa: S310 a loopback URL from our own stack.json
        url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:  # noqa: S310
        answer: dict[str, Any] = json.loads(response.read())
    return answer


_FIELD_LABELS = {0: "-", 1: "card number", 2: "expiry", 3: "security code", 4: "postal code"}
_STATE_LABELS = {1: "STARTED", 2: "CAPTURING", 3: "COMPLETED", 4: "FAILED", 5: "CANCELLED"}


def _agent_view(event: Any) -> str:
    """One capture event as the agent's screen shows it: masked progress only."""
    parts = [f"#{event.seq:<3} {_STATE_LABELS.get(event.state, '?'):<9}",
             _FIELD_LABELS.get(event.field, "?")]
    if event.digits_entered:
        parts.append("•" * event.digits_entered)
    if event.field_outcome:
        parts.append(f"[{event.field_outcome}]")
    if event.attempt > 1:
        parts.append(f"attempt {event.attempt}")
    if event.card.token:
        parts.append(f"token {event.card.token} (ending {event.card.last4},"
                     f" {event.card.expiry_month:02d}/{event.card.expiry_year})")
    if event.failure_reason:
        parts.append(f"reason {event.failure_reason}")
    return "  ".join(parts)


def cmd_sim_agent_call(args: argparse.Namespace) -> int:
    """Place a conference through the dev stack's simulator, start the capture as the CRM
    would (gRPC, crm identity) and print the agent's view as it happens."""
    from ..gen.capture.v1 import capture_pb2 as pb
    from ..gen.capture.v1 import capture_service_pb2_grpc as pb_grpc
    from .common import tokenizer_channel

    info = _stack(args.home)
    attempts = {"payment-card-number": [args.card], "expiration-date": [args.expiry]}
    if args.cvv:
        attempts["security-code"] = [args.cvv]
    if args.postal:
        attempts["postal-code"] = [args.postal]
    call_sid = _sim_request(info, "/_sim/agent-calls", {
        "attempts": attempts, "key_delays": {f: args.key_delay for f in attempts}})["call_sid"]
    print(f"conference placed: customer leg {call_sid} (the Payment goes on this leg)",
          flush=True)

    async def follow_keys(done: asyncio.Event) -> None:
        seen = 0
        started = time.monotonic()
        while not done.is_set():
            state = await asyncio.to_thread(_sim_request, info, f"/_sim/calls/{call_sid}")
            for press in state["presses"][seen:]:
                print(f"  {time.monotonic() - started:6.2f}s  customer pressed {press['key']}"
                      f"  (recording {press['recording']}, agent hears nothing)", flush=True)
            seen = len(state["presses"])
            if state["status"] == "completed":
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(done.wait(), 0.2)

    async def main() -> int:
        done = asyncio.Event()
        keys = asyncio.create_task(follow_keys(done))
        if args.hold:
            print("holding: start the capture from the CRM or the agent panel with this"
                  " CallSid; Ctrl-C to stop", flush=True)
            if info.get("panel_url") and info.get("panel_link_secret_file"):
                from .panel import read_link_secret

                query = sign_link(read_link_secret(Path(info["panel_link_secret_file"])),
                                  call_sid, args.agent, "default", int(time.time()) + 300)
                print(f"agent panel (link valid 5 minutes): {info['panel_url']}/panel?{query}",
                      flush=True)
            await keys
            return 0
        async with tokenizer_channel(args.home, args.as_) as channel:
            stub = pb_grpc.CaptureServiceStub(channel)
            capture = (await stub.StartCapture(pb.StartCaptureRequest(
                call_sid=call_sid, agent_id=args.agent, request_id=request_id_for("sim-", call_sid),
                fields=pb.CaptureFields(security_code=bool(args.cvv),
                                        postal_code=bool(args.postal))))).capture
            print(f"capture {capture.capture_id} started; the agent's view:", flush=True)
            last = None
            async for response in stub.WatchCapture(pb.WatchCaptureRequest(
                    capture_id=capture.capture_id)):
                last = response.event
                print("  " + _agent_view(last), flush=True)
        done.set()
        await keys
        # Paid: the customer hangs up, the conference ends, and its recording completes.
        await asyncio.to_thread(_sim_request, info, f"/_sim/calls/{call_sid}/hangup", {
            "status_callback": info["ivr_base_url"].rstrip("/") + "/voice/status"})
        state = await asyncio.to_thread(_sim_request, info, f"/_sim/calls/{call_sid}")
        print(f"\ntones heard by the agent: {state['tones_heard_by_agent']}")
        print(f"card digits keyed while recording: {state['card_digits_while_recording']}")
        print("recording timeline:")
        for t, status in state["recording"]:
            print(f"  {t:7.1f}s  {status}")
        if last is not None and last.state == pb.CAPTURE_STATE_COMPLETED:
            print(f"token: {last.card.token}")
            return 0
        print("no token: the capture did not complete")
        return 1

    return asyncio.run(main())


def _demo_expiry() -> str:
    return f"12{(dt.date.today().year + 3) % 100:02d}"


def add_ivr_commands(subparsers: Any) -> None:
    """Add `ivr serve` and `sim call` to the main `vaultline` parser's subparsers."""
    # The state directory is the main parser's --home (a subparser default would override it).
    ivr = subparsers.add_parser("ivr", help="the secure payment IVR webhook service")
    ivr_sub = ivr.add_subparsers(dest="ivr_command", required=True, metavar="SUBCOMMAND")
    serve = ivr_sub.add_parser(
        "serve", help="serve Twilio webhooks (config from VAULTLINE_*)",
        description="Serve the payment IVR's Twilio webhooks and the Generic Pay Connector "
        "endpoint. Configuration comes from the environment:\n\n"
        + "  " + __doc__.split("(all `VAULTLINE_`-prefixed):\n", 1)[1].strip(),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    add_worker_options(serve)
    serve.set_defaults(func=cmd_ivr_serve)

    sim = subparsers.add_parser("sim", help="the Twilio simulator of the dev stack")
    sim_sub = sim.add_subparsers(dest="sim_command", required=True, metavar="SUBCOMMAND")
    call = sim_sub.add_parser(
        "call",
        help="place a simulated call into a flow",
        description="Place a call through the running dev stack's Twilio simulator into "
        "POST {ivr_base_url}/voice/<flow>, key in the card, and print what the caller heard "
        "(digits masked), the call recording's state over time and the resulting token.",
    )
    call.add_argument("--flow", default="card_capture",
                      help="flow name (file in ivr_flows/); card_capture_pay takes the card "
                      "with Twilio's <Pay> and the Pay Connector")
    call.add_argument("--card", default=DEMO_CARD,
                      help="card number to key in (default: Visa's public test card)")
    call.add_argument("--expiry", default=_demo_expiry(), help="MMYY (default: December, "
                      "three years from now)")
    call.add_argument("--cvv", default="123", help="security code (default 123)")
    call.add_argument("--postal", help="postal code, for flows that ask for it")
    call.add_argument("--no-confirm", dest="confirm", action="store_false",
                      help="do not press 1 at the read-back")
    call.add_argument("--no-recording", action="store_true", help="an unrecorded call")
    call.set_defaults(func=cmd_sim_call)

    agent = sim_sub.add_parser(
        "agent-call",
        help="an agent-assisted capture: the agent stays on the call and never hears a tone",
        description="Place a conference (customer and agent legs) through the dev stack's "
        "Twilio simulator, start a capture on the customer's leg over gRPC as the CRM would "
        "(CaptureService, the crm identity), and print what the agent sees (masked "
        "progress), each key the customer presses (masked, with its time), the tones the "
        "agent heard (0), the recording timeline and the token. With --hold, only place "
        "the call and print its CallSid, so a CRM or the agent panel can start the capture; "
        "the simulated customer keys the card when asked.")
    agent.add_argument("--card", default=DEMO_CARD,
                       help="card number the customer keys (default: Visa's test card)")
    agent.add_argument("--expiry", default=_demo_expiry(), help="MMYY (default: December, "
                       "three years from now)")
    agent.add_argument("--cvv", help="security code; asked for only when given")
    agent.add_argument("--postal", help="postal code; asked for only when given")
    agent.add_argument("--agent", default="agent-demo", help="the agent label (audit trail)")
    agent.add_argument("--hold", action="store_true",
                       help="place the call and wait; do not start the capture")
    agent.add_argument("--key-delay", type=float, default=0.15, metavar="SECONDS",
                       help="real time between the customer's keys (default 0.15)")
    agent.add_argument("--as", dest="as_", default="crm", metavar="CLIENT",
                       help="the dev stack client that starts the capture (default crm)")
    agent.set_defaults(func=cmd_sim_agent_call)
