"""Multi-user chat (XEP-0045) over real sockets, with raw stanzas: what
each occupant sees of joins, messages, nick changes, moderation, room
configuration and bad input."""

from __future__ import annotations

import uuid
import xml.etree.ElementTree as ET
from collections.abc import Callable

from tests import test_im_services as base
from tests.rawclient import CLIENT_NS, stanza_error_of
from tests.serverproc import DOMAIN, mlink
from tests.test_im_services import (
    ALICE,
    BOB,
    CAROL,
    DISCO_INFO,
    DISCO_ITEMS,
    Client,
    body_of,
)

# The shared server with six accounts, and its logged-in clients.
im_server = base.im_server
clients = base.clients

SERVICE = f"conference.{DOMAIN}"
MUC = "http://jabber.org/protocol/muc"
MUC_USER = f"{MUC}#user"
MUC_ADMIN = f"{MUC}#admin"
MUC_OWNER = f"{MUC}#owner"
DATA = "jabber:x:data"


def new_room() -> str:
    return f"room-{uuid.uuid4().hex[:8]}@{SERVICE}"


def is_presence_from(jid: str, kind: str | None = None) -> Callable[[ET.Element], bool]:
    return lambda s: (s.tag == f"{{{CLIENT_NS}}}presence" and s.get("from") == jid
                      and s.get("type") == kind)


def codes(presence: ET.Element) -> set[int]:
    return {int(s.get("code", "0")) for s in presence.iter(f"{{{MUC_USER}}}status")}


def item(presence: ET.Element) -> ET.Element:
    found = presence.find(f"{{{MUC_USER}}}x/{{{MUC_USER}}}item")
    assert found is not None, ET.tostring(presence)
    return found


def join(client: Client, room: str, nick: str, extra: str = "") -> ET.Element:
    """Enter `room` as `nick`; the self-presence (110), after which the
    subject message arrives."""
    client.send(f"<presence to='{room}/{nick}'><x xmlns='{MUC}'>{extra}</x></presence>")
    self_presence = client.expect(lambda s: s.tag == f"{{{CLIENT_NS}}}presence"
                                  and s.get("from") == f"{room}/{nick}"
                                  and (110 in codes(s) or s.get("type") == "error"),
                                  "self-presence")
    if self_presence.get("type") != "error":
        client.expect(lambda s: s.find(f"{{{CLIENT_NS}}}subject") is not None, "subject")
    return self_presence


def join_error(client: Client, room: str, nick: str, extra: str = "") -> tuple[str, str]:
    reply = join(client, room, nick, extra)
    assert reply.get("type") == "error", ET.tostring(reply)
    return stanza_error_of(reply)


def instant(client: Client, room: str) -> None:
    """Accept the default configuration of a new room (§10.1.2)."""
    reply = client.iq("set", f"<query xmlns='{MUC_OWNER}'><x xmlns='{DATA}' type='submit'/>"
                             "</query>", room)
    assert reply.get("type") == "result", ET.tostring(reply)


def configure(client: Client, room: str, **fields: str) -> ET.Element:
    form = "".join(f"<field var='{var}'><value>{value}</value></field>"
                   for var, value in fields.items())
    return client.iq("set", f"<query xmlns='{MUC_OWNER}'><x xmlns='{DATA}' type='submit'>"
                            f"<field var='FORM_TYPE'><value>{MUC}#roomconfig</value></field>"
                            f"{form}</x></query>", room)


def open_room(owner: Client, nick: str = "owner", **fields: str) -> str:
    room = new_room()
    created = join(owner, room, nick)
    assert {110, 201} <= codes(created), ET.tostring(created)
    if fields:
        reply = configure(owner, room, **fields)
        assert reply.get("type") == "result", ET.tostring(reply)
    else:
        instant(owner, room)
    owner.sync()
    return room


