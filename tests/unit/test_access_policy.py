"""The access policy (pure): parsing, default deny, and the two quotas per identity."""

from __future__ import annotations

import pytest

from vaultline.resources import ACCESS_POLICY
from vaultline.security.access import (
    AccessDenied,
    Guard,
    PolicyError,
    Quota,
    QuotaExceeded,
    TokenizeQuotaExceeded,
    load_policy,
    parse_policy,
)

POLICY = """
version = 1
[roles.ivr]
methods = ["Tokenize", "BatchTokenize", "GetToken"]
[roles.settlement]
methods = ["Detokenize", "GetToken"]
[detokenize_quota]
rate_per_second = 10.0
burst = 100
[tokenize_quota]
rate_per_second = 5.0
burst = 3
[identities."spiffe://vaultline/ivr/ivr-1"]
tenants = ["*"]
[identities."spiffe://vaultline/ivr/bulk"]
tenants = ["*"]
tokenize_rate = 1000.0
tokenize_burst = 50000
[identities."spiffe://vaultline/settlement/s-1"]
tenants = ["default"]
"""


def test_each_identity_has_both_quotas_with_its_own_overrides() -> None:
    policy = parse_policy(POLICY)
    ivr = policy.grants["spiffe://vaultline/ivr/ivr-1"]
    bulk = policy.grants["spiffe://vaultline/ivr/bulk"]
    assert (ivr.quota, ivr.tokenize_quota) == (Quota(10.0, 100), Quota(5.0, 3))
    assert bulk.tokenize_quota == Quota(1000.0, 50000) and bulk.quota == Quota(10.0, 100)


def test_the_tokenize_bucket_is_separate_and_refuses_with_its_own_reason() -> None:
    now = [0.0]
    guard = Guard(parse_policy(POLICY), clock=lambda: now[0])
    grant = guard.authorize("spiffe://vaultline/ivr/ivr-1", "ivr", "Tokenize")
    guard.take_quota(grant, 3, tokenize=True)
    with pytest.raises(TokenizeQuotaExceeded) as refused:
        guard.take_quota(grant, 1, tokenize=True)
    assert refused.value.reason == "TOKENIZE_QUOTA_EXCEEDED"
    assert isinstance(refused.value, QuotaExceeded)  # RESOURCE_EXHAUSTED, like reveals
    guard.take_quota(grant, 100)  # the detokenize bucket is untouched
    now[0] = 0.2  # refills one card
    guard.take_quota(grant, 1, tokenize=True)


@pytest.mark.parametrize(("edit", "field"), [
    ('tokenize_rate = 0', "rate_per_second"),
    ('tokenize_burst = "many"', "burst"),
    ('tokenise_rate = 5.0', "tokenise_rate"),
])
def test_a_bad_quota_names_its_field(edit: str, field: str) -> None:
    text = POLICY.replace('[identities."spiffe://vaultline/settlement/s-1"]\n',
                          f'[identities."spiffe://vaultline/settlement/s-1"]\n{edit}\n')
    with pytest.raises(PolicyError, match=field):
        parse_policy(text)


def test_the_shipped_policy_keeps_tokenizing_inside_the_card_data_zone() -> None:
    policy = load_policy(ACCESS_POLICY)
    tokenizers = {role for role, methods in policy.roles.items()
                  if methods & {"Tokenize", "BatchTokenize"}}
    # Never the CRM: it would be a PAN oracle. De-scoping (issue 18) runs inside the zone.
    assert tokenizers == {"ivr", "intake", "descope"}
    # Only de-scoping tokenizes cards without an expiry, and it reveals nothing.
    assert policy.expiryless_roles == {"descope"}
    assert not policy.roles["descope"] & {"Detokenize", "BatchDetokenize", "Tokenize"}
    assert policy.roles["crm"] == {"GetToken", "DeleteToken", "StartCapture", "WatchCapture",
                                   "GetCapture", "CancelCapture", "RestartCaptureField"}
    # A held security code goes to the payment service alone (issue 15, item 3).
    assert {role for role, methods in policy.roles.items()
            if "RedeemSecurityCode" in methods} == {"payments"}
    guard = Guard(policy)
    with pytest.raises(AccessDenied):
        guard.authorize("spiffe://vaultline/crm/crm-1", "crm", "Tokenize")
    for grant in policy.grants.values():
        assert grant.tokenize_quota is not None and grant.quota is not None


