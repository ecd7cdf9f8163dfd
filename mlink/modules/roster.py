"""RFC 6121 §2: roster get, set and remove, roster pushes and versioning.

The roster version (§2.6) is the one `mlink.router.rosters` computes: the
store's per-user counter (or a hash of a static roster's values), with a
digest of the shared directory-group items appended when there are any. A
client that presents the current version gets an empty result; any other
gets the whole roster (§2.6.3 lets the server choose between the whole
roster and the pushes of the missed changes; versions cannot replay
changes, so we send the roster, which is always correct).

Subscription states change only through presence (`mlink.modules.
subscription`); a roster set may name, group and add items, or remove them.

Items provided by directory groups (roster pre-population) may be renamed
and put in more groups: that is stored as the user's own (personal) item,
merged over the group item, with the directory's group names left out (they
come back from the directory anyway). They cannot be removed: the directory,
not the user, decides who is in a department, so a remove is answered
`not-allowed`, naming the groups, rather than pretending to succeed and
having the item reappear at the next login.
"""

from __future__ import annotations

import logging
import xml.etree.ElementTree as ET
from typing import TYPE_CHECKING

from mlink.hooks import StanzaEvent
from mlink.jid import JID, InvalidJID, parse_jid
from mlink.modules import presence
from mlink.modules.util import iq_result
from mlink.router.roster_push import ROSTER_NS, item_element, push_item
from mlink.router.rosters import RosterCache, RosterUnavailable, UserRoster, rosters_of
from mlink.router.sessions import SessionInfo
from mlink.store import RosterItem, StoreError
from mlink.stream.errors import stanza_error
from mlink.xml.serialize import CLIENT_NS

if TYPE_CHECKING:
    from mlink.module import Module

log = logging.getLogger(__name__)

ROSTERVER_FEATURE = "{urn:xmpp:features:rosterver}ver"
# RFC 6121 §2.1.2.4 / §2.3.3: "server-configured limits" on the lengths of
# item names and group names; as long as a JID part (RFC 7622 §3.1).
MAX_NAME_BYTES = 1023


class RosterSetError(Exception):
    """A roster set the server refuses: the stanza error condition."""

    def __init__(self, condition: str, text: str) -> None:
        super().__init__(text)
        self.condition = condition
        self.text = text


def setup(module: Module) -> None:
    rosters = rosters_of(module)

    async def handle_get(event: StanzaEvent) -> bool:
        iq, origin = event.stanza, event.origin
        if origin is None:
            return False
        try:
            roster = await rosters.get(str(origin.jid.bare))
        except StoreError as exc:
            log.warning("roster of %s unavailable: %s", origin.jid.bare, exc)
            store_failed(module, iq, exc)
            return True
        # §2.2: a resource that asked for the roster gets roster pushes.
        origin.interested = True
        version = roster.version
        if iq[0].get("ver") == version:
            # §2.6.3: up to date; nothing to send.
            await module.router.route(iq_result(iq))
            return True
        query = ET.Element(f"{{{ROSTER_NS}}}query", {"ver": version})
        for item in roster.items.values():
            query.append(item_element(item))
        await module.router.route(iq_result(iq, query))
        return True

    async def handle_set(event: StanzaEvent) -> bool:
        iq = event.stanza
        try:
            await roster_set(module, rosters, event.sender.bare, iq[0])
        except RosterSetError as exc:
            await module.router.bounce(iq, exc.condition, exc.text)
            return True
        except StoreError as exc:
            log.warning("roster set for %s failed: %s", event.sender.bare, exc)
            store_failed(module, iq, exc)
            return True
        await module.router.route(iq_result(iq))
        return True

    async def handle_foreign(event: StanzaEvent) -> bool:
        # §2.1.3/§2.3.3: only the account's own resources may read or change
        # its roster.
        await module.router.bounce(event.stanza, "forbidden")
        return True

    async def session_closed(info: SessionInfo) -> None:
        if not module.router.resources(info.jid.bare):
            rosters.evict(str(info.jid.bare))

    module.hook(f"iq-get/self/{ROSTER_NS}", handle_get)
    module.hook(f"iq-set/self/{ROSTER_NS}", handle_set)
    module.hook(f"iq-get/bare/{ROSTER_NS}", handle_foreign)
    module.hook(f"iq-set/bare/{ROSTER_NS}", handle_foreign)
    # Last, after the presence module has broadcast the unavailable presence
    # from the cached roster.
    module.hook("session/closed", session_closed, priority=-100)
    module.add_stream_feature(lambda stream: ET.Element(ROSTERVER_FEATURE), authenticated=True)


