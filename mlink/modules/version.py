"""XEP-0092 software version of the server.

The `os` element is optional and left out: the operating system and its
version tell an attacker which exploits to try and tell a user nothing
(XEP-0092 §5 names this risk), and the version of mlink already says what
a bug report needs.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from typing import TYPE_CHECKING

from mlink import __version__
from mlink.hooks import StanzaEvent
from mlink.modules.disco import SERVER_NAME
from mlink.modules.util import iq_result

if TYPE_CHECKING:
    from mlink.module import Module

VERSION_NS = "jabber:iq:version"


def setup(module: Module) -> None:
    async def handle_version(event: StanzaEvent) -> bool:
        query = ET.Element(f"{{{VERSION_NS}}}query")
        ET.SubElement(query, f"{{{VERSION_NS}}}name").text = SERVER_NAME
        ET.SubElement(query, f"{{{VERSION_NS}}}version").text = __version__
        await module.router.route(iq_result(event.stanza, query))
        return True

    module.add_feature(VERSION_NS)
    module.hook(f"iq-get/host/{VERSION_NS}", handle_version)
