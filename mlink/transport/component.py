"""One external component's connection (XEP-0114), from accept to close.

Drives `mlink.stream.component.ComponentStream` with a socket: a reader
task feeds it bytes (under the same limits as client streams: stanza size
and depth, a stanza rate that pauses reading and drops nothing, a read
timeout for a stanza left half-sent, the auth timeout for the handshake),
a writer task sends what is queued in one write per wake-up. Once the
handshake is right and no other connection holds the domain
(`ComponentTable.claim`), stanzas flow both ways: the component's into the
router, the router's to the component. Stanzas queued and never written
when the connection ends are answered `service-unavailable` to their
senders: none vanishes.
"""

from __future__ import annotations

import logging
import math
import xml.etree.ElementTree as ET
from typing import TYPE_CHECKING

import trio

from mlink.stream import component as xep0114
from mlink.transport.client import CONNECTION_SLOT
from mlink.transport.limits import TokenBucket
from mlink.util.outbuffer import OutputBuffer

if TYPE_CHECKING:
    from mlink.router.components import ComponentTable
    from mlink.server import Server

log = logging.getLogger(__name__)

# Bytes read per receive, as for client connections.
MAX_READ = 16 * 1024
# After our closing bytes are queued, how long they get before the socket is cut.
CLOSE_GRACE = 2.0


