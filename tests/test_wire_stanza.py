"""A stanza kept as bytes (`WireStanza`, issue 14): what it writes is
exactly what a full serialisation of the parsed stanza writes, on a TCP
stream and with WebSocket framing, for namespaced children, prefixed
attributes, escaped text and attribute values."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import pytest

from mlink.xml.parser import Stanza, XMLStreamParser
from mlink.xml.serialize import CLIENT_NS, WireStanza, serialize

HEADER = (b"<stream:stream xmlns='jabber:client' "
          b"xmlns:stream='http://etherx.jabber.org/streams' to='example.com' version='1.0'>")

STANZAS = [
    b"<message to='bob@example.com/r' type='chat' id='a&amp;b'><body>1 &lt; 2 &amp; 3 &gt; 2"
    b" \"q\" 'a' &#x1F600; \xc3\xa9</body></message>",
    b"<message to='bob@example.com' from='alice@example.com/x'><x xmlns='urn:x' "
    b"xmlns:p='urn:p' p:attr='v&gt;&lt;&quot;&apos;'><p:y>t</p:y><z xmlns=''/>tail</x>"
    b"<thread>th</thread></message>",
    b"<presence to='bob@example.com'/>",
    b"<presence><show>away</show><c xmlns='http://jabber.org/protocol/caps' hash='sha-1' "
    b"node='n' ver='v='/></presence>",
    b"<iq type='get' id='x' to='bob@example.com/r'><query xmlns='jabber:iq:version'/></iq>",
    b"<message to='b@example.com' xml:lang='de'><body xml:lang='en'>hi</body></message>",
    b"<message to='b@example.com'><![CDATA[<not markup> & ]]><body>x</body></message>",
]


def parsed(raw: bytes) -> ET.Element:
    parser = XMLStreamParser()
    events = parser.feed(HEADER + raw)
    stanza = events[-1]
    assert isinstance(stanza, Stanza)
    return stanza.element


@pytest.mark.parametrize("raw", STANZAS)
@pytest.mark.parametrize("to", [None, "carol@example.com/res", "o'hara&co@example.com"])
def test_wire_bytes_equal_a_full_serialisation(raw: bytes, to: str | None) -> None:
    elem = parsed(raw)
    elem.attrib.pop("to", None)
    # What a shard sends: the stanza without its `to`.
    wire = WireStanza.from_bytes(serialize(elem), to)
    assert wire is not None
    if to is not None:
        elem.set("to", to)
    for stream_ns in (CLIENT_NS, ""):
        assert wire.serialize(stream_ns) == serialize(elem, stream_ns)
    # The tree, when one is needed, is the same stanza.
    assert serialize(wire.element()) == serialize(elem)
    assert wire.kind == elem.tag.rpartition("}")[2]


def test_addressed_copies_share_the_bytes() -> None:
    elem = parsed(STANZAS[3])
    wire = WireStanza.from_bytes(serialize(elem), None)
    assert wire is not None
    for to in ("a@example.com", "b@example.com/x"):
        elem.set("to", to)
        assert wire.addressed(to).serialize() == serialize(elem)


@pytest.mark.parametrize("data", [
    b"<message xmlns='urn:other'><body>x</body></message>",  # not jabber:client
    b"<foo/>",
    b"",
    b"message/>",
])
def test_bytes_it_would_not_splice_are_refused(data: bytes) -> None:
    assert WireStanza.from_bytes(data, "a@example.com") is None