def groupchat(client: Client, room: str, body: str) -> None:
    client.send(f"<message to='{room}' type='groupchat' id='g-{uuid.uuid4().hex[:6]}'>"
                f"<body>{body}</body></message>")


def gets_groupchat(client: Client, room: str, nick: str, body: str) -> ET.Element:
    return client.expect(lambda s: s.get("from") == f"{room}/{nick}"
                         and s.get("type") == "groupchat" and body_of(s) == body,
                         f"groupchat {body!r}")


# -- discovery ------------------------------------------------------------------


def test_service_in_server_items_with_identity_and_features(clients):
    alice = clients(ALICE)
    items = alice.iq("get", f"<query xmlns='{DISCO_ITEMS}'/>", DOMAIN)
    jids = [i.get("jid") for i in items.iter(f"{{{DISCO_ITEMS}}}item")]
    assert SERVICE in jids
    info = alice.iq("get", f"<query xmlns='{DISCO_INFO}'/>", SERVICE)
    identity = info.find(f"{{{DISCO_INFO}}}query/{{{DISCO_INFO}}}identity")
    assert identity is not None
    assert (identity.get("category"), identity.get("type")) == ("conference", "text")
    features = {f.get("var") for f in info.iter(f"{{{DISCO_INFO}}}feature")}
    assert MUC in features


def test_room_listing_respects_public_and_hidden(clients):
    alice = clients(ALICE)
    public = open_room(alice, **{"muc#roomconfig_roomname": "Open"})
    hidden = open_room(alice, **{"muc#roomconfig_publicroom": "0"})
    items = alice.iq("get", f"<query xmlns='{DISCO_ITEMS}'/>", SERVICE)
    jids = {i.get("jid") for i in items.iter(f"{{{DISCO_ITEMS}}}item")}
    assert public in jids and hidden not in jids
    info = alice.iq("get", f"<query xmlns='{DISCO_INFO}'/>", hidden)
    features = {f.get("var") for f in info.iter(f"{{{DISCO_INFO}}}feature")}
    assert {"muc_hidden", "muc_temporary", "muc_semianonymous", MUC} <= features


# -- joining, talking, leaving -------------------------------------------------------


def test_join_talk_and_leave(clients):
    alice, bob = clients(ALICE), clients(BOB)
    room = open_room(alice, "Alice")
    mine = join(bob, room, "Bob")
    assert item(mine).get("role") == "participant"
    # Alice (moderator in a semi-anonymous room) sees Bob's real JID.
    seen = alice.expect(is_presence_from(f"{room}/Bob"))
    assert item(seen).get("jid") == bob.jid
    groupchat(bob, room, "hello all")
    echo = gets_groupchat(bob, room, "Bob", "hello all")
    got = gets_groupchat(alice, room, "Bob", "hello all")
    sid = got.find("{urn:xmpp:sid:0}stanza-id")
    assert sid is not None and sid.get("by") == room
    assert echo.get("id") is not None
    bob.send(f"<presence to='{room}/Bob' type='unavailable'/>")
    gone = bob.expect(is_presence_from(f"{room}/Bob", "unavailable"))
    assert 110 in codes(gone)
    alice.expect(is_presence_from(f"{room}/Bob", "unavailable"))


def test_semi_anonymous_room_hides_real_jids_from_participants(clients):
    alice, bob, carol = clients(ALICE), clients(BOB), clients(CAROL)
    room = open_room(alice, "Alice")
    join(bob, room, "Bob")
    bob.sync()
    join(carol, room, "Carol")
    shown = bob.expect(is_presence_from(f"{room}/Carol"))
    assert item(shown).get("jid") is None
    assert CAROL not in ET.tostring(shown).decode()
    carol.send(f"<message to='{room}/Bob' type='chat'><body>psst</body></message>")
    private = bob.expect(lambda s: body_of(s) == "psst")
    assert private.get("from") == f"{room}/Carol"
    assert CAROL not in ET.tostring(private).decode()


