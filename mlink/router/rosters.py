"""Rosters in memory while their owner is online (RFC 6121 §2, §3).

Every available presence is broadcast to the contacts of a roster and every
subscription stanza reads and changes one, so the roster of an online user
is kept here: loaded from the store on first need, dropped when the user's
last session ends. Presence broadcast then never touches the store.

Changes go to the store first and reach the cached copy only once committed,
so what clients are told (pushes, presence) never runs ahead of what would
survive a crash. A change is a read-modify-write of one user's roster (the
subscription state machine of RFC 6121 Appendix A reads the item and the
pending request, then writes both); `locked` serialises them per user, since
two sessions' tasks may change one roster at once. Nobody ever holds two
users' locks, so there is no lock ordering to get wrong.

Pending inbound subscription requests (§3.1.3) live beside the items: they
are part of the subscription state ("Pending In") but not of the roster.

The cache assumes every writer of a user's roster is this process. When
sessions are spread over shard processes, a user's rosters must be owned by
one of them (or the cache invalidated across them).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import trio

from mlink.jid import parse_jid
from mlink.store import RosterItem, Store

if TYPE_CHECKING:
    from mlink.server import Server


@dataclass(slots=True, eq=False)
class UserRoster:
    """One user's roster and pending inbound requests, as last committed."""

    user: str  # bare JID
    version: int
    items: dict[str, RosterItem]
    # Contacts whose subscribe request awaits the user's answer, with the
    # request as received (serialised), in arrival order.
    pending: dict[str, bytes] = field(default_factory=dict)


class RosterCache:
    """Rosters by bare JID, cached while their user has a bound session."""

    def __init__(self, store: Callable[[], Store], online: Callable[[str], bool]) -> None:
        # `store` is a getter: the server opens its store after the modules
        # that create this cache have registered.
        self._store = store
        self._online = online
        self._cached: dict[str, UserRoster] = {}
        # Per-user locks, kept only while someone holds or waits for one.
        self._locks: dict[str, tuple[trio.Lock, list[int]]] = {}

    # -- reading ------------------------------------------------------------------

    async def get(self, user: str) -> UserRoster:
        """The roster of `user` (bare JID). Callers must not change it: use
        `locked` and the write methods. Loaded under the user's lock, so a
        load never caches a snapshot older than a change being written."""
        roster = self._cached.get(user)
        if roster is not None:
            return roster
        async with self.locked(user) as roster:
            return roster

    def cached(self, user: str) -> UserRoster | None:
        return self._cached.get(user)

    def evict(self, user: str) -> None:
        """Forget `user`'s roster (their last session ended)."""
        self._cached.pop(user, None)

    @asynccontextmanager
    async def locked(self, user: str) -> AsyncIterator[UserRoster]:
        """Hold `user`'s roster lock; yields the roster to read and change
        through `put`, `delete`, `add_pending` and `drop_pending`."""
        entry = self._locks.get(user)
        if entry is None:
            entry = self._locks[user] = (trio.Lock(), [0])
        lock, waiters = entry
        waiters[0] += 1
        try:
            async with lock:
                roster = self._cached.get(user)
                if roster is None:
                    roster = await self._load(user)
                yield roster
        finally:
            waiters[0] -= 1
            if not waiters[0]:
                del self._locks[user]

    async def _load(self, user: str) -> UserRoster:
        store = self._store()
        version, items = await store.roster(user)
        pending = dict(await store.subscription_requests(user))
        roster = UserRoster(user, version, items, pending)
        # Cache only for online users: a roster read for an offline user
        # (a subscription request to them) would otherwise stay forever.
        if self._online(user):
            self._cached[user] = roster
        return roster

    # -- writing (with the user's lock held) -----------------------------------------

    async def put(self, roster: UserRoster, item: RosterItem) -> int:
        """Store `item` and return the new roster version."""
        roster.version = await self._store().roster_put(roster.user, item)
        roster.items[item.jid] = item
        return roster.version

    async def delete(self, roster: UserRoster, contact: str) -> int | None:
        """Remove `contact`'s item; the new version, None if there was none."""
        version = await self._store().roster_delete(roster.user, contact)
        roster.items.pop(contact, None)
        if version is not None:
            roster.version = version
        return version

    async def add_pending(self, roster: UserRoster, contact: str, stanza: bytes) -> None:
        await self._store().subscription_request_put(roster.user, contact, stanza)
        roster.pending.pop(contact, None)  # a repeated request moves to the end
        roster.pending[contact] = stanza

    async def drop_pending(self, roster: UserRoster, contact: str) -> bool:
        """Forget `contact`'s request; False if there was none."""
        if contact not in roster.pending:
            return False
        await self._store().subscription_request_delete(roster.user, contact)
        del roster.pending[contact]
        return True


def rosters_of(server: Server) -> RosterCache:
    """The server's roster cache, created on first use by whichever module
    registers first (the roster, presence and subscription modules share it;
    other modules such as blocking may read it)."""
    cache: RosterCache | None = getattr(server, "rosters", None)
    if cache is None:
        cache = RosterCache(
            lambda: server.store,
            lambda user: server.sessions.online(parse_jid(user)),
        )
        server.rosters = cache
    return cache
