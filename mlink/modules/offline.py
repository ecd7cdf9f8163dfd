"""XEP-0160 offline messages: store chat and normal messages for users with
no available resource, and hand them over at the next initial presence.

Stored messages are committed to the store before the router is told the
message was consumed, so a crash or restart right after the sender got no
error loses nothing. They are deleted only after being queued for a
session, so a crash mid-delivery repeats messages rather than losing them.
Delivery is paced: a batch at a time, each message deleted only once it
was written to the session's socket, so neither a slow reader nor a backlog
larger than the output buffer loses anything (the rest stays stored).
"""

from __future__ import annotations

import copy
import logging
import time
import xml.etree.ElementTree as ET
from typing import TYPE_CHECKING

from mlink.hooks import StanzaEvent
from mlink.router.router import WriteReceipt
from mlink.router.sessions import SessionInfo
from mlink.util.keyed_lock import KeyedLock
from mlink.xml.serialize import serialize

if TYPE_CHECKING:
    from mlink.module import Module

log = logging.getLogger(__name__)

OFFLINE_FEATURE = "msgoffline"  # XEP-0160 §6 advertises it under this name
DELAY_NS = "urn:xmpp:delay"
HINTS_NS = "urn:xmpp:hints"
# Offline delivery goes a batch at a time and waits for each to be written:
# a backlog of large messages then never fills a session's output buffer
# (4 MiB) and gets it cut. A batch is at most this many messages ...
OFFLINE_BATCH = 50
# ... or this many bytes (the first message always goes, whatever its size).
OFFLINE_BATCH_BYTES = 512 * 1024
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
        # In a task of its own: delivery waits for the client to read, and
        # must not hold up the stanzas this session sends meanwhile.
        module.spawn(lambda: deliver_paced(info))

    async def deliver_paced(info: SessionInfo) -> None:
        """Hand the stored messages over a batch at a time, and delete each
        only once it was written to the session: a session that ends (or is
        cut for not reading) keeps the rest stored for its next login."""
        user = str(info.jid.bare)
        async with locks.hold(user):
            while True:
                rows = await module.data.offline_fetch(user, OFFLINE_BATCH, OFFLINE_BATCH_BYTES)
                if not rows:
                    return
                written, complete = await deliver_batch(info, user, rows)
                if written:
                    await module.data.offline_delete(user, written)
                if not complete:
                    return

    async def deliver_batch(info: SessionInfo, user: str, rows: list[tuple[int, bytes]]
                            ) -> tuple[list[int], bool]:
        """(ids written or unreadable, whether the whole batch went out)."""
        done: list[int] = []
        sent: list[tuple[int, WriteReceipt]] = []
        for row_id, data in rows:
            try:
                stanza = decode(data)
            except ET.ParseError:
                log.error("dropping unreadable offline message %d of %s", row_id, user)
                done.append(row_id)
                continue
            receipt = module.router.deliver_tracked(info.jid, stanza)
            if receipt is None:
                break  # the session ended meanwhile: keep the rest
            sent.append((row_id, receipt))
        complete = len(sent) + len(done) == len(rows)
        if sent and not await sent[-1][1].written():
            complete = False
        done.extend(row_id for row_id, receipt in sent if receipt.done)
        return done, complete

    module.add_feature(OFFLINE_FEATURE)
    module.hook("message/offline", store_message)
    module.hook("session/initial-presence", deliver_stored)
