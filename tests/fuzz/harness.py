"""Fuzz targets for mlink's sans-IO protocol layers, as plain functions.

Why plain functions of `bytes`: the same code runs under atheris (coverage-
guided, `tests/fuzz/run.py`), in pytest (replaying the seed corpus and every
saved crash, `tests/test_fuzz_regressions.py`) and from a shell, with no
fuzzing library needed to reproduce a finding.

The invariant of every target (issue 12): whatever the input, the layer
answers with events, stream errors or SASL failures. Any other exception
escaping a target is a finding, and so is an `AssertionError` raised here
when an answer breaks the protocol's own rules (a stream that ends without
its closing tag, a success nobody vouched for). The harness always drives
the machines as a correct driver would, so `LocalProtocolError` and
`SaslStateError` are findings too.

Input layouts (the first byte chooses options, the rest is the client's):

* xml_parser: [chunking seed] stream bytes
* c2s: [flags] packets separated by NUL (never valid in XML), fed after a
  valid stream header (TCP) or <open/> (WebSocket)
* component: [flags] packets separated by NUL, fed after a valid
  `jabber:component:accept` header for `COMPONENT_DOMAIN` (unless a flag
  says the input brings its own). `HANDSHAKE_AUTO` (`HANDSHAKE_UPPER`) in a packet is
  replaced by the correct proof (in upper case) for the stream id just sent, so that the stream's
  established state is reachable although its id is random.
* sasl_plain, sasl_scram, sasl_registry: [flags] ([mechanism]) client
  messages separated by `SASL_SEPARATOR`. In SCRAM messages the harness
  replaces `c=AUTO`, `r=AUTO` and `p=AUTO` with the correct channel
  binding, nonce and proof, so that mutations around a successful exchange
  are reachable.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import hashlib
import hmac
import random
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from typing import Any

from mlink.jid import parse_jid
from mlink.sasl.channel_binding import ChannelBinding
from mlink.sasl.events import Challenge, Failure, NeedPassword, NeedSecret, Success
from mlink.sasl.plain import PlainMechanism
from mlink.sasl.registry import (
    PASSWORD,
    SCRAM_SECRET,
    UNAVAILABLE,
    NeedCredential,
    SaslStreamInfo,
    builtin_providers,
)
from mlink.sasl.scram import ScramMechanism
from mlink.sasl.secrets import HASHES, ScramSecret, derive_secret
from mlink.stream import c2s, component
from mlink.xml.parser import Stanza, StreamClose, StreamEvent, StreamOpen, XMLStreamError
from mlink.xml.parser import XMLStreamParser as _Parser
from mlink.xml.serialize import CLIENT_NS, serialize

DOMAIN = "example.com"
USER = "alice"
PASSWORD_TEXT = "pencil"
USER_JID = f"{USER}@{DOMAIN}"
# Fixed salt so SCRAM proofs in the seed corpus stay valid across runs.
SALT = b"mlink-fuzz-salt!"
ITERATIONS = 4096
# The server nonce part is fixed under fuzzing (see `_fixed_nonce`), for
# the same reason: a recorded client-final must match the next run's nonce.
SERVER_NONCE = "fuzzServerNonce0123456789"
# Channel-binding data the fake TLS layer reports, by type.
CHANNEL_BINDING: dict[str, bytes] = {
    "tls-exporter": b"E" * 32,
    "tls-server-end-point": b"S" * 32,
    "tls-unique": b"U" * 12,
}
SASL_SEPARATOR = b"\xff\xff"  # never in UTF-8 text, so never in a real message
PACKET_SEPARATOR = b"\x00"  # never in XML
MAX_CHUNK = 64  # largest random chunk the XML target feeds at once
SASL_NS = "urn:ietf:params:xml:ns:xmpp-sasl"
FRAMING_NS = "urn:ietf:params:xml:ns:xmpp-framing"
TCP_HEADER = (
    "<?xml version='1.0'?><stream:stream xmlns='jabber:client' "
    f"xmlns:stream='http://etherx.jabber.org/streams' to='{DOMAIN}' version='1.0'>"
).encode()
# How every stream the server opens over TCP begins (TCPFraming.header).
SERVER_DECLARATION = b"<?xml version='1.0'?>"
WS_OPEN = f"<open xmlns='{FRAMING_NS}' to='{DOMAIN}' version='1.0'/>".encode()

# c2s flag bits (first input byte).
C2S_WEBSOCKET = 0x01
C2S_TLS_REQUIRED = 0x02
C2S_DIRECT_TLS = 0x04  # encrypted from the start, with channel binding
C2S_DEFER_ANSWERS = 0x08  # answer after the next packet, as a slow directory
C2S_WRONG_CREDENTIAL = 0x10
C2S_UNAVAILABLE = 0x20  # the credential source is down
C2S_BIND_CONFLICT = 0x40  # the session table refuses the resource
C2S_RECHUNK = 0x80  # TCP: split every packet into random small reads

# component flag bits (first input byte).
COMP_RECHUNK = 0x01  # split every packet into random small reads
COMP_REFUSE = 0x02  # the domain is held elsewhere: refuse("conflict")
COMP_DEFER_ACCEPT = 0x04  # answer the handshake after the next packet
COMP_ECHO = 0x08  # route every stanza back to the component (send_stanza)
COMP_MISUSE = 0x10  # call accept/send_stanza in wrong states: LocalProtocolError
COMP_SERVER_CLOSE = 0x20  # the server ends the stream after the input
COMP_CLOSE_ERROR = 0x40  # ... with a stream error (system-shutdown)
COMP_OWN_HEADER = 0x80  # no header fed: the first packet is the header
COMPONENT_DOMAIN = "push.example.com"
# Fixed so that the harness can compute the proof; the stream id salting it
# stays random, as in production.
COMPONENT_SECRET = "fuzz-component-secret"
HANDSHAKE_AUTO = b"HANDSHAKE_AUTO"
HANDSHAKE_UPPER = b"HANDSHAKE_UPPER"  # the proof in upper-case hex
COMPONENT_HEADER = (
    "<?xml version='1.0'?><stream:stream xmlns='jabber:component:accept' "
    f"xmlns:stream='http://etherx.jabber.org/streams' to='{COMPONENT_DOMAIN}'>"
).encode()

# SASL flag bits (first input byte).
SASL_NO_INITIAL = 0x01  # <auth/> without an initial response
SASL_WRONG = 0x02  # the directory says no (wrong password / unknown user)
SASL_SHA256 = 0x04
SASL_PLUS = 0x08
SASL_CB_OFFERED = 0x10
SASL_TLS = 0x20
SASL_CB_SHIFT = 6  # two bits: which channel-binding types the TLS layer has
# sasl_registry has no use for the hash bit (the provider picks the hash):
# there it says whether the stream allows PLAIN.
REGISTRY_PLAIN_ALLOWED = SASL_SHA256


def _fixed_nonce() -> str:
    return SERVER_NONCE


@contextlib.contextmanager
def fixed_server_nonce() -> Iterator[None]:
    """Every ScramMechanism made inside (the registry's wrappers, the stream
    machine) uses the fixed nonce; restored after, so importing the harness
    into a test run changes nothing else."""
    defaults: dict[str, Any] = ScramMechanism.__init__.__kwdefaults__  # type: ignore[assignment]
    saved = defaults["nonce_source"]
    defaults["nonce_source"] = _fixed_nonce
    try:
        yield
    finally:
        defaults["nonce_source"] = saved


def _with_fixed_nonce(target: Callable[[bytes], None]) -> Callable[[bytes], None]:
    @functools.wraps(target)
    def run(data: bytes) -> None:
        with fixed_server_nonce():
            target(data)

    return run


def _salted_password(mechanism: str) -> bytes:
    return hashlib.pbkdf2_hmac(HASHES[mechanism], PASSWORD_TEXT.encode(), SALT, ITERATIONS)


SECRETS: dict[str, ScramSecret] = {
    m: derive_secret(m, PASSWORD_TEXT, SALT, ITERATIONS) for m in HASHES
}
SALTED: dict[str, bytes] = {m: _salted_password(m) for m in HASHES}


# -- the XML stream parser -------------------------------------------------------------


def _chunks(data: bytes, seed: int) -> list[bytes]:
    """`data` in random pieces of 1..MAX_CHUNK bytes, fixed by `seed`."""
    rng = random.Random(seed)
    out = []
    i = 0
    while i < len(data):
        n = rng.randint(1, MAX_CHUNK)
        out.append(data[i : i + n])
        i += n
    return out


def _parse(pieces: list[bytes]) -> tuple[list[tuple[Any, ...]], str | None]:
    """Events (in a comparable form) and the error condition, if any."""
    parser = _Parser()
    seen: list[tuple[Any, ...]] = []
    for piece in pieces:
        try:
            events = parser.feed(piece)
        except XMLStreamError as exc:
            assert exc.condition in XML_CONDITIONS, exc.condition
            return seen, exc.condition
        seen.extend(_comparable(ev) for ev in events)
    return seen, None


def _comparable(ev: StreamEvent) -> tuple[Any, ...]:
    if isinstance(ev, StreamOpen):
        return ("open", ev.tag, tuple(sorted(ev.attrib.items())))
    if isinstance(ev, Stanza):
        return ("stanza", serialize(ev.element))
    assert isinstance(ev, StreamClose), ev
    return ("close",)


XML_CONDITIONS = frozenset(
    {"not-well-formed", "restricted-xml", "policy-violation", "unsupported-encoding"}
)


def xml_parser(data: bytes) -> None:
    """Fed whole and in random chunks, a stream gives the same events up to
    the first error, and every error is an XMLStreamError."""
    if not data:
        return
    seed, stream = data[0], data[1:]
    whole, whole_err = _parse([stream])
    chunked, chunked_err = _parse(_chunks(stream, seed))
    if whole_err is None and chunked_err is None:
        assert whole == chunked, (whole, chunked)
    else:
        # The limits count per read, so an error may come earlier in one
        # feeding than in the other; what came before it must agree.
        n = min(len(whole), len(chunked))
        assert whole[:n] == chunked[:n], (whole, chunked)


# -- the c2s stream machine ------------------------------------------------------------


class C2SDriver:
    """Drives one C2SStream as `mlink.transport.client` does, answering the
    machine's requests from a fake directory and session table."""

    def __init__(self, flags: int) -> None:
        self.flags = flags
        self.websocket = bool(flags & C2S_WEBSOCKET)
        settings = c2s.StreamSettings(
            domains=frozenset({DOMAIN}),
            tls_available=True,
            tls_required=bool(flags & C2S_TLS_REQUIRED),
            tls_active=bool(flags & C2S_DIRECT_TLS) or self.websocket,
            websocket=self.websocket,
        )
        self.stream = c2s.C2SStream(settings)
        if flags & C2S_DIRECT_TLS:
            self.stream.channel_binding = dict(CHANNEL_BINDING)
        self.deferred: list[c2s.CredentialRequested | c2s.BindRequested] = []
        self.ended = False
        self.tcp_output: list[bytes] = []

    def feed(self, packet: bytes) -> None:
        if self.websocket:
            events = self.stream.receive_message(packet)
        else:
            events = []
            pieces = _chunks(packet, len(packet)) if self.flags & C2S_RECHUNK else [packet]
            for piece in pieces:
                events.extend(self.stream.receive_data(piece))
                if any(isinstance(ev, c2s.StartTLS) for ev in events):
                    break  # the rest would be the TLS handshake
        pending, self.deferred = self.deferred, []
        self.handle(events)
        for request in pending:
            self.answer(request)

    def handle(self, events: list[c2s.C2SEvent]) -> None:
        out = self._take_output()
        for ev in events:
            assert isinstance(ev, C2S_EVENT_TYPES), ev
            if isinstance(ev, c2s.StreamEnded):
                self._check_ending(out, ev)
            elif isinstance(ev, c2s.StartTLS):
                self.stream.tls_started(dict(CHANNEL_BINDING))
            elif isinstance(ev, c2s.CredentialRequested | c2s.BindRequested):
                if self.flags & C2S_DEFER_ANSWERS:
                    self.deferred.append(ev)
                else:
                    self.answer(ev)

    def answer(self, request: c2s.CredentialRequested | c2s.BindRequested) -> None:
        """Answer as the directory / session table would, also after the
        stream closed (a late answer the machine must drop)."""
        if isinstance(request, c2s.BindRequested):
            if self.flags & C2S_BIND_CONFLICT:
                self.stream.bind_done(None, "conflict")
            else:
                self.stream.bind_done(request.resource or "generated")
            self._take_output()
            return
        answer = credential_answer(request.jid, request.request, self.flags)
        self.handle(self.stream.credential_provided(answer))

    def finish(self) -> None:
        """The peer went away: late answers still arrive."""
        pending, self.deferred = self.deferred, []
        for request in pending:
            self.answer(request)
        self._check_tcp_output()
        if self.stream.state is c2s.State.CLOSED:
            assert self.stream.receive_data(b"<presence/>") == []
            assert self.stream.receive_message(b"<presence/>") == []

    def _take_output(self) -> bytes:
        if self.websocket:
            messages = self.stream.messages_to_send()
            for message in messages:
                # RFC 7395 §3.3.3: every message is one complete element,
                # parsable on its own (its namespaces declared in it).
                ET.fromstring(message)
            return b"".join(messages)
        out = self.stream.data_to_send()
        self.tcp_output.append(out)
        return out

    def _check_tcp_output(self) -> None:
        """Everything the server wrote is well-formed XML: one document per
        stream, each beginning with the server's XML declaration."""
        for document in b"".join(self.tcp_output).split(SERVER_DECLARATION)[1:]:
            parser = ET.XMLPullParser()
            parser.feed(SERVER_DECLARATION + document)
            list(parser.read_events())

    def _check_ending(self, out: bytes, ev: c2s.StreamEnded) -> None:
        """A stream that ends says so on the wire (RFC 6120 §4.4, RFC 7395)."""
        assert self.stream.state is c2s.State.CLOSED
        assert not self.ended, "a stream ends once"
        closing = f"<close xmlns='{FRAMING_NS}'/>".encode() if self.websocket else \
            b"</stream:stream>"
        assert out.endswith(closing), out[-200:]
        if ev.condition is not None:
            assert b"<stream:error" in out, out[-200:]
        self.ended = True


