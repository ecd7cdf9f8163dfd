"""The XEP-0114 stream machine without sockets: the handshake in every
state, the `from` checks, and the namespace stanzas are handed on in."""

from __future__ import annotations

import pytest

from mlink.stream import component as xep0114
from tests.componentclient import component_header

SECRETS = {"push.example": "s3cret-s3cret-s3cret"}


def opened() -> tuple[xep0114.ComponentStream, str]:
    stream = xep0114.ComponentStream(SECRETS)
    assert stream.receive_data(component_header("push.example").encode()) == []
    header = stream.data_to_send().decode()
    assert "id='" in header and "from='push.example'" in header
    return stream, xep0114.handshake_digest(stream.stream_id, SECRETS["push.example"])


def established() -> xep0114.ComponentStream:
    stream, digest = opened()
    (verified,) = stream.receive_data(f"<handshake>{digest.upper()}</handshake>".encode())
    assert verified == xep0114.HandshakeVerified("push.example")
    stream.accept()
    assert stream.data_to_send() == b"<handshake/>"
    return stream


def test_stream_ids_differ_so_a_handshake_cannot_be_replayed():
    first, digest = opened()
    second, _ = opened()
    assert first.stream_id != second.stream_id
    (ended,) = second.receive_data(f"<handshake>{digest}</handshake>".encode())
    assert ended == xep0114.ComponentEnded("not-authorized", peer_closed=False)


def test_stanza_pipelined_before_the_handshake_answer_ends_the_stream():
    stream, digest = opened()
    events = stream.receive_data(f"<handshake>{digest}</handshake><message from='push.example' "
                                 "to='a@b'/>".encode())
    assert events[0] == xep0114.HandshakeVerified("push.example")
    assert events[1] == xep0114.ComponentEnded("not-authorized", peer_closed=False)
    stream.accept()  # a late answer after the end changes nothing
    assert b"<handshake/>" not in stream.data_to_send()


def test_conflict_refusal_is_a_stream_error():
    stream, digest = opened()
    stream.receive_data(f"<handshake>{digest}</handshake>".encode())
    assert stream.refuse("conflict").condition == "conflict"
    assert b"<conflict xmlns='urn:ietf:params:xml:ns:xmpp-streams'/>" in stream.data_to_send()


def test_stanzas_come_out_in_jabber_client_with_from_checked():
    stream = established()
    (ev,) = stream.receive_data(b"<message from='bot@PUSH.example/r' to='A@localhost'>"
                                b"<error type='cancel'/></message>")
    assert isinstance(ev, xep0114.ComponentStanza)
    assert ev.element.tag == "{jabber:client}message"
    assert ev.element[0].tag == "{jabber:client}error"
    assert ev.element.get("from") == "bot@push.example/r"
    assert ev.element.get("to") == "a@localhost"
    (ev,) = stream.receive_data(b"<presence to='a@localhost'/>")
    assert isinstance(ev, xep0114.ComponentStanza) and ev.element.get("from") == "push.example"


@pytest.mark.parametrize("stanza, condition", [
    ("<message from='x@other.example' to='a@b'/>", "invalid-from"),
    ("<foo from='push.example' to='a@b'/>", "unsupported-stanza-type"),
    ("<handshake>abc</handshake>", "unsupported-stanza-type"),
])
def test_bad_stanzas_end_the_stream(stanza, condition):
    stream = established()
    (ev,) = stream.receive_data(stanza.encode())
    assert ev == xep0114.ComponentEnded(condition, peer_closed=False)


@pytest.mark.parametrize("stanza, condition", [
    ("<iq type='get' from='push.example' to='a@b'><x xmlns='y'/></iq>", "bad-request"),
    ("<message from='push.example' to='@@'/>", "jid-malformed"),
    ("<message from='push.example'/>", "bad-request"),
])
def test_bad_addresses_get_stanza_errors(stanza, condition):
    stream = established()
    (ev,) = stream.receive_data(stanza.encode())
    assert ev == xep0114.StanzaRefused(condition)
    assert f"<{condition} ".encode() in stream.data_to_send()
    assert stream.state is xep0114.State.ESTABLISHED
