"""Who is online: bound sessions by full and bare JID.

Modules see `SessionInfo` records (plain data: JID, priority, presence,
and the fields modules declare), never the connection objects, and deliver through the router; so a
session can later live in another shard process, with its `SessionInfo`
replicated, without any module changing.
"""

from __future__ import annotations

import itertools
import secrets
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from mlink.jid import JID
from mlink.router.index import JidIndex

if TYPE_CHECKING:
    from mlink.xml.serialize import WireStanza

# Bytes of randomness in a server-generated resource (RFC 6120 §7.6.2.1
# asks for a resource unique among the user's sessions; 64 bits suffice).
GENERATED_RESOURCE_BYTES = 8


@dataclass(slots=True, eq=False)
class SessionInfo:
    """What the server knows of one bound session, apart from its socket."""

    jid: JID
    # The last available presence the client broadcast (RFC 6121 §4.2); None
    # until initial presence and after unavailable.
    presence: ET.Element | None = None
    priority: int = 0
    # RFC 6121 §2.1.6: requested the roster, so it gets roster pushes and
    # subscription requests.
    interested: bool = False
    # Values of the per-session fields modules declare (`mlink.router.fields`).
    fields: dict[str, Any] = field(default_factory=dict)
    # Full or bare JIDs that got directed presence from this session, owed
    # an unavailable presence when it ends (RFC 6121 §4.6.3).
    directed_to: set[str] = field(default_factory=set)
    # Whether initial presence has been sent in this session.
    initial_presence_sent: bool = False
    # Unique per shard process: tells a session from a later one with the
    # same full JID in the global session table.
    session_id: int = 0

    @property
    def available(self) -> bool:
        return self.presence is not None


class Connection(Protocol):
    """What the router needs of a bound connection."""

    info: SessionInfo

    def deliver(self, stanza: ET.Element, keep: bool = True) -> bool:
        """Queue `stanza` for the client without waiting; False when the
        session is ending. With `keep`, a stanza the session never writes
        is routed again when it ends (another resource, offline, a bounce)."""

    @property
    def wants_tree(self) -> bool:
        """Whether a stanza for this session is best given as a tree (its
        modules watch its output): a fan-out then parses once for all."""

    def deliver_wire(self, stanza: WireStanza, keep: bool = True) -> bool:
        """`deliver` for a stanza kept as bytes (from another shard): written
        without a tree; parsed only if it must be routed again."""

    def deliver_tracked(self, stanza: ET.Element) -> int | None:
        """Queue `stanza`, never to be routed again: the output mark it is
        written by, or None when the session is ending."""

    async def written(self, mark: int) -> bool:
        """Until the output reaches `mark` (True) or the session ends (False)."""

    def is_written(self, mark: int) -> bool:
        """Whether the output reached `mark`."""

    def kick(self, condition: str, text: str = "") -> None:
        """End the session with a stream error, without waiting."""


class StreamTap(Protocol):
    """A module's view of one session's stanza flow, set on its stream with
    `StreamControl.set_tap` (XEP-0198 counts and keeps stanzas through it).
    Calls are synchronous and in order; keep them cheap (every stanza)."""

    def sent(self, stanza: ET.Element) -> None:
        """A stanza was queued for the client (or, while the session is
        held, would have been)."""

    def received(self, stanza: ET.Element) -> None:
        """A stanza arrived from the client."""

    def lost(self, hold: SessionHold) -> bool:
        """The connection dropped without a closing tag or a stream error.
        True: keep the session bound (held) until the module calls
        `hold.taken()` or `hold.end()`; False: it ends now."""

    def unacked(self) -> list[ET.Element]:
        """At the session's end: the stanzas the client never confirmed,
        routed again (another resource, offline storage, a bounce)."""


class OutputFilter(Protocol):
    """A module's hold on what a stream writes (`StreamControl.add_filter`):
    client state indication keeps unimportant stanzas back while the
    client is inactive."""

    def take(self, stanza: ET.Element) -> bool:
        """True: the filter keeps `stanza` (it later sends it with
        `StreamControl.send_stanza`); False: it is written as usual."""

    def release(self) -> list[ET.Element]:
        """The connection is gone: everything still kept, in order (it goes
        to the tap or is routed again; the filter is removed)."""


