"""Directory-backed profiles against a real slapd: vCard-temp (slixmpp's
xep_0054), XEP-0154 forms, XEP-0153 presence hashes and XEP-0084 avatars
(slixmpp's xep_0084), under each field policy, with `ldapsearch`-level
checks of what the directory holds afterwards."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import re
import ssl
import subprocess
import time
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
import slixmpp
from slixmpp.exceptions import IqError

from tests.ldap_fixtures import Slapd
from tests.rawclient import RawClient, parse_stanzas, read_stanza, stanza_error_of
from tests.serverproc import MlinkProcess, mlink, start_mlink

T = TypeVar("T")
DOMAIN = "example.com"
VCARD_NS = "vcard-temp"
PROFILE_NS = "urn:xmpp:tmp:profile"
DATA_NS = "jabber:x:data"
# A login plus a few iqs on loopback take well under a second; this bounds a hang.
SESSION_TIMEOUT = 30.0
# How long a change made directly in the directory may take to show: the
# configured cache lifetime (1 s) plus generous slack for a loaded machine.
VISIBLE_WITHIN = 15.0
POLL_INTERVAL = 0.2
CACHE_SECONDS = 1
MAX_PHOTO_BYTES = 4096
# The service account's policies for the main server of this module.
POLICIES = {
    "mobile": ("update", None),
    "landline": ("update", None),
    "photo_data": ("update", None),
    "org_name": ("static", "Example Corp"),
    "display_name": ("directory", None),
    "job_title": ("directory", None),
    "nickname": ("local", None),
}


def jpeg(size: int = 600) -> bytes:
    """`size` bytes that look like a JPEG (SOI, JFIF APP0, data, EOI)."""
    head = b"\xff\xd8\xff\xe0\x00\x10JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00"
    return head + os.urandom(size - len(head) - 2) + b"\xff\xd9"


def profiles_xml(policies: dict[str, tuple[str, str | None]], cache_seconds: float = CACHE_SECONDS,
                 max_photo_bytes: int = MAX_PHOTO_BYTES) -> str:
    fields = "".join(
        f'<field name="{name}" policy="{policy}"' + (f' value="{value}"' if value else "") + "/>"
        for name, (policy, value) in policies.items())
    return (f'<profiles cache-seconds="{cache_seconds}" max-photo-bytes="{max_photo_bytes}">'
            f"{fields}</profiles>")


def with_profiles(xml: str) -> Callable[[str], str]:
    def edit(text: str) -> str:
        return text.replace("<data ", xml + "\n  <data ", 1)
    return edit


def ldap_directory(slapd: Slapd) -> str:
    return (
        '<directory backend="ldap">'
        f'<ldap base="{slapd.base_dn}" bind-dn="{slapd.bind_dn}" '
        f'bind-password="{slapd.bind_password}" pool-size="4" timeout="2">'
        f"<server>{slapd.url}</server></ldap></directory>"
    )


# -- the directory, seen with the OpenLDAP tools ------------------------------------------


def user_dn(slapd: Slapd, jid: str) -> str:
    return f"mail={jid},{slapd.users_dn}"


def ldapmodify(slapd: Slapd, ldif: str) -> None:
    proc = subprocess.run(
        ["ldapmodify", "-x", "-H", slapd.url, "-D", slapd.root_dn, "-w", slapd.root_password],
        input=ldif, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr


def set_attributes(slapd: Slapd, jid: str, values: dict[str, list[bytes]]) -> None:
    """Replace attributes of `jid`'s entry as an administrator would."""
    lines = [f"dn: {user_dn(slapd, jid)}", "changetype: modify"]
    for attr, vals in values.items():
        lines.append(f"replace: {attr}")
        lines += [f"{attr}:: {base64.b64encode(v).decode()}" for v in vals]
        lines.append("-")
    ldapmodify(slapd, "\n".join(lines) + "\n")


