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
import uuid
import xml.etree.ElementTree as ET
from pathlib import Path

# No test reply takes this long on loopback; it bounds a hung test.
READ_TIMEOUT = 10.0
# A closed connection is noticed within this long (no reply takes longer).
QUICK = 5.0
CLIENT_NS = "jabber:client"
STANZAS_NS = "urn:ietf:params:xml:ns:xmpp-stanzas"
BIND_NS = "urn:ietf:params:xml:ns:xmpp-bind"


def header(domain: str) -> bytes:
    return (
        "<?xml version='1.0'?><stream:stream xmlns='jabber:client' "
        f"xmlns:stream='http://etherx.jabber.org/streams' to='{domain}' version='1.0'>"
    ).encode()


class RawClient:
    def __init__(self, port: int, ca_file: Path | None = None, direct_tls: bool = False,
                 host: str = "127.0.0.1",
                 client_cert: tuple[Path, Path] | None = None,
                 source: str | None = None) -> None:
        """`client_cert` (certificate, key): presented when the server asks
        for one (SASL EXTERNAL). `source`: the local address to connect from
        (another loopback address, for per-address limits)."""
        self.sock: socket.socket = socket.create_connection(
            (host, port), timeout=READ_TIMEOUT,
            source_address=(source, 0) if source is not None else None)
        self.ca_file = ca_file
        self.client_cert = client_cert
        self.buffer = b""
        self.eof = False
        if direct_tls:
            self._wrap()

    def _wrap(self, max_version: ssl.TLSVersion | None = None) -> None:
        ctx = ssl.create_default_context(cafile=str(self.ca_file) if self.ca_file else None)
        if max_version is not None:
            ctx.maximum_version = max_version
        if self.client_cert is not None:
            ctx.load_cert_chain(str(self.client_cert[0]), str(self.client_cert[1]))
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
            except TimeoutError:
                raise AssertionError(
                    f"timed out waiting for {pattern!r}; got {self.buffer!r}") from None
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

    def authenticate(self, domain: str, user: str, password: str) -> str:
        """STARTTLS, PLAIN (which must succeed), the stream restart; returns
        the features offered then."""
        self.starttls(domain)
        assert "<success" in self.auth_plain(user, password)
        return self.open(domain)

    def login(self, domain: str, user: str, password: str, resource: str = "test") -> str:
        """STARTTLS, PLAIN, bind; returns the bound full JID."""
        self.authenticate(domain, user, password)
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


def expect_stream_error(client: RawClient, condition: str, timeout: float = QUICK) -> str:
    """The server sends `condition` as a stream error, then its closing tag,
    then closes the connection."""
    text = client.wait_closed(timeout)
    assert stream_error(text) == condition, text
    assert text.rstrip().endswith("</stream:stream>"), text
    assert client.eof
    return text


# -- stanzas -----------------------------------------------------------------------


def resource() -> str:
    """A fresh resource name."""
    return "r-" + uuid.uuid4().hex[:12]


def parse_stanzas(text: str) -> list[ET.Element]:
    """The top-level stanzas in `text` (received after the stream header)."""
    return list(ET.fromstring(f"<root xmlns='{CLIENT_NS}'>{text}</root>"))


def read_stanza_text(client: RawClient, tag: str, stanza_id: str) -> tuple[ET.Element, str]:
    """Read until the stanza `tag` with id `stanza_id` arrives; return it and
    everything read with it."""
    pattern = rf"<{tag}\b[^>]*\bid='{re.escape(stanza_id)}'[^>]*(/>|>.*?</{tag}>)"
    text = client.read_until(pattern)
    match = re.search(pattern, text, re.S)
    assert match, f"no <{tag} id={stanza_id!r}> before the stream ended: {text!r}"
    (stanza,) = parse_stanzas(match.group(0))
    return stanza, text


def read_stanza(client: RawClient, tag: str, stanza_id: str) -> ET.Element:
    return read_stanza_text(client, tag, stanza_id)[0]


def stanza_error_of(stanza: ET.Element) -> tuple[str, str]:
    """(error type, condition) of an error stanza."""
    assert stanza.get("type") == "error", ET.tostring(stanza)
    error = stanza.find(f"{{{CLIENT_NS}}}error")
    assert error is not None, ET.tostring(stanza)
    conditions = [c.tag for c in error if c.tag.startswith(f"{{{STANZAS_NS}}}")
                  and not c.tag.endswith("}text")]
    assert len(conditions) == 1, ET.tostring(stanza)
    return error.get("type", ""), conditions[0].rpartition("}")[2]


def ping(client: RawClient, to: str) -> ET.Element:
    """Ping `to` (XEP-0199); the reply, which must be a result."""
    stanza_id = "ping-" + uuid.uuid4().hex[:8]
    client.send(f"<iq type='get' id='{stanza_id}' to='{to}'><ping xmlns='urn:xmpp:ping'/></iq>")
    reply = read_stanza(client, "iq", stanza_id)
    assert reply.get("type") == "result", ET.tostring(reply)
    return reply