class SessionHold(Protocol):
    """A session whose connection is gone, kept bound for a module
    (`StreamTap.lost`). Stanzas for it keep going to the tap meanwhile."""

    @property
    def info(self) -> SessionInfo:
        """The held session."""

    def taken(self, moving_to: int | None = None) -> None:
        """Another stream continues this session: leave the session table
        at once, without `session/closed` and without routing anything
        again; the new stream carries on. On this shard (`moving_to` None)
        the other shards are told at once (SESSION_DOWN); for a stream on
        shard `moving_to` they are not: their replicas keep pointing here,
        this shard passes on what reaches it, and that shard's SESSION_UP
        replaces them (make before break)."""

    def end(self) -> None:
        """Give up: the session ends as if its connection had just closed
        (`session/closed`, the tap's unacked stanzas routed again)."""


class StreamControl(Protocol):
    """What a nonza handler may do with the stream its element came on
    (`NonzaEvent.stream`): stream extensions answer with nonzas of their
    own, count stanzas, and continue a session on a new stream."""

    @property
    def authenticated_jid(self) -> JID | None:
        """The user authenticated on this stream (bare until bound)."""

    @property
    def bound(self) -> bool:
        """Whether the stream carries a session (bound or resumed)."""

    def send_nonza(self, element: ET.Element) -> None:
        """Write a non-stanza element to the client (not seen by the tap)."""

    def set_tap(self, tap: StreamTap | None) -> None:
        """Watch this stream's stanzas (None: stop)."""

    def add_filter(self, output_filter: OutputFilter) -> None:
        """Let `output_filter` see (and keep) each stanza before it is written."""

    def remove_filter(self, output_filter: OutputFilter) -> None:
        """Stop filtering (what it kept, it sends itself first)."""

    def send_stanza(self, stanza: ET.Element) -> bool:
        """Write a stanza past the filters (counted by the tap); False when
        the stream is ending."""

    def drop(self) -> None:
        """Cut the connection as a network failure would (its tap may hold
        the session): a client resuming on a new connection before the old
        one was seen to die."""

    def resume(self, info: SessionInfo, tap: StreamTap | None) -> None:
        """Make this authenticated, unbound stream carry on the session
        `info` (its JID, presence, fields), which must already have left
        the session table (`SessionHold.taken`, or another shard's). The
        session is announced again with a new session id; no
        `session/bound` fires, since for everyone else it never ended."""


class SessionTable:
    def __init__(self) -> None:
        self._index: JidIndex[Connection] = JidIndex()
        self._session_ids = itertools.count(1)

    def bind(self, conn: Connection, bare: JID, resource: str | None) -> JID:
        """Bind `conn` to `bare`/`resource` and return the full JID.

        RFC 6120 §7.7.2.2: when the full JID is in use, mlink lets the new
        session win and ends the old one with a `conflict` stream error —
        the old one is usually a dead connection the client is replacing.
        The caller must announce the old session's end (`replaced`).
        """
        resources = self._index.resources(bare)
        if resource is None:
            resource = secrets.token_hex(GENERATED_RESOURCE_BYTES)
            while resource in resources:
                resource = secrets.token_hex(GENERATED_RESOURCE_BYTES)
        full = JID(bare.local, bare.domain, resource)
        self._index.put(full, conn)
        conn.info = SessionInfo(full, session_id=next(self._session_ids))
        return full

    def adopt(self, conn: Connection, info: SessionInfo) -> None:
        """Bind `conn` to the existing session `info` (resumed on a new
        stream), under a fresh session id: the id tells the other shards'
        replicas the new binding from the old one."""
        info.session_id = next(self._session_ids)
        conn.info = info
        self._index.put(info.jid, conn)

    def replaced(self, bare: JID, resource: str | None) -> Connection | None:
        """The connection holding `bare/resource` now, which a bind would end."""
        if resource is None:
            return None
        return self._index.resource(bare, resource)

    def unbind(self, conn: Connection) -> bool:
        """Remove `conn`; False when it was not (or no longer) bound."""
        full = conn.info.jid
        if self._index.get(full) is not conn:
            return False
        self._index.remove(full)
        return True

    def get(self, full: JID) -> Connection | None:
        return self._index.get(full)

    def of_user(self, bare: JID) -> list[Connection]:
        return list(self._index.resources(bare).values())

    def online(self, bare: JID) -> bool:
        return self._index.has_user(bare)

    def count_of_user(self, bare: JID) -> int:
        return len(self._index.resources(bare))

    def __len__(self) -> int:
        return len(self._index)

    def all(self) -> list[Connection]:
        return self._index.values()
