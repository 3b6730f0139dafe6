"""`vaultline ivr serve` and `vaultline sim call`: added to the main parser by
`add_ivr_commands(subparsers)`.

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
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import urllib.request
from pathlib import Path
from typing import Any

from ..config import ConfigError, read_secret_file, read_stack, stack_file
from ..resources import IVR_FLOWS_DIR
from ..twilio_sim import DEMO_CARD
from .common import run_until_signalled

__all__ = ["add_ivr_commands"]


def _env(name: str, default: str | None = None) -> str:
    value = os.environ.get("VAULTLINE_" + name, default)
    if not value:
        raise ConfigError(f"VAULTLINE_{name} is not set")
    return value


def cmd_ivr_serve(args: argparse.Namespace) -> int:
    import grpc

    from ..ivr.app import IvrConfig, start_ivr
    from ..ivr.connector import ConnectorCredentials

    host, _, port = _env("IVR_LISTEN", "127.0.0.1:8080").rpartition(":")
    connector_file = os.environ.get("VAULTLINE_PAY_CONNECTOR_CREDENTIALS_FILE")
    try:
        connector = (ConnectorCredentials.from_file(Path(connector_file))
                     if connector_file else None)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    config = IvrConfig(
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
    )

    async def main() -> None:
        address = _env("TOKENIZER_ADDRESS")
        if os.environ.get("VAULTLINE_TOKENIZER_CA"):
            from ..security.tls import load_client_credentials

            channel = grpc.aio.secure_channel(address, load_client_credentials(
                _env("TOKENIZER_CA"), _env("TOKENIZER_CERT"), _env("TOKENIZER_KEY")))
        else:
            channel = grpc.aio.insecure_channel(address)
        running = await start_ivr(config, channel, host=host, port=int(port))
        print(f"ivr webhooks on {running.address} (public {config.public_base_url}); "
              f"flows: {', '.join(sorted(running.service.flows))}", flush=True)
        try:
            await run_until_signalled()
        finally:
            await running.stop()
            await channel.close()

    asyncio.run(main())
    return 0


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
    call.add_argument("--flow", default="card_capture", help="flow name (file in ivr_flows/)")
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
