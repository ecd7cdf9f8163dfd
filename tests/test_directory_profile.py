"""Profile storage in the directory: `user_attributes` and `modify_user` on
both backends, checked through the API and against what the directory
really holds (`ldapsearch` for slapd, the file for the embedded backend).

LDAP tests that write use a user of their own (added with ldapadd, removed
after), so the sample users stay as conf/users.ldif has them for every
other test of the session.
"""

from __future__ import annotations

import base64
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from mlink.config_model import DirectoryConfig
from mlink.directory import ldif, open_directory
from mlink.directory.base import (
    Directory,
    DirectoryRefused,
    DirectoryUnavailable,
    NoSuchUser,
)
from tests.ldap_fixtures import REPO, Slapd, embedded_directory, sample_entries

CONF = REPO / "conf"
BASE_DN = "dc=example,dc=com"
SAMPLE_PHOTO = ldif.parse((CONF / "users.ldif").read_text())[0].first("jpegPhoto")


@dataclass
class Backend:
    """A directory under test, a user it may change, and a way to read that
    user's entry without going through the Directory."""

    name: str
    directory: Directory
    jid: str
    stored: Callable[[], ldif.Entry]


def new_user_ldif(jid: str) -> str:
    local = jid.split("@")[0]
    photo = base64.b64encode(SAMPLE_PHOTO).decode()
    return (
        f"dn: mail={jid},ou=People,{BASE_DN}\n"
        "objectClass: inetOrgPerson\n"
        f"cn: {local}\nsn: Tester\nuid: {local}\nmail: {jid}\n"
        "displayName: Dora Tester\ntitle: Tester\nmobile: +1 555 0199\n"
        "telephoneNumber: +1 555 0198\n"
        f"jpegPhoto:: {photo}\n"
        "userPassword: {SSHA}6Ay5KvuhaXeAhCSGT/uxZQxwuWiIh67yfVNVag==\n"
    )


