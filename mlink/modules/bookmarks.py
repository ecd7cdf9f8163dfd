"""Bookmarks kept in step between their three homes (XEP-0411, XEP-0402 §5.3).

Clients keep chat-room bookmarks in one of:
- the PEP node `urn:xmpp:bookmarks:1`, one item per room (XEP-0402, current
  clients);
- private XML storage, `<storage xmlns='storage:bookmarks'/>` (XEP-0048 over
  XEP-0049, older clients);
- the PEP node `storage:bookmarks`, the same `<storage/>` as item `current`
  (XEP-0048 over XEP-0223).
A user with an old and a new client must see one list, so whenever a client
changes one of them (the `private/changed` and `pep/changed` events, fired
only for clients' own changes), the other two are rewritten from it through
the owning modules' lent operations (`private.PrivateAccess`,
`pep.access.NodeAccess`), which notify the user's other clients as a
publish of theirs would. Advertised on the account:
`urn:xmpp:bookmarks:1#compat` (private XML), `…#compat-pep` (the XEP-0048
PEP node) and `urn:xmpp:bookmarks-conversion:0` (XEP-0411).

What each side cannot hold is kept where it is: a legacy `<url/>` bookmark
stays in the legacy storage when the list is rewritten from XEP-0402 items,
and a XEP-0402 item's `<extensions/>` stay when the same room comes back
from a legacy client unchanged in what the legacy format holds. One user's
conversions run one at a time on a shard (a lock per user).
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from typing import TYPE_CHECKING, Any

from mlink.jid import InvalidJID, parse_jid
from mlink.modules.pep.access import ACCESS as PEP_ACCESS
from mlink.modules.pep.access import CHANGED as PEP_CHANGED
from mlink.modules.pep.access import NodeAccess
from mlink.modules.pep.node import MAX_ITEMS_LIMIT, NodeConfig
from mlink.modules.private import ACCESS as PRIVATE_ACCESS
from mlink.modules.private import CHANGED as PRIVATE_CHANGED
from mlink.modules.private import PrivateAccess
from mlink.util.keyed_lock import KeyedLock
from mlink.xml.serialize import serialize

if TYPE_CHECKING:
    from mlink.module import Module

NATIVE_NS = "urn:xmpp:bookmarks:1"  # XEP-0402: node and payload namespace
LEGACY_NS = "storage:bookmarks"  # XEP-0048: PEP node and payload namespace
LEGACY_KEY = f"{{{LEGACY_NS}}}storage"  # its private storage key
LEGACY_ITEM = "current"  # XEP-0048 §3.3 (PEP): the one item's id
FEATURES = (f"{NATIVE_NS}#compat", f"{NATIVE_NS}#compat-pep",
            "urn:xmpp:bookmarks-conversion:0")
# XEP-0402 §5 / XEP-0048 §3.3: bookmarks are the owner's alone, every
# conference one item, none pushed at login unasked.
NATIVE_CONFIG = NodeConfig(access_model="whitelist", max_items=MAX_ITEMS_LIMIT,
                           send_last_published_item="never")
LEGACY_CONFIG = NodeConfig(access_model="whitelist", max_items=1,
                           send_last_published_item="never")
# Conferences converted from one list at most: a PEP node keeps at most
# MAX_ITEMS_LIMIT items, and more would be dropped there silently.
MAX_CONFERENCES = MAX_ITEMS_LIMIT
_TRUE = ("true", "1")


def _n(tag: str) -> str:
    return f"{{{NATIVE_NS}}}{tag}"


def _l(tag: str) -> str:
    return f"{{{LEGACY_NS}}}{tag}"


def native_from_legacy(conference: ET.Element, old: ET.Element | None) -> tuple[str, ET.Element
                                                                                 ] | None:
    """A legacy `<conference jid/>` as a XEP-0402 (item id, payload); None
    when its JID is not a room's bare JID. `old` is the item the room had
    (its `<extensions/>` are kept)."""
    try:
        room = parse_jid(conference.get("jid", ""))
    except InvalidJID:
        return None
    if room.resource or not room.local:
        return None
    attrs = {"autojoin": "true" if conference.get("autojoin", "") in _TRUE else "false"}
    if conference.get("name"):
        attrs["name"] = conference.get("name", "")
    payload = ET.Element(_n("conference"), attrs)
    for name in ("nick", "password"):
        text = conference.findtext(_l(name))
        if text:
            ET.SubElement(payload, _n(name)).text = text
    if old is not None and (extensions := old.find(_n("extensions"))) is not None:
        payload.append(extensions)
    return str(room.bare), payload


def legacy_from_native(items: list[tuple[str, ET.Element]],
                       old: ET.Element | None) -> ET.Element:
    """XEP-0402 items as a legacy `<storage/>`; `old` is the storage the
    user had (its non-conference entries, `<url/>`, are kept)."""
    storage = ET.Element(LEGACY_KEY)
    for room, payload in items:
        if payload.tag != _n("conference"):
            continue
        attrs = {"jid": room,
                 "autojoin": "true" if payload.get("autojoin", "") in _TRUE else "false"}
        if payload.get("name"):
            attrs["name"] = payload.get("name", "")
        conference = ET.SubElement(storage, _l("conference"), attrs)
        for name in ("nick", "password"):
            text = payload.findtext(_n(name))
            if text:
                ET.SubElement(conference, _l(name)).text = text
    if old is not None:
        storage.extend(child for child in old if child.tag != _l("conference"))
    return storage


def _same(a: ET.Element | None, b: ET.Element) -> bool:
    return a is not None and serialize(a, stream_ns="") == serialize(b, stream_ns="")


def _parse(data: bytes | None) -> ET.Element | None:
    if data is None:
        return None
    try:
        found = ET.fromstring(data)
    except ET.ParseError:
        return None
    return found if found.tag == LEGACY_KEY else None


def setup(module: Module) -> None:
    locks: KeyedLock[str] = KeyedLock()

    def missing() -> Any:
        raise LookupError("not loaded")

    def lent() -> tuple[PrivateAccess, NodeAccess] | None:
        """The two modules' operations; None when either is not loaded."""
        try:
            return (module.shared(PRIVATE_ACCESS, missing), module.shared(PEP_ACCESS, missing))
        except LookupError:
            return None

    async def from_legacy(user: str, storage: ET.Element, source: str) -> None:
        """A legacy list changed (in private storage or its PEP node): the
        XEP-0402 items follow, and the other legacy home."""
        found = lent()
        if found is None:
            return
        private, pep = found
        current = dict(await pep.items(user, NATIVE_NS))
        wanted: dict[str, ET.Element] = {}
        for conference in storage.findall(_l("conference"))[:MAX_CONFERENCES]:
            converted = native_from_legacy(conference,
                                           current.get(conference.get("jid", "")))
            if converted is not None:
                wanted[converted[0]] = converted[1]
        for room, payload in wanted.items():
            if not _same(current.get(room), payload):
                await pep.publish(user, NATIVE_NS, room, payload, NATIVE_CONFIG)
        gone = [room for room in current if room not in wanted]
        if gone:
            await pep.retract(user, NATIVE_NS, gone)
        data = serialize(storage, stream_ns="")
        if source != "private":
            await private.set(user, LEGACY_KEY, data)
        if source != "pep":
            await pep.publish(user, LEGACY_NS, LEGACY_ITEM, storage, LEGACY_CONFIG)

    async def from_native(user: str) -> None:
        """The XEP-0402 items changed: both legacy homes follow."""
        found = lent()
        if found is None:
            return
        private, pep = found
        old = _parse(await private.get(user, LEGACY_KEY))
        storage = legacy_from_native(await pep.items(user, NATIVE_NS), old)
        if _same(old, storage):
            return
        await private.set(user, LEGACY_KEY, serialize(storage, stream_ns=""))
        await pep.publish(user, LEGACY_NS, LEGACY_ITEM, storage, LEGACY_CONFIG)

    async def private_changed(payload: object) -> None:
        assert isinstance(payload, tuple)
        user, keys = payload
        if LEGACY_KEY not in keys:
            return
        found = lent()
        if found is None:
            return
        async with locks.hold(str(user)):
            storage = _parse(await found[0].get(str(user), LEGACY_KEY))
            if storage is not None:
                await from_legacy(str(user), storage, "private")

    async def pep_changed(payload: object) -> None:
        assert isinstance(payload, tuple)
        owner, node = str(payload[0]), str(payload[1])
        found = lent()
        if found is None or node not in (NATIVE_NS, LEGACY_NS):
            return
        async with locks.hold(owner):
            if node == NATIVE_NS:
                await from_native(owner)
                return
            stored = await found[1].items(owner, LEGACY_NS)
            storage = stored[-1][1] if stored else ET.Element(LEGACY_KEY)
            if storage.tag == LEGACY_KEY:
                await from_legacy(owner, storage, "pep")

    module.hook(PRIVATE_CHANGED, private_changed)
    module.hook(PEP_CHANGED, pep_changed)
    for feature in FEATURES:
        module.add_account_feature(feature)