class ComponentConnection:
    """A component's connection; `deliver` is what the component table calls."""

    def __init__(self, server: Server, table: ComponentTable, stream: trio.abc.Stream) -> None:
        self.server = server
        self.table = table
        self.transport = stream
        config = server.config
        limits = config.limits
        # Secrets from the current configuration (a reload rotates them for
        # new connections), names from the start (routing knows those only).
        self.xmpp = xep0114.ComponentStream(
            {c.name: c.secret for c in config.components.components if c.name in table.domains},
            limits.max_stanza_bytes, limits.max_depth)
        self.out: OutputBuffer[ET.Element] = OutputBuffer(limits.max_output_bytes)
        self.domain: str | None = None  # once claimed
        self._closing = False
        self._scope = trio.CancelScope()
        # The c2s stanza rate applies (pausing reads, never dropping), with
        # the c2s exemption: a component on this machine (the default
        # address) is exempt while `exempt-loopback` is on.
        slot = self.slot = CONNECTION_SLOT.get()
        exempt = slot is None or slot.exempt
        self._bucket: TokenBucket | None = (
            TokenBucket(limits.stanza_rate, limits.stanza_burst, trio.current_time())
            if limits.stanza_rate > 0 and not exempt else None)
        self._rate_logged = False
        self._read_timeout = limits.read_timeout
        self._stall_deadline = math.inf
        sock = getattr(stream, "socket", None)
        try:
            peer = sock.getpeername() if sock is not None else None
        except OSError:
            peer = None
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else "?"

    # -- ComponentLink -------------------------------------------------------------

    def deliver(self, stanza: ET.Element) -> bool:
        """Queue `stanza` for the component; False when the connection is
        ending (the table then answers the sender). A component that stops
        reading past the output bound is ended with policy-violation."""
        if self._closing or self.xmpp.state is not xep0114.State.ESTABLISHED:
            return False
        self.xmpp.send_stanza(stanza)
        data = self.xmpp.data_to_send()
        if not self.out.fits(len(data)):
            log.warning("%s: component %s is not reading; ending it", self.peer, self.domain)
            self.kick("policy-violation", "output buffer full")
            return False
        kind = stanza.tag.rpartition("}")[2]
        self.out.push(data, stanza if kind in ("message", "iq") else None)
        return True

    def kick(self, condition: str, text: str = "") -> None:
        """End the stream with a stream error; its closing bytes get
        CLOSE_GRACE to leave (the writer ends the connection sooner once
        they are out), then the connection is cut whether or not the
        component reads."""
        if self._closing:
            return
        self.xmpp.close(condition, text)
        self._flush()
        self._end()
        self._scope.deadline = min(self._scope.deadline, trio.current_time() + CLOSE_GRACE)

    # -- tasks ------------------------------------------------------------------

    async def run(self) -> None:
        orphans: list[ET.Element] = []
        try:
            with self._scope:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._writer)
                    await self._read_handshake()
                    while not self._closing:
                        if not await self._read_once():
                            break
                    self._end()
                    with trio.move_on_after(CLOSE_GRACE):
                        await self.out.wait_drained()
                    nursery.cancel_scope.cancel()
        finally:
            self._end()
            orphans = self.out.discard()
            with trio.move_on_after(CLOSE_GRACE) as cleanup:
                cleanup.shield = True
                for stanza in orphans:
                    await self.server.router.bounce(stanza, "service-unavailable",
                                                    "the component went away")
                try:
                    await self.transport.aclose()
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                    pass

    def _end(self) -> None:
        """No more stanzas for this connection: the domain is free again."""
        self._closing = True
        if self.domain is not None:
            self.table.release(self.domain, self)
            log.info("%s: component %s disconnected", self.peer, self.domain)
            self.domain = None

    async def _read_handshake(self) -> None:
        with trio.move_on_after(self.server.config.limits.auth_timeout) as scope:
            while not self._closing and self.domain is None:
                if not await self._read_once():
                    return
        if scope.cancelled_caught and not self._closing:
            log.info("%s: component handshake timed out", self.peer)
            self.kick("connection-timeout", "handshake took too long")

    async def _read_once(self) -> bool:
        deadline = self._stall_deadline
        data: bytes | bytearray = b""
        try:
            with trio.move_on_at(deadline) as stalled:
                data = await self.transport.receive_some(MAX_READ)
            if stalled.cancelled_caught:
                self.kick("connection-timeout", "stanza not completed in time")
                return False
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            data = b""
        if not data:
            self._end()
            return False
        await self._handle(self.xmpp.receive_data(data))
        if self.xmpp.stanza_in_progress:
            if self._stall_deadline == math.inf:
                self._stall_deadline = trio.current_time() + self._read_timeout
        else:
            self._stall_deadline = math.inf
        return not self._closing

    async def _handle(self, events: list[xep0114.ComponentEvent]) -> None:
        for ev in events:
            self._flush()
            if isinstance(ev, xep0114.ComponentStanza):
                bucket = self._bucket
                if bucket is not None and not bucket.take():
                    wait = bucket.wait(trio.current_time())
                    if wait > 0:
                        if not self._rate_logged:
                            self._rate_logged = True
                            log.info("%s: component %s is over the stanza rate; reading "
                                     "paused", self.peer, self.domain)
                        await trio.sleep(wait)
                await self.server.router.route(ev.element)
            elif isinstance(ev, xep0114.HandshakeVerified):
                if self.table.claim(ev.domain, self):
                    self.domain = ev.domain
                    self.xmpp.accept()
                    if self.slot is not None:
                        # No longer one of the address's unauthenticated connections.
                        self.slot.authenticated()
                    log.info("%s: component %s connected", self.peer, ev.domain)
                else:
                    log.info("%s: component %s refused: connected already", self.peer,
                             ev.domain)
                    self.xmpp.refuse("conflict", "this component is connected already")
                    self._end()
            elif isinstance(ev, xep0114.ComponentEnded):
                if ev.condition is not None:
                    log.info("%s: component stream of %s ended: %s", self.peer,
                             self.domain or self.xmpp.domain or "?", ev.condition)
                self._end()
        self._flush()

    def _flush(self) -> None:
        data = self.xmpp.data_to_send()
        if data:
            self.out.push(data)

    async def _writer(self) -> None:
        out = self.out
        while True:
            await out.wait_ready()
            batch = out.take()
            size = sum(len(chunk) for chunk in batch)
            try:
                await self.transport.send_all(b"".join(batch))
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                self._end()
                self._scope.cancel()
                return
            out.written_now(size)
            if self._closing and not out.pending:
                # Everything up to our closing bytes is out: stop reading.
                self._scope.cancel()
                return
