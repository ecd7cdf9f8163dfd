"""A raw-socket XEP-0114 component for tests: the handshake by hand, then
stanzas as text, so the tests see exactly what the server writes."""

from __future__ import annotations

import hashlib
import re
import socket

from tests.rawclient import RawClient

COMPONENT_NS = "jabber:component:accept"


def component_header(domain: str) -> str:
    return ("<?xml version='1.0'?><stream:stream xmlns='jabber:component:accept' "
            f"xmlns:stream='http://etherx.jabber.org/streams' to='{domain}'>")


class RawComponent(RawClient):
    """A component connection (no TLS: XEP-0114 has none)."""

    def __init__(self, port: int, receive_buffer: int | None = None) -> None:
        """`receive_buffer`: a small SO_RCVBUF set before connecting, for a
        component that stops reading to fill the server's buffers soon."""
        if receive_buffer is None:
            super().__init__(port)
        else:
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
            sock.settimeout(10)
            sock.connect(("127.0.0.1", port))
            self.sock = sock
            self.ca_file = None
            self.client_cert = None
            self.buffer = b""
            self.eof = False
        self.stream_id = ""

    def open_stream(self, domain: str) -> str:
        """Send the header; the server's answer (its header, or an error)."""
        self.send(component_header(domain))
        text = self.read_until(r"<stream:stream[^>]*>|</stream:stream>")
        m = re.search(r"<stream:stream[^>]*\bid=['\"]([^'\"]+)['\"]", text)
        self.stream_id = m.group(1) if m else ""
        return text

    def handshake(self, domain: str, secret: str) -> str:
        """Header and handshake; what the server answered (`<handshake/>` on success)."""
        self.open_stream(domain)
        digest = hashlib.sha1((self.stream_id + secret).encode()).hexdigest()
        self.send(f"<handshake>{digest}</handshake>")
        return self.read_until(r"<handshake\s*/>|<handshake>\s*</handshake>|</stream:stream>")
