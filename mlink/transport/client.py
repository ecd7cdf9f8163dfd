"""One client connection: Trio glue around the sans-IO `C2SStream`.

Two tasks per connection, no more: the reader feeds bytes to the stream
machine and acts on its events; the writer sends everything queued for the
client in one `send_all` per wake-up (write coalescing), so a burst of
stanzas costs one TLS record, not one each. On a plain TCP socket with
nothing queued and no send in progress, output is written at once
(write-through, Prosody's "opportunistic writes"): no writer wake-up per
stanza; only what the socket does not take is left to the writer.
"""

from __future__ import annotations

import contextvars
import logging
import math
import os
import xml.etree.ElementTree as ET
from typing import TYPE_CHECKING

import trio

from mlink.jid import JID
from mlink.router.sessions import OutputFilter, SessionInfo, StreamTap
from mlink.sasl.registry import UNAVAILABLE
from mlink.stream import c2s
from mlink.stream.errors import stanza_error
from mlink.transport.limits import ConnectionSlot, TokenBucket
from mlink.util.counters import stanza_kind
from mlink.util.outbuffer import OutputBuffer
from mlink.xml.serialize import WireStanza

if TYPE_CHECKING:
    from mlink.server import Server

log = logging.getLogger(__name__)

# One read at most this many bytes: small enough that the stanza-size limit
# is enforced within one read, large enough for a burst of stanzas.
MAX_READ = 16 * 1024
# How long a TLS handshake may take before the connection is dropped.
TLS_HANDSHAKE_TIMEOUT = 30.0
# After we send our closing tag, how long we wait for the peer's before
# closing the socket anyway (RFC 6120 §4.4 asks us to wait "a reasonable time").
CLOSE_GRACE = 2.0
# SASL conditions that count as a failed guess for the authentication delays
# (a mechanism the client does not manage, or an abort, guesses nothing).
GUESS_FAILURES = frozenset({"not-authorized", "invalid-authzid"})

# The per-address slot of the connection being set up, set by the server's
# accept guard around the listener's handler (`Server._admit`): the
# connection is created further down that task (for WebSocket, after the
# HTTP upgrade), so a context variable reaches it without threading the slot
# through every transport.
CONNECTION_SLOT: contextvars.ContextVar[ConnectionSlot | None] = contextvars.ContextVar(
    "mlink_connection_slot", default=None)


class BindRefused(Exception):
    """A resource bind the server refuses: the stanza error to answer."""

    def __init__(self, condition: str, text: str) -> None:
        super().__init__(text)
        self.condition = condition
        self.text = text


