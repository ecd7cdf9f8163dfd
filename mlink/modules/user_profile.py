"""XEP-0154 User Profile over its `urn:xmpp:tmp:profile` data form, through
the profile model (`mlink.profile`).

Get: an iq-get with `<profile xmlns='urn:xmpp:tmp:profile'/>` to the user's
own or another local user's bare JID returns a XEP-0004 form of type
`result` with FORM_TYPE `urn:xmpp:tmp:profile` and one field per profile
field that has values (text fields only; the photo is served as a vCard
PHOTO and a XEP-0084 avatar, not in the form).

Update: an iq-set to one's own account with a `submit` form. Unlike a vCard
set, the form is partial: the fields it carries are set (a field without a
value clears it) and fields it does not carry are left alone. The same
policies apply; an unknown field name is `bad-request` naming it, and
nothing is changed. XEP-0154's publication of profiles over PEP is not
implemented.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from typing import TYPE_CHECKING

from mlink.hooks import StanzaEvent
from mlink.modules.util import iq_result
from mlink.profile.fields import PHOTO_FIELD
from mlink.profile.model import PHOTO_CHANGED, ProfileError, Value, profiles_of

if TYPE_CHECKING:
    from mlink.module import Module

PROFILE_NS = "urn:xmpp:tmp:profile"
DATA_NS = "jabber:x:data"
# Fields one form may carry: the table has 37; the rest is abuse.
MAX_FORM_FIELDS = 64


def _d(tag: str) -> str:
    return f"{{{DATA_NS}}}{tag}"


def setup(module: Module) -> None:
    router = module.router
    service = profiles_of(module)

    async def get_profile(event: StanzaEvent) -> bool:
        if event.stanza[0].tag != f"{{{PROFILE_NS}}}profile":
            return False
        try:
            profile = await service.get(str(event.to.bare))
        except ProfileError as exc:
            await router.bounce(event.stanza, exc.condition, exc.text)
            return True
        payload = ET.Element(f"{{{PROFILE_NS}}}profile")
        form = ET.SubElement(payload, _d("x"), {"type": "result"})
        form_type = ET.SubElement(form, _d("field"), {"var": "FORM_TYPE", "type": "hidden"})
        ET.SubElement(form_type, _d("value")).text = PROFILE_NS
        for name, spec in service.fields.items():
            values = profile.get(name)
            if spec.binary or not values:
                continue
            attrs = {"var": name}
            if len(values) > 1:  # several values of one attribute (e.g. two numbers)
                attrs["type"] = "list-multi"
            field = ET.SubElement(form, _d("field"), attrs)
            for value in values:
                ET.SubElement(field, _d("value")).text = str(value)
        await router.route(iq_result(event.stanza, payload))
        return True

    async def set_profile(event: StanzaEvent) -> bool:
        payload = event.stanza[0]
        if payload.tag != f"{{{PROFILE_NS}}}profile":
            return False
        try:
            changes = _submitted(payload)
            changed = await service.update(str(event.sender.bare), changes)
        except ProfileError as exc:
            await router.bounce(event.stanza, exc.condition, exc.text)
            return True
        await router.route(iq_result(event.stanza))
        if PHOTO_FIELD in changed:
            await module.fire(PHOTO_CHANGED, event.sender.bare)
        return True

    def _submitted(payload: ET.Element) -> dict[str, list[Value]]:
        form = payload.find(_d("x"))
        if form is None or form.get("type") != "submit":
            raise ProfileError("bad-request", "expected a data form of type submit")
        fields = form.findall(_d("field"))
        if len(fields) > MAX_FORM_FIELDS:
            raise ProfileError("not-acceptable", f"at most {MAX_FORM_FIELDS} fields per form")
        changes: dict[str, list[Value]] = {}
        for field in fields:
            var = field.get("var", "")
            values: list[Value] = [v.text or "" for v in field.findall(_d("value"))]
            if var == "FORM_TYPE":
                if values != [PROFILE_NS]:
                    raise ProfileError("bad-request", f"FORM_TYPE must be {PROFILE_NS}")
                continue
            spec = service.fields.get(var)
            if spec is None:
                raise ProfileError("bad-request",
                                   f"unknown profile field {var!r}; nothing was changed")
            if spec.binary:
                raise ProfileError("bad-request", f"set {var} with a vCard or an avatar "
                                   "publish, not in the profile form")
            changes[var] = values
        return changes

    async def set_other(event: StanzaEvent) -> bool:
        await router.bounce(event.stanza, "forbidden", "only the owner may change a profile")
        return True

    module.add_feature(PROFILE_NS)
    module.hook(f"iq-get/self/{PROFILE_NS}", get_profile)
    module.hook(f"iq-get/bare/{PROFILE_NS}", get_profile)
    module.hook(f"iq-set/self/{PROFILE_NS}", set_profile)
    module.hook(f"iq-set/bare/{PROFILE_NS}", set_other)
