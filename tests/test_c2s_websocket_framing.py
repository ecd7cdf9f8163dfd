"""RFC 7395 framing through the same c2s state machine, without sockets."""

from __future__ import annotations

import base64

from mlink.stream import c2s

FRAMING = "urn:ietf:params:xml:ns:xmpp-framing"
OPEN = f"<open xmlns='{FRAMING}' to='example.com' version='1.0'/>"


def make() -> c2s.C2SStream:
    return c2s.C2SStream(c2s.StreamSettings(
        domains=frozenset({"example.com"}), tls_available=True, tls_required=True,
        tls_active=True, websocket=True))


def send(stream: c2s.C2SStream, message: str) -> tuple[list, list[str]]:
    events = stream.receive_message(message.encode())
    return events, [m.decode() for m in stream.messages_to_send()]


def login(stream: c2s.C2SStream) -> None:
    _, out = send(stream, OPEN)
    assert out[0].startswith(f"<open xmlns='{FRAMING}' id='") and "from='example.com'" in out[0]
    assert out[1].startswith("<stream:features xmlns:stream='http://etherx.jabber.org/streams'>")
    assert "starttls" not in out[1] and "<mechanism>PLAIN</mechanism>" in out[1]
    token = base64.b64encode(b"\0alice\0pw").decode()
    events, _ = send(stream, f"<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='PLAIN'>{token}</auth>")
    assert [(e.jid, e.request.kind, e.request.detail["password"]) for e in events] == [("alice@example.com", "password", "pw")]
    stream.credential_provided(True)
    assert stream.messages_to_send()[0].startswith(b"<success")
    _, out = send(stream, OPEN)
    assert "<bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'/>" in out[1]
    events, _ = send(stream, "<iq xmlns='jabber:client' type='set' id='b'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'/></iq>")
    assert events == [c2s.BindRequested(None)]
    stream.bind_done("web")
    [reply] = stream.messages_to_send()
    assert reply.startswith(b"<iq xmlns='jabber:client' type='result' id='b'>")


def test_login_stanzas_and_close():
    stream = make()
    login(stream)
    events, _ = send(stream, "<message xmlns='jabber:client' to='bob@example.com'><body>hi</body></message>")
    [ev] = events
    assert ev.element.get("from") == "alice@example.com/web"
    events, out = send(stream, f"<close xmlns='{FRAMING}'/>")
    assert events == [c2s.StreamEnded(None, peer_closed=True)]
    assert out == [f"<close xmlns='{FRAMING}'/>"]


def test_two_elements_in_one_message_is_not_well_formed():
    stream = make()
    login(stream)
    events, out = send(stream, "<presence xmlns='jabber:client'/><presence xmlns='jabber:client'/>")
    assert events == [c2s.StreamEnded("not-well-formed", peer_closed=False)]
    assert out[0].startswith("<stream:error xmlns:stream='http://etherx.jabber.org/streams'><not-well-formed")
    assert out[1] == f"<close xmlns='{FRAMING}'/>"


def test_incomplete_element_is_not_well_formed():
    stream = make()
    login(stream)
    events, _ = send(stream, "<message xmlns='jabber:client'><body>")
    assert events == [c2s.StreamEnded("not-well-formed", peer_closed=False)]


def test_stream_header_instead_of_open_is_refused():
    stream = make()
    events, out = send(stream, "<stream:stream xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams' to='example.com' version='1.0'>")
    assert events and events[0].condition == "not-well-formed"
    assert out[-1] == f"<close xmlns='{FRAMING}'/>"


def test_open_for_unknown_host():
    stream = make()
    events, out = send(stream, OPEN.replace("example.com", "other.org"))
    assert events == [c2s.StreamEnded("host-unknown", peer_closed=False)]
    assert out[0].startswith("<open ") and "<host-unknown" in out[1] and out[2].startswith("<close")
