"""XEP-0198 stream management against a real server: ack counting, bad
input, resumption after the TCP connection is cut (on one shard and from
one shard to the other), and expiry sending what was never acknowledged to
offline storage or back to its sender. Raw stanzas for the exact wire, and
slixmpp's xep_0198 plugin for what a real client does."""

from __future__ import annotations

import asyncio
import re
import ssl
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

import pytest
import slixmpp

from mlink.modules.stream_management import SmState
from tests.placement import TIMEOUT, Placement
from tests.rawclient import RawClient
from tests.serverproc import MlinkProcess, start_mlink

DOMAIN = "localhost"
SM = "urn:xmpp:sm:3"
USERS = {f"{name}@{DOMAIN}": f"{name}-pw" for name in ("alice", "bob", "carol", "dave")}
# The configured ceiling; tests ask for less with `max` where they wait for expiry.
RESUME_TIMEOUT = 120
# An expiry test asks for this (seconds); short, and far above a loopback round trip.
SHORT_MAX = 1


def with_sm_options(text: str) -> str:
    return text.replace("<data ", "<modules><module name=\"stream_management\">"
                        f"<resume-timeout>{RESUME_TIMEOUT}</resume-timeout>"
                        "</module></modules>\n  <data ", 1)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory,
           cert_files: tuple[Path, Path]) -> Iterator[MlinkProcess]:
    setup = tmp_path_factory.mktemp("sm") / "s"
    with start_mlink(setup, DOMAIN, cert_files, users=USERS,
                     edit_config=with_sm_options) as proc:
        yield proc


@pytest.fixture(scope="module")
def two_shards(tmp_path_factory: pytest.TempPathFactory,
               cert_files: tuple[Path, Path]) -> Iterator[MlinkProcess]:
    setup = tmp_path_factory.mktemp("sm2") / "s"
    with start_mlink(setup, DOMAIN, cert_files, users=USERS, shards=2,
                     edit_config=with_sm_options) as proc:
        yield proc


def login(server: MlinkProcess, ca_file: Path, user: str, resource: str | None = None
          ) -> RawClient:
    client = RawClient(server.c2s_port, ca_file)
    client.jid = client.login(DOMAIN, user, USERS[user],  # type: ignore[attr-defined]
                              resource=resource or "r-" + uuid.uuid4().hex[:8])
    return client


def enable(client: RawClient, max_seconds: int | None = None) -> tuple[str, str]:
    """Enable with resumption: (id, max) the server granted."""
    extra = f" max='{max_seconds}'" if max_seconds is not None else ""
    client.send(f"<enable xmlns='{SM}' resume='true'{extra}/>")
    text = client.read_until(r"<enabled[^>]*/>")
    m = re.search(r"<enabled[^>]*\bid=['\"]([^'\"]+)['\"]", text)
    granted = re.search(r"<enabled[^>]*\bmax=['\"](\d+)['\"]", text)
    assert m and granted, text
    return m.group(1), granted.group(1)


def failed_condition(text: str) -> str:
    m = re.search(r"<failed[^>]*>\s*<([a-z-]+) xmlns=['\"]urn:ietf:params:xml:ns:xmpp-stanzas",
                  text)
    assert m, text
    return m.group(1)


def message(client: RawClient, to: str, body: str) -> None:
    client.send(f"<message to='{to}' type='chat' id='{body}'><body>{body}</body></message>")


def resume(server: MlinkProcess, ca_file: Path, user: str, previd: str, h: int) -> tuple[
        RawClient, str]:
    """A new connection that authenticates as `user` and resumes `previd`:
    the client and what the server answered (up to <resumed/> or <failed/>)."""
    client = RawClient(server.c2s_port, ca_file)
    features = client.authenticate(DOMAIN, user, USERS[user])
    assert f"<sm xmlns=\"{SM}\"" in features or f"<sm xmlns='{SM}'" in features, features
    client.send(f"<resume xmlns='{SM}' previd='{previd}' h='{h}'/>")
    return client, client.read_until(r"<resumed[^>]*/>|</failed>|<failed[^>]*/>")


