"""XEP-0191 blocking command: a user's blocklist, and the filters that
keep blocked JIDs and the user apart in both directions.

Filters run at high priority on the events of every stanza: outbound
(`pre-*`) stanzas to a blocked JID are refused with the XEP's error;
inbound stanzas from a JID the recipient blocked are dropped, and so are
stanzas a local user would send to a JID it blocked, which catches the
presence broadcasts and probe answers the presence module sends on the
user's behalf. Blocklists are cached while their user is online, since
every stanza to or from the user consults them.
"""

from __future__ import annotations

import copy
import secrets
import xml.etree.ElementTree as ET
from typing import TYPE_CHECKING

import trio

from mlink.hooks import StanzaEvent
from mlink.jid import JID, InvalidJID, parse_jid
from mlink.module import BOOL_CODEC
from mlink.modules.presence import send_presence_to
from mlink.modules.util import iq_result
from mlink.router.rosters import rosters_of
from mlink.router.sessions import SessionInfo
from mlink.stream.errors import stanza_error
from mlink.util.user_cache import UserCache
from mlink.xml.serialize import CLIENT_NS

if TYPE_CHECKING:
    from mlink.module import Module

BLOCKING_NS = "urn:xmpp:blocking"
BLOCKING_ERRORS_NS = "urn:xmpp:blocking:errors"
# Before every other handler of the stanza events, so nothing is routed,
# stored, copied (carbons) or answered for a blocked JID.
FILTER_PRIORITY = 100
# Subscription states under which the user sends its presence to a contact
# (RFC 6121 §2.1.2.1); unblocking re-sends it to those (XEP-0191 §3.4).
SENDS_PRESENCE = frozenset({"from", "both"})
# ... and under which it receives the contact's (probed after unblocking).
GETS_PRESENCE = frozenset({"to", "both"})
STANZA_KINDS = ("message", "presence", "iq")
# Random bytes in a push's id: unique enough among a session's iqs.
PUSH_ID_BYTES = 6
# How often the set of users who block anyone is read again from the
# store. Changes reach it at once (here, and from other shards through the
# cache invalidations), and it is read again whenever the bus to another
# shard comes (back) up, since invalidations sent while it was down were
# lost; the periodic reread bounds what else could be missed (a frame
# dropped by a full bus buffer), for one indexed query a minute.
BLOCKERS_REFRESH_SECONDS = 60.0
EMPTY: frozenset[str] = frozenset()


def candidates(jid: JID) -> tuple[str, ...]:
    """The blocklist items that match `jid`, most specific first (XEP-0191
    §3.2 uses XEP-0016 §2.1 matching: full JID, bare JID, domain/resource,
    domain)."""
    out = [str(jid)]
    if jid.resource:
        out.append(str(jid.bare))
        if jid.local:
            out.append(f"{jid.domain}/{jid.resource}")
    if jid.local:
        out.append(jid.domain)
    return tuple(out)




