"""A deliberately simple blocking XMPP client for wire-level assertions.

Tests that check exact bytes (stream errors, SASL failures) use this; tests
of whole logins use slixmpp, a real client library.
"""

from __future__ import annotations

import base64
import re
import socket
import ssl
import time
from pathlib import Path

# No test reply takes this long on loopback; it bounds a hung test.
READ_TIMEOUT = 10.0


def header(domain: str) -> bytes:
    return (
        "<?xml version='1.0'?><stream:stream xmlns='jabber:client' "
        f"xmlns:stream='http://etherx.jabber.org/streams' to='{domain}' version='1.0'>"
    ).encode()


class RawClient:
    def __init__(self, port: int, ca_file: Path | None = None, direct_tls: bool = False,
                 host: str = "127.0.0.1") -> None:
        self.sock: socket.socket = socket.create_connection((host, port), timeout=READ_TIMEOUT)
        self.ca_file = ca_file
        self.buffer = b""
        self.eof = False
        if direct_tls:
            self._wrap()

    def _wrap(self, max_version: ssl.TLSVersion | None = None) -> None:
        ctx = ssl.create_default_context(cafile=str(self.ca_file) if self.ca_file else None)
        if max_version is not None:
            ctx.maximum_version = max_version
        self.sock = ctx.wrap_socket(self.sock, server_hostname="localhost")

    def send(self, data: bytes | str) -> None:
        self.sock.sendall(data.encode() if isinstance(data, str) else data)

    def read_until(self, pattern: str, timeout: float = READ_TIMEOUT) -> str:
        """Read until `pattern` (a regex) matches the text received so far,
        or the server closes; returns everything received, and clears it."""
        regex = re.compile(pattern, re.S)
        deadline = time.monotonic() + timeout
        while not regex.search(self.buffer.decode("utf-8", "replace")) and not self.eof:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"timed out waiting for {pattern!r}; got {self.buffer!r}")
            self.sock.settimeout(remaining)
            try:
                chunk = self.sock.recv(65536)
            except (ConnectionResetError, ssl.SSLError):
                chunk = b""
            if not chunk:
                self.eof = True
            self.buffer += chunk
        text, self.buffer = self.buffer.decode("utf-8", "replace"), b""
        return text

    def wait_closed(self, timeout: float = READ_TIMEOUT) -> str:
        """Everything until the server closes the connection."""
        return self.read_until(r"(?!x)x", timeout) if not self.eof else ""

    def open(self, domain: str) -> str:
        self.send(header(domain))
        return self.read_until(r"</stream:features>|</stream:stream>")

    def starttls(self, domain: str, max_version: ssl.TLSVersion | None = None) -> str:
        self.open(domain)
        self.send("<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>")
        assert "<proceed" in self.read_until("<proceed[^>]*/>")
        self._wrap(max_version)
        return self.open(domain)

    def auth_plain(self, user: str, password: str) -> str:
        token = base64.b64encode(f"\0{user}\0{password}".encode()).decode()
        self.send(f"<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='PLAIN'>{token}</auth>")
        return self.read_until(r"</failure>|<success[^>]*(/>|</success>)|</stream:stream>")

    def login(self, domain: str, user: str, password: str, resource: str = "test") -> str:
        """STARTTLS, PLAIN, bind; returns the bound full JID."""
        self.starttls(domain)
        assert "<success" in self.auth_plain(user, password)
        self.open(domain)
        self.send("<iq type='set' id='bind1'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'>"
                  f"<resource>{resource}</resource></bind></iq>")
        reply = self.read_until(r"</iq>|<iq[^>]*/>")
        match = re.search(r"<jid>([^<]+)</jid>", reply)
        assert match, reply
        return match.group(1)

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


def stream_error(text: str) -> str | None:
    m = re.search(r"<stream:error><([a-z-]+) xmlns='urn:ietf:params:xml:ns:xmpp-streams'", text)
    return m.group(1) if m else None


def sasl_failure(text: str) -> str | None:
    m = re.search(r"<failure xmlns='urn:ietf:params:xml:ns:xmpp-sasl'><([a-z-]+)/>", text)
    return m.group(1) if m else None
