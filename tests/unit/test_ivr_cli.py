"""`vaultline ivr serve`'s configuration parsing (pure)."""

from __future__ import annotations

import pytest

from vaultline.cli.ivr import parse_card_types
from vaultline.config import ConfigError


def test_pay_card_types_parse_per_tenant_and_refuse_unknown_names() -> None:
    assert parse_card_types("default=visa mastercard; demo=visa") == {
        "default": "visa mastercard", "demo": "visa"}
    assert parse_card_types("") == {}
    for bad in ("default", "default=", "=visa", "default=visa bankcard"):
        with pytest.raises(ConfigError):
            parse_card_types(bad)
