"""mTLS over real gRPC: who gets through the handshake, and what a refused client sees.

A tiny grpc.aio server with `server_credentials` answers one method with the caller's
identity. No database or OpenBao is involved. Every refusal by the TLS handshake reaches the
client as UNAVAILABLE and never reaches a handler: the application cannot audit it.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import grpc
import pytest
import pytest_asyncio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from vaultline.security.identity import IdentityError, identity_from_auth_context
from vaultline.security.pki import IssuedCert, issue_client_cert, issue_server_cert, new_ca
from vaultline.security.tls import channel_credentials, server_credentials

pytestmark = pytest.mark.integration

METHOD = "/vaultline.test.v1.WhoAmI/WhoAmI"
CA = new_ca()
OTHER_CA = new_ca("Someone else's CA")
NOW = dt.datetime.now(dt.UTC)


@dataclass
class WhoAmI:
    """Answers with the caller's identity URI; counts every call that reached it."""

    calls: int = 0
    auth_contexts: list[dict[str, list[bytes]]] = field(default_factory=list)

    async def who(self, request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
        self.calls += 1
        auth_context = context.auth_context()
        self.auth_contexts.append(auth_context)
        try:
            return identity_from_auth_context(auth_context).uri.encode()
        except IdentityError as e:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, e.reason)
            raise  # unreachable: abort raises

    def handler(self) -> grpc.GenericRpcHandler:
        method = grpc.unary_unary_rpc_method_handler(self.who)
        return grpc.method_handlers_generic_handler("vaultline.test.v1.WhoAmI", {"WhoAmI": method})


@dataclass
class Running:
    port: int
    service: WhoAmI


@pytest_asyncio.fixture(scope="module")
async def server() -> AsyncIterator[Running]:
    tls = issue_server_cert(CA)
    service = WhoAmI()
    srv = grpc.aio.server()
    srv.add_generic_rpc_handlers([service.handler()])
    credentials = server_credentials(CA.cert_pem, tls.cert_pem, tls.key_pem)
    port = srv.add_secure_port("127.0.0.1:0", credentials)
    assert port
    await srv.start()
    try:
        yield Running(port, service)
    finally:
        await srv.stop(None)


async def _call(
    credentials: grpc.ChannelCredentials | None, port: int, host: str = "127.0.0.1"
) -> bytes:
    target = f"{host}:{port}"
    channel = (
        grpc.aio.insecure_channel(target)
        if credentials is None
        else grpc.aio.secure_channel(target, credentials)
    )
    async with channel:
        response: bytes = await channel.unary_unary(METHOD)(b"", timeout=10)
        return response


def _creds(client: IssuedCert, ca: IssuedCert = CA) -> grpc.ChannelCredentials:
    return channel_credentials(ca.cert_pem, client.cert_pem, client.key_pem)


def _foreign_trust_domain_cert() -> IssuedCert:
    """Signed by our CA, well formed, but naming spiffe://elsewhere/...: passes TLS."""
    ca_key = serialization.load_pem_private_key(CA.key_pem, None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ivr/ivr-1")]))
        .issuer_name(CA.certificate.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - dt.timedelta(hours=1))
        .not_valid_after(NOW + dt.timedelta(days=1))
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.UniformResourceIdentifier("spiffe://elsewhere/ivr/ivr-1")]
            ),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return IssuedCert(cert.public_bytes(serialization.Encoding.PEM), key_pem)


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
async def test_valid_client_gets_its_identity(server: Running, host: str) -> None:
    client = issue_client_cert(CA, "settlement", "settlement-2")
    assert await _call(_creds(client), server.port, host) == (
        b"spiffe://vaultline/settlement/settlement-2"
    )


async def test_what_grpc_puts_in_the_auth_context(server: Running) -> None:
    client = issue_client_cert(CA, "ivr", "ivr-1")
    await _call(_creds(client), server.port)
    context = server.service.auth_contexts[-1]
    assert context["transport_security_type"] == [b"ssl"]
    assert context["x509_pem_cert"] == [client.cert_pem]
    assert context["x509_subject_alternative_name"] == [b"spiffe://vaultline/ivr/ivr-1"]
    assert context["peer_uri"] == [b"spiffe://vaultline/ivr/ivr-1"]
    assert context["peer_spiffe_id"] == [b"spiffe://vaultline/ivr/ivr-1"]
    assert context["x509_common_name"] == [b"ivr/ivr-1"]
    assert context["x509_subject"] == [b"CN=ivr/ivr-1"]
    assert context["security_level"] == [b"TSI_PRIVACY_AND_INTEGRITY"]


def _expired() -> IssuedCert:
    start, end = NOW - dt.timedelta(days=30), NOW - dt.timedelta(days=1)
    return issue_client_cert(CA, "ivr", "ivr-1", not_before=start, not_after=end)


@pytest.mark.parametrize(
    "credentials",
    [
        pytest.param(lambda: grpc.ssl_channel_credentials(CA.cert_pem), id="no-client-cert"),
        pytest.param(lambda: _creds(issue_client_cert(OTHER_CA, "ivr", "ivr-1")), id="another-ca"),
        pytest.param(lambda: _creds(_expired()), id="expired"),
        pytest.param(lambda: _creds(issue_server_cert(CA)), id="server-cert-as-client"),
        pytest.param(
            lambda: _creds(issue_client_cert(CA, "ivr", "ivr-1"), OTHER_CA),
            id="client-distrusts-server",
        ),
        pytest.param(lambda: None, id="plaintext"),
    ],
)
async def test_handshake_refusals_are_unavailable(server: Running, credentials: object) -> None:
    assert callable(credentials)
    calls = server.service.calls
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await _call(credentials(), server.port)
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    assert server.service.calls == calls  # refused before any handler ran


async def test_foreign_trust_domain_passes_tls_but_not_identity(server: Running) -> None:
    calls = server.service.calls
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await _call(_creds(_foreign_trust_domain_cert()), server.port)
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert e.value.details() == "BAD_IDENTITY"
    assert server.service.calls == calls + 1
