"""Authorization: the access policy (roles, identities, tenants), default deny, and quotas.

Pure: the policy is parsed from TOML text into frozen values; `Guard` answers "may this
identity call this method for this tenant" and keeps the per-identity token buckets of the
detokenize and tokenize quotas. The gRPC edge calls it for every call and audits every answer.

    PolicyError        the policy file is invalid (names the file and the field)
    Unauthenticated    no usable identity, or a revoked one           -> UNAUTHENTICATED
    AccessDenied       unknown identity/role, method or tenant not granted -> PERMISSION_DENIED
    QuotaExceeded      detokenization quota spent                       -> RESOURCE_EXHAUSTED
     └── TokenizeQuotaExceeded  tokenization quota spent                -> RESOURCE_EXHAUSTED
"""

from __future__ import annotations

import re
import time
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from ..errors import VaultlineError

ALL_TENANTS = "*"
DEFAULT_DAILY = 100  # unary Detokenize calls per identity and UTC day
KNOWN_METHODS = frozenset(
    {
        "Tokenize",
        "BatchTokenize",
        "GetToken",
        "Detokenize",
        "BatchDetokenize",
        "DeleteToken",
        "RedeemSecurityCode",
        "RecordDescopeChunk",
        "GetKeyStatus",
        "RotateKek",
        "ShredTenant",
        "ListAuditRecords",
        "VerifyAuditChain",
        *(
            "CreateBatch", "ApproveBatch", "GetBatch", "ListBatches", "ListBatchRows",
            "StartRun", "RenewRun", "FinishRun", "AbandonRun",
        ),
        *(
            "StartCapture", "WatchCapture", "GetCapture", "CancelCapture",
            "RestartCaptureField",
        ),
        *(
            "ListRecordings", "GetRecordingKey", "GetRecordingMedia", "ReleaseRecording",
            "PurgeRecordings",
        ),
    }
)
# Methods that reveal card data — or a recording's key: a purpose is required and a quota
# applies.
REVEALING_METHODS = frozenset({"Detokenize", "BatchDetokenize", "GetRecordingKey"})
# Methods that take card numbers in: each answer confirms something about a card (its token,
# whether it was seen before), so they have a quota of their own.
TOKENIZING_METHODS = frozenset({"Tokenize", "BatchTokenize"})
# What a role may be allowed beyond its methods: bulk reveals without a settlement batch, and
# tokenizing cards found in stored data without their expiry (de-scoping).
_ROLE_FLAGS = ("reveal_without_batch", "tokenize_without_expiry")
_NAME = re.compile(r"[a-z0-9][a-z0-9-]{0,62}\Z")
_TENANT = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}\Z")
_URI = re.compile(r"spiffe://vaultline/([a-z0-9][a-z0-9-]{0,62})/([a-z0-9][a-z0-9-]{0,62})\Z")


class PolicyError(ValueError):
    """The access policy is invalid; the message names the file and the field."""


class Unauthenticated(VaultlineError):
    reason = "UNAUTHENTICATED"
    message = "the caller could not be authenticated"

    def __init__(self, reason: str = "UNAUTHENTICATED") -> None:
        super().__init__()
        self.reason = reason


class AccessDenied(VaultlineError):
    reason = "PERMISSION_DENIED"
    message = "the caller may not do this"

    def __init__(self, reason: str) -> None:
        super().__init__()
        self.reason = reason


class QuotaExceeded(VaultlineError):
    reason = "DETOKENIZE_QUOTA_EXCEEDED"
    message = "detokenization quota exceeded; retry later"


class TokenizeQuotaExceeded(QuotaExceeded):
    reason = "TOKENIZE_QUOTA_EXCEEDED"
    message = "tokenization quota exceeded; retry later"


@dataclass(frozen=True, slots=True)
class Quota:
    rate_per_second: float
    burst: int


@dataclass(frozen=True, slots=True)
class Grant:
    """What one identity may do."""

    uri: str
    role: str
    methods: frozenset[str]
    tenants: frozenset[str]
    revoked: bool = False
    quota: Quota | None = None  # detokenization
    tokenize_quota: Quota | None = None
    daily_reveals: int | None = None  # unary Detokenize calls a UTC day; None: no budget
    reveals_need_batch: bool = True  # BatchDetokenize only for a batch this identity runs
    runs_batches: bool = False  # may run batches it did not create (never one it approved)
    # May tokenize cards found in stored data without their expiry (`tokenize_without_expiry`
    # on the role: de-scoping).
    tokenizes_without_expiry: bool = False

    def allows_tenant(self, tenant: str) -> bool:
        return ALL_TENANTS in self.tenants or tenant in self.tenants


