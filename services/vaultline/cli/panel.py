"""`vaultline panel serve|link`: the agent panel web app, and sign-in links for it.

`panel serve` reads its configuration from the environment (all `VAULTLINE_`-prefixed):

  PANEL_LISTEN             host:port to serve on (default 127.0.0.1:8070)
  PANEL_LINK_SECRET_FILE   the secret shared with the CRM that signs panel links (its text,
                           surrounding whitespace stripped; at least 32 bytes). Required.
  PANEL_FRAME_ANCESTORS    the CRM origin(s) allowed to embed the panel in a frame, as CSP
                           `frame-ancestors` sources (default 'none': no framing)
  PANEL_INSECURE_COOKIES   1: session cookies without `Secure`, for plain http on loopback
                           only (the dev stack); behind TLS, leave it unset
  GRPC_ADDRESS, CA_FILE    the tokenizer and its CA (else the running dev stack's)
  CLIENT_CERT, CLIENT_KEY  the panel's `crm` client identity (else the dev stack's `crm`)

The panel holds no database credentials and no card data: it calls CaptureService only.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
from pathlib import Path
from typing import Any

from ..config import ConfigError, env_or_stack, read_secret_file
from ..panel.links import MAX_LINK_SECONDS, sign_link
from .common import run_until_signalled, tokenizer_channel

__all__ = ["add_panel_commands", "read_link_secret"]


def read_link_secret(path: Path) -> bytes:
    """The link secret as both sides use it: the file's text, whitespace stripped, UTF-8."""
    secret = read_secret_file(path).decode("utf-8", "replace").strip().encode("utf-8")
    if len(secret) < 32:
        raise ConfigError(f"{path}: the panel link secret must be at least 32 bytes")
    return secret


def cmd_panel_serve(args: argparse.Namespace) -> int:
    from ..panel.app import PanelConfig, start_panel

    secret_file = os.environ.get("VAULTLINE_PANEL_LINK_SECRET_FILE")
    if not secret_file:
        raise ConfigError("VAULTLINE_PANEL_LINK_SECRET_FILE is not set")
    host, _, port = os.environ.get("VAULTLINE_PANEL_LISTEN", "127.0.0.1:8070").rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError("VAULTLINE_PANEL_LISTEN must be host:port")
    config = PanelConfig(
        link_secret=read_link_secret(Path(secret_file)),
        secure_cookies=os.environ.get("VAULTLINE_PANEL_INSECURE_COOKIES") != "1",
        frame_ancestors=os.environ.get("VAULTLINE_PANEL_FRAME_ANCESTORS", "'none'"),
    )

    async def main() -> None:
        async with tokenizer_channel(args.home, "crm") as channel:
            running = await start_panel(config, channel, host=host, port=int(port))
            print(f"agent panel on {running.url}/panel", flush=True)
            try:
                await run_until_signalled()
            finally:
                await running.stop()

    asyncio.run(main())
    return 0


def cmd_panel_link(args: argparse.Namespace) -> int:
    url = env_or_stack("VAULTLINE_PANEL_URL", args.home, "panel_url")
    secret = read_link_secret(Path(env_or_stack(
        "VAULTLINE_PANEL_LINK_SECRET_FILE", args.home, "panel_link_secret_file")))
    if not 1 <= args.ttl <= MAX_LINK_SECONDS:
        raise ConfigError(f"--ttl must be 1-{MAX_LINK_SECONDS} seconds")
    query = sign_link(secret, args.call, args.agent, args.tenant, int(time.time()) + args.ttl)
    print(f"{url.rstrip('/')}/panel?{query}")
    return 0


def add_panel_commands(subparsers: Any) -> None:
    """Add `panel serve` and `panel link` to the main `vaultline` parser's subparsers."""
    panel = subparsers.add_parser("panel", help="the agent panel (a web page for agents)")
    sub = panel.add_subparsers(dest="panel_command", required=True, metavar="SUBCOMMAND")
    serve = sub.add_parser(
        "serve", help="serve the agent panel (config from VAULTLINE_*)",
        description="Serve the agent panel: the page an agent opens from the CRM during a "
        "call to take a card without hearing or seeing it. Configuration comes from the "
        "environment:\n\n  " + (__doc__ or "").split("(all `VAULTLINE_`-prefixed):\n", 1)[1]
        .strip(), formatter_class=argparse.RawDescriptionHelpFormatter)
    serve.set_defaults(func=cmd_panel_serve)
    link = sub.add_parser(
        "link", help="print a signed sign-in link to the panel (as a CRM would make)",
        description="Print a panel link for a call and an agent, signed with the panel's "
        "link secret (VAULTLINE_PANEL_URL and VAULTLINE_PANEL_LINK_SECRET_FILE, else the "
        "running dev stack's panel_url and panel_link_secret_file). Open it in a browser.")
    link.add_argument("--call", required=True, help="the customer leg's CallSid (CA…)")
    link.add_argument("--agent", required=True, help="the agent's label for the audit trail "
                      "(letters, digits, . _ ~ -; no long digit runs)")
    link.add_argument("--tenant", default="default", help="the tenant (default: default)")
    link.add_argument("--ttl", type=int, default=300,
                      help=f"seconds the link stays valid (default 300, at most "
                      f"{MAX_LINK_SECONDS})")
    link.set_defaults(func=cmd_panel_link)
