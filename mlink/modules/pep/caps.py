"""Entity capabilities (XEP-0115) of clients: which `+notify` features a
resource announced, learned once per verification string.

A client's available presence carries `<c hash='sha-1' node=... ver=...>`;
`ver` names its feature set. The shard where the client is connected asks
it once (disco#info with `node#ver`), checks that the answer hashes to
`ver` (§5.1, so one client cannot poison the entry other clients with the
same `ver` rely on), and keeps the features in the shared store: every
shard then reads a resource's features from the `ver` in its replicated
presence, with no query of its own.
"""

from __future__ import annotations

import base64
import hashlib
import xml.etree.ElementTree as ET
from collections import OrderedDict
from dataclasses import dataclass

CAPS_NS = "http://jabber.org/protocol/caps"
DISCO_INFO_NS = "http://jabber.org/protocol/disco#info"
DATA_NS = "jabber:x:data"
NOTIFY_SUFFIX = "+notify"
# Feature sets kept in memory per shard (each a few dozen strings); the
# shared store keeps every verified one.
LOCAL_ENTRIES = 4096
# Longest `ver` accepted: a SHA-1 in base64 is 28 characters; SHA-256 44.
MAX_VER_CHARS = 128
HASHES = {"sha-1": "sha1", "sha-256": "sha256", "sha-512": "sha512"}


@dataclass(frozen=True, slots=True)
class Caps:
    hash: str
    node: str
    ver: str

    @property
    def key(self) -> str:
        return f"{self.hash} {self.ver}"


def caps_of(presence: ET.Element | None) -> Caps | None:
    """The verifiable caps a presence announces, or None (none, legacy
    caps without a hash, an unknown hash, an overlong ver)."""
    if presence is None:
        return None
    c = presence.find(f"{{{CAPS_NS}}}c")
    if c is None:
        return None
    algo, node, ver = c.get("hash", ""), c.get("node", ""), c.get("ver", "")
    if algo not in HASHES or not ver or len(ver) > MAX_VER_CHARS or not node:
        return None
    return Caps(algo, node, ver)


def verification_string(query: ET.Element) -> str | None:
    """XEP-0115 §5.1's S for a disco#info result, or None when the result
    is malformed in a way §5.4 says to reject (duplicate identities or
    features, a form without FORM_TYPE)."""
    identities = []
    for ident in query.findall(f"{{{DISCO_INFO_NS}}}identity"):
        lang = ident.get("{http://www.w3.org/XML/1998/namespace}lang", "")
        identities.append(f"{ident.get('category', '')}/{ident.get('type', '')}/{lang}/"
                          f"{ident.get('name', '')}")
    features = [f.get("var", "") for f in query.findall(f"{{{DISCO_INFO_NS}}}feature")]
    if len(set(identities)) != len(identities) or len(set(features)) != len(features):
        return None
    parts = [i + "<" for i in sorted(identities)] + [f + "<" for f in sorted(features)]
    forms = []
    for form in query.findall(f"{{{DATA_NS}}}x"):
        fields: dict[str, list[str]] = {}
        for field in form.findall(f"{{{DATA_NS}}}field"):
            values = [v.text or "" for v in field.findall(f"{{{DATA_NS}}}value")]
            fields[field.get("var", "")] = values
        form_type = fields.pop("FORM_TYPE", None)
        if not form_type:
            return None
        text = form_type[0] + "<"
        for var in sorted(fields):
            text += var + "<" + "".join(v + "<" for v in sorted(fields[var]))
        forms.append((form_type[0], text))
    if len({t for t, _ in forms}) != len(forms):
        return None
    parts += [text for _, text in sorted(forms)]
    return "".join(parts)


def verifies(caps: Caps, query: ET.Element) -> bool:
    text = verification_string(query)
    if text is None:
        return False
    digest = hashlib.new(HASHES[caps.hash], text.encode("utf-8")).digest()
    return base64.b64encode(digest).decode("ascii") == caps.ver


def notify_nodes(features: frozenset[str]) -> frozenset[str]:
    """The nodes a feature set asks notifications for (`<node>+notify`)."""
    return frozenset(f[: -len(NOTIFY_SUFFIX)] for f in features if f.endswith(NOTIFY_SUFFIX))


class CapsMemory:
    """This shard's bounded copy of verified feature sets (least recently
    used dropped first)."""

    def __init__(self, limit: int = LOCAL_ENTRIES) -> None:
        self._entries: OrderedDict[str, frozenset[str]] = OrderedDict()
        self._limit = limit

    def get(self, key: str) -> frozenset[str] | None:
        found = self._entries.get(key)
        if found is not None:
            self._entries.move_to_end(key)
        return found

    def put(self, key: str, nodes: frozenset[str]) -> None:
        self._entries[key] = nodes
        self._entries.move_to_end(key)
        while len(self._entries) > self._limit:
            self._entries.popitem(last=False)