class ClientConnection:
    """A connection from accept to close; becomes a `Session` once bound."""

    # Output is a byte stream: pieces queued together may be written as one.
    joins_output = True

    def __init__(self, server: Server, stream: trio.abc.Stream, direct_tls: bool) -> None:
        self.server = server
        self.transport: trio.abc.Stream = stream
        self.direct_tls = direct_tls
        settings = server.stream_settings(tls_active=direct_tls)
        self.xmpp = c2s.C2SStream(settings)
        self.info = SessionInfo(JID("", "", ""))
        # Stanzas queued for the client; message and iq chunks carry their
        # stanza, so a session cut before they are written can hand them
        # back to the router (offline storage, another resource, a bounce).
        self.out: OutputBuffer[ET.Element | WireStanza] = OutputBuffer(
            server.config.limits.max_output_bytes)
        self._closing = False
        self._sending = False  # the writer is in `send_all`
        self._through_batch = -1  # the routing batch of the last write-through
        self._bound = False
        # Set by Server.session_ended: the session's end was announced.
        self.ended = False
        self._kicked = trio.Event()
        # Stanzas taken back from a cut session, routed again at its end.
        self._orphans: list[ET.Element | WireStanza] = []
        # What the directory had to say at login (password expiry), shown
        # as a headline once the session is bound.
        self._login_notice: str | None = None
        self._scope = trio.CancelScope()
        # A module's view of this session's stanzas (stream management),
        # and the session's life past its connection (`StreamTap.lost`):
        # `_lost` when the connection dropped without a close or an error
        # of ours; `_held` while the session outlives it; `_taken` once
        # another stream carries the session on.
        self.tap: StreamTap | None = None
        # Modules' holds on output (client state indication), in order.
        self.filters: list[OutputFilter] = []
        self._lost = False
        self._held = False
        self._taken = False
        self._hold_done = trio.Event()
        self.peer = _peer_name(stream)
        # Where the per-address limits count this connection (None: not
        # admitted through a listener, e.g. in tests).
        self.slot = CONNECTION_SLOT.get()
        limits = server.config.limits
        exempt = self.slot is None or self.slot.exempt
        # The stanza rate (None: unlimited or exempt) and the partial-stanza
        # deadline (inf: no stanza in progress).
        self._bucket: TokenBucket | None = (
            TokenBucket(limits.stanza_rate, limits.stanza_burst, trio.current_time())
            if limits.stanza_rate > 0 and not exempt else None)
        self._read_timeout = limits.read_timeout
        self._stall_deadline = math.inf
        self._rate_logged = False

    # -- Session interface (used by the router, never awaits) --------------------

    def deliver(self, stanza: ET.Element, keep: bool = True, filtered: bool = True) -> bool:
        """Queue `stanza`; False when the session is ending (the caller
        treats it as gone). With `keep`, a message or iq that is never
        written is routed again when the session ends. A module's output
        filter may hold it first (`filtered`: not for what it releases)."""
        if filtered and self.filters and not self._closing:
            for output_filter in self.filters:
                if output_filter.take(stanza):
                    return True
        tap = self.tap
        if self._held:
            # No connection: the tap keeps it for the resumed stream, and
            # hands it back to be routed again if the session expires.
            tap.sent(stanza)  # type: ignore[union-attr]
            return True
        kind = stanza.tag
        if self._closing:
            return self._take_while_closing(stanza, keep and (kind == _MESSAGE or kind == _IQ))
        self.server.counters.stanzas_out[stanza_kind(kind)] += 1
        item = stanza if keep and (kind == _MESSAGE or kind == _IQ) else None
        data = self.xmpp.framing.stanza(stanza)
        written: ET.Element | None = stanza
        if len(data) > self.out.limit:
            data, written = self._too_large(stanza, data)
            item = None
        self._queue(data, item)
        if tap is not None and written is not None:
            # After it is queued: an ack request follows it. What the
            # client gets is counted (the error, or nothing), not what
            # was too large to send: its h would never cover that.
            tap.sent(written)
        return True

    @property
    def wants_tree(self) -> bool:
        """`deliver_wire` would parse (see there): a fan-out gives such a
        stream a copy of the one tree it parsed for all instead."""
        return bool(self.filters) or self.tap is not None or self._held

    def deliver_wire(self, stanza: WireStanza, keep: bool = True) -> bool:
        """`deliver` for a stanza kept as bytes: no tree, no serialisation.
        A stream whose modules watch its output (stream management counts
        and keeps every stanza, client state indication holds some) or
        that is held for resumption takes the tree path, so none of that
        is bypassed."""
        if self.filters or self.tap is not None or self._held:
            return self.deliver(stanza.element(), keep)
        if self._closing:
            kind = stanza.kind
            return self._take_while_closing(stanza, keep and (kind == "message" or kind == "iq"))
        data = self.xmpp.framing.wire(stanza)
        if len(data) > self.out.limit:
            return self.deliver(stanza.element(), keep)
        kind = stanza.kind
        self.server.counters.stanzas_out[kind] += 1
        self._queue(data, stanza if keep and (kind == "message" or kind == "iq") else None)
        return True

    def _take_while_closing(self, stanza: ET.Element | WireStanza, keep: bool) -> bool:
        """A stanza for a session whose connection is closing but that is
        still bound (its end not yet announced): nothing more is written,
        but what is handed over is not lost either. Stream management's tap
        keeps it (for a resumed stream, or to route it again at the end, as
        for every stanza it kept); else a message or iq (`keep`) is routed
        again with the unwritten output. False (the caller treats the
        session as gone) only for what nobody would keep."""
        if self.ended:
            return False
        tap = self.tap
        if tap is not None:
            tap.sent(stanza.element() if isinstance(stanza, WireStanza) else stanza)
            return True
        if keep:
            self._orphans.append(stanza)
            return True
        return False

    def _too_large(self, stanza: ET.Element, data: bytes) -> tuple[bytes, ET.Element | None]:
        """A single stanza larger than the output bound would end the
        session every time (a huge roster, a big stored element): a result
        becomes `resource-constraint` (RFC 6120 §8.3.3.18), anything else
        is dropped with a log line (nothing a client sent can be this big).
        The bytes to write instead, and the stanza they are (None: none)."""
        log.warning("%s: %d-byte %s for %s exceeds the output bound", self.peer, len(data),
                    stanza.tag.rpartition("}")[2], self.info.jid)
        if stanza.tag == _IQ and stanza.get("type") == "result":
            # The error answers the request the result was for: addressed as
            # the request would be, so `stanza_error` swaps it back.
            request = ET.Element(_IQ, {"type": "get", "id": stanza.get("id", "")})
            if (to := stanza.get("to")) is not None:
                request.set("from", to)
            if (sender := stanza.get("from")) is not None:
                request.set("to", sender)
            error = stanza_error(request, "resource-constraint",
                                 "the result is too large to send")
            return self.xmpp.framing.stanza(error), error
        return b"", None

    def deliver_tracked(self, stanza: ET.Element) -> int | None:
        """Queue `stanza`, never to be routed again; the output mark it is
        written by (see `written`), or None when the session is ending."""
        if self._held or self._closing or not self.deliver(stanza, keep=False):
            return None
        return self.out.mark()

    async def written(self, mark: int) -> bool:
        """Wait until the output reaches `mark`: True once written, False
        when the session ends first."""
        while self.out.written < mark:
            if self._closing and not self._sending and not self.out.pending:
                return False
            await self.out.wait_progress()
        return True

    def is_written(self, mark: int) -> bool:
        return self.out.written >= mark

    def kick(self, condition: str, text: str = "") -> None:
        """End the session with a stream error, at once as far as anyone
        else can tell: it leaves the session table (and the other shards'
        tables) now, so stanzas for it take the "no such resource" path;
        its closing bytes get CLOSE_GRACE to leave, then the connection is
        cut whether or not the client reads."""
        if self._held:
            self._hold_done.set()  # a held session ends at once, as a live one would
            return
        if self._closing:
            return
        self.xmpp.close(condition, text)
        self._flush_machine()
        self._closing = True
        if self._bound:
            self.server.detach_session(self)
        self._kicked.set()

    # -- tasks ----------------------------------------------------------------

    async def run(self) -> None:
        try:
            with self._scope:
                try:
                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(self._writer)
                        nursery.start_soon(self._close_when_kicked)
                        try:
                            if not self.direct_tls or await self._start_tls():
                                await self._read_until_authenticated()
                                await self._read_loop()
                        except c2s.LocalProtocolError:
                            # Our bug, not the client's: say so on the wire once.
                            log.exception("%s: stream machine misused", self.peer)
                            self.kick("internal-server-error")
                        await self._finish()
                        nursery.cancel_scope.cancel()
                finally:
                    self._orphans.extend(self.out.discard())
                    self._release_filters()
            if self._lost and self._bound and self.tap is not None and not self.ended:
                await self._hold()
        finally:
            if self.tap is not None and not self._taken:
                # Everything the client did not confirm, written or not (a
                # superset of the unwritten orphans, in order).
                self._orphans = [*self.tap.unacked()]
            if self._bound:
                self._bound = False
                await self.server.session_ended(self)
            await self._route_orphans()
            with trio.move_on_after(CLOSE_GRACE) as cleanup:
                cleanup.shield = True
                try:
                    await self.transport.aclose()
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                    pass

    async def _hold(self) -> None:
        """The connection dropped; if the tap keeps the session, it stays
        bound (stanzas go to the tap) until resumed elsewhere or given up."""
        tap = self.tap
        if tap is None:
            return
        self._held = True
        try:
            if not tap.lost(_Hold(self)):
                return
            log.info("%s: connection lost; session %s held", self.peer, self.info.jid)
            await self._hold_done.wait()
        finally:
            self._held = False

    # -- StreamControl (mlink.router.sessions), for nonza handlers -------------

    @property
    def authenticated_jid(self) -> JID | None:
        return self.xmpp.jid if self.xmpp.authenticated else None

    @property
    def bound(self) -> bool:
        return self._bound

    def send_nonza(self, element: ET.Element) -> None:
        if not self._closing:
            self._queue(self.xmpp.framing.stanza(element))

    def set_tap(self, tap: StreamTap | None) -> None:
        self.tap = tap

    def add_filter(self, output_filter: OutputFilter) -> None:
        if output_filter not in self.filters:
            self.filters.append(output_filter)

    def remove_filter(self, output_filter: OutputFilter) -> None:
        if output_filter in self.filters:
            self.filters.remove(output_filter)

    def send_stanza(self, stanza: ET.Element) -> bool:
        return self.deliver(stanza, filtered=False)

    def _release_filters(self) -> None:
        """The connection is gone: what filters hold goes where the rest of
        the session's output goes (the tap, to be kept for a resumed stream
        or routed again; else routed again with the unwritten stanzas)."""
        filters, self.filters = self.filters, []
        for output_filter in filters:
            for stanza in output_filter.release():
                if self.tap is not None:
                    self.tap.sent(stanza)
                else:
                    self._orphans.append(stanza)

    def drop(self) -> None:
        if not self._closing:
            self._lost = True
        self._closing = True
        self._scope.cancel()

    def resume(self, info: SessionInfo, tap: StreamTap | None) -> None:
        if self._bound or self._closing:
            raise c2s.LocalProtocolError("resume on a bound or closing stream")
        self.xmpp.session_resumed(info.jid)
        self.server.adopt_session(self, info)
        self._bound = True
        self.tap = tap
        log.info("%s: resumed %s", self.peer, info.jid)

    async def _read_until_authenticated(self) -> None:
        """The unauthenticated phase is bounded by the auth timeout."""
        with trio.move_on_after(self.server.config.limits.auth_timeout) as scope:
            while not self._closing and not self._bound:
                if not await self._read_once():
                    return
        if scope.cancelled_caught and not self._closing:
            log.info("%s: closing unauthenticated connection: timeout", self.peer)
            self.kick("connection-timeout", "authentication took too long")

    async def _read_loop(self) -> None:
        while not self._closing:
            if not await self._read_once():
                return

    async def _read_once(self) -> bool:
        """Read and handle one chunk; False when the peer is gone or a
        stanza it started stalled past the read timeout."""
        deadline = self._stall_deadline
        try:
            if deadline == math.inf:
                data = await self.transport.receive_some(MAX_READ)
            else:
                data = b""
                with trio.move_on_at(deadline) as stalled:
                    data = await self.transport.receive_some(MAX_READ)
                if stalled.cancelled_caught:
                    log.info("%s: closing %s: a stanza stalled for %.0f s", self.peer,
                             self.info.jid or "unauthenticated stream", self._read_timeout)
                    self.kick("connection-timeout", "stanza not completed in time")
                    return False
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            data = b""
        if not data:
            if not self._closing:
                self._lost = True  # gone without a closing tag
            self._closing = True
            return False
        await self._handle(self.xmpp.receive_data(data))
        # Only a stanza started and not finished is timed, from the end of
        # the read that left it unfinished (after any rate-limit pause, which
        # is ours, not the client's); an idle stream never is.
        if self.xmpp.stanza_in_progress:
            if self._stall_deadline == math.inf:
                self._stall_deadline = trio.current_time() + self._read_timeout
        else:
            self._stall_deadline = math.inf
        return True

    async def _send(self, messages: list[bytes]) -> None:
        """Write queued output: one `send_all` for the whole batch."""
        await self.transport.send_all(b"".join(messages))

    async def _handle(self, events: list[c2s.C2SEvent]) -> None:
        for ev in events:
            if isinstance(ev, c2s.StanzaReceived):
                self._flush_machine()
                self.server.counters.stanzas_in[stanza_kind(ev.element.tag)] += 1
                if self.tap is not None:
                    self.tap.received(ev.element)
                bucket = self._bucket
                if bucket is not None and not bucket.take():
                    await self._over_rate(bucket)
                await self.server.router.route_from_client(self.info, ev.element)
                continue
            self._flush_machine()
            if isinstance(ev, c2s.StartTLS):
                await self.out.wait_drained()
                if not await self._start_tls():
                    return
            elif isinstance(ev, c2s.CredentialRequested):
                await self._answer_credential(ev)
            elif isinstance(ev, c2s.NonzaReceived):
                await self.server.nonza_received(self.info, ev.element, self)
            elif isinstance(ev, c2s.BindRequested):
                await self._bind(ev)
            elif isinstance(ev, c2s.AuthFailed):
                log.info("%s: authentication failed for %s with %s: %s", self.peer,
                         ev.jid or "?", ev.mechanism or "-", ev.condition)
                self.server.counters.login(ev.mechanism, False)
                if ev.condition in GUESS_FAILURES:
                    self.server.auth_throttle.failed(self._throttle_address(), ev.jid,
                                                     trio.current_time())
                await self.server.auth_failed(ev.jid, ev.mechanism, ev.condition, ev.counted)
            elif isinstance(ev, c2s.Authenticated):
                log.info("%s: authenticated %s with %s", self.peer, ev.jid, ev.mechanism)
                self._login_notice = ev.notice
                self.server.counters.login(ev.mechanism, True)
                self.server.auth_throttle.succeeded(str(ev.jid))
                if self.slot is not None:
                    self.slot.authenticated()
            elif isinstance(ev, c2s.StreamEnded):
                self._closing = True
        self._flush_machine()

    async def _answer_credential(self, ev: c2s.CredentialRequested) -> None:
        """Ask the source registered for the mechanism's request; a missing
        source or a source that crashes answers `temporary-auth-failure`."""
        request = ev.request
        delay = self.server.auth_throttle.delay(self._throttle_address(), ev.jid,
                                                trio.current_time())
        if delay > 0:
            # Before the check, whatever its outcome: see AuthThrottle.
            log.info("%s: authentication for %s delayed %.1f s after repeated failures",
                     self.peer, ev.jid, delay)
            await trio.sleep(delay)
        source = self.server.sasl.source(request.kind)
        answer: object = UNAVAILABLE
        if source is None:
            log.error("%s: no credential source for %r", self.peer, request.kind)
        else:
            try:
                answer = await source(ev.jid, request)
            except Exception:
                log.exception("%s: credential source %r failed for %s", self.peer,
                              request.kind, ev.jid)
        await self._handle(self.xmpp.credential_provided(answer))

    async def _bind(self, ev: c2s.BindRequested) -> None:
        if self.xmpp.jid is None:
            raise c2s.LocalProtocolError("bind requested before authentication")
        try:
            full = await self.server.bind_session(self, self.xmpp.jid.bare, ev.resource)
        except BindRefused as exc:
            log.info("%s: bind refused for %s: %s", self.peer, self.xmpp.jid, exc.text)
            self.xmpp.bind_done(None, exc.condition, exc.text)
            return
        self._bound = True
        self.xmpp.bind_done(full.resource)
        log.info("%s: bound %s", self.peer, full)
        if self._login_notice:
            self._flush_machine()
            notice = self._login_notice
            page = self.server.config.console.self_service_url
            if page:  # the password expiry warning links to self-service
                notice = f"{notice} Change it at {page}"
            self.deliver(server_headline(full, notice), keep=False)

    async def _over_rate(self, bucket: TokenBucket) -> None:
        """The session sent faster than its stanza rate: stop reading (this
        is the reader task) until the rate is met again, as Prosody's
        mod_limits pauses the connection. Nothing is dropped; the client's
        own socket buffer holds what it sends meanwhile."""
        wait = bucket.wait(trio.current_time())
        if wait <= 0:
            return
        if not self._rate_logged:
            self._rate_logged = True
            log.info("%s: %s is over the stanza rate; reading paused", self.peer,
                     self.info.jid)
        await trio.sleep(wait)

    def _throttle_address(self) -> str | None:
        """The address the authentication delays count (None when exempt)."""
        slot = self.slot
        return None if slot is None or slot.exempt else slot.key

    async def _start_tls(self) -> bool:
        tls = self.server.tls
        if tls is None:
            raise c2s.LocalProtocolError("STARTTLS without a certificate")
        ssl_stream = trio.SSLStream(
            self.transport, tls.context, server_side=True, https_compatible=False
        )
        try:
            with trio.fail_after(TLS_HANDSHAKE_TIMEOUT):
                await ssl_stream.do_handshake()
        except (trio.TooSlowError, trio.BrokenResourceError, OSError) as exc:
            log.info("%s: TLS handshake failed: %s", self.peer, exc)
            self._closing = True
            return False
        self.transport = ssl_stream
        # trio's SSLStream does not forward the SSLObject; see tls_exporter.
        ssl_object = ssl_stream._ssl_object
        self.xmpp.tls_started(tls.channel_binding(ssl_object),
                              ssl_object.getpeercert(binary_form=True))
        return True

    async def _finish(self) -> None:
        """Flush the last bytes, and give the peer time for its closing tag."""
        self._flush_machine()
        with trio.move_on_after(CLOSE_GRACE):
            await self.out.wait_drained()

    async def _close_when_kicked(self) -> None:
        """A kicked session's bytes get CLOSE_GRACE; then the connection is
        cut, even if the writer is stuck on a client that stopped reading."""
        await self._kicked.wait()
        with trio.move_on_after(CLOSE_GRACE):
            await self.out.wait_drained()
            while self._sending:
                await self.out.wait_progress()
            return
        log.info("%s: closing bytes not taken within %.0f s; cutting", self.peer, CLOSE_GRACE)
        self._scope.cancel()

    async def _route_orphans(self) -> None:
        """Stanzas accepted for this session and never written go where
        the RFC sends a stanza for a resource that is not there (RFC 6121
        §8.5.3.2): another resource, offline storage, or a bounce."""
        orphans, self._orphans = self._orphans, []
        if not orphans:
            return
        log.info("%s: %d stanza(s) not written to %s routed again", self.peer, len(orphans),
                 self.info.jid)
        # By the server's task, to the end (a session may leave a thousand
        # unacknowledged stanzas: no time limit of this connection's may cut
        # them short; only shutdown bounds it, and logs what was left).
        with trio.CancelScope(shield=True):
            await self.server.reroute_later(self.info.jid, orphans)

    # -- writing --------------------------------------------------------------

    def _flush_machine(self) -> None:
        """Queue what the stream machine has to say. On a byte stream its
        pieces (a stream header and its features, a SASL success, several
        answers to pipelined stanzas) go as one write: one system call, and
        on TLS one record, instead of one each; a WebSocket keeps one
        message per element (RFC 7395 §3.4)."""
        messages = self.xmpp.messages_to_send()
        if len(messages) > 1 and self.joins_output:
            self._queue(b"".join(messages))
            return
        for message in messages:
            self._queue(message)

    def _queue(self, data: bytes, item: ET.Element | WireStanza | None = None) -> None:
        out = self.out
        if (not out.pending and not self._sending and type(self.transport) is trio.SocketStream
                and self._through_batch != (batch := self.server.router.current_batch())):
            # Write-through: nothing queued, nothing being written, and not
            # the second stanza of a routing batch (`Router.current_batch`).
            self._through_batch = batch or -1
            fd = self.transport.socket.fileno()
            if fd >= 0 and data:
                try:
                    sent = os.write(fd, data)
                except OSError:
                    sent = 0  # full (or broken: the writer finds out)
                out.note_written_through(sent)
                if sent == len(data):
                    return
                data = data[sent:]
        if not out.fits(len(data)) and not self._closing:
            log.warning("%s: %s is not reading; closing", self.peer, self.info.jid)
            out.push(data, item)
            self._orphans.extend(out.discard())
            self.kick("policy-violation", "too much unread data")
            return
        out.push(data, item)

    async def _writer(self) -> None:
        out = self.out
        while True:
            await out.wait_ready()
            batch = out.take()
            size = sum(len(chunk) for chunk in batch)
            self._sending = True
            try:
                await self._send(batch)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                if not self._closing:
                    self._lost = True
                self._closing = True
                self._scope.cancel()
                return
            finally:
                self._sending = False
            out.written_now(size)
            if not out.pending and self._closing:
                # Everything up to the closing tag is out: stop reading.
                self._scope.cancel()
                return


