"""RFC 6121 §2.1.6 roster pushes, built in one place.

The roster module pushes after a client's roster set or a subscription
change; the directory watch pushes when a static roster or a group changes
in the directory. Both send the same `<item/>` to the same sessions.
"""

from __future__ import annotations

import secrets
import xml.etree.ElementTree as ET
from typing import TYPE_CHECKING

from mlink.jid import parse_jid
from mlink.store import RosterItem
from mlink.xml.serialize import CLIENT_NS

if TYPE_CHECKING:
    from mlink.router.router import Router

ROSTER_NS = "jabber:iq:roster"
# Random bytes in a push's id: unique among a session's outstanding pushes.
PUSH_ID_BYTES = 6


def item_element(item: RosterItem, remove: bool = False) -> ET.Element:
    """`<item/>` as in a roster result or push (§2.1.2)."""
    attrs = {"jid": item.jid, "subscription": "remove" if remove else item.subscription}
    if remove:
        return ET.Element(f"{{{ROSTER_NS}}}item", attrs)
    if item.name:
        attrs["name"] = item.name
    if item.ask:
        attrs["ask"] = "subscribe"
    if item.approved:
        attrs["approved"] = "true"
    elem = ET.Element(f"{{{ROSTER_NS}}}item", attrs)
    for group in item.groups:
        ET.SubElement(elem, f"{{{ROSTER_NS}}}group").text = group
    return elem


def push_item(router: Router, user: str, item: RosterItem, remove: bool, version: str) -> None:
    """A push of `item` at roster `version` to each interested resource of
    `user` (on any shard). Sent without `from`, which clients take as from
    their own account."""
    for info in router.resources(parse_jid(user)):
        if not info.interested:
            continue
        iq = ET.Element(f"{{{CLIENT_NS}}}iq", {
            "type": "set", "id": "push-" + secrets.token_hex(PUSH_ID_BYTES),
            "to": str(info.jid)})
        query = ET.SubElement(iq, f"{{{ROSTER_NS}}}query", {"ver": version})
        query.append(item_element(item, remove))
        router.deliver(info.jid, iq)
