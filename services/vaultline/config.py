"""Configuration: every VAULTLINE_* variable and every `stack.json` lookup, in one place.

`TokenizerConfig` is the tokenizer's settings as one frozen value, read from the environment
and checked up front. The command-line tools find their servers and credentials through
`env_or_stack` (a variable, else the running dev stack's `stack.json`).

`TOKENIZER_VARIABLES` lists the tokenizer's variables (`vaultline serve --help` shows it).
"""

from __future__ import annotations

import datetime as dt
import functools
import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .keyring import KeyPolicy
from .resources import ACCESS_POLICY
from .vault import AppRoleCredentials

TOKENIZER_VARIABLES = """\
The tokenizer gRPC server (TokenizationService, KeyService, AuditService; mTLS only).

Variables (all `VAULTLINE_`-prefixed):
  DATABASE_URL        postgresql://user:password@host:port/db of the service's least-privilege role
  VAULT_ADDR          OpenBao/Vault address, e.g. http://127.0.0.1:8200
  VAULT_ROLE_ID       AppRole role id of the tokenizer        } or VAULT_APPROLE_FILE: a JSON
  VAULT_SECRET_ID     AppRole secret id of the tokenizer      } file with role_id and secret_id
  VAULT_KEY_NAME      transit key name (default vaultline-kek)
  KEYS_ADMIN_APPROLE_FILE  optional: the keys-admin AppRole JSON file; enables the admin
                      KeyService (rotation). Without it, KeyService answers FAILED_PRECONDITION
  GRPC_LISTEN         host:port to serve gRPC on (default 127.0.0.1:50051); mTLS only
  TLS_CA              PEM file of the CA whose client certificates are accepted
  TLS_CERT            PEM file of the server certificate
  TLS_KEY             PEM file of the server key
  POLICY_FILE         access policy (default infra/access/policy.toml)
  METRICS_LISTEN      host:port for Prometheus /metrics (default 127.0.0.1:0 = any free port;
                      "off" disables)
  DEK_MAX_USES        encryptions before a card-data key retires (default 10,000,000)
  DEK_MAX_AGE_DAYS    age at which a card-data key retires (default 90)
  COMMIT_DELAY_MS     the longest coalesced Tokenize calls may wait for company after a chunk
                      commits; none, half or all of it, whichever measurably completes the
                      most calls (default 4; 0 never waits; at most 50)
  PURGE_INTERVAL_SECONDS    how often expired tokens and old idempotency records are
                            deleted (default 300)
  TOKENIZE_REQUEST_RETENTION_HOURS  how long a Tokenize request id answers a retry with its
                            first result (default 24)
  SECURITY_CODE_HOLD_SECONDS  how long a captured security code is held for the payment
                            service to redeem once, then erased (default 600; at most 3600)
  SECURITY_CODE_SWEEP_SECONDS how often expired security codes are erased (default 30)
  RECORDINGS_DIR            the recording store (encrypted recordings; the IVR writes it)
  RECORDING_RETENTION_DAYS  recordings older than this are deleted, hourly (default 365)
  AUDIT_CHAIN               names this deployment's checkpoint folder in OpenBao, when
                            several vault databases share one OpenBao (default "default")
  AUDIT_CHECKPOINT_SECONDS  how often the audit chain's head is checkpointed into OpenBao
                            while it grows (default 60)
  AUDIT_CHECKPOINT_RECORDS  ... or after this many new records, if sooner (default 1000)
  MAX_UNARY_MESSAGE_BYTES   the largest unary request (default 1048576, 1 MiB)
  MAX_STREAM_MESSAGE_BYTES  the largest message of a stream (default 4194304, 4 MiB)
"""


class ConfigError(ValueError):
    """A setting is missing or malformed; the message names the variable, never a secret."""


@dataclass(frozen=True)
class TlsFiles:
    """The server side of mTLS: the client CA to trust and the server's own certificate."""

    ca: Path
    cert: Path
    key: Path


