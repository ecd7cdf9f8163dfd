"""XEP-0054 vcard-temp through the profile model (`mlink.profile`).

A vCard is a view of the profile: each field with a vCard element (the
`vcard` column of `mlink.profile.fields`) appears there, and nothing else is
kept. Anyone may fetch any local user's vCard (vcard-temp is public by
nature, as on every server); only the owner may set it.

A set is the whole vCard, as XEP-0054 §3.2 says: "these are the values".
For every field the vCard can express, the value in the set (or none, if the
element is absent) is compared with the current one, and only differences
are changes. So a client that fetches, edits and resends its vCard changes
exactly what the user edited. A field the directory or the configuration
owns (`directory` and `static` policies) that the set leaves out keeps its
value: real clients set only their own fields (FN, NICKNAME, PHOTO) and
never send EMAIL, so treating the omission as "clear it" refused every such
set. Only a different value for such a field is refused (`not-allowed`,
naming it), and then nothing is changed. So does a field on an attribute
the directory entry must keep (`sn`: person's MUST), which could only fail.
Leaving out any other field the user may edit (`update`, `local`) clears
it, as XEP-0054 says. Fields the vCard cannot express (e.g. `department_number`) are never touched
by a vCard set. Elements mlink does not map (MIDDLE, JABBERID, X-...) are not
stored; PHOTO/EXTVAL is refused (`feature-not-implemented`).

The photo is served with the type its bytes show (JPEG, PNG or GIF), since
jpegPhoto holds whatever a client uploaded.
"""

from __future__ import annotations

import base64
import binascii
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from typing import TYPE_CHECKING

from mlink.hooks import StanzaEvent
from mlink.modules.util import iq_result
from mlink.profile.fields import PHOTO_FIELD, FieldSpec
from mlink.profile.model import PHOTO_CHANGED, Profile, ProfileError, Value, profiles_of

if TYPE_CHECKING:
    from mlink.module import Module

VCARD_NS = "vcard-temp"
# Base64 lines in BINVAL, as RFC 2045 and most clients write them.
BASE64_LINE = 76
# TEL flags per field; the first listed is the one that identifies it.
TEL_FLAGS = {"landline": ("VOICE", "WORK"), "mobile": ("CELL",), "fax": ("FAX",),
             "pager": ("PAGER",)}
# A TEL element belongs to the first field whose identifying flag it has;
# one with none of them is a landline (XEP-0054: VOICE is the default).
TEL_ORDER = ("mobile", "fax", "pager")


def _q(tag: str) -> str:
    return f"{{{VCARD_NS}}}{tag}"


