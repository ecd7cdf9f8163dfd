"""XEP-0049 private XML storage: a user's clients keep small XML documents
(bookmarks, preferences) on the server, one per namespace-qualified
element name, readable only by that user.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from mlink.hooks import StanzaEvent, iq_child_namespace
from mlink.modules.util import iq_result
from mlink.xml.serialize import serialize

if TYPE_CHECKING:
    from mlink.module import Module

PRIVATE_NS = "jabber:iq:private"
# XEP-0049 §3: the jabber:* namespaces are reserved for the protocol itself
# and cannot be stored.
RESERVED_PREFIX = "jabber:"
# What other modules may do with a user's stored elements (the XEP-0411
# bookmarks conversion: `mlink.modules.bookmarks`), shared under this name,
# and the event fired after a client stored elements; payload: (user bare
# JID, the keys set). Writes through `PrivateAccess` fire nothing, so a
# conversion is never converted back.
ACCESS = "private/storage"
CHANGED = "private/changed"


@dataclass(frozen=True, slots=True)
class PrivateAccess:
    get: Callable[[str, str], Awaitable[bytes | None]]  # (user, key)
    set: Callable[[str, str, bytes | None], Awaitable[None]]  # (user, key, XML or None)


def key_of(elem: ET.Element) -> str | None:
    """The storage key, `{namespace}name`; None when the element may not be
    stored (no namespace, or a reserved one)."""
    tag = elem.tag
    if not tag.startswith("{"):
        return None
    namespace = tag[1:].partition("}")[0]
    if not namespace or namespace.startswith(RESERVED_PREFIX):
        return None
    return tag


def setup(module: Module) -> None:
    router = module.router
    elements = module.store.map("xml")  # per user: element key -> XML

    async def handle(event: StanzaEvent) -> bool:
        iq = event.stanza
        query = iq[0]
        if query.tag != f"{{{PRIVATE_NS}}}query":
            await router.bounce(iq, "bad-request")
            return True
        children = list(query)
        keys = [key_of(child) for child in children]
        if not children or any(key is None for key in keys):
            # §3: nothing to get or set, or a reserved namespace.
            await router.bounce(iq, "not-acceptable")
            return True
        user = str(event.sender.bare)
        if iq.get("type") == "set":
            items: dict[str, bytes] = {}
            for key, child in zip(keys, children, strict=True):
                assert key is not None
                child.tail = None
                # Bytes carry their namespace declaration: they parse alone.
                items[key] = serialize(child, stream_ns="")
            most = module.config.limits.max_private_bytes
            if not await elements.set_within(user, items, most):
                # A quota, permanent until something is removed: `not-allowed`
                # (RFC 6120 §8.3.3.10), the figure in the text. Nothing of
                # the set is stored.
                await router.bounce(iq, "not-allowed",
                                    f"private storage is full: at most {most} bytes")
                return True
            # Before the result: what the change causes (bookmarks converted)
            # is done when the client hears it is stored.
            await module.fire(CHANGED, (user, frozenset(items)))
            await router.route(iq_result(iq))
            return True
        answer = ET.Element(query.tag)
        for key, child in zip(keys, children, strict=True):
            assert key is not None
            data = await elements.get(user, key)
            if data is None:
                # §2: nothing stored answers with the empty element asked for.
                answer.append(ET.Element(child.tag))
            else:
                answer.append(ET.fromstring(data))
        await router.route(iq_result(iq, answer))
        return True

    async def others(event: StanzaEvent) -> bool:
        """§3: another user's storage is out of reach. Hooked on `iq/bare`
        rather than `iq-*/bare/…` so disco does not list private storage
        among the features an account offers to others."""
        iq = event.stanza
        if (iq.get("type") not in ("get", "set") or event.sender.bare == event.to.bare
                or iq_child_namespace(iq) != PRIVATE_NS):
            return False
        await router.bounce(iq, "forbidden")
        return True

    access = PrivateAccess(elements.get, elements.set)
    module.shared(ACCESS, lambda: access)
    module.add_feature(PRIVATE_NS)
    for kind in ("get", "set"):
        module.hook(f"iq-{kind}/self/{PRIVATE_NS}", handle)
    module.hook("iq/bare", others)
