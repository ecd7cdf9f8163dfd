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

    def __len__(self) -> int:
        return len(self._index)

    def all(self) -> list[Connection]:
        return self._index.values()
