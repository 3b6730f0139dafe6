"""What every `vaultline` subcommand shares: the state directory, logging, running until Ctrl-C."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from pathlib import Path

__all__ = ["DEFAULT_HOME", "run_until_signalled", "setup_logging"]

DEFAULT_HOME = Path(os.environ.get("VAULTLINE_HOME", ".vaultline"))


def setup_logging(verbose: bool) -> None:
    from ..observability import setup_logging as setup

    setup(logging.DEBUG if verbose else logging.INFO)


async def run_until_signalled() -> None:
    """Return on SIGINT or SIGTERM (a long-running command's clean shutdown)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
