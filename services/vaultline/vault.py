"""The only module that talks to OpenBao/Vault, via hvac: transit data keys under the KEK, and
the audit chain's checkpoints (signed by a transit key, filed in KV v2).

Errors::

    VaultError                  base; a fixed message, the operation and HTTP status, never
     |                          key material, tokens or response bodies
     +-- VaultUnavailable       sealed, not initialised, standby without an active node,
     |                          connection refused, timeout, 412, 429, 5xx
     +-- VaultPermissionDenied  401/403 that survive one re-login; AppRole login rejected
     +-- VaultInvalidResponse   any other 4xx, a malformed payload, a failed batch item
                                (``.index`` names the item, nothing else about it)

One table, ``_ERRORS``, turns HTTP statuses and transport exceptions into these; for the
domain, ``run_transit`` turns every one of them into ``errors.KeyServiceUnavailable`` (as
``store.translated_errors`` does for PostgreSQL).

The client is synchronous (hvac/requests) and thread-safe; async callers use
``asyncio.to_thread``. It authenticates lazily with AppRole and re-authenticates once when a
request is refused with 401/403 (expired or revoked token) or the token is about to expire.

Given every node of a Raft cluster (``addr`` is a comma-separated list), it talks to one node
(any node forwards to the active one) and, when that node is unreachable or has no active node
to forward to (a leader change), moves on to the next and tries again, for at most
``FAILOVER_SECONDS``: every call it makes is safe to repeat (a data key generated twice is one
unused key; a checkpoint is filed with check-and-set).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import dataclasses
import logging
import re
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final, TypeVar

import hvac
import hvac.adapters
import hvac.exceptions
import requests

from .errors import KeyServiceUnavailable

__all__ = [
    "AppRoleCredentials",
    "KeyStatus",
    "TransitClient",
    "VaultError",
    "VaultInvalidResponse",
    "VaultPermissionDenied",
    "VaultUnavailable",
    "run_transit",
    "wrapped_version",
]

_log = logging.getLogger(__name__)

DATA_KEY_BYTES: Final = 32
AUDIT_KEY: Final = "vaultline-audit"  # Ed25519, signs audit checkpoints
# Ed25519: the recording ingest signs each certification (certified / quarantined, the media's
# hash, where the tones are); the tokenizer verifies it before handing out a recording's key.
RECORDING_CERT_KEY: Final = "vaultline-recording-certs"
KV_MOUNT: Final = "vaultline-kv"
CHECKPOINTS: Final = "audit/checkpoints"
# OpenBao caps one request at max_request_json_strings (1000 by default) JSON strings; each
# batch item costs two (key and value), so larger batches go out in chunks of this size.
MAX_BATCH: Final = 250
# Re-login this long before the token's TTL runs out rather than eat a 403 first.
_TOKEN_RENEW_MARGIN_S: Final = 30.0
# A leader change takes OpenBao 1-3 s on a local cluster (load/README.md); the bound leaves
# room for a slow machine and stays under callers' deadlines.
FAILOVER_SECONDS: Final = 15.0
_FAILOVER_PAUSE_S: Final = 0.2


# The recording vault's key (issue 17): RSA-4096 in transit, not exportable; Twilio wraps each
# recording's content key to its public half.
RECORDINGS_KEY: Final = "vaultline-recordings"


class VaultError(Exception):
    """Base of all OpenBao/Vault errors. ``operation`` and ``status`` say what failed."""

    def __init__(self, message: str, *, operation: str = "", status: int | None = None) -> None:
        super().__init__(message)
        self.operation = operation
        self.status = status


class VaultUnavailable(VaultError):
    """The server cannot serve now (sealed, not ready, unreachable); worth retrying later."""


class VaultPermissionDenied(VaultError):
    """The server refuses this identity: policy denies it, or the AppRole login is rejected."""


class VaultInvalidResponse(VaultError):
    """The server rejected the request or answered something unusable."""

    def __init__(self, message: str, *, operation: str = "", status: int | None = None,
                 index: int | None = None) -> None:
        super().__init__(message, operation=operation, status=status)
        self.index = index


class _HTTPStatusError(Exception):
    """What our hvac adapter raises for a non-2xx answer instead of hvac's own exceptions,
    whose text embeds the whole response body: a failed transit batch answers 400 *and* echoes
    the plaintext data keys of the items that succeeded. Its str() is the status only."""

    def __init__(self, status: int, body: Mapping[str, Any] | None) -> None:
        super().__init__(f"HTTP {status}")
        self.status = status
        self.body = body


class _Adapter(hvac.adapters.JSONAdapter):
    def _raise_for_error(self, method: str, url: str, response: requests.Response) -> None:
        body: Any = None
        try:
            body = response.json()
        except ValueError:
            pass
        raise _HTTPStatusError(response.status_code, body if isinstance(body, dict) else None)


# THE table: HTTP statuses and transport failures -> our errors. Statuses not listed map by
# class: 5xx -> VaultUnavailable, anything else -> VaultInvalidResponse.
_ERRORS: Final[Mapping[int | type[BaseException], type[VaultError]]] = {
    400: VaultInvalidResponse,  # bad input; AppRole login answers bad credentials with 400 too
    401: VaultPermissionDenied,
    403: VaultPermissionDenied,  # policy denies it, or the token expired / was revoked
    404: VaultInvalidResponse,  # no such key or mount
    405: VaultInvalidResponse,
    412: VaultUnavailable,  # a standby has not caught up with the active node yet
    429: VaultUnavailable,  # rate limited
    500: VaultUnavailable,  # e.g. "local node not active but active cluster node not found"
    501: VaultUnavailable,  # not initialised
    503: VaultUnavailable,  # sealed
    requests.exceptions.ConnectionError: VaultUnavailable,
    requests.exceptions.Timeout: VaultUnavailable,
    requests.exceptions.RequestException: VaultUnavailable,
    hvac.exceptions.VaultError: VaultInvalidResponse,  # hvac's own parameter checks
}

_REASONS: Final[Mapping[type[VaultError], str]] = {
    VaultUnavailable: "OpenBao is unavailable",
    VaultPermissionDenied: "OpenBao denied the request",
    VaultInvalidResponse: "OpenBao rejected the request or answered unexpectedly",
}


_T = TypeVar("_T")


async def run_transit(fn: Callable[..., _T], *args: Any) -> _T:
    """Run a blocking client call in a thread, for async callers (the keyring, the admin
    servicers). Whatever went wrong with OpenBao is an outage to their callers:
    `KeyServiceUnavailable`; a refusal (permission, protocol) is also logged, by kind only."""
    try:
        return await asyncio.to_thread(fn, *args)
    except VaultUnavailable as exc:
        raise KeyServiceUnavailable() from exc
    except VaultError as exc:
        _log.error("the key service refused %s: %s", exc.operation, type(exc).__name__)
        raise KeyServiceUnavailable() from exc


def _translate(operation: str, exc: BaseException) -> VaultError:
    status: int | None = None
    cls: type[VaultError] | None = None
    if isinstance(exc, _HTTPStatusError):
        status = exc.status
        cls = _ERRORS.get(status)
        if cls is None:
            cls = VaultUnavailable if status >= 500 else VaultInvalidResponse
    else:
        for kind in type(exc).__mro__:
            cls = _ERRORS.get(kind)
            if cls is not None:
                break
        cls = cls or VaultInvalidResponse
    suffix = f" (HTTP {status})" if status is not None else f" ({type(exc).__name__})"
    return cls(f"{operation}: {_REASONS[cls]}{suffix}", operation=operation, status=status)


def _invalid(operation: str, what: str, index: int | None = None) -> VaultInvalidResponse:
    return VaultInvalidResponse(f"{operation}: {what}", operation=operation, index=index)


@dataclass(frozen=True)
class AppRoleCredentials:
    """An AppRole login. ``secret_id`` is a secret: it is kept out of repr()."""

    role_id: str
    secret_id: str = dataclasses.field(repr=False)

    @classmethod
    def from_file(cls, path: Path | str) -> AppRoleCredentials:
        """Read ``{"role_id": ..., "secret_id": ...}`` (the devstack's approle-*.json)."""
        import json

        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ValueError(f"cannot read AppRole credentials from {path}: "
                             f"{type(exc).__name__}") from None
        role_id = data.get("role_id") if isinstance(data, dict) else None
        secret_id = data.get("secret_id") if isinstance(data, dict) else None
        if not (isinstance(role_id, str) and role_id and isinstance(secret_id, str) and secret_id):
            raise ValueError(f"{path} must hold non-empty string fields role_id and secret_id")
        return cls(role_id=role_id, secret_id=secret_id)


@dataclass(frozen=True)
class KeyStatus:
    """Metadata of the transit KEK (never key material). ``versions`` maps each live version
    to its creation time (ISO 8601, UTC)."""

    name: str
    type: str
    latest_version: int
    min_decryption_version: int
    min_encryption_version: int
    exportable: bool
    deletion_allowed: bool
    versions: dict[int, str]


_WRAPPED_RE: Final = re.compile(r"vault:v([1-9][0-9]{0,9}):[A-Za-z0-9+/=]+")


def wrapped_version(wrapped: str) -> int:
    """The KEK version a transit ciphertext was made with: ``'vault:v3:...'`` -> 3."""
    match = _WRAPPED_RE.fullmatch(wrapped) if isinstance(wrapped, str) else None
    if match is None:
        raise ValueError("not a transit ciphertext of the form vault:v<N>:<base64>")
    return int(match.group(1))



class TransitClient:
    """Transit operations on one KEK for one AppRole identity."""

    def __init__(self, addr: str, credentials: AppRoleCredentials, *,
                 key_name: str = "vaultline-kek", mount: str = "transit",
                 timeout: float = 5.0, approle_mount: str = "approle",
                 verify: bool | str = True, audit_chain: str = "default") -> None:
        """`audit_chain` names the folder of this deployment's audit checkpoints (several
        vault databases may share one OpenBao)."""
        self._addrs = [a.strip().rstrip("/") for a in addr.split(",") if a.strip()]
        if not self._addrs:
            raise ValueError("no OpenBao address")
        self._addr = self._addrs[0]
        self._node_lock = threading.Lock()
        self._checkpoints = f"{CHECKPOINTS}/{audit_chain}"
        self._credentials = credentials
        self._key = key_name
        self._mount = mount.strip("/")
        self._approle_mount = approle_mount.strip("/")
        # token="" (not None): hvac would otherwise pick up VAULT_TOKEN or ~/.vault-token.
        self._client = hvac.Client(url=self._addr, token="", timeout=timeout, verify=verify,
                                   adapter=_Adapter)
        # Login and health go through a client that never carries a token.
        self._anon = hvac.Client(url=self._addr, token="", timeout=timeout, verify=verify,
                                 adapter=_Adapter)
        self._login_lock = threading.Lock()
        self._timeout, self._verify = timeout, verify
        self._health_clients: dict[str, hvac.Client] = {}
        self._token: str | None = None
        self._token_deadline = 0.0

    def __repr__(self) -> str:
        return f"TransitClient(addr={self._addr!r}, key={self._mount}/{self._key})"

    def _next_node(self, failed: str) -> None:
        """Move to the node after `failed` (unless another thread already moved on)."""
        with self._node_lock:
            if self._addr != failed or len(self._addrs) < 2:
                return
            self._addr = self._addrs[(self._addrs.index(failed) + 1) % len(self._addrs)]
            self._client.url = self._addr
            self._anon.url = self._addr
            _log.warning("OpenBao at %s unavailable; trying %s", failed, self._addr)

    def _failing_over(self, attempt: Callable[[], _T]) -> _T:
        """`attempt()`, tried again on the next node while OpenBao is unavailable, for at most
        FAILOVER_SECONDS (once only with a single node)."""
        deadline = time.monotonic() + (FAILOVER_SECONDS if len(self._addrs) > 1 else 0.0)
        while True:
            node = self._addr
            try:
                return attempt()
            except VaultUnavailable:
                if time.monotonic() >= deadline:
                    raise
            self._next_node(node)
            time.sleep(_FAILOVER_PAUSE_S)

    def close(self) -> None:
        self._client.adapter.close()
        self._anon.adapter.close()
        for client in self._health_clients.values():
            client.adapter.close()

    def __enter__(self) -> TransitClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- transit --------------------------------------------------------------------------

    def generate_data_key(self) -> tuple[bytes, str]:
        """A fresh 256-bit data key: (plaintext, wrapped under the latest KEK version)."""
        op = "transit datakey"
        data = self._data(op, self._call(op, lambda t: t.generate_data_key(
            name=self._key, key_type="plaintext", bits=DATA_KEY_BYTES * 8,
            mount_point=self._mount)))
        return _b64_key(op, data.get("plaintext")), _wrapped(op, data.get("ciphertext"))

    def decrypt_data_keys(self, wrapped: Sequence[str]) -> list[bytes]:
        """Unwrap data keys: one request per MAX_BATCH items; order is kept."""
        op = "transit decrypt"
        return [_b64_key(op, item.get("plaintext"), i)
                for i, item in enumerate(self._batch(op, "decrypt_data", wrapped))]

    def rewrap_data_keys(self, wrapped: Sequence[str]) -> list[str]:
        """Re-encrypt wrapped data keys under the latest KEK version (the plaintext never
        leaves the server): one request per MAX_BATCH items; order is kept."""
        op = "transit rewrap"
        return [_wrapped(op, item.get("ciphertext"), i)
                for i, item in enumerate(self._batch(op, "rewrap_data", wrapped))]

    # -- the recording vault's RSA key (a client built with key_name="vaultline-recordings")

    def public_key_pem(self) -> tuple[int, str]:
        """(latest version, the PEM of its public half): what Twilio encrypts recordings to.
        The private half is not exportable; reading the key never shows it."""
        op = "transit read key"
        data = self._data(op, self._call(op, lambda t: t.read_key(
            name=self._key, mount_point=self._mount)))
        latest = data.get("latest_version")
        keys = data.get("keys")
        entry = keys.get(str(latest)) if isinstance(keys, dict) else None
        pem = entry.get("public_key") if isinstance(entry, dict) else None
        if not isinstance(latest, int) or not isinstance(pem, str) or "PUBLIC KEY" not in pem:
            raise _invalid(op, "the key has no public half (not an asymmetric key?)")
        return latest, pem

    def key_versions(self) -> list[int]:
        """The versions that still decrypt, newest first."""
        op = "transit read key"
        data = self._data(op, self._call(op, lambda t: t.read_key(
            name=self._key, mount_point=self._mount)))
        latest, lowest = data.get("latest_version"), data.get("min_decryption_version")
        if not isinstance(latest, int) or not isinstance(lowest, int):
            raise _invalid(op, "malformed key versions")
        return list(range(latest, max(lowest, 1) - 1, -1))

    def unwrap_content_key(self, wrapped: str) -> bytes:
        """A recording's 256-bit content key, from its RSA-OAEP (SHA-256) wrapping as
        `vault:v<N>:<base64>`; the private key stays inside OpenBao."""
        op = "transit decrypt"
        data = self._data(op, self._call(op, lambda t: t.decrypt_data(
            name=self._key, ciphertext=wrapped, mount_point=self._mount)))
        return _b64_key(op, data.get("plaintext"))

    def rotate_key(self) -> None:
        op = "transit rotate"
        self._call(op, lambda t: t.rotate_key(name=self._key, mount_point=self._mount))

    def key_status(self) -> KeyStatus:
        op = "transit read key"
        data = self._data(op, self._call(op, lambda t: t.read_key(
            name=self._key, mount_point=self._mount)))
        try:
            versions = {int(v): _created(ts) for v, ts in data["keys"].items()}
            return KeyStatus(
                name=str(data["name"]),
                type=str(data["type"]),
                latest_version=_int(data["latest_version"]),
                min_decryption_version=_int(data["min_decryption_version"]),
                min_encryption_version=_int(data["min_encryption_version"]),
                exportable=bool(data["exportable"]),
                deletion_allowed=bool(data["deletion_allowed"]),
                versions=versions,
            )
        except (KeyError, TypeError, ValueError, AttributeError, OverflowError):
            raise _invalid(op, "malformed key metadata in response") from None

    def set_min_decryption_version(self, version: int) -> None:
        """Refuse to unwrap data keys wrapped under KEK versions older than ``version``."""
        if isinstance(version, bool) or not isinstance(version, int) or version < 1:
            raise ValueError("min_decryption_version must be an integer >= 1")
        op = "transit key config"
        # A raw post: hvac's update_key_configuration may send more parameters than the one
        # the keys-admin policy allows (allowed_parameters).
        self._call(op, lambda _: self._client.adapter.post(
            url=f"/v1/{self._mount}/keys/{self._key}/config",
            json={"min_decryption_version": version}))

    def health(self) -> bool:
        """True if the server (a cluster: one of its nodes) is initialised, unsealed and the
        active node (unauthenticated)."""
        for addr in self._addrs:
            try:
                resp = self._health_client(addr).sys.read_health_status(method="GET")
            except (requests.exceptions.RequestException, _HTTPStatusError):
                continue
            if isinstance(resp, dict) and (  # non-200: 429 standby, 501, 503 sealed
                    resp.get("initialized") is True and resp.get("sealed") is False
                    and resp.get("standby") is False):
                return True
        return False

    def _health_client(self, addr: str) -> hvac.Client:
        if addr == self._addrs[0] and len(self._addrs) == 1:
            return self._anon
        client = self._health_clients.get(addr)
        if client is None:
            client = self._health_clients[addr] = hvac.Client(
                url=addr, token="", timeout=self._timeout, verify=self._verify,
                adapter=_Adapter)
        return client

    # -- audit checkpoints ---------------------------------------------------------------------

    def sign(self, message: bytes, key: str = AUDIT_KEY) -> str:
        """An Ed25519 signature of `message` by `key` (the audit key by default; `vault:v1:…`)."""
        op = "transit sign"
        data = self._data(op, self._call(op, lambda t: t.sign_data(
            name=key, hash_input=base64.b64encode(message).decode("ascii"),
            mount_point=self._mount)))
        signature = data.get("signature")
        if not isinstance(signature, str) or not signature.startswith("vault:v"):
            raise _invalid(op, "no signature in response")
        return signature

    def verify(self, message: bytes, signature: str, key: str = AUDIT_KEY) -> bool:
        op = "transit verify"
        data = self._data(op, self._call(op, lambda t: t.verify_signed_data(
            name=key, hash_input=base64.b64encode(message).decode("ascii"),
            signature=signature, mount_point=self._mount)))
        return data.get("valid") is True

    def create_checkpoint(self, name: str, fields: Mapping[str, str]) -> None:
        """File a checkpoint under `name`, once: check-and-set 0 refuses an existing one (and
        the tokenizer's policy grants create, never update)."""
        op = "kv create"
        self._call(op, lambda kv: kv.create_or_update_secret(
            path=f"{self._checkpoints}/{name}", secret=dict(fields), cas=0,
            mount_point=KV_MOUNT),
            engine=_kv)

    def list_checkpoints(self) -> list[str]:
        op = "kv list"
        try:
            data = self._data(op, self._call(op, lambda kv: kv.list_secrets(
                path=self._checkpoints, mount_point=KV_MOUNT), engine=_kv))
        except VaultInvalidResponse as exc:
            if exc.status == 404:  # none filed yet
                return []
            raise
        keys = data.get("keys")
        if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
            raise _invalid(op, "malformed key list")
        return keys

    def read_checkpoint(self, name: str) -> dict[str, Any]:
        op = "kv read"
        data = self._data(op, self._call(op, lambda kv: kv.read_secret_version(
            path=f"{self._checkpoints}/{name}", mount_point=KV_MOUNT,
            raise_on_deleted_version=True), engine=_kv))
        fields = data.get("data")
        if not isinstance(fields, dict):
            raise _invalid(op, "checkpoint without data")
        return fields

    # -- plumbing -------------------------------------------------------------------------

    def _call(self, operation: str, fn: Callable[[Any], _T], *,
              batch_offset: int | None = None,
              engine: Callable[[hvac.Client], Any] | None = None) -> _T:
        return self._failing_over(lambda: self._call_node(
            operation, fn, batch_offset=batch_offset, engine=engine))

    def _call_node(self, operation: str, fn: Callable[[Any], _T], *,
                   batch_offset: int | None = None,
                   engine: Callable[[hvac.Client], Any] | None = None) -> _T:
        """Run ``fn(hvac transit api)`` (or ``fn(engine(client))``) authenticated; log in
        again once on 401/403.

        With ``batch_offset`` set, a refused batch whose body lists per-item results becomes
        VaultInvalidResponse naming the first failed item (offset + its position)."""
        error: VaultError | None = None
        for attempt in (1, 2):
            token = self._ensure_token()
            try:
                return fn(self._client.secrets.transit if engine is None
                          else engine(self._client))
            except _HTTPStatusError as exc:
                if exc.status in (401, 403) and attempt == 1:
                    _log.info("%s: refused with HTTP %d, logging in again", operation,
                              exc.status)
                    self._invalidate(token)
                    continue
                error = _translate(operation, exc)
                failed = _first_failed(exc.body) if batch_offset is not None else None
                if failed is not None and batch_offset is not None:
                    error = _invalid(operation, f"batch item {batch_offset + failed} failed",
                                     batch_offset + failed)
            except (requests.exceptions.RequestException, hvac.exceptions.VaultError) as exc:
                error = _translate(operation, exc)
            break
        # Raised outside the except blocks, so no hvac/requests exception (which may hold a
        # response body with key material) stays attached as __context__.
        assert error is not None
        raise error

    def _batch(self, operation: str, method: str,
               wrapped: Sequence[str]) -> list[Mapping[str, Any]]:
        """Call hvac's transit ``method`` with batch_input, MAX_BATCH items per request.
        Per-item errors become VaultInvalidResponse(index=position in ``wrapped``)."""
        results: list[Mapping[str, Any]] = []
        for offset in range(0, len(wrapped), MAX_BATCH):
            batch = [{"ciphertext": w} for w in wrapped[offset:offset + MAX_BATCH]]

            def request(transit: Any, batch: list[dict[str, str]] = batch) -> Any:
                return getattr(transit, method)(name=self._key, ciphertext=None,
                                                batch_input=batch, mount_point=self._mount)

            response = self._call(operation, request, batch_offset=offset)
            items = self._data(operation, response).get("batch_results")
            if not isinstance(items, list) or len(items) != len(batch) or not all(
                    isinstance(item, dict) for item in items):
                raise _invalid(operation, "malformed batch_results in response")
            failed = _first_failed(response)
            if failed is not None:  # a server set to answer partial failures with 200
                raise _invalid(operation, f"batch item {offset + failed} failed",
                               offset + failed)
            results.extend(items)
        return results

    def _data(self, operation: str, response: Any) -> dict[str, Any]:
        data = response.get("data") if isinstance(response, dict) else None
        if not isinstance(data, dict):
            raise _invalid(operation, "response carries no data")
        return data

    def _ensure_token(self) -> str:
        token = self._token
        if token is not None and time.monotonic() < self._token_deadline:
            return token
        with self._login_lock:
            if self._token is not None and time.monotonic() < self._token_deadline:
                return self._token
            return self._login()

    def _invalidate(self, token: str) -> None:
        with self._login_lock:
            if self._token == token:  # another thread may already have logged in again
                self._token = None

    def _login(self) -> str:
        op = "approle login"
        error: VaultError | None = None
        try:
            resp = self._anon.auth.approle.login(
                role_id=self._credentials.role_id, secret_id=self._credentials.secret_id,
                use_token=False, mount_point=self._approle_mount)
        except _HTTPStatusError as exc:
            error = _translate(op, exc)
            if exc.status == 400:  # AppRole's answer to a wrong role_id / secret_id
                error = VaultPermissionDenied(f"{op}: AppRole credentials rejected (HTTP 400)",
                                              operation=op, status=400)
        except (requests.exceptions.RequestException, hvac.exceptions.VaultError) as exc:
            error = _translate(op, exc)
        if error is not None:
            raise error
        auth = resp.get("auth") if isinstance(resp, dict) else None
        token = auth.get("client_token") if isinstance(auth, dict) else None
        ttl = auth.get("lease_duration") if isinstance(auth, dict) else None
        if not isinstance(token, str) or not token:
            raise _invalid(op, "login response carries no token")
        lifetime = float(ttl) if isinstance(ttl, int) and ttl > 0 else 3600.0
        self._client.token = token
        self._token = token
        self._token_deadline = time.monotonic() + max(1.0, lifetime - _TOKEN_RENEW_MARGIN_S)
        _log.info("logged in to OpenBao with AppRole (token ttl %ds)", int(lifetime))
        return token


def _kv(client: hvac.Client) -> Any:
    return client.secrets.kv.v2


def _first_failed(body: Mapping[str, Any] | None) -> int | None:
    """Position of the first item with an error in a transit batch response body."""
    data = body.get("data") if isinstance(body, dict) else None
    results = data.get("batch_results") if isinstance(data, dict) else None
    if not isinstance(results, list):
        return None
    for i, item in enumerate(results):
        if isinstance(item, dict) and item.get("error"):
            return i
    return None


def _wrapped(operation: str, value: Any, index: int | None = None) -> str:
    if not (isinstance(value, str) and _WRAPPED_RE.fullmatch(value)):
        where = f" in batch item {index}" if index is not None else ""
        raise _invalid(operation, f"malformed wrapped key{where}", index)
    return value


def _b64_key(operation: str, value: Any, index: int | None = None) -> bytes:
    where = f" in batch item {index}" if index is not None else ""
    try:
        key = base64.b64decode(value, validate=True) if isinstance(value, str) else b""
    except (binascii.Error, ValueError):
        key = b""
    if len(key) != DATA_KEY_BYTES:
        raise _invalid(operation, f"malformed plaintext data key{where}", index)
    return key


def _int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError("not an integer")
    return value


def _created(value: Any) -> str:
    """Creation time of a key version: unix seconds for symmetric keys, RFC 3339 otherwise."""
    if isinstance(value, int) and not isinstance(value, bool):
        return datetime.fromtimestamp(value, tz=UTC).isoformat()
    if isinstance(value, str):
        return value
    raise TypeError("unexpected creation time")
