"""XEP-0313 message archives for users against a real server: what is
archived (and marked with a XEP-0359 stanza-id), RSM paging both ways,
`with`/`start`/`end` filters, preferences, a message to nobody online in
both offline storage and the archive, and slixmpp's xep_0313 paging
through a whole archive."""

from __future__ import annotations

import asyncio
import datetime as dt
import re
import ssl
import time
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

import pytest
import slixmpp

from tests.placement import TIMEOUT
from tests.rawclient import RawClient, parse_stanzas, stanza_error_of
from tests.serverproc import MlinkProcess, start_mlink

DOMAIN = "localhost"
MAM = "urn:xmpp:mam:2"
SID = "urn:xmpp:sid:0"
RSM = "http://jabber.org/protocol/rsm"
NAMES = ("alice", "bob", "carol", "dave", "erin", "frank", "gina", "hank")
USERS = {f"{name}@{DOMAIN}": f"{name}-pw" for name in NAMES}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory,
           cert_files: tuple[Path, Path]) -> Iterator[MlinkProcess]:
    setup = tmp_path_factory.mktemp("mam") / "s"
    with start_mlink(setup, DOMAIN, cert_files, users=USERS) as proc:
        yield proc


def login(server: MlinkProcess, ca_file: Path, name: str) -> RawClient:
    client = RawClient(server.c2s_port, ca_file)
    client.jid = client.login(DOMAIN, f"{name}@{DOMAIN}",  # type: ignore[attr-defined]
                              USERS[f"{name}@{DOMAIN}"], resource="r-" + uuid.uuid4().hex[:6])
    return client


def say(client: RawClient, to: str, body: str, extra: str = "") -> None:
    client.send(f"<message to='{to}' type='chat' id='{body}'><body>{body}</body>{extra}"
                "</message>")


def sync(client: RawClient) -> str:
    """Everything `client` sent before has been routed (and archived);
    returns what `client` received meanwhile."""
    client.send(f"<iq type='get' id='sync' to='{DOMAIN}'><ping xmlns='urn:xmpp:ping'/></iq>")
    return client.read_until(r"id=['\"]sync['\"].*?(</iq>|/>)")


def xep82(at: float) -> str:
    return dt.datetime.fromtimestamp(at, dt.UTC).isoformat().replace("+00:00", "Z")


def query(client: RawClient, *, fields: dict[str, str] | None = None, rsm: str = ""
          ) -> tuple[list[tuple[str, str]], ET.Element]:
    """Run a query: [(archive id, body)] in the order received, and the iq."""
    qid = "q" + uuid.uuid4().hex[:6]
    form = ""
    if fields:
        form = (f"<x xmlns='jabber:x:data' type='submit'><field var='FORM_TYPE' type='hidden'>"
                f"<value>{MAM}</value></field>" + "".join(
                    f"<field var='{k}'><value>{v}</value></field>" for k, v in fields.items())
                + "</x>")
    rsm_xml = f"<set xmlns='{RSM}'>{rsm}</set>" if rsm else ""
    client.send(f"<iq type='set' id='{qid}'><query xmlns='{MAM}' queryid='{qid}'>{form}"
                f"{rsm_xml}</query></iq>")
    text = client.read_until(rf"<iq[^>]*id=['\"]{qid}['\"].*?(</iq>|/>)")
    results, iq = [], None
    for stanza in parse_stanzas(text):
        result = stanza.find(f"{{{MAM}}}result")
        if result is not None and result.get("queryid") == qid:
            body = result.findtext(".//{jabber:client}body") or ""
            results.append((result.get("id", ""), body))
        elif stanza.tag.endswith("iq") and stanza.get("id") == qid:
            iq = stanza
    assert iq is not None, text
    return results, iq


def fin(iq: ET.Element) -> tuple[bool, str | None, str | None]:
    element = iq.find(f"{{{MAM}}}fin")
    assert element is not None, ET.tostring(iq)
    return (element.get("complete") == "true", element.findtext(f"{{{RSM}}}set/{{{RSM}}}first"),
            element.findtext(f"{{{RSM}}}set/{{{RSM}}}last"))


