"""XEP-0012 last activity: server uptime, and when an offline contact
was last online with the status text it left.

What is stored is the end of the user's last session (wall-clock time, so
it survives restarts) and the status of the last unavailable presence that
session broadcast. Only contacts that may see the user's presence may ask
(XEP-0012 §4, §7): last activity is presence information.
"""

from __future__ import annotations

import time
import xml.etree.ElementTree as ET
from typing import TYPE_CHECKING

from mlink.hooks import StanzaEvent, iq_child_namespace
from mlink.jid import JID
from mlink.modules.disco import shares_presence
from mlink.modules.util import iq_result
from mlink.router.sessions import SessionInfo

if TYPE_CHECKING:
    from mlink.module import Module

LAST_NS = "jabber:iq:last"
# Runs after blocking's inbound filter (priority 100), which answers a
# blocked requester with service-unavailable rather than forbidden.
ONLINE_QUERY_PRIORITY = 10
# Sees a client's unavailable broadcast before the presence module
# (priority 0) handles it, without consuming it.
STATUS_WATCH_PRIORITY = 50


def _query(seconds: float, status: str = "") -> ET.Element:
    query = ET.Element(f"{{{LAST_NS}}}query", {"seconds": str(max(0, int(seconds)))})
    if status:
        query.text = status
    return query


def setup(module: Module) -> None:
    router = module.router
    started = time.monotonic()
    # Status text of the unavailable presence each session last broadcast.
    leaving_status: dict[JID, str] = {}

    async def uptime(event: StanzaEvent) -> bool:
        """XEP-0012 §5: to a server, the seconds since it started."""
        await router.route(iq_result(event.stanza, _query(time.monotonic() - started)))
        return True

    async def account_last(event: StanzaEvent) -> bool:
        """XEP-0012 §4 offline user query, answered by the server."""
        contact = event.to.bare
        if not await shares_presence(module, contact, event.sender):
            await router.bounce(event.stanza, "forbidden")
            return True
        if any(info.available for info in router.resources(contact)):
            # Online now: no time since the last logout to report (as
            # ejabberd answers); idle time is the clients' business.
            await router.route(iq_result(event.stanza, _query(0)))
            return True
        last = await module.data.last_activity(str(contact))
        if last is None:
            await router.bounce(event.stanza, "item-not-found", "no recorded activity")
            return True
        when, status = last
        await router.route(iq_result(event.stanza, _query(time.time() - when, status)))
        return True

    async def online_query(event: StanzaEvent) -> bool:
        """XEP-0012 §4: a query to a full JID reaches the client only if the
        requester may see the user's presence; otherwise forbidden."""
        iq = event.stanza
        if (iq.get("type") != "get" or iq_child_namespace(iq) != LAST_NS
                or event.sender.bare == event.to.bare):
            return False
        if await shares_presence(module, event.to, event.sender):
            return False
        await router.bounce(iq, "forbidden")
        return True

    async def watch_status(event: StanzaEvent) -> bool:
        presence = event.stanza
        if presence.get("type") == "unavailable" and presence.get("to") is None:
            leaving_status[event.sender] = presence.findtext(_status_tag(presence)) or ""
        return False

    async def session_closed(info: SessionInfo) -> None:
        status = leaving_status.pop(info.jid, "")
        if not router.resources(info.jid.bare):
            await module.data.last_activity_put(str(info.jid.bare), time.time(), status)

    module.add_feature(LAST_NS)
    module.hook(f"iq-get/host/{LAST_NS}", uptime)
    module.hook(f"iq-get/bare/{LAST_NS}", account_last)
    module.hook(f"iq-get/self/{LAST_NS}", account_last)
    module.hook("iq/full", online_query, ONLINE_QUERY_PRIORITY)
    module.hook("pre-presence/bare", watch_status, STATUS_WATCH_PRIORITY)
    module.hook("session/closed", session_closed)


def _status_tag(stanza: ET.Element) -> str:
    """`status` in the stanza's own namespace (jabber:client)."""
    tag = stanza.tag
    return tag[: tag.index("}") + 1] + "status" if tag.startswith("{") else "status"