def test_non_anonymous_room_shows_jids_with_100(clients):
    alice, bob = clients(ALICE), clients(BOB)
    room = open_room(alice, "Alice", **{"muc#roomconfig_whois": "anyone"})
    mine = join(bob, room, "Bob")
    assert 100 in codes(mine)
    presences = bob.sync()
    alice_seen = [p for p in presences if p.get("from") == f"{room}/Alice"]
    assert alice_seen and item(alice_seen[0]).get("jid") == alice.jid


def test_subject_and_history_maxchars_zero(clients):
    alice, carol = clients(ALICE), clients(CAROL)
    room = open_room(alice, "Alice")
    groupchat(alice, room, "before")
    alice.send(f"<message to='{room}' type='groupchat'><subject>Topic</subject></message>")
    alice.sync()
    carol.send(f"<presence to='{room}/Carol'><x xmlns='{MUC}'><history maxchars='0'/></x>"
               "</presence>")
    subject = carol.expect(lambda s: s.find(f"{{{CLIENT_NS}}}subject") is not None, "subject")
    assert subject.findtext(f"{{{CLIENT_NS}}}subject") == "Topic"
    assert subject.get("from") == f"{room}/Alice"
    assert not [s for s in carol.pending if body_of(s)]


def test_history_maxstanzas_gives_the_newest_with_delay(clients):
    alice, bob = clients(ALICE), clients(BOB)
    room = open_room(alice, "Alice")
    for n in range(5):
        groupchat(alice, room, f"m{n}")
    alice.sync()
    bob.send(f"<presence to='{room}/Bob'><x xmlns='{MUC}'><history maxstanzas='2'/></x>"
             "</presence>")
    bob.expect(lambda s: s.find(f"{{{CLIENT_NS}}}subject") is not None, "subject")
    got = [s for s in bob.pending if body_of(s)]
    assert [body_of(s) for s in got] == ["m3", "m4"]
    assert all(s.find("{urn:xmpp:delay}delay") is not None for s in got)


def test_nickname_conflict_and_change(clients):
    alice, bob = clients(ALICE), clients(BOB)
    room = open_room(alice, "Alice")
    assert join_error(bob, room, "Alice") == ("cancel", "conflict")
    join(bob, room, "Bob")
    alice.sync()
    bob.send(f"<presence to='{room}/Robert'/>")
    old = alice.expect(is_presence_from(f"{room}/Bob", "unavailable"))
    assert 303 in codes(old) and item(old).get("nick") == "Robert"
    alice.expect(is_presence_from(f"{room}/Robert"))
    own = bob.expect(is_presence_from(f"{room}/Bob", "unavailable"))
    assert {303, 110} <= codes(own)


# -- bad input ---------------------------------------------------------------------


def test_bad_input_gets_the_xep_error_and_room_carries_on(clients):
    alice, bob = clients(ALICE), clients(BOB)
    room = open_room(alice, "Alice")
    # No nickname.
    bob.send(f"<presence to='{room}'><x xmlns='{MUC}'/></presence>")
    err = bob.expect(lambda s: s.get("type") == "error" and s.get("from") == room)
    assert stanza_error_of(err)[1] == "jid-malformed"
    # Overlong nickname.
    assert join_error(bob, room, "n" * 200)[1] == "not-acceptable"
    # Groupchat from a non-occupant.
    bob.send(f"<message to='{room}' type='groupchat' id='x1'><body>hi</body></message>")
    assert stanza_error_of(bob.reply("x1"))[1] == "not-acceptable"
    join(bob, room, "Bob")
    # A private message to a nickname nobody has.
    bob.send(f"<message to='{room}/Nobody' type='chat' id='x2'><body>hi</body></message>")
    assert stanza_error_of(bob.reply("x2"))[1] == "item-not-found"
    # An unknown configuration field.
    reply = configure(alice, room, **{"muc#roomconfig_nonsense": "1"})
    assert stanza_error_of(reply) == ("modify", "bad-request")
    # No nickname, to a room that does not exist: nothing is created.
    bob.send(f"<presence to='{new_room()}'><x xmlns='{MUC}'/></presence>")
    err = bob.expect(lambda s: s.get("type") == "error" and s.tag.endswith("presence"))
    assert stanza_error_of(err)[1] == "jid-malformed"
    # Nothing else disturbed: the room still carries messages.
    groupchat(bob, room, "still here")
    gets_groupchat(alice, room, "Bob", "still here")


