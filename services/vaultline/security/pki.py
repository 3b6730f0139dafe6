"""Certificates for mTLS: a CA, server and client certificates, and the dev PKI on disk.

Everything here is pure (`cryptography` only) except `init_dev_pki`/`load_dev_pki`, which own
the `.vaultline/pki/` directory. Keys are EC P-256 (what every TLS stack, BoringSSL in grpc
included, accepts for ECDSA), PKCS#8 PEM, unencrypted: the dev PKI is dev-only and the
directory and key files are readable by the owner alone. No key material reaches a repr, an
exception or a log line.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import ipaddress
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from .identity import spiffe_uri

__all__ = [
    "DEV_IDENTITIES",
    "DevPki",
    "IssuedCert",
    "PkiError",
    "client_key",
    "init_dev_pki",
    "issue_client_cert",
    "issue_server_cert",
    "load_dev_pki",
    "new_ca",
]

log = logging.getLogger(__name__)

DEV_IDENTITIES: Final[tuple[tuple[str, str], ...]] = (
    ("ivr", "ivr-1"),
    ("crm", "crm-1"),
    ("settlement", "settlement-1"),
    ("settlement", "settlement-2"),  # a second approver, for dual control
    ("admin", "admin-1"),
    ("intake", "intake-1"),  # another card-receiving channel (a web checkout, a migration)
    ("payments", "payments-1"),  # the merchant's payment service: redeems security codes
    ("qa", "qa-1"),  # quality assurance: listens to call recordings
    ("descope", "descope-1"),  # de-scoping: replaces card numbers a CRM stores with tokens
)
DEFAULT_SERVER_HOSTS: Final = ("localhost", "127.0.0.1")
_ORGANIZATION: Final = "Vaultline"
# Certificates start a little in the past so a peer whose clock lags ours still accepts them.
_BACKDATE: Final = dt.timedelta(minutes=5)
# A dev certificate this close to expiry is reissued rather than left to fail mid-session.
_RENEW_BEFORE: Final = dt.timedelta(days=1)
_KEY_MODE: Final = 0o600
_CERT_MODE: Final = 0o644
_DIR_MODE: Final = 0o700


class PkiError(Exception):
    """The dev PKI directory cannot be used (e.g. unreadable files). Never carries key bytes."""


@dataclass(frozen=True)
class IssuedCert:
    """A certificate and its private key, both PEM. The repr never shows the key."""

    cert_pem: bytes
    key_pem: bytes = field(repr=False)

    def __repr__(self) -> str:
        try:
            cert = self.certificate
        except ValueError:
            return f"IssuedCert(<unparsable certificate, {len(self.cert_pem)} bytes>)"
        return (
            f"IssuedCert(subject={cert.subject.rfc4514_string()!r}, "
            f"not_after={cert.not_valid_after_utc.isoformat()!r})"
        )

    @property
    def certificate(self) -> x509.Certificate:
        return x509.load_pem_x509_certificate(self.cert_pem)


_SigningKey = ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey


def _now(now: dt.datetime | None) -> dt.datetime:
    if now is None:
        return dt.datetime.now(dt.UTC)
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    return now


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key: _SigningKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _load_ca(ca: IssuedCert) -> tuple[x509.Certificate, _SigningKey]:
    cert = ca.certificate
    try:
        key = serialization.load_pem_private_key(ca.key_pem, password=None)
    except (ValueError, TypeError):
        raise ValueError("the CA private key cannot be loaded") from None
    if not isinstance(key, _SigningKey):
        raise ValueError("the CA key must be EC or Ed25519")
    try:
        basic = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        basic = None
    if basic is None or not basic.ca:
        raise ValueError("the issuer is not a CA certificate")
    if key.public_key() != cert.public_key():
        raise ValueError("the CA key does not match the CA certificate")
    return cert, key


def _sign(builder: x509.CertificateBuilder, key: _SigningKey) -> x509.Certificate:
    algorithm = None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    return builder.sign(key, algorithm)


def new_ca(
    common_name: str = "Vaultline dev CA",
    *,
    days: int = 825,
    now: dt.datetime | None = None,
) -> IssuedCert:
    """A self-signed CA that may sign leaf certificates only (path length 0)."""
    if days <= 0:
        raise ValueError("days must be positive")
    start = _now(now) - _BACKDATE
    key = _new_key()
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, _ORGANIZATION),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), False)
    )
    cert = _sign(builder, key)
    return IssuedCert(cert.public_bytes(serialization.Encoding.PEM), _key_pem(key))


def _leaf(
    ca: IssuedCert,
    subject_cn: str,
    san: Sequence[x509.GeneralName],
    usage: x509.ObjectIdentifier,
    *,
    days: int,
    not_before: dt.datetime | None,
    not_after: dt.datetime | None,
    now: dt.datetime | None,
) -> IssuedCert:
    ca_cert, ca_key = _load_ca(ca)
    if days <= 0:
        raise ValueError("days must be positive")
    start = not_before if not_before is not None else _now(now) - _BACKDATE
    if not_after is None:
        # A leaf never outlives its CA: a verifier would reject it then anyway, more confusingly.
        end = min(start + dt.timedelta(days=days), ca_cert.not_valid_after_utc)
    else:
        end = not_after
    if start.tzinfo is None or end.tzinfo is None:
        raise ValueError("not_before and not_after must be timezone-aware")
    if end <= start:
        raise ValueError("the certificate would end before it starts")
    key = _new_key()
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    builder = (
        x509.CertificateBuilder()
        # CN alone: tools (and test fixtures) read "CN=<role>/<name>" as the whole subject.
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject_cn)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(x509.SubjectAlternativeName(list(san)), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), False
        )
    )
    cert = _sign(builder, ca_key)
    return IssuedCert(cert.public_bytes(serialization.Encoding.PEM), _key_pem(key))


def _host_name(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        pass
    if not host or not host.isascii() or any(c.isspace() or c in "/:@" for c in host):
        raise ValueError("hosts must be DNS names or IP addresses")
    return x509.DNSName(host.lower())


def issue_server_cert(
    ca: IssuedCert,
    *,
    hosts: Sequence[str] = DEFAULT_SERVER_HOSTS,
    days: int = 397,
    now: dt.datetime | None = None,
) -> IssuedCert:
    """A TLS server certificate for `hosts` (DNS names or IP addresses), signed by `ca`."""
    if isinstance(hosts, str) or not hosts:
        raise ValueError("hosts must be a non-empty sequence of names")
    san = [_host_name(h) for h in hosts]
    return _leaf(
        ca,
        "vaultline-tokenizer",
        san,
        ExtendedKeyUsageOID.SERVER_AUTH,
        days=days,
        not_before=None,
        not_after=None,
        now=now,
    )


def issue_client_cert(
    ca: IssuedCert,
    role: str,
    name: str,
    *,
    days: int = 397,
    not_before: dt.datetime | None = None,
    not_after: dt.datetime | None = None,
    now: dt.datetime | None = None,
) -> IssuedCert:
    """A client certificate for `spiffe://vaultline/<role>/<name>`, signed by `ca`.

    `not_before`/`not_after` override the validity window exactly (tests make expired
    certificates with them); otherwise it is `days` from `now`, capped at the CA's end.
    """
    uri = spiffe_uri(role, name)
    return _leaf(
        ca,
        f"{role}/{name}",
        [x509.UniformResourceIdentifier(uri)],
        ExtendedKeyUsageOID.CLIENT_AUTH,
        days=days,
        not_before=not_before,
        not_after=not_after,
        now=now,
    )


# --- the dev PKI on disk ---------------------------------------------------------------


@dataclass(frozen=True)
class DevPki:
    """Paths of the dev PKI. `clients` is what `stack.json` lists under "clients"."""

    ca_cert: Path
    server_cert: Path
    server_key: Path
    clients: dict[str, dict[str, str]]


def client_key(role: str, name: str) -> str:
    """The key of a dev identity in `DevPki.clients`: its role, or its name if not the first."""
    first = next(n for r, n in DEV_IDENTITIES if r == role)
    return role if name == first else name


def _client_paths(pki_dir: Path, role: str, name: str) -> tuple[Path, Path]:
    base = pki_dir / "clients" / f"{role}-{name}"
    return base.with_suffix(".crt"), base.with_suffix(".key")


def _dev_pki(pki_dir: Path) -> DevPki:
    clients: dict[str, dict[str, str]] = {}
    for role, name in DEV_IDENTITIES:
        cert, key = _client_paths(pki_dir, role, name)
        clients[client_key(role, name)] = {"cert": str(cert), "key": str(key)}
    return DevPki(
        ca_cert=pki_dir / "ca.crt",
        server_cert=pki_dir / "server.crt",
        server_key=pki_dir / "server.key",
        clients=clients,
    )


def _all_files(pki_dir: Path) -> list[Path]:
    files = [pki_dir / n for n in ("ca.crt", "ca.key", "server.crt", "server.key")]
    for role, name in DEV_IDENTITIES:
        files.extend(_client_paths(pki_dir, role, name))
    return files


def load_dev_pki(pki_dir: Path) -> DevPki | None:
    """The dev PKI under `pki_dir` if all its files exist, else None. Validity is not checked:
    `init_dev_pki` repairs what is missing or expired."""
    pki_dir = Path(pki_dir).absolute()
    if not all(p.is_file() for p in _all_files(pki_dir)):
        return None
    return _dev_pki(pki_dir)


def _write(path: Path, data: bytes, mode: int) -> None:
    """Write atomically with `mode` from the first byte (no window with wider permissions)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), mode)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)  # the umask may have narrowed or (never) widened it
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def _read_pair(cert_path: Path, key_path: Path) -> IssuedCert | None:
    try:
        return IssuedCert(cert_path.read_bytes(), key_path.read_bytes())
    except FileNotFoundError:
        return None


