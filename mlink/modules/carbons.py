"""XEP-0280 message carbons: a user's sessions that enabled carbons see
the chats their other sessions send and receive.

Copies go to every carbons-enabled session of the user that did not get
the message itself, whether or not it sent initial presence: enabling
carbons is an explicit request for them (Prosody does the same), and a
session that has not sent presence yet would otherwise miss a chat it
will show.
"""

from __future__ import annotations

import copy
import xml.etree.ElementTree as ET
from typing import TYPE_CHECKING

from mlink.hooks import StanzaEvent
from mlink.jid import JID
from mlink.module import BOOL_CODEC
from mlink.modules.util import iq_result
from mlink.xml.serialize import CLIENT_NS

if TYPE_CHECKING:
    from mlink.module import Module

CARBONS_NS = "urn:xmpp:carbons:2"
FORWARD_NS = "urn:xmpp:forward:0"
HINTS_NS = "urn:xmpp:hints"
# After blocking's filter (priority 100), so a refused message is not
# copied; before the default handlers, so copies leave with the original.
SENT_PRIORITY = 50


# Children that keep a message from being copied (§7 private, XEP-0334
# no-copy, and carbons themselves).
_NOT_COPIED = frozenset({f"{{{CARBONS_NS}}}private", f"{{{HINTS_NS}}}no-copy",
                         f"{{{CARBONS_NS}}}received", f"{{{CARBONS_NS}}}sent"})
_BODY = f"{{{CLIENT_NS}}}body"


def eligible(message: ET.Element) -> bool:
    """XEP-0280 §6.1 (simplified to what mlink routes): chats, and normal
    messages with a body; never one marked private (§7) or no-copy
    (XEP-0334), and never a carbon itself. One pass over the children:
    every message goes through here twice."""
    msg_type = message.get("type", "normal")
    if msg_type != "chat" and msg_type != "normal":
        return False
    body = False
    for child in message:
        tag = child.tag
        if tag in _NOT_COPIED:
            return False
        if tag == _BODY:
            body = True
    return msg_type == "chat" or body


def wrap(direction: str, user: JID, to: JID, message: ET.Element) -> ET.Element:
    """A `<received/>` or `<sent/>` carbon of `message` for `to` (§5, §7)."""
    carbon = ET.Element(f"{{{CLIENT_NS}}}message",
                        {"from": str(user), "to": str(to),
                         "type": message.get("type", "normal")})
    holder = ET.SubElement(carbon, f"{{{CARBONS_NS}}}{direction}")
    forwarded = ET.SubElement(holder, f"{{{FORWARD_NS}}}forwarded")
    forwarded.append(copy.deepcopy(message))
    return carbon


def setup(module: Module) -> None:
    router = module.router
    # Per session, replicated: a shard delivering to a session elsewhere
    # must know whether that session wants copies.
    enabled = module.session_field("enabled", False, BOOL_CODEC)

    async def toggle(event: StanzaEvent) -> bool:
        command = event.stanza[0].tag
        if command not in (f"{{{CARBONS_NS}}}enable", f"{{{CARBONS_NS}}}disable"):
            await router.bounce(event.stanza, "bad-request")
            return True
        if event.origin is None:
            await router.bounce(event.stanza, "not-allowed")
            return True
        enabled.set(event.origin, command.endswith("}enable"))
        await router.route(iq_result(event.stanza))
        return True

    def copy_to(user: JID, skip: tuple[JID, ...], direction: str, message: ET.Element) -> None:
        for info in router.resources(user):
            if enabled.get(info) and info.jid not in skip:
                router.deliver(info.jid, wrap(direction, user, info.jid, message))

    async def received(event: StanzaEvent) -> None:
        """§6: the recipient's other sessions get what one of them got."""
        message = event.stanza
        to, sender = event.to.bare, event.sender
        skip = event.delivered_to
        if sender.bare == to:
            skip += (sender,)  # a note to oneself: not back to the sender
        # A user with no session beyond those that got it has nobody to
        # copy to (most users, most messages): asked before anything else.
        if router.resource_count(to) <= len(set(skip)):
            return
        if event.rerouted or not router.is_local(event.to) or not eligible(message):
            return  # routed again: copied when it was first delivered
        copy_to(to, skip, "received", message)

    async def sent(event: StanzaEvent) -> bool:
        """§7: the sender's other sessions get what it sent."""
        message = event.stanza
        sender = event.sender
        user = sender.bare
        if event.origin is None or router.resource_count(user) <= 1 or not eligible(message):
            return False  # not a client's, or no other session to copy to
        if event.to.bare == user:
            return False  # the received copies cover the user's own sessions
        copy_to(user, (sender,), "sent", message)
        return False

    module.add_feature(CARBONS_NS)
    module.hook(f"iq-set/self/{CARBONS_NS}", toggle)
    module.hook(f"iq-set/host/{CARBONS_NS}", toggle)
    module.hook("message/delivered", received)
    for scope in ("bare", "full", "host"):
        module.hook(f"pre-message/{scope}", sent, SENT_PRIORITY)
