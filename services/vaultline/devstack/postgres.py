"""A local PostgreSQL server from pgserver's binaries and the Vaultline database bootstrap.

``PostgresServer`` runs initdb/pg_ctl/postgres shipped in the pgserver wheel (not
``pgserver.PostgresServer``, which serves a Unix socket with trust auth): TCP on 127.0.0.1
only, SCRAM-SHA-256 passwords for every connection, no Unix socket. As root it runs the server
as an unprivileged system user (PostgreSQL refuses root). ``bootstrap_database`` creates the
database and its two login roles on this or an external server, given a superuser DSN.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import contextlib
import grp
import hashlib
import hmac
import importlib.util
import logging
import os
import pwd
import secrets
import shutil
import stat
import subprocess
import tempfile
import urllib.parse
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, TypeVar

from vaultline.devstack import (
    DevstackError,
    read_json,
    reuse_or_pick_ports,
    tail,
    write_secret_json,
)

__all__ = [
    "APP_ROLE",
    "DATABASE",
    "OWNER_ROLE",
    "PostgresBootstrap",
    "PostgresServer",
    "bootstrap_database",
    "pg_bin_dir",
]

_log = logging.getLogger(__name__)

DATABASE: Final = "vaultline"
OWNER_ROLE: Final = "vaultline_owner"  # owns database and schema; runs migrations only
APP_ROLE: Final = "vaultline_app"  # the tokenizer's runtime role; grants come from migrations
IVR_ROLE: Final = "vaultline_ivr"  # the IVR's: its capture sessions and audit appends only
AUDITOR_ROLE: Final = "vaultline_auditor"  # `vaultline audit verify|tail`: reads the trail only
KEYS_ROLE: Final = "vaultline_keys"  # `vaultline keys`: reads and rewraps wrapped data keys only
# One login role per process (issue 14); the superuser only ever bootstraps.
LOGIN_ROLES: Final = (OWNER_ROLE, APP_ROLE, IVR_ROLE, AUDITOR_ROLE, KEYS_ROLE)
SUPERUSER: Final = "postgres"
SYSTEM_USER: Final = "vaultline-pg"  # OS account for the server when we run as root
SUPERUSER_FILE: Final = "postgres-superuser.json"
ROLES_FILE: Final = "postgres-roles.json"
HOST: Final = "127.0.0.1"
_SCRAM_ITERATIONS: Final = 4096  # PostgreSQL's own default

_SETTINGS: Final = """\
# Written by vaultline.devstack.postgres at every start; do not edit (dev only).
listen_addresses = '127.0.0.1'
port = {port}
# TCP only: every connection, local ones included, authenticates with SCRAM-SHA-256.
unix_socket_directories = ''
password_encryption = 'scram-sha-256'
# Loopback only. Production requires TLS (hostssl lines) between the services and the server.
ssl = off
max_connections = 100
shared_buffers = '128MB'
# Durability stays on even for dev: tests must see the crash behaviour production has.
fsync = on
synchronous_commit = on
full_page_writes = on
timezone = 'UTC'
log_timezone = 'UTC'
log_line_prefix = '%m [%p] %q%u@%d '
log_connections = on
log_disconnections = on
log_statement = 'ddl'
# Values travel as bind parameters; never copy them into the log.
log_parameter_max_length = 0
log_parameter_max_length_on_error = 0
"""

_HBA: Final = """\
# Written by vaultline.devstack.postgres (dev only). No trust lines, no network beyond loopback.
# TYPE  DATABASE  USER  ADDRESS        METHOD
local   all       all                  peer
host    all       all   127.0.0.1/32   scram-sha-256
"""


def pg_bin_dir() -> Path:
    """initdb/pg_ctl/postgres from the pgserver wheel, found without importing pgserver
    (its import creates lock files and a runtime dir as side effects)."""
    spec = importlib.util.find_spec("pgserver")
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        candidate = Path(location) / "pginstall" / "bin"
        if (candidate / "pg_ctl").exists():
            return candidate
    raise DevstackError("PostgreSQL binaries not found: pip install pgserver")


@dataclass(frozen=True)
class PostgresBootstrap:
    """Connection strings of the roles. They embed passwords, so repr() hides them."""

    owner_dsn: str = field(repr=False)
    app_dsn: str = field(repr=False)
    superuser_dsn: str = field(repr=False)
    ivr_dsn: str = field(repr=False, default="")
    auditor_dsn: str = field(repr=False, default="")
    keys_dsn: str = field(repr=False, default="")
    host: str = HOST
    port: int = 5432
    database: str = DATABASE


def scram_sha256_verifier(password: str, *, salt: bytes | None = None,
                          iterations: int = _SCRAM_ITERATIONS) -> str:
    """The verifier PostgreSQL stores for a SCRAM-SHA-256 password (RFC 5802/7677). Sending
    this instead of the password keeps the password out of server logs and memory."""
    salt = salt if salt is not None else secrets.token_bytes(16)
    salted = hashlib.pbkdf2_hmac("sha256", password.encode("utf-8"), salt, iterations)
    client_key = hmac.new(salted, b"Client Key", hashlib.sha256).digest()
    stored_key = hashlib.sha256(client_key).digest()
    server_key = hmac.new(salted, b"Server Key", hashlib.sha256).digest()

    def b64(raw: bytes) -> str:
        return base64.b64encode(raw).decode("ascii")

    return f"SCRAM-SHA-256${iterations}:{b64(salt)}${b64(stored_key)}:{b64(server_key)}"


class PostgresServer:
    """One PostgreSQL cluster under ``data_dir`` (pgdata/, log/, ports.json).

    ``dev_dir`` (default ``data_dir/../dev``) receives the dev-only password files.
    """

    def __init__(self, data_dir: Path, port: int | None = None, *, dev_dir: Path | None = None,
                 startup_timeout: float = 60.0) -> None:
        self.data_dir = Path(data_dir).resolve()
        self.dev_dir = Path(dev_dir).resolve() if dev_dir else self.data_dir.parent / "dev"
        self.startup_timeout = startup_timeout
        self._requested_port = port
        self._port: int | None = None
        self._bin = pg_bin_dir()
        self._user = _server_account()
        with contextlib.suppress(OSError, ValueError, DevstackError):
            saved = read_json(self._ports_file).get("port")
            if isinstance(saved, int):
                self._port = saved

    @property
    def port(self) -> int:
        if self._port is None:
            raise DevstackError("PostgreSQL has no port yet: start() it first")
        return self._port

    @property
    def pgdata(self) -> Path:
        return self.data_dir / "pgdata"

    @property
    def log_path(self) -> Path:
        return self.data_dir / "log" / "postgres.log"

    @property
    def superuser_file(self) -> Path:
        return self.dev_dir / SUPERUSER_FILE

    @property
    def _ports_file(self) -> Path:
        return self.data_dir / "ports.json"

    def __repr__(self) -> str:
        return f"PostgresServer(data_dir={str(self.data_dir)!r}, port={self._port})"

    @property
    def is_running(self) -> bool:
        if not (self.pgdata / "PG_VERSION").exists():
            return False
        result = self._run(["pg_ctl", "status", "-D", str(self.pgdata)], check=False)
        return result.returncode == 0

    def start(self) -> None:
        """initdb on first use, then start and wait until the server accepts connections."""
        if self.is_running:
            raise DevstackError(f"PostgreSQL already runs from {self.pgdata}; stop() it first")
        self._prepare_dirs()
        if not (self.pgdata / "PG_VERSION").exists():
            self._initdb()
        self._port = reuse_or_pick_ports(self._ports_file, ("port",),
                                         {"port": self._requested_port})["port"]
        self._write_owned(self.pgdata / "vaultline.conf", _SETTINGS.format(port=self._port))
        self._write_owned(self.pgdata / "pg_hba.conf", _HBA)
        result = self._run(["pg_ctl", "start", "-D", str(self.pgdata), "-l", str(self.log_path),
                            "-w", "-t", str(int(self.startup_timeout))], check=False)
        if result.returncode != 0:
            with contextlib.suppress(DevstackError):
                self._run(["pg_ctl", "stop", "-D", str(self.pgdata), "-m", "immediate"],
                          check=False)
            raise DevstackError(
                f"PostgreSQL did not start within {self.startup_timeout:.0f}s "
                f"(pg_ctl exit {result.returncode}): {result.stderr.strip()}\n"
                f"log {self.log_path}:\n{tail(self.log_path)}")
        _log.info("PostgreSQL started on %s:%d", HOST, self._port)

    def stop(self, timeout: float = 30.0) -> None:
        """Fast shutdown (running transactions roll back, data is flushed). No-op if stopped."""
        if not self.is_running:
            return
        result = self._run(["pg_ctl", "stop", "-D", str(self.pgdata), "-m", "fast", "-w",
                            "-t", str(int(timeout))], check=False)
        if result.returncode != 0 and self.is_running:
            _log.warning("PostgreSQL fast shutdown timed out; using immediate shutdown")
            self._run(["pg_ctl", "stop", "-D", str(self.pgdata), "-m", "immediate", "-w"],
                      check=False)
        _log.info("PostgreSQL stopped")

    def bootstrap(self) -> PostgresBootstrap:
        """Create database and roles (idempotent); return their DSNs."""
        if not self.is_running:
            raise DevstackError("PostgreSQL is not running: start() it first")
        try:
            password = read_json(self.superuser_file)["password"]
        except (OSError, ValueError, KeyError):
            raise DevstackError(f"PostgreSQL in {self.pgdata} exists but its superuser password "
                                f"({self.superuser_file}) is missing; delete {self.data_dir} to "
                                "start from scratch") from None
        return bootstrap_database(_dsn(SUPERUSER, password, HOST, self.port, SUPERUSER),
                                  self.dev_dir)

    # -- internals ---------------------------------------------------------------------------

    def _prepare_dirs(self) -> None:
        uid, gid = self._user[1], self._user[2]
        for path in (self.data_dir, self.data_dir / "log"):
            path.mkdir(parents=True, exist_ok=True)
            if os.geteuid() == 0:
                os.chown(path, uid, gid)
            path.chmod(0o700)
        _check_traversable(self.data_dir, self._user[0], uid, gid)

    def _initdb(self) -> None:
        password = secrets.token_urlsafe(32)
        write_secret_json(self.superuser_file, {"user": SUPERUSER, "password": password})
        # initdb reads the password from a file the server account can read; it lives in the
        # 0700 data dir for the seconds initdb runs and is removed at once.
        fd, name = tempfile.mkstemp(prefix=".pwfile-", dir=self.data_dir)
        pwfile = Path(name)
        try:
            with os.fdopen(fd, "w") as fh:
                fh.write(password + "\n")
            if os.geteuid() == 0:
                os.chown(pwfile, self._user[1], self._user[2])
            result = self._run(["initdb", "-D", str(self.pgdata), "-U", SUPERUSER,
                                f"--pwfile={pwfile}", "--auth-local=peer",
                                "--auth-host=scram-sha-256", "--encoding=UTF8", "--locale=C",
                                "--data-checksums"], check=False)
        finally:
            pwfile.unlink(missing_ok=True)
        if result.returncode != 0:
            raise DevstackError(f"initdb failed (exit {result.returncode}): "
                                f"{result.stderr.strip()[-2000:]}")
        conf = self.pgdata / "postgresql.conf"
        with conf.open("a", encoding="utf-8") as fh:
            fh.write("\n# Vaultline dev settings (later lines win).\n"
                     "include_if_exists = 'vaultline.conf'\n")
        _log.info("PostgreSQL cluster created in %s", self.pgdata)

    def _write_owned(self, path: Path, text: str) -> None:
        path.write_text(text, encoding="utf-8")
        path.chmod(0o600)
        if os.geteuid() == 0:
            os.chown(path, self._user[1], self._user[2])

    def _run(self, argv: list[str], *, check: bool) -> subprocess.CompletedProcess[str]:
        """Run a PostgreSQL binary as the server account. Output goes to temp files, not
        pipes: pg_ctl's postmaster inherits them and a pipe would block the call."""
        name, uid, gid = self._user
        kwargs: dict[str, Any] = {}
        if os.geteuid() == 0:
            kwargs = {"user": uid, "group": gid, "extra_groups": []}
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env.update({"HOME": str(self.data_dir), "USER": name, "LOGNAME": name, "LC_ALL": "C"})
        with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
            try:
                proc = subprocess.run([str(self._bin / argv[0]), *argv[1:]],
                                      stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                      text=True, env=env, cwd=self.data_dir, check=False,
                                      timeout=self.startup_timeout + 30, **kwargs)
            except subprocess.TimeoutExpired:
                raise DevstackError(f"{argv[0]} {argv[1]} timed out; log {self.log_path}:\n"
                                    f"{tail(self.log_path)}") from None
            out.seek(0)
            err.seek(0)
            result = subprocess.CompletedProcess(proc.args, proc.returncode, out.read(),
                                                 err.read())
        if check and result.returncode != 0:
            raise DevstackError(f"{argv[0]} failed (exit {result.returncode}): "
                                f"{result.stderr.strip()[-2000:]}")
        return result