def test_locked_room_refuses_others_until_configured(clients):
    alice, bob = clients(ALICE), clients(BOB)
    room = new_room()
    created = join(alice, room, "Alice")
    assert {201, 110} <= codes(created)
    assert join_error(bob, room, "Bob")[1] == "item-not-found"
    form = alice.iq("get", f"<query xmlns='{MUC_OWNER}'/>", room)
    fields = {f.get("var") for f in form.iter(f"{{{DATA}}}field")}
    assert "muc#roomconfig_membersonly" in fields
    instant(alice, room)
    join(bob, room, "Bob")


def test_temporary_room_ends_when_empty(clients):
    alice, bob = clients(ALICE), clients(BOB)
    room = open_room(alice, "Alice")
    alice.send(f"<presence to='{room}/Alice' type='unavailable'/>")
    alice.expect(is_presence_from(f"{room}/Alice", "unavailable"))
    # Gone: Bob's join creates a new room, of which Bob is the owner.
    created = join(bob, room, "Bob")
    assert 201 in codes(created) and item(created).get("affiliation") == "owner"


# -- moderation --------------------------------------------------------------------------


def admin(client: Client, room: str, items: str) -> ET.Element:
    return client.iq("set", f"<query xmlns='{MUC_ADMIN}'>{items}</query>", room)


def test_kick_and_ban(clients):
    alice, bob, carol = clients(ALICE), clients(BOB), clients(CAROL)
    room = open_room(alice, "Alice")
    join(bob, room, "Bob")
    join(carol, room, "Carol")
    alice.sync()
    bob.sync()
    # A participant cannot kick.
    reply = admin(carol, room, "<item nick='Bob' role='none'/>")
    assert stanza_error_of(reply)[1] == "not-allowed"
    reply = admin(alice, room, "<item nick='Bob' role='none'><reason>out</reason></item>")
    assert reply.get("type") == "result", ET.tostring(reply)
    kicked = bob.expect(is_presence_from(f"{room}/Bob", "unavailable"))
    assert {307, 110} <= codes(kicked)
    seen = carol.expect(is_presence_from(f"{room}/Bob", "unavailable"))
    assert 307 in codes(seen) and 110 not in codes(seen)
    # Ban Carol: she leaves with 301 and cannot come back.
    reply = admin(alice, room, f"<item jid='{CAROL}' affiliation='outcast'/>")
    assert reply.get("type") == "result", ET.tostring(reply)
    banned = carol.expect(is_presence_from(f"{room}/Carol", "unavailable"))
    assert 301 in codes(banned)
    assert join_error(carol, room, "Carol")[1] == "forbidden"
    outcasts = alice.iq("get", f"<query xmlns='{MUC_ADMIN}'><item affiliation='outcast'/>"
                               "</query>", room)
    assert [i.get("jid") for i in outcasts.iter(f"{{{MUC_ADMIN}}}item")] == [CAROL]


def test_moderated_room_voice(clients):
    alice, bob = clients(ALICE), clients(BOB)
    room = open_room(alice, "Alice", **{"muc#roomconfig_moderatedroom": "1"})
    mine = join(bob, room, "Bob")
    assert item(mine).get("role") == "visitor"
    bob.send(f"<message to='{room}' type='groupchat' id='v1'><body>can I?</body></message>")
    assert stanza_error_of(bob.reply("v1"))[1] == "forbidden"
    reply = admin(alice, room, "<item nick='Bob' role='participant'/>")
    assert reply.get("type") == "result"
    voiced = bob.expect(lambda s: is_presence_from(f"{room}/Bob")(s)
                        and item(s).get("role") == "participant")
    assert voiced is not None
    groupchat(bob, room, "now I can")
    gets_groupchat(alice, room, "Bob", "now I can")


