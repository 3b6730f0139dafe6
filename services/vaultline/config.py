"""Tokenizer configuration: one frozen value, read from the environment and checked up front.

Variables (all `VAULTLINE_`-prefixed):
  DATABASE_URL        postgresql://user:password@host:port/db of the service's least-privilege role
  VAULT_ADDR          OpenBao/Vault address, e.g. http://127.0.0.1:8200
  VAULT_ROLE_ID       AppRole role id of the tokenizer        } or VAULT_APPROLE_FILE: a JSON
  VAULT_SECRET_ID     AppRole secret id of the tokenizer      } file with role_id and secret_id
  VAULT_KEY_NAME      transit key name (default vaultline-kek)
  GRPC_LISTEN         host:port to serve gRPC on (default 127.0.0.1:50051)
  DEK_MAX_USES        encryptions before a card-data key retires (default 10,000,000)
  DEK_MAX_AGE_DAYS    age at which a card-data key retires (default 90)
"""

from __future__ import annotations

import datetime as dt
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from .keyring import KeyPolicy
from .vault import AppRoleCredentials


class ConfigError(ValueError):
    """A setting is missing or malformed; the message names the variable, never a secret."""


@dataclass(frozen=True)
class TokenizerConfig:
    database_url: str
    vault_addr: str
    vault_credentials: AppRoleCredentials = field(repr=False)
    vault_key_name: str = "vaultline-kek"
    grpc_listen: str = "127.0.0.1:50051"
    key_policy: KeyPolicy = KeyPolicy()
    db_pool_size: int = 10

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> TokenizerConfig:
        def get(name: str, default: str | None = None) -> str:
            value = env.get("VAULTLINE_" + name, default)
            if value is None or value == "":
                raise ConfigError(f"VAULTLINE_{name} is not set")
            return value

        def positive_int(name: str, default: str) -> int:
            raw = get(name, default)
            try:
                value = int(raw)
            except ValueError:
                raise ConfigError(f"VAULTLINE_{name} must be an integer") from None
            if value <= 0:
                raise ConfigError(f"VAULTLINE_{name} must be positive")
            return value

        approle_file = env.get("VAULTLINE_VAULT_APPROLE_FILE")
        if approle_file:
            try:
                credentials = AppRoleCredentials.from_file(Path(approle_file))
            except (OSError, ValueError, KeyError):
                raise ConfigError("VAULTLINE_VAULT_APPROLE_FILE cannot be read") from None
        else:
            credentials = AppRoleCredentials(get("VAULT_ROLE_ID"), get("VAULT_SECRET_ID"))
        database_url = get("DATABASE_URL")
        if not database_url.startswith(("postgresql://", "postgres://")):
            raise ConfigError("VAULTLINE_DATABASE_URL must be a postgresql:// URL")
        vault_addr = get("VAULT_ADDR")
        if not vault_addr.startswith(("http://", "https://")):
            raise ConfigError("VAULTLINE_VAULT_ADDR must be an http(s):// URL")
        listen = get("GRPC_LISTEN", "127.0.0.1:50051")
        if ":" not in listen:
            raise ConfigError("VAULTLINE_GRPC_LISTEN must be host:port")
        return cls(
            database_url=database_url,
            vault_addr=vault_addr,
            vault_credentials=credentials,
            vault_key_name=get("VAULT_KEY_NAME", "vaultline-kek"),
            grpc_listen=listen,
            key_policy=KeyPolicy(
                max_uses=positive_int("DEK_MAX_USES", "10000000"),
                max_age=dt.timedelta(days=positive_int("DEK_MAX_AGE_DAYS", "90")),
            ),
        )
