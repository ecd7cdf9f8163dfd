"""Avatars from the profile's photo (`jpegPhoto` by default): XEP-0153 hashes
in presence, and XEP-0084 avatars served as a minimal PEP service.

XEP-0153: every available presence a user sends gets
`<x xmlns='vcard-temp:x:update'><photo>SHA-1 hex</photo></x>` (an empty
`<photo/>` when there is no photo), replacing whatever the client put there:
the server knows the real photo, which may have been changed in the
directory. When the photo changes through mlink, the user's available
resources re-broadcast their presence with the new hash. A change made
directly in the directory shows in the next presence the user sends.

XEP-0084 over PEP, for the two avatar nodes (every other node is the
`pep` module's):
- `items` requests for `urn:xmpp:avatar:metadata` and `urn:xmpp:avatar:data`
  on a local user's bare JID (by anyone: the same photo is public in the
  vCard), answered from the photo (item id = SHA-1 hex); a publish by the
  owner to the data node (item id must be the SHA-1 of the data) and then
  to the metadata node naming that id, which sets the photo under its
  field's policy (`update`: written to the directory; `directory`/`static`:
  `not-allowed`); an empty metadata publish removes the photo.
  `publish-options` are accepted only with access model `open` (anything
  else is `conflict`, XEP-0060's precondition-not-met, with that in the
  text: the avatar is public anyway, as in the vCard). A metadata publish
  fires `pep/published`, so contacts whose clients asked for
  `urn:xmpp:avatar:metadata+notify` are told (the `pep` module).
- XEP-0398 (`urn:xmpp:pep-vcard-conversion:0` on the account): the vCard
  photo and the PEP avatar are one photo, so either protocol sees what the
  other set; a photo changed through the vCard (or XEP-0154) is also
  announced to the metadata node's `+notify` contacts, as a PEP publish is.
- not supported: retraction, avatars hosted elsewhere (metadata `url`),
  the latest avatar item sent at login (clients have the XEP-0153 hash in
  presence).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import logging
import xml.etree.ElementTree as ET
from collections import Counter, OrderedDict
from typing import TYPE_CHECKING

from mlink.hooks import StanzaEvent
from mlink.jid import JID, parse_jid
from mlink.modules.presence import become_available
from mlink.modules.util import iq_result
from mlink.modules.vcard import photo_type
from mlink.profile.fields import PHOTO_FIELD
from mlink.profile.model import PHOTO_CHANGED, ProfileError, profiles_of

if TYPE_CHECKING:
    from mlink.module import Module

log = logging.getLogger(__name__)

UPDATE_NS = "vcard-temp:x:update"
PUBSUB_NS = "http://jabber.org/protocol/pubsub"
METADATA_NODE = "urn:xmpp:avatar:metadata"
DATA_NODE = "urn:xmpp:avatar:data"
PUBLISH_OPTIONS_FIELD = "pubsub#access_model"
# The pep module's event: notify contacts of an item published here.
PEP_PUBLISHED = "pep/published"
# XEP-0398: the server keeps the vCard photo and the PEP avatar as one.
CONVERSION_NS = "urn:xmpp:pep-vcard-conversion:0"
# Presence hooks run above the presence module (priority 0), so the hash is
# in the stanza before it is broadcast.
PRESENCE_PRIORITY = 10
# Avatar data published but not yet confirmed by a metadata publish: one per
# user, at most this many users (oldest dropped), so memory stays bounded.
MAX_PENDING_AVATARS = 1_000


def photo_hash(photo: bytes) -> str:
    """XEP-0153/XEP-0084 identify an avatar by the SHA-1 of its bytes."""
    return hashlib.sha1(photo, usedforsecurity=False).hexdigest()


def _p(tag: str) -> str:
    return f"{{{PUBSUB_NS}}}{tag}"


def update_element(photo: bytes | None) -> ET.Element:
    x = ET.Element(f"{{{UPDATE_NS}}}x")
    ET.SubElement(x, f"{{{UPDATE_NS}}}photo").text = photo_hash(photo) if photo else None
    return x


def metadata_item(photo: bytes | None) -> ET.Element:
    """The metadata node's item for `photo` (XEP-0084 §4.2; an empty
    `<metadata/>` when the avatar was removed)."""
    item = ET.Element(_p("item"), {"id": photo_hash(photo) if photo else "current"})
    metadata = ET.SubElement(item, f"{{{METADATA_NODE}}}metadata")
    if photo:
        ET.SubElement(metadata, f"{{{METADATA_NODE}}}info", {
            "id": photo_hash(photo), "bytes": str(len(photo)), "type": photo_type(photo)})
    return item


def with_photo_hash(stanza: ET.Element, photo: bytes | None) -> None:
    """Put our `vcard-temp:x:update` in `stanza`, replacing the client's."""
    for old in stanza.findall(f"{{{UPDATE_NS}}}x"):
        stanza.remove(old)
    stanza.append(update_element(photo))


