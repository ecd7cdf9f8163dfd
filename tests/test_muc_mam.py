"""Room archives (XEP-0313 for XEP-0045 rooms) over real sockets: what a
room archives and how its stanza-ids match, who may read it, what results
show of real JIDs, paging and filters, the extended queries, bad input, a
destroyed room's archive, slixmpp's xep_0313 against a room, and a room on
one shard queried from the other."""

from __future__ import annotations

import asyncio
import datetime as dt
import ssl
import time
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

import pytest
import slixmpp

from tests import test_im_services as base
from tests.placement import TIMEOUT, Placement
from tests.rawclient import CLIENT_NS, stanza_error_of
from tests.serverproc import MlinkProcess, start_mlink
from tests.test_im_services import ALICE, BOB, CAROL, DAVE, DISCO_INFO, USERS, Client
from tests.test_muc import (
    MUC_ADMIN,
    MUC_OWNER,
    MUC_USER,
    codes,
    configure,
    gets_groupchat,
    groupchat,
    join,
    open_room,
)

im_server = base.im_server
clients = base.clients

MAM = "urn:xmpp:mam:2"
EXTENDED = "urn:xmpp:mam:2#extended"
RSM = "http://jabber.org/protocol/rsm"
SID = "urn:xmpp:sid:0"
FORWARD = "urn:xmpp:forward:0"
MESSAGE = f"{{{CLIENT_NS}}}message"


def form(fields: dict[str, str | list[str]]) -> str:
    out = [f"<x xmlns='jabber:x:data' type='submit'><field var='FORM_TYPE' type='hidden'>"
           f"<value>{MAM}</value></field>"]
    for var, value in fields.items():
        values = value if isinstance(value, list) else [value]
        out.append(f"<field var='{var}'>" + "".join(f"<value>{v}</value>" for v in values)
                   + "</field>")
    return "".join(out) + "</x>"


def mam_query(client: Client, room: str, fields: dict[str, str | list[str]] | None = None,
              rsm: str = "", extra: str = "") -> tuple[list[ET.Element], ET.Element]:
    """Query `room`'s archive: the result messages in the order received
    (only those of this query), and the iq reply."""
    qid = "q" + uuid.uuid4().hex[:8]
    stanza_id = "mq-" + qid
    payload = form(fields) if fields else ""
    rsm_xml = f"<set xmlns='{RSM}'>{rsm}</set>" if rsm else ""
    client.send(f"<iq type='set' id='{stanza_id}' to='{room}'><query xmlns='{MAM}' "
                f"queryid='{qid}'>{payload}{rsm_xml}{extra}</query></iq>")
    reply = client.reply(stanza_id)
    results = []
    for stanza in list(client.pending):
        found = stanza.find(f"{{{MAM}}}result")
        if stanza.tag == MESSAGE and found is not None and found.get("queryid") == qid:
            results.append(stanza)
            client.pending.remove(stanza)
    return results, reply


def forwarded(result: ET.Element) -> ET.Element:
    message = result.find(f"{{{MAM}}}result/{{{FORWARD}}}forwarded/{MESSAGE}")
    assert message is not None, ET.tostring(result)
    return message


def bodies(results: list[ET.Element]) -> list[str | None]:
    return [forwarded(r).findtext(f"{{{CLIENT_NS}}}body") for r in results]


def result_id(result: ET.Element) -> str:
    found = result.find(f"{{{MAM}}}result")
    assert found is not None
    return found.get("id", "")


def fin(reply: ET.Element) -> dict[str, str | None]:
    assert reply.get("type") == "result", ET.tostring(reply)
    element = reply.find(f"{{{MAM}}}fin")
    assert element is not None, ET.tostring(reply)
    first = element.find(f"{{{RSM}}}set/{{{RSM}}}first")
    return {"complete": element.get("complete"),
            "first": None if first is None else first.text,
            "index": None if first is None else first.get("index"),
            "last": element.findtext(f"{{{RSM}}}set/{{{RSM}}}last"),
            "count": element.findtext(f"{{{RSM}}}set/{{{RSM}}}count")}


def say_all(client: Client, room: str, nick: str, said: list[str]) -> list[str]:
    """Say each body in turn; the stanza-ids the room gave them (by the room)."""
    ids = []
    for body in said:
        groupchat(client, room, body)
        got = gets_groupchat(client, room, nick, body)
        sid = got.find(f"{{{SID}}}stanza-id")
        assert sid is not None and sid.get("by") == room, ET.tostring(got)
        ids.append(sid.get("id", ""))
    return ids


