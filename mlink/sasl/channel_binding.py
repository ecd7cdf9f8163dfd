"""Channel-binding data for SCRAM-*-PLUS (RFC 5056, RFC 5929, RFC 9266, XEP-0440).

Why: channel binding ties the SASL exchange to the TLS connection it runs on,
so a man in the middle who terminates TLS with its own certificate cannot
relay a SCRAM login. The transport knows the TLS state; the mechanisms only
need the resulting bytes, which travel in a `ChannelBinding`.

Sans-IO: no trio here. A certificate's signature hash algorithm is read
from its DER bytes here (a few lines of DER, standard library only): the
`cryptography` package would cost every shard ~9 MiB of memory for it.

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

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass, field

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
    single hash (EdDSA) or an algorithm not known here, and ValueError for
    an unparsable certificate.
    """
    algorithm = signature_hash_name(der_cert)
    if algorithm in _UPGRADED_HASHES:
        algorithm = "sha256"
    return hashlib.new(algorithm, der_cert).digest()


# Signature algorithm OIDs -> their hash (RFC 3279, 4055, 5758, 8017; NIST
# CSOR for SHA-3); None: the algorithm uses no separate hash (RFC 8410).
_SIGNATURE_HASHES: dict[str, str | None] = {
    "1.2.840.113549.1.1.4": "md5", "1.2.840.113549.1.1.5": "sha1",
    "1.2.840.113549.1.1.14": "sha224", "1.2.840.113549.1.1.11": "sha256",
    "1.2.840.113549.1.1.12": "sha384", "1.2.840.113549.1.1.13": "sha512",
    "1.2.840.10045.4.1": "sha1", "1.2.840.10045.4.3.1": "sha224",
    "1.2.840.10045.4.3.2": "sha256", "1.2.840.10045.4.3.3": "sha384",
    "1.2.840.10045.4.3.4": "sha512",
    "1.2.840.10040.4.3": "sha1", "2.16.840.1.101.3.4.3.1": "sha224",
    "2.16.840.1.101.3.4.3.2": "sha256", "2.16.840.1.101.3.4.3.3": "sha384",
    "2.16.840.1.101.3.4.3.4": "sha512",
    "2.16.840.1.101.3.4.3.9": "sha3_224", "2.16.840.1.101.3.4.3.10": "sha3_256",
    "2.16.840.1.101.3.4.3.11": "sha3_384", "2.16.840.1.101.3.4.3.12": "sha3_512",
    "2.16.840.1.101.3.4.3.13": "sha3_224", "2.16.840.1.101.3.4.3.14": "sha3_256",
    "2.16.840.1.101.3.4.3.15": "sha3_384", "2.16.840.1.101.3.4.3.16": "sha3_512",
    "1.3.101.112": None, "1.3.101.113": None,  # Ed25519, Ed448
}
# RSASSA-PSS (RFC 4055): the hash is in the parameters, SHA-1 by default.
_RSASSA_PSS = "1.2.840.113549.1.1.10"
_HASH_OIDS = {
    "1.3.14.3.2.26": "sha1", "2.16.840.1.101.3.4.2.4": "sha224",
    "2.16.840.1.101.3.4.2.1": "sha256", "2.16.840.1.101.3.4.2.2": "sha384",
    "2.16.840.1.101.3.4.2.3": "sha512", "2.16.840.1.101.3.4.2.7": "sha3_224",
    "2.16.840.1.101.3.4.2.8": "sha3_256", "2.16.840.1.101.3.4.2.9": "sha3_384",
    "2.16.840.1.101.3.4.2.10": "sha3_512",
}
_SEQUENCE, _OID, _EXPLICIT_0 = 0x30, 0x06, 0xA0


def signature_hash_name(der_cert: bytes) -> str:
    """The hashlib name of the hash in a DER certificate's signature
    algorithm (Certificate ::= SEQUENCE { tbsCertificate, signatureAlgorithm,
    signatureValue }, RFC 5280 §4.1)."""
    cert_start, cert_end = _expect(der_cert, 0, len(der_cert), _SEQUENCE)
    if cert_end != len(der_cert):
        raise ValueError("bytes after the certificate")
    _, tbs_end = _expect(der_cert, cert_start, cert_end, _SEQUENCE)
    alg_start, alg_end = _expect(der_cert, tbs_end, cert_end, _SEQUENCE)
    oid_start, oid_end = _expect(der_cert, alg_start, alg_end, _OID)
    oid = _oid_text(der_cert[oid_start:oid_end])
    if oid == _RSASSA_PSS:
        return _pss_hash(der_cert, oid_end, alg_end)
    if oid not in _SIGNATURE_HASHES:
        raise UnsupportedCertificate(f"unknown signature algorithm {oid}")
    name = _SIGNATURE_HASHES[oid]
    if name is None:
        raise UnsupportedCertificate("certificate signature uses no separate hash function")
    return name


def _pss_hash(der: bytes, start: int, end: int) -> str:
    """RSASSA-PSS-params ::= SEQUENCE { hashAlgorithm [0] AlgorithmIdentifier
    DEFAULT sha1, ... }."""
    params_start, params_end = _expect(der, start, end, _SEQUENCE)
    if params_start == params_end or der[params_start] != _EXPLICIT_0:
        return "sha1"
    inner_start, inner_end = _expect(der, params_start, params_end, _EXPLICIT_0)
    hash_start, hash_end = _expect(der, inner_start, inner_end, _SEQUENCE)
    oid_start, oid_end = _expect(der, hash_start, hash_end, _OID)
    oid = _oid_text(der[oid_start:oid_end])
    name = _HASH_OIDS.get(oid)
    if name is None:
        raise UnsupportedCertificate(f"unknown RSASSA-PSS hash {oid}")
    return name


def _expect(der: bytes, pos: int, end: int, tag: int) -> tuple[int, int]:
    """The value span of the DER element at `pos` (within `end`), which
    must have `tag`."""
    if pos + 2 > end or der[pos] != tag:
        raise ValueError("not a DER certificate")
    length = der[pos + 1]
    pos += 2
    if length & 0x80:
        count = length & 0x7F
        if not 1 <= count <= 4 or pos + count > end:
            raise ValueError("not a DER certificate")
        length = int.from_bytes(der[pos:pos + count], "big")
        pos += count
    if pos + length > end:
        raise ValueError("not a DER certificate")
    return pos, pos + length


def _oid_text(value: bytes) -> str:
    if not value or value[-1] & 0x80:
        raise ValueError("bad object identifier")
    arcs: list[int] = []
    arc = 0
    for byte in value:
        arc = (arc << 7) | (byte & 0x7F)
        if not byte & 0x80:
            arcs.append(arc)
            arc = 0
    first = min(arcs[0] // 40, 2)
    return ".".join(str(a) for a in (first, arcs[0] - 40 * first, *arcs[1:]))


def channel_binding_element_types(cb_types: Iterable[str]) -> list[str]:
    """The types to list in XEP-0440's `<sasl-channel-binding/>`, strongest first.

    Unknown names are dropped: advertising a type the mechanisms would then
    reject makes clients fail instead of picking another type.
    """
    present = set(cb_types)
    return [name for name in CB_TYPES_BY_PREFERENCE if name in present]
