"""Room archives (XEP-0313 for multi-user chat, `urn:xmpp:mam:2`).

A room that archives (`muc#roomconfig_enablearchiving`, ejabberd's `mam`;
on for new rooms unless `<archive-default>` says otherwise) keeps every
groupchat message with a body and every subject change it broadcasts, once,
in `module.store.archive("rooms")` under the room's JID. The archive id is
the XEP-0359 stanza-id (`by` = the room) the occupants got on the live
message, so a client that saw a message pages the archive from it.

Everything happens on the room's owner shard (`module.owner`): the room
makes the id while it handles the message, the writer of that shard writes
it (behind delivery, in batches, as user archives do: `mam.Writer`), and a
query, being a stanza for the room, reaches the same shard, which first
waits for its own writes.

Who may read it (XEP-0313 §7.1.2): whoever may enter now. Occupants; in a
members-only room, members, admins and owners; in other rooms, anybody but
outcasts when the room is public and has no password (a hidden or
password-protected room: members and up, or occupants). Results come from
the room JID, each message as broadcast (`from` the sender's room JID, no
`to`); the sender's real JID (`<x xmlns='…muc#user'><item jid/>`) only for
those allowed to see real JIDs (a non-anonymous room, moderators, admins
and owners). `with` is a room JID with a nick (that nick's messages) or,
for those who may see real JIDs, a real JID (that user's messages).

A room that ends (destroyed, or a temporary room left empty) takes its
archive with it: a new room of the same name, perhaps someone else's, must
not show it. `archive-retention-days` deletes old items hourly.
"""

from __future__ import annotations

import logging
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from typing import TYPE_CHECKING

import trio

from mlink.jid import JID
from mlink.modules.mam import RETENTION_BATCH, RETENTION_INTERVAL, WRITE_BATCH, Writer
from mlink.modules.mam_query import (
    MAM_NS,
    QueryError,
    fin,
    metadata,
    parse_query,
    query_form,
    result_message,
    run_query,
)
from mlink.modules.muc.roles import Affiliation, Role
from mlink.modules.muc.room import MUC_USER_NS, Archived, Room
from mlink.modules.util import iq_result
from mlink.store.module_store import ArchivedItem
from mlink.xml.serialize import serialize

if TYPE_CHECKING:
    from mlink.module import Module

# Results per page for a requester whose session is on another shard: its
# results cannot be paced by the session's writes (`deliver_tracked` is for
# local sessions), so a page must fit the output bound unpaced: 100
# messages of at most `max-message-bytes` (16 KiB by default) is 1.6 MiB,
# under the 4 MiB bound.
REMOTE_MAX_PAGE = 100
log = logging.getLogger("mlink.modules.muc")
_X = f"{{{MUC_USER_NS}}}x"


def _q(tag: str) -> str:
    return f"{{{MAM_NS}}}{tag}"


