"""What every `vaultline` subcommand shares: the state directory, logging, running until Ctrl-C."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

__all__ = ["DEFAULT_HOME", "describe_rpc_error", "run_until_signalled", "setup_logging",
           "tokenizer_channel"]

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


def client_identity_files(home: str | Path, who: str) -> tuple[Path, Path]:
    """The mTLS client certificate and key to call as: VAULTLINE_CLIENT_CERT and
    VAULTLINE_CLIENT_KEY if both are set, else the dev stack's client `who`."""
    from ..config import client_files

    cert, key = os.environ.get("VAULTLINE_CLIENT_CERT"), os.environ.get("VAULTLINE_CLIENT_KEY")
    if cert and key:
        return Path(cert), Path(key)
    return client_files(home, who)


@contextlib.asynccontextmanager
async def tokenizer_channel(home: str | Path, who: str) -> AsyncIterator[Any]:
    """A gRPC channel to the tokenizer (VAULTLINE_GRPC_ADDRESS or the dev stack) over mTLS,
    as client `who`: its private key proves the identity, not just its certificate."""
    import grpc

    from ..config import ConfigError, env_or_stack
    from ..security.tls import load_client_credentials

    ca = env_or_stack("VAULTLINE_CA_FILE", home, "ca")
    address = env_or_stack("VAULTLINE_GRPC_ADDRESS", home, "grpc_address")
    cert, key = client_identity_files(home, who)
    for what, path in (("CA", Path(ca)), ("certificate", cert), ("private key", key)):
        if not path.is_file():
            raise ConfigError(f"the {what} of --as {who} ({path}) is not a file")
    credentials = load_client_credentials(ca, cert, key)
    async with grpc.aio.secure_channel(address, credentials) as channel:
        yield channel


def describe_rpc_error(err: Any) -> str:
    """`CODE (REASON): message` of a failed call: the tokenizer's fixed text, never data."""
    from ..rpc_reasons import call_reason

    reason = call_reason(err)
    return f"{err.code().name}{f' ({reason})' if reason else ''}: {err.details()}"


def add_identity_option(parser: Any, default: str) -> None:
    """`--as CLIENT`: the mTLS client identity a command calls the tokenizer as."""
    parser.add_argument("--as", dest="as_", default=default, metavar="CLIENT",
                        help=f"the mTLS client identity to act as, a key of the dev stack's "
                        f"`clients`; VAULTLINE_CLIENT_CERT and VAULTLINE_CLIENT_KEY override "
                        f"it (default: {default})")


def add_worker_options(parser: Any) -> None:
    """`--workers N` and `--status-file` of a server that runs under the workers supervisor."""
    parser.add_argument("--workers", type=int, default=0, metavar="N",
                        help="worker processes on the one port (SO_REUSEPORT); a worker that "
                        "dies is restarted; default: one per core")
    parser.add_argument("--status-file", metavar="PATH",
                        help="write the supervisor's and workers' pids and addresses here "
                        "(JSON), removed on exit")


def worker_count(args: Any) -> int:
    from ..config import ConfigError
    from ..workers import default_workers

    count = int(args.workers or default_workers())
    if not 1 <= count <= 64:
        raise ConfigError("--workers must be 1 to 64")
    return count
