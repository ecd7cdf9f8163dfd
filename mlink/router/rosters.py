"""Rosters in memory while their owner is online (RFC 6121 §2, §3).

Every available presence is broadcast to the contacts of a roster and every
subscription stanza reads and changes one, so the roster of an online user
is kept here: loaded on first need, dropped when the user's last session
ends. Presence broadcast then never touches the store or the directory.

A roster handed out is the merge of two parts:

- the user's *personal* roster: items the user (or the subscription state
  machine) wrote, held in mlink's store, or, for static rosters, in the
  user's directory entry (`StaticRosters`);
- *shared* items from directory groups (roster pre-population): every member
  of a configured group sees every other member, in the group's roster
  group, with subscription `both`. They come from the in-memory
  `GroupIndex`, refreshed by `mlink.modules.shared_groups`, and are never
  written anywhere.

Merging (`merge_item`): a contact with shared groups gets subscription
`both` (no `ask`, no `approved`), the union of the personal item's groups and
the shared group names, and the personal item's name, which is how a member
renames a colleague locally. `items` is the merged view, so presence,
blocking and disco treat group members as subscribed both ways without a
handshake and without knowing about groups.

Changes go to the personal backend first and reach the cached copy only
once committed, so what clients are told (pushes, presence) never runs ahead
of what would survive a crash. A change is a read-modify-write of one user's
roster; `locked` serialises them per user, since two sessions' tasks may
change one roster at once. Nobody ever holds two users' locks, so there is
no lock ordering to get wrong. Group refreshes change cached rosters without
the lock: they are synchronous (no await between reading and writing), and
every write under a lock recomputes the merged item from the current state.

Roster versions (RFC 6121 §2.6) are content-addressed so that they change
exactly when what the client would see changes, and survive restarts:
`<personal>` alone when the user has no shared items, else
`<personal>-g<digest>`. `<personal>` is the store's per-user counter (a
decimal number) or, for a static roster, `s` and a hash of the attribute's
values. `<digest>` is an order-independent sum of a hash of every (contact,
shared group name) pair, updated pair by pair, so a refresh that changes a
few members of a 5,000-member group costs a few hash updates per member, not
a rehash of 5,000 items, and every intermediate push carries the version of
the roster as it stands after that push.

Pending inbound subscription requests (§3.1.3) live beside the items: they
are part of the subscription state ("Pending In") but not of the roster,
and always in the store.

The cache assumes every writer of a user's roster is this process. When
sessions are spread over shard processes, a user's rosters must be owned by
one of them (or the cache invalidated across them).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from mlink.directory.base import DirectoryError, DirectoryUnavailable, NoSuchUser
from mlink.jid import InvalidJID, parse_jid
from mlink.router.directory_watch import follow_static_rosters
from mlink.store import RosterItem, Store, StoreError
from mlink.store.model import SUBSCRIPTION_STATES
from mlink.util.keyed_lock import KeyedLock

if TYPE_CHECKING:
    from mlink.directory.base import Directory
    from mlink.module import Module

log = logging.getLogger(__name__)

# Bytes of the hashes in roster versions: 64 bits make an accidental match
# of two different rosters' versions negligible.
VERSION_HASH_BYTES = 8
_DIGEST_MOD = 1 << (8 * VERSION_HASH_BYTES)
# Static rosters: values are one JSON object each; a larger value is not a
# roster item and is left alone (it protects the parser, not the directory).
MAX_STATIC_VALUE_BYTES = 16 * 1024

_NO_GROUPS: frozenset[str] = frozenset()


class RosterUnavailable(StoreError):
    """Where personal rosters live (the directory, for static rosters) could
    not be read or written. A StoreError, so every caller that already
    answers "try later" for the store does so here too; `condition`, `text`
    and `error_type` say what the client should be told."""

    def __init__(self, text: str, condition: str = "service-unavailable",
                 error_type: str = "wait") -> None:
        super().__init__(text)
        self.text = text
        self.condition = condition
        self.error_type = error_type


class SharedGroup(Protocol):
    """What the index needs of a resolved directory group
    (`mlink.directory.base.DirectoryGroup`)."""

    @property
    def key(self) -> str: ...
    @property
    def name(self) -> str: ...
    @property
    def members(self) -> frozenset[str]: ...


# -- shared groups ------------------------------------------------------------------------


class GroupIndex:
    """Directory groups by key, and each member's groups: answers "which
    groups do these two users share" without searching the directory, so a
    login or a probe never costs an LDAP request per contact."""

    def __init__(self, groups: Iterable[SharedGroup] = ()) -> None:
        self.groups: dict[str, tuple[str, frozenset[str]]] = {}
        memberships: dict[str, list[str]] = {}
        for group in groups:
            if group.key in self.groups:
                continue  # the directory reports a group once; be safe anyway
            self.groups[group.key] = (group.name, frozenset(group.members))
            for member in group.members:
                memberships.setdefault(member, []).append(group.key)
        self.memberships: dict[str, tuple[str, ...]] = {
            user: tuple(keys) for user, keys in memberships.items()}

    def __bool__(self) -> bool:
        return bool(self.groups)

    def member_count(self) -> int:
        return len(self.memberships)

    def shared(self, user: str) -> dict[str, frozenset[str]]:
        """Every contact `user` shares a group with, with the group names."""
        keys = self.memberships.get(user, ())
        if len(keys) == 1:
            # The common case, and the one that matters for huge groups:
            # one frozenset shared by every item.
            name, members = self.groups[keys[0]]
            names = frozenset((name,))
            return {member: names for member in members if member != user}
        found: dict[str, set[str]] = {}
        for key in keys:
            name, members = self.groups[key]
            for member in members:
                if member != user:
                    found.setdefault(member, set()).add(name)
        return {contact: frozenset(names) for contact, names in found.items()}

    def shared_with(self, user: str, contact: str) -> frozenset[str]:
        """Names of the groups `user` and `contact` are both members of."""
        if user == contact:
            return _NO_GROUPS
        names = [self.groups[key][0] for key in self.memberships.get(user, ())
                 if contact in self.groups[key][1]]
        return frozenset(names) if names else _NO_GROUPS

    def touched(self, old: GroupIndex, user: str) -> set[str]:
        """Contacts whose shared groups with `user` may differ between `old`
        and this index: the members added or removed in the groups `user`
        stays in, and every member of a group `user` joined or left, or
        that was renamed, created or deleted."""
        contacts: set[str] = set()
        keys = set(old.memberships.get(user, ())) | set(self.memberships.get(user, ()))
        for key in keys:
            before, after = old.groups.get(key), self.groups.get(key)
            if before == after:
                continue
            old_members = before[1] if before else _NO_GROUPS
            new_members = after[1] if after else _NO_GROUPS
            if (before and after and before[0] == after[0]
                    and user in old_members and user in new_members):
                contacts |= old_members ^ new_members
            else:
                contacts |= old_members | new_members
        contacts.discard(user)
        return contacts


def _pair_hash(contact: str, names: Iterable[str]) -> int:
    total = 0
    for name in names:
        digest = hashlib.blake2b(f"{contact}\0{name}".encode(),
                                 digest_size=VERSION_HASH_BYTES).digest()
        total += int.from_bytes(digest, "big")
    return total


def merge_item(contact: str, personal: RosterItem | None,
               shared: frozenset[str]) -> RosterItem | None:
    """The item a client sees: the personal item, made `both` and put in
    the shared groups when the directory provides the contact."""
    if not shared:
        return personal
    if personal is None:
        return RosterItem(contact, None, tuple(shared), "both")
    return RosterItem(contact, personal.name, personal.groups + tuple(shared), "both")


# -- one user's roster --------------------------------------------------------------------


@dataclass(slots=True, eq=False)
class UserRoster:
    """One user's roster and pending inbound requests, as last committed.

    `items` is the merged view everyone reads; `personal` and `shared` are
    its parts, which only `RosterCache` changes."""

    user: str  # bare JID
    personal_version: str
    personal: dict[str, RosterItem]
    pending: dict[str, bytes] = field(default_factory=dict)
    shared: dict[str, frozenset[str]] = field(default_factory=dict)
    shared_digest: int = 0
    items: dict[str, RosterItem] = field(default_factory=dict)

    @property
    def version(self) -> str:
        if not self.shared_digest:
            return self.personal_version
        return f"{self.personal_version}-g{self.shared_digest:0{2 * VERSION_HASH_BYTES}x}"

    def shared_groups(self, contact: str) -> frozenset[str]:
        """The directory groups through which `contact` is in this roster."""
        return self.shared.get(contact, _NO_GROUPS)

    def _remerge(self, contact: str) -> RosterItem | None:
        item = merge_item(contact, self.personal.get(contact), self.shared_groups(contact))
        if item is None:
            self.items.pop(contact, None)
        else:
            self.items[contact] = item
        return item

    def _set_shared(self, contact: str, names: frozenset[str]) -> None:
        old = self.shared.get(contact, _NO_GROUPS)
        digest = self.shared_digest - _pair_hash(contact, old) + _pair_hash(contact, names)
        self.shared_digest = digest % _DIGEST_MOD
        if names:
            self.shared[contact] = names
        else:
            self.shared.pop(contact, None)


@dataclass(slots=True, frozen=True)
class SharedChange:
    """A merged item of an online user's roster changed with the groups:
    `after` None means the item went away (a push with subscription
    remove). `version` is the roster's version right after this change."""

    user: str
    contact: str
    before: RosterItem | None
    after: RosterItem | None
    version: str


