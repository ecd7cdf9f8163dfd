"""The multi-user chat service of one shard: the rooms it owns, room
creation and its limits, delivery of what rooms say, the service's own
disco, and the room listing shared between shards.

Every room lives on one shard, `module.owner(room JID)`. A stanza for a
room that arrives on another shard is passed to the owner over the bus
once (`ROOM_CHANNEL`); what the room sends back is delivered with
`router.deliver`, which groups the copies for each other shard into one
frame per payload (a message to N occupants on another shard crosses the
bus once).
"""

from __future__ import annotations

import logging
import time
import xml.etree.ElementTree as ET
from typing import TYPE_CHECKING, Any

import trio

from mlink.directory.base import DirectoryError
from mlink.hooks import StanzaEvent
from mlink.jid import JID, InvalidJID, parse_jid
from mlink.modules.mam_query import is_mam_request
from mlink.modules.muc.archive import RoomArchive
from mlink.modules.muc.config import MEMBER_GROUP_FIELD, RoomConfig
from mlink.modules.muc.options import Options
from mlink.modules.muc.roles import Affiliation
from mlink.modules.muc.room import (
    DISCO_INFO_NS,
    DISCO_ITEMS_NS,
    MUC_NS,
    MUC_OWNER_NS,
    STANZA_ID_NS,
    Effects,
    HistoryEntry,
    Limits,
    Room,
)
from mlink.modules.util import iq_result
from mlink.util.keyed_lock import KeyedLock
from mlink.xml.serialize import serialize

if TYPE_CHECKING:
    from collections.abc import Sequence

    from mlink.directory.port import Change
    from mlink.module import Module
    from mlink.modules.muc.persist import RoomDirectory, RoomRecord

log = logging.getLogger("mlink.modules.muc")

# Bus channels: a stanza for a room owned by another shard, and a shard's
# list of its public rooms (for disco#items on any shard).
ROOM_CHANNEL = "room"
LISTING_CHANNEL = "listing"
# A shard re-announces its public rooms at least this often, so a shard
# that restarted has the full listing within this long.
LISTING_REFRESH_SECONDS = 30.0
# Changes to the listing are sent at most this often (a burst of room
# creations is one message).
LISTING_DEBOUNCE_SECONDS = 0.5
# How often idle rooms are looked for (at most; a short idle limit is
# checked a few times within it, but never more often than the minimum).
IDLE_CHECK_SECONDS = 10.0
MIN_IDLE_CHECK_SECONDS = 0.25
SERVICE_NAME = "Chatrooms"
# Room history written to the module store, per room: it is trimmed to the
# room's length this often (in messages appended).
HISTORY_TRIM_EVERY = 50
# An occupant whose session a delivery did not reach is not evicted at once:
# a session resumed on another shard (XEP-0198) is out of every table for a
# moment, and a real end tells the room itself (unavailable presence). What
# the room sends it meanwhile is kept, in order, and delivered once its
# session is back; only a session still nowhere after this long (a dead
# shard's) leaves the room (status 333). Checked this often, at most this
# many stanzas kept per occupant.
UNREACHED_GRACE_SECONDS = 15.0
UNREACHED_CHECK_SECONDS = 0.1
UNREACHED_KEPT = 500


_MESSAGE = "{jabber:client}message"
_STANZA_ID = f"{{{STANZA_ID_NS}}}stanza-id"


def _no_service() -> Any:
    raise LookupError("not loaded")


def _encode(stanza: ET.Element) -> bytes:
    return serialize(stanza, stream_ns="")


def _decode(data: bytes) -> ET.Element:
    return ET.fromstring(data)


