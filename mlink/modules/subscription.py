"""RFC 6121 §3: presence subscriptions, the state machine of Appendix A.

Each local account's side of a subscription is its roster item for the
contact (`subscription` none/to/from/both, `ask` for Pending Out, `approved`
for a pre-approval, §3.4) plus a stored inbound request (Pending In). A
subscription stanza changes the sender's side when it leaves (`pre-presence`,
Appendix A.2) and the recipient's side when it arrives (`presence`, A.3);
every account is local, so both run here, one after the other, each under
its own user's roster lock and never both at once.

What each side sends besides the stanza itself:
- roster pushes to the interested resources of the side that changed;
- after `subscribed` leaves, the approver's available presence goes to the
  new subscriber (§3.1.5); after `unsubscribed` leaves or `unsubscribe`
  arrives, unavailable presence goes to the one who lost the subscription
  (§3.2.2, §3.3.3);
- a `subscribe` for someone already subscribed (or pre-approved) is
  answered `subscribed` by the server (§3.1.3, §3.4); one for an account
  that does not exist is answered `unsubscribed` (§3.1.3), not with an
  error.

Stanzas that change nothing on the receiving side are not delivered (the
"no state change" rows of A.3). Inbound requests go to the available
resources (the implementation note of §2.2) and stay stored until answered;
every initial presence delivers those still pending (§3.1.3).

Members of a shared directory group (`mlink.modules.shared_groups`) are
subscribed both ways by the directory, whatever their personal items say,
so between them the machine runs as in state Both and never writes: a
`subscribe` goes out and the contact's side answers `subscribed` itself; an
inbound `subscribed`/`unsubscribe`/`unsubscribed` changes nothing and is
not delivered; an approval (`subscribed`) only clears a request that was
pending from before. Cancelling (`unsubscribe`, `unsubscribed`) is refused
with `not-allowed`: the directory, not the user, decides who shares
presence in a department, and silently ignoring the request would leave the
client believing it worked.
"""

from __future__ import annotations

import logging
import xml.etree.ElementTree as ET
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import defusedxml.ElementTree as SafeET

from mlink.hooks import StanzaEvent
from mlink.jid import JID
from mlink.modules import presence
from mlink.modules.roster import push, store_failed, subscription_stanza
from mlink.router.rosters import RosterCache, rosters_of
from mlink.router.sessions import SessionInfo
from mlink.store import RosterItem, StoreError
from mlink.xml.serialize import serialize

if TYPE_CHECKING:
    from mlink.module import Module

log = logging.getLogger(__name__)

PRE_APPROVAL_FEATURE = "{urn:xmpp:features:pre-approval}sub"

# Subscription state after gaining or losing one direction.
_ADD_FROM = {"none": "from", "to": "both"}
_ADD_TO = {"none": "to", "from": "both"}
_DROP_FROM = {"from": "none", "both": "to"}
_DROP_TO = {"to": "none", "both": "from"}


@dataclass(slots=True)
class Outcome:
    """What a transition asks for once the roster lock is released."""

    forward: bool = False  # route (outbound) or deliver (inbound) the stanza
    reply_subscribed: bool = False  # the server answers `subscribed` itself
    send_presence: bool = False  # our available presence to the contact
    send_unavailable: bool = False  # our unavailable presence to the contact
    refused: str | None = None  # bounce the stanza with not-allowed and this text


def setup(module: Module) -> None:
    rosters = rosters_of(module)

    async def outbound(event: StanzaEvent) -> bool:
        kind, origin = event.type, event.origin
        if kind not in presence.SUBSCRIPTION_TYPES or origin is None:
            return False
        user, contact = event.sender.bare, event.to.bare
        if contact == user:
            return True  # one is always subscribed to oneself
        stanza = event.stanza
        try:
            outcome = await outbound_transition(module, rosters, user, contact, kind)
        except StoreError as exc:
            log.warning("subscription %s from %s failed: %s", kind, user, exc)
            store_failed(module, stanza, exc)
            return True
        if outcome.refused is not None:
            await module.router.bounce(stanza, "not-allowed", outcome.refused)
            return True
        if outcome.forward:
            # §3.1.2: subscription stanzas travel between bare JIDs.
            stanza.set("from", str(user))
            stanza.set("to", str(contact))
            await module.router.route(stanza)
        await _follow_up(module, outcome, user, contact)
        return True

    async def inbound(event: StanzaEvent) -> bool:
        kind = event.type
        if kind not in presence.SUBSCRIPTION_TYPES:
            return False
        user, contact = event.to.bare, event.sender.bare
        if contact == user:
            return True
        if not await module.router.account_exists(user):
            if kind == "subscribe":
                # §3.1.3: no such account; tell the requester it is refused.
                await module.router.route(subscription_stanza("unsubscribed", user, contact))
            return True
        stanza = event.stanza
        stanza.set("from", str(contact))
        stanza.set("to", str(user))
        try:
            outcome = await inbound_transition(module, rosters, user, contact, stanza)
        except StoreError as exc:
            log.warning("subscription %s to %s failed: %s", kind, user, exc)
            return True
        if outcome.forward:
            for info in module.router.resources(user):
                if info.available:
                    module.router.deliver(info.jid, stanza)
        if outcome.reply_subscribed:
            await module.router.route(subscription_stanza("subscribed", user, contact))
        await _follow_up(module, outcome, user, contact)
        return True

    async def initial_presence(info: SessionInfo) -> None:
        """§3.1.3: requests that arrived while nobody could answer them."""
        try:
            roster = await rosters.get(str(info.jid.bare))
        except StoreError as exc:
            log.warning("pending requests of %s unavailable: %s", info.jid.bare, exc)
            return
        for data in list(roster.pending.values()):
            module.router.deliver(info.jid, SafeET.fromstring(data))

    for scope in ("bare", "full"):
        module.hook(f"pre-presence/{scope}", outbound)
        module.hook(f"presence/{scope}", inbound)
    module.hook("session/initial-presence", initial_presence)
    module.add_stream_feature(lambda stream: ET.Element(PRE_APPROVAL_FEATURE),
                              authenticated=True)


