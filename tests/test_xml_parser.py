"""The restricted XML layer: events, limits and what RFC 6120 §11 forbids."""

from __future__ import annotations

import time

import pytest

from mlink.xml.parser import Stanza, StreamClose, StreamOpen, XMLStreamError, XMLStreamParser
from mlink.xml.serialize import element, serialize

HEADER = (
    b"<?xml version='1.0'?><stream:stream xmlns='jabber:client' "
    b"xmlns:stream='http://etherx.jabber.org/streams' to='example.com' version='1.0'>"
)


def feed_all(parser: XMLStreamParser, data: bytes, chunk: int | None = None) -> list:
    if chunk is None:
        return parser.feed(data)
    out = []
    for i in range(0, len(data), chunk):
        out.extend(parser.feed(data[i : i + chunk]))
    return out


def error_of(data: bytes, **kwargs) -> str:
    parser = XMLStreamParser(**kwargs)
    with pytest.raises(XMLStreamError) as info:
        parser.feed(data)
    return info.value.condition


@pytest.mark.parametrize("chunk", [None, 1, 7, 64])
def test_events_in_order_whatever_the_chunking(chunk):
    data = HEADER + b"<message to='a@b'><body>hi &amp; &#233;</body></message> </stream:stream>"
    events = feed_all(XMLStreamParser(), data, chunk)
    assert isinstance(events[0], StreamOpen)
    assert events[0].attrib["to"] == "example.com"
    assert events[0].namespaces == {"": "jabber:client", "stream": "http://etherx.jabber.org/streams"}
    assert isinstance(events[1], Stanza)
    assert events[1].element.tag == "{jabber:client}message"
    assert events[1].element.findtext("{jabber:client}body") == "hi & \u00e9"
    assert isinstance(events[2], StreamClose)
    assert len(events) == 3


def test_stanzas_are_dropped_from_the_root():
    parser = XMLStreamParser()
    parser.feed(HEADER)
    for _ in range(100):
        [ev] = parser.feed(b"<presence/>")
        assert isinstance(ev, Stanza)
    assert len(parser._root) == 0


def test_billion_laughs_is_refused_before_any_expansion():
    lol = b'<!DOCTYPE lolz [<!ENTITY lol "lol">' + b"".join(
        b'<!ENTITY lol%d "%s">' % (i, (b"&lol%d;" % (i - 1) if i > 1 else b"&lol;") * 10)
        for i in range(1, 10)
    ) + b"]>"
    data = b"<?xml version='1.0'?>" + lol + b"<stream:stream>&lol9;</stream:stream>"
    started = time.process_time()
    assert error_of(data) == "restricted-xml"
    # Refused at the DOCTYPE's first bytes: not even a millisecond of work.
    assert time.process_time() - started < 0.05


def test_external_entity_is_refused():
    data = (b"<?xml version='1.0'?><!DOCTYPE s [<!ENTITY xxe SYSTEM 'file:///etc/passwd'>]>"
            b"<stream:stream>&xxe;</stream:stream>")
    assert error_of(data) == "restricted-xml"


def test_doctype_split_across_reads_is_refused():
    parser = XMLStreamParser()
    parser.feed(b"<")
    with pytest.raises(XMLStreamError) as info:
        parser.feed(b"!DOCTYPE x>")
    assert info.value.condition == "restricted-xml"


@pytest.mark.parametrize(
    "payload, condition",
    [
        (b"<message><!-- hi --></message>", "restricted-xml"),
        (b"<message><?php echo 1 ?></message>", "restricted-xml"),
        (b"<message>&custom;</message>", "restricted-xml"),
        (b"<message><body>x</message>", "not-well-formed"),
        (b"<message a='1' a='2'/>", "not-well-formed"),
        (b"<message>\xff\xfe</message>", "not-well-formed"),
    ],
)
def test_forbidden_and_broken_xml(payload, condition):
    parser = XMLStreamParser()
    parser.feed(HEADER)
    with pytest.raises(XMLStreamError) as info:
        parser.feed(payload)
    assert info.value.condition == condition


def test_cdata_is_allowed():
    parser = XMLStreamParser()
    parser.feed(HEADER)
    [ev] = parser.feed(b"<message><body><![CDATA[<b>&]]></body></message>")
    assert ev.element.findtext("{jabber:client}body") == "<b>&"


@pytest.mark.parametrize(
    "prolog",
    [
        b"<?xml version='1.0' encoding='ISO-8859-1'?>",
        b"\xff\xfe<\x00",
        b"\xfe\xff\x00<",
    ],
)
def test_other_encodings_are_unsupported(prolog):
    assert error_of(prolog + HEADER[21:]) == "unsupported-encoding"


def test_stanza_size_limit():
    parser = XMLStreamParser(max_stanza_bytes=10_000)
    parser.feed(HEADER)
    parser.feed(b"<message><body>" + b"x" * 5000 + b"</body></message>")
    with pytest.raises(XMLStreamError) as info:
        feed_all(parser, b"<message><body>" + b"x" * 20_000, 4096)
    assert info.value.condition == "policy-violation"


def test_whitespace_keepalives_do_not_count_towards_the_limit():
    parser = XMLStreamParser(max_stanza_bytes=10_000)
    parser.feed(HEADER)
    for _ in range(20_000):
        assert parser.feed(b" ") == []
    assert isinstance(parser.feed(b"<presence/>")[0], Stanza)


def test_nesting_limit():
    parser = XMLStreamParser(max_depth=10)
    parser.feed(HEADER)
    with pytest.raises(XMLStreamError) as info:
        parser.feed(b"<message>" + b"<a>" * 20)
    assert info.value.condition == "policy-violation"


def test_data_after_close_is_not_well_formed():
    parser = XMLStreamParser()
    parser.feed(HEADER + b"</stream:stream>")
    with pytest.raises(XMLStreamError):
        parser.feed(b"<message/>")


def test_serialize_uses_default_namespaces_not_prefixes():
    iq = element("{jabber:client}iq", {"type": "result", "id": "a'1"}, children=[
        element("{urn:xmpp:ping}ping"),
        element("{jabber:client}x", {"{http://www.w3.org/XML/1998/namespace}lang": "en"},
                text="<&>"),
    ])
    assert serialize(iq) == (
        b"<iq type='result' id='a&apos;1'><ping xmlns='urn:xmpp:ping'/>"
        b"<x xml:lang='en'>&lt;&amp;&gt;</x></iq>"
    )


def test_serialize_round_trips_through_the_parser():
    parser = XMLStreamParser()
    parser.feed(HEADER)
    src = b"<message to='a@b' type='chat'><body>a &lt; b</body><x xmlns='jabber:x:oob'><url>u</url></x></message>"
    [ev] = parser.feed(src)
    assert serialize(ev.element) == src
