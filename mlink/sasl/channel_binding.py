"""Channel-binding data for SCRAM-*-PLUS (RFC 5056, RFC 5929, RFC 9266, XEP-0440).

Why: channel binding ties the SASL exchange to the TLS connection it runs on,
so a man in the middle who terminates TLS with its own certificate cannot
relay a SCRAM login. The transport knows the TLS state; the mechanisms only
need the resulting bytes, which travel in a `ChannelBinding`.

Sans-IO: no trio here. The `cryptography` package (already required through
trustme) is used only to read a certificate's signature hash algorithm.

Notes for the transport layer:
  * tls-exporter (RFC 9266): TLS exporter with label "EXPORTER-Channel-Binding",
    empty context, 32 bytes, TLS 1.3 only. Python 3.11's ssl module cannot
    export keying material; `mlink.transport.tls_exporter` calls OpenSSL's
    SSL_export_keying_material through ctypes.
  * tls-server-end-point (RFC 5929 §4): `tls_server_end_point(der)` below, on
    the server's own certificate (DER). Works on every TLS version.
  * tls-unique (RFC 5929 §3): `ssl_object.get_channel_binding("tls-unique")`;
    RFC 9266 §3 forbids it on TLS 1.3, so only offer it below 1.3 (Python
    returns a value on 1.3 too, which must not be used).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes

__all__ = [
    "CB_TYPES_BY_PREFERENCE",
    "EXPORTER_LABEL",
    "EXPORTER_LENGTH",
    "ChannelBinding",
    "UnsupportedCertificate",
    "channel_binding_element_types",
    "tls_server_end_point",
]

# Strongest first. tls-exporter binds to the whole TLS 1.3 session; the
# end-point binding only proves which certificate the client saw; tls-unique
# is the legacy TLS <= 1.2 binding (broken by triple-handshake without EMS).
# XEP-0440: the stream feature listing the binding types a server verifies.
SASL_CB_NS = "urn:xmpp:sasl-cb:0"
CB_TYPES_BY_PREFERENCE: tuple[str, ...] = ("tls-exporter", "tls-server-end-point", "tls-unique")

# RFC 9266 §2: the exporter label and output length for tls-exporter.
EXPORTER_LABEL = b"EXPORTER-Channel-Binding"
EXPORTER_LENGTH = 32

# RFC 5929 §4.1: certificates signed with MD5 or SHA-1 are bound with SHA-256.
_UPGRADED_HASHES = frozenset({"md5", "sha1"})


@dataclass(frozen=True, slots=True)
class ChannelBinding:
    """The channel-binding data the transport can give for one connection.

    `types` maps a binding type name ("tls-exporter", "tls-server-end-point",
    "tls-unique") to the bytes a client must echo in SCRAM's `c=` attribute.
    """

    types: dict[str, bytes] = field(default_factory=dict)

    def supported(self) -> set[str]:
        """The binding types with data that mlink knows how to use."""
        return {name for name in self.types if name in CB_TYPES_BY_PREFERENCE}


class UnsupportedCertificate(ValueError):
    """RFC 5929 §4.1 defines no tls-server-end-point value for this certificate
    (e.g. Ed25519/Ed448 signatures use no separate hash): do not offer it."""


def tls_server_end_point(der_cert: bytes) -> bytes:
    """Return the RFC 5929 §4.1 tls-server-end-point binding of a certificate.

    The value is the hash of the DER certificate, using the hash of the
    certificate's own signature algorithm, upgraded to SHA-256 when that is
    MD5 or SHA-1. Raises UnsupportedCertificate when the signature uses no
    single hash (EdDSA), and ValueError for an unparsable certificate.
    """
    cert = x509.load_der_x509_certificate(der_cert)
    try:
        algorithm = cert.signature_hash_algorithm
    except UnsupportedAlgorithm as exc:
        raise UnsupportedCertificate(f"unknown signature algorithm: {exc}") from exc
    if algorithm is None:
        raise UnsupportedCertificate("certificate signature uses no separate hash function")
    if algorithm.name in _UPGRADED_HASHES:
        algorithm = hashes.SHA256()
    digest = hashes.Hash(algorithm)
    digest.update(der_cert)
    return digest.finalize()


def channel_binding_element_types(cb_types: Iterable[str]) -> list[str]:
    """The types to list in XEP-0440's `<sasl-channel-binding/>`, strongest first.

    Unknown names are dropped: advertising a type the mechanisms would then
    reject makes clients fail instead of picking another type.
    """
    present = set(cb_types)
    return [name for name in CB_TYPES_BY_PREFERENCE if name in present]