class Blocklists:
    """Blocklists by user, cached while the user has sessions (bounded; a
    load that overlaps a change does not cache: mlink.util.user_cache).

    Most users block nobody, yet every stanza to or from them asks. The set
    of users with any entry (`_blockers`, read at start and every
    BLOCKERS_REFRESH_SECONDS, grown by every change seen here or announced
    by another shard) answers "nothing blocked" for everyone else without a
    store read — on each shard, for every user its stanzas touch, which
    used to be one read in a worker thread per user and shard after start.
    Until the first read completes, every user is asked of the store."""

    def __init__(self, module: Module) -> None:
        self._module = module
        self._changed = module.user_cache("blocklists", self.invalidate)
        self._cache: UserCache[JID, frozenset[str]] = UserCache(module.config.caches.blocklists)
        self._blockers: set[str] | None = None
        # Users changed while a read of the set was in flight: the read may
        # predate their change, so they are kept whatever it returns.
        self._changed_during_read: set[str] | None = None
        self._read_again = trio.Event()
        self._peers_up = 0  # peer_up calls so far

    async def keep_blockers(self) -> None:
        """Read the set of users who block anyone, then again every
        BLOCKERS_REFRESH_SECONDS (a failed read keeps the last set, or the
        store-for-everyone fallback, and is retried at the next tick)."""
        while True:
            self._changed_during_read = set()
            peers_up = self._peers_up
            try:
                found = await self._module.data.blocking_users()
            except Exception as exc:
                self._module.log.warning("could not read who blocks anyone: %s", exc)
            else:
                # A peer that came up during the read may have changed lists
                # before it: the read may predate that, so it is not used
                # (the next one, at once, is).
                if peers_up == self._peers_up:
                    self._blockers = found | self._changed_during_read
            finally:
                self._changed_during_read = None
            with trio.move_on_after(BLOCKERS_REFRESH_SECONDS):
                await self._read_again.wait()
            self._read_again = trio.Event()

    def peer_up(self) -> None:
        """The bus to another shard is (again) up: what it changed while
        the bus was down was never announced here. Cached lists are
        dropped and the set of blockers is read again; until that read
        completes, every user is asked of the store."""
        self._cache.invalidate_all()
        self._peers_up += 1
        self._blockers = None
        self._read_again.set()

    def blocks_nobody(self, user: JID) -> bool:
        """Known without a store read that `user` blocks nobody."""
        blockers = self._blockers
        return blockers is not None and str(user.bare) not in blockers

    async def get(self, user: JID) -> frozenset[str]:
        user = user.bare
        if self.blocks_nobody(user):
            return EMPTY
        cached = self._cache.get(user)
        if cached is not None:
            return cached
        load = self._cache.begin(user)
        try:
            items = frozenset(await self._module.data.blocklist(str(user)))
        except BaseException:
            self._cache.finish(user, load, frozenset(), keep=False)
            raise
        # Online on any shard: every stanza to the user is checked against
        # the list, wherever it arrives (other shards' changes invalidate).
        self._cache.finish(user, load, items, keep=self._module.router.online(user))
        return items

    async def blocks(self, user: JID, other: JID) -> bool:
        """Whether `user` (a local account) blocked `other`."""
        if user.bare == other.bare or self.blocks_nobody(user):
            return False
        items = await self.get(user)
        return bool(items) and any(c in items for c in candidates(other))

    async def change(self, user: JID, block: bool, jids: list[str] | None) -> None:
        """Block or unblock (`jids` None: everyone). Until the store has
        committed, readers see the old list; then the cache is dropped and
        any load that overlapped the write is kept from caching. The user
        joins the set of blockers before the write, so no reader can see
        the new list in the store and still skip it."""
        user = user.bare
        self._note_change(str(user))
        if block:
            await self._module.data.block(str(user), jids or [])
        else:
            await self._module.data.unblock(str(user), jids)
        self.invalidate(str(user))
        self._changed(str(user))

    def invalidate(self, user_text: str) -> None:
        """Drop the cached list (changed here or, in a sharded server, on
        another shard) and keep overlapping loads from caching it."""
        self._note_change(user_text)
        self._cache.invalidate(parse_jid(user_text).bare)

    def _note_change(self, user_text: str) -> None:
        """`user_text` may block someone now. (Unblocking everyone leaves
        the user in the set until the next reread: one store read per
        stanza of theirs until then, never a missed block.)"""
        if self._blockers is not None:
            self._blockers.add(user_text)
        if self._changed_during_read is not None:
            self._changed_during_read.add(user_text)

    @property
    def size(self) -> tuple[int, int]:
        """(entries, bound), for `mlink status`."""
        return len(self._cache), self._cache.max_entries

    def forget(self, user: JID) -> None:
        """The user's last session ended: free its cache entry."""
        self._cache.forget(user)


def blocked_error(stanza: ET.Element) -> ET.Element:
    """XEP-0191 §3.6: not-acceptable with the blocking error payload."""
    reply = stanza_error(stanza, "not-acceptable", "you have blocked this JID")
    error = reply[0]
    ET.SubElement(error, f"{{{BLOCKING_ERRORS_NS}}}blocked")
    return reply


