"""Tokenizer configuration from the environment: the commit delay, the security code hold."""

from __future__ import annotations

from pathlib import Path

import pytest

from vaultline.config import ConfigError, TokenizerConfig


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    for name in ("ca.crt", "server.crt", "server.key"):
        (tmp_path / name).write_text("placeholder")
    return {
        "VAULTLINE_DATABASE_URL": "postgresql://app:pw@127.0.0.1:5432/vaultline",
        "VAULTLINE_VAULT_ADDR": "http://127.0.0.1:8200",
        "VAULTLINE_VAULT_ROLE_ID": "role",
        "VAULTLINE_VAULT_SECRET_ID": "secret",
        "VAULTLINE_TLS_CA": str(tmp_path / "ca.crt"),
        "VAULTLINE_TLS_CERT": str(tmp_path / "server.crt"),
        "VAULTLINE_TLS_KEY": str(tmp_path / "server.key"),
        **{"VAULTLINE_" + k: v for k, v in extra.items()},
    }


def test_commit_delay_defaults_to_four_milliseconds(tmp_path: Path) -> None:
    assert TokenizerConfig.from_env(_env(tmp_path)).commit_delay_ms == 4.0


@pytest.mark.parametrize("value, expected", [("0", 0.0), ("0.5", 0.5), ("50", 50.0)])
def test_commit_delay_accepts_zero_to_fifty(tmp_path: Path, value: str, expected: float) -> None:
    config = TokenizerConfig.from_env(_env(tmp_path, COMMIT_DELAY_MS=value))
    assert config.commit_delay_ms == expected


@pytest.mark.parametrize("value", ["-1", "51", "2ms", "nan"])
def test_commit_delay_rejects_the_rest(tmp_path: Path, value: str) -> None:
    with pytest.raises(ConfigError, match="VAULTLINE_COMMIT_DELAY_MS"):
        TokenizerConfig.from_env(_env(tmp_path, COMMIT_DELAY_MS=value))


def test_security_codes_are_held_ten_minutes_by_default(tmp_path: Path) -> None:
    config = TokenizerConfig.from_env(_env(tmp_path))
    assert config.security_code_hold.total_seconds() == 600


@pytest.mark.parametrize("value, seconds", [("1", 1), ("3600", 3600)])
def test_the_security_code_hold_is_configurable_up_to_an_hour(
        tmp_path: Path, value: str, seconds: int) -> None:
    config = TokenizerConfig.from_env(_env(tmp_path, SECURITY_CODE_HOLD_SECONDS=value))
    assert config.security_code_hold.total_seconds() == seconds


@pytest.mark.parametrize("value", ["3601", "0", "-5", "10m"])
def test_a_longer_or_malformed_security_code_hold_is_refused(tmp_path: Path, value: str) -> None:
    with pytest.raises(ConfigError, match="VAULTLINE_SECURITY_CODE_HOLD_SECONDS"):
        TokenizerConfig.from_env(_env(tmp_path, SECURITY_CODE_HOLD_SECONDS=value))