C2S_EVENT_TYPES = (
    c2s.StartTLS,
    c2s.CredentialRequested,
    c2s.AuthFailed,
    c2s.Authenticated,
    c2s.BindRequested,
    c2s.NonzaReceived,
    c2s.StanzaReceived,
    c2s.StreamEnded,
)


def credential_answer(jid: str, request: NeedCredential, flags: int) -> Any:
    """What the directory answers: the truth about alice, or per the flags a
    wrong verdict or a directory that is down."""
    if flags & C2S_UNAVAILABLE:
        return UNAVAILABLE
    known = jid == USER_JID and not flags & C2S_WRONG_CREDENTIAL
    if request.kind == PASSWORD:
        return known and request.detail["password"] == PASSWORD_TEXT
    assert request.kind == SCRAM_SECRET, request.kind
    return SECRETS[request.detail["mechanism"]] if known else None


def c2s_stream(data: bytes) -> None:
    """A valid header, then arbitrary packets; requests answered as a driver
    would (maybe late, after the stream closed)."""
    if not data:
        return
    driver = C2SDriver(data[0])
    driver.feed(WS_OPEN if driver.websocket else TCP_HEADER)
    for packet in data[1:].split(PACKET_SEPARATOR):
        driver.feed(packet)
    driver.finish()


