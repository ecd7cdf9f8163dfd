"""XEP-0030 service discovery for the server and its accounts, and the
server's XEP-0115 entity capabilities.

The server's features are whatever the loaded modules declared with
`hooks.add_feature`, so disco never drifts from what is really hooked. An
account (a bare JID) advertises the features whose iq handlers answer for
accounts: a namespace with an `iq-get/bare/…` handler (or, to the owner
itself, `iq-*/self/…`) is served on the account's behalf.
"""

from __future__ import annotations

import base64
import hashlib
import xml.etree.ElementTree as ET
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from mlink.hooks import StanzaEvent
from mlink.jid import JID
from mlink.modules.util import iq_result
from mlink.router.rosters import rosters_of

if TYPE_CHECKING:
    from mlink.module import Module

DISCO_INFO_NS = "http://jabber.org/protocol/disco#info"
DISCO_ITEMS_NS = "http://jabber.org/protocol/disco#items"
CAPS_NS = "http://jabber.org/protocol/caps"
# XEP-0115 §4: a URI naming the software. mlink has no public home page
# yet; `.invalid` (RFC 2606) can never point at someone else's site.
CAPS_NODE = "https://mlink.invalid/caps"
SERVER_NAME = "mlink"
# (category, type, name) of the server (XEP-0030 registry: server/im).
SERVER_IDENTITY = ("server", "im", SERVER_NAME)
# RFC 6121 accounts: the registry's account/registered.
ACCOUNT_IDENTITY = ("account", "registered", "")
# Subscription states under which the contact shares presence with the
# requester (RFC 6121 §2.1.2.1): only they may learn about the account.
SHARES_PRESENCE = frozenset({"from", "both"})
DATA_NS = "jabber:x:data"
# Where modules put builders of XEP-0128 extended info forms for the
# server's disco#info (`server_info_forms`), e.g. XEP-0157 addresses.
INFO_FORMS_SERVICE = "disco/server-info-forms"
InfoFormBuilder = Callable[[], "ET.Element | None"]


def server_info_forms(module: Module) -> list[InfoFormBuilder]:
    """The list a module appends a builder to, to add a data form (type
    `result`, with a FORM_TYPE) to the server's disco#info; a builder
    returning None adds nothing (e.g. nothing configured)."""
    forms: list[InfoFormBuilder] = module.shared(INFO_FORMS_SERVICE, list)
    return forms


def _forms(module: Module) -> list[ET.Element]:
    return [form for build in server_info_forms(module) if (form := build()) is not None]


def _form_type(form: ET.Element) -> str:
    for field in form.findall(f"{{{DATA_NS}}}field"):
        if field.get("var") == "FORM_TYPE":
            return field.findtext(f"{{{DATA_NS}}}value") or ""
    return ""


async def shares_presence(module: Module, owner: JID, requester: JID) -> bool:
    """Whether `owner` lets `requester` see its presence (a roster item for
    the requester with subscription from or both). Disco of an account and
    XEP-0012 last activity are allowed only then."""
    if owner.bare == requester.bare:
        return True
    roster = await rosters_of(module).get(str(owner.bare))
    item = roster.items.get(str(requester.bare))
    return item is not None and item.subscription in SHARES_PRESENCE


def server_features(module: Module) -> list[str]:
    return sorted(module.server_features() | {DISCO_INFO_NS, DISCO_ITEMS_NS})


def account_features(module: Module, owner: bool) -> list[str]:
    """Features an account offers: namespaces the server answers for it."""
    scopes = ("bare", "self") if owner else ("bare",)
    found = {DISCO_INFO_NS, DISCO_ITEMS_NS}
    for var in module.server_features():
        if any(module.handles(f"iq-{t}/{s}/{var}") for t in ("get", "set") for s in scopes):
            found.add(var)
    return sorted(found)


def caps_ver(identities: list[tuple[str, str, str]], features: list[str],
             forms: Sequence[ET.Element] = ()) -> str:
    """XEP-0115 §5.1 verification string: SHA-1 over sorted identities
    (category/type/lang/name) and features, each followed by '<', then the
    extended forms (§5.4: by FORM_TYPE; its value, then each field by var
    with its sorted values, each followed by '<')."""
    parts = [f"{cat}/{typ}//{name}<" for cat, typ, name in sorted(identities)]
    parts += [f"{var}<" for var in sorted(features)]
    for form in sorted(forms, key=_form_type):
        parts.append(f"{_form_type(form)}<")
        fields = [f for f in form.findall(f"{{{DATA_NS}}}field") if f.get("var") != "FORM_TYPE"]
        for field in sorted(fields, key=lambda f: f.get("var", "")):
            parts.append(f"{field.get('var', '')}<")
            parts += [f"{v.text or ''}<" for v in sorted(
                field.findall(f"{{{DATA_NS}}}value"), key=lambda v: v.text or "")]
    digest = hashlib.sha1("".join(parts).encode("utf-8"), usedforsecurity=False).digest()
    return base64.b64encode(digest).decode("ascii")


