"""Small helpers every module needs to answer stanzas."""

from __future__ import annotations

import xml.etree.ElementTree as ET


def iq_result(iq: ET.Element, payload: ET.Element | None = None) -> ET.Element:
    """The result for `iq`: addresses swapped, same id, optional payload.

    An iq the client sent without `to` was addressed to its own account or
    server; the reply then carries no `from` (RFC 6120 §10.3.3)."""
    reply = ET.Element(iq.tag, {"type": "result", "id": iq.get("id", "")})
    if (dest := iq.get("to")) is not None:
        reply.set("from", dest)
    if (sender := iq.get("from")) is not None:
        reply.set("to", sender)
    if payload is not None:
        reply.append(payload)
    return reply