@dataclass(frozen=True)
class Policy:
    roles: Mapping[str, frozenset[str]]
    grants: Mapping[str, Grant] = field(default_factory=dict)
    # Roles whose bulk reveals need no settlement batch (`reveal_without_batch = true`).
    unbatched_roles: frozenset[str] = frozenset()
    # Roles that may tokenize without an expiry (`tokenize_without_expiry = true`).
    expiryless_roles: frozenset[str] = frozenset()


# ---- parsing -------------------------------------------------------------------------------


def load_policy(path: Path) -> Policy:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise PolicyError(f"{path}: cannot read the access policy ({exc.strerror})") from None
    return parse_policy(text, source=str(path))


def parse_policy(text: str, *, source: str = "<policy>") -> Policy:
    def fail(where: str, what: str) -> PolicyError:
        return PolicyError(f"{source}: {where}: {what}")

    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise fail("syntax", str(exc)) from None
    unknown = set(doc) - {"version", "roles", "identities", "detokenize_quota", "tokenize_quota"}
    if unknown:
        raise fail(sorted(unknown)[0], "unknown section")
    if doc.get("version") != 1:
        raise fail("version", "must be 1")

    roles_doc = _table(doc, "roles", fail)
    if not roles_doc:
        raise fail("roles", "at least one role is required")
    roles: dict[str, frozenset[str]] = {}
    unbatched: set[str] = set()
    expiryless: set[str] = set()
    for role, spec in roles_doc.items():
        where = f"roles.{role}"
        if not _NAME.match(role):
            raise fail(where, "role names are lower-case letters, digits and '-'")
        if not isinstance(spec, dict) or set(spec) - {"methods", *_ROLE_FLAGS}:
            raise fail(where, "expected a table with `methods` (and "
                       f"{', '.join(f'`{f}`' for f in _ROLE_FLAGS)})")
        for flag, roles_with in (("reveal_without_batch", unbatched),
                                 ("tokenize_without_expiry", expiryless)):
            value = spec.get(flag, False)
            if not isinstance(value, bool):
                raise fail(f"{where}.{flag}", "must be true or false")
            if value:
                roles_with.add(role)
        methods = spec.get("methods")
        if not isinstance(methods, list) or not all(isinstance(m, str) for m in methods):
            raise fail(f"{where}.methods", "must be a list of RPC names")
        bad = [m for m in methods if m not in KNOWN_METHODS]
        if bad:
            raise fail(f"{where}.methods", f"unknown method {bad[0]!r}")
        roles[role] = frozenset(methods)

    defaults = {
        kind: _quota(_table(doc, f"{kind}_quota", fail), f"{kind}_quota", fail)
        if f"{kind}_quota" in doc else None
        for kind in ("detokenize", "tokenize")
    }
    daily_default = _daily(_table(doc, "detokenize_quota", fail).get("daily", DEFAULT_DAILY),
                           "detokenize_quota.daily", fail)

    grants: dict[str, Grant] = {}
    for uri, spec in _table(doc, "identities", fail).items():
        where = f'identities."{uri}"'
        match = _URI.match(uri)
        if not match:
            raise fail(where, "must be spiffe://vaultline/<role>/<name>")
        role = match.group(1)
        if role not in roles:
            raise fail(where, f"role {role!r} is not defined under [roles]")
        if not isinstance(spec, dict):
            raise fail(where, "expected a table")
        extra = set(spec) - {"tenants", "revoked", "detokenize_rate", "detokenize_burst",
                             "tokenize_rate", "tokenize_burst", "detokenize_daily",
                             "runs_batches"}
        if extra:
            raise fail(f"{where}.{sorted(extra)[0]}", "unknown field")
        tenants = spec.get("tenants")
        if not isinstance(tenants, list) or not tenants:
            raise fail(f"{where}.tenants", "must be a non-empty list (\"*\" for all)")
        for tenant in tenants:
            if tenant != ALL_TENANTS and not (isinstance(tenant, str) and _TENANT.match(tenant)):
                raise fail(f"{where}.tenants", f"invalid tenant {tenant!r}")
        revoked = spec.get("revoked", False)
        if not isinstance(revoked, bool):
            raise fail(f"{where}.revoked", "must be true or false")
        quotas = {kind: _identity_quota(spec, kind, defaults[kind], where, fail)
                  for kind in ("detokenize", "tokenize")}
        runs_batches = spec.get("runs_batches", False)
        if not isinstance(runs_batches, bool):
            raise fail(f"{where}.runs_batches", "must be true or false")
        daily = (_daily(spec["detokenize_daily"], f"{where}.detokenize_daily", fail)
                 if "detokenize_daily" in spec else daily_default)
        grants[uri] = Grant(uri, role, roles[role], frozenset(tenants), revoked,
                            quotas["detokenize"], quotas["tokenize"], daily,
                            role not in unbatched, runs_batches, role in expiryless)
    return Policy(roles, grants, frozenset(unbatched), frozenset(expiryless))