def test_archive_paging_filters_and_stanza_ids(server, ca_file):
    alice, bob, carol = (login(server, ca_file, n) for n in ("alice", "bob", "carol"))
    for n in range(5):
        say(bob, alice.jid, f"b{n}")  # type: ignore[attr-defined]
    sync(bob)
    middle = time.time()
    for n in range(2):
        say(carol, alice.jid, f"c{n}")  # type: ignore[attr-defined]
    sync(carol)
    say(alice, bob.jid, "a0")  # type: ignore[attr-defined]
    received = sync(alice)
    # The chat state and the no-store message are not archived.
    bob.send(f"<message to='{alice.jid}' type='chat'><active "  # type: ignore[attr-defined]
             "xmlns='http://jabber.org/protocol/chatstates'/></message>")
    say(bob, alice.jid, "secret", "<no-store xmlns='urn:xmpp:hints'/>")  # type: ignore[attr-defined]
    text = received + alice.read_until("secret</body>")
    delivered = {m.findtext("{jabber:client}body"): m for m in parse_stanzas(text)
                 if m.tag.endswith("message")}
    sid = delivered["b0"].find(f"{{{SID}}}stanza-id")
    assert sid is not None and sid.get("by") == "alice@localhost", text
    assert delivered["secret"].find(f"{{{SID}}}stanza-id") is None

    everything, iq = query(alice)
    assert [b for _, b in everything] == ["b0", "b1", "b2", "b3", "b4", "c0", "c1", "a0"]
    assert everything[0][0] == sid.get("id")  # the stanza-id is the archive id
    assert fin(iq)[0]

    # Forward in pages of three.
    seen, after, pages = [], "", 0
    while True:
        page, iq = query(alice, rsm="<max>3</max>" + (f"<after>{after}</after>" if after else ""))
        complete, first, last = fin(iq)
        seen += [b for _, b in page]
        pages += 1
        assert first == page[0][0] and last == page[-1][0]
        if complete:
            break
        after = last  # type: ignore[assignment]
        assert pages < 5
    assert seen == [b for _, b in everything] and pages == 3

    # The last page, then the one before it.
    page, iq = query(alice, rsm="<max>2</max><before/>")
    assert [b for _, b in page] == ["c1", "a0"] and not fin(iq)[0]
    page, iq = query(alice, rsm=f"<max>10</max><before>{fin(iq)[1]}</before>")
    assert [b for _, b in page] == ["b0", "b1", "b2", "b3", "b4", "c0"] and fin(iq)[0]

    # Filters.
    page, _ = query(alice, fields={"with": "carol@localhost"})
    assert [b for _, b in page] == ["c0", "c1"]
    page, _ = query(alice, fields={"with": bob.jid})  # type: ignore[attr-defined]
    assert [b for _, b in page] == ["b0", "b1", "b2", "b3", "b4", "a0"]
    page, _ = query(alice, fields={"end": xep82(middle)})
    assert [b for _, b in page] == ["b0", "b1", "b2", "b3", "b4"]
    page, _ = query(alice, fields={"start": xep82(middle), "with": "carol@localhost"})
    assert [b for _, b in page] == ["c0", "c1"]

    # Bob's archive has his side: what he sent alice and what she sent him.
    page, _ = query(bob)
    assert [b for _, b in page] == ["b0", "b1", "b2", "b3", "b4", "a0"]

    # Bad input.
    _, iq = query(alice, rsm="<after>999999999</after>")
    assert stanza_error_of(iq)[1] == "item-not-found"
    _, iq = query(alice, rsm="<before>x</before>")
    assert stanza_error_of(iq)[1] == "item-not-found"
    _, iq = query(alice, fields={"start": "yesterday"})
    assert stanza_error_of(iq)[1] == "bad-request"
    bob.send(f"<iq type='set' id='spy' to='alice@localhost'><query xmlns='{MAM}'/></iq>")
    spied = bob.read_until(r"id=['\"]spy['\"].*?</iq>")
    assert "<forbidden" in spied and "b0" not in spied
    for client in (alice, bob, carol):
        client.close()