def features(client: Client, room: str) -> set[str]:
    info = client.iq("get", f"<query xmlns='{DISCO_INFO}'/>", room)
    return {f.get("var", "") for f in info.iter(f"{{{DISCO_INFO}}}feature")}


def xep82(at: float) -> str:
    return dt.datetime.fromtimestamp(at, dt.UTC).isoformat().replace("+00:00", "Z")


# -- what is archived ------------------------------------------------------------------


def test_room_archives_messages_with_its_stanza_ids_and_pages(clients):
    alice, bob = clients(ALICE), clients(BOB)
    room = open_room(alice, "Alice")
    assert {MAM, EXTENDED} <= features(alice, room)
    joined = join(bob, room, "Bob")
    assert 170 in codes(joined)  # told that what is said is kept
    said = [f"m{n}" for n in range(7)]
    ids = say_all(alice, room, "Alice", said)
    bob.sync()

    results, reply = mam_query(bob, room)
    assert bodies(results) == said
    assert [result_id(r) for r in results] == ids  # the live stanza-id is the archive id
    for r in results:
        assert r.get("from") == room
        message = forwarded(r)
        assert message.get("from") == f"{room}/Alice" and message.get("to") is None
        assert message.get("type") == "groupchat"
    assert fin(reply) == {"complete": "true", "first": ids[0], "index": "0",
                          "last": ids[-1], "count": "7"}

    # Forward paging by three, then the last page, then backwards from it.
    page1, reply1 = mam_query(bob, room, rsm="<max>3</max>")
    assert bodies(page1) == said[:3] and fin(reply1)["complete"] is None
    page2, reply2 = mam_query(bob, room, rsm=f"<max>3</max><after>{ids[2]}</after>")
    assert bodies(page2) == said[3:6] and fin(reply2)["index"] == "3"
    page3, reply3 = mam_query(bob, room, rsm=f"<max>3</max><after>{ids[5]}</after>")
    assert bodies(page3) == said[6:] and fin(reply3)["complete"] == "true"
    last, last_reply = mam_query(bob, room, rsm="<max>2</max><before/>")
    assert bodies(last) == said[5:]
    assert fin(last_reply)["complete"] is None and fin(last_reply)["index"] == "5"
    back, back_reply = mam_query(bob, room, rsm=f"<max>10</max><before>{ids[2]}</before>")
    assert bodies(back) == said[:2] and fin(back_reply)["complete"] == "true"


def test_subject_changes_are_archived_private_messages_are_not(clients):
    alice, bob = clients(ALICE), clients(BOB)
    room = open_room(alice, "Alice")
    join(bob, room, "Bob")
    alice.send(f"<message to='{room}' type='groupchat'><subject>Plans</subject></message>")
    alice.expect(lambda s: s.findtext(f"{{{CLIENT_NS}}}subject") == "Plans", "subject")
    alice.send(f"<message to='{room}/Bob' type='chat'><body>just you</body></message>")
    bob.expect(lambda s: s.findtext(f"{{{CLIENT_NS}}}body") == "just you", "pm")
    say_all(alice, room, "Alice", ["public"])
    results, _ = mam_query(alice, room)
    assert [forwarded(r).findtext(f"{{{CLIENT_NS}}}subject") for r in results] == \
        ["Plans", None]
    assert bodies(results) == [None, "public"]


def test_a_claimed_real_jid_is_stripped_and_the_real_one_shown_to_whom_may_see(clients):
    alice, bob, carol = clients(ALICE), clients(BOB), clients(CAROL)
    room = open_room(alice, "Alice")  # semi-anonymous: only moderators see real JIDs
    join(bob, room, "Bob")
    join(carol, room, "Carol")
    bob.send(f"<message to='{room}' type='groupchat'><body>trust me</body>"
             f"<x xmlns='{MUC_USER}'><item jid='{ALICE}'/></x></message>")
    live = gets_groupchat(carol, room, "Bob", "trust me")
    assert live.find(f"{{{MUC_USER}}}x") is None  # the claim did not reach anyone
    # Carol (a participant) sees no real JID; Alice (owner, moderator) sees Bob's.
    results, _ = mam_query(carol, room)
    assert forwarded(results[-1]).find(f"{{{MUC_USER}}}x") is None
    results, _ = mam_query(alice, room)
    items = forwarded(results[-1]).findall(f"{{{MUC_USER}}}x/{{{MUC_USER}}}item")
    assert [i.get("jid") for i in items] == [bob.jid]


