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


def eligible(message: ET.Element) -> bool:
    """XEP-0280 §6.1 (simplified to what mlink routes): chats, and normal
    messages with a body; never one marked private (§7) or no-copy
    (XEP-0334), and never a carbon itself."""
    if message.find(f"{{{CARBONS_NS}}}private") is not None:
        return False
    if message.find(f"{{{HINTS_NS}}}no-copy") is not None:
        return False
    for wrapper in ("received", "sent"):
        if message.find(f"{{{CARBONS_NS}}}{wrapper}") is not None:
            return False
    msg_type = message.get("type", "normal")
    if msg_type == "chat":
        return True
    return msg_type == "normal" and message.find(f"{{{CLIENT_NS}}}body") is not None


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

    def copy_to(user: JID, skip: set[JID], direction: str, message: ET.Element) -> None:
        for info in router.resources(user):
            if enabled.get(info) and info.jid not in skip:
                router.deliver(info.jid, wrap(direction, user, info.jid, message))

    async def received(event: StanzaEvent) -> None:
        """§6: the recipient's other sessions get what one of them got."""
        message = event.stanza
        if not eligible(message) or not router.is_local(event.to):
            return
        skip = set(event.delivered_to)
        if event.sender.bare == event.to.bare:
            skip.add(event.sender)  # a note to oneself: not back to the sender
        copy_to(event.to.bare, skip, "received", message)

    async def sent(event: StanzaEvent) -> bool:
        """§7: the sender's other sessions get what it sent."""
        message = event.stanza
        if event.origin is None or not eligible(message):
            return False
        if event.to.bare == event.sender.bare:
            return False  # the received copies cover the user's own sessions
        copy_to(event.sender.bare, {event.sender}, "sent", message)
        return False

    module.add_feature(CARBONS_NS)
    module.hook(f"iq-set/self/{CARBONS_NS}", toggle)
    module.hook(f"iq-set/host/{CARBONS_NS}", toggle)
    module.hook("message/delivered", received)
    for scope in ("bare", "full", "host"):
        module.hook(f"pre-message/{scope}", sent, SENT_PRIORITY)