def test_members_only_and_password(clients):
    alice, bob, carol = clients(ALICE), clients(BOB), clients(CAROL)
    room = open_room(alice, "Alice", **{"muc#roomconfig_membersonly": "1"})
    assert join_error(bob, room, "Bob")[1] == "registration-required"
    reply = admin(alice, room, f"<item jid='{BOB}' affiliation='member'/>")
    assert reply.get("type") == "result"
    join(bob, room, "Bob")
    secret = open_room(alice, "Alice", **{"muc#roomconfig_passwordprotectedroom": "1",
                                          "muc#roomconfig_roomsecret": "s3cret"})
    assert join_error(carol, secret, "Carol")[1] == "not-authorized"
    assert join_error(carol, secret, "Carol", "<password>wrong</password>")[1] == \
        "not-authorized"
    join(carol, secret, "Carol", "<password>s3cret</password>")


def test_mediated_and_direct_invitations(clients):
    alice, bob = clients(ALICE), clients(BOB)
    room = open_room(alice, "Alice")
    bob.send("<presence/>")  # available: messages to the bare JID reach this session
    bob.sync()
    alice.send(f"<message to='{room}'><x xmlns='{MUC_USER}'><invite to='{BOB}'>"
               "<reason>join us</reason></invite></x></message>")
    invite = bob.expect(lambda s: s.find(f"{{{MUC_USER}}}x/{{{MUC_USER}}}invite") is not None)
    assert invite.get("from") == room
    # Semi-anonymous: the inviter is named by its room JID.
    assert invite.find(f"{{{MUC_USER}}}x/{{{MUC_USER}}}invite").get("from") == f"{room}/Alice"
    # XEP-0249: client to client, untouched.
    alice.send(f"<message to='{BOB}'><x xmlns='jabber:x:conference' jid='{room}'/></message>")
    direct = bob.expect(lambda s: s.find("{jabber:x:conference}x") is not None)
    assert direct.find("{jabber:x:conference}x").get("jid") == room


def test_destroy_with_alternate_venue(clients):
    alice, bob = clients(ALICE), clients(BOB)
    room = open_room(alice, "Alice")
    join(bob, room, "Bob")
    reply = alice.iq("set", f"<query xmlns='{MUC_OWNER}'><destroy jid='new@{SERVICE}'>"
                            "<reason>moved</reason></destroy></query>", room)
    assert reply.get("type") == "result"
    gone = bob.expect(is_presence_from(f"{room}/Bob", "unavailable"))
    destroy = gone.find(f"{{{MUC_USER}}}x/{{{MUC_USER}}}destroy")
    assert destroy is not None and destroy.get("jid") == f"new@{SERVICE}"
    assert destroy.findtext(f"{{{MUC_USER}}}reason") == "moved"


def test_simultaneous_first_joins_make_one_room(clients):
    people = [clients(ALICE), clients(BOB), clients(CAROL)]
    room = new_room()
    for n, client in enumerate(people):  # all sent before any answer is read
        client.send(f"<presence to='{room}/p{n}'/>")
    selves = [c.expect(lambda s, n=n: s.get("from") == f"{room}/p{n}" and 110 in codes(s))
              for n, c in enumerate(people)]
    assert sum(201 in codes(s) for s in selves) == 1
    assert sum(item(s).get("affiliation") == "owner" for s in selves) == 1
    groupchat(people[2], room, "one room")
    for client in people:
        gets_groupchat(client, room, "p2", "one room")