# -- filters ---------------------------------------------------------------------------


def test_filters_by_nick_real_jid_and_time(clients):
    alice, bob, carol = clients(ALICE), clients(BOB), clients(CAROL)
    room = open_room(alice, "Alice")
    join(bob, room, "Bob")
    join(carol, room, "Carol")
    say_all(alice, room, "Alice", ["a1"])
    say_all(bob, room, "Bob", ["b1"])
    time.sleep(0.05)  # a gap between the two halves, for the time filter (not a sync)
    middle = time.time()
    time.sleep(0.05)
    say_all(alice, room, "Alice", ["a2"])
    say_all(bob, room, "Bob", ["b2"])
    results, reply = mam_query(carol, room, {"with": f"{room}/Bob"})
    assert bodies(results) == ["b1", "b2"] and fin(reply)["complete"] == "true"
    # A real JID filter: refused to whom the room hides real JIDs ...
    _, refused = mam_query(carol, room, {"with": BOB})
    assert stanza_error_of(refused)[1] == "forbidden"
    # ... answered to a moderator, by bare or full JID.
    results, reply = mam_query(alice, room, {"with": BOB})
    assert bodies(results) == ["b1", "b2"] and fin(reply)["count"] == "2"
    results, _ = mam_query(alice, room, {"with": bob.jid})
    assert bodies(results) == ["b1", "b2"]
    results, _ = mam_query(alice, room, {"with": f"{BOB}/elsewhere"})
    assert results == []
    results, _ = mam_query(carol, room, {"start": xep82(middle)})
    assert bodies(results) == ["a2", "b2"]
    results, reply = mam_query(carol, room, {"end": xep82(middle)})
    assert bodies(results) == ["a1", "b1"] and fin(reply)["count"] == "2"


def test_extended_queries_ids_flip_page_metadata(clients):
    alice = clients(ALICE)
    room = open_room(alice, "Alice")
    said = [f"x{n}" for n in range(6)]
    ids = say_all(alice, room, "Alice", said)
    results, reply = mam_query(alice, room, {"after-id": ids[0], "before-id": ids[4]})
    assert bodies(results) == said[1:4]
    assert fin(reply)["count"] == "3" and fin(reply)["complete"] == "true"
    results, reply = mam_query(alice, room, {"after-id": ids[0]}, rsm="<max>2</max><before/>")
    assert bodies(results) == said[4:]  # the last page of the range
    assert fin(reply)["index"] == "3" and fin(reply)["count"] == "5"
    results, _ = mam_query(alice, room, {"ids": [ids[3], ids[1]]})
    assert bodies(results) == [said[1], said[3]]
    results, reply = mam_query(alice, room, rsm="<max>3</max><before/>", extra="<flip-page/>")
    assert bodies(results) == said[5:2:-1]  # the same page, newest first
    assert fin(reply)["first"] == ids[3] and fin(reply)["last"] == ids[5]
    meta = alice.iq("get", f"<metadata xmlns='{MAM}'/>", room)
    start = meta.find(f"{{{MAM}}}metadata/{{{MAM}}}start")
    end = meta.find(f"{{{MAM}}}metadata/{{{MAM}}}end")
    assert start is not None and end is not None, ET.tostring(meta)
    assert (start.get("id"), end.get("id")) == (ids[0], ids[-1])
    assert start.get("timestamp", "").endswith("Z")
    form_reply = alice.iq("get", f"<query xmlns='{MAM}'/>", room)
    fields = {f.get("var") for f in form_reply.iter("{jabber:x:data}field")}
    assert {"with", "start", "end", "before-id", "after-id", "ids"} <= fields


# -- who may read it ---------------------------------------------------------------------


