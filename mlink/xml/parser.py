"""Incremental, restricted XML for XMPP streams (RFC 6120 §11).

`XMLStreamParser.feed(bytes)` turns a byte stream into `StreamOpen`,
`Stanza` and `StreamClose` events in one pass: the C pull parser builds each
stanza's tree once, and a stanza is dropped from the stream root as soon as
it is handed out, so memory stays bounded by the limits below.

Hardening, the way defusedxml hardens expat but at no cost per stanza:
every construct RFC 6120 §11.1 forbids begins with `<!` (DOCTYPE, entity
declarations, comments) or `<?` (processing instructions). In well-formed
XML a literal `<` never appears in text or attribute values, and in UTF-8
the byte 0x3C is never part of a multi-byte character, so a byte scan for
those two pairs finds every such construct before expat sees it. A DOCTYPE
is therefore refused at its first bytes: an entity bomb is never declared,
let alone expanded. CDATA sections (`<![CDATA[`) are allowed XML and pass.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from xml.parsers.expat import errors as expat_errors

from mlink.config_model import DEFAULT_MAX_DEPTH, DEFAULT_MAX_STANZA_BYTES

STREAM_NS = "http://etherx.jabber.org/streams"
STREAM_TAG = "{" + STREAM_NS + "}stream"

_CDATA_OPEN = b"<![CDATA["
# Bytes kept from the previous chunk so that a `<!`/`<?` split across two
# reads is still seen; long enough to hold a `<![CDATA[` opener.
_SCAN_TAIL = len(_CDATA_OPEN) - 1
_XML_DECL = re.compile(rb"<\?xml\s[^>]*?\?>")
_ENCODING = re.compile(rb"""encoding\s*=\s*["']([A-Za-z0-9._-]+)["']""")
_UNDEFINED_ENTITY = expat_errors.codes[expat_errors.XML_ERROR_UNDEFINED_ENTITY]
# XML whitespace (XML 1.0 §2.3 S) and `>`, as byte values.
_WHITESPACE = frozenset(b" \t\r\n")
_GT = ord(">")


class XMLStreamError(Exception):
    """Input that ends the stream; `condition` is the RFC 6120 §4.9.3 name."""

    def __init__(self, condition: str, text: str = "") -> None:
        super().__init__(f"{condition}: {text}" if text else condition)
        self.condition = condition
        self.text = text


@dataclass(slots=True)
class StreamOpen:
    """The stream header: its attributes and the namespaces it declared."""

    tag: str
    attrib: dict[str, str]
    namespaces: dict[str, str]


@dataclass(slots=True)
class Stanza:
    """A complete first-level child of the stream (stanza or nonza)."""

    element: ET.Element


@dataclass(slots=True)
class StreamClose:
    """`</stream:stream>` arrived."""


StreamEvent = StreamOpen | Stanza | StreamClose


class XMLStreamParser:
    """One parser per stream; make a new one on every stream restart."""

    __slots__ = (
        "_parser",
        "_depth",
        "_root",
        "_namespaces",
        "_fed",
        "_pending",
        "_tail",
        "_closed",
        "_decl_at",
        "_partial",
        "max_stanza_bytes",
        "max_depth",
    )

    def __init__(
        self,
        max_stanza_bytes: int = DEFAULT_MAX_STANZA_BYTES,
        max_depth: int = DEFAULT_MAX_DEPTH,
    ) -> None:
        # encoding="utf-8" makes expat ignore any declared encoding; a
        # declared non-UTF-8 encoding is refused before this is reached.
        self._parser = ET.XMLPullParser(
            events=("start", "end", "start-ns"),
            _parser=ET.XMLParser(target=ET.TreeBuilder(), encoding="utf-8"),
        )
        self._depth = 0
        self._root: ET.Element | None = None
        self._namespaces: dict[str, str] = {}
        self._fed = 0  # bytes fed in total
        self._pending = 0  # bytes since the last complete stanza
        self._tail = b""
        self._closed = False
        self._decl_at = 0  # where an XML declaration may stand (after a BOM)
        self._partial = False  # a stanza is started and not finished
        self.max_stanza_bytes = max_stanza_bytes
        self.max_depth = max_depth

    @property
    def between_stanzas(self) -> bool:
        """Inside the stream element, with no stanza open."""
        return self._depth == 1

    @property
    def stanza_in_progress(self) -> bool:
        """Whether the bytes fed so far end inside a stanza (one started and
        not finished, its start tag included): what a read timeout must
        catch, unlike a stream idle between stanzas. A start tag cut inside
        an attribute value that holds `>` right after a complete stanza is
        taken for complete until the next bytes arrive (expat reports no
        byte offsets; the next read settles it)."""
        return self._partial

    def feed(self, data: bytes | bytearray) -> list[StreamEvent]:
        """Parse `data`; raise XMLStreamError on anything that ends the stream."""
        if self._closed:
            # RFC 6120 §4.4: nothing may follow the closing tag.
            if data.strip():
                raise XMLStreamError("not-well-formed", "data after stream close")
            return []
        if self._fed == 0:
            self._check_prolog(data)
        self._scan_forbidden(data)
        self._fed += len(data)
        if self._depth > 1 or not data.isspace():
            # Whitespace keepalives between stanzas do not count towards
            # the stanza limit; everything else does until a stanza ends.
            self._pending += len(data)
        if self._pending > self.max_stanza_bytes:
            raise XMLStreamError("policy-violation", "stanza too large")
        try:
            self._parser.feed(data)
            events = self._collect()
        except ET.ParseError as exc:
            if exc.code == _UNDEFINED_ENTITY:
                raise XMLStreamError("restricted-xml", "entity reference") from None
            raise XMLStreamError("not-well-formed", str(exc)) from None
        if self._depth != 1:
            self._partial = self._depth > 1
        else:
            # The last byte that is not whitespace, found without copying
            # the chunk (a stanza's bytes rarely end in more than a newline).
            last = len(data) - 1
            while last >= 0 and data[last] in _WHITESPACE:
                last -= 1
            if last >= 0:
                # `_pending` is reset when a stanza ends in this chunk; bytes
                # after it that do not end on `>` are a stanza begun.
                self._partial = self._pending > 0 or data[last] != _GT
            # Whitespace alone (a keepalive) changes nothing.
        return events

    def _collect(self) -> list[StreamEvent]:
        out: list[StreamEvent] = []
        # The C parser's events: ("start", Element), ("end", Element),
        # ("start-ns", (prefix, uri)); typed loosely here, checked by kind.
        events: Iterator[tuple[str, Any]] = self._parser.read_events()  # type: ignore[assignment]
        for kind, item in events:
            if kind == "start":
                self._depth += 1
                if self._depth == 1:
                    self._root = item
                    # The header is not part of the first stanza.
                    self._pending = 0
                    out.append(StreamOpen(item.tag, dict(item.attrib), self._namespaces))
                elif self._depth > self.max_depth:
                    raise XMLStreamError("policy-violation", "nesting too deep")
            elif kind == "end":
                self._depth -= 1
                if self._depth == 1:
                    out.append(Stanza(item))
                    self._pending = 0
                    if self._root is not None:
                        self._root.remove(item)
                elif self._depth == 0:
                    self._closed = True
                    out.append(StreamClose())
            elif self._depth == 0:  # start-ns on the stream header
                prefix, uri = item
                self._namespaces[prefix] = uri
        return out

    def _check_prolog(self, data: bytes | bytearray) -> None:
        """RFC 6120 §11.6: UTF-8 only; refuse other BOMs and declarations."""
        if data[:2] in (b"\xff\xfe", b"\xfe\xff") or data[:4] == b"\x00\x00\xfe\xff":
            raise XMLStreamError("unsupported-encoding", "only UTF-8 is supported")
        if data[:1] == b"\x00" or data[1:2] == b"\x00":
            raise XMLStreamError("unsupported-encoding", "only UTF-8 is supported")
        if data.startswith(b"\xef\xbb\xbf"):
            data = data[3:]
            self._decl_at = 3
        decl = _XML_DECL.match(data)
        if decl:
            enc = _ENCODING.search(decl.group(0))
            if enc and enc.group(1).lower() not in (b"utf-8", b"utf8"):
                raise XMLStreamError("unsupported-encoding", "only UTF-8 is supported")

    def _scan_forbidden(self, data: bytes | bytearray) -> None:
        """Refuse `<!` (except CDATA) and `<?` (except the XML declaration)."""
        if b"<" not in data and not self._tail:
            return
        buf = self._tail + data
        base = self._fed - len(self._tail)  # stream offset of buf[0]
        start = 0
        while (i := buf.find(b"<!", start)) >= 0:
            ahead = buf[i : i + len(_CDATA_OPEN)]
            if not _CDATA_OPEN.startswith(ahead):
                kind = "comment" if ahead.startswith(b"<!--") else "DTD or declaration"
                raise XMLStreamError("restricted-xml", f"{kind} not allowed")
            start = i + 2
        start = 0
        while (i := buf.find(b"<?", start)) >= 0:
            at = base + i
            ahead = buf[i : i + 6]
            is_decl = (
                at == self._decl_at
                and b"<?xml".startswith(ahead[:5])
                and (len(ahead) < 6 or ahead[5:6].isspace())
            )
            if not is_decl:
                raise XMLStreamError("restricted-xml", "processing instruction not allowed")
            start = i + 2
        self._tail = buf[-_SCAN_TAIL:]