async def outbound_transition(module: Module, rosters: RosterCache, user: JID, contact: JID,
                              kind: str) -> Outcome:
    """Appendix A.2: `user` sends `kind` to `contact`."""
    out = Outcome()
    c = str(contact)
    async with rosters.locked(str(user)) as roster:
        shared = roster.shared_groups(c)
        if shared:
            if kind == "subscribe":
                out.forward = True  # state Both: sent on, the contact answers
            elif kind == "subscribed":
                await rosters.drop_pending(roster, c)
            else:
                out.refused = (f"{c} shares presence with you through the directory group"
                               f" {', '.join(sorted(shared))}; it cannot be cancelled")
            return out
        item = roster.personal.get(c)
        sub = item.subscription if item else "none"
        base = item or RosterItem(c)
        new = item
        if kind == "subscribe":
            # A.2.1 / §3.1.2: always sent on (the contact's server answers
            # for a subscription it already has); Pending Out unless To.
            out.forward = True
            if sub in ("none", "from"):
                new = replace(base, ask=True)
        elif kind == "unsubscribe":
            # A.2.2 / §3.3.2: sent on; To and Pending Out end here at once.
            out.forward = True
            if item is not None:
                new = replace(item, subscription=_DROP_TO.get(sub, sub), ask=False)
        elif kind == "subscribed":
            if await rosters.drop_pending(roster, c):
                # A.2.3 / §3.1.5: approval of a pending request.
                new = replace(base, subscription=_ADD_FROM.get(sub, sub), approved=False)
                out.forward = out.send_presence = True
            elif sub in ("none", "to"):
                # §3.4.1: no request yet: a pre-approval, not sent on.
                new = replace(base, approved=True)
        elif kind == "unsubscribed":
            # A.2.4 / §3.2.2: deny a request, cancel a subscription or a
            # pre-approval (§3.4.3); sent on only if the contact had one.
            out.forward = await rosters.drop_pending(roster, c)
            if item is not None:
                if sub in ("from", "both"):
                    out.forward = out.send_unavailable = True
                new = replace(item, subscription=_DROP_FROM.get(sub, sub), approved=False)
        most = module.config.limits.max_roster_items
        if item is None and new is not None and most and len(roster.personal) >= most:
            # A subscription request (or pre-approval) would add a roster
            # item past the quota a roster set is held to (`roster-items`).
            out.refused = f"your roster is full: at most {most} items"
            return out
        if new is not None and new != item:
            push(module, roster, await rosters.put(roster, new))
    return out


async def inbound_transition(module: Module, rosters: RosterCache, user: JID, contact: JID,
                             stanza: ET.Element) -> Outcome:
    """Appendix A.3: `stanza` from `contact` arrives for local `user`."""
    out = Outcome()
    kind, c = stanza.get("type"), str(contact)
    async with rosters.locked(str(user)) as roster:
        if roster.shared_groups(c):
            # State Both (a directory group): only a request gets an answer.
            out.reply_subscribed = kind == "subscribe"
            return out
        item = roster.personal.get(c)
        sub = item.subscription if item else "none"
        new = item
        if kind == "subscribe":
            if sub in ("from", "both"):
                out.reply_subscribed = True  # §3.1.3: already subscribed
            elif item is not None and item.approved:
                # §3.4.2: pre-approved: subscribed without asking the user.
                new = replace(item, subscription=_ADD_FROM[sub], approved=False)
                out.reply_subscribed = out.send_presence = True
            else:
                await rosters.add_pending(roster, c, serialize(stanza, ""))
                out.forward = True
        elif kind == "unsubscribe":
            out.forward = await rosters.drop_pending(roster, c)
            if item is not None and sub in ("from", "both"):
                new = replace(item, subscription=_DROP_FROM[sub])
                out.forward = out.send_unavailable = True
        elif kind == "subscribed":
            if item is not None and item.ask:
                new = replace(item, subscription=_ADD_TO.get(sub, sub), ask=False)
                out.forward = True
        elif kind == "unsubscribed":
            if item is not None and (item.ask or sub in ("to", "both")):
                new = replace(item, subscription=_DROP_TO.get(sub, sub), ask=False)
                out.forward = True
        if new is not None and new != item:
            push(module, roster, await rosters.put(roster, new))
    return out


async def _follow_up(module: Module, outcome: Outcome, user: JID, contact: JID) -> None:
    if outcome.send_presence:
        await presence.send_presence_to(module, user, contact)
    if outcome.send_unavailable:
        await presence.send_unavailable_to(module, user, contact)