def _server_account() -> tuple[str, int, int]:
    """(name, uid, gid) the server runs as: ourselves, or SYSTEM_USER when we are root."""
    if os.geteuid() != 0:
        entry = pwd.getpwuid(os.geteuid())
        return entry.pw_name, entry.pw_uid, entry.pw_gid
    try:
        entry = pwd.getpwnam(SYSTEM_USER)
    except KeyError:
        useradd = shutil.which("useradd") or "/usr/sbin/useradd"
        proc = subprocess.run([useradd, "--system", "--user-group", "--no-create-home",
                               "--home-dir", "/nonexistent", "--shell", "/usr/sbin/nologin",
                               SYSTEM_USER], capture_output=True, text=True, check=False)
        try:  # a concurrent run may have created it first
            entry = pwd.getpwnam(SYSTEM_USER)
        except KeyError:
            raise DevstackError(f"cannot create system user {SYSTEM_USER} for PostgreSQL: "
                                f"{proc.stderr.strip()}") from None
    return entry.pw_name, entry.pw_uid, entry.pw_gid


def _check_traversable(path: Path, name: str, uid: int, gid: int) -> None:
    """Fail clearly if the server account cannot reach ``path`` (e.g. under a 0700 tmp dir)."""
    groups = {gid, *(g.gr_gid for g in grp.getgrall() if name in g.gr_mem)}
    for parent in path.parents:
        st = parent.stat()
        if st.st_uid == uid:
            bit = stat.S_IXUSR
        elif st.st_gid in groups:
            bit = stat.S_IXGRP
        else:
            bit = stat.S_IXOTH
        if not st.st_mode & bit:
            raise DevstackError(f"PostgreSQL runs as {name!r}, which cannot enter {parent}; "
                                f"choose a data dir it can reach or `chmod o+x {parent}`")


