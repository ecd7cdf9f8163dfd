"""XEP-0199 XMPP Ping: the server answers pings addressed to it."""

from __future__ import annotations

from typing import TYPE_CHECKING

from mlink.hooks import StanzaEvent
from mlink.modules.util import iq_result

if TYPE_CHECKING:
    from mlink.module import Module

PING_NS = "urn:xmpp:ping"


def setup(module: Module) -> None:
    async def handle_ping(event: StanzaEvent) -> bool:
        await module.router.route(iq_result(event.stanza))
        return True

    module.add_feature(PING_NS)
    # Pings to the server; clients that omit `to` mean their server too.
    module.hook(f"iq-get/host/{PING_NS}", handle_ping)
    module.hook(f"iq-get/self/{PING_NS}", handle_ping)