@dataclass(frozen=True)
class TokenizerConfig:
    database_url: str = field(repr=False)
    vault_addr: str
    vault_credentials: AppRoleCredentials = field(repr=False)
    tls: TlsFiles
    policy_path: Path = ACCESS_POLICY
    keys_admin_credentials: AppRoleCredentials | None = field(default=None, repr=False)
    vault_key_name: str = "vaultline-kek"
    grpc_listen: str = "127.0.0.1:50051"
    metrics_listen: str | None = "127.0.0.1:0"
    key_policy: KeyPolicy = KeyPolicy()
    db_pool_size: int = 10
    commit_delay_ms: float = 4.0
    purge_interval_seconds: float = 300.0
    tokenize_request_retention: dt.timedelta = dt.timedelta(hours=24)
    # How long a captured security code is held for authorisation (PCI DSS 3.3.2), at most 1 h.
    security_code_hold: dt.timedelta = dt.timedelta(minutes=10)
    security_code_sweep_seconds: float = 30.0
    # The recording vault (issue 17): the recording store the IVR fills (None: the service
    # answers metadata only), and how long recordings are kept.
    recordings_dir: Path | None = None
    recording_retention: dt.timedelta = dt.timedelta(days=365)
    audit_chain: str = "default"
    audit_checkpoint_seconds: float = 60.0
    audit_checkpoint_records: int = 1000
    max_unary_message_bytes: int = 1 << 20
    max_stream_message_bytes: int = 4 << 20

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> TokenizerConfig:
        get = functools.partial(_get, env)
        credentials = vault_credentials_from_env(env)
        database_url = get("DATABASE_URL")
        if not database_url.startswith(("postgresql://", "postgres://")):
            raise ConfigError("VAULTLINE_DATABASE_URL must be a postgresql:// URL")
        vault_addr = get("VAULT_ADDR")
        if not vault_addr.startswith(("http://", "https://")):
            raise ConfigError("VAULTLINE_VAULT_ADDR must be an http(s):// URL")
        listen = get("GRPC_LISTEN", "127.0.0.1:50051")
        if ":" not in listen:
            raise ConfigError("VAULTLINE_GRPC_LISTEN must be host:port")
        tls = TlsFiles(*(Path(get(name)) for name in ("TLS_CA", "TLS_CERT", "TLS_KEY")))
        for name, path in zip(("TLS_CA", "TLS_CERT", "TLS_KEY"), (tls.ca, tls.cert, tls.key),
                              strict=True):
            if not path.is_file():
                raise ConfigError(f"VAULTLINE_{name} does not name a readable file")
        metrics = get("METRICS_LISTEN", "127.0.0.1:0")
        admin_file = env.get("VAULTLINE_KEYS_ADMIN_APPROLE_FILE")
        keys_admin = None
        if admin_file:
            try:
                keys_admin = AppRoleCredentials.from_file(Path(admin_file))
            except (OSError, ValueError, KeyError):
                raise ConfigError("VAULTLINE_KEYS_ADMIN_APPROLE_FILE cannot be read") from None
        return cls(
            database_url=database_url,
            vault_addr=vault_addr,
            vault_credentials=credentials,
            vault_key_name=get("VAULT_KEY_NAME", "vaultline-kek"),
            grpc_listen=listen,
            tls=tls,
            policy_path=policy_path_from_env(env),
            keys_admin_credentials=keys_admin,
            metrics_listen=None if metrics == "off" else metrics,
            audit_chain=audit_chain_from_env(env),
            **tuning_from_env(env),
        )


def _get(env: Mapping[str, str], name: str, default: str | None = None) -> str:
    value = env.get("VAULTLINE_" + name, default)
    if value is None or value == "":
        raise ConfigError(f"VAULTLINE_{name} is not set")
    return value


def audit_chain_from_env(env: Mapping[str, str] = os.environ) -> str:
    """VAULTLINE_AUDIT_CHAIN: lower-case letters, digits and '-', at most 63."""
    chain = env.get("VAULTLINE_AUDIT_CHAIN") or "default"
    if not re.fullmatch(r"[a-z0-9][a-z0-9-]{0,62}", chain):
        raise ConfigError("VAULTLINE_AUDIT_CHAIN must be lower-case letters, digits and '-'")
    return chain


def policy_path_from_env(env: Mapping[str, str] = os.environ) -> Path:
    """VAULTLINE_POLICY_FILE, else the access policy this package ships."""
    return Path(env.get("VAULTLINE_POLICY_FILE") or ACCESS_POLICY)


def tuning_from_env(env: Mapping[str, str] = os.environ) -> dict[str, Any]:
    """The tokenizer's tuning (data-key retirement, commit delay, message limits) as
    `TokenizerConfig` keyword arguments: read by `from_env` and by the dev stack alike."""

    def positive_int(name: str, default: str) -> int:
        try:
            value = int(_get(env, name, default))
        except ValueError:
            raise ConfigError(f"VAULTLINE_{name} must be an integer") from None
        if value <= 0:
            raise ConfigError(f"VAULTLINE_{name} must be positive")
        return value

    try:
        commit_delay_ms = float(_get(env, "COMMIT_DELAY_MS", "4"))
    except ValueError:
        raise ConfigError("VAULTLINE_COMMIT_DELAY_MS must be a number") from None
    if not 0 <= commit_delay_ms <= 50:  # also refuses nan
        raise ConfigError("VAULTLINE_COMMIT_DELAY_MS must be between 0 and 50")
    hold_seconds = positive_int("SECURITY_CODE_HOLD_SECONDS", "600")
    if hold_seconds > 3600:
        raise ConfigError("VAULTLINE_SECURITY_CODE_HOLD_SECONDS must be at most 3600 (1 hour)")
    return {
        "key_policy": KeyPolicy(
            max_uses=positive_int("DEK_MAX_USES", "10000000"),
            max_age=dt.timedelta(days=positive_int("DEK_MAX_AGE_DAYS", "90")),
        ),
        "commit_delay_ms": commit_delay_ms,
        "purge_interval_seconds": float(positive_int("PURGE_INTERVAL_SECONDS", "300")),
        "tokenize_request_retention": dt.timedelta(
            hours=positive_int("TOKENIZE_REQUEST_RETENTION_HOURS", "24")),
        "security_code_hold": dt.timedelta(seconds=hold_seconds),
        "security_code_sweep_seconds": float(positive_int("SECURITY_CODE_SWEEP_SECONDS", "30")),
        "recording_retention": dt.timedelta(days=positive_int("RECORDING_RETENTION_DAYS", "365")),
        **({"recordings_dir": Path(env["VAULTLINE_RECORDINGS_DIR"])}
           if env.get("VAULTLINE_RECORDINGS_DIR") else {}),
        "audit_checkpoint_seconds": float(positive_int("AUDIT_CHECKPOINT_SECONDS", "60")),
        "audit_checkpoint_records": positive_int("AUDIT_CHECKPOINT_RECORDS", "1000"),
        "max_unary_message_bytes": positive_int("MAX_UNARY_MESSAGE_BYTES", str(1 << 20)),
        "max_stream_message_bytes": positive_int("MAX_STREAM_MESSAGE_BYTES", str(4 << 20)),
    }