def setup(module: Module) -> None:
    router = module.router
    service = profiles_of(module)
    pending: OrderedDict[str, tuple[str, bytes]] = OrderedDict()

    async def current_photo(user: str) -> bytes | None:
        profile = await service.get(user)
        return profile.photo

    async def outgoing_presence(event: StanzaEvent) -> bool:
        """`pre-presence/*`: stamp available presence with the photo hash."""
        if event.type is not None or event.origin is None:
            return False
        try:
            photo = await current_photo(str(event.sender.bare))
        except ProfileError as exc:
            # Presence must flow even when the profile cannot be read.
            log.info("no photo hash for %s: %s", event.sender.bare, exc.text)
            return False
        with_photo_hash(event.stanza, photo)
        return False

    # Users whose metadata publish is being handled: that publish notifies
    # the node's contacts itself (XEP-0084), so the photo change it causes
    # must not notify them a second time.
    publishing: Counter[str] = Counter()  # a user may publish from two resources at once

    async def photo_changed(user: JID) -> None:
        """Re-broadcast each available resource's presence with the new
        hash; when the change came from the vCard side, tell the metadata
        node's contacts too (XEP-0398 §3)."""
        try:
            photo = await current_photo(str(user))
        except ProfileError:
            return
        if str(user) not in publishing:
            await module.fire(PEP_PUBLISHED, (str(user), METADATA_NODE, metadata_item(photo)))
        for info in router.resources(user):
            if info.presence is None:
                continue
            stanza = ET.Element(info.presence.tag, dict(info.presence.attrib))
            stanza.text = info.presence.text
            stanza.extend(list(info.presence))
            stanza.attrib.pop("to", None)
            with_photo_hash(stanza, photo)
            await become_available(module, info, stanza, info.priority)

    async def get_items(event: StanzaEvent) -> bool:
        pubsub = event.stanza[0]
        items = pubsub.find(_p("items"))
        if pubsub.tag != _p("pubsub") or items is None or len(pubsub) != 1 or \
                items.get("node") not in (METADATA_NODE, DATA_NODE):
            return False  # another node: the pep module's (or nobody's)
        node = str(items.get("node"))
        try:
            photo = await current_photo(str(event.to.bare))
        except ProfileError as exc:
            await router.bounce(event.stanza, exc.condition, exc.text)
            return True
        if photo is None:
            await router.bounce(event.stanza, "item-not-found", "this user has no avatar")
            return True
        item_id = photo_hash(photo)
        wanted = [i.get("id") for i in items.findall(_p("item"))]
        if wanted and item_id not in wanted:
            await router.bounce(event.stanza, "item-not-found", "no such item")
            return True
        reply = ET.Element(_p("pubsub"))
        out = ET.SubElement(reply, _p("items"), {"node": node})
        item = ET.SubElement(out, _p("item"), {"id": item_id})
        if node == METADATA_NODE:
            metadata = ET.SubElement(item, f"{{{METADATA_NODE}}}metadata")
            ET.SubElement(metadata, f"{{{METADATA_NODE}}}info", {
                "id": item_id, "bytes": str(len(photo)), "type": photo_type(photo)})
        else:
            data = ET.SubElement(item, f"{{{DATA_NODE}}}data")
            data.text = base64.b64encode(photo).decode("ascii")
        await router.route(iq_result(event.stanza, reply))
        return True

    async def publish(event: StanzaEvent) -> bool:
        pubsub = event.stanza[0]
        user = str(event.sender.bare)
        request = pubsub.find(_p("publish"))
        if pubsub.tag != _p("pubsub") or request is None or \
                request.get("node") not in (METADATA_NODE, DATA_NODE):
            return False  # another node: the pep module's (or nobody's)
        publishing[user] += 1
        try:
            return await _publish(event, pubsub, request, user)
        finally:
            publishing[user] -= 1
            if not publishing[user]:
                del publishing[user]

    async def _publish(event: StanzaEvent, pubsub: ET.Element, request: ET.Element,
                       user: str) -> bool:
        node = request.get("node")
        try:
            _check_options(pubsub)
            if node == DATA_NODE:
                item_id = _accept_data(user, request)
            else:
                item_id = await _accept_metadata(user, request)
        except ProfileError as exc:
            await router.bounce(event.stanza, exc.condition, exc.text)
            return True
        reply = ET.Element(_p("pubsub"))
        done = ET.SubElement(reply, _p("publish"), {"node": node or ""})
        ET.SubElement(done, _p("item"), {"id": item_id})
        await router.route(iq_result(event.stanza, reply))
        if node == METADATA_NODE:
            # Contacts whose clients want avatar updates hear of it (pep).
            item = request.find(_p("item"))
            if item is not None:
                await module.fire(PEP_PUBLISHED, (user, node, item))
        return True

    def _check_options(pubsub: ET.Element) -> None:
        options = pubsub.find(_p("publish-options"))
        if options is None:
            return
        for field in options.iter("{jabber:x:data}field"):
            if field.get("var") == PUBLISH_OPTIONS_FIELD:
                if (field.findtext("{jabber:x:data}value") or "") != "open":
                    raise ProfileError("conflict", "precondition-not-met: avatars here are "
                                       "public (access model open)")

    def _accept_data(user: str, request: ET.Element) -> str:
        """Validate an avatar data publish and keep it until the metadata
        publish confirms it; refusals (policy, size) come here, early."""
        item = request.find(_p("item"))
        data = item.find(f"{{{DATA_NODE}}}data") if item is not None else None
        if item is None or data is None:
            raise ProfileError("bad-request", "publish one item with avatar data")
        try:
            photo = base64.b64decode("".join((data.text or "").split()), validate=True)
        except (binascii.Error, ValueError):
            raise ProfileError("bad-request", "avatar data is not valid base64") from None
        item_id = photo_hash(photo)
        if item.get("id") not in (None, item_id):
            raise ProfileError("bad-request", "the item id must be the SHA-1 of the data")
        _check_writable()
        if len(photo) > service.max_photo_bytes:
            raise ProfileError("not-acceptable", f"{PHOTO_FIELD} is {len(photo)} bytes; the "
                               f"limit is {service.max_photo_bytes} bytes; nothing was changed")
        pending[user] = (item_id, photo)
        pending.move_to_end(user)
        while len(pending) > MAX_PENDING_AVATARS:
            pending.popitem(last=False)
        return item_id

    def _check_writable() -> None:
        policy = service.fields[PHOTO_FIELD].policy
        if policy in ("directory", "static"):
            raise ProfileError("not-allowed", f"not allowed to change {PHOTO_FIELD}: managed "
                               "by the directory; nothing was changed")

    async def _accept_metadata(user: str, request: ET.Element) -> str:
        item = request.find(_p("item"))
        metadata = item.find(f"{{{METADATA_NODE}}}metadata") if item is not None else None
        if item is None or metadata is None:
            raise ProfileError("bad-request", "publish one item with avatar metadata")
        infos = metadata.findall(f"{{{METADATA_NODE}}}info")
        if not infos:  # XEP-0084 §4.2: an empty metadata disables the avatar
            await _set_photo(user, None)
            return item.get("id") or "current"
        ids = {info.get("id") for info in infos}
        held = pending.get(user)
        if held is not None and held[0] in ids:
            await _set_photo(user, held[1])
            pending.pop(user, None)
            return held[0]
        current = await current_photo(user)
        if current is not None and photo_hash(current) in ids:
            return photo_hash(current)  # already the avatar: nothing to do
        raise ProfileError("item-not-found", "publish the avatar data first (avatars hosted "
                           "elsewhere are not supported)")

    async def _set_photo(user: str, photo: bytes | None) -> None:
        changed = await service.update(user, {PHOTO_FIELD: [photo] if photo else []})
        if PHOTO_FIELD in changed:
            await module.fire(PHOTO_CHANGED, parse_jid(user).bare)

    for scope in ("bare", "full"):
        module.hook(f"pre-presence/{scope}", outgoing_presence, PRESENCE_PRIORITY)
    module.hook(PHOTO_CHANGED, photo_changed)
    module.add_feature(PUBSUB_NS)
    # XEP-0163 §4: clients look for this identity before they use PEP.
    module.add_account_feature(f"{PUBSUB_NS}#publish", identity=("pubsub", "pep", ""))
    module.add_account_feature(CONVERSION_NS)
    module.hook(f"iq-get/self/{PUBSUB_NS}", get_items)
    module.hook(f"iq-get/bare/{PUBSUB_NS}", get_items)
    module.hook(f"iq-set/self/{PUBSUB_NS}", publish)