def read_more(client: RawClient, text: str, pattern: str) -> str:
    """`text` already read, plus what follows until `pattern` matches."""
    if re.search(pattern, text, re.S):
        return text
    return text + client.read_until(pattern)


def test_feature_counting_and_requests_out_of_order(server, ca_file):
    client = RawClient(server.c2s_port, ca_file)
    features = client.authenticate(DOMAIN, "alice@localhost", USERS["alice@localhost"])
    assert re.search(rf"<sm xmlns=['\"]{SM}['\"]\s*/>", features), features
    # Before a bind there is no session to manage.
    client.send(f"<enable xmlns='{SM}'/>")
    assert failed_condition(client.read_until("</failed>")) == "unexpected-request"
    client.send("<iq type='set' id='b'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'>"
                "<resource>count</resource></bind></iq>")
    client.read_until("</iq>")
    # <r/> and <a/> before enable: unexpected-request, the stream goes on.
    client.send(f"<r xmlns='{SM}'/>")
    assert failed_condition(client.read_until("</failed>")) == "unexpected-request"
    client.send(f"<a xmlns='{SM}' h='1'/>")
    assert failed_condition(client.read_until("</failed>")) == "unexpected-request"
    # Pipelined: enable and a request in one write; nothing counted yet.
    client.send(f"<enable xmlns='{SM}'/><r xmlns='{SM}'/>")
    text = client.read_until(r"<a [^>]*/>")
    assert "<enabled" in text and re.search(r"<a [^>]*h=['\"]0['\"]", text), text
    client.send(f"<enable xmlns='{SM}'/>")
    assert failed_condition(client.read_until("</failed>")) == "unexpected-request"
    # Three stanzas in, counted; the server asks for an ack of its answers.
    for n in range(3):
        client.send(f"<iq type='get' id='p{n}' to='{DOMAIN}'><ping xmlns='urn:xmpp:ping'/></iq>")
    client.send(f"<r xmlns='{SM}'/>")
    # Our count, and (in either order) one request of the server's for its answers.
    text = client.read_until(r"^(?=.*<a [^>]*h=['\"]3['\"])(?=.*<r xmlns=)")
    assert text.count("type='result'") + text.count('type="result"') == 3, text
    assert len(re.findall(r"<r xmlns=", text)) == 1, text
    client.send(f"<a xmlns='{SM}' h='3'/>")
    # An ack of more than was ever sent ends the stream.
    client.send(f"<a xmlns='{SM}' h='7'/>")
    closing = client.read_until("</stream:stream>")
    assert "<undefined-condition" in closing, closing
    client.close()


def test_bad_h_values(server, ca_file):
    client = login(server, ca_file, "carol@localhost")
    enable(client)
    client.send(f"<a xmlns='{SM}' h='4294967296'/>")  # 2^32: not a 32-bit counter
    assert "<bad-request" in client.read_until("</stream:stream>")
    client.close()
    other, answer = resume(server, ca_file, "carol@localhost", "whatever", 0)
    assert failed_condition(answer) == "item-not-found"
    other.send(f"<resume xmlns='{SM}' previd='x' h='-1'/>")
    assert failed_condition(other.read_until("</failed>")) == "bad-request"
    other.close()


