"""RFC 6121 §4: presence broadcast, probes, directed presence, unavailable.

A session's broadcast presence (no `to`) goes to the contacts subscribed to
the user (`from` or `both`) and to all of the user's available resources,
the sender included (§4.2.2, §4.4.2). The first one of a session, or the
first after unavailable, is initial presence: the server then probes the
contacts the user is subscribed to (`to` or `both`), shows the new resource
the user's other resources, and fires `session/initial-presence`, where the
subscription module delivers pending requests and the offline module
stored messages.

Probes are answered here for every local account (§4.3.2): with the last
available presence of each of the contact's available resources, or, when
the contact has none, with a bare `unavailable` from the contact's bare JID
(the "SHOULD" of §4.3.2; we keep no last unavailable presence to replay).
A probe from an entity not subscribed to the contact is ignored: nothing is
revealed, and we do not answer `unsubscribed`, which would cancel a pending
subscription request of a client that merely probed.

Everything is routed through `Router.route`, so blocking and similar
filters see each stanza; only the user's own resources are delivered to
directly. Rosters come from the roster cache, never from the store.
"""

from __future__ import annotations

import logging
import xml.etree.ElementTree as ET
from collections.abc import Iterable
from typing import TYPE_CHECKING

from mlink.hooks import StanzaEvent
from mlink.jid import JID, InvalidJID, parse_jid
from mlink.router.rosters import UserRoster, rosters_of
from mlink.router.sessions import SessionInfo
from mlink.store import StoreError
from mlink.xml.serialize import CLIENT_NS, Shared

if TYPE_CHECKING:
    from mlink.module import Module

log = logging.getLogger(__name__)

SUBSCRIPTION_TYPES = frozenset({"subscribe", "subscribed", "unsubscribe", "unsubscribed"})
# RFC 6121 §4.7.2.3: the range of <priority/>.
MIN_PRIORITY, MAX_PRIORITY = -128, 127


class BadPriority(ValueError):
    """`<priority/>` is not an integer from -128 to 127."""


# The bus channel on which one shard asks the others to send a user's
# presence (that shard's sessions of the user) to someone.
PRESENT_CHANNEL = "present"
# The name other modules find this module's context by (`Module.shared`).
CONTEXT_SERVICE = "presence/context"


def setup(module: Module) -> None:
    rosters_of(module)  # created before the first session needs it
    module.shared(CONTEXT_SERVICE, lambda: module)

    async def present_elsewhere(source: int, payload: bytes) -> None:
        """Another shard asks: send `user`'s presence, as held by this
        shard's sessions, to `to` (a probe answer, a new subscriber)."""
        user_text, _, to_text = payload.decode("utf-8").partition("\0")
        try:
            user, to = parse_jid(user_text), parse_jid(to_text)
        except InvalidJID:
            return
        await _send_local_presence(module, user, to)

    module.on_bus(present_elsewhere, channel=PRESENT_CHANNEL)

    async def outbound(event: StanzaEvent) -> bool:
        """Presence from a local client (`pre-presence/*`)."""
        kind, origin = event.type, event.origin
        if origin is None or kind in SUBSCRIPTION_TYPES or kind == "error":
            return False
        own = origin.jid.bare
        if event.to == own:
            # No `to` (or the user's own bare JID): broadcast presence.
            if kind is None:
                try:
                    priority = presence_priority(event.stanza)
                except BadPriority as exc:
                    await module.router.bounce(event.stanza, "bad-request", str(exc))
                    return True
                await become_available(module, origin, event.stanza, priority)
            elif kind == "unavailable":
                await become_unavailable(module, origin, event.stanza)
            return True  # a probe of oneself: nothing to learn
        if kind in (None, "unavailable") and event.to.bare != own:
            # §4.6.3: remember directed presence to those who do not get the
            # broadcast, to send them unavailable when the session ends.
            if kind == "unavailable":
                origin.directed_to.discard(str(event.to))
            elif str(event.to.bare) not in await _subscribers_or_empty(module, own):
                origin.directed_to.add(str(event.to))
        return False  # the router delivers it

    async def inbound(event: StanzaEvent) -> bool:
        """Presence for a local account (`presence/*`): probes end here."""
        if event.type != "probe":
            return False
        await answer_probe(module, event.sender, event.to.bare)
        return True

    async def session_closed(info: SessionInfo) -> None:
        if info.available or info.directed_to:
            unavailable = ET.Element(f"{{{CLIENT_NS}}}presence", {"type": "unavailable"})
            await become_unavailable(module, info, unavailable)

    for scope in ("bare", "full"):
        module.hook(f"pre-presence/{scope}", outbound)
        module.hook(f"presence/{scope}", inbound)
    module.hook("session/closed", session_closed)


# -- the three transitions of a session ----------------------------------------------


async def become_available(module: Module, info: SessionInfo, stanza: ET.Element,
                           priority: int) -> None:
    """Broadcast available presence (§4.2.2 initial, §4.4.2 update)."""
    initial = not info.available
    info.presence = addressed(stanza, info.jid, None)
    info.priority = priority
    info.initial_presence_sent = True
    own = info.jid.bare
    roster = await _roster_or_none(module, own)
    # One serialisation for every recipient (per stream framing); each copy
    # is still routed, so blocking and other filters see it.
    shared = Shared(info.presence)
    if roster is not None:
        for contact in subscribers(roster):
            await module.router.route(shared.addressed(contact))
    for other in module.router.resources(own):
        if other.available:
            module.router.deliver(other.jid, shared.addressed(str(other.jid)))
    if not initial:
        return
    for other in module.router.resources(own):
        if other is not info and other.presence is not None:
            module.router.deliver(info.jid, addressed(other.presence, other.jid, str(info.jid)))
    if roster is not None:
        for contact in publishers(roster):
            probe = ET.Element(f"{{{CLIENT_NS}}}presence",
                               {"type": "probe", "from": str(info.jid), "to": contact})
            await module.router.route(probe)
    await module.fire("session/initial-presence", info)