def extended_query(client: RawClient, fields: dict[str, list[str]], rsm: str = "",
                   extra: str = "") -> tuple[list[tuple[str, str]], ET.Element]:
    """`query` with multi-valued fields and extra query children."""
    qid = "x" + uuid.uuid4().hex[:6]
    form = (f"<x xmlns='jabber:x:data' type='submit'><field var='FORM_TYPE' type='hidden'>"
            f"<value>{MAM}</value></field>" + "".join(
                f"<field var='{k}'>" + "".join(f"<value>{v}</value>" for v in vs) + "</field>"
                for k, vs in fields.items()) + "</x>")
    rsm_xml = f"<set xmlns='{RSM}'>{rsm}</set>" if rsm else ""
    client.send(f"<iq type='set' id='{qid}'><query xmlns='{MAM}' queryid='{qid}'>{form}"
                f"{rsm_xml}{extra}</query></iq>")
    text = client.read_until(rf"<iq[^>]*id=['\"]{qid}['\"].*?(</iq>|/>)")
    results, iq = [], None
    for stanza in parse_stanzas(text):
        result = stanza.find(f"{{{MAM}}}result")
        if result is not None and result.get("queryid") == qid:
            results.append((result.get("id", ""), result.findtext(".//{jabber:client}body") or ""))
        elif stanza.tag.endswith("iq") and stanza.get("id") == qid:
            iq = stanza
    assert iq is not None, text
    return results, iq


def rsm_of(iq: ET.Element) -> dict[str, str | None]:
    first = iq.find(f"{{{MAM}}}fin/{{{RSM}}}set/{{{RSM}}}first")
    return {"index": None if first is None else first.get("index"),
            "count": iq.findtext(f"{{{MAM}}}fin/{{{RSM}}}set/{{{RSM}}}count")}


def iq_get(client: RawClient, payload: str, to: str = "") -> ET.Element:
    stanza_id = "g" + uuid.uuid4().hex[:6]
    to_attr = f" to='{to}'" if to else ""
    client.send(f"<iq type='get' id='{stanza_id}'{to_attr}>{payload}</iq>")
    text = client.read_until(rf"<iq[^>]*id=['\"]{stanza_id}['\"].*?(</iq>|/>)")
    return next(s for s in parse_stanzas(text) if s.get("id") == stanza_id)


def test_extended_queries_count_and_metadata(server, ca_file):
    """XEP-0313 v1.1 `#extended`: before-id/after-id/ids, flip-page, the
    metadata query; RSM count and first index; unknown ids and fields."""
    gina, hank = login(server, ca_file, "gina"), login(server, ca_file, "hank")
    info = iq_get(hank, "<query xmlns='http://jabber.org/protocol/disco#info'/>",
                  "hank@localhost")
    features = {f.get("var") for f in info.iter("{http://jabber.org/protocol/disco#info}feature")}
    assert {MAM, f"{MAM}#extended"} <= features
    empty = iq_get(hank, f"<metadata xmlns='{MAM}'/>")
    meta = empty.find(f"{{{MAM}}}metadata")
    assert meta is not None and len(meta) == 0, ET.tostring(empty)  # nothing archived yet
    said = [f"e{n}" for n in range(6)]
    for body in said:
        say(gina, hank.jid, body)  # type: ignore[attr-defined]
    sync(gina)
    everything, iq = query(hank)
    ids = [i for i, _ in everything]
    assert [b for _, b in everything] == said
    assert rsm_of(iq) == {"index": "0", "count": "6"}

    page, iq = extended_query(hank, {"after-id": [ids[0]], "before-id": [ids[4]]})
    assert [b for _, b in page] == said[1:4] and fin(iq)[0]
    assert rsm_of(iq) == {"index": "0", "count": "3"}
    page, iq = query(hank, rsm=f"<max>2</max><after>{ids[1]}</after>")
    assert [b for _, b in page] == said[2:4] and rsm_of(iq) == {"index": "2", "count": "6"}
    page, iq = query(hank, rsm="<max>2</max><before/>")
    assert rsm_of(iq) == {"index": "4", "count": "6"} and not fin(iq)[0]
    page, iq = extended_query(hank, {"ids": [ids[5], ids[2]]})
    assert [b for _, b in page] == [said[2], said[5]] and fin(iq)[0]
    page, iq = extended_query(hank, {}, rsm="<max>3</max>", extra="<flip-page/>")
    assert [b for _, b in page] == [said[2], said[1], said[0]]
    assert fin(iq)[1:] == (ids[0], ids[2]) and not fin(iq)[0]
    page, iq = query(hank, fields={"with": "gina@localhost", "end": xep82(0)})
    assert page == [] and rsm_of(iq) == {"index": None, "count": "0"} and fin(iq)[0]

    got = iq_get(hank, f"<metadata xmlns='{MAM}'/>")
    start = got.find(f"{{{MAM}}}metadata/{{{MAM}}}start")
    end = got.find(f"{{{MAM}}}metadata/{{{MAM}}}end")
    assert start is not None and end is not None, ET.tostring(got)
    assert (start.get("id"), end.get("id")) == (ids[0], ids[-1])
    form = iq_get(hank, f"<query xmlns='{MAM}'/>")
    fields = {f.get("var") for f in form.iter("{jabber:x:data}field")}
    assert {"before-id", "after-id", "ids", "with", "start", "end"} <= fields

    # Bad input: an id not in this archive anywhere it is named, a field
    # the server does not know, too many ids.
    missing = str(int(ids[-1]) + 1)
    for fields_, condition in (({"after-id": [missing]}, "item-not-found"),
                               ({"before-id": ["abc"]}, "item-not-found"),
                               ({"ids": [ids[0], missing]}, "item-not-found"),
                               ({"{urn:example}search": ["x"]}, "feature-not-implemented"),
                               ({"ids": [str(n) for n in range(251)]}, "policy-violation")):
        _, iq = extended_query(hank, fields_)
        assert stanza_error_of(iq)[1] == condition, (fields_, ET.tostring(iq))
    # Gina's archive ids are not Hank's.
    gina_ids = [i for i, _ in query(gina)[0]]
    _, iq = extended_query(hank, {"ids": [gina_ids[0]]})
    assert stanza_error_of(iq)[1] == "item-not-found"
    gina.close()
    hank.close()


