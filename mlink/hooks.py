"""Named events that modules hook, as Prosody's modules do.

The core fires `iq-<type>/<scope>/<namespace>` for an iq the server must
answer, where scope is `host` (addressed to the domain), `self` (no `to`, or
the sender's own bare JID) or `bare` (another account's bare JID), as
Prosody names them; it knows no XEP itself. A handler returns the reply
stanza, or None when it did not handle the iq.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Callable

IqHandler = Callable[[ET.Element], ET.Element | None]


class Hooks:
    def __init__(self) -> None:
        self._iq: dict[str, list[IqHandler]] = {}
        self.features: set[str] = set()

    def on_iq(self, name: str, handler: IqHandler) -> None:
        """Handle iqs named like `iq-get/host/urn:xmpp:ping`."""
        self._iq.setdefault(name, []).append(handler)

    def add_feature(self, var: str) -> None:
        """A disco#info feature the server advertises (XEP-0030)."""
        self.features.add(var)

    def fire_iq(self, iq: ET.Element, scope: str) -> ET.Element | None:
        if len(iq) != 1:
            return None
        child_ns = iq[0].tag[1:].partition("}")[0] if iq[0].tag[:1] == "{" else ""
        for handler in self._iq.get(f"iq-{iq.get('type')}/{scope}/{child_ns}", ()):
            reply = handler(iq)
            if reply is not None:
                return reply
        return None
