"""`vaultline dev up`: OpenBao, PostgreSQL and the tokenizer on one machine, in one command.

State lives under the home directory (default `.vaultline/`): `openbao/` and `postgres/` hold
the servers' data, `dev/` the dev-only credentials and `stack.json`, which tools and tests read
to find everything. External servers replace the embedded ones when
`VAULTLINE_VAULT_ADDR` (with `VAULTLINE_VAULT_ROLE_ID`/`_SECRET_ID` or `_APPROLE_FILE`) or
`VAULTLINE_DATABASE_URL` (with `VAULTLINE_DATABASE_OWNER_URL` for migrations) are set.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
from pathlib import Path
from typing import Any

import grpc

from ..config import (
    ConfigError,
    TlsFiles,
    TokenizerConfig,
    audit_chain_from_env,
    policy_path_from_env,
    stack_file,
    tuning_from_env,
    vault_credentials_from_env,
)
from ..security.pki import init_dev_pki
from ..server import TokenizerServer
from ..store import migrate
from ..vault import AppRoleCredentials
from . import DevstackError, write_json
from .openbao import OpenBaoCluster, OpenBaoServer
from .patroni import PatroniCluster
from .postgres import PostgresServer


class DevStack:
    def __init__(self, home: Path, *, grpc_port: int = 50051, ha: bool = False) -> None:
        """`ha`: OpenBao as a 3-node Raft cluster (`dev up --ha`; issue 19)."""
        self.home = home
        self.dev_dir = home / "dev"
        self.grpc_port = grpc_port
        self.ha = ha
        self.openbao: OpenBaoServer | OpenBaoCluster | None = None
        self.postgres: PostgresServer | PatroniCluster | None = None
        self.tokenizer: TokenizerServer | None = None
        self.ivr: Any = None
        self._ivr_channel: grpc.aio.Channel | None = None
        self.panel: Any = None
        self._panel_channel: grpc.aio.Channel | None = None
        self._lock_fd: int | None = None
        self.info: dict[str, Any] = {}

    @property
    def stack_file(self) -> Path:
        return stack_file(self.home)

    @property
    def lock_file(self) -> Path:
        return self.home / "dev.lock"

    def _take_home(self) -> None:
        """One stack per home: a second `dev up` there finds the lock held, says so and
        touches nothing (the first one's servers, data and stack.json stay as they are)."""
        fd = os.open(self.lock_file, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode("ascii", "replace").strip() or "unknown"
            os.close(fd)
            raise DevstackError(
                f"a dev stack is already running in {self.home} (pid {holder}); stop it "
                "first (Ctrl-C where it runs), or pass another --home"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._lock_fd = fd  # held until stop(); the kernel releases it if we die

    async def start(self) -> None:
        self.home.mkdir(parents=True, exist_ok=True)
        self._take_home()
        # The PostgreSQL server account (when we run as root) must be able to reach its
        # data dir; nothing in home is listable by others.
        self.home.chmod(0o711)
        self.dev_dir.mkdir(mode=0o700, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            self.stack_file.unlink()  # a stale file from a killed run must not mislead tools
        # VAULTLINE_DEK_MAX_*, _COMMIT_DELAY_MS as `serve` reads them; refused before any start.
        tuning = tuning_from_env()
        tuning.setdefault("recordings_dir", self.home / "recordings")  # the IVR fills it
        try:
            # mTLS in the dev stack too: a dev CA and one certificate per client identity.
            pki = await asyncio.to_thread(init_dev_pki, self.home / "pki")
            vault_addr, tokenizer_creds, admin_file, auditor_file, recordings_file = (
                await asyncio.to_thread(self._start_openbao))
            dsns = await asyncio.to_thread(self._start_postgres)
            app_dsn = dsns["database_url"]
            applied = await migrate(dsns["owner_dsn"])
            self.tokenizer = TokenizerServer(
                TokenizerConfig(
                    database_url=app_dsn,
                    vault_addr=vault_addr,
                    vault_credentials=tokenizer_creds,
                    tls=TlsFiles(pki.ca_cert, pki.server_cert, pki.server_key),
                    policy_path=policy_path_from_env(),
                    # The keys-admin AppRole stays with the admin path (`vaultline keys …`,
                    # listed in stack.json): the long-running tokenizer never holds it, so its
                    # KeyService answers FAILED_PRECONDITION here (issue 14).
                    keys_admin_credentials=None,
                    grpc_listen=f"127.0.0.1:{self.grpc_port}",
                    audit_chain=audit_chain_from_env(),
                    **tuning,
                )
            )
            grpc_address = await self.tokenizer.start()
            ivr_info = await self._start_ivr(grpc_address, pki, dsns["ivr_database_url"],
                                             vault_addr, recordings_file)
            panel_info = await self._start_panel(grpc_address, pki)
        except BaseException:
            await self.stop()
            raise
        self.info = {
            "grpc_address": grpc_address,
            "vault_addr": vault_addr,
            # One role per process: the tokenizer's, the IVR's, and the two admin commands'.
            **{key: dsn for key, dsn in dsns.items() if dsn},
            "migrations_applied": applied,
            "ca": str(pki.ca_cert),
            "clients": pki.clients,
            "metrics_address": self.tokenizer.metrics_address,
            "credentials": {
                "tokenizer_approle": str(self.dev_dir / "approle-tokenizer.json"),
                "keys_admin_approle": admin_file,
                "auditor_approle": auditor_file,
                "recordings_approle": recordings_file,
            },
            "pid": os.getpid(),
            **ivr_info,
            **panel_info,
        }
        if self.ha:
            # Each node of the HA stack: kind, address, pid and role (as it was at start).
            nodes: list[dict[str, Any]] = []
            for cluster in (self.openbao, self.postgres):
                if isinstance(cluster, OpenBaoCluster | PatroniCluster):
                    nodes += await asyncio.to_thread(cluster.describe)
            self.info["ha"] = {"nodes": nodes}
        write_json(self.stack_file, self.info, mode=0o600)

    async def _start_ivr(self, grpc_address: str, pki: Any, ivr_dsn: str, vault_addr: str,
                         recordings_file: str | None) -> dict[str, Any]:
        """The payment IVR webhook service and the Twilio simulator's REST side it calls;
        with the recordings AppRole, the recording vault's ingest too."""
        from ..security.tls import load_client_credentials
        from .ivr import stack_info, start_dev_ivr

        ivr_client = pki.clients["ivr"]
        self._ivr_channel = grpc.aio.secure_channel(grpc_address, load_client_credentials(
            pki.ca_cert, ivr_client["cert"], ivr_client["key"]))
        self.ivr = await start_dev_ivr(
            dev_dir=self.dev_dir, database_url=ivr_dsn, channel=self._ivr_channel,
            recordings_dir=self.home / "recordings", vault_addr=vault_addr,
            recordings_approle=Path(recordings_file) if recordings_file else None)
        return dict(stack_info(self.ivr, self.dev_dir))

    async def _start_panel(self, grpc_address: str, pki: Any) -> dict[str, Any]:
        """The agent panel, on the `crm` identity (it holds nothing else)."""
        from ..security.tls import load_client_credentials
        from .panel import start_dev_panel

        crm = pki.clients["crm"]
        self._panel_channel = grpc.aio.secure_channel(grpc_address, load_client_credentials(
            pki.ca_cert, crm["cert"], crm["key"]))
        self.panel, info = await start_dev_panel(self.dev_dir, self._panel_channel)
        return info

    def _start_openbao(self) -> tuple[str, AppRoleCredentials, str | None, str | None,
                                      str | None]:
        """(address, the tokenizer's AppRole, the keys-admin's, the auditor's and the
        recording ingest's AppRole files): the admin files only go to stack.json, for the
        admin commands; the recordings one to the IVR."""
        addr = os.environ.get("VAULTLINE_VAULT_ADDR")
        if addr:
            return (addr, vault_credentials_from_env(),
                    os.environ.get("VAULTLINE_KEYS_ADMIN_APPROLE_FILE"),
                    os.environ.get("VAULTLINE_AUDITOR_APPROLE_FILE"),
                    os.environ.get("VAULTLINE_RECORDINGS_APPROLE_FILE"))
        if self.ha:
            self.openbao = OpenBaoCluster(self.home / "openbao-ha", dev_dir=self.dev_dir)
        else:
            self.openbao = OpenBaoServer(self.home / "openbao", dev_dir=self.dev_dir)
        self.openbao.start()
        boot = self.openbao.bootstrap()
        return (self.openbao.addr, boot.tokenizer, str(boot.keys_admin_file),
                str(boot.auditor_file) if boot.auditor_file else None,
                str(boot.recordings_file) if boot.recordings_file else None)

    def _start_postgres(self) -> dict[str, str]:
        """The DSN of each role, by its stack.json key (an external server's from the
        environment: the tokenizer's, the owner's and the IVR's are required)."""
        url = os.environ.get("VAULTLINE_DATABASE_URL")
        if url:
            external = {
                "database_url": url,
                "owner_dsn": os.environ.get("VAULTLINE_DATABASE_OWNER_URL", ""),
                "ivr_database_url": os.environ.get("VAULTLINE_IVR_DATABASE_URL", ""),
                "auditor_database_url": os.environ.get("VAULTLINE_AUDITOR_DATABASE_URL", ""),
                "keys_database_url": os.environ.get("VAULTLINE_KEYS_DATABASE_URL", ""),
            }
            if not external["owner_dsn"] or not external["ivr_database_url"]:
                raise ConfigError(
                    "VAULTLINE_DATABASE_URL is set: set VAULTLINE_DATABASE_OWNER_URL (the schema "
                    "owner that runs migrations) and VAULTLINE_IVR_DATABASE_URL (the IVR's own "
                    "role) too"
                )
            return external
        if self.ha:
            cluster = PatroniCluster(self.home / "postgres-ha", dev_dir=self.dev_dir)
            self.postgres = cluster
            cluster.start()
        else:
            self.postgres = PostgresServer(self.home / "postgres", dev_dir=self.dev_dir)
            self.postgres.start()
        boot = self.postgres.bootstrap()
        return {"database_url": boot.app_dsn, "owner_dsn": boot.owner_dsn,
                "ivr_database_url": boot.ivr_dsn, "auditor_database_url": boot.auditor_dsn,
                "keys_database_url": boot.keys_dsn}

    async def stop(self) -> None:
        if self._lock_fd is None:
            return  # never started, or another process holds this home
        with contextlib.suppress(FileNotFoundError):
            self.stack_file.unlink()
        if self.panel is not None:
            await self.panel.stop()
            self.panel = None
        if self._panel_channel is not None:
            await self._panel_channel.close()
            self._panel_channel = None
        if self.ivr is not None:
            await self.ivr.stop()
            self.ivr = None
        if self._ivr_channel is not None:
            await self._ivr_channel.close()
            self._ivr_channel = None
        if self.tokenizer is not None:
            await self.tokenizer.stop()
            self.tokenizer = None
        if self.postgres is not None:
            await asyncio.to_thread(self.postgres.stop)
            self.postgres = None
        if self.openbao is not None:
            await asyncio.to_thread(self.openbao.stop)
            self.openbao = None
        os.close(self._lock_fd)  # releases the home for the next `dev up`
        self._lock_fd = None

    def describe(self) -> str:
        i = self.info
        lines = [
            "Vaultline dev stack is up (Ctrl-C stops everything)",
            f"  tokenizer gRPC   {i['grpc_address']}  (mTLS; health + reflection on)",
            f"  metrics          http://{i['metrics_address']}/metrics",
            f"  client certs     {Path(i['ca']).parent}  (CA, one certificate per identity)",
            f"  OpenBao          {i['vault_addr']}"
            + (f"  data: {self.home / 'openbao-ha'} (3-node Raft cluster)"
               if isinstance(self.openbao, OpenBaoCluster)
               else "  data: " + str(self.home / "openbao") if self.openbao else "  (external)"),
            "  PostgreSQL       "
            + (f"primary + synchronous standby under Patroni, etcd x3  data: "
               f"{self.home / 'postgres-ha'}" if isinstance(self.postgres, PatroniCluster)
               else f"127.0.0.1:{self.postgres.port}  data: {self.postgres.pgdata}"
               if self.postgres else "(external)"),
            f"  stack file       {self.stack_file}",
        ]
        if self.openbao:
            init_file = (self.openbao.nodes[0].init_file
                         if isinstance(self.openbao, OpenBaoCluster) else self.openbao.init_file)
            lines.append(f"  DEV ONLY: unseal keys and root token in {init_file}")
        if "ivr_base_url" in i:
            lines += [
                f"  payment IVR      {i['ivr_base_url']}/voice/<flow>  (Twilio webhooks)",
                f"  Twilio (sim)     {i['twilio_api_base_url']}",
            ]
        if "panel_url" in i:
            lines.append(f"  agent panel      {i['panel_url']}/panel  (sign in: vaultline "
                         "panel link --call CA… --agent A1)")
        lines += [
            "",
            "Try:  vaultline sim call --flow card_capture     (keys in a network test card)",
            "      vaultline sim agent-call --hold            (then open the panel link it prints)",
            "      vaultline keys status",
            "      vaultline audit verify",
        ]
        return "\n".join(lines)