def server_caps_ver(module: Module) -> str:
    return caps_ver([SERVER_IDENTITY], server_features(module), _forms(module))


def caps_element(module: Module) -> ET.Element:
    """The `<c/>` stream feature (XEP-0115 §6.3) announcing the server's
    capabilities. The hash covers every module's features, so it is worked
    out when a stream first asks, after all modules are set up."""
    return ET.Element(f"{{{CAPS_NS}}}c", {"hash": "sha-1", "node": CAPS_NODE,
                                         "ver": server_caps_ver(module)})


def _info(identities: list[tuple[str, str, str]], features: list[str],
          node: str | None, forms: Sequence[ET.Element] = ()) -> ET.Element:
    query = ET.Element(f"{{{DISCO_INFO_NS}}}query")
    if node is not None:
        query.set("node", node)
    for category, kind, name in identities:
        attrs = {"category": category, "type": kind}
        if name:
            attrs["name"] = name
        ET.SubElement(query, f"{{{DISCO_INFO_NS}}}identity", attrs)
    for var in features:
        ET.SubElement(query, f"{{{DISCO_INFO_NS}}}feature", {"var": var})
    query.extend(forms)
    return query


def setup(module: Module) -> None:
    router = module.router

    async def host_info(event: StanzaEvent) -> bool:
        node = event.stanza[0].get("node")
        features = server_features(module)
        forms = _forms(module)
        ver = caps_ver([SERVER_IDENTITY], features, forms)
        if node is not None and node != f"{CAPS_NODE}#{ver}":
            await router.bounce(event.stanza, "item-not-found")
            return True
        await router.route(iq_result(event.stanza, _info([SERVER_IDENTITY], features, node,
                                                         forms)))
        return True

    async def host_items(event: StanzaEvent) -> bool:
        if event.stanza[0].get("node") is not None:
            await router.bounce(event.stanza, "item-not-found")
            return True
        # The services modules run on subdomains (multi-user chat).
        query = ET.Element(f"{{{DISCO_ITEMS_NS}}}query")
        for domain in module.hosted_domains(event.to.domain):
            ET.SubElement(query, f"{{{DISCO_ITEMS_NS}}}item", {"jid": domain})
        await router.route(iq_result(event.stanza, query))
        return True

    async def account_info(event: StanzaEvent) -> bool:
        if not await _may_discover(event):
            return False  # the router answers service-unavailable
        if event.stanza[0].get("node") is not None:
            await router.bounce(event.stanza, "item-not-found")
            return True
        owner = event.sender.bare == event.to.bare
        extra_identities, extra_features = module.account_extras()
        features = sorted({*account_features(module, owner), *extra_features})
        identities = [ACCOUNT_IDENTITY, *extra_identities]
        await router.route(iq_result(event.stanza, _info(identities, features, None)))
        return True

    async def account_items(event: StanzaEvent) -> bool:
        if not await _may_discover(event):
            return False
        if event.stanza[0].get("node") is not None:
            await router.bounce(event.stanza, "item-not-found")
            return True
        await router.route(iq_result(event.stanza, ET.Element(f"{{{DISCO_ITEMS_NS}}}query")))
        return True

    async def _may_discover(event: StanzaEvent) -> bool:
        """XEP-0030 §8: the account's server answers only its owner and
        contacts who see its presence; to others an account looks like any
        JID that offers nothing (as Prosody does), leaking nothing."""
        return await shares_presence(module, event.to, event.sender)

    cached: dict[tuple[frozenset[str], tuple[bytes, ...]], ET.Element] = {}

    def caps_feature(stream: object) -> ET.Element:
        # Forms come from module options, which a reload may change.
        key = (module.server_features(), tuple(ET.tostring(f) for f in _forms(module)))
        if key not in cached:
            cached.clear()
            cached[key] = caps_element(module)
        return cached[key]

    module.add_stream_feature(caps_feature, authenticated=False)
    module.hook(f"iq-get/host/{DISCO_INFO_NS}", host_info)
    module.hook(f"iq-get/host/{DISCO_ITEMS_NS}", host_items)
    for scope in ("self", "bare"):
        module.hook(f"iq-get/{scope}/{DISCO_INFO_NS}", account_info)
        module.hook(f"iq-get/{scope}/{DISCO_ITEMS_NS}", account_items)