def test_resume_after_the_connection_is_cut(server, ca_file):
    alice, bob = login(server, ca_file, "alice@localhost"), login(server, ca_file, "bob@localhost")
    previd, granted = enable(alice)
    assert granted == str(RESUME_TIMEOUT)
    message(bob, alice.jid, "one")  # type: ignore[attr-defined]
    assert ">one<" in alice.read_until("one</body>")
    mark = server.log.mark()
    alice.close()  # cut: no closing tag
    server.log.wait_for(rf"session {re.escape(alice.jid)} held", TIMEOUT, mark)  # type: ignore[attr-defined]
    message(bob, alice.jid, "two")  # type: ignore[attr-defined]

    # Someone else cannot take it, even knowing the id.
    mallory, answer = resume(server, ca_file, "carol@localhost", previd, 0)
    assert failed_condition(answer) == "item-not-found"
    mallory.close()

    again, answer = resume(server, ca_file, "alice@localhost", previd, 0)
    assert re.search(rf"<resumed[^>]*previd=['\"]{re.escape(previd)}['\"]", answer), answer
    # Everything not acknowledged comes again, in order.
    text = read_more(again, answer, "two</body>")
    assert text.index(">one<") < text.index(">two<"), text
    # Sent again with the time they were first sent (XEP-0203).
    assert len(re.findall(r"<delay [^>]*xmlns=['\"]urn:xmpp:delay|<delay xmlns=['\"]urn:xmpp:delay",
                          text)) == 2, text
    again.send(f"<a xmlns='{SM}' h='2'/>")
    # The session goes on under the same JID: bob reaches it, it reaches bob.
    message(bob, alice.jid, "three")  # type: ignore[attr-defined]
    assert ">three<" in again.read_until("three</body>")
    message(again, bob.jid, "back")  # type: ignore[attr-defined]
    assert ">back<" in bob.read_until("back</body>")
    again.close()
    bob.close()


def test_expiry_sends_unacknowledged_messages_to_offline_and_bounces_iqs(server, ca_file):
    dave, bob = login(server, ca_file, "dave@localhost"), login(server, ca_file, "bob@localhost")
    dave.send("<presence/>")
    previd, granted = enable(dave, SHORT_MAX)
    assert granted == str(SHORT_MAX)
    message(bob, dave.jid, "unread")  # type: ignore[attr-defined]
    dave.read_until("unread</body>")
    mark = server.log.mark()
    dave.close()
    server.log.wait_for(rf"session {re.escape(dave.jid)} held", TIMEOUT, mark)  # type: ignore[attr-defined]
    # While held: a message waits with the session, an iq too.
    message(bob, dave.jid, "while-away")  # type: ignore[attr-defined]
    bob.send(f"<iq type='get' id='q1' to='{dave.jid}'>"  # type: ignore[attr-defined]
             "<query xmlns='jabber:iq:version'/></iq>")
    server.log.wait_for(r"resumption of dave@localhost/\S+ expired", TIMEOUT, mark)
    bounced = bob.read_until(r"id=['\"]q1['\"].*?</iq>")
    assert "type='error'" in bounced or 'type="error"' in bounced, bounced
    assert "<service-unavailable" in bounced, bounced
    # The id resumes nothing now.
    late, answer = resume(server, ca_file, "dave@localhost", previd, 0)
    assert failed_condition(answer) == "item-not-found"
    late.close()
    # Both messages wait in offline storage for the next login.
    fresh = login(server, ca_file, "dave@localhost")
    fresh.send("<presence/>")
    text = fresh.read_until("while-away</body>")
    assert ">unread<" in text and text.index(">unread<") < text.index(">while-away<"), text
    assert "urn:xmpp:delay" in text
    # Routed again, not archived again: the archive has each message once.
    fresh.send("<iq type='set' id='mam'><query xmlns='urn:xmpp:mam:2' queryid='q'/></iq>")
    archived = fresh.read_until(r"id=['\"]mam['\"]")
    assert archived.count(">unread<") == 1 and archived.count(">while-away<") == 1, archived
    fresh.close()
    bob.close()