# -- the XEP-0114 component stream machine --------------------------------------------


COMPONENT_EVENT_TYPES = (
    component.HandshakeVerified,
    component.ComponentStanza,
    component.StanzaRefused,
    component.ComponentEnded,
)


def component_proof(stream_id: str) -> str:
    """XEP-0114 §3, computed here rather than by the machine's own function,
    so that a wrong digest in the machine is a finding, not a tautology."""
    return hashlib.sha1((stream_id + COMPONENT_SECRET).encode()).hexdigest()


class ComponentDriver:
    """Drives one ComponentStream as `mlink.transport.component` does: the
    domain table answers `HandshakeVerified`, stanzas may be routed back.
    Checks the protocol's rules after every step."""

    def __init__(self, flags: int) -> None:
        self.flags = flags
        self.stream = component.ComponentStream({COMPONENT_DOMAIN: COMPONENT_SECRET})
        self.output: list[bytes] = []
        self.received = b""  # everything the component sent, for the proof check
        self.verified = False
        self.accepted = False
        self.ended = False
        self.pending_accept = False
        self.ending: component.ComponentEnded | None = None
        self.stanzas = 0

    def feed(self, packet: bytes) -> None:
        if self.stream.stream_id:
            proof = component_proof(self.stream.stream_id)
            packet = packet.replace(HANDSHAKE_AUTO, proof.encode()).replace(
                HANDSHAKE_UPPER, proof.upper().encode())
        self.received += packet
        answer_late, self.pending_accept = self.pending_accept, False
        pieces = _chunks(packet, len(packet)) if self.flags & COMP_RECHUNK else [packet]
        for piece in pieces:
            self.handle(self.stream.receive_data(piece))
        if answer_late:
            self.answer()

    def handle(self, events: list[component.ComponentEvent]) -> None:
        out = self._take_output()
        if self.ended:
            assert events == [] and out == b"", (events, out)
            return
        for ev in events:
            assert isinstance(ev, COMPONENT_EVENT_TYPES), ev
            assert not self.ended, f"{ev} after ComponentEnded"
            if isinstance(ev, component.ComponentEnded):
                self._check_ending(out, ev)
            elif isinstance(ev, component.HandshakeVerified):
                self._check_verified(ev)
            elif isinstance(ev, component.ComponentStanza):
                self._check_stanza(ev.element)
            else:
                assert self.accepted, f"{ev} before the handshake"
        if self.flags & COMP_MISUSE:
            self._misuse()

    def _check_verified(self, ev: component.HandshakeVerified) -> None:
        """Only the right proof, for the configured domain, once."""
        assert not self.verified, "verified twice"
        proof = component_proof(self.stream.stream_id)
        assert proof.encode() in self.received.lower(), self.received[-200:]
        assert ev.domain == COMPONENT_DOMAIN == self.stream.domain, ev
        self.verified = True
        if self.flags & COMP_DEFER_ACCEPT:
            self.pending_accept = True
        else:
            self.answer()

    def answer(self) -> None:
        """The domain table's verdict, also after the stream closed (a late
        answer the machine must drop)."""
        if self.flags & COMP_REFUSE:
            was_open = self.stream.state is not component.State.CLOSED
            ev = self.stream.refuse("conflict", "domain already connected")
            out = self._take_output()
            if was_open:
                self._check_ending(out, ev)
            else:
                assert out == b"", out  # closed already: nothing more
            return
        was_open = self.stream.state is not component.State.CLOSED
        self.stream.accept()
        out = self._take_output()
        if was_open:
            assert out == b"<handshake/>", out
            self.accepted = True
        else:
            assert out == b"", out

    def _check_stanza(self, elem: ET.Element) -> None:
        """Stanzas only once accepted, in jabber:client, speaking for the
        component's domain, addressed."""
        assert self.accepted
        self.stanzas += 1
        kind = elem.tag.removeprefix(f"{{{CLIENT_NS}}}")
        assert kind in component.STANZA_KINDS, elem.tag
        for node in elem.iter():
            assert not node.tag.startswith(f"{{{component.COMPONENT_NS}}}"), node.tag
        sender = parse_jid(elem.get("from") or "")
        assert sender.domain == COMPONENT_DOMAIN, elem.get("from")
        parse_jid(elem.get("to") or "")
        if self.flags & COMP_ECHO and self.stream.state is component.State.ESTABLISHED:
            reply = ET.Element(elem.tag, {"from": elem.get("to") or "",
                                          "to": elem.get("from") or ""})
            reply.extend(list(elem))
            self.stream.send_stanza(reply)
            self._take_output()

    def _misuse(self) -> None:
        """The documented misuse errors, raised without side effects."""
        state = self.stream.state
        if state not in (component.State.WAIT_ACCEPT, component.State.CLOSED):
            with contextlib.suppress(component.LocalProtocolError):
                self.stream.accept()
                raise AssertionError(f"accept accepted in {state}")
        if state is not component.State.ESTABLISHED:
            with contextlib.suppress(component.LocalProtocolError):
                self.stream.send_stanza(ET.Element(f"{{{CLIENT_NS}}}message"))
                raise AssertionError(f"send_stanza accepted in {state}")
        assert self.stream.state is state
        assert self._take_output() == b""

    def _take_output(self) -> bytes:
        out = self.stream.data_to_send()
        self.output.append(out)
        return out

    def _check_ending(self, out: bytes, ev: component.ComponentEnded) -> None:
        """An ended stream says so on the wire: a stream error when there
        was one, then the closing tag, once."""
        assert self.stream.state is component.State.CLOSED
        assert not self.ended, "a stream ends once"
        assert out.endswith(b"</stream:stream>"), out[-200:]
        if ev.condition is not None:
            assert not ev.peer_closed
            assert out.endswith(b"</stream:error></stream:stream>"), out[-200:]
        self.ended = True
        self.ending = ev

    def finish(self) -> None:
        """The input is over: a late answer, maybe the server's own close;
        then the whole output must be one well-formed stream."""
        if self.pending_accept:
            self.pending_accept = False
            self.answer()
        if self.flags & COMP_SERVER_CLOSE:
            condition = "system-shutdown" if self.flags & COMP_CLOSE_ERROR else None
            ev = self.stream.close(condition)
            out = self._take_output()
            if self.ended:
                assert out == b"", out
            else:
                self._check_ending(out, ev)
        if self.stream.state is component.State.CLOSED:
            assert self.stream.receive_data(b"<message/>") == []
            assert self.stream.data_to_send() == b""
            assert self.ended
        self._check_output()

    def _check_output(self) -> None:
        output = b"".join(self.output)
        if not output:
            return
        assert output.count(b"<stream:stream ") == 1, output[:300]
        assert output.startswith(SERVER_DECLARATION + b"<stream:stream "), output[:200]
        assert output.count(b"</stream:stream>") == (1 if self.ended else 0), output[-300:]
        assert output.count(b"<stream:error>") <= 1, output[-300:]
        parser = ET.XMLPullParser()
        parser.feed(output)
        list(parser.read_events())
        if self.ended:
            parser.close()  # the document is complete


