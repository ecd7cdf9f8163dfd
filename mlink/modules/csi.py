"""XEP-0352 client state indication: hold back what an inactive client
does not need at once.

A phone whose app is in the background sends `<inactive/>`; every stanza
it is sent wakes its radio. While inactive, the server keeps back:

- presence updates (available and unavailable), only the newest from each
  sender (a contact's earlier status is of no use once a newer one exists);
- messages with nothing for the user to read: chat states, receipts and
  markers (no body, subject, encrypted payload or carbon of one).

Anything else is important and goes at once, after everything held (so
order is kept): a message with a body (or a carbon, a forwarded or an
encrypted one), iqs (the client is waiting for answers), subscription
requests and errors. `<active/>` sends everything held, and so does a
backlog of more than `MAX_HELD` stanzas.

If the connection drops while stanzas are held, they go where the rest of
the session's output goes (`OutputFilter.release`): into stream
management's queue, to be sent on a resumed stream, or routed again.
Implemented as a `StreamControl` output filter; the core knows no CSI.
"""

from __future__ import annotations

import weakref
import xml.etree.ElementTree as ET
from collections import OrderedDict
from typing import TYPE_CHECKING, Any

from mlink.hooks import NonzaEvent
from mlink.jid import JID
from mlink.modules.wakeups import INACTIVE, Wakeups, wakeups
from mlink.router.sessions import StreamControl
from mlink.xml.serialize import CLIENT_NS

if TYPE_CHECKING:
    from mlink.module import Module

CSI_NS = "urn:xmpp:csi:0"
# Held stanzas per inactive stream: a contact list of some hundreds fits,
# presence being one per contact; past this the backlog is sent (a client
# that stays inactive all day should not cost unbounded memory).
MAX_HELD = 500
# Presence types that are status updates (held); others (subscriptions,
# probes, errors) need the user or the client now.
UPDATE_TYPES = frozenset({None, "unavailable"})
PRESENCE = f"{{{CLIENT_NS}}}presence"
MESSAGE = f"{{{CLIENT_NS}}}message"
# What makes a message worth waking the client for, beside a body.
IMPORTANT_CHILDREN = frozenset({
    f"{{{CLIENT_NS}}}body", f"{{{CLIENT_NS}}}subject",
    "{urn:xmpp:carbons:2}received", "{urn:xmpp:carbons:2}sent",
    "{urn:xmpp:forward:0}forwarded", "{urn:xmpp:mam:2}result",
    "{jabber:x:conference}x", "{http://jabber.org/protocol/muc#user}x",
})


def important(stanza: ET.Element) -> bool:
    """Whether `stanza` must reach an inactive client now."""
    tag = stanza.tag
    if tag == PRESENCE:
        return stanza.get("type") not in UPDATE_TYPES
    if tag != MESSAGE:
        return True  # iqs: the client asked, and waits
    if stanza.get("type") == "error":
        return True
    for child in stanza:
        if child.tag in IMPORTANT_CHILDREN or child.tag.endswith("}encrypted"):
            return True
    return False


class Holder:
    """One inactive stream's held stanzas (an `OutputFilter`)."""

    def __init__(self, stream: StreamControl, session: JID, signal: Wakeups) -> None:
        self._session = session
        self._signal = signal
        # Held weakly: the module's `holders` maps each stream to its holder
        # (a WeakKeyDictionary), and a value that refers to its key would
        # keep the stream, and itself, alive for ever.
        self._stream = weakref.ref(stream)
        # Insertion order is send order; presence is keyed by its sender
        # (moved to the end when replaced), other stanzas by a counter.
        self.held: OrderedDict[Any, ET.Element] = OrderedDict()
        self._serial = 0

    def take(self, stanza: ET.Element) -> bool:
        if important(stanza):
            self.flush()
            if stanza.tag == MESSAGE:
                # Written now, but to an app in the background: it may
                # need waking (XEP-0357) to show it.
                self._signal.notify(self._session, stanza, INACTIVE)
            return False
        if stanza.tag == PRESENCE:
            key: Any = ("presence", stanza.get("from", ""))
            self.held.pop(key, None)
        else:
            self._serial += 1
            key = self._serial
        self.held[key] = stanza
        if len(self.held) > MAX_HELD:
            self.flush()
        return True

    def flush(self) -> None:
        held, self.held = self.held, OrderedDict()
        stream = self._stream()
        if stream is None:
            return
        for stanza in held.values():
            stream.send_stanza(stanza)

    def release(self) -> list[ET.Element]:
        held, self.held = self.held, OrderedDict()
        return list(held.values())


def setup(module: Module) -> None:
    holders: weakref.WeakKeyDictionary[Any, Holder] = weakref.WeakKeyDictionary()
    signal = wakeups(module)

    def feature(view: Any) -> ET.Element | None:
        return ET.Element(f"{{{CSI_NS}}}csi")

    async def handle(event: NonzaEvent) -> bool:
        stream = event.stream
        if stream is None or not stream.bound:
            return True  # XEP-0352 §3: state of a session; none yet, nothing to do
        tag = event.element.tag.rpartition("}")[2]
        holder = holders.get(stream)
        if tag == "inactive":
            if holder is None:
                holder = holders[stream] = Holder(stream, event.session.jid, signal)
                stream.add_filter(holder)
        elif tag == "active":
            if holder is not None:
                del holders[stream]
                stream.remove_filter(holder)
                holder.flush()
        return True

    module.add_stream_feature(feature, authenticated=True)
    module.add_nonza_handler(CSI_NS, handle)
