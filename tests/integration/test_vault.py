"""vaultline.vault against a real OpenBao: transit data keys, rotation, least privilege, faults."""

from __future__ import annotations

import base64
import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from typing import Any

import pytest

from tests.fixtures.infra import OpenBaoHandle
from vaultline.vault import (
    MAX_BATCH,
    AppRoleCredentials,
    TransitClient,
    VaultInvalidResponse,
    VaultPermissionDenied,
    VaultUnavailable,
    wrapped_version,
)

pytestmark = pytest.mark.integration


# -- helpers: raw HTTP, so the policy checks do not depend on the client under test ----------

def _http(addr: str, method: str, path: str, token: str | None = None,
          body: dict[str, Any] | None = None) -> tuple[int, dict[str, Any]]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(f"{addr}/v1/{path}", data=data, method=method)  # noqa: S310
    if token:
        req.add_header("X-Vault-Token", token)
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(req, timeout=10) as resp:
            raw, status = resp.read(), resp.status
    except urllib.error.HTTPError as exc:
        raw, status = exc.read(), exc.code
    return status, (json.loads(raw) if raw else {})


def _login(addr: str, creds: AppRoleCredentials) -> str:
    status, body = _http(addr, "POST", "auth/approle/login",
                         body={"role_id": creds.role_id, "secret_id": creds.secret_id})
    assert status == 200
    token: str = body["auth"]["client_token"]
    return token


@pytest.fixture
def tokenizer(openbao: OpenBaoHandle) -> Iterator[TransitClient]:
    with TransitClient(openbao.addr, openbao.tokenizer) as client:
        yield client


@pytest.fixture
def keys_admin(openbao: OpenBaoHandle) -> Iterator[TransitClient]:
    with TransitClient(openbao.addr, openbao.keys_admin) as client:
        yield client


# -- data keys --------------------------------------------------------------------------------

def test_datakey_round_trip(tokenizer: TransitClient) -> None:
    plaintext, wrapped = tokenizer.generate_data_key()
    assert len(plaintext) == 32
    assert wrapped.startswith("vault:v")
    assert base64.b64encode(plaintext).decode() not in wrapped
    assert tokenizer.decrypt_data_keys([wrapped]) == [plaintext]


def test_batch_decrypt_keeps_order(tokenizer: TransitClient) -> None:
    pairs = [tokenizer.generate_data_key() for _ in range(5)]
    assert len({p for p, _ in pairs}) == 5
    wrapped = [w for _, w in pairs]
    assert tokenizer.decrypt_data_keys(wrapped) == [p for p, _ in pairs]
    assert tokenizer.decrypt_data_keys([]) == []


def test_batch_larger_than_one_request(tokenizer: TransitClient) -> None:
    a, wa = tokenizer.generate_data_key()
    b, wb = tokenizer.generate_data_key()
    many = [wa, wb] * (MAX_BATCH + 50)  # several requests of MAX_BATCH items
    assert tokenizer.decrypt_data_keys(many) == [a, b] * (MAX_BATCH + 50)


def test_batch_item_error_names_index_only(tokenizer: TransitClient) -> None:
    good, wrapped = tokenizer.generate_data_key()
    with pytest.raises(VaultInvalidResponse) as info:
        tokenizer.decrypt_data_keys([wrapped, wrapped, "vault:v1:AAAA", wrapped])
    err = info.value
    assert err.index == 2
    assert "batch item 2" in str(err)
    # The server's 400 echoes the other items' plaintext keys; none of it may reach us.
    assert base64.b64encode(good).decode() not in repr(err)
    assert err.__cause__ is None and err.__context__ is None


def test_batch_item_error_index_counts_across_requests(tokenizer: TransitClient) -> None:
    _, wrapped = tokenizer.generate_data_key()
    batch = [wrapped] * (MAX_BATCH + 3)
    batch[MAX_BATCH + 1] = "not-a-ciphertext"
    with pytest.raises(VaultInvalidResponse) as info:
        tokenizer.decrypt_data_keys(batch)
    assert info.value.index == MAX_BATCH + 1


# -- rotation and rewrap ------------------------------------------------------------------------