def component_stream(data: bytes) -> None:
    """A component header (or the input's own), then arbitrary packets; the
    handshake answered as the domain table would (maybe late)."""
    if data:
        drive_component(data)


def drive_component(data: bytes) -> ComponentDriver:
    """`component_stream`, returning the driver for tests to inspect."""
    driver = ComponentDriver(data[0])
    packets = data[1:].split(PACKET_SEPARATOR)
    if not data[0] & COMP_OWN_HEADER:
        driver.feed(COMPONENT_HEADER)
    for packet in packets:
        driver.feed(packet)
    driver.finish()
    return driver


# -- SASL mechanisms -------------------------------------------------------------------


def _cb_types(flags: int) -> dict[str, bytes]:
    """Which channel-binding types the TLS layer reports (two flag bits)."""
    choice = (flags >> SASL_CB_SHIFT) & 0b11
    names = [(), ("tls-exporter",), ("tls-server-end-point", "tls-unique"),
             tuple(CHANNEL_BINDING)][choice]
    return {n: CHANNEL_BINDING[n] for n in names}


class ScramClientHelper:
    """Fills `c=AUTO`, `r=AUTO`, `p=AUTO` in client messages with correct
    values, from what the client sent and the server answered so far."""

    def __init__(self, mechanism: str, cb_types: dict[str, bytes]) -> None:
        self.mechanism = mechanism
        self.cb_types = cb_types
        self.client_first = b""
        self.server_first = b""

    def fill(self, message: bytes) -> bytes:
        if not self.server_first:
            self.client_first = message
            return message
        gs2, _, bare = self._split_first()
        nonce = self.server_first.split(b",")[0][2:]
        flag = gs2.split(b",")[0]
        cb_data = self.cb_types.get(flag[2:].decode("latin-1"), b"") if \
            flag.startswith(b"p=") else b""
        message = message.replace(b"c=AUTO", b"c=" + base64.b64encode(gs2 + cb_data))
        message = message.replace(b"r=AUTO", b"r=" + nonce)
        head, sep, _ = message.rpartition(b",p=AUTO")
        if not sep:
            return message
        auth = b",".join((bare, self.server_first, head))
        digest = HASHES[self.mechanism]
        client_key = hmac.digest(SALTED[self.mechanism], b"Client Key", digest)
        stored = hashlib.new(digest, client_key).digest()
        signature = hmac.digest(stored, auth, digest)
        proof = bytes(a ^ b for a, b in zip(client_key, signature, strict=True))
        return head + b",p=" + base64.b64encode(proof)

    def _split_first(self) -> tuple[bytes, bytes, bytes]:
        flag, _, rest = self.client_first.partition(b",")
        authz, _, bare = rest.partition(b",")
        return flag + b"," + authz + b",", b"", bare

    def saw(self, challenge: bytes) -> None:
        if challenge and not self.server_first:
            self.server_first = challenge