def test_bulk_reveals_need_a_batch_unless_a_role_opts_out() -> None:
    policy = parse_policy(POLICY.replace(
        '[roles.settlement]\nmethods = ["Detokenize", "GetToken"]',
        '[roles.settlement]\nmethods = ["Detokenize", "GetToken"]\n'
        '[roles.bulk]\nmethods = ["BatchDetokenize"]\nreveal_without_batch = true\n'
        '[identities."spiffe://vaultline/bulk/b-1"]\ntenants = ["*"]'))
    assert policy.grants["spiffe://vaultline/settlement/s-1"].reveals_need_batch
    assert not policy.grants["spiffe://vaultline/bulk/b-1"].reveals_need_batch
    assert policy.unbatched_roles == {"bulk"}


def test_tokenizing_without_expiry_is_a_role_flag() -> None:
    policy = parse_policy(POLICY.replace(
        '[roles.settlement]\nmethods = ["Detokenize", "GetToken"]',
        '[roles.settlement]\nmethods = ["Detokenize", "GetToken"]\n'
        '[roles.descope]\nmethods = ["BatchTokenize"]\ntokenize_without_expiry = true\n'
        '[identities."spiffe://vaultline/descope/d-1"]\ntenants = ["*"]'))
    assert policy.grants["spiffe://vaultline/descope/d-1"].tokenizes_without_expiry
    assert not policy.grants["spiffe://vaultline/settlement/s-1"].tokenizes_without_expiry
    with pytest.raises(PolicyError, match="tokenize_without_expiry: must be true or false"):
        parse_policy(POLICY.replace(
            '[roles.settlement]\nmethods = ["Detokenize", "GetToken"]',
            '[roles.settlement]\nmethods = ["Detokenize", "GetToken"]\n'
            'tokenize_without_expiry = "yes"'))


def test_the_daily_detokenize_budget_defaults_to_100_and_is_overridable() -> None:
    policy = parse_policy(POLICY.replace(
        '[identities."spiffe://vaultline/settlement/s-1"]\n',
        '[identities."spiffe://vaultline/settlement/s-1"]\ndetokenize_daily = 7\n'
        'runs_batches = true\n'))
    assert policy.grants["spiffe://vaultline/ivr/ivr-1"].daily_reveals == 100
    grant = policy.grants["spiffe://vaultline/settlement/s-1"]
    assert (grant.daily_reveals, grant.runs_batches) == (7, True)
    unlimited = parse_policy(POLICY.replace("burst = 100\n", "burst = 100\ndaily = -1\n"))
    assert unlimited.grants["spiffe://vaultline/ivr/ivr-1"].daily_reveals is None


@pytest.mark.parametrize(("edit", "field"), [
    ("detokenize_daily = -2", "detokenize_daily"),
    ('detokenize_daily = "lots"', "detokenize_daily"),
    ("runs_batches = 1", "runs_batches"),
])
def test_bad_dual_control_fields_name_themselves(edit: str, field: str) -> None:
    text = POLICY.replace('[identities."spiffe://vaultline/settlement/s-1"]\n',
                          f'[identities."spiffe://vaultline/settlement/s-1"]\n{edit}\n')
    with pytest.raises(PolicyError, match=field):
        parse_policy(text)


def test_the_shipped_policy_puts_bulk_reveals_under_dual_control() -> None:
    policy = load_policy(ACCESS_POLICY)
    assert policy.unbatched_roles == frozenset()
    settlement = policy.roles["settlement"]
    assert {"CreateBatch", "ApproveBatch", "StartRun", "BatchDetokenize"} <= settlement
    for role, methods in policy.roles.items():
        if role != "settlement":
            assert not methods & {"CreateBatch", "ApproveBatch", "StartRun"}, role
    for grant in policy.grants.values():
        assert grant.daily_reveals == 100 and not grant.runs_batches
