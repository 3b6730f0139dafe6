"""Caller identity: the `spiffe://vaultline/<role>/<name>` URI of a verified client certificate.

Pure: no I/O, no logging. The TLS layer has already verified the chain, validity dates and
the key; this module only reads who the certificate names. Errors carry a reason code and a
fixed message, never the certificate or URI that was presented.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Final, Literal

from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

__all__ = [
    "TRUST_DOMAIN",
    "Identity",
    "IdentityError",
    "IdentityErrorReason",
    "identity_from_auth_context",
    "identity_from_pem",
    "identity_from_uri",
    "spiffe_uri",
    "valid_segment",
]

TRUST_DOMAIN: Final = "vaultline"
# One DNS-label-like segment: what a role or a workload name may be.
SEGMENT_PATTERN: Final = r"[a-z0-9][a-z0-9-]{0,62}"
_SEGMENT = re.compile(SEGMENT_PATTERN)
_URI = re.compile(rf"spiffe://{TRUST_DOMAIN}/({SEGMENT_PATTERN})/({SEGMENT_PATTERN})")
# The key grpc puts the peer's leaf certificate under (PEM, one entry) on a TLS server.
AUTH_CONTEXT_PEM_KEY: Final = "x509_pem_cert"
_CACHE_SIZE: Final = 1024

IdentityErrorReason = Literal["NO_CLIENT_CERTIFICATE", "BAD_IDENTITY"]

_MESSAGES: Final[dict[str, str]] = {
    "NO_CLIENT_CERTIFICATE": "the caller presented no client certificate",
    "BAD_IDENTITY": (
        "the client certificate does not name exactly one spiffe://vaultline/<role>/<name> "
        "identity for client authentication"
    ),
}


class IdentityError(Exception):
    """The caller cannot be identified. `reason` is stable; the message is fixed."""

    def __init__(self, reason: IdentityErrorReason) -> None:
        super().__init__(_MESSAGES[reason])
        self.reason: IdentityErrorReason = reason

    def __reduce__(self) -> tuple[type[IdentityError], tuple[IdentityErrorReason]]:
        return (type(self), (self.reason,))


def valid_segment(segment: str) -> bool:
    """Whether `segment` may be a role or a name: `[a-z0-9][a-z0-9-]{0,62}`."""
    return isinstance(segment, str) and _SEGMENT.fullmatch(segment) is not None


def spiffe_uri(role: str, name: str) -> str:
    """The identity URI for `role` and `name`; ValueError if either is not a valid segment."""
    if not valid_segment(role):
        raise ValueError("role must match " + SEGMENT_PATTERN)
    if not valid_segment(name):
        raise ValueError("name must match " + SEGMENT_PATTERN)
    return f"spiffe://{TRUST_DOMAIN}/{role}/{name}"


@dataclass(frozen=True, slots=True)
class Identity:
    """A verified caller. Construct through `identity_from_*`; direct construction is checked."""

    role: str
    name: str
    uri: str

    def __post_init__(self) -> None:
        if not (valid_segment(self.role) and valid_segment(self.name)) or self.uri != (
            f"spiffe://{TRUST_DOMAIN}/{self.role}/{self.name}"
        ):
            raise IdentityError("BAD_IDENTITY")

    def __str__(self) -> str:
        return self.uri


def identity_from_uri(uri: str) -> Identity:
    """Parse `spiffe://vaultline/<role>/<name>`, exactly; anything else is BAD_IDENTITY."""
    match = _URI.fullmatch(uri) if isinstance(uri, str) else None
    if match is None:
        raise IdentityError("BAD_IDENTITY")
    return Identity(role=match[1], name=match[2], uri=uri)


@functools.lru_cache(maxsize=_CACHE_SIZE)
def identity_from_pem(cert_pem: bytes) -> Identity:
    """The identity in a client certificate (PEM).

    Like a SPIFFE X509-SVID: exactly one URI SAN, and it must be a vaultline identity. The
    certificate must also be a leaf (not a CA) whose extended key usage allows client
    authentication, so a server or CA certificate from the same CA never passes as a caller.
    Results are cached per process by the PEM bytes (failures are not cached).
    """
    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        uris = san.get_values_for_type(x509.UniformResourceIdentifier)
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except (ValueError, TypeError, x509.ExtensionNotFound):
        raise IdentityError("BAD_IDENTITY") from None
    if ExtendedKeyUsageOID.CLIENT_AUTH not in eku:
        raise IdentityError("BAD_IDENTITY")
    try:
        basic = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        pass
    else:
        if basic.ca:
            raise IdentityError("BAD_IDENTITY")
    if len(uris) != 1:
        raise IdentityError("BAD_IDENTITY")
    return identity_from_uri(uris[0])


def identity_from_auth_context(auth_context: Mapping[str, Sequence[bytes]]) -> Identity:
    """The caller of a gRPC call, from `context.auth_context()` on an mTLS server.

    grpc lists the verified leaf certificate under `x509_pem_cert`; we parse that rather than
    grpc's flattened SAN strings so the one-URI rule sees every SAN, typed. No certificate
    (plaintext port, or a server that does not require client auth) is NO_CLIENT_CERTIFICATE.
    """
    pems = auth_context.get(AUTH_CONTEXT_PEM_KEY) or ()
    if len(pems) == 0:
        raise IdentityError("NO_CLIENT_CERTIFICATE")
    if len(pems) != 1:
        raise IdentityError("BAD_IDENTITY")
    pem = pems[0]
    if isinstance(pem, str):
        pem = pem.encode("ascii", "replace")
    return identity_from_pem(bytes(pem))
