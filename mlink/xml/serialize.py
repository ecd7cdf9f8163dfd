"""Serialise stanzas the way XMPP peers expect them.

ElementTree's own writer invents `ns0:` prefixes for every namespace; XMPP
clients expect default-namespace declarations (`<query xmlns='...'>`), and
stanzas on a c2s stream carry no namespace declaration at all because they
inherit `jabber:client` from the stream header. This writer does both.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET

XML_NS = "http://www.w3.org/XML/1998/namespace"
CLIENT_NS = "jabber:client"

_TEXT_ESCAPES = str.maketrans({"&": "&amp;", "<": "&lt;", ">": "&gt;"})
_ATTR_ESCAPES = str.maketrans(
    {"&": "&amp;", "<": "&lt;", ">": "&gt;", "'": "&apos;", '"': "&quot;"}
)


def escape_text(text: str) -> str:
    return text.translate(_TEXT_ESCAPES)


def escape_attr(value: str) -> str:
    return value.translate(_ATTR_ESCAPES)


def _split(tag: str) -> tuple[str, str]:
    if tag[:1] == "{":
        ns, _, local = tag[1:].partition("}")
        return ns, local
    return "", tag


def _write(elem: ET.Element, parent_ns: str, out: list[str]) -> None:
    ns, local = _split(elem.tag)
    out.append("<" + local)
    if ns != parent_ns:
        out.append(f" xmlns='{escape_attr(ns)}'")
    prefixes: dict[str, str] = {}
    for name, value in elem.attrib.items():
        if name[:1] == "{":
            attr_ns, attr_local = _split(name)
            if attr_ns == XML_NS:
                name = "xml:" + attr_local
            else:
                prefix = prefixes.get(attr_ns)
                if prefix is None:
                    prefix = prefixes[attr_ns] = f"ns{len(prefixes) + 1}"
                    out.append(f" xmlns:{prefix}='{escape_attr(attr_ns)}'")
                name = f"{prefix}:{attr_local}"
        out.append(f" {name}='{escape_attr(value)}'")
    text = elem.text
    if not text and not len(elem):
        out.append("/>")
    else:
        out.append(">")
        if text:
            out.append(escape_text(text))
        for child in elem:
            _write(child, ns, out)
            if child.tail:
                out.append(escape_text(child.tail))
        out.append(f"</{local}>")


def serialize(elem: ET.Element, stream_ns: str = CLIENT_NS) -> bytes:
    """Bytes of `elem` as a child of a stream whose default namespace is
    `stream_ns` (its tail, which belongs to the parent, is not written)."""
    if type(elem) is Addressed:
        data = elem.shared.serialize(elem, stream_ns)
        if data is not None:
            return data
    out: list[str] = []
    _write(elem, stream_ns, out)
    return "".join(out).encode("utf-8")


class Addressed(ET.Element):
    """One recipient's copy of a `Shared` stanza (see there)."""

    shared: Shared


class Shared:
    """A stanza sent to many recipients, the copies differing only in `to`
    (a presence broadcast): each copy is an `Addressed` element, a real
    element that routing, hooks and filters see as usual, but `serialize`
    writes it from bytes made once per stream namespace, with the copy's
    `to` spliced in. The bytes are the same as a full serialisation's; a
    copy whose attributes, text or children were changed after it was made
    is serialised in full."""

    def __init__(self, stanza: ET.Element) -> None:
        self.tag = stanza.tag
        self.attrib = {k: v for k, v in stanza.attrib.items() if k != "to"}
        self.text = stanza.text
        self.children = tuple(stanza)
        self._parts: dict[str, tuple[bytes, bytes]] = {}

    def addressed(self, to: str | None) -> Addressed:
        """A copy with `to` as its last attribute (none when None)."""
        attrib = dict(self.attrib)
        if to is not None:
            attrib["to"] = to
        copy = Addressed(self.tag, attrib)
        copy.text = self.text
        copy.extend(self.children)
        copy.shared = self
        return copy

    def serialize(self, copy: Addressed, stream_ns: str) -> bytes | None:
        """`copy`'s bytes, or None when it no longer matches this stanza."""
        attrib = copy.attrib
        to = attrib.get("to")
        if (len(attrib) != len(self.attrib) + (to is not None) or copy.text != self.text
                or copy.tag != self.tag or len(copy) != len(self.children)):
            return None
        for name, value in self.attrib.items():
            if attrib.get(name) != value:
                return None
        if to is not None and next(reversed(attrib)) != "to":
            return None  # `to` not last: the spliced bytes would differ
        for child, mine in zip(copy, self.children, strict=True):
            if child is not mine:
                return None
        parts = self._parts.get(stream_ns)
        if parts is None:
            template = ET.Element(self.tag, self.attrib)
            template.text = self.text
            template.extend(self.children)
            out: list[str] = []
            _write(template, stream_ns, out)
            data = "".join(out).encode("utf-8")
            # The start tag ends at the first '>' (attribute values escape it).
            end = data.index(b">")
            if data[end - 1:end] == b"/":
                end -= 1
            parts = self._parts[stream_ns] = (data[:end], data[end:])
        head, tail = parts
        if to is None:
            return head + tail
        return b"".join((head, b" to='", escape_attr(to).encode("utf-8"), b"'", tail))


