"""`vaultline` command line: one parser, its subcommands in the modules beside this one.

    common.py     the state directory (--home), logging, running until Ctrl-C
    tokenizer.py  serve, dev up, db migrate, keys status|rotate, pki init
    audit.py      audit verify|tail
    ivr.py        ivr serve, sim call
    panel.py      panel serve|link
    recordings.py recordings public-key|list|play|export|release|purge|scan
    descope.py    discover
    settle.py     settle create|approve|run|status|list
    tenant.py     tenant shred

The entry-point layer: nothing else in the package imports from here. Every subcommand has
`--help`. Exit codes: 0 ok, 1 operation failed, 2 usage or configuration error. Messages never
contain key material or card data.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from ..config import ConfigError
from ..devstack import DevstackError
from ..errors import VaultlineError
from .audit import add_audit_commands
from .common import DEFAULT_HOME, setup_logging
from .descope import add_descope_commands
from .ivr import add_ivr_commands
from .panel import add_panel_commands
from .recordings import add_recordings_commands
from .settle import add_settle_commands
from .tenant import add_tenant_commands
from .tokenizer import add_tokenizer_commands

__all__ = ["build_parser", "main"]


# ---- parser --------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vaultline",
        description="Vaultline: card tokenization vault. Start with `vaultline dev up`.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument(
        "--home",
        default=str(DEFAULT_HOME),
        help="state directory of the local stack (default: .vaultline, or $VAULTLINE_HOME)",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_tokenizer_commands(sub)
    add_audit_commands(sub, str(DEFAULT_HOME))
    add_ivr_commands(sub)
    add_panel_commands(sub)
    add_recordings_commands(sub)
    add_descope_commands(sub)
    add_settle_commands(sub)
    add_tenant_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    try:
        return int(args.func(args) or 0)
    except ConfigError as exc:
        print(f"vaultline: configuration error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except VaultlineError as exc:
        print(f"vaultline: {exc.message}", file=sys.stderr)
        return 1
    except DevstackError as exc:  # its message says what to do (e.g. a stack already runs)
        print(f"vaultline: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:  # noqa: BLE001 - a CLI answers with one line, not a traceback
        logging.getLogger("vaultline").debug("failure", exc_info=True)
        grpc = sys.modules.get("grpc")
        if grpc is not None and isinstance(exc, grpc.aio.AioRpcError):
            from .common import describe_rpc_error

            print(f"vaultline: the tokenizer refused: {describe_rpc_error(exc)}",
                  file=sys.stderr)
            return 1
        print(f"vaultline: failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