def _messages(data: bytes) -> list[bytes]:
    return data.split(SASL_SEPARATOR)


def _check_ending(events: list[Any], succeeded: bool) -> None:
    """After the exchange ended, the mechanism only answers failure."""
    ended = [e for e in events if isinstance(e, Success | Failure)]
    assert len(ended) <= 1 or all(isinstance(e, Failure) for e in ended[1:]), events
    if any(isinstance(e, Success) for e in events):
        assert succeeded, events


def sasl_plain(data: bytes) -> None:
    """PlainMechanism: messages in, the directory's verdict on NeedPassword."""
    if not data:
        return
    flags, rest = data[0], data[1:]
    mech = PlainMechanism()
    vouched = False
    seen: list[Any] = []
    messages: list[bytes | None] = list(_messages(rest))
    if flags & SASL_NO_INITIAL:
        messages.insert(0, None)
    for message in messages:
        ev = mech.receive(message)
        seen.append(ev)
        if isinstance(ev, NeedPassword):
            ok = (ev.username == USER and ev.password == PASSWORD_TEXT
                  and not flags & SASL_WRONG)
            vouched = vouched or ok
            ev2 = mech.password_result(ok)
            seen.append(ev2)
        assert isinstance(seen[-1], Challenge | NeedPassword | Success | Failure)
    _check_ending(seen, vouched)