# -- where personal rosters live ----------------------------------------------------------


class PersonalRosters(Protocol):
    """A backend for personal rosters. `put`/`delete` return the new
    version and, when the write re-read the whole roster, all its items."""

    async def load(self, user: str) -> tuple[str, dict[str, RosterItem]]: ...
    async def put(self, user: str, item: RosterItem
                  ) -> tuple[str, dict[str, RosterItem] | None]: ...
    async def delete(self, user: str, contact: str
                     ) -> tuple[str, dict[str, RosterItem] | None] | None: ...


class StoreRosters:
    """Personal rosters in mlink's store; the version is its counter."""

    def __init__(self, store: Callable[[], Store]) -> None:
        self._store = store

    async def load(self, user: str) -> tuple[str, dict[str, RosterItem]]:
        version, items = await self._store().roster(user)
        return str(version), items

    async def put(self, user: str, item: RosterItem) -> tuple[str, dict[str, RosterItem] | None]:
        return str(await self._store().roster_put(user, item)), None

    async def delete(self, user: str, contact: str
                     ) -> tuple[str, dict[str, RosterItem] | None] | None:
        version = await self._store().roster_delete(user, contact)
        return None if version is None else (str(version), None)


def static_value(item: RosterItem) -> bytes:
    """A roster item as one value of the static roster attribute: a JSON
    object (see docs/directory.md), keys sorted so equal items are equal
    values."""
    obj: dict[str, Any] = {
        "jid": item.jid, "groups": list(item.groups), "subscription": item.subscription,
        "ask": item.ask, "approved": item.approved,
    }
    if item.name is not None:
        obj["name"] = item.name
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def parse_static_value(value: bytes) -> RosterItem | None:
    """The item in one attribute value, None if it is not one (another
    application's value, or a broken one: left alone, never rewritten)."""
    if len(value) > MAX_STATIC_VALUE_BYTES:
        return None
    try:
        obj = json.loads(value)
        if not isinstance(obj, dict) or not isinstance(obj.get("jid"), str):
            return None
        name = obj.get("name")
        groups = obj.get("groups", [])
        subscription = obj.get("subscription", "none")
        ask, approved = obj.get("ask", False), obj.get("approved", False)
        if (name is not None and not isinstance(name, str)) or not isinstance(groups, list) \
                or not all(isinstance(g, str) and g for g in groups) \
                or subscription not in SUBSCRIPTION_STATES \
                or not isinstance(ask, bool) or not isinstance(approved, bool):
            return None
        jid = str(parse_jid(obj["jid"]).bare)
        return RosterItem(jid, name or None, tuple(groups), subscription, ask, approved)
    except (ValueError, InvalidJID):
        return None


