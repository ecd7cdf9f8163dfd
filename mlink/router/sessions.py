"""Who is online: bound sessions by full and bare JID.

Modules never get a session object: they route by JID through the router,
so a session may later live in another shard process without them knowing.
"""

from __future__ import annotations

import secrets
import xml.etree.ElementTree as ET
from typing import Protocol

from mlink.jid import JID

# Bytes of randomness in a server-generated resource (RFC 6120 §7.6.2.1
# asks for a resource unique among the user's sessions; 64 bits suffice).
GENERATED_RESOURCE_BYTES = 8


class Session(Protocol):
    """What the router needs of a bound connection."""

    jid: JID

    def deliver(self, stanza: ET.Element) -> None:
        """Queue `stanza` for the client without waiting."""

    def kick(self, condition: str, text: str = "") -> None:
        """End the session with a stream error, without waiting."""


class SessionTable:
    def __init__(self) -> None:
        self._by_full: dict[JID, Session] = {}
        self._by_bare: dict[JID, dict[str, Session]] = {}

    def bind(self, session: Session, bare: JID, resource: str | None) -> JID:
        """Bind `session` to `bare`/`resource` and return the full JID.

        RFC 6120 §7.7.2.2: when the full JID is in use, mlink lets the new
        session win and ends the old one with a `conflict` stream error —
        the old one is usually a dead connection the client is replacing.
        """
        resources = self._by_bare.setdefault(bare, {})
        if resource is None:
            resource = secrets.token_hex(GENERATED_RESOURCE_BYTES)
            while resource in resources:
                resource = secrets.token_hex(GENERATED_RESOURCE_BYTES)
        full = JID(bare.local, bare.domain, resource)
        old = resources.get(resource)
        if old is not None and old is not session:
            self.unbind(old)
            old.kick("conflict", "replaced by a new session with the same resource")
        resources[resource] = session
        self._by_full[full] = session
        session.jid = full
        return full

    def unbind(self, session: Session) -> None:
        full = session.jid
        if self._by_full.get(full) is not session:
            return
        del self._by_full[full]
        resources = self._by_bare.get(full.bare)
        if resources is not None:
            resources.pop(full.resource, None)
            if not resources:
                del self._by_bare[full.bare]

    def get(self, full: JID) -> Session | None:
        return self._by_full.get(full)

    def of_user(self, bare: JID) -> list[Session]:
        return list(self._by_bare.get(bare, {}).values())

    def __len__(self) -> int:
        return len(self._by_full)

    def all(self) -> list[Session]:
        return list(self._by_full.values())