def sasl_scram(data: bytes) -> None:
    """ScramMechanism (SHA-1/256, -PLUS with channel binding) driven directly."""
    if not data:
        return
    flags, rest = data[0], data[1:]
    mechanism = "SCRAM-SHA-256" if flags & SASL_SHA256 else "SCRAM-SHA-1"
    cb = _cb_types(flags)
    binding = ChannelBinding(cb) if cb else None
    try:
        mech = ScramMechanism(mechanism, bool(flags & SASL_PLUS), binding,
                              bool(flags & SASL_CB_OFFERED))
    except ValueError:
        # Documented: -PLUS without usable binding data is refused at creation.
        assert flags & SASL_PLUS and not cb
        return
    _drive_scram(mech.receive, mech.provide_secret, mechanism, cb, flags, rest)


def _drive_scram(receive: Callable[[bytes | None], Any], provide: Callable[[Any], Any],
                 mechanism: str, cb: dict[str, bytes], flags: int, rest: bytes) -> None:
    helper = ScramClientHelper(mechanism, cb)
    messages: list[bytes | None] = list(_messages(rest))
    if flags & SASL_NO_INITIAL:
        messages.insert(0, None)
    seen: list[Any] = []
    known = False
    for message in messages:
        ev = receive(None if message is None else helper.fill(message))
        seen.append(ev)
        if isinstance(ev, NeedSecret | NeedCredential):
            username = ev.username
            known = username == USER and not flags & SASL_WRONG
            ev = provide(SECRETS[mechanism] if known else None)
            seen.append(ev)
        if isinstance(ev, Challenge):
            helper.saw(ev.data)
    _check_ending(seen, known)


