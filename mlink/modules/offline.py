"""XEP-0160 offline messages: store chat and normal messages for users with
no available resource, and hand them over at the next initial presence.

Stored messages are committed to the store before the router is told the
message was consumed, so a crash or restart right after the sender got no
error loses nothing. They are deleted only after being queued for a
session, so a crash mid-delivery repeats messages rather than losing them.
"""

from __future__ import annotations

import copy
import logging
import time
import xml.etree.ElementTree as ET
from typing import TYPE_CHECKING

from mlink.hooks import StanzaEvent
from mlink.router.sessions import SessionInfo
from mlink.util.keyed_lock import KeyedLock
from mlink.xml.serialize import serialize

if TYPE_CHECKING:
    from mlink.module import Module

log = logging.getLogger(__name__)

OFFLINE_FEATURE = "msgoffline"  # XEP-0160 §6 advertises it under this name
DELAY_NS = "urn:xmpp:delay"
HINTS_NS = "urn:xmpp:hints"
# RFC 6121 §8.5.2.2: the types a server stores for later; headlines are
# dropped and groupchat and errors bounced or ignored by the router.
STORED_TYPES = frozenset({"normal", "chat"})


def encode(stanza: ET.Element) -> bytes:
    """Bytes for the store: the namespace is written out (serialising for
    the empty stream namespace), so the bytes parse on their own."""
    return serialize(stanza, stream_ns="")


def decode(data: bytes) -> ET.Element:
    """The stanza `encode` stored."""
    return ET.fromstring(data)


def delay_stamp(when: float) -> str:
    """XEP-0082 date-time in UTC, seconds precision, as XEP-0203 shows it."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(when))


def setup(module: Module) -> None:
    # Two sessions sending initial presence at once must not both fetch
    # (and so both deliver) the same stored messages.
    locks: KeyedLock[str] = KeyedLock()

    async def store_message(event: StanzaEvent) -> bool:
        message = event.stanza
        if message.get("type", "normal") not in STORED_TYPES:
            return False
        if message.find(f"{{{HINTS_NS}}}no-store") is not None:
            return False  # XEP-0334 §4.2: the sender asked not to store it
        user = event.to.bare
        if not await module.router.account_exists(user):
            return False  # RFC 6121 §8.5.1: the router bounces it
        limit = module.config.limits.max_offline_messages
        if limit == 0:
            return False  # storage turned off
        stored = copy.deepcopy(message)
        # XEP-0203: when, and by whom, the message was delayed.
        ET.SubElement(stored, f"{{{DELAY_NS}}}delay",
                      {"from": user.domain, "stamp": delay_stamp(time.time())})
        # Full: not consumed, so the router bounces service-unavailable,
        # the very error a missing account gets (RFC 6121 §8.5.2.2).
        return await module.data.offline_put(str(user), encode(stored), limit)

    async def deliver_stored(info: SessionInfo) -> None:
        user = str(info.jid.bare)
        async with locks.hold(user):
            rows = await module.data.offline_fetch(user)
            delivered: list[int] = []
            for row_id, data in rows:
                try:
                    stanza = decode(data)
                except ET.ParseError:
                    log.error("dropping unreadable offline message %d of %s", row_id, user)
                    delivered.append(row_id)
                    continue
                if not module.router.deliver(info.jid, stanza):
                    break  # the session ended meanwhile: keep the rest
                delivered.append(row_id)
            await module.data.offline_delete(user, delivered)

    module.add_feature(OFFLINE_FEATURE)
    module.hook("message/offline", store_message)
    module.hook("session/initial-presence", deliver_stored)