def test_rotate_then_rewrap(tokenizer: TransitClient, keys_admin: TransitClient) -> None:
    old_plain, old_wrapped = tokenizer.generate_data_key()
    before = keys_admin.key_status().latest_version
    assert wrapped_version(old_wrapped) == before

    keys_admin.rotate_key()
    status = keys_admin.key_status()
    assert status.latest_version == before + 1

    new_plain, new_wrapped = tokenizer.generate_data_key()
    assert wrapped_version(new_wrapped) == before + 1
    # Old wrapped keys still unwrap after rotation.
    assert tokenizer.decrypt_data_keys([old_wrapped, new_wrapped]) == [old_plain, new_plain]

    rewrapped = keys_admin.rewrap_data_keys([old_wrapped, new_wrapped])
    assert [wrapped_version(w) for w in rewrapped] == [before + 1, before + 1]
    assert rewrapped[0] != old_wrapped
    assert tokenizer.decrypt_data_keys(rewrapped) == [old_plain, new_plain]
    # Rewrapping is the keys-admin's alone (issue 14): the tokenizer never calls it.
    with pytest.raises(VaultPermissionDenied):
        tokenizer.rewrap_data_keys([old_wrapped])


def test_key_status_reports_versions(keys_admin: TransitClient) -> None:
    status = keys_admin.key_status()
    assert status.name == "vaultline-kek"
    assert status.type == "aes256-gcm96"
    assert status.exportable is False
    assert status.deletion_allowed is False
    assert status.latest_version >= 1
    assert set(status.versions) == set(range(status.min_decryption_version,
                                              status.latest_version + 1))
    for created in status.versions.values():
        assert datetime.fromisoformat(created).tzinfo is not None


def test_min_decryption_version_refuses_old_keys(tokenizer: TransitClient,
                                                 keys_admin: TransitClient) -> None:
    old_plain, old_wrapped = tokenizer.generate_data_key()
    keys_admin.rotate_key()
    status = keys_admin.key_status()
    keys_admin.set_min_decryption_version(status.latest_version)
    try:
        assert keys_admin.key_status().min_decryption_version == status.latest_version
        with pytest.raises(VaultInvalidResponse) as info:
            tokenizer.decrypt_data_keys([old_wrapped])
        assert info.value.index == 0
    finally:  # the KEK is shared by the whole session: put the floor back
        keys_admin.set_min_decryption_version(status.min_decryption_version)
    assert tokenizer.decrypt_data_keys([old_wrapped]) == [old_plain]
    with pytest.raises(ValueError):
        keys_admin.set_min_decryption_version(0)


# -- least privilege -----------------------------------------------------------------------------

def test_tokenizer_client_is_denied_admin_operations(tokenizer: TransitClient) -> None:
    for operation in (tokenizer.rotate_key, tokenizer.key_status,
                      lambda: tokenizer.set_min_decryption_version(1)):
        with pytest.raises(VaultPermissionDenied):
            operation()


def test_tokenizer_client_is_denied_other_keys(openbao: OpenBaoHandle) -> None:
    with TransitClient(openbao.addr, openbao.tokenizer, key_name="other-key") as other, \
            pytest.raises(VaultPermissionDenied):
        other.generate_data_key()


TOKENIZER_DENIED: list[tuple[str, str, dict[str, Any] | None]] = [
    ("POST", "transit/keys/vaultline-kek/rotate", None),
    ("GET", "transit/keys/vaultline-kek", None),
    ("POST", "transit/keys/vaultline-kek/config", {"min_decryption_version": 1}),
    ("POST", "transit/keys/vaultline-kek/config", {"exportable": True}),
    ("DELETE", "transit/keys/vaultline-kek", None),
    ("LIST", "transit/keys", None),
    ("POST", "transit/encrypt/vaultline-kek", {"plaintext": "YQ=="}),
    ("POST", "transit/encrypt/other-key", {"plaintext": "YQ=="}),
    ("POST", "transit/datakey/plaintext/other-key", {}),
    ("POST", "transit/decrypt/other-key", {"ciphertext": "vault:v1:AAAA"}),
    ("GET", "transit/export/encryption-key/vaultline-kek", None),
    ("GET", "transit/backup/vaultline-kek", None),
    ("POST", "transit/hmac/vaultline-kek", {"input": "YQ=="}),
    ("POST", "transit/random/32", {}),
    ("GET", "sys/mounts", None),
    ("GET", "sys/policies/acl/tokenizer", None),
    ("PUT", "sys/policies/acl/tokenizer", {"policy": 'path "*" { capabilities = ["sudo"] }'}),
    ("GET", "sys/audit", None),
    ("PUT", "sys/seal", None),
    ("GET", "auth/token/lookup-self", None),
    ("POST", "auth/token/create", {}),
    ("POST", "auth/approle/role/vaultline-tokenizer/secret-id", {}),
    ("GET", "auth/approle/role/vaultline-keys-admin/role-id", None),
    ("GET", "secret/data/anything", None),
    # The audit checkpoints it files: never deleted, destroyed or their history removed.
    ("DELETE", "vaultline-kv/data/audit/checkpoints/default/00000000000000000001", None),
    ("POST", "vaultline-kv/destroy/audit/checkpoints/default/00000000000000000001",
     {"versions": [1]}),
    ("DELETE", "vaultline-kv/metadata/audit/checkpoints/default/00000000000000000001", None),
    ("POST", "vaultline-kv/delete/audit/checkpoints/default/00000000000000000001",
     {"versions": [1]}),
    ("POST", "transit/keys/vaultline-audit/config", {"deletion_allowed": True}),
    # Granted before issue 14 though never called: wrapped-only data keys, and rewrap.
    ("POST", "transit/datakey/wrapped/vaultline-kek", {}),
    ("POST", "transit/rewrap/vaultline-kek", {"ciphertext": "vault:v1:AAAA"}),
]


