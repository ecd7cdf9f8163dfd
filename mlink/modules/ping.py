"""XEP-0199 XMPP Ping: the server answers pings addressed to it."""

from __future__ import annotations

import xml.etree.ElementTree as ET

from mlink.hooks import Hooks

PING_NS = "urn:xmpp:ping"


def handle_ping(iq: ET.Element) -> ET.Element:
    reply = ET.Element(iq.tag, {"type": "result", "id": iq.get("id", "")})
    if (sender := iq.get("from")) is not None:
        reply.set("to", sender)
    if (dest := iq.get("to")) is not None:
        reply.set("from", dest)
    return reply


def register(hooks: Hooks) -> None:
    hooks.add_feature(PING_NS)
    # Pings to the server; clients that omit `to` mean their server too.
    hooks.on_iq(f"iq-get/host/{PING_NS}", handle_ping)
    hooks.on_iq(f"iq-get/self/{PING_NS}", handle_ping)