def photo_type(data: bytes) -> str:
    """The MIME type the photo's bytes show (JPEG when unsure)."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "image/gif"
    return "image/jpeg"


def _text(parent: ET.Element, tag: str, value: str) -> None:
    ET.SubElement(parent, _q(tag)).text = value


def build_vcard(profile: Profile, fields: dict[str, FieldSpec]) -> ET.Element:
    """The vCard (XEP-0054) showing `profile`."""
    vcard = ET.Element(_q("vCard"))
    groups: dict[str, ET.Element] = {}
    for name, spec in fields.items():
        values = profile.get(name)
        if spec.vcard is None or not values:
            continue
        top, _, sub = spec.vcard.partition("/")
        if top == "PHOTO":
            photo = ET.SubElement(vcard, _q("PHOTO"))
            data = values[0] if isinstance(values[0], bytes) else values[0].encode()
            _text(photo, "TYPE", photo_type(data))
            encoded = base64.b64encode(data).decode("ascii")
            _text(photo, "BINVAL", "\n".join(
                encoded[i:i + BASE64_LINE] for i in range(0, len(encoded), BASE64_LINE)))
        elif top == "TEL":
            for value in values:
                tel = ET.SubElement(vcard, _q("TEL"))
                for flag in TEL_FLAGS[name]:
                    ET.SubElement(tel, _q(flag))
                _text(tel, "NUMBER", str(value))
        elif top == "EMAIL":
            for value in values:
                email = ET.SubElement(vcard, _q("EMAIL"))
                ET.SubElement(email, _q("INTERNET"))
                _text(email, "USERID", str(value))
        elif sub:  # N, ORG, ADR: one element holding several fields
            group = groups.get(top)
            if group is None:
                group = groups[top] = ET.SubElement(vcard, _q(top))
                if top == "ADR":
                    ET.SubElement(group, _q("WORK"))
            for value in values:
                _text(group, sub, str(value))
        else:
            for value in values:
                _text(vcard, top, str(value))
    return vcard


def _texts(elements: Sequence[ET.Element]) -> list[Value]:
    return [e.text or "" for e in elements]


def parse_vcard(vcard: ET.Element, fields: dict[str, FieldSpec]) -> dict[str, list[Value]]:
    """The values a vCard set gives every field the vCard can express
    (an empty list: the field is absent). ProfileError for a bad photo."""
    found: dict[str, list[Value]] = {}
    tels: dict[str, list[Value]] = {name: [] for name in TEL_FLAGS}
    for tel in vcard.findall(_q("TEL")):
        number = tel.findtext(_q("NUMBER")) or ""
        kind = next((n for n in TEL_ORDER if tel.find(_q(TEL_FLAGS[n][0])) is not None),
                    "landline")
        tels[kind].append(number)
    for name, spec in fields.items():
        if spec.vcard is None:
            continue
        top, _, sub = spec.vcard.partition("/")
        if top == "PHOTO":
            found[name] = _photo(vcard)
        elif top == "TEL":
            found[name] = tels[name]
        elif top == "EMAIL":
            found[name] = _texts(vcard.findall(f"{_q('EMAIL')}/{_q('USERID')}"))
        elif sub:  # N, ORG, ADR: the first one (for ADR the first work address)
            groups = vcard.findall(_q(top))
            if top == "ADR":
                groups = [g for g in groups if g.find(_q("WORK")) is not None] or groups
            found[name] = _texts(groups[0].findall(_q(sub))) if groups else []
        else:
            found[name] = _texts(vcard.findall(_q(top)))
    return found


def _photo(vcard: ET.Element) -> list[Value]:
    photo = vcard.find(_q("PHOTO"))
    if photo is None:
        return []
    if photo.find(_q("EXTVAL")) is not None and photo.find(_q("BINVAL")) is None:
        raise ProfileError("feature-not-implemented",
                           "PHOTO/EXTVAL is not supported; send the photo as BINVAL")
    text = "".join((photo.findtext(_q("BINVAL")) or "").split())
    if not text:
        return []
    try:
        return [base64.b64decode(text, validate=True)]
    except (binascii.Error, ValueError):
        raise ProfileError("bad-request", "PHOTO/BINVAL is not valid base64") from None


def without_omitted_kept(changes: dict[str, list[Value]],
                         fields: dict[str, FieldSpec]) -> dict[str, list[Value]]:
    """`changes` minus the fields the vCard left out that a user cannot
    clear (`directory`/`static` ones, and those on an attribute the entry
    must have, like `sn`): an absent element there means "not mine to say",
    not "clear it"."""
    return {name: values for name, values in changes.items()
            if values or fields[name].clearable}


def setup(module: Module) -> None:
    router = module.router
    service = profiles_of(module)

    async def get_vcard(event: StanzaEvent) -> bool:
        if event.stanza[0].tag != _q("vCard"):
            return False
        try:
            profile = await service.get(str(event.to.bare))
        except ProfileError as exc:
            await router.bounce(event.stanza, exc.condition, exc.text)
            return True
        await router.route(iq_result(event.stanza, build_vcard(profile, service.fields)))
        return True

    async def set_vcard(event: StanzaEvent) -> bool:
        if event.stanza[0].tag != _q("vCard"):
            return False
        user = str(event.sender.bare)
        try:
            changes = without_omitted_kept(parse_vcard(event.stanza[0], service.fields),
                                           service.fields)
            changed = await service.update(user, changes)
        except ProfileError as exc:
            await router.bounce(event.stanza, exc.condition, exc.text)
            return True
        await router.route(iq_result(event.stanza))
        if PHOTO_FIELD in changed:
            await module.fire(PHOTO_CHANGED, event.sender.bare)
        return True

    async def set_other(event: StanzaEvent) -> bool:
        await router.bounce(event.stanza, "forbidden", "only the owner may set a vCard")
        return True

    module.add_feature(VCARD_NS)
    module.hook(f"iq-get/self/{VCARD_NS}", get_vcard)
    module.hook(f"iq-get/bare/{VCARD_NS}", get_vcard)
    module.hook(f"iq-set/self/{VCARD_NS}", set_vcard)
    module.hook(f"iq-set/bare/{VCARD_NS}", set_other)
