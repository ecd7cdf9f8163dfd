"""Profiles on the embedded directory (the standalone server): the same
vCard, XEP-0154 and avatar features, with the embedded defaults (mapped
fields `update`, identity fields `directory`, unmapped fields `local`),
checked against what the LDIF file holds afterwards."""

from __future__ import annotations

import base64
import hashlib
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

import pytest
import slixmpp
from slixmpp.exceptions import IqError

from mlink.directory import ldif
from tests.rawclient import RawClient, stanza_error_of
from tests.serverproc import MlinkProcess, start_mlink
from tests.test_profile_ldap import (
    PROFILE_NS,
    VCARD_NS,
    fetch_vcard,
    form_values,
    iq_error,
    jpeg,
    own_presence_photo,
    photo_of,
    profiles_xml,
    raw_iq,
    run_session,
    send_vcard,
    set_photo,
    set_tel,
    set_text,
    submit_form,
    tel_numbers,
    vtext,
    with_profiles,
)

DOMAIN = "localhost"
ALICE, ALICE_PW = "alice@localhost", "alice-secret"
BOB, BOB_PW = "bob@localhost", "bob-secret"
CAROL, CAROL_PW = "carol@localhost", "carol-secret"
MAX_PHOTO_BYTES = 8192


@pytest.fixture(scope="module")
def embedded(tmp_path_factory, cert_files) -> Iterator[MlinkProcess]:
    setup = tmp_path_factory.mktemp("mlink-profiles-embedded")
    with start_mlink(setup, DOMAIN, cert_files, users={ALICE: ALICE_PW, BOB: BOB_PW, CAROL: CAROL_PW},
                     edit_config=with_profiles(profiles_xml(
                         {"org_name": ("static", "Localhost Ltd")},
                         max_photo_bytes=MAX_PHOTO_BYTES))) as server:
        yield server


def entry(server: MlinkProcess, jid: str) -> ldif.Entry:
    """The user's entry as the LDIF file holds it now."""
    path = Path(server.config).parent / "directory.ldif"
    for found in ldif.parse(path.read_text()):
        if found.first("mail") in (jid, jid.encode()):
            return found
    raise AssertionError(f"no entry for {jid} in {path}")


def as_bytes(values: list[str | bytes]) -> list[bytes]:
    return [v.encode() if isinstance(v, str) else v for v in values]


def test_vcard_set_writes_the_embedded_directory(embedded, ca_file):
    photo = jpeg(2000)

    async def body(client: slixmpp.ClientXMPP) -> tuple[ET.Element, ET.Element]:
        vcard = await fetch_vcard(client, ALICE)
        set_text(vcard, "FN", "Alice Liddell")
        set_text(vcard, "TITLE", "Curious")
        set_text(vcard, "NICKNAME", "ally")
        set_tel(vcard, "CELL", "+44 7700 900002")
        set_photo(vcard, photo)
        await send_vcard(client, vcard)
        return await fetch_vcard(client, ALICE), await fetch_vcard(client, BOB)

    mine, bobs = run_session(ALICE, ALICE_PW, embedded.c2s_port, ca_file, body)
    assert vtext(mine, "FN") == ["Alice Liddell"] and vtext(mine, "TITLE") == ["Curious"]
    assert vtext(mine, "NICKNAME") == ["ally"]
    assert tel_numbers(mine, "CELL") == ["+44 7700 900002"]
    assert photo_of(mine) == photo
    assert vtext(mine, "ORG/ORGNAME") == ["Localhost Ltd"]
    assert vtext(bobs, "ORG/ORGNAME") == ["Localhost Ltd"]
    stored = entry(embedded, ALICE)
    assert as_bytes(stored.get("displayName")) == [b"Alice Liddell"]
    assert as_bytes(stored.get("title")) == [b"Curious"]
    assert as_bytes(stored.get("mobile")) == [b"+44 7700 900002"]
    assert as_bytes(stored.get("jpegPhoto")) == [photo]
    assert stored.get("o") == []  # static: never written
    assert b"ally" not in Path(embedded.config).parent.joinpath("directory.ldif").read_bytes()

    # Bob sees it.
    async def bob_reads(client: slixmpp.ClientXMPP) -> ET.Element:
        return await fetch_vcard(client, ALICE)

    seen = run_session(BOB, BOB_PW, embedded.c2s_port, ca_file, bob_reads)
    assert vtext(seen, "FN") == ["Alice Liddell"] and photo_of(seen) == photo


def test_identity_field_and_oversized_photo_refused(embedded, ca_file):
    async def body(client: slixmpp.ClientXMPP) -> list[tuple[str, str]]:
        errors = []
        vcard = await fetch_vcard(client, ALICE)
        email = vcard.find(f"{{{VCARD_NS}}}EMAIL/{{{VCARD_NS}}}USERID")
        assert email is not None and email.text == ALICE
        email.text = "someone@else.example"
        set_text(vcard, "TITLE", "Renamed")
        try:
            await send_vcard(client, vcard)
        except IqError as exc:
            errors.append(iq_error(exc))
        vcard = await fetch_vcard(client, ALICE)
        set_photo(vcard, jpeg(MAX_PHOTO_BYTES + 1))
        try:
            await send_vcard(client, vcard)
        except IqError as exc:
            errors.append(iq_error(exc))
        return errors

    before = entry(embedded, ALICE)
    (mail_cond, mail_text), (photo_cond, photo_text) = run_session(
        ALICE, ALICE_PW, embedded.c2s_port, ca_file, body)
    assert mail_cond == "not-allowed" and "email" in mail_text
    assert photo_cond == "not-acceptable" and str(MAX_PHOTO_BYTES) in photo_text
    after = entry(embedded, ALICE)
    assert after.get("mail") == before.get("mail")
    assert after.get("title") == before.get("title")
    assert after.get("jpegPhoto") == before.get("jpegPhoto")


