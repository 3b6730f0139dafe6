"""`vaultline tenant shred`: crypto-shred a tenant through the admin API (KeyService).

Runs as an `admin` identity over mTLS (`--as`, a client of the dev stack, or
VAULTLINE_CLIENT_CERT / VAULTLINE_CLIENT_KEY); the tokenizer checks the role and the
identity's tenants, and audits the call. No database credentials are involved.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path
from typing import Any

from ..config import ConfigError, env_or_stack
from .common import client_identity_files

__all__ = ["add_tenant_commands"]


def cmd_tenant_shred(args: argparse.Namespace) -> int:
    import grpc

    from ..gen.admin.v1 import admin_pb2 as pb
    from ..gen.admin.v1 import admin_service_pb2_grpc as pb_grpc
    from ..security.tls import load_client_credentials

    if not args.yes:
        print(f"vaultline: shredding {args.tenant!r} destroys its data keys and tokens for"
              " good; run again with --yes to do it", file=sys.stderr)
        return 2
    ca = env_or_stack("VAULTLINE_CA_FILE", args.home, "ca")
    address = env_or_stack("VAULTLINE_GRPC_ADDRESS", args.home, "grpc_address")
    cert, key = client_identity_files(args.home, args.as_)
    if not Path(ca).is_file():
        raise ConfigError(f"{ca} is not a file")

    async def main() -> Any:
        credentials = load_client_credentials(ca, cert, key)
        async with grpc.aio.secure_channel(address, credentials) as channel:
            return await pb_grpc.KeyServiceStub(channel).ShredTenant(
                pb.ShredTenantRequest(tenant=args.tenant, confirm_tenant=args.tenant),
                timeout=60)

    try:
        answer = asyncio.run(main())
    except grpc.aio.AioRpcError as err:
        print(f"vaultline: shred refused: {err.code().name}: {err.details()}", file=sys.stderr)
        return 1
    print(f"tenant {args.tenant}: {answer.data_keys_destroyed} data keys destroyed,"
          f" {answer.tokens_deleted} tokens deleted")
    return 0


def add_tenant_commands(sub: Any) -> None:
    tenant = sub.add_parser("tenant", help="tenant lifecycle (admin identity)")
    tenant_sub = tenant.add_subparsers(dest="tenant_command", required=True,
                                       metavar="SUBCOMMAND")
    shred = tenant_sub.add_parser(
        "shred",
        help="destroy a tenant's data keys and tokens (crypto-shredding)",
        description="Destroy every data key of TENANT and delete its tokens, through the "
        "tokenizer's admin API (mTLS, role admin, audited). Its card data can then not be "
        "opened by the service again. A database backup taken before still holds the wrapped "
        "data keys until it ages out. Irreversible: asks for --yes.",
    )
    shred.add_argument("tenant", metavar="TENANT")
    shred.add_argument("--yes", action="store_true", help="really shred it")
    shred.add_argument("--as", dest="as_", default="admin",
                       help="client identity of the dev stack to call as (default admin)")
    shred.set_defaults(func=cmd_tenant_shred)