def static_version(values: Iterable[bytes]) -> str:
    """The personal version of a static roster: a hash of its values, in
    any order (LDAP keeps no order), so it changes whenever any application
    changes the attribute, and needs no counter stored beside it."""
    digest = hashlib.blake2b(digest_size=VERSION_HASH_BYTES)
    for value in sorted(values):
        digest.update(len(value).to_bytes(4, "big"))
        digest.update(value)
    return "s" + digest.hexdigest()


class StaticRosters:
    """Personal rosters in the users' directory entries (static rosters),
    one value of `attribute` per item, so other applications (an address
    book) share the contact list. Every write is a read-modify-write of the
    whole attribute, made under the user's roster lock: a change another
    application made meanwhile is kept, and values that are not roster
    items are written back untouched."""

    def __init__(self, directory: Callable[[], Directory], attribute: str) -> None:
        self._directory = directory
        self.attribute = attribute

    async def _read(self, user: str) -> list[bytes]:
        try:
            found = await self._directory().user_attributes(user, [self.attribute])
        except DirectoryUnavailable as exc:
            raise RosterUnavailable(f"the directory is unavailable: {exc}") from exc
        except DirectoryError as exc:
            raise RosterUnavailable(f"the directory refused to read the roster: {exc}",
                                    "internal-server-error", "cancel") from exc
        if found is None:
            return []  # an account being deleted; its roster is empty
        return list(found.get(self.attribute, []))

    async def _write(self, user: str, values: list[bytes]) -> None:
        try:
            await self._directory().modify_user(user, {self.attribute: values})
        except DirectoryUnavailable as exc:
            raise RosterUnavailable(f"the directory is unavailable: {exc}") from exc
        except NoSuchUser as exc:
            raise RosterUnavailable("no such user in the directory", "item-not-found",
                                    "cancel") from exc
        except DirectoryError as exc:
            # A schema or access refusal: retrying will not help.
            raise RosterUnavailable(f"the directory refused the roster change: {exc}",
                                    "not-acceptable", "modify") from exc

    @staticmethod
    def _items(values: Iterable[bytes]) -> dict[str, RosterItem]:
        items: dict[str, RosterItem] = {}
        for value in values:
            item = parse_static_value(value)
            if item is None:
                log.debug("static roster value that is not a roster item kept as is")
                continue
            items[item.jid] = item
        return items

    async def load(self, user: str) -> tuple[str, dict[str, RosterItem]]:
        values = await self._read(user)
        return static_version(values), self._items(values)

    async def _replace(self, user: str, contact: str, item: RosterItem | None
                       ) -> tuple[str, dict[str, RosterItem]] | None:
        values = await self._read(user)
        kept = [v for v in values if (p := parse_static_value(v)) is None or p.jid != contact]
        if item is None and len(kept) == len(values):
            return None
        new = kept + ([static_value(item)] if item is not None else [])
        if sorted(new) != sorted(values):
            await self._write(user, new)
        return static_version(new), self._items(new)

    async def put(self, user: str, item: RosterItem) -> tuple[str, dict[str, RosterItem] | None]:
        done = await self._replace(user, item.jid, item)
        assert done is not None
        return done

    async def delete(self, user: str, contact: str
                     ) -> tuple[str, dict[str, RosterItem] | None] | None:
        return await self._replace(user, contact, None)


