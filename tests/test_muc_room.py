"""The sans-IO room (mlink/modules/muc/room.py) without sockets: history
selection, who may moderate whom, and that a semi-anonymous room never
puts an occupant's real JID in what a participant receives."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import pytest

from mlink.jid import parse_jid
from mlink.modules.muc.config import ConfigError, RoomConfig, apply_form
from mlink.modules.muc.roles import Affiliation, Role, may_set_affiliation, may_set_role
from mlink.modules.muc.room import Effects, Room
from mlink.xml.serialize import CLIENT_NS, serialize

ROOM = parse_jid("room@conference.example.com")
MUC = "http://jabber.org/protocol/muc"
OWNER = parse_jid("owner@example.com/a")
PEER = parse_jid("peer@example.com/b")
OTHER = parse_jid("other@example.com/c")


def presence(sender, nick, extra=""):  # type: ignore[no-untyped-def]
    return ET.fromstring(f"<presence xmlns='{CLIENT_NS}' from='{sender}' "
                         f"to='{ROOM}/{nick}'><x xmlns='{MUC}'>{extra}</x></presence>")


def groupchat(sender, body):  # type: ignore[no-untyped-def]
    return ET.fromstring(f"<message xmlns='{CLIENT_NS}' from='{sender}' to='{ROOM}' "
                         f"type='groupchat'><body>{body}</body></message>")


def room_with(*people):  # type: ignore[no-untyped-def]
    room = Room(ROOM)
    room.create(presence(OWNER, "owner"), OWNER, parse_jid(f"{ROOM}/owner"), 0.0, instant=True)
    for jid, nick in people:
        room.presence(presence(jid, nick), jid, parse_jid(f"{ROOM}/{nick}"), 0.0)
    return room


def test_history_selection_by_count_chars_and_time():
    room = room_with()
    for n in range(5):
        room.message(groupchat(OWNER, f"m{n}"), OWNER, ROOM, 100.0 + n)
    history = room._history_for
    two = ET.fromstring(f"<history xmlns='{MUC}' maxstanzas='2'/>")
    assert [e.stanza.findtext(f"{{{CLIENT_NS}}}body") for e in history(two, 200.0)] == \
        ["m3", "m4"]
    recent = ET.fromstring(f"<history xmlns='{MUC}' seconds='97'/>")
    assert len(history(recent, 200.0)) == 2  # sent at 103 and 104
    since = ET.fromstring(f"<history xmlns='{MUC}' since='1970-01-01T00:01:42Z'/>")
    assert len(history(since, 200.0)) == 3  # 102, 103, 104
    one_chars = room.history[-1].chars
    chars = ET.fromstring(f"<history xmlns='{MUC}' maxchars='{one_chars}'/>")
    assert len(history(chars, 200.0)) == 1


def test_moderation_rules():
    # A moderator (participant affiliation none) kicks a participant, not an admin.
    assert may_set_role(Affiliation.NONE, Role.MODERATOR, Affiliation.NONE,
                        Role.PARTICIPANT, Role.NONE)
    assert not may_set_role(Affiliation.NONE, Role.MODERATOR, Affiliation.ADMIN,
                            Role.MODERATOR, Role.NONE)
    assert not may_set_role(Affiliation.MEMBER, Role.PARTICIPANT, Affiliation.NONE,
                            Role.PARTICIPANT, Role.NONE)
    # Only admins and owners make moderators; an owner may act on an admin.
    assert not may_set_role(Affiliation.NONE, Role.MODERATOR, Affiliation.NONE,
                            Role.PARTICIPANT, Role.MODERATOR)
    assert may_set_role(Affiliation.OWNER, Role.MODERATOR, Affiliation.ADMIN,
                        Role.MODERATOR, Role.PARTICIPANT)
    assert may_set_affiliation(Affiliation.ADMIN, Affiliation.NONE, Affiliation.OUTCAST)
    assert not may_set_affiliation(Affiliation.ADMIN, Affiliation.OWNER, Affiliation.NONE)


def test_semi_anonymous_room_never_shows_real_jids_to_participants():
    room = room_with((PEER, "peer"))
    effects = room.presence(presence(OTHER, "other"), OTHER, parse_jid(f"{ROOM}/other"), 1.0)
    effects.out += room.message(groupchat(OTHER, "hi"), OTHER, ROOM, 2.0).out
    pm = ET.fromstring(f"<message xmlns='{CLIENT_NS}' from='{OTHER}' to='{ROOM}/peer' "
                       "type='chat'><body>psst</body></message>")
    effects.out += room.message(pm, OTHER, parse_jid(f"{ROOM}/peer"), 3.0).out
    to_peer = [serialize(s).decode() for to, s in effects.out if to == PEER]
    assert to_peer and not any("other@example.com" in text for text in to_peer)
    # The owner (a moderator) does see it.
    to_owner = [serialize(s).decode() for to, s in effects.out if to == OWNER]
    assert any(str(OTHER) in text for text in to_owner)


def test_a_refused_form_changes_nothing():
    config = RoomConfig()
    form = ET.fromstring("<x xmlns='jabber:x:data' type='submit'>"
                         "<field var='muc#roomconfig_roomname'><value>New</value></field>"
                         "<field var='muc#roomconfig_whois'><value>everyone</value></field></x>")
    with pytest.raises(ConfigError):
        apply_form(config, form)
    assert config.name == ""


def test_last_owner_cannot_leave_the_owner_list():
    room = room_with()
    iq = ET.fromstring(f"<iq xmlns='{CLIENT_NS}' type='set' id='a' from='{OWNER}' to='{ROOM}'>"
                       f"<query xmlns='{MUC}#admin'><item affiliation='member' "
                       f"jid='{OWNER.bare}'/></query></iq>")
    effects: Effects = room.iq(iq, OWNER, ROOM, 0.0)
    assert room.affiliation(OWNER.bare) == Affiliation.OWNER
    assert b"conflict" in serialize(effects.out[0][1])


def test_newcomers_see_each_occupants_current_presence():
    """The presence a newcomer gets is built once per occupant and kept:
    it must follow a status change, a new role and a new nickname."""
    room = room_with((PEER, "peer"))
    first = room.presence(presence(OTHER, "x1"), OTHER, parse_jid(f"{ROOM}/x1"), 1.0)
    assert first.out
    away = ET.fromstring(f"<presence xmlns='{CLIENT_NS}' from='{PEER}' to='{ROOM}/peer'>"
                         "<show>away</show></presence>")
    room.presence(away, PEER, parse_jid(f"{ROOM}/peer"), 2.0)
    kick = ET.fromstring(f"<iq xmlns='{CLIENT_NS}' type='set' id='v' from='{OWNER}' "
                         f"to='{ROOM}'><query xmlns='{MUC}#admin'><item nick='peer' "
                         "role='visitor'/></query></iq>")
    room.iq(kick, OWNER, ROOM, 3.0)
    rename = ET.fromstring(f"<presence xmlns='{CLIENT_NS}' from='{PEER}' to='{ROOM}/peer2'>"
                           "<show>dnd</show></presence>")
    room.presence(rename, PEER, parse_jid(f"{ROOM}/peer2"), 4.0)
    newcomer = parse_jid("new@example.com/n")
    effects = room.presence(presence(newcomer, "new"), newcomer,
                            parse_jid(f"{ROOM}/new"), 5.0)
    seen = [serialize(s).decode() for to, s in effects.out
            if to == newcomer and s.get("from") == f"{ROOM}/peer2"]
    assert len(seen) == 1
    assert "<show>dnd</show>" in seen[0] and "role='visitor'" in seen[0]


def test_archived_messages_take_the_archive_id_as_stanza_id():
    """A room that archives gives each message with a body, and each subject
    change, the next archive id as its stanza-id and hands it to the
    service with the sender's real JID; a claimed muc#user <x/> is dropped;
    a room without an archive (no ids) or with archiving off keeps none."""
    room = room_with((PEER, "peer"))
    ids = iter(range(1000, 2000))
    room.archive_ids = lambda: next(ids)
    claim = ET.fromstring(f"<message xmlns='{CLIENT_NS}' from='{PEER}' to='{ROOM}' "
                          f"type='groupchat'><body>hi</body><x xmlns='{MUC}#user'>"
                          f"<item jid='{OWNER}'/></x></message>")
    effects = room.message(claim, PEER, ROOM, 5.0)
    [entry] = effects.archive
    assert (entry.id, entry.when, entry.sender) == (1000, 5.0, PEER)
    sid = entry.stanza.find("{urn:xmpp:sid:0}stanza-id")
    assert sid is not None and (sid.get("id"), sid.get("by")) == ("1000", str(ROOM))
    assert entry.stanza.find(f"{{{MUC}#user}}x") is None
    for _, out in effects.out:
        assert f"{MUC}#user" not in serialize(out).decode()
    subject = ET.fromstring(f"<message xmlns='{CLIENT_NS}' from='{OWNER}' to='{ROOM}' "
                            "type='groupchat'><subject>news</subject></message>")
    assert [e.id for e in room.message(subject, OWNER, ROOM, 6.0).archive] == [1001]
    chat_state = ET.fromstring(f"<message xmlns='{CLIENT_NS}' from='{PEER}' to='{ROOM}' "
                               "type='groupchat'><active xmlns='http://jabber.org/protocol/"
                               "chatstates'/></message>")
    assert room.message(chat_state, PEER, ROOM, 7.0).archive == []
    features = {f.get("var") for f in room.disco_info().iter(
        "{http://jabber.org/protocol/disco#info}feature")}
    assert {"urn:xmpp:mam:2", "urn:xmpp:mam:2#extended"} <= features
    room.config = room.config.replace(archive=False)
    assert room.message(groupchat(PEER, "off"), PEER, ROOM, 8.0).archive == []
    assert "urn:xmpp:mam:2" not in {f.get("var") for f in room.disco_info().iter(
        "{http://jabber.org/protocol/disco#info}feature")}
    plain = room_with((PEER, "peer"))  # no archive behind it
    effects = plain.message(groupchat(PEER, "x"), PEER, ROOM, 9.0)
    assert effects.archive == []
    assert next(iter(effects.out))[1].find("{urn:xmpp:sid:0}stanza-id") is not None