def test_persistent_room_on_the_embedded_directory(im_server, clients):
    """Created over XMPP: an entry in the embedded directory (seen by
    `mlink room show`); destroyed by its owner: gone from it."""
    alice = clients(ALICE)
    room = open_room(alice, "Alice", **{"muc#roomconfig_persistentroom": "1",
                                        "muc#roomconfig_roomname": "Kept"})
    shown = mlink("room", "show", room, "--config", str(im_server.config)).stdout
    assert f"room: {room}" in shown and "name: Kept" in shown and f"owners: {ALICE}" in shown
    reply = alice.iq("set", f"<query xmlns='{MUC_OWNER}'><destroy/></query>", room)
    assert reply.get("type") == "result"
    gone = mlink("room", "show", room, "--config", str(im_server.config), check=False)
    assert gone.returncode == 1 and "no persistent room" in gone.stderr


def test_a_nickname_changed_by_preparation_is_announced_with_210(clients):
    alice = clients(ALICE)
    room = open_room(alice, "Alice")
    bob = clients(BOB)
    decomposed = "Rene\u0301"  # NFC makes it "René"
    bob.send(f"<presence to='{room}/{decomposed}'><x xmlns='{MUC}'/></presence>")
    own = bob.expect(lambda s: s.tag == f"{{{CLIENT_NS}}}presence" and 110 in codes(s))
    assert own.get("from") == f"{room}/Ren\u00e9"
    assert 210 in codes(own)
    seen = alice.expect(is_presence_from(f"{room}/Ren\u00e9"))
    assert 210 not in codes(seen)


def test_iq_between_occupants_goes_through_the_room(clients):
    alice, bob = clients(ALICE), clients(BOB)
    room = open_room(alice, "Alice")
    join(bob, room, "Bob")
    alice.sync()
    alice.send(f"<iq type='get' id='ver1' to='{room}/Bob'>"
               "<query xmlns='jabber:iq:version'/></iq>")
    request = bob.expect(lambda s: s.get("id") == "ver1")
    assert request.get("from") == f"{room}/Alice" and ALICE not in ET.tostring(request).decode()
    bob.send(f"<iq type='result' id='ver1' to='{room}/Alice'><query xmlns='jabber:iq:version'>"
             "<name>bobclient</name></query></iq>")
    answer = alice.reply("ver1")
    assert answer.get("type") == "result" and answer.get("from") == f"{room}/Bob"
    assert answer.findtext("{jabber:iq:version}query/{jabber:iq:version}name") == "bobclient"
    assert BOB not in ET.tostring(answer).decode()
    # To a nickname nobody has: item-not-found.
    reply = alice.iq("get", "<query xmlns='jabber:iq:version'/>", f"{room}/Nobody")
    assert stanza_error_of(reply)[1] == "item-not-found"


def test_self_ping_is_answered_by_the_room(clients):
    """XEP-0410: an occupant pinging its own room JID gets the room's
    answer (no round trip to itself); once it left, not-acceptable."""
    alice, bob = clients(ALICE), clients(BOB)
    room = open_room(alice, "Alice")
    join(bob, room, "Bob")
    info = bob.iq("get", "<query xmlns='http://jabber.org/protocol/disco#info'/>", room)
    features = {f.get("var") for f in info.iter("{http://jabber.org/protocol/disco#info}feature")}
    assert "http://jabber.org/protocol/muc#self-ping-optimization" in features
    reply = bob.iq("get", "<ping xmlns='urn:xmpp:ping'/>", f"{room}/Bob")
    assert reply.get("type") == "result" and reply.get("from") == f"{room}/Bob"
    bob.send(f"<presence to='{room}/Bob' type='unavailable'/>")
    bob.expect(lambda s: s.tag == f"{{{CLIENT_NS}}}presence" and s.get("type") == "unavailable")
    gone = bob.iq("get", "<ping xmlns='urn:xmpp:ping'/>", f"{room}/Bob")
    assert stanza_error_of(gone)[1] == "not-acceptable"
