"""XEP-0199 XMPP Ping: the server answers pings addressed to it."""

from __future__ import annotations

from typing import TYPE_CHECKING

from mlink.hooks import StanzaEvent
from mlink.modules.util import iq_result

if TYPE_CHECKING:
    from mlink.server import Server

PING_NS = "urn:xmpp:ping"


def register(server: Server) -> None:
    async def handle_ping(event: StanzaEvent) -> bool:
        await server.router.route(iq_result(event.stanza))
        return True

    server.hooks.add_feature(PING_NS)
    # Pings to the server; clients that omit `to` mean their server too.
    server.hooks.on(f"iq-get/host/{PING_NS}", handle_ping)
    server.hooks.on(f"iq-get/self/{PING_NS}", handle_ping)