def test_tokenizer_approle_is_least_privilege(openbao: OpenBaoHandle) -> None:
    token = _login(openbao.addr, openbao.tokenizer)
    allowed = _http(openbao.addr, "POST", "transit/datakey/plaintext/vaultline-kek", token, {})
    assert allowed[0] == 200  # positive control: the same token works where it should
    granted = [(m, p) for m, p, body in TOKENIZER_DENIED
               if _http(openbao.addr, m, p, token, body)[0] != 403]
    assert granted == []


KEYS_ADMIN_DENIED: list[tuple[str, str, dict[str, Any] | None]] = [
    ("POST", "transit/datakey/plaintext/vaultline-kek", {}),
    ("POST", "transit/datakey/wrapped/vaultline-kek", {}),
    ("POST", "transit/decrypt/vaultline-kek", {"ciphertext": "vault:v1:AAAA"}),
    ("POST", "transit/encrypt/vaultline-kek", {"plaintext": "YQ=="}),
    ("POST", "transit/keys/vaultline-kek/config", {"exportable": True}),
    ("POST", "transit/keys/vaultline-kek/config", {"deletion_allowed": True}),
    ("POST", "transit/keys/vaultline-kek/config",
     {"min_decryption_version": 1, "allow_plaintext_backup": True}),
    ("DELETE", "transit/keys/vaultline-kek", None),
    ("GET", "transit/export/encryption-key/vaultline-kek", None),
    ("GET", "transit/backup/vaultline-kek", None),
    ("POST", "transit/keys/other-key/rotate", {}),
    ("GET", "sys/mounts", None),
    ("PUT", "sys/seal", None),
    ("POST", "auth/token/create", {}),
]


def test_keys_admin_approle_is_least_privilege(openbao: OpenBaoHandle) -> None:
    token = _login(openbao.addr, openbao.keys_admin)
    assert _http(openbao.addr, "GET", "transit/keys/vaultline-kek", token)[0] == 200
    granted = [(m, p, b) for m, p, b in KEYS_ADMIN_DENIED
               if _http(openbao.addr, m, p, token, b)[0] != 403]
    assert granted == []


AUDITOR_DENIED: list[tuple[str, str, dict[str, Any] | None]] = [
    ("POST", "transit/sign/vaultline-audit", {"input": "YQ=="}),
    ("POST", "vaultline-kv/data/audit/checkpoints/default/00000000000000000001",
     {"data": {"seq": "1"}}),
    ("DELETE", "vaultline-kv/data/audit/checkpoints/default/00000000000000000001", None),
    ("DELETE", "vaultline-kv/metadata/audit/checkpoints/default/00000000000000000001", None),
    ("POST", "transit/datakey/plaintext/vaultline-kek", {}),
    ("POST", "transit/decrypt/vaultline-kek", {"ciphertext": "vault:v1:AAAA"}),
    ("POST", "transit/keys/vaultline-kek/rotate", {}),
    ("GET", "transit/keys/vaultline-audit", None),
    ("GET", "sys/mounts", None),
    ("POST", "auth/token/create", {}),
]


