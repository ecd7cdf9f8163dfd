"""One shard's view of the others: the global session table and delivery
across the bus.

Every shard announces its sessions (SESSION_UP on bind and whenever what
routing needs of them changes: priority, availability, presence, roster
interest, module-declared fields; SESSION_DOWN when they end), so any shard resolves any
local-domain JID without asking. A stanza for a session elsewhere crosses
the bus once; deliveries made while routing one stanza are grouped per
destination shard and identical payload, so a presence broadcast to many
contacts costs one FANOUT frame per shard, not one frame per contact.

Decisions about a session are made on the shard that holds it. Presence
to a bare JID is delivered on each shard to that shard's own available
sessions: the sender's shard delivers locally and sends the stanza, with
the bare JID as recipient, to every other shard, which delivers it to its
own available sessions when the frame arrives. Whatever the order in which
two users on two shards log in, each one's broadcast meets the other's
session in its true state (the race that a replicated "available" flag
lost). Probes are answered the same way (`Module.send_bus`, presence).

Objects that must live in one place (a room, a resumption token) are
homed by `owner(key)`: a stable hash of the key over the configured shard
count, the same on every shard.

When a peer shard dies, every shard drops its sessions; the lowest-numbered
live shard then announces their end (`session/closed`), which sends the
unavailable presence their contacts would have got at logout.
"""

from __future__ import annotations

import logging
import time
import xml.etree.ElementTree as ET
import zlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

from mlink.jid import JID, InvalidJID, parse_jid
from mlink.router.fields import field_registry
from mlink.router.index import JidIndex
from mlink.router.sessions import Connection, SessionInfo
from mlink.shard import frames
from mlink.shard.bus import Bus
from mlink.shard.frames import Frame, FrameType, SessionEntry
from mlink.stream.errors import stanza_error
from mlink.xml.serialize import CLIENT_NS, Shared, WireStanza, serialize

if TYPE_CHECKING:
    from mlink.server import Server

log = logging.getLogger(__name__)

# How long a shard passes on stanzas for a session resumed on another
# shard, at most (normally until that shard's SESSION_UP arrives).
MOVED_SECONDS = 30.0

_WRAP_OPEN = f"<s xmlns='{CLIENT_NS}'>".encode()
_WRAP_CLOSE = b"</s>"


def parse_stanza(data: bytes) -> ET.Element:
    """A stanza serialised by another shard (trusted, already validated)."""
    return ET.fromstring(_WRAP_OPEN + data + _WRAP_CLOSE)[0]


@dataclass(slots=True)
class RemoteSession:
    shard: int
    session_id: int
    info: SessionInfo