def test_who_may_read_a_room_archive(clients):
    alice, bob, dave = clients(ALICE), clients(BOB), clients(DAVE)
    public = open_room(alice, "Alice")
    say_all(alice, public, "Alice", ["open to all"])
    # A non-occupant may read a public, open room's archive ...
    results, reply = mam_query(dave, public)
    assert bodies(results) == ["open to all"], ET.tostring(reply)
    # ... but not once banned.
    banned = alice.iq("set", f"<query xmlns='{MUC_ADMIN}'><item affiliation='outcast' "
                             f"jid='{DAVE}'/></query>", public)
    assert banned.get("type") == "result", ET.tostring(banned)
    _, refused = mam_query(dave, public)
    assert stanza_error_of(refused)[1] == "forbidden"

    members = open_room(alice, "Alice", **{"muc#roomconfig_membersonly": "1"})
    say_all(alice, members, "Alice", ["members only"])
    _, refused = mam_query(bob, members)
    assert stanza_error_of(refused)[1] == "forbidden"
    made = alice.iq("set", f"<query xmlns='{MUC_ADMIN}'><item affiliation='member' "
                           f"jid='{BOB}'/></query>", members)
    assert made.get("type") == "result", ET.tostring(made)
    results, _ = mam_query(bob, members)  # a member, not in the room
    assert bodies(results) == ["members only"]

    hidden = open_room(alice, "Alice", **{"muc#roomconfig_publicroom": "0"})
    _, refused = mam_query(bob, hidden)
    assert stanza_error_of(refused)[1] == "forbidden"
    join(bob, hidden, "Bob")
    _, reply = mam_query(bob, hidden)  # an occupant
    assert reply.get("type") == "result", ET.tostring(reply)


def test_archiving_turned_off_and_on_by_the_owner(clients):
    alice = clients(ALICE)
    room = open_room(alice, "Alice", mam="0")  # ejabberd's name for the field
    assert MAM not in features(alice, room)
    groupchat(alice, room, "not kept")
    live = gets_groupchat(alice, room, "Alice", "not kept")
    sid = live.find(f"{{{SID}}}stanza-id")
    assert sid is not None  # still a stanza-id (XEP-0359), just not an archive id
    _, refused = mam_query(alice, room)
    assert stanza_error_of(refused)[1] == "feature-not-implemented"
    reply = configure(alice, room, **{"muc#roomconfig_enablearchiving": "1"})
    assert reply.get("type") == "result", ET.tostring(reply)
    told = alice.expect(lambda s: 170 in codes(s) and s.tag == MESSAGE, "status 170")
    assert told.get("from") == room
    assert MAM in features(alice, room)
    say_all(alice, room, "Alice", ["kept"])
    results, _ = mam_query(alice, room)
    assert bodies(results) == ["kept"]
    config = alice.iq("get", f"<query xmlns='{MUC_OWNER}'/>", room)
    fields = {f.get("var"): f.findtext("{jabber:x:data}value")
              for f in config.iter("{jabber:x:data}field")}
    assert fields.get("muc#roomconfig_enablearchiving") == "1"


def test_a_destroyed_room_takes_its_archive_along(clients):
    alice, bob = clients(ALICE), clients(BOB)
    room = open_room(alice, "Alice")
    say_all(alice, room, "Alice", ["secret plans"])
    destroyed = alice.iq("set", f"<query xmlns='{MUC_OWNER}'><destroy/></query>", room)
    assert destroyed.get("type") == "result", ET.tostring(destroyed)
    # Someone else makes a room of the same name: it starts empty.
    created = join(bob, room, "Bob")
    assert 201 in codes(created)
    bob.iq("set", f"<query xmlns='{MUC_OWNER}'><x xmlns='jabber:x:data' type='submit'/>"
                  "</query>", room)
    results, reply = mam_query(bob, room)
    assert results == [] and fin(reply)["count"] == "0"


# -- bad input ---------------------------------------------------------------------------


