"""gRPC mTLS credentials: a server that requires a client certificate from our CA, and clients.

grpc's TLS (BoringSSL) checks the chain, the validity dates and the key during the handshake;
a refused client never reaches a handler, so the application cannot see or audit it (the
handshake failure shows up only in grpc's own C-core log). `identity.identity_from_auth_context`
reads who a call comes from once the handshake succeeded.
"""

from __future__ import annotations

from pathlib import Path

import grpc

__all__ = [
    "channel_credentials",
    "load_client_credentials",
    "load_server_credentials",
    "server_credentials",
]


def server_credentials(
    ca_cert: bytes, server_cert: bytes, server_key: bytes
) -> grpc.ServerCredentials:
    """Server TLS that requires and verifies a client certificate issued by `ca_cert`."""
    return grpc.ssl_server_credentials(
        [(server_key, server_cert)],
        root_certificates=ca_cert,
        require_client_auth=True,
    )


def channel_credentials(
    ca_cert: bytes, client_cert: bytes, client_key: bytes
) -> grpc.ChannelCredentials:
    """Client TLS that trusts only `ca_cert` and presents `client_cert`."""
    return grpc.ssl_channel_credentials(
        root_certificates=ca_cert,
        private_key=client_key,
        certificate_chain=client_cert,
    )


def load_server_credentials(
    ca_path: str | Path, cert_path: str | Path, key_path: str | Path
) -> grpc.ServerCredentials:
    """`server_credentials` from PEM files."""
    return server_credentials(
        Path(ca_path).read_bytes(), Path(cert_path).read_bytes(), Path(key_path).read_bytes()
    )


def load_client_credentials(
    ca_path: str | Path, cert_path: str | Path, key_path: str | Path
) -> grpc.ChannelCredentials:
    """`channel_credentials` from PEM files (e.g. the paths in `stack.json`)."""
    return channel_credentials(
        Path(ca_path).read_bytes(), Path(cert_path).read_bytes(), Path(key_path).read_bytes()
    )