def test_resume_moves_the_session_to_the_other_shard(two_shards, ca_file):
    place = Placement(two_shards.log, two_shards.c2s_port, ca_file, USERS)
    try:
        alice = place.login_on(0, "alice@localhost")
        on_zero = place.login_on(0, "bob@localhost")
        on_one = place.login_on(1, "carol@localhost")
        previd, _ = enable(alice)
        message(on_one, alice.jid, "before")  # type: ignore[attr-defined]
        alice.read_until("before</body>")
        handled = 0  # alice's count of stanzas received
        acked = 1  # stanzas the server sent alice that she has not acknowledged
        client, landed = alice, 0
        for _ in range(40):  # each reconnection lands on shard 1 half the time
            mark = two_shards.log.mark()
            client.close()
            two_shards.log.wait_for(
                rf"session {re.escape(alice.jid)} held", TIMEOUT, mark)  # type: ignore[attr-defined]
            client, answer = resume(two_shards, ca_file, "alice@localhost", previd, handled)
            assert "<resumed" in answer, answer
            m = two_shards.log.wait_for(
                rf"shard-(\d+) .*resumed {re.escape(alice.jid)}$", TIMEOUT, mark)  # type: ignore[attr-defined]
            landed = int(m[1])
            if handled == 0:
                assert ">before<" in read_more(client, answer, "before</body>")
                handled = acked
                client.send(f"<a xmlns='{SM}' h='{handled}'/>")
            if landed == 1:
                break
        assert landed == 1, "no reconnection landed on shard 1"
        place.clients.append(client)
        # The migrated session is reachable from both shards, and sends.
        message(on_one, alice.jid, "from-one")  # type: ignore[attr-defined]
        message(on_zero, alice.jid, "from-zero")  # type: ignore[attr-defined]
        text = client.read_until(r"from-one</body>.*from-zero</body>|from-zero</body>.*from-one"
                                 r"</body>")
        assert ">from-one<" in text and ">from-zero<" in text
        message(client, on_zero.jid, "hello-zero")  # type: ignore[attr-defined]
        assert ">hello-zero<" in on_zero.read_until("hello-zero</body>")
        # And it can be resumed again from its new shard.
        client.send(f"<r xmlns='{SM}'/>")
        client.read_until(r"<a [^>]*/>")
        mark = two_shards.log.mark()
        client.close()
        two_shards.log.wait_for(rf"session {re.escape(alice.jid)} held", TIMEOUT, mark)  # type: ignore[attr-defined]
        final, answer = resume(two_shards, ca_file, "alice@localhost", previd, handled + 2)
        assert "<resumed" in answer, answer
        place.clients.append(final)
    finally:
        place.close_all()


def test_slixmpp_acks_and_resumes(server, ca_file):
    """slixmpp's xep_0198: its stanzas are acknowledged by count, and after
    the TCP connection is aborted it resumes and gets what was sent meanwhile."""

    async def run() -> tuple[int, int, bool, list[str]]:
        client = slixmpp.ClientXMPP("bob@localhost/slix", USERS["bob@localhost"])
        client.register_plugin("xep_0198")
        client.ssl_context = ssl.create_default_context(cafile=str(ca_file))
        sm = client.plugin["xep_0198"]
        bodies: list[str] = []
        got = asyncio.Event()
        started: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        resumed, gone = asyncio.Event(), asyncio.Event()
        client.add_event_handler("disconnected", lambda _e: gone.set())
        client.add_event_handler("session_start",
                                 lambda _e: started.done() or started.set_result(None))
        client.add_event_handler("session_resumed", lambda _e: resumed.set())

        def on_message(msg: slixmpp.Message) -> None:
            bodies.append(msg["body"])
            got.set()

        client.add_event_handler("message", on_message)
        client.connect(host="127.0.0.1", port=server.c2s_port)
        await asyncio.wait_for(started, TIMEOUT)
        await asyncio.wait_for(_until(lambda: sm.enabled_in and sm.sm_id), TIMEOUT)
        for n in range(10):
            client.send_message(mto="bob@localhost/slix", mbody=f"m{n}")
        await asyncio.wait_for(_until(lambda: len(bodies) == 10), TIMEOUT)
        sm.request_ack()
        await asyncio.wait_for(_until(lambda: sm.last_ack == sm.seq), TIMEOUT)
        seq, last_ack = sm.seq, sm.last_ack
        # Cut the TCP connection under slixmpp; a message arrives meanwhile.
        other = RawClient(server.c2s_port, ca_file)
        other.login(DOMAIN, "carol@localhost", USERS["carol@localhost"], resource="c")
        mark = server.log.mark()
        client.transport.abort()
        await asyncio.to_thread(server.log.wait_for, r"session bob@localhost/slix held",
                                TIMEOUT, mark)
        message(other, "bob@localhost/slix", "while-cut")
        await asyncio.wait_for(gone.wait(), TIMEOUT)
        client.connect(host="127.0.0.1", port=server.c2s_port)
        await asyncio.wait_for(resumed.wait(), TIMEOUT)
        await asyncio.wait_for(_until(lambda: "while-cut" in bodies), TIMEOUT)
        other.close()
        await client.disconnect()
        return seq, last_ack, resumed.is_set(), bodies

    seq, last_ack, was_resumed, bodies = asyncio.run(run())
    assert seq >= 10 and last_ack == seq
    assert was_resumed and bodies[:10] == [f"m{n}" for n in range(10)]
    assert bodies.count("while-cut") == 1