def _usable_ca(pair: IssuedCert | None, now: dt.datetime) -> bool:
    if pair is None:
        return False
    try:
        cert, _ = _load_ca(pair)
    except ValueError:
        return False
    return cert.not_valid_before_utc <= now and now + _RENEW_BEFORE < cert.not_valid_after_utc


def _usable_leaf(
    pair: IssuedCert | None,
    ca_cert: x509.Certificate,
    now: dt.datetime,
    san: Sequence[x509.GeneralName],
) -> bool:
    """Whether a leaf on disk can stay: signed by this CA, in date, same names, its own key."""
    if pair is None:
        return False
    try:
        cert = pair.certificate
        key = serialization.load_pem_private_key(pair.key_pem, password=None)
        cert.verify_directly_issued_by(ca_cert)
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (ValueError, TypeError, InvalidSignature, x509.ExtensionNotFound):
        return False
    return (
        key.public_key() == cert.public_key()
        and cert.not_valid_before_utc <= now
        and now + _RENEW_BEFORE < cert.not_valid_after_utc
        and sorted(map(repr, names)) == sorted(map(repr, san))
    )


@contextlib.contextmanager
def _locked(pki_dir: Path) -> Iterator[None]:
    # Two `dev up`s at once must not each mint a CA and leave a mixed set behind.
    fd = os.open(pki_dir / ".lock", os.O_RDWR | os.O_CREAT, _KEY_MODE)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _private_dir(path: Path) -> None:
    path.mkdir(mode=_DIR_MODE, parents=True, exist_ok=True)
    if path.is_symlink() or not path.is_dir():
        raise PkiError(f"{path} must be a real directory")
    path.chmod(_DIR_MODE)


