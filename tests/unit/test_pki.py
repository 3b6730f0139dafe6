"""Unit tests for vaultline.security.pki: the CA, server and client certificates, the dev PKI."""

from __future__ import annotations

import datetime as dt
import ipaddress
import stat
from pathlib import Path
from typing import TypeVar

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509 import verification
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from vaultline.security.identity import identity_from_pem
from vaultline.security.pki import (
    DEV_IDENTITIES,
    IssuedCert,
    init_dev_pki,
    issue_client_cert,
    issue_server_cert,
    load_dev_pki,
    new_ca,
)

_E = TypeVar("_E", bound=x509.ExtensionType)

CA = new_ca()
NOW = dt.datetime.now(dt.UTC)


def _ext(cert: x509.Certificate, kind: type[_E]) -> x509.Extension[_E]:
    return cert.extensions.get_extension_for_class(kind)


def _verifier(ca: IssuedCert = CA, at: dt.datetime | None = None) -> verification.PolicyBuilder:
    """Verification at `at`, by default the moment of the call: certificates are issued when
    the test runs, back-dated by minutes only, which may be after the module was imported."""
    return verification.PolicyBuilder().store(verification.Store([ca.certificate])).time(
        at or dt.datetime.now(dt.UTC))


# --- issuing ------------------------------------------------------------------------------


def test_ca() -> None:
    cert = CA.certificate
    cert.verify_directly_issued_by(cert)
    assert isinstance(cert.public_key(), ec.EllipticCurvePublicKey)
    assert isinstance(cert.public_key().curve, ec.SECP256R1)  # type: ignore[union-attr]
    basic = _ext(cert, x509.BasicConstraints)
    assert basic.critical and basic.value.ca and basic.value.path_length == 0
    usage = _ext(cert, x509.KeyUsage)
    assert usage.critical and usage.value.key_cert_sign and usage.value.crl_sign
    assert not usage.value.digital_signature
    _ext(cert, x509.SubjectKeyIdentifier)
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "Vaultline dev CA"


def test_ca_validity() -> None:
    start = dt.datetime(2030, 1, 1, tzinfo=dt.UTC)
    cert = new_ca("other", days=10, now=start).certificate
    assert cert.not_valid_before_utc <= start < cert.not_valid_after_utc
    assert cert.not_valid_after_utc - cert.not_valid_before_utc == dt.timedelta(days=10)


def test_server_certificate() -> None:
    server = issue_server_cert(CA, hosts=("localhost", "127.0.0.1", "::1", "vaultline.internal"))
    cert = server.certificate
    cert.verify_directly_issued_by(CA.certificate)
    san = _ext(cert, x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost", "vaultline.internal"]
    assert san.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("::1"),
    ]
    assert list(_ext(cert, x509.ExtendedKeyUsage).value) == [ExtendedKeyUsageOID.SERVER_AUTH]
    assert not _ext(cert, x509.BasicConstraints).value.ca
    aki = _ext(cert, x509.AuthorityKeyIdentifier).value
    assert aki.key_identifier == _ext(CA.certificate, x509.SubjectKeyIdentifier).value.digest
    for name in (x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))):
        _verifier().build_server_verifier(name).verify(cert, [])
    with pytest.raises(verification.VerificationError):
        _verifier().build_server_verifier(x509.DNSName("example.com")).verify(cert, [])


@pytest.mark.parametrize("hosts", [(), "localhost", ("",), ("a b",), ("host:1",)])
def test_bad_server_hosts(hosts: tuple[str, ...]) -> None:
    with pytest.raises(ValueError):
        issue_server_cert(CA, hosts=hosts)


def test_client_certificate() -> None:
    client = issue_client_cert(CA, "settlement", "settlement-2")
    cert = client.certificate
    cert.verify_directly_issued_by(CA.certificate)
    assert cert.subject.rfc4514_string() == "CN=settlement/settlement-2"
    assert list(_ext(cert, x509.ExtendedKeyUsage).value) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    verified = _verifier().build_client_verifier().verify(cert, [])
    assert verified.subjects == [
        x509.UniformResourceIdentifier("spiffe://vaultline/settlement/settlement-2")
    ]
    assert identity_from_pem(client.cert_pem).role == "settlement"
    # A client certificate is no server certificate, and the other way round.
    with pytest.raises(verification.VerificationError):
        _verifier().build_server_verifier(x509.DNSName("localhost")).verify(cert, [])
    with pytest.raises(verification.VerificationError):
        _verifier().build_client_verifier().verify(issue_server_cert(CA).certificate, [])


