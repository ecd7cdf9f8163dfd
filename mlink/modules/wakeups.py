"""Stanzas a user's device cannot see now: a shared signal between modules.

Stream management (a session held after its connection dropped) and
client state indication (an inactive client) see, on the shard that holds
the session, each stanza such a session is sent; a push module (XEP-0357)
wants to hear of them to wake the device. Neither side imports the other:
both reach this one object through `Module.shared`, the producers call
`notify`, the consumers `listen`. Listeners are called synchronously from
the delivery path, so they must only note the stanza and return.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Callable
from typing import TYPE_CHECKING

from mlink.jid import JID

if TYPE_CHECKING:
    from mlink.module import Module

# Why the session cannot see the stanza now.
DETACHED = "detached"  # XEP-0198: held for resumption, no connection
INACTIVE = "inactive"  # XEP-0352: the client said it is in the background

Listener = Callable[[JID, ET.Element, str], None]


class Wakeups:
    def __init__(self) -> None:
        self._listeners: list[Listener] = []

    def listen(self, listener: Listener) -> None:
        self._listeners.append(listener)

    def notify(self, session: JID, stanza: ET.Element, reason: str) -> None:
        """`stanza` was queued for `session` (a full JID), which cannot
        see it now because of `reason`."""
        for listener in self._listeners:
            listener(session, stanza, reason)


def wakeups(module: Module) -> Wakeups:
    return module.shared("wakeups", Wakeups)
