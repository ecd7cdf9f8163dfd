"""Client-to-server stream negotiation as a sans-IO state machine (RFC 6120).

Bytes go in through `receive_data`, which returns the events the connection
must act on; bytes to write accumulate and are taken with `data_to_send`.
The machine never waits: where an answer needs the outside world (a SASL
mechanism's credential, a bind in the session table), it emits an event and
the driver reports back with `credential_provided` or `bind_done`. SASL
mechanisms and stream features come from registries the server fills from
its modules, so this file knows no mechanism and no extension.
The same machine serves TCP and, behind a framing adapter, WebSocket.

h11's discipline: which driver call each state accepts is in one table
(`DRIVER_CALLS`); a call in another state is a bug in mlink and raises
`LocalProtocolError`, except after the stream closed, where late answers
(the client sent `<auth/>` and `</stream:stream>` in one packet) are
dropped. Whatever the client sends is answered with a stream or SASL error,
never an assertion.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import enum
import secrets
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from mlink.config_model import (
    DEFAULT_AUTH_FAILURES_PER_STREAM,
    DEFAULT_MAX_DEPTH,
    DEFAULT_MAX_STANZA_BYTES,
)
from mlink.jid import JID, InvalidJID, parse_jid, prep_localpart, prep_resource
from mlink.sasl import events as sasl
from mlink.sasl.registry import (
    UNAVAILABLE,
    CredentialAnswer,
    Mechanism,
    MechanismProvider,
    NeedCredential,
    SaslRegistry,
    SaslStreamInfo,
    builtin_providers,
    encode_sasl,
)
from mlink.stream.errors import stanza_error
from mlink.stream.framing import FRAMING_NS, Framing, TCPFraming, WebSocketFraming
from mlink.xml.parser import (
    STREAM_NS,
    STREAM_TAG,
    Stanza,
    StreamClose,
    StreamOpen,
    XMLStreamError,
    XMLStreamParser,
)
from mlink.xml.serialize import CLIENT_NS, escape_text, serialize

TLS_NS = "urn:ietf:params:xml:ns:xmpp-tls"
SASL_NS = "urn:ietf:params:xml:ns:xmpp-sasl"
BIND_NS = "urn:ietf:params:xml:ns:xmpp-bind"
SESSION_NS = "urn:ietf:params:xml:ns:xmpp-session"
STANZA_TAGS = frozenset(f"{{{CLIENT_NS}}}{n}" for n in ("message", "presence", "iq"))
# Bytes of randomness in stream ids and generated resources: 96 bits make a
# collision across every session a server will ever see negligible.
ID_BYTES = 12
# SASL failures that are the server's fault, not the client's: they do not
# count towards the per-stream limit.
SERVER_SIDE_FAILURES = frozenset({"temporary-auth-failure"})


class State(enum.Enum):
    WAIT_HEADER = "wait-header"  # before (or after a restart, awaiting) a stream header
    NEGOTIATING = "negotiating"  # features sent; TLS / SASL / bind in progress
    WAIT_AUTH_RESULT = "wait-auth-result"  # the directory is being asked
    WAIT_BIND_RESULT = "wait-bind-result"  # the session table is being asked
    ESTABLISHED = "established"  # resource bound: stanzas flow
    CLOSED = "closed"


class LocalProtocolError(RuntimeError):
    """The driver called the machine in a state that does not accept the
    call: a bug in mlink, never a client's doing (h11's name for it)."""


# Which driver callback each state accepts (see the module docstring).
DRIVER_CALLS: dict[str, frozenset[State]] = {
    "tls_started": frozenset({State.WAIT_HEADER}),
    "credential_provided": frozenset({State.WAIT_AUTH_RESULT}),
    "bind_done": frozenset({State.WAIT_BIND_RESULT}),
    # A module resumed an existing session on this stream (instead of a
    # bind): XEP-0198 `<resume/>` answered after authentication.
    "session_resumed": frozenset({State.NEGOTIATING}),
}


# Events for the connection driver -------------------------------------------------


@dataclass(slots=True)
class StartTLS:
    """`<proceed/>` is queued: flush it, then wrap the socket and call
    `tls_started`."""


@dataclass(slots=True)
class CredentialRequested:
    """A SASL mechanism needs `request` answered for the bare JID `jid`
    (its kind names the credential source): ask, then call
    `credential_provided`."""

    jid: str
    request: NeedCredential


@dataclass(slots=True)
class AuthFailed:
    """A SASL attempt failed (for logging and failure counters)."""

    jid: str | None
    condition: str
    mechanism: str | None = None
    # Whether the user's real credential was in play (a wrong proof against
    # the stored secret): only such failures count against the account.
    counted: bool = False


@dataclass(slots=True)
class Authenticated:
    jid: JID
    mechanism: str
    # For the user once the session is up (a password expiry warning).
    notice: str | None = None


@dataclass(slots=True)
class BindRequested:
    """Pick/confirm the resource (None: generate one) and call `bind_done`."""

    resource: str | None


@dataclass(slots=True)
class NonzaReceived:
    """A top-level element of a namespace a module handles (a stream
    extension's own elements, not a stanza), once the stream is
    authenticated: before a bind too (a stream extension may replace the
    bind, as XEP-0198 resumption does), and on an established stream."""

    element: ET.Element


@dataclass(slots=True)
class StanzaReceived:
    """A stanza from the bound client, its `from` stamped."""

    element: ET.Element


@dataclass(slots=True)
class StreamEnded:
    """Nothing more will be read: flush what is queued and close the socket.

    `condition` is the stream error we sent, or None for a clean close;
    `peer_closed` tells whether the peer sent its closing tag."""

    condition: str | None
    peer_closed: bool


C2SEvent = (
    StartTLS
    | CredentialRequested
    | AuthFailed
    | Authenticated
    | BindRequested
    | NonzaReceived
    | StanzaReceived
    | StreamEnded
)


class FeatureView:
    """What a stream-feature provider sees of the stream (`mlink.module`)."""

    __slots__ = ("tls_active", "authenticated", "websocket")

    def __init__(self, tls_active: bool, authenticated: bool, websocket: bool) -> None:
        self.tls_active = tls_active
        self.authenticated = authenticated
        self.websocket = websocket


def _default_sasl() -> SaslRegistry:
    registry = SaslRegistry()
    for provider in builtin_providers():
        registry.add_mechanism(provider)
    return registry


@dataclass(slots=True)
class StreamSettings:
    """What the server knows about this connection before it starts."""

    domains: frozenset[str]
    tls_available: bool  # a certificate is configured (STARTTLS can be offered)
    tls_required: bool  # SASL only after TLS
    tls_active: bool = False  # direct TLS: already encrypted
    max_stanza_bytes: int = DEFAULT_MAX_STANZA_BYTES
    max_depth: int = DEFAULT_MAX_DEPTH
    # SASL failures one stream may have; the last is followed by a
    # policy-violation stream error (RFC 6120 §6.4.5).
    max_auth_failures: int = DEFAULT_AUTH_FAILURES_PER_STREAM
    # What modules add to <stream:features>: (provider, after authentication
    # only). A provider returns the element to offer, or None.
    feature_providers: tuple[tuple[Callable[[Any], ET.Element | None], bool], ...] = ()
    # The SASL mechanisms and credential sources (the built-in ones unless
    # the server passes its own registry).
    sasl: SaslRegistry = field(default_factory=_default_sasl)
    # Namespaces of top-level elements modules handle once the stream is
    # established (`NonzaReceived`); any other unknown element ends the stream.
    nonza_namespaces: frozenset[str] = frozenset()
    # Key for SCRAM's believable salts of unknown users (`mlink.sasl.mock_key`).
    mock_salt_key: bytes | None = None
    websocket: bool = False  # RFC 7395 framing: use receive_message


class C2SStream:
    """One client connection's stream, from first byte to closing tag."""

    def __init__(self, settings: StreamSettings) -> None:
        self.settings = settings
        self.state = State.WAIT_HEADER
        self.tls_active = settings.tls_active
        self.channel_binding: dict[str, bytes] = {}
        # The client's verified certificate (DER), for SASL EXTERNAL.
        self.peer_certificate: bytes | None = None
        self.domain: str | None = None
        self.stream_id = ""
        self.jid: JID | None = None  # bare after SASL, full after bind
        self._authenticated = False
        self._out: list[bytes] = []
        self.framing: Framing = WebSocketFraming() if settings.websocket else TCPFraming()
        self._parser = self._new_parser()
        self._mechanism: Mechanism | None = None
        self._auth_jid: str | None = None
        # The mechanism asked without a username: the identity comes from
        # outside the exchange (EXTERNAL: the TLS certificate), its source
        # works it out, and the mechanism's Success names the user.
        self._identity_from_source = False
        # The mechanisms offered in the last features, by name, strongest first.
        self._offered: dict[str, MechanismProvider] = {}
        self._sasl_stream: SaslStreamInfo | None = None
        # Attached to the current credential answer (CredentialAnswer).
        self._refusal: tuple[str, str] | None = None
        self._notice: str | None = None
        self._counted = False
        self._bind_iq: ET.Element | None = None
        self._sent_close = False
        self.auth_failures = 0  # SASL failures on this stream so far

    # -- bytes ----------------------------------------------------------------

    def data_to_send(self) -> bytes:
        out = b"".join(self._out)
        self._out.clear()
        return out

    def messages_to_send(self) -> list[bytes]:
        """What to send, one complete element each (WebSocket framing)."""
        out = self._out
        self._out = []
        return out

    def receive_data(self, data: bytes | bytearray) -> list[C2SEvent]:
        if self.state is State.CLOSED:
            return []
        try:
            events = self._parser.feed(data)
        except XMLStreamError as exc:
            return [self._fail(exc.condition, exc.text)]
        return self._dispatch(events)

    def receive_message(self, data: bytes) -> list[C2SEvent]:
        """One WebSocket text message: exactly one complete element
        (RFC 7395 §3.3.3); <open/> and <close/> stand for the stream tags."""
        if self.state is State.CLOSED or not data.strip():
            return []
        head = data.lstrip()[:7]
        try:
            if self.state is State.WAIT_HEADER or head.startswith((b"<open", b"<close")):
                return self._framing_element(data)
            events = self._parser.feed(data)
            complete = self._parser.between_stanzas and data.rstrip().endswith(b">")
            if len(events) != 1 or not complete:
                raise XMLStreamError("not-well-formed", "a message must be one complete element")
        except XMLStreamError as exc:
            return [self._fail(exc.condition, exc.text)]
        return self._dispatch(events)

    def _framing_element(self, data: bytes) -> list[C2SEvent]:
        parser = XMLStreamParser(self.settings.max_stanza_bytes, self.settings.max_depth)
        events = parser.feed(data)
        if len(events) != 2 or not isinstance(events[0], StreamOpen):
            raise XMLStreamError("not-well-formed", "a message must be one complete element")
        tag = events[0].tag
        if tag == f"{{{FRAMING_NS}}}close":
            return [self._on_close()]
        if tag != f"{{{FRAMING_NS}}}open" or self.state is not State.WAIT_HEADER:
            raise XMLStreamError("not-well-formed", "expected <open/>")
        header = StreamOpen(STREAM_TAG, events[0].attrib, {"": CLIENT_NS, "stream": STREAM_NS})
        out = self._on_header(header)
        # Stanzas that follow are parsed as children of a stream of their own.
        self._parser.feed(
            f"<stream:stream xmlns='{CLIENT_NS}' xmlns:stream='{STREAM_NS}'>".encode()
        )
        return out

    def _dispatch(self, events: list[Stanza | StreamOpen | StreamClose]) -> list[C2SEvent]:
        out: list[C2SEvent] = []
        for ev in events:
            if self.state is State.CLOSED:
                break
            if isinstance(ev, Stanza):
                out.extend(self._on_element(ev.element))
            elif isinstance(ev, StreamOpen):
                out.extend(self._on_header(ev))
            elif isinstance(ev, StreamClose):
                out.append(self._on_close())
            if out and isinstance(out[-1], StartTLS):
                # RFC 6120 §5.4.3.3: nothing sent before the TLS handshake
                # may be acted on (STARTTLS command injection).
                break
        return out

    # -- driver callbacks -------------------------------------------------------

    def _driver_call(self, name: str) -> bool:
        """Whether the driver's call `name` applies now: False once the
        stream is closed (a late answer), LocalProtocolError when the state
        never accepts it."""
        if self.state is State.CLOSED:
            return False
        if self.state not in DRIVER_CALLS[name]:
            raise LocalProtocolError(f"{name} called in state {self.state.value}")
        return True

    def tls_started(self, channel_binding: dict[str, bytes],
                    peer_certificate: bytes | None = None) -> None:
        """The socket is now TLS; expect a fresh stream header.
        `peer_certificate` is the client's certificate (DER) when it sent one
        that the TLS layer verified against the configured client CAs."""
        if not self._driver_call("tls_started"):
            return
        self.tls_active = True
        self.channel_binding = channel_binding
        self.peer_certificate = peer_certificate
        self._restart()

    def credential_provided(self, answer: Any) -> list[C2SEvent]:
        """The answer to the last `CredentialRequested` (`UNAVAILABLE` when
        the source could not decide: temporary-auth-failure)."""
        if not self._driver_call("credential_provided"):
            return []
        mechanism = self._mechanism
        if mechanism is None:
            raise LocalProtocolError("credential_provided without a mechanism")
        if answer is UNAVAILABLE:
            return self._sasl_failure("temporary-auth-failure")
        self._counted = isinstance(answer, CredentialAnswer)
        if isinstance(answer, CredentialAnswer):
            self._refusal, self._notice = answer.refusal, answer.notice
            answer = answer.value
        self.state = State.NEGOTIATING
        return self._sasl_step(mechanism.provide(answer))

    def bind_done(self, resource: str | None, condition: str | None = None,
                  text: str = "") -> None:
        """The session table bound `resource`, or refused with `condition`
        (and `text`)."""
        if not self._driver_call("bind_done"):
            return
        iq = self._bind_iq
        if iq is None or self.jid is None:
            raise LocalProtocolError("bind_done without a bind request")
        self._bind_iq = None
        if resource is None:
            self.state = State.NEGOTIATING
            self._send_element(stanza_error(iq, condition or "internal-server-error", text))
            return
        self.jid = JID(self.jid.local, self.jid.domain, resource)
        self.state = State.ESTABLISHED
        reply = ET.Element(f"{{{CLIENT_NS}}}iq", {"type": "result", "id": iq.get("id", "")})
        bind = ET.SubElement(reply, f"{{{BIND_NS}}}bind")
        ET.SubElement(bind, f"{{{BIND_NS}}}jid").text = str(self.jid)
        self._send_element(reply)

    def session_resumed(self, full: JID) -> None:
        """A module made this stream continue the existing session `full`
        (XEP-0198 resumption) in place of a bind: stanzas flow from now on.
        The module writes its own answer; the machine writes nothing."""
        if not self._driver_call("session_resumed"):
            return
        if self.jid is None or not self._authenticated or full.bare != self.jid.bare:
            raise LocalProtocolError("resumed a session of another user")
        self.jid = full
        self.state = State.ESTABLISHED

    def close(self, condition: str | None = None, text: str = "") -> StreamEnded:
        """Server-initiated end: a stream error when `condition` is given."""
        if condition:
            return self._fail(condition, text)
        if not self._sent_close:
            self._ensure_header()
            self._out.extend(self.framing.close())
            self._sent_close = True
        self.state = State.CLOSED
        return StreamEnded(None, peer_closed=False)

    @property
    def authenticated(self) -> bool:
        return self._authenticated

    @property
    def stanza_in_progress(self) -> bool:
        """A stanza (or header) is started and not finished: a read timeout
        applies, unlike to a stream idle between stanzas."""
        return self._parser.stanza_in_progress

    # -- stream header ----------------------------------------------------------

    def _on_header(self, ev: StreamOpen) -> list[C2SEvent]:
        if self.state is not State.WAIT_HEADER:
            return [self._fail("not-well-formed", "unexpected stream header")]
        attrib = ev.attrib
        to = attrib.get("to")
        if ev.tag != STREAM_TAG:
            return [
                self._fail("invalid-namespace", f"stream element must be {{{STREAM_NS}}}stream")
            ]
        if ev.namespaces.get("stream") != STREAM_NS:
            return [self._fail("bad-namespace-prefix", "use the 'stream' prefix")]
        if ev.namespaces.get("") != CLIENT_NS:
            return [self._fail("invalid-namespace", "default namespace must be jabber:client")]
        if to is None:
            return [self._fail("improper-addressing", "a 'to' attribute is required")]
        try:
            domain = parse_jid(to)
        except InvalidJID:
            domain = None
        if (
            domain is None
            or domain.local
            or domain.resource
            or domain.domain not in self.settings.domains
        ):
            return [self._fail("host-unknown", "this server does not serve that domain")]
        if self.domain is not None and domain.domain != self.domain:
            return [self._fail("host-unknown", "domain changed on stream restart")]
        self.domain = domain.domain
        version = attrib.get("version", "")
        major, _, _ = version.partition(".")
        if not major.isdigit() or int(major) < 1:
            return [self._fail("unsupported-version", "XMPP 1.0 streams only")]
        self._send_header(attrib.get("from"))
        self._out.append(self._features())
        self.state = State.NEGOTIATING
        return []

    def _send_header(self, peer: str | None = None) -> None:
        self.stream_id = secrets.token_urlsafe(ID_BYTES)
        to = ""
        if peer:
            try:
                to = str(parse_jid(peer))
            except InvalidJID:
                to = ""
        domain = self.domain or sorted(self.settings.domains)[0]
        self._out.append(self.framing.header(self.stream_id, domain, to or None))

    def _ensure_header(self) -> None:
        """RFC 6120 §4.9.1.1: an error before our header still needs one."""
        if not self.stream_id:
            self._send_header()

    def _features(self) -> bytes:
        elements: list[ET.Element] = []
        s = self.settings
        if not self.tls_active and s.tls_available and not self._authenticated and \
                not s.websocket:
            starttls = ET.Element(f"{{{TLS_NS}}}starttls")
            if s.tls_required:
                ET.SubElement(starttls, f"{{{TLS_NS}}}required")
            elements.append(starttls)
        if not self._authenticated:
            stream, offered = self._sasl_offer()
            self._offered = {p.name: p for p in offered} if self._sasl_allowed() else {}
            elements.extend(s.sasl.features(stream, list(self._offered)))
        else:
            elements.append(ET.Element(f"{{{BIND_NS}}}bind"))
            # RFC 3921 session establishment, optional since RFC 6121.
            session = ET.Element(f"{{{SESSION_NS}}}session")
            ET.SubElement(session, f"{{{SESSION_NS}}}optional")
            elements.append(session)
        view = FeatureView(self.tls_active, self._authenticated, s.websocket)
        for provider, after_auth in s.feature_providers:
            if after_auth and not self._authenticated:
                continue
            offered_element = provider(view)
            if offered_element is not None:
                elements.append(offered_element)
        return self.framing.features(b"".join(serialize(e) for e in elements))

    def _sasl_allowed(self) -> bool:
        return self.tls_active or not self.settings.tls_required

    def _sasl_offer(self) -> tuple[SaslStreamInfo, list[MechanismProvider]]:
        """What mechanisms may know of this stream, and those offered on it;
        whether a -PLUS one is offered goes into the former, since SCRAM's
        downgrade check needs it."""
        s = self.settings
        base = SaslStreamInfo(
            domain=self.domain or "",
            tls_active=self.tls_active,
            channel_binding=dict(self.channel_binding),
            mock_salt_key=s.mock_salt_key,
            plain_allowed=self.tls_active or not s.tls_required,
            peer_certificate=self.peer_certificate,
        )
        offered = s.sasl.offered(base)
        plus = any(p.name.endswith("-PLUS") for p in offered)
        info = dataclasses.replace(base, plus_offered=plus)
        self._sasl_stream = info
        return info, offered

    # -- elements ---------------------------------------------------------------

    def _on_element(self, elem: ET.Element) -> list[C2SEvent]:
        tag = elem.tag
        if self.state is State.ESTABLISHED:
            if tag in STANZA_TAGS:
                return self._stamp(elem)
            if tag[:1] == "{" and tag[1:].partition("}")[0] in self.settings.nonza_namespaces:
                return [NonzaReceived(elem)]
            return self._nonza(elem)
        if tag.startswith("{" + TLS_NS + "}"):
            return self._on_starttls(elem)
        if tag.startswith("{" + SASL_NS + "}"):
            return self._on_sasl(elem)
        if (self._authenticated and self.state is State.NEGOTIATING and tag[:1] == "{"
                and tag[1:].partition("}")[0] in self.settings.nonza_namespaces):
            return [NonzaReceived(elem)]
        if tag in STANZA_TAGS:
            if not self._authenticated:
                return [self._fail("not-authorized", "authenticate first")]
            if self.state is State.NEGOTIATING and tag.endswith("}iq"):
                return self._on_bind_phase_iq(elem)
            return [self._fail("not-authorized", "bind a resource first")]
        return self._nonza(elem)

    def _nonza(self, elem: ET.Element) -> list[C2SEvent]:
        if elem.tag == f"{{{STREAM_NS}}}error":
            # The peer reported a stream error: it is closing; so do we,
            # with our closing tag (RFC 6120 §4.4), as for a plain close.
            return [self._on_close()]
        if not elem.tag.startswith("{") or elem.tag.startswith("{" + CLIENT_NS + "}"):
            if elem.tag.startswith("{") or elem.tag in ("message", "presence", "iq"):
                return [self._fail("unsupported-stanza-type")]
            return [self._fail("invalid-namespace", "stanzas must be in jabber:client")]
        return [self._fail("unsupported-stanza-type", f"unexpected element {elem.tag}")]

    def _on_starttls(self, elem: ET.Element) -> list[C2SEvent]:
        if elem.tag != f"{{{TLS_NS}}}starttls":
            return [self._fail("unsupported-stanza-type")]
        if self.tls_active or self._authenticated or not self.settings.tls_available:
            # RFC 6120 §5.4.2.2: failure, then close the stream.
            self._out.append(f"<failure xmlns='{TLS_NS}'/>".encode())
            return [self.close()]
        self._out.append(f"<proceed xmlns='{TLS_NS}'/>".encode())
        self.state = State.WAIT_HEADER
        return [StartTLS()]

    def _on_sasl(self, elem: ET.Element) -> list[C2SEvent]:
        local = elem.tag.rpartition("}")[2]
        if self._authenticated or self.state is not State.NEGOTIATING:
            return [self._fail("policy-violation", "SASL is not possible now")]
        if local == "abort":
            return self._sasl_failure("aborted")
        if local == "auth":
            return self._on_auth(elem)
        if local == "response":
            if self._mechanism is None:
                return self._sasl_failure("malformed-request", "no exchange in progress")
            data = self._decode64(elem.text)
            if data is None:
                return self._sasl_failure("incorrect-encoding")
            return self._sasl_step(self._mechanism.receive(data))
        return [self._fail("unsupported-stanza-type", f"unexpected SASL element {local}")]

    def _on_auth(self, elem: ET.Element) -> list[C2SEvent]:
        if self.settings.tls_required and not self.tls_active:
            return self._sasl_failure("encryption-required")
        name = elem.get("mechanism", "")
        stream = self._sasl_stream
        provider = self._offered.get(name)
        if provider is None or stream is None:
            return self._sasl_failure("invalid-mechanism")
        try:
            mech = provider.create(stream)
        except ValueError:
            return self._sasl_failure("invalid-mechanism")
        self._mechanism = mech
        text = elem.text
        if text is None or not text.strip():
            initial: bytes | None = None  # no initial response
        else:
            initial = self._decode64(text)
            if initial is None:
                return self._sasl_failure("incorrect-encoding")
        return self._sasl_step(mech.receive(initial))

    @staticmethod
    def _decode64(text: str | None) -> bytes | None:
        text = (text or "").strip()
        if text == "=":
            return b""
        try:
            return base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            return None

    def _sasl_step(self, ev: object) -> list[C2SEvent]:
        """Translate one mechanism event into wire bytes and driver events."""
        if isinstance(ev, sasl.Challenge):
            self.state = State.NEGOTIATING
            self._out.append(encode_sasl("challenge", ev.data))
            return []
        if isinstance(ev, NeedCredential):
            if not ev.username:
                # No user yet (SASL EXTERNAL without an authzid): the source
                # is asked with an empty JID and decides who this is.
                self._identity_from_source = True
                self.state = State.WAIT_AUTH_RESULT
                return [CredentialRequested("", ev)]
            jid = self._user_jid(ev.username)
            if jid is None:
                return self._sasl_failure("not-authorized")
            if ev.authzid and ev.authzid != jid:
                return self._sasl_failure("invalid-authzid")
            self._auth_jid = jid
            self.state = State.WAIT_AUTH_RESULT
            return [CredentialRequested(jid, ev)]
        if isinstance(ev, sasl.Success):
            jid = self._auth_jid
            if jid is None and self._identity_from_source and ev.username:
                jid = self._user_jid(ev.username)
            mechanism = self._mechanism
            if jid is None or mechanism is None:
                # A mechanism that succeeds without naming a user it asked
                # about is broken: refuse rather than authenticate nobody.
                return self._sasl_failure("temporary-auth-failure")
            if self._refusal is not None:
                # The password was right; the directory says no (locked,
                # expired): now, and only now, the client may learn why.
                condition, text = self._refusal
                return self._sasl_failure(condition, text)
            self._out.append(encode_sasl("success", ev.additional_data))
            self._authenticated = True
            self._mechanism = None
            self._identity_from_source = False
            self.jid = parse_jid(jid)
            notice, self._notice = self._notice, None
            self._restart()
            return [Authenticated(self.jid, mechanism.name, notice)]
        if isinstance(ev, sasl.Failure):
            return self._sasl_failure(ev.condition, ev.text or "")
        raise LocalProtocolError(f"unknown SASL event {type(ev).__name__}")

    def _sasl_failure(self, condition: str, text: str = "") -> list[C2SEvent]:
        jid = self._auth_jid
        mechanism = self._mechanism.name if self._mechanism is not None else None
        self._mechanism = None
        self._auth_jid = None
        self._refusal = self._notice = None
        counted, self._counted = self._counted, False
        self._identity_from_source = False
        self.state = State.NEGOTIATING
        body = f"<{condition}/>"
        if text:
            # Texts may quote what the client or a certificate said.
            body += f"<text xml:lang='en'>{escape_text(text)}</text>"
        self._out.append(f"<failure xmlns='{SASL_NS}'>{body}</failure>".encode())
        failed = AuthFailed(jid, condition, mechanism, counted)
        if condition not in SERVER_SIDE_FAILURES:
            self.auth_failures += 1
            if self.auth_failures >= self.settings.max_auth_failures:
                # RFC 6120 §6.4.5: past the retries allowed, the stream ends.
                return [failed, self._fail("policy-violation",
                                           "too many authentication failures")]
        return [failed]

    def _user_jid(self, username: str) -> str | None:
        """The bare JID a SASL username names on this stream's domain."""
        try:
            if "@" in username:
                jid = parse_jid(username)
                if jid.domain != self.domain or jid.resource:
                    return None
                return str(jid.bare)
            return f"{prep_localpart(username)}@{self.domain}"
        except InvalidJID:
            return None

    # -- bind -----------------------------------------------------------------

    def _on_bind_phase_iq(self, iq: ET.Element) -> list[C2SEvent]:
        if iq.get("type") != "set" or len(iq) != 1:
            return [self._fail("not-authorized", "bind a resource first")]
        child = iq[0]
        if child.tag == f"{{{SESSION_NS}}}session":
            return [self._fail("not-authorized", "bind a resource first")]
        if child.tag != f"{{{BIND_NS}}}bind":
            return [self._fail("not-authorized", "bind a resource first")]
        res_elem = child.find(f"{{{BIND_NS}}}resource")
        resource: str | None = None
        if res_elem is not None and (res_elem.text or "").strip():
            try:
                resource = prep_resource(res_elem.text or "")
            except InvalidJID:
                # RFC 6120 §7.7.2.1: a resource that fails resourceprep.
                self._send_element(stanza_error(iq, "bad-request", "resource not allowed"))
                return []
        self._bind_iq = iq
        self.state = State.WAIT_BIND_RESULT
        return [BindRequested(resource)]

    def _stamp(self, elem: ET.Element) -> list[C2SEvent]:
        """RFC 6120 §8.1.2.1: the server stamps `from` with the full JID."""
        full = str(self.jid)
        given = elem.get("from")
        if given is not None and given != full:
            try:
                ok = parse_jid(given) in (self.jid, self.jid.bare)  # type: ignore[union-attr]
            except InvalidJID:
                ok = False
            if not ok:
                return [self._fail("invalid-from", "from does not match your JID")]
        elem.set("from", full)
        if (
            elem.tag.endswith("}iq")
            and len(elem) == 1
            and elem[0].tag == f"{{{SESSION_NS}}}session"
        ):
            # RFC 3921 §3: legacy session establishment; nothing left to do.
            if elem.get("type") == "set":
                self._send_element(
                    ET.Element(f"{{{CLIENT_NS}}}iq", {"type": "result", "id": elem.get("id", "")})
                )
                return []
        return [StanzaReceived(elem)]

    # -- endings ----------------------------------------------------------------

    def _on_close(self) -> StreamEnded:
        if not self._sent_close:
            self._ensure_header()
            self._out.extend(self.framing.close())
            self._sent_close = True
        return self._end(None, peer_closed=True)

    def _fail(self, condition: str, text: str = "") -> StreamEnded:
        if not self._sent_close:
            self._ensure_header()
            self._out.extend(self.framing.error(condition, text))
            self._sent_close = True
        return self._end(condition, peer_closed=False)

    def _end(self, condition: str | None, peer_closed: bool) -> StreamEnded:
        self.state = State.CLOSED
        return StreamEnded(condition, peer_closed)

    def _restart(self) -> None:
        self._parser = self._new_parser()
        self.stream_id = ""
        self.state = State.WAIT_HEADER

    def _new_parser(self) -> XMLStreamParser:
        return XMLStreamParser(self.settings.max_stanza_bytes, self.settings.max_depth)

    def _send_element(self, elem: ET.Element) -> None:
        self._out.append(self.framing.stanza(elem))