async def _until(condition: object, step: float = 0.02) -> None:
    """Wait for a client-side condition that slixmpp changes from its own
    handlers (it offers no event for every one of them)."""
    while not condition():  # type: ignore[operator]
        await asyncio.sleep(step)


def test_resume_while_the_old_connection_still_looks_alive(server, ca_file):
    """A phone on a new network reconnects before the server saw the old
    connection die: the resumption cuts the old one and takes the session."""
    alice, bob = login(server, ca_file, "alice@localhost"), login(server, ca_file, "bob@localhost")
    previd, _ = enable(alice)
    message(bob, alice.jid, "first")  # type: ignore[attr-defined]
    alice.read_until("first</body>")
    again, answer = resume(server, ca_file, "alice@localhost", previd, 0)  # old one still open
    assert "<resumed" in answer, answer
    assert ">first<" in read_more(again, answer, "first</body>")
    alice.wait_closed()  # the old connection was cut by the server
    assert alice.eof
    message(bob, alice.jid, "second")  # type: ignore[attr-defined]
    assert ">second<" in again.read_until("second</body>")
    again.close()
    bob.close()


def test_counters_wrap_at_two_to_the_32():
    """h is modulo 2^32 (XEP-0198 §4): an ack across the wrap drops the
    right stanzas; one beyond what was sent is refused."""
    state = SmState(None, None, None, None, 0)  # type: ignore[arg-type]
    state.acked = 2 ** 32 - 2
    state.queue.extend((ET.Element(f"s{n}"), 0.0) for n in range(4))
    assert state.sent_count == 2
    assert state.acknowledge(1)  # three of the four: 2^32-1, 0, 1
    assert [e.tag for e, _ in state.queue] == ["s3"] and state.acked == 1
    assert not state.acknowledge(3)  # two more than sent
    assert state.acknowledge(2) and not state.queue


def test_resume_takes_a_live_session_from_the_other_shard(two_shards, ca_file):
    """The client reconnects before either shard saw its old connection
    die, and lands on the other shard: the old connection is cut there and
    the session moves here."""
    place = Placement(two_shards.log, two_shards.c2s_port, ca_file, USERS)
    try:
        old = place.login_on(0, "dave@localhost")
        sender = place.login_on(1, "bob@localhost")
        previd, _ = enable(old)
        handled, shard = 0, 0
        for _ in range(40):  # until a reconnection lands on the other shard
            mark = two_shards.log.mark()
            new, answer = resume(two_shards, ca_file, "dave@localhost", previd, handled)
            assert "<resumed" in answer, answer
            m = two_shards.log.wait_for(
                rf"shard-(\d+) .*resumed {re.escape(old.jid)}$", TIMEOUT, mark)  # type: ignore[attr-defined]
            old.wait_closed()  # the server cut the old connection
            assert old.eof
            old.close()
            new.jid = old.jid  # type: ignore[attr-defined]
            moved = int(m[1]) != shard
            shard, old = int(m[1]), new
            if moved:
                break
        assert moved, "no reconnection landed on the other shard"
        place.clients.append(old)
        message(sender, old.jid, "after-move")  # type: ignore[attr-defined]
        assert ">after-move<" in old.read_until("after-move</body>")
    finally:
        place.close_all()