def test_xep0154_and_avatars_on_the_embedded_directory(embedded, ca_file):
    client = RawClient(embedded.c2s_port, ca_file)
    try:
        client.login(DOMAIN, "bob", BOB_PW)
        ok = raw_iq(client, "set", submit_form({"display_name": ["Bob Builder"],
                                                "landline": ["+44 20 7946 0002"]}))
        assert ok.get("type") == "result", ET.tostring(ok)
        values = form_values(raw_iq(client, "get", f"<profile xmlns='{PROFILE_NS}'/>"))
        assert values["display_name"] == ["Bob Builder"]
        assert values["landline"] == ["+44 20 7946 0002"]
        refused = raw_iq(client, "set", submit_form({"system_username": ["robert"]}))
        assert stanza_error_of(refused)[1] == "not-allowed"
        stored = entry(embedded, BOB)
        assert as_bytes(stored.get("displayName")) == [b"Bob Builder"]
        assert as_bytes(stored.get("telephoneNumber")) == [b"+44 20 7946 0002"]
        assert as_bytes(stored.get("uid")) == [b"bob"]
        assert own_presence_photo(client) is None  # no photo yet: an empty <photo/>
    finally:
        client.close()

    photo = jpeg(1500)
    photo_id = hashlib.sha1(photo).hexdigest()

    async def publish(xmpp: slixmpp.ClientXMPP) -> None:
        avatar = xmpp.plugin["xep_0084"]
        await avatar.publish_avatar(photo)
        await avatar.publish_avatar_metadata(
            {"id": photo_id, "type": "image/jpeg", "bytes": len(photo)})

    run_session(BOB, BOB_PW, embedded.c2s_port, ca_file, publish)
    assert as_bytes(entry(embedded, BOB).get("jpegPhoto")) == [photo]

    async def read(xmpp: slixmpp.ClientXMPP) -> bytes:
        data = await xmpp.plugin["xep_0084"].retrieve_avatar(slixmpp.JID(BOB), photo_id)
        blob = data.xml.find(".//{urn:xmpp:avatar:data}data")
        assert blob is not None
        return base64.b64decode(blob.text or "")

    assert run_session(ALICE, ALICE_PW, embedded.c2s_port, ca_file, read) == photo
    client = RawClient(embedded.c2s_port, ca_file)
    try:
        client.login(DOMAIN, "bob", BOB_PW)
        assert own_presence_photo(client) == photo_id
    finally:
        client.close()

    # An empty metadata publish removes the avatar (XEP-0084 §4.2).
    async def stop(xmpp: slixmpp.ClientXMPP) -> None:
        await xmpp.plugin["xep_0084"].stop()

    run_session(BOB, BOB_PW, embedded.c2s_port, ca_file, stop)
    assert entry(embedded, BOB).get("jpegPhoto") == []


def test_a_client_setting_only_its_own_fields(embedded, ca_file):
    """What real clients send: a vCard of FN and NICKNAME only, no EMAIL
    (which the directory owns). It succeeds, FN is read back, and the
    directory's email stays; FN comes from cn before anyone set one."""
    q = f"{{{VCARD_NS}}}"

    async def body(client: slixmpp.ClientXMPP) -> tuple[ET.Element, ET.Element, ET.Element]:
        before = await fetch_vcard(client, CAROL)
        own = ET.Element(f"{q}vCard")
        set_text(own, "FN", "Carol Christmas")
        set_text(own, "NICKNAME", "caz")
        await send_vcard(client, own)
        after = await fetch_vcard(client, CAROL)
        # The same again, now repeating EMAIL unchanged: still fine.
        again = ET.fromstring(ET.tostring(own))
        ET.SubElement(ET.SubElement(again, f"{q}EMAIL"), f"{q}USERID").text = CAROL
        set_text(again, "NICKNAME", "carol")
        await send_vcard(client, again)
        return before, after, await fetch_vcard(client, CAROL)

    before, after, last = run_session(CAROL, CAROL_PW, embedded.c2s_port, ca_file, body)
    assert vtext(before, "FN") == ["carol"]  # cn, as `mlink user add` wrote it
    assert vtext(after, "FN") == ["Carol Christmas"] and vtext(after, "NICKNAME") == ["caz"]
    assert vtext(after, "EMAIL/USERID") == [CAROL]
    assert vtext(last, "NICKNAME") == ["carol"] and vtext(last, "EMAIL/USERID") == [CAROL]
    stored = entry(embedded, CAROL)
    assert as_bytes(stored.get("displayName")) == [b"Carol Christmas"]
    assert as_bytes(stored.get("mail")) == [CAROL.encode()]
    assert as_bytes(stored.get("sn")) == [b"carol"]  # person must keep sn: omitted, kept
