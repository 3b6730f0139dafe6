"""Dev stack wiring for the agent panel: its link secret (a 0600 file in `dev_dir`) and the
panel on loopback, plain http (so its cookies are not `Secure`: dev only)."""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Any

import grpc

from ..panel.app import PanelConfig, RunningPanel, start_panel

__all__ = ["LINK_SECRET_FILE", "start_dev_panel"]

LINK_SECRET_FILE = "panel-link-secret"  # noqa: S105 - a file name


async def start_dev_panel(dev_dir: Path, channel: grpc.aio.Channel, *, host: str = "127.0.0.1",
                          port: int = 0) -> tuple[RunningPanel, dict[str, Any]]:
    """The running panel and the keys it adds to stack.json."""
    secret_file = dev_dir / LINK_SECRET_FILE
    if not secret_file.exists():
        fd = os.open(secret_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(secrets.token_urlsafe(32) + "\n")
    secret = secret_file.read_text(encoding="utf-8").strip().encode("utf-8")
    running = await start_panel(PanelConfig(link_secret=secret, secure_cookies=False),
                                channel, host=host, port=port)
    return running, {"panel_url": running.url, "panel_link_secret_file": str(secret_file)}
