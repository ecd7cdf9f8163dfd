"""Persistent rooms in a real slapd: created over XMPP they appear as
entries; changed, added or removed with the OpenLDAP tools the live room
follows; a members-only room takes its members from a directory group; a
restart brings rooms, configuration and history back."""

from __future__ import annotations

import re
import time
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

import pytest

from mlink.directory.ldif import Entry
from tests.ldap_fixtures import Slapd, private_slapd
from tests.rawclient import CLIENT_NS, stanza_error_of
from tests.serverproc import MlinkProcess, serve, start_mlink, stop
from tests.test_im_services import Client
from tests.test_muc import (
    DISCO_INFO,
    MUC_USER,
    codes,
    configure,
    gets_groupchat,
    groupchat,
    is_presence_from,
    join,
    join_error,
)

DOMAIN = "example.com"
SERVICE = f"conference.{DOMAIN}"
ROOMS_DN = "ou=Rooms,dc=example,dc=com"
SALES = "cn=sales,ou=Groups,dc=example,dc=com"
PASSWORDS = {"alice@example.com": "alice-secret", "bob@example.com": "bob-secret",
             "carol@example.com": "carol-secret"}
ALICE, BOB, CAROL = PASSWORDS
# The feed polls every FEED seconds and the rooms are read again every
# REFRESH seconds (LDAP cannot report deletions): what a test waits for
# arrives well within WAIT.
FEED, REFRESH, WAIT = 0.3, 1, 15.0


class LdapClient(Client):
    """`Client` for the users of the slapd sample data."""

    def __init__(self, server: MlinkProcess, ca_file: Path, user: str) -> None:  # noqa: D107
        from tests.rawclient import RawClient, resource
        self.raw = RawClient(server.c2s_port, ca_file)
        self.jid = self.raw.login(DOMAIN, user, PASSWORDS[user], resource=resource())
        self.bare = user
        self.pending = []
        self._parser = ET.XMLPullParser(events=("start", "end"))
        self._parser.feed(f"<root xmlns='{CLIENT_NS}' "
                          "xmlns:stream='http://etherx.jabber.org/streams'>")
        self._depth = 0

    def sync(self) -> list[ET.Element]:
        result = self.iq("get", "<ping xmlns='urn:xmpp:ping'/>", DOMAIN)
        assert result.get("type") == "result", ET.tostring(result)
        before, self.pending = self.pending, []
        return before


def directory_xml(slapd: Slapd) -> str:
    return (f'<directory backend="ldap" changes-seconds="{FEED}">'
            f'<ldap base="{slapd.base_dn}" bind-dn="{slapd.bind_dn}" '
            f'bind-password="{slapd.bind_password}" pool-size="4" timeout="2">'
            f"<server>{slapd.url}</server></ldap></directory>")


def with_muc_options(text: str) -> str:
    modules = (f'<modules><module name="muc"><refresh-seconds>{REFRESH}</refresh-seconds>'
               "</module></modules>")
    return text.replace("</mlink>", f"  {modules}\n</mlink>")


@pytest.fixture(scope="module")
def ldap_muc(tmp_path_factory, cert_files) -> Iterator[tuple[MlinkProcess, Slapd]]:
    work = tmp_path_factory.mktemp("muc-slapd") / "slapd"
    with private_slapd(work) as slapd:
        setup = tmp_path_factory.mktemp("muc-ldap")
        with start_mlink(setup, DOMAIN, cert_files, ldap=directory_xml(slapd),
                         edit_config=with_muc_options, shards=1) as server:
            yield server, slapd


@pytest.fixture
def users(ldap_muc, ca_file) -> Iterator:
    server, _ = ldap_muc
    made: list[LdapClient] = []

    def make(user: str) -> LdapClient:
        client = LdapClient(server, ca_file, user)
        made.append(client)
        return client

    yield make
    for client in made:
        client.raw.close()


def new_room() -> str:
    return f"p-{uuid.uuid4().hex[:8]}@{SERVICE}"


def room_entry(slapd: Slapd, room: str) -> Entry | None:
    found = slapd.search(ROOMS_DN, f"(mlinkRoomJID={room})", scope="one")
    return found[0] if found else None