async def become_unavailable(module: Module, info: SessionInfo, stanza: ET.Element) -> None:
    """§4.5.2: unavailable to subscribers, own resources and everyone who
    got directed presence (§4.6.3); also when the session just ended."""
    was_available = info.available
    info.presence = None
    unavailable = Shared(addressed(stanza, info.jid, None))
    own = info.jid.bare
    sent: set[str] = set()
    if was_available:
        roster = await _roster_or_none(module, own)
        if roster is not None:
            for contact in subscribers(roster):
                sent.add(contact)
                await module.router.route(unavailable.addressed(contact))
        targets = [i for i in module.router.resources(own) if i.available or i is info]
        for other in targets:
            module.router.deliver(other.jid, unavailable.addressed(str(other.jid)))
    directed, info.directed_to = info.directed_to, set()
    for to in sorted(directed):
        try:
            if str(parse_jid(to).bare) in sent:
                continue
        except InvalidJID:
            continue
        await module.router.route(unavailable.addressed(to))


async def answer_probe(module: Module, prober: JID, contact: JID) -> None:
    """§4.3.2: tell `prober` the presence of local account `contact`."""
    # Members of a shared directory group are subscribed both ways: known
    # from memory, without a directory lookup or a roster load per probe
    # (a member of a 5,000-member group sends 4,999 of them at login).
    if prober.bare != contact and not rosters_of(module).shares_group(
            str(contact), str(prober.bare)):
        if not await module.router.account_exists(contact):
            return
        roster = await _roster_or_none(module, contact)
        if roster is None:
            return
        item = roster.items.get(str(prober.bare))
        if item is None or item.subscription not in ("from", "both"):
            return
    # Each shard answers for its own sessions of the contact, as it holds
    # them when the question arrives (a contact logging in on another shard
    # right now is either seen there, or its own broadcast reaches us).
    await send_presence_to(module, contact, prober)
    if not module.router.resources(contact):
        # Known nowhere: say so (§4.3.2). Sent before any other shard's
        # answer can arrive, so a resource that comes up meanwhile wins.
        await module.router.route(ET.Element(
            f"{{{CLIENT_NS}}}presence",
            {"type": "unavailable", "from": str(contact), "to": str(prober)}))


# -- helpers other modules reuse (subscription, blocking, last activity) ---------------


async def send_presence_to(module: Module, user: JID, to: JID) -> None:
    """Route the current presence of each of `user`'s available resources
    to `to` (after a subscription is approved, §3.1.5; to answer a probe):
    this shard's at once, the other shards' by each shard itself."""
    await _send_local_presence(module, user, to)
    presence: Module | None = module.shared(CONTEXT_SERVICE, lambda: None)
    if presence is not None:
        presence.send_bus(f"{user.bare}\0{to}".encode(), channel=PRESENT_CHANNEL)


async def _send_local_presence(module: Module, user: JID, to: JID) -> None:
    for info in module.router.local_resources(user.bare):
        if info.presence is not None:
            await module.router.route(addressed(info.presence, info.jid, str(to)))


async def send_unavailable_to(module: Module, user: JID, to: JID) -> None:
    """Route unavailable from each of `user`'s available resources to `to`
    (after a subscription is cancelled, §3.2.2, §3.3.3; when blocking)."""
    for info in module.router.resources(user.bare):
        if info.available:
            await module.router.route(ET.Element(
                f"{{{CLIENT_NS}}}presence",
                {"type": "unavailable", "from": str(info.jid), "to": str(to)}))


def subscribers(roster: UserRoster) -> Iterable[str]:
    """Contacts who get the user's presence (`from`, `both`)."""
    return [jid for jid, item in roster.items.items() if item.subscription in ("from", "both")]


def publishers(roster: UserRoster) -> Iterable[str]:
    """Contacts whose presence the user gets (`to`, `both`)."""
    return [jid for jid, item in roster.items.items() if item.subscription in ("to", "both")]


def addressed(stanza: ET.Element, sender: JID, to: str | None) -> ET.Element:
    """A copy of `stanza` from `sender` to `to` (no `to` when None). The
    children are shared: nobody changes a presence's payload."""
    attrib = dict(stanza.attrib)
    attrib["from"] = str(sender)
    attrib.pop("to", None)
    if to is not None:
        attrib["to"] = to
    copy = ET.Element(stanza.tag, attrib)
    copy.text = stanza.text
    copy.extend(list(stanza))
    return copy


def presence_priority(stanza: ET.Element) -> int:
    """The `<priority/>` of an available presence, 0 when absent."""
    text = stanza.findtext(f"{{{CLIENT_NS}}}priority")
    if text is None:
        return 0
    try:
        value = int(text.strip())
    except ValueError:
        raise BadPriority("priority must be an integer") from None
    if not MIN_PRIORITY <= value <= MAX_PRIORITY:
        raise BadPriority("priority must be from -128 to 127")
    return value


async def _roster_or_none(module: Module, user: JID) -> UserRoster | None:
    """The roster, or None (logged) if the store cannot be read: presence
    then still reaches the user's own resources and directed recipients."""
    try:
        return await rosters_of(module).get(str(user))
    except StoreError as exc:
        log.warning("roster of %s unavailable for presence: %s", user, exc)
        return None


async def _subscribers_or_empty(module: Module, user: JID) -> Iterable[str]:
    roster = await _roster_or_none(module, user)
    return set(subscribers(roster)) if roster is not None else set()