def test_a_message_to_nobody_online_is_in_offline_storage_and_the_archive(server, ca_file):
    erin = login(server, ca_file, "erin")
    say(erin, "dave@localhost", "while-you-were-out")
    sync(erin)
    dave = login(server, ca_file, "dave")
    dave.send("<presence/>")
    text = dave.read_until("while-you-were-out</body>")
    offline = next(m for m in parse_stanzas(text) if m.tag.endswith("message"))
    sid = offline.find(f"{{{SID}}}stanza-id")
    assert sid is not None and offline.find("{urn:xmpp:delay}delay") is not None
    page, _ = query(dave)
    assert page == [(sid.get("id"), "while-you-were-out")]
    dave.close()
    erin.close()


def test_preferences(server, ca_file):
    frank, bob, carol = (login(server, ca_file, n) for n in ("frank", "bob", "carol"))
    frank.send(f"<iq type='get' id='p0'><prefs xmlns='{MAM}'/></iq>")
    assert re.search(r"default=['\"]always['\"]", frank.read_until(r"id=['\"]p0['\"]"))
    frank.send(f"<iq type='set' id='p1'><prefs xmlns='{MAM}' default='roster'>"
               "<always><jid>carol@localhost</jid></always><never/></prefs></iq>")
    answer = frank.read_until(r"id=['\"]p1['\"].*?</iq>")
    assert "type='result'" in answer or 'type="result"' in answer, answer
    say(bob, frank.jid, "not-in-roster")  # type: ignore[attr-defined]
    say(carol, frank.jid, "always-carol")  # type: ignore[attr-defined]
    sync(bob)
    sync(carol)
    page, _ = query(frank)
    assert [b for _, b in page] == ["always-carol"]
    frank.send(f"<iq type='set' id='p2'><prefs xmlns='{MAM}' default='sometimes'/></iq>")
    assert "<bad-request" in frank.read_until(r"id=['\"]p2['\"].*?</iq>")
    for client in (frank, bob, carol):
        client.close()


def test_forged_stanza_id_is_removed(server, ca_file):
    alice, carol = login(server, ca_file, "alice"), login(server, ca_file, "carol")
    say(carol, alice.jid,  # type: ignore[attr-defined]
        "forged", f"<stanza-id xmlns='{SID}' by='alice@localhost' id='1'/>")
    text = alice.read_until("forged</body>")
    message = next(m for m in parse_stanzas(text) if m.tag.endswith("message"))
    ids = message.findall(f"{{{SID}}}stanza-id")
    assert len(ids) == 1 and ids[0].get("id") != "1", text
    alice.close()
    carol.close()