def wait_until(what: str, check) -> object:
    deadline = time.monotonic() + WAIT
    while True:
        found = check()
        if found:
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def persistent_room(owner: LdapClient, **fields: str) -> str:
    room = new_room()
    created = join(owner, room, "Owner")
    assert 201 in codes(created)
    reply = configure(owner, room, **{"muc#roomconfig_persistentroom": "1", **fields})
    assert reply.get("type") == "result", ET.tostring(reply)
    owner.sync()
    return room


def disco_features(client: LdapClient, room: str) -> set[str]:
    info = client.iq("get", f"<query xmlns='{DISCO_INFO}'/>", room)
    return {f.get("var", "") for f in info.iter(f"{{{DISCO_INFO}}}feature")}


def test_room_created_over_xmpp_is_an_entry_in_slapd(ldap_muc, users):
    _, slapd = ldap_muc
    alice = users(ALICE)
    room = persistent_room(alice, **{"muc#roomconfig_roomname": "Sales team"})
    # Written before the owner was told.
    entry = room_entry(slapd, room)
    assert entry is not None
    assert entry.get("mlinkRoomName") == ["Sales team"]
    assert entry.get("mlinkRoomOwner") == [ALICE]


def test_room_changed_with_ldapmodify_reaches_its_occupants(ldap_muc, users):
    _, slapd = ldap_muc
    alice, bob = users(ALICE), users(BOB)
    room = persistent_room(alice)
    join(bob, room, "Bob")
    alice.sync()
    entry = room_entry(slapd, room)
    assert entry is not None
    slapd.ldapmodify(f"dn: {entry.dn}\nchangetype: modify\nreplace: mlinkRoomWhois\n"
                     "mlinkRoomWhois: anyone\n-\nreplace: mlinkRoomName\n"
                     "mlinkRoomName: Renamed\n")
    notice = bob.expect(lambda s: s.get("from") == room and 104 in codes(s), "config change",
                        timeout=WAIT)
    assert 172 in codes(notice)  # now non-anonymous
    info = bob.iq("get", f"<query xmlns='{DISCO_INFO}'/>", room)
    identity = info.find(f"{{{DISCO_INFO}}}query/{{{DISCO_INFO}}}identity")
    assert identity is not None and identity.get("name") == "Renamed"


def test_invalid_value_keeps_previous_config_and_logs_the_dn(ldap_muc, users):
    server, slapd = ldap_muc
    alice = users(ALICE)
    room = persistent_room(alice)
    entry = room_entry(slapd, room)
    assert entry is not None
    mark = server.log.mark()
    slapd.ldapmodify(f"dn: {entry.dn}\nchangetype: modify\nreplace: mlinkRoomWhois\n"
                     "mlinkRoomWhois: everybody\n")
    server.wait_for_log(rf"room entry refused.*{re.escape(entry.dn)}.*whois", mark)
    assert "muc_semianonymous" in disco_features(alice, room)
    groupchat(alice, room, "still fine")
    gets_groupchat(alice, room, "Owner", "still fine")


def test_room_added_then_removed_in_the_directory(ldap_muc, users):
    _, slapd = ldap_muc
    alice = users(ALICE)
    room = new_room()
    slapd.ldapadd(f"dn: mlinkRoomJID={room},{ROOMS_DN}\nobjectClass: mlinkRoom\n"
                  f"mlinkRoomJID: {room}\nmlinkRoomName: From LDAP\n"
                  f"mlinkRoomOwner: {ALICE}\n")

    # The room exists once the server read it (a join then creates nothing).
    wait_until("the room from the directory",
               lambda: "muc_persistent" in disco_features(alice, room))
    entered = join(alice, room, "Alice")
    assert 201 not in codes(entered)
    assert entered.find(f"{{{MUC_USER}}}x/{{{MUC_USER}}}item").get("affiliation") == "owner"
    slapd.ldapdelete(f"mlinkRoomJID={room},{ROOMS_DN}")
    gone = alice.expect(is_presence_from(f"{room}/Alice", "unavailable"), "destroy",
                        timeout=WAIT)
    assert gone.find(f"{{{MUC_USER}}}x/{{{MUC_USER}}}destroy") is not None