def sasl_registry(data: bytes) -> None:
    """The generic wrappers: offered providers for a stream, one picked by
    the second byte, driven through NeedCredential."""
    if len(data) < 2:
        return
    flags, pick, rest = data[0], data[1], data[2:]
    cb = _cb_types(flags) if flags & SASL_TLS else {}
    info = SaslStreamInfo(DOMAIN, bool(flags & SASL_TLS), cb, bool(flags & SASL_CB_OFFERED),
                          None, plain_allowed=bool(flags & REGISTRY_PLAIN_ALLOWED))
    providers = builtin_providers()
    offered = [p for p in providers if p.offered(info)]
    provider = providers[pick % len(providers)]
    try:
        mech = provider.create(info)
    except ValueError:
        # Documented (the stream answers invalid-mechanism): only for a
        # provider that would not have been offered.
        assert provider not in offered, provider
        return
    if provider not in offered:
        return
    if mech.name == "PLAIN":
        _drive_plain_generic(mech, flags, rest)
        return
    base = mech.name.removesuffix("-PLUS")
    _drive_scram(mech.receive, mech.provide, base, cb, flags, rest)


def _drive_plain_generic(mech: Any, flags: int, rest: bytes) -> None:
    messages: list[bytes | None] = list(_messages(rest))
    if flags & SASL_NO_INITIAL:
        messages.insert(0, None)
    seen: list[Any] = []
    vouched = False
    for message in messages:
        ev = mech.receive(message)
        seen.append(ev)
        if isinstance(ev, NeedCredential):
            assert ev.kind == PASSWORD, ev
            ok = (ev.username == USER and ev.detail["password"] == PASSWORD_TEXT
                  and not flags & SASL_WRONG)
            vouched = vouched or ok
            seen.append(mech.provide(ok))
    _check_ending(seen, vouched)


TARGETS: dict[str, Callable[[bytes], None]] = {
    name: _with_fixed_nonce(target)
    for name, target in (
        ("xml_parser", xml_parser),
        ("c2s", c2s_stream),
        ("component", component_stream),
        ("sasl_plain", sasl_plain),
        ("sasl_scram", sasl_scram),
        ("sasl_registry", sasl_registry),
    )
}
