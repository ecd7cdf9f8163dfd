"""XEP-0157 contact addresses for XMPP services: whom to tell about abuse,
a security problem, or to ask for support, as a XEP-0128 form in the
server's disco#info (FORM_TYPE `http://jabber.org/network/serverinfo`).

    <module name="contact_addresses">
      <abuse>mailto:abuse@example.org xmpp:abuse@example.org</abuse>
      <security>mailto:security@example.org</security>
      <support>https://example.org/support</support>
    </module>

Each option is a list of URIs separated by spaces (`mailto:`, `xmpp:`,
`http(s):`, `tel:` ... : any URI with a scheme); fields left empty are not
shown, and with none configured the form is not shown at all. The entity
capabilities hash includes the form (XEP-0115 §5.4), so clients that cache
disco#info by hash see a change after a reload.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mlink.config_schema import Invalid, Kind, option
from mlink.modules.disco import server_info_forms

if TYPE_CHECKING:
    from mlink.config_schema import ParseEnv
    from mlink.module import Module

FORM_TYPE = "http://jabber.org/network/serverinfo"
DATA_NS = "jabber:x:data"
# RFC 3986 §3.1: a scheme, then ':' and something; no spaces (they separate).
URI_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:\S+$")
# URIs per field: a few in practice; a bound keeps disco#info small.
MAX_ADDRESSES = 10


class URIList(Kind):
    doc = "URIs separated by spaces"

    def parse(self, raw: str, env: ParseEnv) -> tuple[str, ...]:
        uris = tuple(raw.split())
        for uri in uris:
            if not URI_RE.match(uri):
                raise Invalid(f"{uri!r} is not a URI (mailto:..., xmpp:..., https://...)")
        if len(uris) > MAX_ADDRESSES:
            raise Invalid(f"at most {MAX_ADDRESSES} addresses")
        return uris

    def render(self, value: Any, base: Path) -> str:
        return " ".join(value)


def _addresses(doc: str) -> Any:
    return option((), kind=URIList(), default_doc="none", doc=doc)


@dataclass(frozen=True, slots=True)
class Options:
    abuse: tuple[str, ...] = _addresses("Where to report abuse by the service's users.")
    admin: tuple[str, ...] = _addresses("The service's administrators.")
    feedback: tuple[str, ...] = _addresses("Where to send feedback.")
    sales: tuple[str, ...] = _addresses("Sales enquiries.")
    security: tuple[str, ...] = _addresses("Where to report security problems.")
    support: tuple[str, ...] = _addresses("Where users get help.")
    status: tuple[str, ...] = _addresses("Where the service's status is published.")


OPTIONS = Options


def contact_form(options: Options | None) -> ET.Element | None:
    """The serverinfo form for the configured addresses (None: none)."""
    if options is None:
        return None
    configured = [(f.name, getattr(options, f.name)) for f in fields(options)]
    if not any(uris for _, uris in configured):
        return None
    form = ET.Element(f"{{{DATA_NS}}}x", {"type": "result"})
    form_type = ET.SubElement(form, f"{{{DATA_NS}}}field", {"var": "FORM_TYPE",
                                                             "type": "hidden"})
    ET.SubElement(form_type, f"{{{DATA_NS}}}value").text = FORM_TYPE
    for name, uris in configured:
        if not uris:
            continue
        field = ET.SubElement(form, f"{{{DATA_NS}}}field", {"var": f"{name}-addresses",
                                                             "type": "list-multi"})
        for uri in uris:
            ET.SubElement(field, f"{{{DATA_NS}}}value").text = uri
    return form


def setup(module: Module) -> None:
    server_info_forms(module).append(lambda: contact_form(module.options))