def test_member_group_admits_members_and_follows_the_group(ldap_muc, users):
    _, slapd = ldap_muc
    alice, bob, carol = users(ALICE), users(BOB), users(CAROL)
    room = persistent_room(alice, **{"muc#roomconfig_membersonly": "1"})
    # A group that does not exist: refused, nothing changes.
    reply = configure(alice, room, **{"x-mlink#member_group": "cn=nope,ou=Groups,dc=example,dc=com"})
    assert stanza_error_of(reply)[1] == "item-not-found"
    reply = configure(alice, room, **{"x-mlink#member_group": SALES})
    assert reply.get("type") == "result", ET.tostring(reply)
    join(bob, room, "Bob")  # bob is in sales
    assert join_error(carol, room, "Carol")[1] == "registration-required"
    slapd.ldapmodify(f"dn: {SALES}\nchangetype: modify\nadd: member\n"
                     "member: mail=carol@example.com,ou=People,dc=example,dc=com\n-\n"
                     "delete: member\nmember: mail=bob@example.com,ou=People,dc=example,dc=com\n")
    removed = bob.expect(is_presence_from(f"{room}/Bob", "unavailable"), "removal",
                         timeout=WAIT)
    assert 321 in codes(removed)
    join(carol, room, "Carol")
    assert join_error(bob, room, "Bob")[1] == "registration-required"
    slapd.ldapmodify(f"dn: {SALES}\nchangetype: modify\nadd: member\n"
                     "member: mail=bob@example.com,ou=People,dc=example,dc=com\n-\n"
                     "delete: member\nmember: mail=carol@example.com,ou=People,dc=example,dc=com\n")


def test_restart_keeps_rooms_config_and_history(tmp_path, cert_files, ca_file):
    with private_slapd(tmp_path / "slapd") as slapd:
        setup = tmp_path / "mlink"
        with start_mlink(setup, DOMAIN, cert_files, ldap=directory_xml(slapd),
                         edit_config=with_muc_options, shards=1) as server:
            alice = LdapClient(server, ca_file, ALICE)
            room = persistent_room(alice, **{"muc#roomconfig_roomname": "Kept",
                                             "muc#roomconfig_moderatedroom": "1"})
            groupchat(alice, room, "remember me")
            gets_groupchat(alice, room, "Owner", "remember me")
            alice.raw.close()
            assert stop(server) == 0
            again = serve(server.config, DOMAIN, 1)
            try:
                bob = LdapClient(again, ca_file, BOB)
                wait_until("the room loaded", lambda: "muc_moderated" in disco_features(bob, room))
                mine = join(bob, room, "Bob")
                assert 201 not in codes(mine)
                assert mine.find(f"{{{MUC_USER}}}x/{{{MUC_USER}}}item").get("role") == "visitor"
                kept = [s.findtext(f"{{{CLIENT_NS}}}body") for s in bob.sync()
                        if s.find(f"{{{CLIENT_NS}}}body") is not None]
                assert kept == ["remember me"]
                info = bob.iq("get", f"<query xmlns='{DISCO_INFO}'/>", room)
                identity = info.find(f"{{{DISCO_INFO}}}query/{{{DISCO_INFO}}}identity")
                assert identity is not None and identity.get("name") == "Kept"
            finally:
                stop(again)



def test_only_members_of_the_creators_group_create_rooms(ldap_muc, tmp_path, cert_files,
                                                         ca_file):
    _, slapd = ldap_muc

    def creators(text: str) -> str:
        return text.replace("</mlink>", '<modules><module name="muc"><create>group</create>'
                                        f"<create-group>{SALES}</create-group></module>"
                                        "</modules>\n</mlink>")

    with start_mlink(tmp_path, DOMAIN, cert_files, ldap=directory_xml(slapd),
                     edit_config=creators, shards=1) as server:
        alice, carol = LdapClient(server, ca_file, ALICE), LdapClient(server, ca_file, CAROL)
        try:
            assert join_error(carol, new_room(), "Carol") == ("cancel", "not-allowed")
            created = join(alice, new_room(), "Alice")
            assert 201 in codes(created)
        finally:
            alice.raw.close()
            carol.raw.close()
