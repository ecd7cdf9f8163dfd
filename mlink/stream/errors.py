"""Stream and stanza errors (RFC 6120 §4.9, §8.3) as elements and bytes."""

from __future__ import annotations

import xml.etree.ElementTree as ET

from mlink.xml.serialize import XML_NS

STREAMS_NS = "urn:ietf:params:xml:ns:xmpp-streams"
STANZAS_NS = "urn:ietf:params:xml:ns:xmpp-stanzas"

# RFC 6120 §4.9.3: every defined stream error condition.
STREAM_CONDITIONS = frozenset(
    "bad-format bad-namespace-prefix conflict connection-timeout host-gone host-unknown "
    "improper-addressing internal-server-error invalid-from invalid-namespace invalid-xml "
    "not-authorized not-well-formed policy-violation remote-connection-failed reset "
    "resource-constraint restricted-xml see-other-host system-shutdown undefined-condition "
    "unsupported-encoding unsupported-feature unsupported-stanza-type unsupported-version".split()
)

# RFC 6120 §8.3.3: each stanza error condition and its default error type.
STANZA_ERROR_TYPES: dict[str, str] = {
    "bad-request": "modify",
    "conflict": "cancel",
    "feature-not-implemented": "cancel",
    "forbidden": "auth",
    "gone": "cancel",
    "internal-server-error": "cancel",
    "item-not-found": "cancel",
    "jid-malformed": "modify",
    "not-acceptable": "modify",
    "not-allowed": "cancel",
    "not-authorized": "auth",
    "policy-violation": "modify",
    "recipient-unavailable": "wait",
    "redirect": "modify",
    "registration-required": "auth",
    "remote-server-not-found": "cancel",
    "remote-server-timeout": "wait",
    "resource-constraint": "wait",
    "service-unavailable": "cancel",
    "subscription-required": "auth",
    "undefined-condition": "cancel",
    "unexpected-request": "wait",
}


def stanza_error(
    stanza: ET.Element, condition: str, text: str = "", error_type: str | None = None
) -> ET.Element:
    """The error reply to `stanza` (RFC 6120 §8.3.1): addresses swapped,
    the original payload left out, the condition in the stanzas namespace."""
    reply = ET.Element(stanza.tag, {"type": "error"})
    if (sid := stanza.get("id")) is not None:
        reply.set("id", sid)
    if (sender := stanza.get("from")) is not None:
        reply.set("to", sender)
    if (dest := stanza.get("to")) is not None:
        reply.set("from", dest)
    err = ET.SubElement(
        reply,
        _client_tag(stanza.tag, "error"),
        {"type": error_type or STANZA_ERROR_TYPES[condition]},
    )
    ET.SubElement(err, f"{{{STANZAS_NS}}}{condition}")
    if text:
        ET.SubElement(err, f"{{{STANZAS_NS}}}text", {f"{{{XML_NS}}}lang": "en"}).text = text
    return reply


def _client_tag(parent_tag: str, local: str) -> str:
    """`local` in the same namespace as `parent_tag`."""
    if parent_tag.startswith("{"):
        return parent_tag[: parent_tag.index("}") + 1] + local
    return local