async def roster_set(module: Module, rosters: RosterCache, user: JID,
                     query: ET.Element) -> None:
    """Apply a roster set (§2.3, §2.4, §2.5) from one of `user`'s resources."""
    items = query.findall(f"{{{ROSTER_NS}}}item")
    if len(items) != 1:
        raise RosterSetError("bad-request", "a roster set carries exactly one item")
    item = items[0]
    jid_text = item.get("jid")
    if not jid_text:
        raise RosterSetError("bad-request", "the item has no jid")
    try:
        contact = parse_jid(jid_text)
    except InvalidJID:
        raise RosterSetError("jid-malformed", "the item's jid is not a valid JID") from None
    if contact.bare == user:
        # Your own presence reaches your resources anyway (§4.2.2); an item
        # for yourself would only make subscriptions to yourself, which
        # Prosody refuses the same way.
        raise RosterSetError("not-allowed", "you cannot add yourself to your roster")
    if item.get("subscription") == "remove":
        await remove_item(module, rosters, user, str(contact))
        return
    # §2.1.2: `subscription` (other than remove), `ask` and `approved` in a
    # roster set are the server's to manage; they are ignored.
    name = item.get("name") or None
    if name is not None and len(name.encode()) > MAX_NAME_BYTES:
        raise RosterSetError("not-acceptable", "the item name is too long")
    groups = [g.text or "" for g in item.findall(f"{{{ROSTER_NS}}}group")]
    if len(set(groups)) != len(groups):
        raise RosterSetError("bad-request", "duplicate group")
    for group in groups:
        if not group:
            raise RosterSetError("not-acceptable", "empty group name")
        if len(group.encode()) > MAX_NAME_BYTES:
            raise RosterSetError("not-acceptable", "group name too long")
    c = str(contact)
    most = module.config.limits.max_roster_items
    async with rosters.locked(str(user)) as roster:
        old = roster.personal.get(c)
        shared = roster.shared_groups(c)
        if most and old is None and not shared and len(roster.personal) >= most:
            # A quota, permanent until items are removed: `not-allowed`
            # (RFC 6120 §8.3.3.10), with the figure in the text.
            raise RosterSetError("not-allowed",
                                 f"your roster is full: at most {most} items")
        new = RosterItem(
            c, name, tuple(g for g in groups if g not in shared),
            subscription=old.subscription if old else "none",
            ask=old.ask if old else False,
            approved=old.approved if old else False,
        )
        if shared:
            # A directory-provided contact: keep a personal item only while
            # it adds something (a name, groups, subscription state), so a
            # member who leaves the group leaves no empty item behind.
            if _adds_nothing(new):
                if old is not None:
                    await rosters.delete(roster, c)
            elif new != old:
                await rosters.put(roster, new)
            # Always push: the client may have tried to drop a directory
            # group, and must be shown the item as it stands.
            push(module, roster, roster.items[c])
        elif new != old:
            push(module, roster, await rosters.put(roster, new))


def _adds_nothing(item: RosterItem) -> bool:
    """A personal item that is only what the shared item shows anyway."""
    return (item.name is None and not item.groups and item.subscription == "none"
            and not item.ask and not item.approved)


async def remove_item(module: Module, rosters: RosterCache, user: JID, contact: str) -> None:
    """§2.5.2: delete the item, cancelling the subscriptions both ways."""
    async with rosters.locked(str(user)) as roster:
        shared = roster.shared_groups(contact)
        if shared:
            raise RosterSetError(
                "not-allowed",
                f"{contact} is in your roster through the directory group"
                f"{'s' if len(shared) > 1 else ''} {', '.join(sorted(shared))}"
                " and cannot be removed")
        item = roster.personal.get(contact)
        if item is None:
            raise RosterSetError("item-not-found", "no such roster item")
        had_request = await rosters.drop_pending(roster, contact)
        await rosters.delete(roster, contact)
        push(module, roster, RosterItem(contact), remove=True)
    contact_jid = parse_jid(contact)
    if item.subscription in ("to", "both") or item.ask:
        await module.router.route(subscription_stanza("unsubscribe", user, contact_jid))
    if item.subscription in ("from", "both") or had_request:
        await module.router.route(subscription_stanza("unsubscribed", user, contact_jid))
    if item.subscription in ("from", "both"):
        await presence.send_unavailable_to(module, user, contact_jid)


# -- helpers the presence and subscription modules share ------------------------------


def push(module: Module, roster: UserRoster, item: RosterItem, remove: bool = False,
         version: str | None = None) -> None:
    """§2.1.6: a roster push of `item` to each interested resource. Sent
    without `from`, which clients take as from their own account. `version`
    defaults to the roster's current one; a group refresh that pushes
    several changes gives each the version right after it."""
    if version is None:
        version = roster.version
    push_item(module.router, roster.user, item, remove, version)


def store_failed(module: Module, stanza: ET.Element, exc: StoreError | None = None) -> None:
    """Tell the local sender of `stanza` that the store failed: `wait`, as
    the request may well succeed later and nothing was done. A static
    roster's directory says what happened itself (`RosterUnavailable`):
    unavailable is `service-unavailable`, a refusal is not worth a retry."""
    if isinstance(exc, RosterUnavailable):
        error = stanza_error(stanza, exc.condition, exc.text, exc.error_type)
    else:
        error = stanza_error(stanza, "internal-server-error", "storage unavailable", "wait")
    if sender := stanza.get("from"):
        module.router.deliver(parse_jid(sender), error)


def subscription_stanza(kind: str, sender: JID, to: JID) -> ET.Element:
    """A subscription presence between two bare JIDs (§3.1.2 stamps them)."""
    return ET.Element(f"{{{CLIENT_NS}}}presence",
                      {"type": kind, "from": str(sender.bare), "to": str(to.bare)})