class Cluster:
    """The bus handler of a shard, and the router's window on other shards."""

    def __init__(self, server: Server, bus: Bus) -> None:
        self.server = server
        self.bus = bus
        self.shard = bus.shard
        self._remote: JidIndex[RemoteSession] = JidIndex()
        # What each local session last announced, to send only changes.
        self._announced: dict[int, tuple[object, ...]] = {}
        # Deliveries waiting for the end of the current routing step:
        # (shard, payload bytes) -> recipients.
        self._pending: dict[tuple[int, bytes], list[str]] = {}
        # Sessions resumed from here on another shard (XEP-0198), for a
        # while: stanzas still reaching this shard for them are passed on.
        self._moved: dict[JID, tuple[int, float, SessionInfo]] = {}
        # Sessions being resumed here from another shard, not yet bound:
        # what arrives for them meanwhile, in order (`arrived`).
        self._expected: dict[JID, list[ET.Element]] = {}
        bus.handler = self

    # -- the router's questions -------------------------------------------------

    def resources(self, bare: JID) -> list[SessionInfo]:
        found = [r.info for r in self._remote.resources(bare).values()]
        if self._moved:  # on their way to another shard: still there
            found += [m[2] for full, m in self._moved.items() if full.bare == bare]
        return found

    def count_of_user(self, bare: JID) -> int:
        """len(resources(bare)), without building the list."""
        count = len(self._remote.resources(bare))
        if self._moved:
            count += sum(1 for full in self._moved if full.bare == bare)
        return count

    def session(self, full: JID) -> SessionInfo | None:
        remote = self._remote.get(full)
        if remote is not None:
            return remote.info
        moved = self._moved.get(full)
        return moved[2] if moved is not None else None

    def online(self, bare: JID) -> bool:
        return self._remote.has_user(bare)

    def owner(self, key: str) -> int:
        """The shard that owns `key`: CRC-32 of its UTF-8 bytes modulo the
        shard count (stable across processes and restarts, unlike hash())."""
        return zlib.crc32(key.encode("utf-8")) % max(1, self.bus.shards)

    def send_module(self, channel: str, payload: bytes, shard: int | None) -> bool:
        """A module's bytes to the same module on `shard` (None: all others);
        whether the bus took them (False: the peer is down or its buffer full)."""
        frame = Frame(FrameType.MODULE, frames.encode_module(channel, payload))
        if shard is None:
            return self.bus.broadcast(frame) > 0
        if shard != self.shard:
            return self.bus.send(shard, frame)
        return False

    def deliver_to_available(self, bare: JID, stanza: ET.Element) -> None:
        """Queue `stanza` for the available sessions of `bare` on every
        other shard, each shard deciding for its own sessions on arrival."""
        for shard in self.bus.peers:
            self._queue(shard, str(bare), stanza)

    def deliver(self, full: JID, stanza: ET.Element) -> bool:
        """Queue `stanza` for a session on another shard; grouped with the
        same payload for the same shard until `flush`."""
        remote = self._remote.get(full)
        if remote is not None:
            self._queue(remote.shard, str(full), stanza)
            return True
        waiting = self._expected.get(full)
        if waiting is not None:
            waiting.append(stanza)
            return True
        moved = self._moved.get(full)
        if moved is not None:
            self._queue(moved[0], str(full), stanza)
            return True
        return False

    # -- a session moving between shards (stream management resumption) --------

    def moved(self, info: SessionInfo, shard: int) -> None:
        """The session `info` left this shard for `shard`, unannounced: until
        that shard announces it, what still comes here for it (frames on
        their way, other shards' replicas, local deliveries) goes there. If
        it never does within MOVED_SECONDS (the resume failed there), the
        session's end is announced from here after all (`_expire_moved`)."""
        self._moved[info.jid] = (shard, time.monotonic() + MOVED_SECONDS, info)

    def _expire_moved(self) -> None:
        now = time.monotonic()
        for full, (_shard, until, info) in list(self._moved.items()):
            if until <= now:
                del self._moved[full]
                self.announce_down(info)

    def drop_replica(self, full: JID) -> None:
        """Forget the replica of `full` whatever its session id (the session
        is being bound here, moved from the replica's shard)."""
        if self._remote.get(full) is not None:
            self._remote.remove(full)

    def expect(self, full: JID) -> None:
        """The session `full` is about to be bound here (its state is on
        its way): keep what arrives for it until `arrived`. The replica
        pointing at the shard it comes from goes (that shard passes on
        to here: no ping-pong)."""
        self.drop_replica(full)
        self._expected.setdefault(full, [])

    def arrived(self, full: JID) -> list[ET.Element]:
        """What was kept for `full` since `expect`, in order (the session
        is bound now, or will not be: the caller delivers or routes it)."""
        return self._expected.pop(full, [])

    def _queue(self, shard: int, target: str, stanza: ET.Element) -> None:
        to = stanza.attrib.pop("to", None)
        try:
            payload = serialize(stanza)
        finally:
            if to is not None:
                stanza.set("to", to)
        # The receiver looks the session up by `target` (a full JID, or a
        # bare JID: that user's available sessions there) but must deliver
        # the stanza with the `to` it had (a bare JID stays bare, RFC 6121
        # §3.1.2): both travel in one recipient entry, NUL-separated (XML
        # has no NUL, so no JID contains one).
        if to is not None and to != target:
            target = f"{target}\0{to}"
        self._pending.setdefault((shard, payload), []).append(target)

    def flush(self) -> None:
        """Send what routing one stanza queued: one frame per shard and payload."""
        if self._moved:
            self._expire_moved()
        if not self._pending:
            return
        pending, self._pending = self._pending, {}
        for (shard, payload), recipients in pending.items():
            if len(recipients) == 1:
                data = frames.encode_stanza(recipients[0], payload)
                self.bus.send(shard, Frame(FrameType.STANZA, data))
                continue
            for chunk in frames.encode_fanouts(payload, recipients):
                self.bus.send(shard, Frame(FrameType.FANOUT, chunk))

    # -- announcing local sessions ------------------------------------------------

    def announce(self, info: SessionInfo) -> None:
        """SESSION_UP for a local session when what others route by changed."""
        fields = field_registry.encode(info)
        snapshot = (info.priority, info.presence, info.interested, tuple(fields))
        if self._announced.get(info.session_id) == snapshot:
            return
        self._announced[info.session_id] = snapshot
        entry = _entry(info, fields)
        self.bus.broadcast(Frame(FrameType.SESSION_UP, frames.encode_session_up(entry)))

    def announce_down(self, info: SessionInfo) -> None:
        self._announced.pop(info.session_id, None)
        payload = frames.encode_session_down(str(info.jid), info.session_id)
        self.bus.broadcast(Frame(FrameType.SESSION_DOWN, payload))

    def replace_remote(self, full: JID) -> None:
        """A local bind takes `full`: end the session holding it elsewhere."""
        remote = self._remote.get(full)
        if remote is None:
            return
        self._remove(full, remote.session_id)
        payload = frames.encode_kick(str(full), remote.session_id, "conflict")
        self.bus.send(remote.shard, Frame(FrameType.KICK, payload))

    def invalidate(self, user: str, what: str) -> None:
        """Tell the other shards that `user`'s `what` changed in the store."""
        payload = frames.encode_invalidate(user, what)
        self.bus.broadcast(Frame(FrameType.INVALIDATE, payload))

    # -- BusHandler ---------------------------------------------------------------

    async def frame_received(self, frame: Frame) -> None:
        kind = frame.type
        try:
            if kind is FrameType.STANZA:
                target, data = frames.decode_stanza(frame.payload)
                name, _, to = target.partition("\0")
                recipient = parse_jid(name)
                if not self._deliver_wire(recipient, to or name, data):
                    await self._receive_stanza(recipient, to or name, parse_stanza(data))
            elif kind is FrameType.FANOUT:
                data, recipients = frames.decode_fanout(frame.payload)
                await self._receive_fanout(data, recipients)
            elif kind is FrameType.SESSION_UP:
                self._upsert(frame.source, frames.decode_session_up(frame.payload))
            elif kind is FrameType.SESSION_DOWN:
                jid, sid = frames.decode_session_down(frame.payload)
                self._remove(parse_jid(jid), sid, frame.source)
            elif kind is FrameType.TABLE_REQUEST:
                self._send_table(frame.source)
            elif kind is FrameType.TABLE_SNAPSHOT:
                for entry in frames.decode_table_snapshot(frame.payload):
                    self._upsert(frame.source, entry)
            elif kind is FrameType.KICK:
                jid, sid, condition = frames.decode_kick(frame.payload)
                conn = self.server.sessions.get(parse_jid(jid))
                if conn is not None and conn.info.session_id == sid:
                    conn.kick(condition, "replaced by a new session with the same resource")
            elif kind is FrameType.INVALIDATE:
                user, what = frames.decode_invalidate(frame.payload)
                invalidator = self.server.cache_invalidators.get(what)
                if invalidator is not None:
                    invalidator(user)
            elif kind is FrameType.MODULE:
                channel, data = frames.decode_module(frame.payload)
                handler = self.server.bus_handlers.get(channel)
                if handler is not None:
                    with self.server.router.batch():
                        await handler(frame.source, data)
        except Exception:
            # One bad frame or a module's crash on it must not end the bus
            # connection (and with it every session of the peer shard).
            log.exception("handling a %s frame from shard %d failed", kind.name, frame.source)
        finally:
            self.flush()

    async def peer_up(self, shard: int) -> None:
        # Whatever we knew of it is stale (it may have restarted): ask anew.
        for full, remote in self._remote.items():
            if remote.shard == shard:
                self._remove(full, remote.session_id)
        self.bus.send(shard, Frame(FrameType.TABLE_REQUEST))
        await self.server.hooks.notify("cluster/peer-up", shard)

    async def peer_down(self, shard: int) -> None:
        await self.server.hooks.notify("cluster/peer-down", shard)
        lost = [r for r in self._remote.values() if r.shard == shard]
        for remote in lost:
            self._remove(remote.info.jid, remote.session_id)
        if not lost:
            return
        log.warning("shard %d is gone: dropped its %d sessions", shard, len(lost))
        # One shard speaks for the dead one, so contacts get one unavailable.
        if self.shard != min({self.shard, *self.bus.peers}):
            return
        with self.server.router.batch():
            for remote in lost:
                if remote.info.available:
                    await self.server.hooks.notify("session/closed", remote.info)

    # -- internals ----------------------------------------------------------------

    async def _receive_stanza(self, full: JID, to: str, stanza: ET.Element) -> None:
        router = self.server.router
        stanza.set("to", to)
        if not full.resource:
            # A bare recipient: this shard's available sessions of the user.
            router.deliver_local_available(full, stanza)
            return
        if router.deliver(full, stanza):
            return
        # The session ended while the frame travelled: what the RFC says
        # for a full JID that is not there (RFC 6121 §8.5.3.2).
        if stanza.tag.endswith("}message"):
            stanza.set("to", str(full.bare))
            await router.reroute(stanza)
        elif stanza.tag.endswith("}iq") and stanza.get("type") in ("get", "set"):
            await router.route(stanza_error(stanza, "service-unavailable"))

    def _deliver_wire(self, full: JID, to: str, data: bytes) -> bool:
        """A STANZA frame's bytes straight to the local connection(s) it is
        for, with `to` spliced in: no parse, no serialisation (no hook runs
        for a stanza arriving over the bus). False when that is not the
        case: the caller parses and routes as the RFC says."""
        wire = WireStanza.from_bytes(data, to)
        if wire is None:
            return False
        sessions = self.server.sessions
        if not full.resource:
            # A bare recipient: this shard's available sessions of the user.
            for conn in sessions.of_user(full):
                if conn.info.available:
                    conn.deliver_wire(wire)
            return True
        found = sessions.get(full)
        return found is not None and found.deliver_wire(wire)

    async def _receive_fanout(self, data: bytes, recipients: list[str]) -> None:
        sessions = self.server.sessions
        # Written from the frame's bytes, each recipient's `to` spliced in;
        # parsed once, and only if needed: bytes not ours to splice, a
        # stream that needs a tree (stream management, client state
        # indication: `wants_tree`), or a copy that must be routed again.
        # Every tree copy shares the parsed children (`Shared`).
        wire = WireStanza.from_bytes(data, None)
        shared: Shared | None = None

        def tree(to: str) -> ET.Element:
            nonlocal shared
            if shared is None:
                shared = Shared(parse_stanza(data))
            return shared.addressed(to)

        def copy(conn: Connection, to: str) -> bool:
            if wire is not None and not conn.wants_tree:
                return conn.deliver_wire(wire.addressed(to))
            return conn.deliver(tree(to))

        missed: list[tuple[JID, str]] = []
        for target in recipients:
            full, _, to = target.partition("\0")
            try:
                jid = parse_jid(full)
            except InvalidJID:
                continue
            try:
                if not jid.resource:
                    for conn in sessions.of_user(jid):
                        if conn.info.available:
                            copy(conn, to or full)
                    continue
                found = sessions.get(jid)
                if found is None or not copy(found, to or full):
                    missed.append((jid, to or full))
            except Exception:
                # One recipient's failure (a module's filter or tap) must not
                # cost the others their copy.
                log.exception("delivering a fan-out copy to %s failed", jid)
        for jid, to in missed:
            # The session ended, moved or is closing: what a STANZA frame
            # for it gets (RFC 6121 §8.5.3.2), whatever shared the frame.
            await self._receive_stanza(jid, to, tree(to))

    def _upsert(self, shard: int, entry: SessionEntry) -> None:
        full = parse_jid(entry.jid)
        presence = parse_stanza(entry.presence) if entry.available and entry.presence else None
        info = SessionInfo(full, presence=presence, priority=entry.priority,
                           interested=entry.interested,
                           fields=field_registry.decode(entry.fields),
                           initial_presence_sent=entry.available, session_id=entry.session_id)
        if entry.available and presence is None:
            info.presence = ET.Element(f"{{{CLIENT_NS}}}presence", {"from": entry.jid})
        remote = RemoteSession(shard, entry.session_id, info)
        self._remote.put(full, remote)
        moved = self._moved.get(full)
        if moved is not None and moved[0] == shard:
            del self._moved[full]  # announced where it went

    def _remove(self, full: JID, session_id: int, shard: int | None = None) -> None:
        """Drop the replica of `full` if it is that session (ids are unique
        per shard only: a session resumed on another shard may reuse the id)."""
        remote = self._remote.get(full)
        if remote is None or remote.session_id != session_id or (
                shard is not None and remote.shard != shard):
            return
        self._remote.remove(full)

    def _send_table(self, shard: int) -> None:
        entries = [_entry(conn.info) for conn in self.server.sessions.all()]
        for payload, flags in frames.encode_table_snapshots(entries):
            self.bus.send(shard, Frame(FrameType.TABLE_SNAPSHOT, payload, flags))


def _entry(info: SessionInfo, fields: list[tuple[str, bytes]] | None = None) -> SessionEntry:
    presence = serialize(info.presence) if info.presence is not None else b""
    if fields is None:
        fields = field_registry.encode(info)
    return SessionEntry(str(info.jid), info.session_id, info.priority, info.available,
                        presence, info.interested, tuple(fields))