@pytest.fixture(params=["ldap", "embedded"])
async def backend(
    request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[Backend]:
    jid = f"dora-{uuid.uuid4().hex[:8]}@example.com"
    if request.param == "ldap":
        slapd: Slapd = request.getfixturevalue("slapd")
        config: DirectoryConfig = request.getfixturevalue("ldap_config")
        slapd.ldapadd(new_user_ldif(jid))
        dn = f"mail={jid},ou=People,{BASE_DN}"

        def stored() -> ldif.Entry:
            (entry,) = slapd.search(dn, scope="base", attrs=("*",))
            return entry

        directory = open_directory(config)
        try:
            yield Backend("ldap", directory, jid, stored)
        finally:
            await directory.aclose()
            if slapd.running:
                slapd.ldapdelete(dn)
        return
    path = tmp_path / "directory.ldif"
    entries = sample_entries() + ldif.parse(new_user_ldif(jid))
    directory = embedded_directory(path, entries)

    def stored_embedded() -> ldif.Entry:
        for entry in ldif.parse(path.read_text()):
            if entry.first("mail") == jid:
                return entry
        raise AssertionError(f"{jid} not in {path}")

    try:
        yield Backend("embedded", directory, jid, stored_embedded)
    finally:
        await directory.aclose()


async def test_sample_profile_attributes(backend: Backend) -> None:
    got = await backend.directory.user_attributes(
        "alice@example.com",
        ["displayName", "givenname", "TITLE", "telephoneNumber", "mobile", "o", "ou",
         "jpegPhoto", "labeledURI"],
    )
    assert got == {
        "displayName": [b"Alice Liddell"],
        "givenname": [b"Alice"],
        "TITLE": [b"Sales Manager"],
        "telephoneNumber": [b"+1 555 0100"],
        "mobile": [b"+1 555 0101"],
        "o": [b"Example Corp"],
        "ou": [b"Sales"],
        "jpegPhoto": [SAMPLE_PHOTO],
    }  # keyed as requested; labeledURI absent
    assert SAMPLE_PHOTO[:2] == b"\xff\xd8" and SAMPLE_PHOTO[-2:] == b"\xff\xd9"
    assert await backend.directory.user_attributes("nobody@example.com", ["cn"]) is None
    assert await backend.directory.user_attributes("bob@example.com", []) == {}


async def test_credentials_are_not_profile_data(backend: Backend) -> None:
    got = await backend.directory.user_attributes(
        "alice@example.com", ["userPassword", "authPassword", "cn"]
    )
    assert got == {"cn": [b"Alice Liddell"]}
    for attribute in ("userPassword", "authPassword", "mail", "objectClass"):
        with pytest.raises(DirectoryRefused):
            await backend.directory.modify_user(backend.jid, {attribute: [b"x"]})


async def test_modify_replaces_and_deletes(backend: Backend) -> None:
    d = backend.directory
    await d.modify_user(backend.jid, {
        "mobile": [b"+44 20 7946 0000"],
        "title": [],  # delete
        "labeledURI": [],  # absent: deleting it is no error
        "displayName": ["Dóra Tëster".encode()],
        "departmentNumber": [b"42", b"43"],
    })
    got = await d.user_attributes(
        backend.jid, ["mobile", "title", "displayName", "departmentNumber", "telephoneNumber"]
    )
    assert got == {
        "mobile": [b"+44 20 7946 0000"],
        "displayName": ["Dóra Tëster".encode()],
        "departmentNumber": [b"42", b"43"],
        "telephoneNumber": [b"+1 555 0198"],  # untouched
    }
    entry = backend.stored()
    assert entry.get("mobile") == ["+44 20 7946 0000"]
    assert entry.get("title") == []
    assert entry.get("displayName") == ["Dóra Tëster"]
    assert sorted(entry.get("departmentNumber")) == ["42", "43"]
    assert entry.get("telephoneNumber") == ["+1 555 0198"]


async def test_jpeg_photo_round_trip(backend: Backend) -> None:
    # Every byte value, and bytes that happen to be valid UTF-8 too.
    photo = b"\xff\xd8\xff\xe0" + bytes(range(256)) * 4 + b"plain text\n\r\x00" + b"\xff\xd9"
    await backend.directory.modify_user(backend.jid, {"jpegPhoto": [photo]})
    assert await backend.directory.user_attributes(backend.jid, ["jpegPhoto"]) == {
        "jpegPhoto": [photo]
    }
    assert backend.stored().get("jpegPhoto") == [photo]
    await backend.directory.modify_user(backend.jid, {"jpegPhoto": []})
    assert await backend.directory.user_attributes(backend.jid, ["jpegPhoto"]) == {}
    assert backend.stored().get("jpegPhoto") == []


@pytest.mark.parametrize(
    "bad",
    [
        {"noSuchAttribute": [b"x"]},  # unknown attribute type
        {"displayName": [b"one", b"two"]},  # single-valued
        {"sn": []},  # required by person
        {"title": [b"\xff\xfe not utf-8"]},  # Directory String syntax
    ],
    ids=["unknown", "single-valued", "required", "syntax"],
)
async def test_refused_change_changes_nothing(backend: Backend, bad: dict) -> None:
    before_api = await backend.directory.user_attributes(
        backend.jid, ["mobile", "title", "displayName", "sn"]
    )
    before = backend.stored()
    changes = {"mobile": [b"+1 555 0000"], "title": [], **bad}
    with pytest.raises(DirectoryRefused) as info:
        await backend.directory.modify_user(backend.jid, changes)
    assert str(info.value)  # the directory's words, for the stanza error text
    assert await backend.directory.user_attributes(
        backend.jid, ["mobile", "title", "displayName", "sn"]
    ) == before_api
    after = backend.stored()
    assert after.attrs == before.attrs
    assert after.get("mobile") == ["+1 555 0199"] and after.get("title") == ["Tester"]


async def test_no_such_user(backend: Backend) -> None:
    with pytest.raises(NoSuchUser):
        await backend.directory.modify_user("nobody@example.com", {"mobile": [b"1"]})


async def test_roster_items_add_the_mlink_class(backend: Backend) -> None:
    items = [b'{"jid":"alice@example.com","name":"Alice","groups":["Friends"]}',
             b'{"jid":"bob@example.com"}']
    assert "mlinkUser" not in backend.stored().get("objectClass")
    await backend.directory.modify_user(backend.jid, {"mlinkRosterItem": items})
    got = await backend.directory.user_attributes(backend.jid, ["mlinkRosterItem"])
    assert got is not None and sorted(got["mlinkRosterItem"]) == sorted(items)
    entry = backend.stored()
    assert "mlinkUser" in entry.get("objectClass")
    assert sorted(v.encode() for v in entry.get("mlinkRosterItem")) == sorted(items)
    await backend.directory.modify_user(backend.jid, {"mlinkRosterItem": []})
    assert backend.stored().get("mlinkRosterItem") == []


async def test_ldap_unavailable(slapd: Slapd, ldap_config: DirectoryConfig) -> None:
    directory = open_directory(ldap_config)
    try:
        assert await directory.user_attributes("alice@example.com", ["cn"])
        with slapd.stopped():
            with pytest.raises(DirectoryUnavailable):
                await directory.user_attributes("alice@example.com", ["cn"])
            with pytest.raises(DirectoryUnavailable):
                await directory.modify_user("alice@example.com", {"mobile": [b"1"]})
        # Back again: the pool reconnects; nothing was written meanwhile.
        got = await directory.user_attributes("alice@example.com", ["mobile"])
        assert got == {"mobile": [b"+1 555 0101"]}
    finally:
        await directory.aclose()


async def test_embedded_refusal_leaves_file_untouched(tmp_path: Path) -> None:
    path = tmp_path / "directory.ldif"
    directory = embedded_directory(path, sample_entries())
    before = path.read_bytes()
    with pytest.raises(DirectoryRefused):
        await directory.modify_user("alice@example.com", {"mobile": [b"1"], "bogus": [b"x"]})
    assert path.read_bytes() == before
    # An alias writes the canonical attribute.
    await directory.modify_user("alice@example.com", {"mobileTelephoneNumber": [b"+1 555 7"]})
    assert await directory.user_attributes("alice@example.com", ["mobile"]) == {
        "mobile": [b"+1 555 7"]
    }
    # The file stays loadable: parse it back whole.
    assert len(ldif.parse(path.read_text())) == len(sample_entries())