def _dsn(user: str, password: str, host: str, port: int, database: str,
         query: str = "") -> str:
    auth = f"{urllib.parse.quote(user, safe='')}:{urllib.parse.quote(password, safe='')}"
    return f"postgresql://{auth}@{host}:{port}/{database}" + (f"?{query}" if query else "")


def _quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _quote_literal(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


_T = TypeVar("_T")


def _run_async(fn: Callable[[], Awaitable[_T]]) -> _T:
    """Run a coroutine on a private loop in a worker thread: works whether or not the caller
    already runs an event loop (pytest-asyncio, the CLI)."""
    async def main() -> _T:
        return await fn()

    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, main()).result()


def bootstrap_database(superuser_dsn: str, dev_dir: Path) -> PostgresBootstrap:
    """Idempotently create the login roles (`LOGIN_ROLES`: the owner, and one per process;
    passwords kept in ``dev_dir/postgres-roles.json``) and database ``vaultline`` owned by the
    owner role, whose schema public only the owner may create in. Works on any server given a
    superuser DSN."""
    import asyncpg

    parts = urllib.parse.urlsplit(superuser_dsn)
    host = parts.hostname or HOST
    port = parts.port or 5432
    roles_file = Path(dev_dir) / ROLES_FILE
    passwords: dict[str, str] = {}
    with contextlib.suppress(OSError, ValueError, DevstackError):
        saved = read_json(roles_file)
        for role in LOGIN_ROLES:
            entry = saved.get(role)
            if isinstance(entry, dict) and isinstance(entry.get("password"), str):
                passwords[role] = entry["password"]
    if set(passwords) != set(LOGIN_ROLES):  # new roles (an older home) get a password each
        passwords = {role: passwords.get(role) or secrets.token_urlsafe(32)
                     for role in LOGIN_ROLES}
        write_secret_json(roles_file, {role: {"password": pw} for role, pw in passwords.items()})

    db_dsn = urllib.parse.urlunsplit(parts._replace(path=f"/{DATABASE}"))

    async def setup() -> None:
        conn = await asyncpg.connect(superuser_dsn, timeout=30)
        try:
            # Role DDL carries SCRAM verifiers, not passwords; keep even those out of the log.
            await conn.execute("SET log_statement = 'none'")
            for role, password in passwords.items():
                exists = await conn.fetchval("SELECT 1 FROM pg_roles WHERE rolname = $1", role)
                verb = "ALTER" if exists else "CREATE"
                await conn.execute(
                    f"{verb} ROLE {_quote_ident(role)} WITH LOGIN NOSUPERUSER NOCREATEDB "
                    f"NOCREATEROLE NOREPLICATION NOBYPASSRLS "
                    f"PASSWORD {_quote_literal(scram_sha256_verifier(password))}")
            if not await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", DATABASE):
                await conn.execute(f"CREATE DATABASE {_quote_ident(DATABASE)} TEMPLATE template0 "
                                   f"ENCODING 'UTF8' OWNER {_quote_ident(OWNER_ROLE)}")
            db, owner = map(_quote_ident, (DATABASE, OWNER_ROLE))
            await conn.execute(f"ALTER DATABASE {db} OWNER TO {owner}")
            # Nobody but the owner connects or makes temp tables unless granted explicitly.
            await conn.execute(f"REVOKE ALL ON DATABASE {db} FROM PUBLIC")
            for role in LOGIN_ROLES[1:]:
                await conn.execute(f"GRANT CONNECT ON DATABASE {db} TO {_quote_ident(role)}")
        finally:
            await conn.close()
        conn = await asyncpg.connect(db_dsn, timeout=30)
        try:
            await conn.execute(f"ALTER SCHEMA public OWNER TO {_quote_ident(OWNER_ROLE)}")
            await conn.execute("REVOKE CREATE ON SCHEMA public FROM PUBLIC")
        finally:
            await conn.close()

    try:
        _run_async(setup)
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        # asyncpg messages name roles and databases, never the DSN's password.
        raise DevstackError(f"PostgreSQL bootstrap failed: {type(exc).__name__}: {exc}") from None
    query = parts.query
    _log.info("PostgreSQL database %s bootstrapped on %s:%d", DATABASE, host, port)
    return PostgresBootstrap(
        owner_dsn=_dsn(OWNER_ROLE, passwords[OWNER_ROLE], host, port, DATABASE, query),
        app_dsn=_dsn(APP_ROLE, passwords[APP_ROLE], host, port, DATABASE, query),
        superuser_dsn=superuser_dsn,
        ivr_dsn=_dsn(IVR_ROLE, passwords[IVR_ROLE], host, port, DATABASE, query),
        auditor_dsn=_dsn(AUDITOR_ROLE, passwords[AUDITOR_ROLE], host, port, DATABASE, query),
        keys_dsn=_dsn(KEYS_ROLE, passwords[KEYS_ROLE], host, port, DATABASE, query),
        host=host, port=port, database=DATABASE,
    )