def test_bad_queries_get_the_right_errors(clients):
    alice, bob = clients(ALICE), clients(BOB)
    room = open_room(alice, "Alice")
    ids = say_all(alice, room, "Alice", ["one"])
    unknown = str(int(ids[0]) + 1)
    for fields, rsm, condition in (
            ({"x-unknown": "1"}, "", "feature-not-implemented"),
            ({"start": "yesterday"}, "", "bad-request"),
            ({"with": "@@"}, "", "bad-request"),
            (None, f"<after>{unknown}</after>", "item-not-found"),
            (None, "<before>not-an-id</before>", "item-not-found"),
            ({"after-id": unknown}, "", "item-not-found"),
            ({"ids": [ids[0], unknown]}, "", "item-not-found"),
            ({"ids": [str(n) for n in range(300)]}, "", "policy-violation"),
            (None, "<max>lots</max>", "bad-request"),
            (None, "<index>3</index>", "feature-not-implemented")):
        _, reply = mam_query(bob, room, fields, rsm)
        assert stanza_error_of(reply)[1] == condition, (fields, rsm, ET.tostring(reply))
    # A queryid is echoed in every result: a long one is refused.
    long_id = "q" * 300
    bob.send(f"<iq type='set' id='long' to='{room}'><query xmlns='{MAM}' queryid='{long_id}'/>"
             "</iq>")
    assert stanza_error_of(bob.reply("long"))[1] == "bad-request"
    # A huge max is the server's page, not an error.
    results, reply = mam_query(bob, room, rsm="<max>1000000</max>")
    assert bodies(results) == ["one"] and fin(reply)["complete"] == "true"
    # Unknown payloads and results sent to the room are refused or dropped.
    odd = bob.iq("get", f"<prefs xmlns='{MAM}'/>", room)
    assert stanza_error_of(odd)[1] == "bad-request"
    # An archive id in another room's archive is not in this one.
    other = open_room(alice, "Alice")
    _, reply = mam_query(alice, other, rsm=f"<after>{ids[0]}</after>")
    assert stanza_error_of(reply)[1] == "item-not-found"
    # No room: item-not-found, as for any stanza to a room that is not there.
    _, reply = mam_query(alice, f"nowhere-{uuid.uuid4().hex[:6]}@conference.localhost")
    assert stanza_error_of(reply)[1] == "item-not-found"


# -- slixmpp ---------------------------------------------------------------------------------


def test_slixmpp_pages_through_a_room_archive(im_server, clients, ca_file):
    alice = clients(ALICE)
    room = open_room(alice, "Alice")
    said = [f"s{n}" for n in range(7)]
    say_all(alice, room, "Alice", said)

    async def run() -> list[str]:
        client = slixmpp.ClientXMPP(f"{CAROL}/slix", USERS[CAROL])
        for plugin in ("xep_0030", "xep_0059", "xep_0313"):
            client.register_plugin(plugin)
        client.ssl_context = ssl.create_default_context(cafile=str(ca_file))
        started: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        client.add_event_handler("session_start",
                                 lambda _e: started.done() or started.set_result(None))
        client.connect(host="127.0.0.1", port=im_server.c2s_port)
        await asyncio.wait_for(started, TIMEOUT)
        info = await client.plugin["xep_0030"].get_info(jid=room)
        assert MAM in info["disco_info"]["features"]
        got = []
        async for message in client.plugin["xep_0313"].iterate(
                jid=slixmpp.JID(room), rsm={"max": 3}):
            got.append(message["mam_result"]["forwarded"]["stanza"]["body"])
        await client.disconnect()
        return got

    assert asyncio.run(asyncio.wait_for(run(), TIMEOUT)) == said


# -- two shards ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def two_shards(tmp_path_factory: pytest.TempPathFactory,
               cert_files: tuple[Path, Path]) -> Iterator[MlinkProcess]:
    setup = tmp_path_factory.mktemp("muc-mam2") / "s"
    with start_mlink(setup, "localhost", cert_files, users=USERS, shards=2) as proc:
        yield proc


def test_a_room_on_one_shard_is_queried_from_the_other(two_shards, ca_file):
    from tests.test_muc_shards import PlacedClient, room_on

    place = Placement(two_shards.log, two_shards.c2s_port, ca_file, USERS)
    try:
        for room_shard in (0, 1):
            room = room_on(room_shard)
            near = PlacedClient(place.login_on(room_shard, ALICE), ALICE)
            far = PlacedClient(place.login_on(1 - room_shard, BOB), BOB)
            created = join(near, room, "Alice")
            assert 201 in codes(created)
            near.iq("set", f"<query xmlns='{MUC_OWNER}'><x xmlns='jabber:x:data' "
                           "type='submit'/></query>", room)
            join(far, room, "Bob")
            said = [f"{room_shard}-{n}" for n in range(5)]
            ids = say_all(far, room, "Bob", said)
            # The room's shard made every id (its number in the low bits).
            assert {int(i) % 64 for i in ids} == {room_shard}
            for client in (near, far):
                results, reply = mam_query(client, room, rsm="<max>2</max><before/>")
                assert bodies(results) == said[3:], ET.tostring(reply)
                assert fin(reply)["count"] == "5"
            results, _ = mam_query(far, room)
            assert bodies(results) == said
    finally:
        place.close_all()
