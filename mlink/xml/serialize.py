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