class RoomArchive:
    """The room archives of one shard (see the module docstring)."""

    def __init__(self, module: Module, retention_days: Callable[[], int]) -> None:
        self.module = module
        self.router = module.router
        self.store = module.store.archive("rooms")
        self.writer = Writer(module, self.store)
        self._retention_days = retention_days

    def next_id(self) -> int:
        return self.writer.ids.next()

    async def add(self, room: Room, entries: list[Archived]) -> None:
        """Archive what the room just broadcast, with the sender's real JID."""
        for entry in entries:
            stored = ET.Element(entry.stanza.tag, entry.stanza.attrib)
            stored.text = entry.stanza.text
            stored.extend(list(entry.stanza))
            x = ET.SubElement(stored, _X)
            ET.SubElement(x, f"{{{MUC_USER_NS}}}item", {"jid": str(entry.sender)})
            await self.writer.add((entry.id, str(room.jid), entry.when, str(entry.sender.bare),
                                   serialize(stored, stream_ns="")))

    async def remove(self, room_jid: JID) -> None:
        """The room ended: its archive goes (what is still being written
        first, so nothing of it is left behind)."""
        await self.writer.flush_bounded()
        try:
            await self.store.delete_all(str(room_jid))
        except Exception:
            log.exception("archive of room %s not deleted", room_jid)

    # -- queries ------------------------------------------------------------------------

    @staticmethod
    def refusal(room: Room, sender: JID) -> str:
        """Why `sender` may not read the room's archive ("" when it may)."""
        aff = room.affiliation(sender.bare)
        if aff == Affiliation.OUTCAST:
            return "you are banned from this room"
        if room.occupant_of(sender) is not None or aff >= Affiliation.MEMBER:
            return ""
        config = room.config
        if config.members_only:
            return "only members may read this room's archive"
        if not config.public or config.needs_password:
            return "only occupants and members may read this room's archive"
        return ""

    @staticmethod
    def sees_jids(room: Room, sender: JID) -> bool:
        if room.config.non_anonymous or room.affiliation(sender.bare) >= Affiliation.ADMIN:
            return True
        occupant = room.occupant_of(sender)
        return occupant is not None and occupant.role == Role.MODERATOR

    async def handle(self, room: Room, stanza: ET.Element, sender: JID) -> None:
        """An iq in `urn:xmpp:mam:2` for the room (its owner shard)."""
        kind, payload = stanza.get("type"), stanza[0]
        if kind not in ("get", "set"):
            return
        if room.locked and room.affiliation(sender.bare) != Affiliation.OWNER:
            await self.router.bounce(stanza, "item-not-found")
            return
        if not room.archiving:
            await self.router.bounce(stanza, "feature-not-implemented",
                                     "this room keeps no archive")
            return
        refusal = self.refusal(room, sender)
        if refusal:
            await self.router.bounce(stanza, "forbidden", refusal)
            return
        if kind == "get" and payload.tag == _q("query"):
            await self.router.route(iq_result(stanza, query_form()))
        elif kind == "get" and payload.tag == _q("metadata"):
            await self._flush()
            await self.router.route(iq_result(stanza, await metadata(self.store,
                                                                     str(room.jid))))
        elif kind == "set" and payload.tag == _q("query"):
            await self._query(room, stanza, sender)
        else:
            await self.router.bounce(stanza, "bad-request", "not an archive request")

    async def _flush(self) -> None:
        await self.writer.flush_bounded()

    async def _query(self, room: Room, stanza: ET.Element, sender: JID) -> None:
        element = stanza[0]
        sees = self.sees_jids(room, sender)
        local = self.router.deliver_tracked  # checked per result: None when not here
        try:
            q = parse_query(element)
            with_index: str | None = None
            accept: Callable[[ArchivedItem], bool] | None = None
            peer = q.with_jid
            if peer is not None and peer.bare == room.jid:
                wanted = str(peer)  # a nick's messages (the bare room: its own)

                def accept(item: ArchivedItem) -> bool:
                    return _stored_attr(item, "from") == wanted
            elif peer is not None:
                if not sees:
                    raise QueryError("forbidden", "this room does not show real JIDs to you")
                with_index = str(peer.bare)
                if peer.resource:
                    full = str(peer)

                    def accept(item: ArchivedItem) -> bool:
                        return _sender(item) == full
            if self.router.sessions.get(sender) is None:
                q.limit = min(q.limit, REMOTE_MAX_PAGE)  # see REMOTE_MAX_PAGE
            await self._flush()
            page = await run_query(self.store, str(room.jid), q, with_index=with_index,
                                   accept=accept)
        except QueryError as exc:
            await self.router.bounce(stanza, exc.condition, exc.text)
            return
        queryid = element.get("queryid")
        room_jid = str(room.jid)
        for n, item in enumerate(page.sent, 1):
            result = result_message(sender, room_jid, queryid, item, self._shown(item, sees))
            receipt = local(sender, result)
            if receipt is None:
                if not self.router.deliver(sender, result):
                    return  # the session ended
            elif n % WRITE_BATCH == 0 and not await receipt.written():
                return
        await self.router.route(iq_result(stanza, fin(page)))

    def _shown(self, item: ArchivedItem, sees: bool) -> ET.Element | None:
        try:
            message = ET.fromstring(item.value)
        except ET.ParseError:
            log.error("unreadable archived room message %d", item.id)
            return None
        if not sees:
            for x in message.findall(_X):
                message.remove(x)
        return message

    # -- retention ----------------------------------------------------------------------

    async def retention(self) -> None:
        while True:
            await trio.sleep(RETENTION_INTERVAL)
            days = self._retention_days()
            if not days:
                continue
            cutoff = time.time() - days * 86400
            deleted, total = RETENTION_BATCH, 0
            while deleted == RETENTION_BATCH:
                deleted = await self.store.delete_older(cutoff, RETENTION_BATCH)
                total += deleted
            if total:
                log.info("retention: %d archived room message(s) deleted", total)


def _stored_attr(item: ArchivedItem, name: str) -> str | None:
    try:
        return ET.fromstring(item.value).get(name)
    except ET.ParseError:
        return None


def _sender(item: ArchivedItem) -> str | None:
    """The real full JID the room stored with an item."""
    try:
        message = ET.fromstring(item.value)
    except ET.ParseError:
        return None
    found = message.find(f"{_X}/{{{MUC_USER_NS}}}item")
    return None if found is None else found.get("jid")
