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
    out: list[str] = []
    _write(elem, stream_ns, out)
    return "".join(out).encode("utf-8")


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
