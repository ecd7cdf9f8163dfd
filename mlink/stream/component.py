"""The Jabber Component Protocol (XEP-0114) as a sans-IO state machine.

An external component (a push gateway, a bridge) connects to the server,
opens a stream in `jabber:component:accept` with `to` naming its domain,
and proves it knows the shared secret with `<handshake>`: the lower-case
hex SHA-1 of the stream id we sent followed by the secret (XEP-0114 §3).
From then on it sends and receives stanzas for that domain.

As with `C2SStream`, bytes go in through `receive_data`, events come out,
bytes to write are taken with `data_to_send`; the machine never waits.
Whether the domain is free (no other connection of it, on any shard) is
the driver's question: it gets `HandshakeVerified` and answers `accept()`
or `refuse("conflict")`. Stanzas in the component namespace are handed on
in `jabber:client`, the namespace routing works in, and written back
inheriting the stream's default namespace, so the component sees
`jabber:component:accept` both ways.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import secrets
import xml.etree.ElementTree as ET
from collections.abc import Mapping
from dataclasses import dataclass

from mlink.config_model import DEFAULT_MAX_DEPTH, DEFAULT_MAX_STANZA_BYTES
from mlink.jid import InvalidJID, parse_jid
from mlink.stream.errors import stanza_error
from mlink.stream.framing import _error_body
from mlink.xml.parser import (
    STREAM_NS,
    STREAM_TAG,
    Stanza,
    StreamClose,
    StreamOpen,
    XMLStreamError,
    XMLStreamParser,
)
from mlink.xml.serialize import CLIENT_NS, escape_attr, serialize

COMPONENT_NS = "jabber:component:accept"
STANZA_KINDS = frozenset({"message", "presence", "iq"})
# Bytes of randomness in stream ids (as for c2s streams): the id salts the
# handshake, so it must never repeat, or a recorded handshake could be replayed.
ID_BYTES = 12
# A SHA-1 digest in hex: anything longer in <handshake> is not one.
HANDSHAKE_HEX_LENGTH = 40


class State(enum.Enum):
    WAIT_HEADER = "wait-header"
    WAIT_HANDSHAKE = "wait-handshake"  # header answered; the proof is awaited
    WAIT_ACCEPT = "wait-accept"  # proof right; the driver checks for a conflict
    ESTABLISHED = "established"
    CLOSED = "closed"


class LocalProtocolError(RuntimeError):
    """The driver called the machine in a state that does not accept it."""


@dataclass(slots=True)
class HandshakeVerified:
    """The component proved the secret of `domain`: check that no other
    connection holds the domain, then `accept()` or `refuse("conflict")`."""

    domain: str


@dataclass(slots=True)
class ComponentStanza:
    """A stanza from the component, in `jabber:client`, its `from` checked
    to be the component's domain or a JID at it."""

    element: ET.Element


@dataclass(slots=True)
class StanzaRefused:
    """A stanza answered with a stanza error by the machine itself (queued
    in `data_to_send`); for logs and counters."""

    condition: str


@dataclass(slots=True)
class ComponentEnded:
    """Nothing more will be read: flush and close. `condition` is the stream
    error we sent (None for a clean close)."""

    condition: str | None
    peer_closed: bool


ComponentEvent = HandshakeVerified | ComponentStanza | StanzaRefused | ComponentEnded


def handshake_digest(stream_id: str, secret: str) -> str:
    """XEP-0114 §3: hex SHA-1 of the stream id and the secret, UTF-8."""
    return hashlib.sha1((stream_id + secret).encode("utf-8")).hexdigest()