# -- the cache ----------------------------------------------------------------------------


class RosterCache:
    """Rosters by bare JID, cached while their user has a bound session."""

    def __init__(self, store: Callable[[], Store], online: Callable[[str], bool],
                 personal: PersonalRosters | None = None) -> None:
        # `store` is a getter: the server opens its store after the modules
        # that create this cache have registered.
        self._store = store
        self._online = online
        self.personal: PersonalRosters = personal or StoreRosters(store)
        self.groups = GroupIndex()
        self._cached: dict[str, UserRoster] = {}
        # Bumped by `invalidate` while the user's lock is in use; a load
        # caches only if it did not move. Dropped with the lock.
        self._generations: dict[str, int] = {}
        # Told the user whose roster or pending requests this process wrote,
        # so that other shards drop their cached copies (see Server.changed).
        self.on_change: Callable[[str], None] = lambda user: None
        # Per-user locks, kept only while someone holds or waits for one;
        # once nobody works on a user, its load generation goes too.
        self._locks: KeyedLock[str] = KeyedLock(self._forget_generation)

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

    def invalidate(self, user: str) -> None:
        """Another shard changed `user`'s roster: drop the cached copy, and
        keep a load already under way from caching what it read before."""
        self._cached.pop(user, None)
        if user in self._locks:  # a load may be under way
            self._generations[user] = self._generations.get(user, 0) + 1

    def shares_group(self, user: str, contact: str) -> bool:
        """Whether the directory makes `user` and `contact` subscribed both
        ways, answered from memory (probes, which come by the thousand when
        a member of a large group logs in)."""
        return bool(self.groups.shared_with(user, contact))

    def _forget_generation(self, user: str) -> None:
        self._generations.pop(user, None)

    @asynccontextmanager
    async def locked(self, user: str) -> AsyncIterator[UserRoster]:
        """Hold `user`'s roster lock; yields the roster to read and change
        through `put`, `delete`, `add_pending` and `drop_pending`."""
        async with self._locks.hold(user):
            roster = self._cached.get(user)
            if roster is None:
                roster = await self._load(user)
            yield roster

    async def _load(self, user: str) -> UserRoster:
        generation = self._generations.get(user, 0)
        version, items = await self.personal.load(user)
        pending = dict(await self._store().subscription_requests(user))
        roster = UserRoster(user, version, items, pending)
        # After the awaits: the index is the current one.
        self._attach_shared(roster)
        # Cache only for online users: a roster read for an offline user
        # (a subscription request to them) would otherwise stay forever.
        # Nor what was read before another shard's change was announced.
        if self._online(user) and self._generations.get(user, 0) == generation:
            self._cached[user] = roster
        return roster

    def _attach_shared(self, roster: UserRoster) -> None:
        shared = self.groups.shared(roster.user)
        roster.shared = shared
        digest = 0
        for contact, names in shared.items():
            digest += _pair_hash(contact, names)
        roster.shared_digest = digest % _DIGEST_MOD
        items = dict(roster.personal)
        for contact, names in shared.items():
            merged = merge_item(contact, items.get(contact), names)
            assert merged is not None
            items[contact] = merged
        roster.items = items

    # -- writing (with the user's lock held) -----------------------------------------

    def _committed(self, roster: UserRoster, version: str, contact: str,
                   item: RosterItem | None, everything: dict[str, RosterItem] | None) -> None:
        roster.personal_version = version
        self.on_change(roster.user)
        if everything is not None:
            # The backend re-read the roster (static): take all of it, with
            # whatever another application changed meanwhile.
            roster.personal = everything
            self._attach_shared(roster)
            return
        if item is None:
            roster.personal.pop(contact, None)
        else:
            roster.personal[contact] = item
        roster._remerge(contact)

    async def put(self, roster: UserRoster, item: RosterItem) -> RosterItem:
        """Store personal `item`; returns the merged item to push (the new
        version is `roster.version`)."""
        version, everything = await self.personal.put(roster.user, item)
        self._committed(roster, version, item.jid, item, everything)
        merged = roster.items.get(item.jid)
        assert merged is not None
        return merged

    async def delete(self, roster: UserRoster, contact: str) -> bool:
        """Remove `contact`'s personal item; False if there was none. The
        contact stays in `items` when a shared group provides it."""
        done = await self.personal.delete(roster.user, contact)
        if done is None:
            roster.personal.pop(contact, None)
            roster._remerge(contact)
            return False
        version, everything = done
        self._committed(roster, version, contact, None, everything)
        return True

    async def add_pending(self, roster: UserRoster, contact: str, stanza: bytes) -> None:
        await self._store().subscription_request_put(roster.user, contact, stanza)
        roster.pending.pop(contact, None)  # a repeated request moves to the end
        roster.pending[contact] = stanza
        self.on_change(roster.user)

    async def drop_pending(self, roster: UserRoster, contact: str) -> bool:
        """Forget `contact`'s request; False if there was none."""
        if contact not in roster.pending:
            return False
        await self._store().subscription_request_delete(roster.user, contact)
        del roster.pending[contact]
        self.on_change(roster.user)
        return True

    async def reload_personal(self, user: str) -> list[SharedChange]:
        """Read `user`'s personal roster again because it changed outside
        mlink (a static roster edited in the directory). Only for a cached
        (online) roster; returns each merged item that changed, every one
        with the roster's new version, for pushes."""
        if user not in self._cached:
            return []
        async with self.locked(user) as roster:
            version, items = await self.personal.load(user)
            if version == roster.personal_version:
                return []
            before = dict(roster.items)
            roster.personal_version = version
            roster.personal = items
            self._attach_shared(roster)
            return [SharedChange(user, contact, before.get(contact), roster.items.get(contact),
                                 roster.version)
                    for contact in sorted(set(before) | set(roster.items))
                    if before.get(contact) != roster.items.get(contact)]

    # -- shared groups ----------------------------------------------------------------

    def set_groups(self, groups: Iterable[SharedGroup]) -> list[SharedChange]:
        """Install a new resolution of the directory groups. Returns, for
        every cached (online) roster, each merged item that changed, in
        order, with the version after it. Synchronous, so no roster is seen
        half-updated."""
        old, new = self.groups, GroupIndex(groups)
        self.groups = new
        changes: list[SharedChange] = []
        for user, roster in self._cached.items():
            for contact in sorted(new.touched(old, user)):
                names = new.shared_with(user, contact)
                if names == roster.shared_groups(contact):
                    continue
                before = roster.items.get(contact)
                roster._set_shared(contact, names)
                after = roster._remerge(contact)
                if after != before:
                    changes.append(SharedChange(user, contact, before, after, roster.version))
        return changes


def _static_attribute(module: Module) -> str | None:
    return module.config.rosters.static_attribute or None


def rosters_of(module: Module) -> RosterCache:
    """The server's roster cache, created on first use by whichever module
    sets up first (the roster, presence and subscription modules share it;
    other modules such as blocking may read it). Personal rosters live in
    the directory when the configuration names a static roster attribute."""
    return module.shared("rosters", lambda: _new_roster_cache(module))


def _new_roster_cache(module: Module) -> RosterCache:
    attribute = _static_attribute(module)
    personal: PersonalRosters | None = None
    if attribute is not None:
        personal = StaticRosters(lambda: module.directory, attribute)
    cache = RosterCache(
        lambda: module.data,
        lambda user: module.router.sessions.online(parse_jid(user)),
        personal,
    )
    cache.on_change = module.user_cache("rosters", cache.invalidate)
    if attribute is not None:
        # Items edited in the directory reach online users as pushes.
        follow_static_rosters(module, cache)
    return cache