def init_dev_pki(pki_dir: Path, *, force: bool = False) -> DevPki:
    """Create or repair the dev PKI under `pki_dir` and return its paths.

    Layout: ca.crt, ca.key, server.crt, server.key, clients/<role>-<name>.crt/.key. Valid files
    are kept (a second call changes nothing); a missing, expiring, foreign or mismatched
    certificate is reissued from the existing CA; a missing or expiring CA is replaced, which
    reissues everything. `force` replaces everything.
    """
    pki_dir = Path(pki_dir).absolute()
    _private_dir(pki_dir)
    _private_dir(pki_dir / "clients")
    now = dt.datetime.now(dt.UTC)
    with _locked(pki_dir):
        try:
            ca = None if force else _read_pair(pki_dir / "ca.crt", pki_dir / "ca.key")
            if not _usable_ca(ca, now):
                log.info("dev PKI: new CA in %s", pki_dir)
                ca = new_ca(now=now)
                _write(pki_dir / "ca.key", ca.key_pem, _KEY_MODE)
                _write(pki_dir / "ca.crt", ca.cert_pem, _CERT_MODE)
            assert ca is not None
            ca_cert = ca.certificate

            server_san = [_host_name(h) for h in DEFAULT_SERVER_HOSTS]
            server = _read_pair(pki_dir / "server.crt", pki_dir / "server.key")
            if force or not _usable_leaf(server, ca_cert, now, server_san):
                log.info("dev PKI: new server certificate for %s", ", ".join(DEFAULT_SERVER_HOSTS))
                server = issue_server_cert(ca, now=now)
                _write(pki_dir / "server.key", server.key_pem, _KEY_MODE)
                _write(pki_dir / "server.crt", server.cert_pem, _CERT_MODE)

            for role, name in DEV_IDENTITIES:
                cert_path, key_path = _client_paths(pki_dir, role, name)
                san = [x509.UniformResourceIdentifier(spiffe_uri(role, name))]
                client = _read_pair(cert_path, key_path)
                if force or not _usable_leaf(client, ca_cert, now, san):
                    log.info("dev PKI: new client certificate for %s/%s", role, name)
                    client = issue_client_cert(ca, role, name, now=now)
                    _write(key_path, client.key_pem, _KEY_MODE)
                    _write(cert_path, client.cert_pem, _CERT_MODE)
                # Keys written by an older tool or copied by hand get tightened too.
                key_path.chmod(_KEY_MODE)
            for key_path in (pki_dir / "ca.key", pki_dir / "server.key"):
                key_path.chmod(_KEY_MODE)
        except (PermissionError, IsADirectoryError) as e:
            raise PkiError(f"cannot use the dev PKI in {pki_dir}: {e.strerror}") from None
    return _dev_pki(pki_dir)
