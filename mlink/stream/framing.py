"""How a c2s stream is framed on the wire: one XML document over TCP
(RFC 6120), or one complete element per WebSocket message (RFC 7395).

The negotiation is the same state machine either way; only the envelope
differs, and it lives here.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET

from mlink.stream.errors import STREAMS_NS
from mlink.xml.parser import STREAM_NS
from mlink.xml.serialize import CLIENT_NS, WireStanza, escape_attr, escape_text, serialize

FRAMING_NS = "urn:ietf:params:xml:ns:xmpp-framing"


def _error_body(condition: str, text: str) -> str:
    body = f"<{condition} xmlns='{STREAMS_NS}'/>"
    if text:
        body += f"<text xmlns='{STREAMS_NS}' xml:lang='en'>{escape_text(text)}</text>"
    return body


class TCPFraming:
    """RFC 6120: a stream header, children, and the closing tag."""

    websocket = False
    # The default namespace stanzas inherit on this framing.
    stream_ns = CLIENT_NS

    def header(self, stream_id: str, domain: str, to: str | None) -> bytes:
        peer = f" to='{escape_attr(to)}'" if to else ""
        return (
            "<?xml version='1.0'?><stream:stream xmlns='jabber:client' "
            f"xmlns:stream='{STREAM_NS}' id='{stream_id}' from='{escape_attr(domain)}'{peer} "
            "version='1.0' xml:lang='en'>"
        ).encode()

    def features(self, inner: bytes) -> bytes:
        return b"<stream:features>" + inner + b"</stream:features>"

    def close(self) -> list[bytes]:
        return [b"</stream:stream>"]

    def error(self, condition: str, text: str) -> list[bytes]:
        return [f"<stream:error>{_error_body(condition, text)}</stream:error>"
                "</stream:stream>".encode()]

    def stanza(self, elem: ET.Element) -> bytes:
        return serialize(elem, CLIENT_NS)

    def wire(self, stanza: WireStanza) -> bytes:
        return stanza.serialize(CLIENT_NS)


class WebSocketFraming:
    """RFC 7395: <open/> and <close/> instead of the stream tags, and every
    message a complete element carrying its own namespace declarations."""

    websocket = True
    stream_ns = ""

    def header(self, stream_id: str, domain: str, to: str | None) -> bytes:
        peer = f" to='{escape_attr(to)}'" if to else ""
        return (
            f"<open xmlns='{FRAMING_NS}' id='{stream_id}' from='{escape_attr(domain)}'{peer} "
            "version='1.0' xml:lang='en'/>"
        ).encode()

    def features(self, inner: bytes) -> bytes:
        return f"<stream:features xmlns:stream='{STREAM_NS}'>".encode() + inner + \
            b"</stream:features>"

    def close(self) -> list[bytes]:
        return [f"<close xmlns='{FRAMING_NS}'/>".encode()]

    def error(self, condition: str, text: str) -> list[bytes]:
        # RFC 7395 §3.6.1: the error element, then <close/>.
        return [f"<stream:error xmlns:stream='{STREAM_NS}'>{_error_body(condition, text)}"
                "</stream:error>".encode(), *self.close()]

    def stanza(self, elem: ET.Element) -> bytes:
        return serialize(elem, "")

    def wire(self, stanza: WireStanza) -> bytes:
        return stanza.serialize("")


Framing = TCPFraming | WebSocketFraming