def test_slixmpp_pages_through_the_archive(server, ca_file):
    sender = login(server, ca_file, "erin")
    for n in range(7):
        say(sender, "carol@localhost", f"s{n}")
    sync(sender)

    async def run() -> list[str]:
        client = slixmpp.ClientXMPP("carol@localhost/slix", USERS["carol@localhost"])
        for plugin in ("xep_0030", "xep_0059", "xep_0313"):
            client.register_plugin(plugin)
        client.ssl_context = ssl.create_default_context(cafile=str(ca_file))
        started: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        client.add_event_handler("session_start",
                                 lambda _e: started.done() or started.set_result(None))
        client.connect(host="127.0.0.1", port=server.c2s_port)
        await asyncio.wait_for(started, TIMEOUT)
        bodies = []
        async for message in client.plugin["xep_0313"].iterate(
                with_jid=slixmpp.JID("erin@localhost"), rsm={"max": 3}):
            bodies.append(message["mam_result"]["forwarded"]["stanza"]["body"])
        await client.disconnect()
        return bodies

    assert asyncio.run(asyncio.wait_for(run(), TIMEOUT)) == [f"s{n}" for n in range(7)]
    sender.close()


@pytest.fixture(scope="module")
def two_shards(tmp_path_factory: pytest.TempPathFactory,
               cert_files: tuple[Path, Path]) -> Iterator[MlinkProcess]:
    setup = tmp_path_factory.mktemp("mam2") / "s"
    with start_mlink(setup, DOMAIN, cert_files, users=USERS, shards=2) as proc:
        yield proc


def test_a_conversation_across_two_shards_is_archived_in_order(two_shards, ca_file):
    """Each shard makes the archive ids of what it routes; the archive of a
    user whose peer is on the other shard still reads in conversation order."""
    from tests.placement import Placement

    place = Placement(two_shards.log, two_shards.c2s_port, ca_file, USERS)
    try:
        alice = place.login_on(0, "alice@localhost")
        bob = place.login_on(1, "bob@localhost")
        said = []
        for n in range(6):
            speaker, listener = (alice, bob) if n % 2 else (bob, alice)
            body = f"turn{n}"
            say(speaker, listener.jid, body)  # type: ignore[attr-defined]
            listener.read_until(f"{body}</body>")  # delivered (and archived) before the reply
            said.append(body)
        # A query waits for every shard's writes, including those of the
        # messages the other shard routed.
        for client in (alice, bob):
            page, iq = query(client)
            assert [b for _, b in page] == said and fin(iq)[0]
            # Each shard made the ids of what it routed: its number is in
            # the low bits, so the two shards' ids can never collide.
            assert {int(item_id) % 64 for item_id, _ in page} == {0, 1}
    finally:
        place.close_all()


def test_what_an_ack_confirmed_survives_a_crash(two_shards, ca_file):
    """Archive writes gather for a moment before a transaction; an XEP-0198
    ack waits for them, so a shard killed right after acknowledging a
    client's messages has them all in both archives once it is back."""
    import os
    import signal

    from tests.placement import Placement
    from tests.test_muc_shards import shard_pids

    place = Placement(two_shards.log, two_shards.c2s_port, ca_file, USERS)
    try:
        gina = place.login_on(0, "gina@localhost")
        hank = place.login_on(1, "hank@localhost")
        gina.send("<enable xmlns='urn:xmpp:sm:3'/>")
        gina.read_until(r"<enabled[^>]*/>")
        pid = shard_pids(two_shards)[0]  # now: the kill must follow the ack at once
        said = [f"crash{n}" for n in range(40)]
        gina.send("".join(f"<message to='{hank.jid}' type='chat' id='{b}'>"  # type: ignore[attr-defined]
                          f"<body>{b}</body></message>" for b in said)
                  + "<r xmlns='urn:xmpp:sm:3'/>")
        acked = gina.read_until(r"<a [^>]*h=['\"]\d+['\"]")
        assert re.search(r"<a [^>]*h=['\"]40['\"]", acked), acked
        mark = two_shards.log.mark()
        os.kill(pid, signal.SIGKILL)
        two_shards.log.wait_for(r"shard 0 ready", 30.0, mark)
        hank.read_until("crash39</body>")
        page, _ = query(hank, fields={"with": "gina@localhost"}, rsm="<max>100</max>")
        assert [b for _, b in page] == said
        again = place.login_on(1, "gina@localhost")
        page, _ = query(again, fields={"with": "hank@localhost"}, rsm="<max>100</max>")
        assert [b for _, b in page] == said
    finally:
        place.close_all()
