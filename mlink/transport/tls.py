"""Server TLS: one context per server, channel-binding data per connection."""

from __future__ import annotations

import logging
import ssl
from collections.abc import Sequence
from pathlib import Path

from mlink.sasl.channel_binding import UnsupportedCertificate, tls_server_end_point
from mlink.transport.tls_exporter import tls_exporter

log = logging.getLogger(__name__)

# XEP-0368 §4: direct TLS c2s connections negotiate this ALPN protocol.
ALPN_C2S = "xmpp-client"
# OpenSSL's X509_V_FLAG_NO_CHECK_TIME (1.1.0+; the ssl module has no name
# for it): the chain is verified but not the validity dates, so an expired
# client certificate reaches SASL EXTERNAL and is refused there with a text
# the user can read, instead of as an opaque TLS alert.
VERIFY_NO_CHECK_TIME = 0x200000


class ServerTLS:
    """The certificate, the SSL context and what SCRAM-PLUS needs of them."""

    def __init__(self, certificate: Path, key: Path, client_cas: Sequence[Path] = ()) -> None:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        # TLS 1.0/1.1 are deprecated (RFC 8996); 1.2 is the floor.
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(str(certificate), str(key))
        ctx.set_alpn_protocols([ALPN_C2S])
        self.context = ctx
        for ca in client_cas:
            self._ask_for_client_certificates()
            ctx.load_verify_locations(cafile=str(ca))
        der = ssl.PEM_cert_to_DER_cert(_first_pem(certificate.read_text()))
        try:
            self._end_point: bytes | None = tls_server_end_point(der)
        except UnsupportedCertificate:
            self._end_point = None
            log.info("certificate signature has no hash: tls-server-end-point not offered")

    def _ask_for_client_certificates(self) -> None:
        """Client certificates (SASL EXTERNAL): asked for, never required,
        so a client without one still logs in with SCRAM or PLAIN. A
        certificate sent is verified against the client CAs only (not the
        system store); its dates and revocation are judged at SASL time,
        where the refusal can say why."""
        self.context.verify_mode = ssl.CERT_OPTIONAL
        self.context.verify_flags |= VERIFY_NO_CHECK_TIME

    def trust_client_cas(self, certificates: Sequence[bytes]) -> None:
        """Also accept client certificates issued by these CAs (DER), from
        now on (CA certificates held in the directory). OpenSSL's store
        only grows: a CA removed is still accepted by the handshake until
        the next reload, so whoever supplies CAs must also refuse at SASL
        time what no current CA issued."""
        if not certificates:
            return
        self._ask_for_client_certificates()
        for der in certificates:
            self.context.load_verify_locations(cadata=der)

    def channel_binding(self, ssl_object: ssl.SSLObject) -> dict[str, bytes]:
        """Binding data for one established connection, by type name."""
        types: dict[str, bytes] = {}
        if ssl_object.version() == "TLSv1.3":
            exported = tls_exporter(ssl_object)
            if exported is not None:
                types["tls-exporter"] = exported
        else:
            # RFC 9266 forbids tls-unique on TLS 1.3; below it, clients that
            # cannot export keying material (slixmpp on Python 3.11) use it.
            unique = ssl_object.get_channel_binding("tls-unique")
            if unique:
                types["tls-unique"] = unique
        if self._end_point is not None:
            types["tls-server-end-point"] = self._end_point
        return types


def _first_pem(text: str) -> str:
    """The first certificate of a chain file (the server's own)."""
    end = "-----END CERTIFICATE-----"
    start = text.index("-----BEGIN CERTIFICATE-----")
    return text[start : text.index(end, start) + len(end)] + "\n"