def element(
    tag: str,
    attrib: dict[str, str] | None = None,
    text: str | None = None,
    children: list[ET.Element] | tuple[ET.Element, ...] = (),
) -> ET.Element:
    """Build an element in one expression; `attrib` values of None are left out."""
    elem = ET.Element(tag, {k: v for k, v in (attrib or {}).items() if v is not None})
    if text is not None:
        elem.text = text
    elem.extend(children)
    return elem


_CLIENT_XMLNS = b" xmlns='" + CLIENT_NS.encode() + b"'"
# Top-level stanza kinds whose bytes may be written without a tree.
_WIRE_KINDS = {b"message": "message", b"presence": "presence", b"iq": "iq"}


class WireStanza:
    """A `jabber:client` stanza kept as bytes: what `serialize(elem)` wrote
    for it without its `to` (no namespace declaration on the top element,
    children declaring their own), with a recipient's `to` spliced in when
    it is written. Written to a connection it costs no parse and no
    serialisation; `element()` builds the tree only where one is needed (a
    session that ended before the bytes were written).

    The bytes are trusted: another shard serialised them with `serialize`
    from a tree its parser had validated. `from_bytes` returns None for
    anything it would not splice exactly like a full serialisation (another
    namespace on the top element, or no start tag it recognises)."""

    __slots__ = ("_head", "_tail", "_name_end", "kind", "to")

    def __init__(self, head: bytes, tail: bytes, name_end: int, kind: str,
                 to: str | None) -> None:
        self._head = head
        self._tail = tail
        self._name_end = name_end
        self.kind = kind  # "message", "presence" or "iq"
        self.to = to

    @classmethod
    def from_bytes(cls, data: bytes, to: str | None) -> WireStanza | None:
        """`data` as `serialize(elem)` wrote a `jabber:client` stanza with
        no `to`; `to` is the recipient to splice in (None: none)."""
        end = data.find(b">")
        if end <= 1 or data[:1] != b"<":
            return None
        if data[end - 1:end] == b"/":
            end -= 1
        name_end = 1
        while name_end < end and data[name_end] not in b" />":
            name_end += 1
        kind = _WIRE_KINDS.get(data[1:name_end])
        if kind is None or data.startswith(b" xmlns=", name_end):
            return None  # not a jabber:client stanza as our serialiser writes one
        return cls(data[:end], data[end:], name_end, kind, to)

    def addressed(self, to: str | None) -> WireStanza:
        """The same stanza for another recipient (a fan-out)."""
        return WireStanza(self._head, self._tail, self._name_end, self.kind, to)

    def serialize(self, stream_ns: str = CLIENT_NS) -> bytes:
        """What `serialize(element(), stream_ns)` would write."""
        head = self._head
        if stream_ns != CLIENT_NS:
            # Not inside a jabber:client stream (WebSocket framing): the
            # top element declares its namespace, right after its name.
            name_end = self._name_end
            head = head[:name_end] + _CLIENT_XMLNS + head[name_end:]
        to = self.to
        if to is None:
            return head + self._tail
        return b"".join((head, b" to='", escape_attr(to).encode("utf-8"), b"'", self._tail))

    def element(self) -> ET.Element:
        """The stanza as a tree (parsed from its bytes)."""
        wrapped = b"<s xmlns='" + CLIENT_NS.encode() + b"'>" + self._head + self._tail + b"</s>"
        elem = ET.fromstring(wrapped)[0]
        if self.to is not None:
            elem.set("to", self.to)
        return elem