class _Hold:
    """A held session's handle for the module that keeps it (`SessionHold`)."""

    __slots__ = ("_conn",)

    def __init__(self, conn: ClientConnection) -> None:
        self._conn = conn

    @property
    def info(self) -> SessionInfo:
        return self._conn.info

    def taken(self, moving_to: int | None = None) -> None:
        conn = self._conn
        if not conn._held:
            return
        conn._taken = True
        conn.server.detach_session(conn, moving_to)
        conn._bound = False
        conn.ended = True
        conn.tap = None
        conn._orphans = []
        conn._hold_done.set()

    def end(self) -> None:
        self._conn._hold_done.set()


_MESSAGE = "{jabber:client}message"
_IQ = "{jabber:client}iq"


def server_headline(to: JID, text: str) -> ET.Element:
    """A headline from the server to one session (RFC 6121 §5.2.2)."""
    message = ET.Element(_MESSAGE, {"type": "headline", "from": to.domain, "to": str(to)})
    ET.SubElement(message, "{jabber:client}body").text = text
    return message


def _peer_name(stream: trio.abc.Stream) -> str:
    """"address:port" of the peer, for log lines about this connection."""
    sock = getattr(stream, "socket", None)
    try:
        peer = sock.getpeername() if sock is not None else None
    except OSError:
        peer = None
    if isinstance(peer, tuple) and len(peer) >= 2:
        return f"[{peer[0]}]:{peer[1]}" if ":" in str(peer[0]) else f"{peer[0]}:{peer[1]}"
    return "?"