class ComponentStream:
    """One component connection's stream, from header to closing tag.

    `secrets_by_domain` maps each configured component domain to its
    shared secret."""

    def __init__(self, secrets_by_domain: Mapping[str, str],
                 max_stanza_bytes: int = DEFAULT_MAX_STANZA_BYTES,
                 max_depth: int = DEFAULT_MAX_DEPTH) -> None:
        self._secrets = secrets_by_domain
        self._parser = XMLStreamParser(max_stanza_bytes, max_depth)
        self.state = State.WAIT_HEADER
        self.stream_id = ""
        self.domain: str | None = None
        self._out: list[bytes] = []
        self._sent_header = False
        self._sent_close = False

    # -- bytes ------------------------------------------------------------------

    def data_to_send(self) -> bytes:
        out = b"".join(self._out)
        self._out.clear()
        return out

    def receive_data(self, data: bytes | bytearray) -> list[ComponentEvent]:
        if self.state is State.CLOSED:
            return []
        try:
            parsed = self._parser.feed(data)
        except XMLStreamError as exc:
            return [self._fail(exc.condition, exc.text)]
        out: list[ComponentEvent] = []
        for ev in parsed:
            if self._closed():
                break
            if isinstance(ev, StreamOpen):
                out.extend(self._on_header(ev))
            elif isinstance(ev, Stanza):
                out.extend(self._on_element(ev.element))
            elif isinstance(ev, StreamClose):
                out.append(self._on_close())
        return out

    def _closed(self) -> bool:
        # A method, not an inline test: handlers change the state in the loop.
        return self.state is State.CLOSED

    @property
    def stanza_in_progress(self) -> bool:
        return self._parser.stanza_in_progress

    # -- driver calls -------------------------------------------------------------

    def accept(self) -> None:
        """The domain is ours now: confirm with an empty `<handshake/>`."""
        if self.state is State.CLOSED:
            return
        if self.state is not State.WAIT_ACCEPT:
            raise LocalProtocolError(f"accept called in state {self.state.value}")
        self._out.append(b"<handshake/>")
        self.state = State.ESTABLISHED

    def refuse(self, condition: str, text: str = "") -> ComponentEnded:
        """The driver will not take the domain (`conflict`: connected already)."""
        return self._fail(condition, text)

    def send_stanza(self, stanza: ET.Element) -> None:
        """Queue a stanza for the component (established streams only)."""
        if self.state is not State.ESTABLISHED:
            raise LocalProtocolError("stanza for a component that is not established")
        self._out.append(serialize(stanza, CLIENT_NS))

    def close(self, condition: str | None = None, text: str = "") -> ComponentEnded:
        """Server-initiated end: a stream error when `condition` is given."""
        if condition:
            return self._fail(condition, text)
        if not self._sent_close:
            self._ensure_header()
            self._out.append(b"</stream:stream>")
            self._sent_close = True
        self.state = State.CLOSED
        return ComponentEnded(None, peer_closed=False)

    # -- the stream ---------------------------------------------------------------

    def _on_header(self, ev: StreamOpen) -> list[ComponentEvent]:
        if self.state is not State.WAIT_HEADER:
            return [self._fail("not-well-formed", "unexpected stream header")]
        if ev.tag != STREAM_TAG:
            return [self._fail("invalid-namespace", f"stream element must be {STREAM_TAG}")]
        if ev.namespaces.get("stream") != STREAM_NS:
            return [self._fail("bad-namespace-prefix", "use the 'stream' prefix")]
        if ev.namespaces.get("") != COMPONENT_NS:
            return [self._fail("invalid-namespace",
                               f"default namespace must be {COMPONENT_NS}")]
        to = ev.attrib.get("to")
        if not to:
            return [self._fail("improper-addressing", "a 'to' attribute is required")]
        try:
            jid = parse_jid(to)
        except InvalidJID:
            return [self._fail("host-unknown", "no such component")]
        if jid.local or jid.resource or jid.domain not in self._secrets:
            return [self._fail("host-unknown", "no such component")]
        self.domain = jid.domain
        self._send_header()
        self.state = State.WAIT_HANDSHAKE
        return []

    def _send_header(self) -> None:
        self.stream_id = secrets.token_urlsafe(ID_BYTES)
        origin = f" from='{escape_attr(self.domain)}'" if self.domain else ""
        self._out.append(
            f"<?xml version='1.0'?><stream:stream xmlns='{COMPONENT_NS}' "
            f"xmlns:stream='{STREAM_NS}' id='{self.stream_id}'{origin}>".encode())
        self._sent_header = True

    def _ensure_header(self) -> None:
        """RFC 6120 §4.9.1.1: an error before our header still needs one."""
        if not self._sent_header:
            self._send_header()

    def _on_element(self, elem: ET.Element) -> list[ComponentEvent]:
        tag = elem.tag
        if tag == f"{{{STREAM_NS}}}error":
            return [self._on_close()]
        if self.state is State.WAIT_HANDSHAKE:
            if tag != f"{{{COMPONENT_NS}}}handshake":
                return [self._fail("not-authorized", "send <handshake> first")]
            return self._on_handshake((elem.text or "").strip())
        if self.state is State.WAIT_ACCEPT:
            # Pipelined before our <handshake/>: XEP-0114 lets the component
            # send only once it has it.
            return [self._fail("not-authorized", "wait for the handshake to succeed")]
        ns, _, local = tag[1:].partition("}") if tag[:1] == "{" else ("", "", tag)
        if ns != COMPONENT_NS:
            return [self._fail("invalid-namespace", f"stanzas must be in {COMPONENT_NS}")]
        if local not in STANZA_KINDS:
            return [self._fail("unsupported-stanza-type", f"unexpected element {local}")]
        return self._on_stanza(elem, local)

    def _on_handshake(self, given: str) -> list[ComponentEvent]:
        domain = self.domain or ""
        expected = handshake_digest(self.stream_id, self._secrets[domain])
        # Constant time: the comparison must not tell how many leading
        # characters of a guess were right.
        if len(given) != HANDSHAKE_HEX_LENGTH or not hmac.compare_digest(
                expected.encode(), given.lower().encode("utf-8", "replace")):
            return [self._fail("not-authorized", "wrong handshake")]
        self.state = State.WAIT_ACCEPT
        return [HandshakeVerified(domain)]

    def _on_stanza(self, elem: ET.Element, kind: str) -> list[ComponentEvent]:
        _retag(elem)
        domain = self.domain or ""
        given = elem.get("from")
        if not given:
            # XEP-0114 asks for a 'from'; like Prosody, the component's own
            # domain is taken when it leaves it out.
            elem.set("from", domain)
        else:
            try:
                sender = parse_jid(given)
            except InvalidJID:
                return [self._refuse(elem, "jid-malformed", "bad 'from'")]
            if sender.domain != domain:
                # RFC 6120 §4.9.3.9: a stream may only speak for its own domain.
                return [self._fail("invalid-from", f"'from' must be at {domain}")]
            elem.set("from", str(sender))
        to = elem.get("to")
        if not to:
            return [self._refuse(elem, "bad-request", "a 'to' attribute is required")]
        try:
            elem.set("to", str(parse_jid(to)))
        except InvalidJID:
            return [self._refuse(elem, "jid-malformed", "bad 'to'")]
        if kind == "iq" and (not elem.get("id") or elem.get("type") not in
                             ("get", "set", "result", "error")):
            return [self._refuse(elem, "bad-request", "an iq needs an id and a known type")]
        return [ComponentStanza(elem)]

    def _refuse(self, elem: ET.Element, condition: str, text: str) -> StanzaRefused:
        if elem.get("type") != "error":
            self._out.append(serialize(stanza_error(elem, condition, text), CLIENT_NS))
        return StanzaRefused(condition)

    # -- endings ----------------------------------------------------------------

    def _on_close(self) -> ComponentEnded:
        if not self._sent_close:
            self._ensure_header()
            self._out.append(b"</stream:stream>")
            self._sent_close = True
        self.state = State.CLOSED
        return ComponentEnded(None, peer_closed=True)

    def _fail(self, condition: str, text: str = "") -> ComponentEnded:
        if not self._sent_close:
            self._ensure_header()
            self._out.append(f"<stream:error>{_error_body(condition, text)}</stream:error>"
                             "</stream:stream>".encode())
            self._sent_close = True
        self.state = State.CLOSED
        return ComponentEnded(condition, peer_closed=False)


def _retag(elem: ET.Element) -> None:
    """Move `elem` and its children of the component namespace into
    `jabber:client` (the error child of an error reply, for one), the
    namespace the router and every module expect."""
    prefix = f"{{{COMPONENT_NS}}}"
    for node in elem.iter():
        if node.tag.startswith(prefix):
            node.tag = f"{{{CLIENT_NS}}}{node.tag[len(prefix):]}"