def _table(
    doc: dict[str, Any], key: str, fail: Callable[[str, str], PolicyError]
) -> dict[str, Any]:
    value = doc.get(key, {})
    if not isinstance(value, dict):
        raise fail(key, "expected a table")
    return value


def _identity_quota(
    spec: dict[str, Any], kind: str, default: Quota | None, where: str,
    fail: Callable[[str, str], PolicyError],
) -> Quota | None:
    """An identity's `<kind>_rate` / `<kind>_burst` over the section default."""
    if f"{kind}_rate" not in spec and f"{kind}_burst" not in spec:
        return default
    return _quota(
        {
            "rate_per_second": spec.get(
                f"{kind}_rate", default.rate_per_second if default else None),
            "burst": spec.get(f"{kind}_burst", default.burst if default else None),
        },
        where,
        fail,
    )


def _daily(value: Any, where: str, fail: Callable[[str, str], PolicyError]) -> int | None:
    """A daily budget: a non-negative integer, or -1 for none."""
    if not isinstance(value, int) or isinstance(value, bool) or value < -1:
        raise fail(where, "must be a whole number of calls a day (-1: no budget)")
    return None if value == -1 else value


def _quota(spec: dict[str, Any], where: str, fail: Callable[[str, str], PolicyError]) -> Quota:
    rate, burst = spec.get("rate_per_second"), spec.get("burst")
    if not isinstance(rate, int | float) or isinstance(rate, bool) or rate <= 0:
        raise fail(f"{where}.rate_per_second", "must be a positive number")
    if not isinstance(burst, int) or isinstance(burst, bool) or burst < 1:
        raise fail(f"{where}.burst", "must be a positive integer")
    return Quota(float(rate), burst)


# ---- the guard -----------------------------------------------------------------------------


class QuotaBuckets(Protocol):
    """Where the quota buckets live: this process (`LocalBuckets`), or memory shared by a
    server's worker processes (`vaultline.workers.SharedBuckets`), so that N workers do not
    grant an identity N times its quota."""

    def take(self, key: str, burst: float, rate: float, count: int, now: float) -> bool:
        """Refill `key`'s bucket to `now` and spend `count` from it; False (nothing spent)
        when it holds fewer."""


class _Bucket:
    __slots__ = ("tokens", "stamp")

    def __init__(self, tokens: float, stamp: float) -> None:
        self.tokens = tokens
        self.stamp = stamp


class LocalBuckets:
    """The buckets of one process."""

    def __init__(self) -> None:
        self._buckets: dict[str, _Bucket] = {}

    def take(self, key: str, burst: float, rate: float, count: int, now: float) -> bool:
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = _Bucket(burst, now)
        bucket.tokens = min(burst, bucket.tokens + (now - bucket.stamp) * rate)
        bucket.stamp = now
        if bucket.tokens < count:
            return False
        bucket.tokens -= count
        return True


def quota_keys(policy: Policy) -> list[str]:
    """Every bucket key a policy can use: one per identity and quota kind."""
    return sorted(f"{kind}{uri}" for uri in policy.grants for kind in ("", "tokenize:"))


class Guard:
    """Answers access questions for one policy; spends quotas from its buckets (this
    process's by default)."""

    def __init__(self, policy: Policy, clock: Callable[[], float] = time.monotonic,
                 buckets: QuotaBuckets | None = None) -> None:
        self.policy = policy
        self._clock = clock
        self._buckets: QuotaBuckets = buckets if buckets is not None else LocalBuckets()

    def authorize(self, uri: str, role: str, method: str) -> Grant:
        """The caller's grant if it may call `method`; raises otherwise. Default deny."""
        grant = self.policy.grants.get(uri)
        if role not in self.policy.roles:
            raise AccessDenied("UNKNOWN_ROLE")
        if grant is None:
            raise AccessDenied("UNKNOWN_IDENTITY")
        if grant.revoked:
            raise Unauthenticated("IDENTITY_REVOKED")
        if method not in grant.methods:
            raise AccessDenied("METHOD_NOT_ALLOWED")
        return grant

    @staticmethod
    def check_tenant(grant: Grant, tenant: str) -> None:
        if not grant.allows_tenant(tenant or "default"):
            raise AccessDenied("TENANT_NOT_ALLOWED")

    def take_quota(self, grant: Grant, count: int, *, tokenize: bool = False) -> None:
        """Spend `count` reveals (or, with `tokenize`, cards taken in) from the identity's
        bucket, or refuse them all."""
        quota = grant.tokenize_quota if tokenize else grant.quota
        if quota is None or count <= 0:
            return
        key = ("tokenize:" if tokenize else "") + grant.uri
        if not self._buckets.take(key, float(quota.burst), quota.rate_per_second, count,
                                  self._clock()):
            raise TokenizeQuotaExceeded() if tokenize else QuotaExceeded()