def test_certificate_from_another_ca_does_not_verify() -> None:
    client = issue_client_cert(new_ca("other"), "ivr", "ivr-1")
    with pytest.raises(verification.VerificationError):
        _verifier().build_client_verifier().verify(client.certificate, [])


def test_expired_client_certificate() -> None:
    client = issue_client_cert(
        CA,
        "ivr",
        "ivr-1",
        not_before=NOW - dt.timedelta(days=30),
        not_after=NOW - dt.timedelta(days=1),
    )
    cert = client.certificate
    assert cert.not_valid_after_utc == (NOW - dt.timedelta(days=1)).replace(microsecond=0)
    with pytest.raises(verification.VerificationError):
        _verifier().build_client_verifier().verify(cert, [])
    # Still a well-formed identity: only the date makes it unusable.
    assert identity_from_pem(client.cert_pem).name == "ivr-1"


def test_leaf_never_outlives_its_ca() -> None:
    short_ca = new_ca(days=30)
    cert = issue_client_cert(short_ca, "ivr", "ivr-1", days=397).certificate
    assert cert.not_valid_after_utc == short_ca.certificate.not_valid_after_utc


@pytest.mark.parametrize(
    ("role", "name"),
    [("IVR", "ivr-1"), ("ivr", "ivr/1"), ("ivr", ""), ("-ivr", "a"), ("ivr", "a" * 64)],
)
def test_bad_client_names(role: str, name: str) -> None:
    with pytest.raises(ValueError):
        issue_client_cert(CA, role, name)


def test_issuer_must_be_a_ca() -> None:
    with pytest.raises(ValueError):
        issue_client_cert(issue_server_cert(CA), "ivr", "ivr-1")
    with pytest.raises(ValueError):
        issue_client_cert(IssuedCert(CA.cert_pem, new_ca().key_pem), "ivr", "ivr-1")


def test_bad_validity_window() -> None:
    with pytest.raises(ValueError):
        issue_client_cert(CA, "ivr", "ivr-1", not_before=NOW, not_after=NOW)
    with pytest.raises(ValueError):
        issue_client_cert(CA, "ivr", "ivr-1", now=dt.datetime(2030, 1, 1))  # naive


def test_repr_hides_the_key() -> None:
    client = issue_client_cert(CA, "ivr", "ivr-1")
    for text in (repr(client), str(client), repr(CA)):
        assert "PRIVATE KEY" not in text
        assert client.key_pem.decode() not in text
    assert "ivr/ivr-1" in repr(client)


# --- the dev PKI on disk ------------------------------------------------------------------


def _files(pki_dir: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(pki_dir)): p.read_bytes()
        for p in sorted(pki_dir.rglob("*"))
        if p.is_file() and p.name != ".lock"
    }


def test_init_dev_pki_layout_and_modes(tmp_path: Path) -> None:
    pki_dir = tmp_path / ".vaultline" / "pki"
    pki = init_dev_pki(pki_dir)

    assert pki.ca_cert == pki_dir / "ca.crt"
    assert (pki.server_cert, pki.server_key) == (pki_dir / "server.crt", pki_dir / "server.key")
    assert pki.clients == {
        key: {
            "cert": str(pki_dir / "clients" / f"{role}-{name}.crt"),
            "key": str(pki_dir / "clients" / f"{role}-{name}.key"),
        }
        for key, (role, name) in zip(
            ["ivr", "crm", "settlement", "settlement-2", "admin", "intake", "payments", "qa",
             "descope"],
            DEV_IDENTITIES,
            strict=True
        )
    }
    assert set(_files(pki_dir)) == {
        "ca.crt", "ca.key", "server.crt", "server.key",
        *(f"clients/{r}-{n}.{ext}" for r, n in DEV_IDENTITIES for ext in ("crt", "key")),
    }  # fmt: skip
    for directory in (pki_dir, pki_dir / "clients"):
        assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    for key_file in pki_dir.rglob("*.key"):
        assert stat.S_IMODE(key_file.stat().st_mode) == 0o600, key_file

    ca = x509.load_pem_x509_certificate(pki.ca_cert.read_bytes())
    for key, paths in pki.clients.items():
        cert = x509.load_pem_x509_certificate(Path(paths["cert"]).read_bytes())
        cert.verify_directly_issued_by(ca)
        identity = identity_from_pem(Path(paths["cert"]).read_bytes())
        assert key in (identity.role, identity.name)
    x509.load_pem_x509_certificate(pki.server_cert.read_bytes()).verify_directly_issued_by(ca)