def vault_credentials_from_env(env: Mapping[str, str] = os.environ) -> AppRoleCredentials:
    """The tokenizer's AppRole: VAULTLINE_VAULT_APPROLE_FILE, or _ROLE_ID + _SECRET_ID."""
    approle_file = env.get("VAULTLINE_VAULT_APPROLE_FILE")
    if approle_file:
        try:
            return AppRoleCredentials.from_file(Path(approle_file))
        except (OSError, ValueError, KeyError):
            raise ConfigError("VAULTLINE_VAULT_APPROLE_FILE cannot be read") from None
    role_id = env.get("VAULTLINE_VAULT_ROLE_ID")
    secret_id = env.get("VAULTLINE_VAULT_SECRET_ID")
    if not role_id or not secret_id:
        raise ConfigError(
            "set VAULTLINE_VAULT_APPROLE_FILE, or VAULTLINE_VAULT_ROLE_ID and "
            "VAULTLINE_VAULT_SECRET_ID (the tokenizer's AppRole)"
        )
    return AppRoleCredentials(role_id, secret_id)


# ---- the running dev stack ---------------------------------------------------------------


def stack_file(home: str | Path) -> Path:
    """Where a running `vaultline dev up` describes itself (addresses, credential paths)."""
    return Path(home) / "dev" / "stack.json"


def read_stack(home: str | Path) -> dict[str, Any] | None:
    """The running dev stack's `stack.json`, or None when no stack runs under `home`."""
    try:
        value = json.loads(stack_file(home).read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def stack_value(home: str | Path, key: str) -> str | None:
    """A string from the running dev stack's `stack.json` (dotted keys reach into objects),
    or None when there is no running stack or no such value."""
    value: Any = read_stack(home)
    for part in key.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value if isinstance(value, str) else None


def env_or_stack(
    variable: str, home: str | Path, key: str, env: Mapping[str, str] = os.environ
) -> str:
    """`variable` from the environment, else `key` of the running dev stack."""
    value = env.get(variable) or stack_value(home, key)
    if not value:
        raise ConfigError(f"{variable} is not set and no dev stack is running")
    return value


def auditor_database_url(home: str | Path, env: Mapping[str, str] = os.environ) -> str:
    """The read-only auditor role's DSN (`vaultline audit`): VAULTLINE_AUDITOR_DATABASE_URL,
    else the running dev stack's `auditor_database_url`."""
    return env_or_stack("VAULTLINE_AUDITOR_DATABASE_URL", home, "auditor_database_url", env)


def keys_database_url(home: str | Path, env: Mapping[str, str] = os.environ) -> str:
    """The keys role's DSN (`vaultline keys`: wrapped data keys only):
    VAULTLINE_KEYS_DATABASE_URL, else the running dev stack's `keys_database_url`."""
    return env_or_stack("VAULTLINE_KEYS_DATABASE_URL", home, "keys_database_url", env)


def client_files(home: str | Path, who: str) -> tuple[Path, Path]:
    """The client certificate and key of the dev stack's identity `who` (`--as`)."""
    cert = stack_value(home, f"clients.{who}.cert")
    key = stack_value(home, f"clients.{who}.key")
    if not cert or not key:
        raise ConfigError(f"no client certificate for --as {who} in the dev stack")
    return Path(cert), Path(key)


def read_secret_file(path: Path) -> bytes:
    """A secret kept in a file (auth token, HMAC key): its bytes, surrounding whitespace
    stripped. The message names the file, never its content."""
    try:
        data = path.read_bytes().strip()
    except OSError:
        raise ConfigError(f"{path} cannot be read") from None
    if not data:
        raise ConfigError(f"{path} is empty")
    return data