def ldap_entry(slapd: Slapd, jid: str) -> dict[str, list[bytes]]:
    """Every attribute of the entry as `ldapsearch` shows it (names lower-cased)."""
    proc = subprocess.run(
        ["ldapsearch", "-x", "-LLL", "-o", "ldif-wrap=no", "-H", slapd.url, "-D", slapd.root_dn,
         "-w", slapd.root_password, "-s", "base", "-b", user_dn(slapd, jid)],
        capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    entry: dict[str, list[bytes]] = {}
    for line in proc.stdout.splitlines():
        name, sep, value = line.partition(":")
        if not sep or name == "dn":
            continue
        data = (base64.b64decode(value[2:]) if value.startswith(": ")
                else value.removeprefix(" ").encode())
        entry.setdefault(name.lower(), []).append(data)
    return entry


def profile_attributes(slapd: Slapd, jid: str) -> dict[str, list[bytes]]:
    """The entry without the credentials and classes nobody here changes."""
    skip = {"userpassword", "authpassword", "objectclass"}
    return {k: v for k, v in ldap_entry(slapd, jid).items() if k not in skip}


# -- clients --------------------------------------------------------------------------


def run_session(jid: str, password: str, port: int, ca_file: Path,
                body: Callable[[slixmpp.ClientXMPP], Awaitable[T]]) -> T:
    """Log in with slixmpp, run `body(client)`, disconnect; body's result."""

    async def run() -> T:
        client = slixmpp.ClientXMPP(jid, password)
        for plugin in ("xep_0030", "xep_0054", "xep_0060", "xep_0084"):
            client.register_plugin(plugin)
        client.ssl_context = ssl.create_default_context(cafile=str(ca_file))
        started: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        def on_start(_event: object) -> None:
            if not started.done():
                started.set_result(None)

        def on_failed(_event: object) -> None:
            if not started.done():
                started.set_exception(AssertionError(f"{jid} could not log in"))

        client.add_event_handler("session_start", on_start)
        client.add_event_handler("failed_all_auth", on_failed)
        client.connect(host="127.0.0.1", port=port)
        try:
            await asyncio.wait_for(started, SESSION_TIMEOUT)
            return await asyncio.wait_for(body(client), SESSION_TIMEOUT)
        finally:
            await client.disconnect()

    return asyncio.run(run())


async def fetch_vcard(client: slixmpp.ClientXMPP, jid: str) -> ET.Element:
    """The vCard element the server returns for `jid` (a bare JID)."""
    iq = await client.plugin["xep_0054"].get_vcard(slixmpp.JID(jid))
    vcard = iq.xml.find(f"{{{VCARD_NS}}}vCard")
    assert vcard is not None, str(iq)
    return vcard


async def send_vcard(client: slixmpp.ClientXMPP, vcard: ET.Element) -> None:
    iq = client.make_iq_set()
    iq.append(vcard)
    await iq.send()


def vtext(vcard: ET.Element, path: str) -> list[str]:
    """Texts at a vCard path like "N/FAMILY" or "TEL[CELL]/NUMBER"."""
    parts = [f"{{{VCARD_NS}}}{p}" for p in path.split("/")]
    return [e.text or "" for e in vcard.findall("/".join(parts))]


def tel_numbers(vcard: ET.Element, flag: str) -> list[str]:
    q = f"{{{VCARD_NS}}}"
    return [t.findtext(f"{q}NUMBER") or "" for t in vcard.findall(f"{q}TEL")
            if t.find(f"{q}{flag}") is not None]


def set_tel(vcard: ET.Element, flag: str, number: str) -> None:
    q = f"{{{VCARD_NS}}}"
    for tel in vcard.findall(f"{q}TEL"):
        if tel.find(f"{q}{flag}") is not None:
            tel.find(f"{q}NUMBER").text = number  # type: ignore[union-attr]
            return
    tel = ET.SubElement(vcard, f"{q}TEL")
    ET.SubElement(tel, f"{q}{flag}")
    ET.SubElement(tel, f"{q}NUMBER").text = number


def set_text(vcard: ET.Element, tag: str, value: str) -> None:
    q = f"{{{VCARD_NS}}}"
    elem = vcard.find(f"{q}{tag}")
    if elem is None:
        elem = ET.SubElement(vcard, f"{q}{tag}")
    elem.text = value


def photo_of(vcard: ET.Element) -> bytes | None:
    text = vcard.findtext(f"{{{VCARD_NS}}}PHOTO/{{{VCARD_NS}}}BINVAL")
    return base64.b64decode("".join(text.split())) if text else None


def set_photo(vcard: ET.Element, data: bytes) -> None:
    q = f"{{{VCARD_NS}}}"
    for old in vcard.findall(f"{q}PHOTO"):
        vcard.remove(old)
    photo = ET.SubElement(vcard, f"{q}PHOTO")
    ET.SubElement(photo, f"{q}TYPE").text = "image/jpeg"
    ET.SubElement(photo, f"{q}BINVAL").text = base64.b64encode(data).decode()


def iq_error(exc: IqError) -> tuple[str, str]:
    return exc.iq["error"]["condition"], exc.iq["error"]["text"]


def raw_iq(client: RawClient, iq_type: str, payload: str, to: str | None = None) -> ET.Element:
    stanza_id = "p-" + uuid.uuid4().hex[:8]
    to_attr = f" to='{to}'" if to else ""
    client.send(f"<iq type='{iq_type}' id='{stanza_id}'{to_attr}>{payload}</iq>")
    return read_stanza(client, "iq", stanza_id)


def form_values(reply: ET.Element) -> dict[str, list[str]]:
    form = reply.find(f"{{{PROFILE_NS}}}profile/{{{DATA_NS}}}x")
    assert form is not None and form.get("type") == "result", ET.tostring(reply)
    return {f.get("var", ""): [v.text or "" for v in f.findall(f"{{{DATA_NS}}}value")]
            for f in form.findall(f"{{{DATA_NS}}}field")}


def submit_form(fields: dict[str, list[str]]) -> str:
    body = "".join(
        f"<field var='{var}'>" + "".join(f"<value>{v}</value>" for v in values) + "</field>"
        for var, values in fields.items())
    return (f"<profile xmlns='{PROFILE_NS}'><x xmlns='{DATA_NS}' type='submit'>"
            f"<field var='FORM_TYPE' type='hidden'><value>{PROFILE_NS}</value></field>"
            f"{body}</x></profile>")


def own_presence_photo(client: RawClient) -> str | None:
    """Send available presence and return the photo hash in the copy the
    server reflects to the sender (RFC 6121 §4.2.2)."""
    client.send("<presence/>")
    text = client.read_until(r"<presence\b[^>]*>.*?</presence>")
    presence = next(s for s in parse_stanzas(re.search(
        r"<presence\b[^>]*>.*?</presence>", text, re.S).group(0)))  # type: ignore[union-attr]
    photo = presence.find("{vcard-temp:x:update}x/{vcard-temp:x:update}photo")
    assert photo is not None, ET.tostring(presence)
    return photo.text


# -- fixtures ------------------------------------------------------------------------------

PAT, PAT_PW = "pat@example.com", "pat-secret"
QUINN, QUINN_PW = "quinn@example.com", "quinn-secret"
PAT_PHOTO = jpeg()
PAT_DIRECTORY = {
    "displayName": [b"Pat Example"],
    "title": [b"Engineer"],
    "mobile": [b"+44 7700 900001"],
    "telephoneNumber": [b"+44 20 7946 0001"],
    "jpegPhoto": [PAT_PHOTO],
}


@pytest.fixture(scope="module")
def profile_server(slapd, tmp_path_factory, cert_files) -> Iterator[MlinkProcess]:
    """mlink on slapd with every policy in use; pat and quinn are users
    created for this module (the shared sample users stay untouched)."""
    if not slapd.running:
        slapd.start()
    setup = tmp_path_factory.mktemp("mlink-profiles")
    with start_mlink(setup, DOMAIN, cert_files, ldap=ldap_directory(slapd),
                     edit_config=with_profiles(profiles_xml(POLICIES))) as server:
        config = str(server.config)
        for jid, password in ((PAT, PAT_PW), (QUINN, QUINN_PW)):
            mlink("user", "add", jid, "--password", password, "--config", config)
        try:
            yield server
        finally:
            if not slapd.running:
                slapd.start()
            for jid in (PAT, QUINN):
                mlink("user", "delete", jid, "--config", config, check=False)


@pytest.fixture
def pat(profile_server, slapd) -> MlinkProcess:
    """Pat's entry reset to the sample values and the cache outlived."""
    set_attributes(slapd, PAT, PAT_DIRECTORY)
    return profile_server


def vcard_when(server: MlinkProcess, ca_file: Path, jid: str,
               ready: Callable[[ET.Element], bool]) -> ET.Element:
    """Poll `jid`'s vCard (as pat) until `ready` holds; bounded by
    VISIBLE_WITHIN, so a cached copy can expire but a bug cannot hang."""
    deadline = time.monotonic() + VISIBLE_WITHIN

    async def body(client: slixmpp.ClientXMPP) -> ET.Element:
        while True:
            vcard = await fetch_vcard(client, jid)
            if ready(vcard) or time.monotonic() > deadline:
                return vcard
            await asyncio.sleep(POLL_INTERVAL)

    return run_session(PAT, PAT_PW, server.c2s_port, ca_file, body)


def fresh_vcard(server: MlinkProcess, ca_file: Path) -> ET.Element:
    """Pat's vCard once it shows the sample directory values."""
    vcard = vcard_when(server, ca_file, PAT, lambda v: vtext(v, "FN") == ["Pat Example"]
                       and vtext(v, "TITLE") == ["Engineer"]
                       and tel_numbers(v, "CELL") == ["+44 7700 900001"]
                       and photo_of(v) == PAT_PHOTO)
    assert vtext(vcard, "FN") == ["Pat Example"], ET.tostring(vcard)
    return vcard


# -- vCard: get ------------------------------------------------------------------------------


def test_vcard_shows_directory_static_and_local_fields(pat, slapd, ca_file):
    vcard = fresh_vcard(pat, ca_file)
    assert vtext(vcard, "TITLE") == ["Engineer"]
    assert tel_numbers(vcard, "CELL") == ["+44 7700 900001"]
    assert tel_numbers(vcard, "VOICE") == ["+44 20 7946 0001"]
    assert vtext(vcard, "ORG/ORGNAME") == ["Example Corp"]  # static
    assert vtext(vcard, "EMAIL/USERID") == [PAT]
    assert photo_of(vcard) == PAT_PHOTO
    assert vtext(vcard, "PHOTO/TYPE") == ["image/jpeg"]

    # Another user sees the same vCard.
    async def body(client: slixmpp.ClientXMPP) -> ET.Element:
        return await fetch_vcard(client, PAT)

    other = run_session(QUINN, QUINN_PW, pat.c2s_port, ca_file, body)
    assert vtext(other, "FN") == ["Pat Example"]
    assert photo_of(other) == PAT_PHOTO


def test_sample_user_from_conf(profile_server, slapd, ca_file):
    """alice of conf/users.ldif, read-only: every mapped attribute shows."""
    alice = "alice@example.com"
    stored = ldap_entry(slapd, alice)

    async def body(client: slixmpp.ClientXMPP) -> ET.Element:
        return await fetch_vcard(client, alice)

    vcard = run_session(PAT, PAT_PW, profile_server.c2s_port, ca_file, body)
    assert vtext(vcard, "FN") == ["Alice Liddell"] == [v.decode() for v in stored["displayname"]]
    assert vtext(vcard, "N/GIVEN") == ["Alice"] and vtext(vcard, "N/FAMILY") == ["Liddell"]
    assert vtext(vcard, "TITLE") == [v.decode() for v in stored["title"]]
    assert tel_numbers(vcard, "CELL") == [v.decode() for v in stored["mobile"]]
    assert tel_numbers(vcard, "VOICE") == [v.decode() for v in stored["telephonenumber"]]
    assert vtext(vcard, "ORG/ORGUNIT") == [v.decode() for v in stored["ou"]]
    assert photo_of(vcard) == stored["jpegphoto"][0]
    assert vtext(vcard, "PHOTO/TYPE") == ["image/jpeg"]


# -- vCard: set under each policy --------------------------------------------------------------


def test_vcard_set_writes_update_fields_and_keeps_local_ones(pat, slapd, ca_file):
    vcard = fresh_vcard(pat, ca_file)
    before = profile_attributes(slapd, PAT)
    set_tel(vcard, "CELL", "+44 7700 900999")  # update: to the directory
    set_text(vcard, "NICKNAME", "patty")  # local: to mlink's store only

    async def body(client: slixmpp.ClientXMPP) -> ET.Element:
        await send_vcard(client, vcard)  # FN, TITLE, ORGNAME resent unchanged: fine
        return await fetch_vcard(client, PAT)

    after_vcard = run_session(PAT, PAT_PW, pat.c2s_port, ca_file, body)
    assert tel_numbers(after_vcard, "CELL") == ["+44 7700 900999"]
    assert vtext(after_vcard, "NICKNAME") == ["patty"]
    after = profile_attributes(slapd, PAT)
    assert after.pop("mobile") == [b"+44 7700 900999"]
    before.pop("mobile")
    assert after == before  # nothing else changed: no nickname, no org, no title
    assert b"patty" not in b"".join(v for vals in ldap_entry(slapd, PAT).values() for v in vals)


def test_vcard_set_with_a_directory_field_changes_nothing(pat, slapd, ca_file):
    vcard = fresh_vcard(pat, ca_file)
    before = profile_attributes(slapd, PAT)
    set_text(vcard, "FN", "Someone Else")  # directory: refused
    set_tel(vcard, "CELL", "+44 7700 900555")  # update: must not be half-applied
    set_text(vcard, "NICKNAME", "sneaky")  # local: must not be half-applied

    async def body(client: slixmpp.ClientXMPP) -> tuple[tuple[str, str], ET.Element]:
        try:
            await send_vcard(client, vcard)
        except IqError as exc:
            return iq_error(exc), await fetch_vcard(client, PAT)
        raise AssertionError("the vCard set was accepted")

    (condition, text), again = run_session(PAT, PAT_PW, pat.c2s_port, ca_file, body)
    assert condition == "not-allowed"
    assert "display_name" in text
    assert profile_attributes(slapd, PAT) == before
    assert vtext(again, "FN") == ["Pat Example"]
    assert "sneaky" not in vtext(again, "NICKNAME")


def test_vcard_omitting_directory_and_static_fields_keeps_them(pat, slapd, ca_file):
    """Clients set only their own fields: a vCard without TITLE (directory),
    ORG (static) and EMAIL (identity) changes the mobile number and keeps
    the rest as the directory and configuration have them."""
    vcard = fresh_vcard(pat, ca_file)
    q = f"{{{VCARD_NS}}}"
    for tag in ("TITLE", "ORG", "EMAIL"):
        vcard.remove(vcard.find(f"{q}{tag}"))  # type: ignore[arg-type]
    set_tel(vcard, "CELL", "+44 7700 900321")

    async def body(client: slixmpp.ClientXMPP) -> ET.Element:
        await send_vcard(client, vcard)
        return await fetch_vcard(client, PAT)

    after = run_session(PAT, PAT_PW, pat.c2s_port, ca_file, body)
    assert tel_numbers(after, "CELL") == ["+44 7700 900321"]
    assert vtext(after, "TITLE") == ["Engineer"]
    assert vtext(after, "ORG/ORGNAME") == ["Example Corp"]
    assert vtext(after, "EMAIL/USERID") == [PAT]
    stored = ldap_entry(slapd, PAT)
    assert stored["title"] == [b"Engineer"] and stored["mobile"] == [b"+44 7700 900321"]
    assert "o" not in stored


def test_fn_from_cn_and_a_set_of_fn_and_nickname_only(profile_server, slapd, ca_file):
    """quinn's entry has no displayName: FN shows cn. A vCard of just FN
    (unchanged) and NICKNAME succeeds; a different FN is refused naming
    display_name (a directory field here)."""
    q = f"{{{VCARD_NS}}}"
    cn = ldap_entry(slapd, QUINN)["cn"][0].decode()
    assert "displayname" not in ldap_entry(slapd, QUINN)

    async def body(client: slixmpp.ClientXMPP) -> tuple[ET.Element, ET.Element, tuple[str, str]]:
        before = await fetch_vcard(client, QUINN)
        own = ET.Element(f"{q}vCard")
        set_text(own, "FN", cn)
        set_text(own, "NICKNAME", "q")
        await send_vcard(client, own)
        after = await fetch_vcard(client, QUINN)
        set_text(own, "FN", "Quinn Renamed")
        try:
            await send_vcard(client, own)
        except IqError as exc:
            return before, after, iq_error(exc)
        raise AssertionError("changing a directory FN was accepted")

    before, after, (condition, text) = run_session(
        QUINN, QUINN_PW, profile_server.c2s_port, ca_file, body)
    assert vtext(before, "FN") == [cn] == ["quinn"]
    assert vtext(after, "FN") == [cn] and vtext(after, "NICKNAME") == ["q"]
    assert condition == "not-allowed" and "display_name" in text


def test_vcard_static_field_is_refused(pat, slapd, ca_file):
    vcard = fresh_vcard(pat, ca_file)
    q = f"{{{VCARD_NS}}}"
    vcard.find(f"{q}ORG/{q}ORGNAME").text = "Other Corp"  # type: ignore[union-attr]

    async def body(client: slixmpp.ClientXMPP) -> tuple[str, str]:
        try:
            await send_vcard(client, vcard)
        except IqError as exc:
            return iq_error(exc)
        raise AssertionError("changing a static field was accepted")

    condition, text = run_session(PAT, PAT_PW, pat.c2s_port, ca_file, body)
    assert condition == "not-allowed" and "org_name" in text
    assert "o" not in ldap_entry(slapd, PAT)


def test_vcard_photo_update_and_oversized_photo(pat, slapd, ca_file):
    vcard = fresh_vcard(pat, ca_file)
    new_photo = jpeg(MAX_PHOTO_BYTES - 100)
    set_photo(vcard, new_photo)
    too_big = ET.fromstring(ET.tostring(vcard))
    set_photo(too_big, jpeg(MAX_PHOTO_BYTES + 1))
    set_tel(too_big, "CELL", "+44 7700 900777")

    async def body(client: slixmpp.ClientXMPP) -> tuple[str, str]:
        await send_vcard(client, vcard)
        try:
            await send_vcard(client, too_big)
        except IqError as exc:
            return iq_error(exc)
        raise AssertionError("an oversized photo was accepted")

    condition, text = run_session(PAT, PAT_PW, pat.c2s_port, ca_file, body)
    assert condition == "not-acceptable" and "photo_data" in text and str(MAX_PHOTO_BYTES) in text
    entry = ldap_entry(slapd, PAT)
    assert entry["jpegphoto"] == [new_photo]
    assert entry["mobile"] == [b"+44 7700 900001"]  # the rest of the refused set: untouched


def test_value_the_directory_refuses_is_reported(pat, slapd, ca_file):
    vcard = fresh_vcard(pat, ca_file)
    set_tel(vcard, "CELL", "call me \u260e")  # not a printable string: invalid syntax

    async def body(client: slixmpp.ClientXMPP) -> tuple[str, str]:
        try:
            await send_vcard(client, vcard)
        except IqError as exc:
            return iq_error(exc)
        raise AssertionError("a value the directory rejects was accepted")

    condition, text = run_session(PAT, PAT_PW, pat.c2s_port, ca_file, body)
    assert condition == "not-acceptable" and "directory refused" in text
    assert ldap_entry(slapd, PAT)["mobile"] == [b"+44 7700 900001"]


def test_directory_change_is_visible_within_the_cache_lifetime(pat, slapd, ca_file):
    fresh_vcard(pat, ca_file)  # cached now
    set_attributes(slapd, PAT, {"title": [b"Chief Engineer"]})
    vcard = vcard_when(pat, ca_file, PAT, lambda v: vtext(v, "TITLE") == ["Chief Engineer"])
    assert vtext(vcard, "TITLE") == ["Chief Engineer"]


def test_directory_down_serves_cache_and_refuses_writes(pat, slapd, ca_file):
    vcard = fresh_vcard(pat, ca_file)
    changed = ET.fromstring(ET.tostring(vcard))
    set_tel(changed, "CELL", "+44 7700 900123")

    async def body(client: slixmpp.ClientXMPP) -> tuple[ET.Element, tuple[str, str]]:
        await fetch_vcard(client, PAT)  # in the cache
        with slapd.stopped():
            cached = await fetch_vcard(client, PAT)
            try:
                await send_vcard(client, changed)
            except IqError as exc:
                return cached, iq_error(exc)
        raise AssertionError("a write was accepted with the directory down")

    cached, (condition, text) = run_session(PAT, PAT_PW, pat.c2s_port, ca_file, body)
    assert vtext(cached, "FN") == ["Pat Example"]
    assert photo_of(cached) == PAT_PHOTO
    assert condition == "service-unavailable" and "directory is unavailable" in text
    assert ldap_entry(slapd, PAT)["mobile"] == [b"+44 7700 900001"]


def test_only_the_owner_sets_a_vcard(pat, ca_file):
    client = RawClient(pat.c2s_port, ca_file)
    try:
        client.login(DOMAIN, "quinn", QUINN_PW)
        reply = raw_iq(client, "set", f"<vCard xmlns='{VCARD_NS}'><FN>x</FN></vCard>", to=PAT)
        assert stanza_error_of(reply)[1] == "forbidden"
    finally:
        client.close()


# -- XEP-0154 ------------------------------------------------------------------------------------


def test_xep0154_form_get_and_update(pat, slapd, ca_file):
    fresh_vcard(pat, ca_file)
    client = RawClient(pat.c2s_port, ca_file)
    try:
        client.login(DOMAIN, "pat", PAT_PW)
        values = form_values(raw_iq(client, "get", f"<profile xmlns='{PROFILE_NS}'/>"))
        assert values["FORM_TYPE"] == [PROFILE_NS]
        assert values["display_name"] == ["Pat Example"]
        assert values["job_title"] == ["Engineer"]
        assert values["org_name"] == ["Example Corp"]
        assert values["mobile"] == ["+44 7700 900001"]
        assert "photo_data" not in values

        before = profile_attributes(slapd, PAT)
        ok = raw_iq(client, "set", submit_form({"mobile": ["+44 7700 900314"],
                                                "nickname": ["p"]}))
        assert ok.get("type") == "result", ET.tostring(ok)
        after = profile_attributes(slapd, PAT)
        assert after.pop("mobile") == [b"+44 7700 900314"]
        before.pop("mobile")
        assert after == before

        refused = raw_iq(client, "set", submit_form({"mobile": ["+44 1"],
                                                     "job_title": ["Boss"]}))
        error = refused.find("{jabber:client}error")
        assert stanza_error_of(refused)[1] == "not-allowed"
        assert "job_title" in (error.findtext(  # type: ignore[union-attr]
            "{urn:ietf:params:xml:ns:xmpp-stanzas}text") or "")
        unknown = raw_iq(client, "set", submit_form({"shoe_size": ["44"]}))
        assert stanza_error_of(unknown)[1] == "bad-request"
        assert "shoe_size" in ET.tostring(unknown, encoding="unicode")
        assert ldap_entry(slapd, PAT)["mobile"] == [b"+44 7700 900314"]

        # Another user reads it too, with the local nickname.
        other = RawClient(pat.c2s_port, ca_file)
        try:
            other.login(DOMAIN, "quinn", QUINN_PW)
            seen = form_values(raw_iq(other, "get", f"<profile xmlns='{PROFILE_NS}'/>", to=PAT))
            assert seen["nickname"] == ["p"] and seen["mobile"] == ["+44 7700 900314"]
        finally:
            other.close()
    finally:
        client.close()


# -- avatars ------------------------------------------------------------------------------------


def test_presence_carries_the_directory_photo_hash(pat, slapd, ca_file):
    fresh_vcard(pat, ca_file)
    client = RawClient(pat.c2s_port, ca_file)
    try:
        client.login(DOMAIN, "pat", PAT_PW)
        assert own_presence_photo(client) == hashlib.sha1(PAT_PHOTO).hexdigest()
    finally:
        client.close()


def test_pep_avatar_served_and_published_to_the_directory(pat, slapd, ca_file):
    fresh_vcard(pat, ca_file)
    pat_id = hashlib.sha1(PAT_PHOTO).hexdigest()

    async def read(client: slixmpp.ClientXMPP) -> tuple[Any, Any]:
        pubsub = client.plugin["xep_0060"]
        meta = await pubsub.get_items(slixmpp.JID(PAT), "urn:xmpp:avatar:metadata")
        data = await client.plugin["xep_0084"].retrieve_avatar(slixmpp.JID(PAT), pat_id)
        return meta, data

    meta, data = run_session(QUINN, QUINN_PW, pat.c2s_port, ca_file, read)
    info = meta.xml.find(".//{urn:xmpp:avatar:metadata}info")
    assert info is not None and info.get("id") == pat_id
    assert info.get("bytes") == str(len(PAT_PHOTO)) and info.get("type") == "image/jpeg"
    blob = data.xml.find(".//{urn:xmpp:avatar:data}data")
    assert blob is not None and base64.b64decode(blob.text or "") == PAT_PHOTO

    new_photo = jpeg(900)
    new_id = hashlib.sha1(new_photo).hexdigest()

    async def publish(client: slixmpp.ClientXMPP) -> None:
        avatar = client.plugin["xep_0084"]
        await avatar.publish_avatar(new_photo)
        await avatar.publish_avatar_metadata(
            {"id": new_id, "type": "image/jpeg", "bytes": len(new_photo)})

    run_session(PAT, PAT_PW, pat.c2s_port, ca_file, publish)
    assert ldap_entry(slapd, PAT)["jpegphoto"] == [new_photo]
    client = RawClient(pat.c2s_port, ca_file)
    try:
        client.login(DOMAIN, "pat", PAT_PW)
        assert own_presence_photo(client) == new_id
    finally:
        client.close()


def test_photo_change_rebroadcasts_presence(pat, slapd, ca_file):
    fresh_vcard(pat, ca_file)
    watcher = RawClient(pat.c2s_port, ca_file)
    try:
        watcher.login(DOMAIN, "pat", PAT_PW, resource="watcher")
        assert own_presence_photo(watcher) == hashlib.sha1(PAT_PHOTO).hexdigest()
        new_photo = jpeg(700)

        async def body(client: slixmpp.ClientXMPP) -> None:
            vcard = await fetch_vcard(client, PAT)
            set_photo(vcard, new_photo)
            await send_vcard(client, vcard)

        run_session(PAT, PAT_PW, pat.c2s_port, ca_file, body)
        new_hash = hashlib.sha1(new_photo).hexdigest()
        text = watcher.read_until(new_hash)
        assert new_hash in text
    finally:
        watcher.close()


@pytest.fixture(scope="module")
def readonly_photo_server(slapd, tmp_path_factory, cert_files, profile_server) -> Iterator[
        MlinkProcess]:
    """A second mlink on the same slapd where the photo is `directory`."""
    setup = tmp_path_factory.mktemp("mlink-profiles-ro")
    with start_mlink(setup, DOMAIN, cert_files, ldap=ldap_directory(slapd),
                     edit_config=with_profiles(profiles_xml(
                         {"photo_data": ("directory", None)}))) as server:
        yield server


def test_avatar_publish_follows_a_directory_photo_policy(readonly_photo_server, pat, slapd,
                                                         ca_file):
    new_photo = jpeg(500)

    async def publish(client: slixmpp.ClientXMPP) -> tuple[str, str]:
        try:
            await client.plugin["xep_0084"].publish_avatar(new_photo)
        except IqError as exc:
            return iq_error(exc)
        raise AssertionError("publishing a directory-owned photo was accepted")

    condition, text = run_session(PAT, PAT_PW, readonly_photo_server.c2s_port, ca_file, publish)
    assert condition == "not-allowed" and "photo_data" in text
    assert ldap_entry(slapd, PAT)["jpegphoto"] == [PAT_PHOTO]
    # The default on LDAP is `directory` for mapped fields: mobile too.
    vcard = vcard_when(readonly_photo_server, ca_file, PAT, lambda v: True)
    set_tel(vcard, "CELL", "+44 7700 900000")

    async def set_mobile(client: slixmpp.ClientXMPP) -> tuple[str, str]:
        try:
            await send_vcard(client, vcard)
        except IqError as exc:
            return iq_error(exc)
        raise AssertionError("changing a directory-default field was accepted")

    condition, text = run_session(PAT, PAT_PW, readonly_photo_server.c2s_port, ca_file,
                                  set_mobile)
    assert condition == "not-allowed" and "mobile" in text