def test_init_dev_pki_is_idempotent(tmp_path: Path) -> None:
    first = init_dev_pki(tmp_path)
    before = _files(tmp_path)
    second = init_dev_pki(tmp_path)
    assert second == first
    assert _files(tmp_path) == before
    assert load_dev_pki(tmp_path) == first


def test_init_dev_pki_repairs_from_the_same_ca(tmp_path: Path) -> None:
    pki = init_dev_pki(tmp_path)
    before = _files(tmp_path)
    Path(pki.clients["crm"]["cert"]).unlink()
    ca = IssuedCert((tmp_path / "ca.crt").read_bytes(), (tmp_path / "ca.key").read_bytes())
    expired = issue_server_cert(ca, days=1, now=NOW - dt.timedelta(days=3))
    pki.server_cert.write_bytes(expired.cert_pem)
    pki.server_key.write_bytes(expired.key_pem)

    init_dev_pki(tmp_path)
    after = _files(tmp_path)
    changed = {name for name in before if before[name] != after[name]}
    assert changed == {"server.crt", "server.key", "clients/crm-crm-1.crt", "clients/crm-crm-1.key"}
    server = x509.load_pem_x509_certificate(after["server.crt"])
    server.verify_directly_issued_by(ca.certificate)
    assert server.not_valid_after_utc > NOW


def test_init_dev_pki_replaces_a_foreign_leaf(tmp_path: Path) -> None:
    pki = init_dev_pki(tmp_path)
    foreign = issue_client_cert(new_ca(), "ivr", "ivr-1")
    Path(pki.clients["ivr"]["cert"]).write_bytes(foreign.cert_pem)
    Path(pki.clients["ivr"]["key"]).write_bytes(foreign.key_pem)
    init_dev_pki(tmp_path)
    cert = x509.load_pem_x509_certificate(Path(pki.clients["ivr"]["cert"]).read_bytes())
    cert.verify_directly_issued_by(x509.load_pem_x509_certificate(pki.ca_cert.read_bytes()))


def test_init_dev_pki_force_and_lost_ca(tmp_path: Path) -> None:
    init_dev_pki(tmp_path)
    before = _files(tmp_path)
    init_dev_pki(tmp_path, force=True)
    forced = _files(tmp_path)
    assert all(before[name] != forced[name] for name in before)

    (tmp_path / "ca.key").unlink()
    init_dev_pki(tmp_path)
    after = _files(tmp_path)
    assert all(forced[name] != after[name] for name in forced)


def test_init_dev_pki_tightens_loose_modes(tmp_path: Path) -> None:
    pki = init_dev_pki(tmp_path)
    tmp_path.chmod(0o755)
    pki.server_key.chmod(0o644)
    Path(pki.clients["admin"]["key"]).chmod(0o640)
    init_dev_pki(tmp_path)
    assert stat.S_IMODE(tmp_path.stat().st_mode) == 0o700
    assert stat.S_IMODE(pki.server_key.stat().st_mode) == 0o600
    assert stat.S_IMODE(Path(pki.clients["admin"]["key"]).stat().st_mode) == 0o600


def test_load_dev_pki_incomplete(tmp_path: Path) -> None:
    assert load_dev_pki(tmp_path) is None
    pki = init_dev_pki(tmp_path)
    Path(pki.clients["settlement-2"]["key"]).unlink()
    assert load_dev_pki(tmp_path) is None