def test_auditor_approle_only_reads_and_verifies_checkpoints(openbao: OpenBaoHandle) -> None:
    assert openbao.auditor is not None
    token = _login(openbao.addr, openbao.auditor)
    with TransitClient(openbao.addr, openbao.tokenizer, audit_chain="least-privilege") as t:
        signature = t.sign(b"checkpoint")
        t.create_checkpoint("00000000000000000001", {"seq": "1"})
    # Positive controls: it lists, reads and verifies what the tokenizer filed.
    assert _http(openbao.addr, "LIST",
                 "vaultline-kv/metadata/audit/checkpoints/least-privilege", token)[0] == 200
    assert _http(openbao.addr, "GET", "vaultline-kv/data/audit/checkpoints/least-privilege/"
                 "00000000000000000001", token)[0] == 200
    status, body = _http(openbao.addr, "POST", "transit/verify/vaultline-audit", token,
                         {"input": "Y2hlY2twb2ludA==", "signature": signature})
    assert status == 200 and body["data"]["valid"] is True
    granted = [(m, p) for m, p, b in AUDITOR_DENIED
               if _http(openbao.addr, m, p, token, b)[0] != 403]
    assert granted == []


# -- authentication --------------------------------------------------------------------------

def test_wrong_secret_id_is_permission_denied(openbao: OpenBaoHandle) -> None:
    bad = AppRoleCredentials(role_id=openbao.tokenizer.role_id, secret_id="not-the-secret-id")
    assert "not-the-secret-id" not in repr(bad)
    with TransitClient(openbao.addr, bad) as client, \
            pytest.raises(VaultPermissionDenied) as info:
        client.generate_data_key()
    assert "not-the-secret-id" not in str(info.value)


def test_logs_in_again_after_its_token_is_revoked(openbao: OpenBaoHandle,
                                                  tokenizer: TransitClient) -> None:
    plaintext, wrapped = tokenizer.generate_data_key()
    # Revoke every token AppRole has issued (the client's included).
    status, _ = _http(openbao.addr, "PUT", "sys/leases/revoke-prefix/auth/approle/login",
                      openbao.root_token)
    assert status == 204
    assert tokenizer.decrypt_data_keys([wrapped]) == [plaintext]


def test_thread_safe(tokenizer: TransitClient) -> None:
    def work(_: int) -> bool:
        plaintext, wrapped = tokenizer.generate_data_key()
        return tokenizer.decrypt_data_keys([wrapped]) == [plaintext]

    with ThreadPoolExecutor(max_workers=8) as pool:
        assert all(pool.map(work, range(40)))


# -- faults -----------------------------------------------------------------------------------

def test_sealed_server_is_unavailable_until_unsealed(openbao: OpenBaoHandle,
                                                     tokenizer: TransitClient) -> None:
    plaintext, wrapped = tokenizer.generate_data_key()
    assert tokenizer.health() is True
    with openbao.sealed():
        with pytest.raises(VaultUnavailable) as info:
            tokenizer.decrypt_data_keys([wrapped])
        assert info.value.status == 503
        with pytest.raises(VaultUnavailable):
            tokenizer.generate_data_key()
        assert tokenizer.health() is False
    # Same client, no re-creation.
    assert tokenizer.health() is True
    assert tokenizer.decrypt_data_keys([wrapped]) == [plaintext]


def test_stopped_server_is_unavailable(openbao: OpenBaoHandle,
                                       tokenizer: TransitClient) -> None:
    plaintext, wrapped = tokenizer.generate_data_key()
    with openbao.stopped():
        with pytest.raises(VaultUnavailable) as info:
            tokenizer.decrypt_data_keys([wrapped])
        assert info.value.status is None
        assert tokenizer.health() is False
    assert tokenizer.decrypt_data_keys([wrapped]) == [plaintext]


def test_unreachable_address_is_unavailable(openbao: OpenBaoHandle) -> None:
    with TransitClient("http://127.0.0.1:9", openbao.tokenizer, timeout=1.0) as client:
        with pytest.raises(VaultUnavailable):
            client.generate_data_key()
        assert client.health() is False


# -- pure helpers --------------------------------------------------------------------------------

def test_wrapped_version() -> None:
    assert wrapped_version("vault:v1:AAAA") == 1
    assert wrapped_version("vault:v37:q83v/+==") == 37
    for bad in ("vault:v0:AAAA", "vault:vx:AAAA", "v1:AAAA", "vault:v1:", "", "vault:v1:a b"):
        with pytest.raises(ValueError):
            wrapped_version(bad)


def test_credentials_from_file(tmp_path: Any) -> None:
    path = tmp_path / "approle.json"
    path.write_text(json.dumps({"role_id": "r", "secret_id": "s3cr3t", "WARNING": "dev"}))
    creds = AppRoleCredentials.from_file(path)
    assert creds == AppRoleCredentials("r", "s3cr3t")
    assert "s3cr3t" not in repr(creds)
    path.write_text(json.dumps({"role_id": "r"}))
    with pytest.raises(ValueError):
        AppRoleCredentials.from_file(path)
