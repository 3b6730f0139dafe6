"""Unit tests for vaultline.security.identity: SPIFFE URIs, client certificates, auth contexts."""

from __future__ import annotations

import datetime as dt
import pickle

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from vaultline.security.identity import (
    Identity,
    IdentityError,
    identity_from_auth_context,
    identity_from_pem,
    identity_from_uri,
    spiffe_uri,
)
from vaultline.security.pki import IssuedCert, issue_client_cert, issue_server_cert, new_ca

CA = new_ca()
IVR = issue_client_cert(CA, "ivr", "ivr-1")


def _cert(
    sans: list[x509.GeneralName] | None,
    *,
    usages: list[x509.ObjectIdentifier] | None = None,
    ca: bool = False,
) -> bytes:
    """A certificate signed by CA with exactly the SANs and EKU given (None: no extension)."""
    ca_cert = CA.certificate
    ca_key = serialization.load_pem_private_key(CA.key_pem, None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test")]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if usages is None:
        usages = [ExtendedKeyUsageOID.CLIENT_AUTH]
    if usages:
        builder = builder.add_extension(x509.ExtendedKeyUsage(usages), critical=False)
    if sans is not None:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return builder.sign(ca_key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


def _uri(value: str) -> x509.UniformResourceIdentifier:
    return x509.UniformResourceIdentifier(value)


# --- URIs ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("uri", "role", "name"),
    [
        ("spiffe://vaultline/ivr/ivr-1", "ivr", "ivr-1"),
        ("spiffe://vaultline/settlement/settlement-2", "settlement", "settlement-2"),
        ("spiffe://vaultline/0/9", "0", "9"),
        (f"spiffe://vaultline/{'a' * 63}/{'b' * 63}", "a" * 63, "b" * 63),
    ],
)
def test_valid_uri(uri: str, role: str, name: str) -> None:
    identity = identity_from_uri(uri)
    assert identity == Identity(role=role, name=name, uri=uri)
    assert str(identity) == uri


@pytest.mark.parametrize(
    "uri",
    [
        "",
        "https://vaultline/ivr/ivr-1",  # wrong scheme
        "SPIFFE://vaultline/ivr/ivr-1",
        "spiffe:/vaultline/ivr/ivr-1",
        "spiffe://other/ivr/ivr-1",  # wrong trust domain
        "spiffe://Vaultline/ivr/ivr-1",
        "spiffe://vaultline.example/ivr/ivr-1",
        "spiffe://vaultline:443/ivr/ivr-1",
        "spiffe://user@vaultline/ivr/ivr-1",
        "spiffe://vaultline/ivr",  # one segment
        "spiffe://vaultline/ivr/ivr-1/extra",  # three segments
        "spiffe://vaultline/ivr/ivr-1/",
        "spiffe://vaultline//ivr-1",
        "spiffe://vaultline/ivr//ivr-1",
        "spiffe://vaultline/IVR/ivr-1",  # bad characters
        "spiffe://vaultline/ivr/ivr_1",
        "spiffe://vaultline/ivr/-ivr",
        "spiffe://vaultline/ivr/ivr.1",
        "spiffe://vaultline/ivr/%69vr",
        "spiffe://vaultline/ivr/ivr-1?x=1",
        "spiffe://vaultline/ivr/ivr-1#f",
        "spiffe://vaultline/ivr/ivr-1\n",
        " spiffe://vaultline/ivr/ivr-1",
        "spiffe://vaultline/ivr/ivr-\u0661",  # a non-ASCII digit
        f"spiffe://vaultline/ivr/{'a' * 64}",  # too long
    ],
)
def test_bad_uri(uri: str) -> None:
    with pytest.raises(IdentityError) as e:
        identity_from_uri(uri)
    assert e.value.reason == "BAD_IDENTITY"
    if uri:
        assert uri not in str(e.value)


def test_non_string_uri() -> None:
    with pytest.raises(IdentityError):
        identity_from_uri(b"spiffe://vaultline/ivr/ivr-1")  # type: ignore[arg-type]


def test_identity_checks_direct_construction() -> None:
    with pytest.raises(IdentityError):
        Identity(role="admin", name="ivr-1", uri="spiffe://vaultline/ivr/ivr-1")
    with pytest.raises(IdentityError):
        Identity(role="a/b", name="c", uri="spiffe://vaultline/a/b/c")


def test_spiffe_uri() -> None:
    assert spiffe_uri("crm", "crm-1") == "spiffe://vaultline/crm/crm-1"
    with pytest.raises(ValueError):
        spiffe_uri("crm", "crm/1")


def test_error_is_fixed_and_picklable() -> None:
    error = IdentityError("NO_CLIENT_CERTIFICATE")
    copy = pickle.loads(pickle.dumps(error))  # noqa: S301 - our own bytes
    assert copy.reason == "NO_CLIENT_CERTIFICATE"
    assert str(copy) == str(error) == "the caller presented no client certificate"


# --- certificates -------------------------------------------------------------------------


def test_identity_from_issued_certificate() -> None:
    identity = identity_from_pem(IVR.cert_pem)
    assert (identity.role, identity.name) == ("ivr", "ivr-1")
    assert identity.uri == "spiffe://vaultline/ivr/ivr-1"


def test_identity_from_pem_is_cached() -> None:
    pem = issue_client_cert(CA, "crm", "crm-1").cert_pem
    first = identity_from_pem(pem)
    hits = identity_from_pem.cache_info().hits
    assert identity_from_pem(bytes(pem)) is first
    assert identity_from_pem.cache_info().hits == hits + 1


@pytest.mark.parametrize(
    "pem",
    [
        pytest.param(
            _cert([_uri("spiffe://vaultline/ivr/a"), _uri("spiffe://vaultline/crm/b")]),
            id="two-uris",
        ),
        pytest.param(
            _cert([_uri("spiffe://vaultline/ivr/a"), _uri("https://example.com/")]),
            id="second-non-spiffe-uri",
        ),
        pytest.param(_cert([x509.DNSName("ivr.example")]), id="no-uri"),
        pytest.param(_cert(None), id="no-san"),
        pytest.param(_cert([_uri("spiffe://other/ivr/a")]), id="foreign-trust-domain"),
        pytest.param(_cert([_uri("spiffe://vaultline/ivr/a/b")]), id="three-segments"),
        pytest.param(
            _cert([_uri("spiffe://vaultline/ivr/a")], usages=[ExtendedKeyUsageOID.SERVER_AUTH]),
            id="server-eku",
        ),
        pytest.param(_cert([_uri("spiffe://vaultline/ivr/a")], usages=[]), id="no-eku"),
        pytest.param(_cert([_uri("spiffe://vaultline/ivr/a")], ca=True), id="ca"),
        pytest.param(issue_server_cert(CA).cert_pem, id="server-certificate"),
        pytest.param(CA.cert_pem, id="ca-certificate"),
        pytest.param(b"not a certificate", id="garbage"),
        pytest.param(b"", id="empty"),
    ],
)
def test_bad_certificate(pem: bytes) -> None:
    with pytest.raises(IdentityError) as e:
        identity_from_pem(pem)
    assert e.value.reason == "BAD_IDENTITY"


def test_one_uri_among_other_sans_is_fine() -> None:
    pem = _cert([x509.DNSName("ivr.example"), _uri("spiffe://vaultline/ivr/ivr-9")])
    assert identity_from_pem(pem).name == "ivr-9"


# --- auth contexts ------------------------------------------------------------------------


def _auth_context(cert: IssuedCert) -> dict[str, list[bytes]]:
    # Shape observed from grpcio 1.85 on an mTLS server (see tests/integration/test_mtls.py).
    return {
        "transport_security_type": [b"ssl"],
        "x509_subject": [b"CN=ivr/ivr-1"],
        "x509_common_name": [b"ivr/ivr-1"],
        "x509_pem_cert": [cert.cert_pem],
        "x509_subject_alternative_name": [b"spiffe://vaultline/ivr/ivr-1"],
        "peer_uri": [b"spiffe://vaultline/ivr/ivr-1"],
        "peer_spiffe_id": [b"spiffe://vaultline/ivr/ivr-1"],
        "security_level": [b"TSI_PRIVACY_AND_INTEGRITY"],
        "ssl_tls_version": [b"TLSv1.3"],
    }


def test_identity_from_auth_context() -> None:
    assert identity_from_auth_context(_auth_context(IVR)).uri == "spiffe://vaultline/ivr/ivr-1"


@pytest.mark.parametrize(
    "context",
    [
        {},
        {"transport_security_type": [b"insecure"], "security_level": [b"TSI_SECURITY_NONE"]},
        {"transport_security_type": [b"ssl"], "x509_pem_cert": []},
    ],
)
def test_no_client_certificate(context: dict[str, list[bytes]]) -> None:
    with pytest.raises(IdentityError) as e:
        identity_from_auth_context(context)
    assert e.value.reason == "NO_CLIENT_CERTIFICATE"


def test_auth_context_trusts_the_certificate_not_the_flattened_names() -> None:
    context = _auth_context(issue_server_cert(CA))
    with pytest.raises(IdentityError) as e:
        identity_from_auth_context(context)
    assert e.value.reason == "BAD_IDENTITY"


def test_two_certificates_in_auth_context() -> None:
    context = _auth_context(IVR)
    context["x509_pem_cert"] = [IVR.cert_pem, IVR.cert_pem]
    with pytest.raises(IdentityError) as e:
        identity_from_auth_context(context)
    assert e.value.reason == "BAD_IDENTITY"