def setup(module: Module) -> None:
    router = module.router
    # XEP-0191 §3.3: sessions that requested the list get its pushes, on
    # whichever shard the change is made (replicated with the session).
    requested = module.session_field("requested", False, BOOL_CODEC)
    lists = module.shared("blocking/lists", lambda: Blocklists(module))
    rosters = rosters_of(module)
    # Stanzas this module sends past its own filters (the unavailable
    # presence XEP-0191 §3.3 owes a newly blocked contact), by identity,
    # for the duration of their routing.
    exempt: set[int] = set()

    def own_server(jid: JID) -> bool:
        """The user's own server is never filtered: blocking its domain
        must not cut the user off from the answers to its iqs."""
        return not jid.local and router.is_local(jid)

    async def outbound(event: StanzaEvent) -> bool:
        if lists.blocks_nobody(event.sender):
            return False
        if own_server(event.to) or not await lists.blocks(event.sender, event.to):
            return False
        stanza = event.stanza
        if event.kind != "presence" and stanza.get("type") not in ("error", "result"):
            router.deliver(event.sender, blocked_error(stanza))
        return True

    async def inbound(event: StanzaEvent) -> bool:
        if id(event.stanza) in exempt or own_server(event.sender):
            return False
        recipient, sender = event.to, event.sender
        if lists.blocks_nobody(recipient) and (event.origin is not None
                                                or lists.blocks_nobody(sender)):
            return False
        refused = await lists.blocks(recipient, sender)
        # Whether a local sender blocked the recipient: `outbound` already
        # asked that of a stanza from a local client (`origin` set) in its
        # pre- event; asked here for what the server or a module routes.
        if not refused and event.origin is None and router.is_local(sender) and sender.local:
            refused = await lists.blocks(sender, recipient)
        if not refused:
            return False
        if event.kind == "iq" and event.type in ("get", "set"):
            # §3.5: an iq must get an answer; say nothing is there.
            await router.bounce(event.stanza, "service-unavailable")
        return True  # messages and presence vanish silently

    async def get_list(event: StanzaEvent) -> bool:
        if event.stanza[0].tag != f"{{{BLOCKING_NS}}}blocklist":
            await router.bounce(event.stanza, "bad-request")
            return True
        if event.origin is not None:
            # XEP-0191 §3.3: this session now gets the list's pushes.
            requested.set(event.origin, True)
        payload = ET.Element(f"{{{BLOCKING_NS}}}blocklist")
        for jid in sorted(await lists.get(event.sender)):
            ET.SubElement(payload, f"{{{BLOCKING_NS}}}item", {"jid": jid})
        await router.route(iq_result(event.stanza, payload))
        return True

    async def set_list(event: StanzaEvent) -> bool:
        command = event.stanza[0]
        block = command.tag == f"{{{BLOCKING_NS}}}block"
        if not block and command.tag != f"{{{BLOCKING_NS}}}unblock":
            await router.bounce(event.stanza, "bad-request")
            return True
        jids: list[str] = []
        for item in command.iter(f"{{{BLOCKING_NS}}}item"):
            try:
                jids.append(str(parse_jid(item.get("jid", ""))))
            except InvalidJID:
                await router.bounce(event.stanza, "jid-malformed")
                return True
        if block and not jids:
            # §3.3: a block command needs at least one item.
            await router.bounce(event.stanza, "bad-request", "nothing to block")
            return True
        user = event.sender.bare
        before = await lists.get(user)
        await lists.change(user, block, jids if jids or block else None)
        await router.route(iq_result(event.stanza))
        push(user, command)
        if block:
            await _hide_presence(user, [j for j in jids if j not in before])
        else:
            await _show_presence(user, list(before) if not jids else jids)
        return True

    def push(user: JID, command: ET.Element) -> None:
        """§3.3/§3.4: the change goes to every session that asked for the
        blocklist, the one that made it included."""
        for info in router.resources(user):
            if requested.get(info):
                iq = ET.Element(f"{{{CLIENT_NS}}}iq",
                                {"type": "set", "id": "push-" + secrets.token_hex(PUSH_ID_BYTES),
                                 "to": str(info.jid)})
                iq.append(copy.deepcopy(command))
                router.deliver(info.jid, iq)

    async def _hide_presence(user: JID, jids: list[str]) -> None:
        """§3.3: a contact that saw the user online is told it went offline."""
        senders = [i for i in router.resources(user) if i.available]
        if not senders or not jids:
            return
        roster = (await rosters.get(str(user))).items

        def saw_presence(jid: str) -> bool:
            item = roster.get(jid)
            if item is not None and item.subscription in SENDS_PRESENCE:
                return True
            return any(to == jid or to.startswith(jid + "/")
                       for info in senders for to in info.directed_to)

        for jid in jids:
            if not saw_presence(jid):
                continue
            for info in senders:
                presence = ET.Element(f"{{{CLIENT_NS}}}presence",
                                      {"type": "unavailable", "from": str(info.jid), "to": jid})
                await _route_exempt(presence)

    async def _show_presence(user: JID, jids: list[str]) -> None:
        """§3.4: an unblocked contact subscribed to the user gets its
        presence again, and the user that of a contact it subscribes to."""
        if not any(i.available for i in router.resources(user)) or not jids:
            return
        items = (await rosters.get(str(user))).items
        for jid in jids:
            item = items.get(jid)
            if item is None:
                continue
            if item.subscription in SENDS_PRESENCE:
                await send_presence_to(module, user, parse_jid(jid))
            if item.subscription in GETS_PRESENCE:
                await router.route(ET.Element(f"{{{CLIENT_NS}}}presence",
                                              {"type": "probe", "from": str(user), "to": jid}))

    async def _route_exempt(stanza: ET.Element) -> None:
        exempt.add(id(stanza))
        try:
            await router.route(stanza)
        finally:
            exempt.discard(id(stanza))

    async def session_closed(info: SessionInfo) -> None:
        if not router.resources(info.jid.bare):
            lists.forget(info.jid.bare)

    module.add_feature(BLOCKING_NS)
    module.hook(f"iq-get/self/{BLOCKING_NS}", get_list)
    module.hook(f"iq-set/self/{BLOCKING_NS}", set_list)
    for kind in STANZA_KINDS:
        for scope in ("bare", "full", "host"):
            module.hook(f"pre-{kind}/{scope}", outbound, FILTER_PRIORITY)
        for scope in ("bare", "full"):
            module.hook(f"{kind}/{scope}", inbound, FILTER_PRIORITY)
    module.hook("session/closed", session_closed)
    module.spawn(lists.keep_blockers)

    async def peer_up(shard: int) -> None:
        lists.peer_up()

    module.hook("cluster/peer-up", peer_up)