class MucService:
    """See the module docstring."""

    def __init__(self, module: Module, hosts: dict[str, str]) -> None:
        self.module = module
        self.router = module.router
        self.hosts = hosts  # service domain -> local domain
        self.rooms: dict[JID, Room] = {}
        self._room_locks: KeyedLock[str] = KeyedLock()
        # Public rooms of every shard, for disco#items: shard -> [(jid, name)].
        self.listing: dict[int, list[tuple[str, str]]] = {}
        self._listing_dirty = trio.Event()
        self.persist: RoomDirectory | None = None
        self.history_store = module.store.archive("history")
        self.archive = RoomArchive(module, lambda: self.options.archive_retention_days)
        self._appended: dict[str, int] = {}
        self.creators = module.store.map("created")
        # Persistent rooms as last read from the directory (every shard
        # reads them all; each loads the ones it owns).
        self.records: dict[JID, RoomRecord] = {}
        self._rooms_dirty = trio.Event()
        # Set once the first read of the directory's rooms is done.
        self.loaded = trio.Event()
        # Problems of room entries already logged (each is logged once).
        self._reported: set[str] = set()
        # (room, occupant's real JID) -> when a delivery first missed it, and
        # what it was sent since (see UNREACHED_GRACE_SECONDS).
        self._unreached: dict[tuple[JID, JID], tuple[float, list[ET.Element]]] = {}
        self._unreached_wake = trio.Event()
        self._groups_read: dict[str, frozenset[str] | None] = {}

    @property
    def options(self) -> Options:
        found = self.module.options
        return found if isinstance(found, Options) else Options()

    def limits(self) -> Limits:
        options = self.options
        return Limits(options.max_occupants, options.max_history)

    # -- entry points ----------------------------------------------------------------

    async def hosted(self, event: StanzaEvent) -> bool:
        """Every stanza for the service domain or a room (`hosted/muc`)."""
        to = event.to
        if not to.local:
            await self._service_stanza(event)
            return True
        owner = self.module.owner(str(to.bare))
        if owner != self.module.shard:
            self.module.send_bus(_encode(event.stanza), shard=owner, channel=ROOM_CHANNEL)
            return True
        await self.handle(event.stanza, event.sender, to)
        return True

    async def from_bus(self, source: int, payload: bytes) -> None:
        """A stanza for one of our rooms, passed on by shard `source`."""
        try:
            stanza = _decode(payload)
            sender, to = parse_jid(stanza.get("from", "")), parse_jid(stanza.get("to", ""))
        except (ET.ParseError, InvalidJID):
            log.warning("unreadable room stanza from shard %d", source)
            return
        await self.handle(stanza, sender, to)

    async def handle(self, stanza: ET.Element, sender: JID, to: JID) -> None:
        """A stanza for room `to.bare`, on the shard that owns it. One at a
        time per room: each client's stanzas are handled in that client's
        task, and a room's handling may await (its creation, the
        directory), so two first joins must not both create the room."""
        async with self._room_locks.hold(str(to.bare)):
            await self._handle(stanza, sender, to)

    async def _handle(self, stanza: ET.Element, sender: JID, to: JID) -> None:
        kind = stanza.tag.rpartition("}")[2]
        now = time.time()
        room = self.rooms.get(to.bare)
        if kind == "message" and stanza.get("type") != "error":
            if len(_encode(stanza)) > self.options.max_message_bytes:
                await self.router.bounce(stanza, "policy-violation", "the message is too large")
                return
        if room is not None and kind == "iq" and not to.resource and is_mam_request(stanza):
            await self.archive.handle(room, stanza, sender)
            return
        if room is None:
            if kind == "presence" and stanza.get("type") is None:
                await self._create(stanza, sender, to, now)  # no nickname: jid-malformed
                return
            if kind == "presence" or stanza.get("type") in ("error", "result"):
                return
            await self.router.bounce(stanza, "item-not-found", "no such room")
            return
        if kind == "presence":
            effects = room.presence(stanza, sender, to, now)
        elif kind == "iq" and not await self._check_member_group(room, stanza, sender):
            return
        elif kind == "message":
            effects = room.message(stanza, sender, to, now)
        else:
            effects = room.iq(stanza, sender, to, now)
        await self.apply(room, effects)

    # -- rooms -------------------------------------------------------------------

    async def _create(self, stanza: ET.Element, sender: JID, to: JID, now: float) -> None:
        """§10.1: the first presence to a room that does not exist creates it."""
        if not to.resource:
            await self.router.bounce(stanza, "jid-malformed", "a nickname is needed to enter")
            return
        refusal = await self._may_create(sender)
        if refusal:
            await self.router.bounce(stanza, "not-allowed", refusal)
            return
        room = Room(to.bare, RoomConfig(archive=self.options.archive_default),
                    limits=self.limits(), now=now)
        room.archive_ids = self.archive.next_id
        instant = stanza.find(f"{{{MUC_NS}}}x") is None  # §7.2.1: an old client
        effects = room.create(stanza, sender, to, now, instant=instant)
        if room.empty:  # refused (a bad nickname): nothing was created
            await self._deliver(room, effects)
            return
        self.rooms[room.jid] = room
        await self.creators.set(str(sender.bare), str(room.jid), b"1")
        log.info("room %s created by %s", room.jid, sender.bare)
        await self.apply(room, effects)
        self._listing_changed()

    async def _may_create(self, sender: JID) -> str:
        """Why `sender` may not create a room, or "" when it may."""
        options = self.options
        if options.create in ("local", "group") and not self.router.is_local(sender):
            return "only local users may create rooms"
        if options.create == "group":
            members = await self._group_members(options.create_group)
            if str(sender.bare) not in members:
                return "only members of the room creators' group may create rooms"
        if options.max_rooms_per_user:
            owned = await self.creators.items(str(sender.bare))
            if len(owned) >= options.max_rooms_per_user:
                return f"you may create at most {options.max_rooms_per_user} rooms"
        return ""

    async def _group_members(self, dn: str) -> frozenset[str]:
        if self.persist is None or not dn:
            return frozenset()
        found = await self.persist.group_members(dn)
        return found if found is not None else frozenset()

    async def apply(self, room: Room, effects: Effects) -> None:
        """Act on what changed and deliver what the room said. A change of
        a persistent room is in the directory before anyone is told of it
        (the owner's result included)."""
        ends = effects.destroyed or (room.empty and not room.config.persistent)
        if not ends and (effects.persist or (effects.subject_changed
                                             and room.config.persistent)):
            await self._persist(room)
            self._listing_changed()
        if effects.archive:
            await self.archive.add(room, effects.archive)
        await self._deliver(room, effects)
        if effects.history and room.config.persistent:
            # In the store before this stanza's handling ends, so a restart
            # right after a message was delivered still has it.
            for entry in effects.history:
                await self._keep_history(str(room.jid), entry)
        if effects.destroyed or (room.empty and not room.config.persistent):
            await self._drop(room, destroyed=effects.destroyed)

    def _blocklists(self) -> Any:
        """The blocking module's lists (XEP-0191), None without it."""
        try:
            return self.module.shared("blocking/lists", _no_service)
        except LookupError:
            return None

    async def _refused(self, lists: Any, to: JID, stanza: ET.Element) -> bool:
        """What the recipient's server does with a stanza arriving for it,
        which room output used to skip: a recipient that blocked the
        occupant (or the room) gets nothing from it (XEP-0191 §3.3), and a
        message loses stanza-ids that claim to be anyone's but the room's
        (XEP-0359 §3.1: a forged id in the user's name poisons the client's
        archive catch-up)."""
        if stanza.tag == _MESSAGE:
            room = stanza.get("from", "").partition("/")[0]
            for sid in stanza.findall(_STANZA_ID):
                if sid.get("by") != room:
                    stanza.remove(sid)
        if lists is None or not to.local or not self.router.is_local(to):
            return False
        try:
            sender = parse_jid(stanza.get("from", ""))
        except InvalidJID:
            return False
        return bool(await lists.blocks(to, sender))

    async def _deliver(self, room: Room, effects: Effects) -> None:
        lists = self._blocklists()
        for to, stanza in effects.out:
            if await self._refused(lists, to, stanza):
                continue
            key = (room.jid, to)
            unreached = self._unreached.get(key)
            if unreached is not None and room.occupant_of(to) is not None:
                # After what it missed, in order (see UNREACHED_GRACE_SECONDS).
                if len(unreached[1]) < UNREACHED_KEPT:
                    unreached[1].append(stanza)
                continue
            if self.router.deliver(to, stanza):
                continue
            if room.occupant_of(to) is not None:
                # Its session is nowhere just now: moving, or gone.
                self._unreached[key] = (trio.current_time(), [stanza])
                self._unreached_wake.set()
            elif not to.resource or stanza.tag.endswith("}message"):
                await self.router.route(stanza)  # an invitation, a decline

    async def unreached_checker(self) -> None:
        """Occupants a delivery missed: what they were sent goes once
        their session is back (resumed on another shard); past the grace,
        one whose session is still nowhere leaves the room."""
        while True:
            if not self._unreached:
                self._unreached_wake = trio.Event()
                await self._unreached_wake.wait()
            await trio.sleep(UNREACHED_CHECK_SECONDS)
            for key in list(self._unreached):
                room_jid, real = key
                found = self._unreached.get(key)
                back = self.router.session(real) is not None
                if found is None or (not back and trio.current_time() - found[0]
                                     < UNREACHED_GRACE_SECONDS):
                    continue
                async with self._room_locks.hold(str(room_jid)):
                    with self.router.batch():  # sent to other shards at its end
                        await self._recheck(key)

    async def _recheck(self, key: tuple[JID, JID]) -> None:
        room_jid, real = key
        found = self._unreached.pop(key, None)
        room = self.rooms.get(room_jid)
        if found is None or room is None:
            return
        if self.router.session(real) is not None:
            await self._deliver(room, Effects(out=[(real, s) for s in found[1]]))
        elif room.occupant_of(real) is not None:
            # Its session ended without telling the room.
            log.info("room %s: %s unreachable for %.0f s; removed", room.jid, real,
                     UNREACHED_GRACE_SECONDS)
            await self.apply(room, room.remove_gone(real))

    async def _drop(self, room: Room, destroyed: bool) -> None:
        """The room ends: destroyed by its owner (or the directory), or a
        temporary room left empty."""
        if self.rooms.get(room.jid) is room:
            del self.rooms[room.jid]
        # Per-room state of the service goes with the room.
        self._appended.pop(str(room.jid), None)
        for key in [key for key in self._unreached if key[0] == room.jid]:
            del self._unreached[key]
        for owner in room.owners:
            await self.creators.set(owner, str(room.jid), None)
        if room.config.persistent and destroyed and self.persist is not None:
            try:
                await self.persist.delete(room.jid)
            except DirectoryError as exc:
                log.error("room %s not removed from the directory: %s", room.jid, exc)
            self.records.pop(room.jid, None)
            await self._clear_history(str(room.jid))
        await self.archive.remove(room.jid)
        log.info("room %s %s", room.jid, "destroyed" if destroyed else "ended (empty)")
        self._listing_changed()

    async def _persist(self, room: Room) -> None:
        """Write the room's entry (or remove it when it stopped being
        persistent). A directory that refuses is logged: the live room
        keeps its state and the next change tries again."""
        if self.persist is None:
            return
        try:
            if room.config.persistent:
                await self.persist.save(room)
            elif room.jid in self.records:
                await self.persist.delete(room.jid)
        except DirectoryError as exc:
            log.error("room %s not written to the directory: %s", room.jid, exc)

    async def _check_member_group(self, room: Room, stanza: ET.Element, sender: JID) -> bool:
        """An owner's form naming a member group: the group must exist
        (else item-not-found, nothing changes), and its members become the
        room's members. False when the stanza was answered here."""
        if stanza.get("type") != "set" or len(stanza) != 1 or stanza[0].tag != (
                f"{{{MUC_OWNER_NS}}}query"):
            return True
        for field in stanza[0].iter("{jabber:x:data}field"):
            if field.get("var") != MEMBER_GROUP_FIELD:
                continue
            dn = (field.findtext("{jabber:x:data}value") or "").strip()
            if not dn:
                room.group_members = None
                return True
            if room.affiliation(sender.bare) != Affiliation.OWNER:
                return True  # the room refuses it as from a non-owner
            members = await self.persist.group_members(dn) if self.persist else None
            if members is None:
                await self.router.bounce(stanza, "item-not-found",
                                         f"no directory group {dn}")
                return False
            room.group_members = members
        return True

    async def destroy(self, room_jid: JID, reason: str = "", alternate: str | None = None
                      ) -> bool:
        """Destroy a room we own (the command line, the directory)."""
        async with self._room_locks.hold(str(room_jid)):
            room = self.rooms.get(room_jid)
            if room is None:
                return False
            effects = Effects()
            room.destroy(effects, alternate, reason)
            await self.apply(room, effects)
            return True

    # -- persistent rooms from the directory ------------------------------------------

    def rooms_changed(self) -> None:
        self._rooms_dirty.set()

    async def on_directory_changes(self, batch: Sequence[Change]) -> None:
        """The change feed: entries under the rooms DN, or groups (a room's
        member group), make us read the rooms again."""
        if self.persist is None:
            return
        if self.persist.touches([c.key for c in batch]) or any(
                c.entry is not None and {str(v).lower() for v in c.entry.get("objectClass")}
                & {"groupofnames", "groupofuniquenames", "posixgroup"} for c in batch):
            self.rooms_changed()
        elif any(c.kind == "delete" for c in batch):
            self.rooms_changed()  # a deleted group shows no class

    async def follow_rooms(self) -> None:
        """Read the persistent rooms at start, after each change the feed
        reports, and every `refresh_seconds` anyway (an LDAP feed cannot
        see deletions)."""
        while True:
            self._rooms_dirty = trio.Event()
            try:
                await self.reconcile()
            except DirectoryError as exc:
                log.warning("persistent rooms not read from the directory: %s", exc)
            except Exception:
                log.exception("reading persistent rooms failed")
            self.loaded.set()
            with trio.move_on_after(self.options.refresh_seconds):
                await self._rooms_dirty.wait()

    async def reconcile(self) -> None:
        """Make our rooms what the directory says: load new ones, apply
        changes, destroy the removed (their occupants told)."""
        if self.persist is None:
            return
        records, problems = await self.persist.load()
        # Each member group is resolved once per read, however many rooms
        # name it (a resolution reads every user).
        self._groups_read = {}
        for problem in problems:
            if problem not in self._reported:  # once per problem, not per read
                log.error("room entry refused, previous configuration kept: %s", problem)
        self._reported = set(problems)
        bad = {dn.partition(":")[0] for dn in problems}
        previous, self.records = self.records, records
        for jid, record in records.items():
            if self.module.owner(str(jid)) != self.module.shard:
                continue
            async with self._room_locks.hold(str(jid)):
                room = self.rooms.get(jid)
                if room is None:
                    await self._load_room(record)
                elif not room.config.persistent or previous.get(jid) is None or not (
                        record.same_as(previous[jid])):
                    await self._update_room(room, record)
        for jid in list(self.rooms):
            async with self._room_locks.hold(str(jid)):
                room = self.rooms.get(jid)
                if room is None or not room.config.persistent or jid in records:
                    continue
                old = previous.get(jid)
                if old is not None and old.dn in bad:
                    self.records[jid] = old  # unreadable now: keep the room as it was
                    continue
                if old is None:
                    continue  # made persistent here a moment ago, not yet read back
                log.info("room %s removed from the directory: destroyed", jid)
                effects = Effects()
                room.destroy(effects, None, "the room was removed")
                room.config = room.config.replace(persistent=False)
                await self.apply(room, effects)
        for jid, record in records.items():
            if record.config.member_group and jid in self.rooms:
                async with self._room_locks.hold(str(jid)):
                    room = self.rooms.get(jid)
                    if room is not None:
                        await self._refresh_group(room, record.config.member_group)
        self._listing_changed()

    async def _load_room(self, record: RoomRecord) -> None:
        room = Room(record.jid, record.config, record.affiliations, limits=self.limits())
        room.archive_ids = self.archive.next_id
        room.subject = record.subject
        if record.config.member_group:
            room.group_members = await self._group_or_none(record)
        self.rooms[record.jid] = room
        await self.load_history(room)
        log.info("room %s loaded from the directory", record.jid)

    async def _group(self, dn: str) -> frozenset[str] | None:
        """Members of group `dn`, read once per reconciliation."""
        assert self.persist is not None
        if dn not in self._groups_read:
            self._groups_read[dn] = await self.persist.group_members(dn)
        return self._groups_read[dn]

    async def _group_or_none(self, record: RoomRecord) -> frozenset[str] | None:
        members = await self._group(record.config.member_group)
        if members is None:
            log.error("room %s: member group %s does not exist", record.dn,
                      record.config.member_group)
        return members

    async def _update_room(self, room: Room, record: RoomRecord) -> None:
        """A room entry changed in the directory: the live room follows."""
        if (record.config == room.config and record.affiliations == room.affiliations
                and record.subject == room.subject):
            return
        effects = Effects()
        if record.config != room.config:
            room.change_config(effects, record.config)
        group = room.group_members
        if record.affiliations != room.affiliations:
            effects.out += room.replace_affiliations(record.affiliations, group).out
        room.subject = record.subject
        effects.persist = False  # it came from there
        log.info("room %s changed in the directory", record.jid)
        await self.apply(room, effects)

    async def _refresh_group(self, room: Room, dn: str) -> None:
        members = await self._group(dn)
        if members != room.group_members:
            effects = room.replace_affiliations(room.affiliations, members)
            await self.apply(room, effects)

    # -- history kept for restarts ------------------------------------------------

    async def _keep_history(self, room: str, entry: HistoryEntry) -> None:
        try:
            await self.history_store.append(room, _encode(entry.stanza), at=entry.when)
            count = self._appended[room] = self._appended.get(room, 0) + 1
            if count % HISTORY_TRIM_EVERY == 0:
                await self._trim_history(room)
        except Exception:
            log.exception("could not keep a message of room %s", room)

    async def _trim_history(self, room: str) -> None:
        found = self.rooms.get(parse_jid(room))
        if found is None or not found.history:
            return
        await self.history_store.delete_before(room, found.history[0].when)

    async def _clear_history(self, room: str) -> None:
        await self.history_store.delete_before(room, time.time() + 1)

    async def load_history(self, room: Room) -> None:
        keep = min(room.config.history_length, room.limits.max_history)
        if keep <= 0:
            return
        items = await self.history_store.page(str(room.jid), limit=keep, newest_first=True)
        for item in reversed(items):
            try:
                stanza = _decode(item.value)
            except ET.ParseError:
                continue
            room.add_history(HistoryEntry(item.at, stanza, len(item.value)))

    # -- the service itself ---------------------------------------------------------

    async def _service_stanza(self, event: StanzaEvent) -> None:
        stanza = event.stanza
        kind = stanza.tag.rpartition("}")[2]
        if kind != "iq" or stanza.get("type") not in ("get", "set"):
            if kind == "message" and stanza.get("type") != "error":
                await self.router.bounce(stanza, "service-unavailable")
            return
        payload = stanza[0] if len(stanza) == 1 else None
        if stanza.get("type") == "get" and payload is not None and payload.get("node") is None:
            if payload.tag == f"{{{DISCO_INFO_NS}}}query":
                await self.router.route(iq_result(stanza, self.service_info()))
                return
            if payload.tag == f"{{{DISCO_ITEMS_NS}}}query":
                await self.router.route(iq_result(stanza, self.service_items(event.to.domain)))
                return
        await self.router.bounce(stanza, "service-unavailable")

    def service_info(self) -> ET.Element:
        query = ET.Element(f"{{{DISCO_INFO_NS}}}query")
        ET.SubElement(query, f"{{{DISCO_INFO_NS}}}identity",
                      {"category": "conference", "type": "text", "name": SERVICE_NAME})
        for var in sorted({DISCO_INFO_NS, DISCO_ITEMS_NS, MUC_NS, STANZA_ID_NS,
                           "jabber:x:conference"}):
            ET.SubElement(query, f"{{{DISCO_INFO_NS}}}feature", {"var": var})
        return query

    def service_items(self, domain: str) -> ET.Element:
        """§6.3: the public rooms of the service, from every shard."""
        query = ET.Element(f"{{{DISCO_ITEMS_NS}}}query")
        seen: set[str] = set()
        entries = [*self.public_rooms()]
        for shard, rooms in self.listing.items():
            if shard != self.module.shard:
                entries.extend(rooms)
        for jid, name in sorted(entries):
            if jid in seen or not jid.endswith("@" + domain):
                continue
            seen.add(jid)
            ET.SubElement(query, f"{{{DISCO_ITEMS_NS}}}item", {"jid": jid, "name": name})
        return query

    def public_rooms(self) -> list[tuple[str, str]]:
        return [(str(room.jid), room.config.name or room.jid.local)
                for room in self.rooms.values() if room.config.public and not room.locked]

    def _listing_changed(self) -> None:
        self._listing_dirty.set()

    async def listing_publisher(self) -> None:
        """Tell the other shards our public rooms when they change, and
        every LISTING_REFRESH_SECONDS anyway."""
        while True:
            with trio.move_on_after(LISTING_REFRESH_SECONDS):
                await self._listing_dirty.wait()
            self._listing_dirty = trio.Event()
            rooms = self.public_rooms()
            payload = "\n".join(f"{jid}\0{name}" for jid, name in rooms).encode("utf-8")
            self.module.send_bus(payload, channel=LISTING_CHANNEL)
            await trio.sleep(LISTING_DEBOUNCE_SECONDS)

    async def listing_received(self, source: int, payload: bytes) -> None:
        rooms = []
        for line in payload.decode("utf-8").split("\n"):
            if line:
                jid, _, name = line.partition("\0")
                rooms.append((jid, name))
        self.listing[source] = rooms

    # -- idle rooms -------------------------------------------------------------------

    async def idle_sweeper(self) -> None:
        """Destroy rooms idle past the configured limits."""
        while True:
            options = self.options
            limits = [x for x in (options.idle_temporary, options.idle_persistent) if x]
            # Often enough that a room outlives its limit by a fraction of it.
            await trio.sleep(max(MIN_IDLE_CHECK_SECONDS, min([IDLE_CHECK_SECONDS,
                                                              *(x / 4 for x in limits)])))
            now = time.time()
            for room in list(self.rooms.values()):
                if room.config.persistent:
                    limit = options.idle_persistent
                    idle = room.empty and limit and now - room.last_active > limit
                else:
                    limit = options.idle_temporary
                    idle = bool(limit) and now - room.last_active > limit
                if idle:
                    log.info("room %s idle for %d s: destroyed", room.jid, limit)
                    await self.destroy(room.jid, "the room was idle")

    async def shutdown(self) -> None:
        """The server stops: occupants are told (status 332)."""
        for room in list(self.rooms.values()):
            await self._deliver(room, room.shutdown())

