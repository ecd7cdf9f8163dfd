"""Where features meet: stream management, client state indication, the
archive, carbons, multi-user chat and shards, against a real server. Each
test asserts what a user sees (a message arrives exactly once, an occupant
stays in its room, the archive holds one copy)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.rawclient import RawClient
from tests.serverproc import MlinkProcess, start_mlink
from tests.test_mam import sync
from tests.test_stream_management import DOMAIN, USERS, enable, login, with_sm_options

CARBONS = "urn:xmpp:carbons:2"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory,
           cert_files: tuple[Path, Path]) -> Iterator[MlinkProcess]:
    setup = tmp_path_factory.mktemp("cross") / "s"
    with start_mlink(setup, DOMAIN, cert_files, users=USERS,
                     edit_config=with_sm_options) as proc:
        yield proc


# Room for every message of the long test below in the unacknowledged queue
# and in offline storage: each routed-again message is then a store write.
OFFLINE_LIMIT = 3000
MANY = 3200


@pytest.fixture(scope="module")
def roomy(tmp_path_factory: pytest.TempPathFactory,
          cert_files: tuple[Path, Path]) -> Iterator[MlinkProcess]:
    setup = tmp_path_factory.mktemp("roomy") / "s"

    def edit(text: str) -> str:
        text = with_sm_options(text).replace(
            "</resume-timeout>", f"</resume-timeout><max-unacked>{MANY + 100}</max-unacked>", 1)
        return re.sub(r'offline-limit="\d+"', f'offline-limit="{OFFLINE_LIMIT}"', text)

    with start_mlink(setup, DOMAIN, cert_files, users=USERS, edit_config=edit) as proc:
        yield proc


def close_cleanly(server: MlinkProcess, client: RawClient) -> None:
    """End `client`'s stream with its closing tag; return once the server
    routed again the stanzas it never confirmed."""
    mark = server.log.mark()
    client.send("</stream:stream>")
    server.log.wait_for(r"routed again the \d+ stanza\(s\) of "
                        rf"{re.escape(client.jid)}$", 60, mark)  # type: ignore[attr-defined]
    client.close()


def test_unacked_message_routed_again_is_not_carbon_copied_twice(server, ca_file):
    """A message routed again after its session ended (never confirmed) was
    carbon-copied when first delivered: the other resources do not get a
    second <received/> carbon of it."""
    a = login(server, ca_file, "alice@localhost", "A")
    b = login(server, ca_file, "alice@localhost", "B")
    c = login(server, ca_file, "alice@localhost", "C")
    bob = login(server, ca_file, "bob@localhost")
    for client, priority in ((a, 5), (b, 5), (c, 0)):
        client.send(f"<presence><priority>{priority}</priority></presence>")
        sync(client)
    c.send(f"<iq type='set' id='carbons'><enable xmlns='{CARBONS}'/></iq>")
    c.read_until(r"id=['\"]carbons['\"]")
    enable(a)
    bob.send("<message to='alice@localhost' type='chat' id='once'><body>only-once</body>"
             "</message>")
    a.read_until("only-once</body>")
    b.read_until("only-once</body>")
    seen = c.read_until("only-once</body>")
    close_cleanly(server, a)
    seen += sync(c)
    assert seen.count("only-once</body>") == 1, seen
    for client in (b, c, bob):
        client.close()


def test_many_unacked_stanzas_all_routed_again_at_a_clean_close(roomy, ca_file):
    """Thousands of messages the client never confirmed, then a clean close:
    every one goes to offline storage or back to its sender, none vanishes
    (routing them takes longer than the connection's 2 s close grace)."""
    server = roomy
    n, limit = MANY, OFFLINE_LIMIT
    dave = login(server, ca_file, "dave@localhost")
    bob = login(server, ca_file, "bob@localhost")
    dave.send("<presence/>")
    enable(dave)
    sync(dave)
    bob.send("".join(f"<message to='{dave.jid}' type='chat' id='o{k}'><body>o{k}</body>"
                     "</message>" for k in range(n)))
    dave.read_until(rf">o{n - 1}</body>", timeout=60)
    close_cleanly(server, dave)
    bounced = bob.read_until(rf"id=['\"]o{n - 1}['\"][^>]*type=['\"]error|"
                             rf"type=['\"]error['\"][^>]*id=['\"]o{n - 1}['\"]", timeout=30)
    bounced += sync(bob)
    errors = re.findall(r"<message[^>]*type=['\"]error['\"][^>]*>", bounced)
    again = login(server, ca_file, "dave@localhost")
    again.send("<presence/>")
    stored = again.read_until(rf">o{limit - 1}</body>", timeout=30)
    stored += sync(again)
    offline = re.findall(r">(o\d+)</body>", stored)
    assert len(offline) == len(set(offline)) == limit, offline
    assert len(errors) == n - limit, len(errors)
    for client in (again, bob):
        client.close()


class _Stream:
    """Stands for a connection (a `StreamControl`): weakly referable."""

    def send_nonza(self, element: object) -> None:
        pass

    def send_stanza(self, stanza: object) -> bool:
        return True


def test_closed_sm_and_csi_streams_leave_no_entry():
    """The per-stream state of stream management and client state
    indication lives in WeakKeyDictionaries keyed by the stream; once the
    stream is gone (the connection closed), its entry must go too: a value
    that refers to its key kept every connection alive (about 50 KiB per
    SM or CSI connection, for ever)."""
    import gc
    import weakref

    from mlink.jid import JID
    from mlink.modules.csi import Holder
    from mlink.modules.stream_management import SmState
    from mlink.router.sessions import SessionInfo

    streams: weakref.WeakKeyDictionary[object, object] = weakref.WeakKeyDictionary()
    holders: weakref.WeakKeyDictionary[object, object] = weakref.WeakKeyDictionary()
    for _ in range(10):
        stream = _Stream()
        state = SmState(None, SessionInfo(JID("u", DOMAIN, "r")), stream,  # type: ignore[arg-type]
                        None, 0)
        streams[stream] = state
        holders[stream] = Holder(stream, JID("u", DOMAIN, "r"), object())  # type: ignore[arg-type]
    del stream, state
    gc.collect()
    assert len(streams) == 0 and len(holders) == 0


class _Closing:
    """A bound session whose connection is ending: it refuses stanzas."""

    def __init__(self) -> None:
        from mlink.jid import JID
        from mlink.router.sessions import SessionInfo

        self.info = SessionInfo(JID("", "", ""))
        self.refused = 0

    def deliver(self, stanza: object, keep: bool = True) -> bool:
        self.refused += 1
        return False


def test_message_refused_by_the_only_resource_goes_to_offline_storage():
    """A chat message to a bare JID whose only available session refuses it
    (its connection is closing) is stored offline, not dropped: the router
    ignored `deliver`'s answer (RFC 6121 §8.5.2: as if no resource)."""
    import xml.etree.ElementTree as ET

    import trio

    from mlink.hooks import Hooks
    from mlink.jid import JID
    from mlink.router.router import Router
    from mlink.router.sessions import SessionTable

    sessions, hooks = SessionTable(), Hooks()
    router = Router(frozenset({DOMAIN}), sessions, hooks)
    conn = _Closing()
    sessions.bind(conn, JID("dave", DOMAIN, ""), "phone")  # type: ignore[arg-type]
    conn.info.presence = ET.Element("{jabber:client}presence")
    conn.info.initial_presence_sent = True
    stored: list[str] = []

    async def offline(event: object) -> bool:
        stored.append(event.stanza.findtext("{jabber:client}body"))  # type: ignore[attr-defined]
        return True

    hooks.on("message/offline", offline)

    async def main() -> None:
        message = ET.fromstring("<message xmlns='jabber:client' from='bob@localhost/x' "
                                "to='dave@localhost' type='chat'><body>kept</body></message>")
        await router.route(message)

    trio.run(main)
    assert conn.refused == 1 and stored == ["kept"]


def test_a_closing_connection_hands_stanzas_on_instead_of_refusing():
    """Between a connection's drop and the moment stream management holds
    its session, the session is still bound: what is delivered then goes
    to the tap (kept for the resumed stream, or routed again), and without
    stream management a message is routed again at the end; refused
    (dropped by the caller), it was neither delivered nor stored."""
    import xml.etree.ElementTree as ET

    from mlink.transport.client import ClientConnection

    kept: list[ET.Element] = []

    class Tap:
        def sent(self, stanza: ET.Element) -> None:
            kept.append(stanza)

    def closing(tap: object) -> ClientConnection:
        conn = object.__new__(ClientConnection)
        conn.filters, conn.tap, conn._held, conn._closing = [], tap, False, True  # type: ignore[assignment]
        conn._lost, conn.ended, conn._orphans = True, False, []
        return conn

    message = ET.fromstring("<message xmlns='jabber:client' to='dave@localhost/r' "
                            "type='chat'><body>in the gap</body></message>")
    with_sm = closing(Tap())
    assert with_sm.deliver(message) and kept == [message]
    assert with_sm.deliver_tracked(message) is None  # offline keeps its copy
    plain = closing(None)
    assert plain.deliver(message) and plain._orphans == [message]
    presence = ET.fromstring("<presence xmlns='jabber:client' to='dave@localhost/r'/>")
    assert not plain.deliver(presence)
    plain.ended = True
    assert not plain.deliver(message)


def test_fanout_copy_for_a_session_gone_is_routed_as_a_stanza_frame_would_be():
    """A FANOUT frame (one payload for several recipients on this shard)
    whose recipient session ended, moved or is closing: that copy takes the
    STANZA frame's path (RFC 6121 §8.5.3.2: a message to the bare JID), not
    nowhere; the other recipients get theirs."""
    import inspect
    import xml.etree.ElementTree as ET

    import trio

    from mlink.jid import JID
    from mlink.router.sessions import SessionInfo, SessionTable
    from mlink.shard.cluster import Cluster
    from mlink.xml.serialize import serialize

    class Here:
        wants_tree = False

        def __init__(self) -> None:
            self.info = SessionInfo(JID("", "", ""))
            self.got: list[object] = []

        def deliver_wire(self, stanza: object, keep: bool = True) -> bool:
            self.got.append(stanza)
            return True

    class Router:
        def __init__(self) -> None:
            self.rerouted: list[ET.Element] = []

        def deliver(self, full: JID, stanza: ET.Element) -> bool:
            return False

        async def reroute(self, stanza: ET.Element) -> None:
            self.rerouted.append(stanza)

    class Server:
        sessions = SessionTable()
        router = Router()

    bob = Here()
    Server.sessions.bind(bob, JID("bob", DOMAIN, ""), "here")  # type: ignore[arg-type]
    cluster = object.__new__(Cluster)
    cluster.server = Server()  # type: ignore[assignment]
    message = ET.fromstring("<message xmlns='jabber:client' from='room@conference.localhost/C' "
                            "type='chat'><body>for both</body></message>")
    payload = serialize(message)

    async def receive() -> None:
        done = cluster._receive_fanout(payload, ["alice@localhost/gone", "bob@localhost/here"])
        if inspect.isawaitable(done):
            await done

    trio.run(receive)
    assert len(bob.got) == 1
    rerouted = Server.router.rerouted
    assert [(m.get("to"), m.findtext("{jabber:client}body")) for m in rerouted] == [
        ("alice@localhost", "for both")]


@pytest.fixture(scope="module")
def two(tmp_path_factory: pytest.TempPathFactory,
        cert_files: tuple[Path, Path]) -> Iterator[MlinkProcess]:
    setup = tmp_path_factory.mktemp("cross2") / "s"
    with start_mlink(setup, DOMAIN, cert_files, users=USERS, shards=2,
                     edit_config=with_sm_options) as proc:
        yield proc


def _room_on(shard: int, shards: int = 2) -> str:
    import uuid
    import zlib

    for _ in range(1000):
        room = f"room-{uuid.uuid4().hex[:8]}@conference.{DOMAIN}"
        if zlib.crc32(room.encode()) % shards == shard:
            return room
    raise AssertionError("no room name homed on the shard")


def test_occupant_stays_in_its_rooms_when_resumed_on_another_shard(two, ca_file):
    """Alice, in a room, loses her connection and resumes the session on a
    connection that lands on the other shard while Carol talks in the room.
    A delivery in the moment the session is between shards must not make
    the room drop her (Carol saw her leave with status 333, Alice was never
    told and got no more groupchat): she stays, and gets every message,
    also those already on their way to the shard she left."""
    from tests.placement import TIMEOUT, Placement

    muc = "http://jabber.org/protocol/muc"
    place = Placement(two.log, two.c2s_port, ca_file, USERS)
    try:
        room = _room_on(0)
        carol = place.login_on(0, "carol@localhost")
        carol.send(f"<presence to='{room}/C'><x xmlns='{muc}'/></presence>")
        carol.read_until("</subject>|<subject/>")
        carol.send(f"<iq type='set' id='cfg' to='{room}'><query xmlns='{muc}#owner'>"
                   "<x xmlns='jabber:x:data' type='submit'/></query></iq>")
        carol.read_until(r"id=['\"]cfg['\"]")
        alice = place.login_on(0, "alice@localhost")
        previd, _ = enable(alice)
        alice.send(f"<presence to='{room}/A'><x xmlns='{muc}'/></presence>")
        alice.read_until("</subject>|<subject/>")
        client, moves, previous, seen = alice, 0, 0, ""
        for attempt in range(16):
            if moves >= 3:
                break
            mark = two.log.mark()
            client.close()
            two.log.wait_for(rf"session {re.escape(alice.jid)} held", TIMEOUT, mark)
            new = RawClient(two.c2s_port, ca_file)
            new.authenticate(DOMAIN, "alice@localhost", USERS["alice@localhost"])
            burst = "".join(f"<message to='{room}' type='groupchat' id='b{attempt}-{n}'>"
                            f"<body>b{attempt}-{n}</body></message>" for n in range(60))
            new.send(f"<resume xmlns='urn:xmpp:sm:3' previd='{previd}' h='0'/>")
            carol.send(burst)
            answer = new.read_until(r"<resumed[^>]*/>|</failed>")
            assert "<resumed" in answer, answer
            place.clients.append(new)
            landed = two.log.wait_for(rf"shard-(\d+) .*resumed {re.escape(alice.jid)}$",
                                      TIMEOUT, mark)
            if int(landed[1]) != previous:
                moves, previous = moves + 1, int(landed[1])
            seen += carol.read_until(rf"b{attempt}-59</body>")
            got = answer + new.read_until(rf">b{attempt}-59</body>", timeout=20)
            missing = [n for n in range(60) if f">b{attempt}-{n}</body>" not in got]
            assert not missing, (attempt, missing)
            client = new
        assert moves >= 1
        left = re.findall(rf"<presence[^>]*from=['\"]{re.escape(room)}/A['\"][^>]*"
                          r"type=['\"]unavailable['\"]", seen)
        assert not left, seen
        carol.send(f"<message to='{room}' type='groupchat' id='after'><body>after-resume</body>"
                   "</message>")
        carol.read_until("after-resume</body>")
        client.read_until("after-resume</body>", timeout=20)
    finally:
        place.close_all()


def test_unacked_archive_results_are_not_routed_again_to_offline_storage(server, ca_file):
    """Archive query results (and carbons) a stream-managed session never
    confirmed mean nothing once it has ended: they are not routed again
    (the next login got the old query's results from offline storage, as
    if they were new messages); a real message left unconfirmed still is."""
    from tests.test_mam import query, say

    bob = login(server, ca_file, "bob@localhost")
    carol = login(server, ca_file, "carol@localhost")
    say(bob, "carol@localhost", "archived-one")
    sync(bob)
    carol.send("<presence/>")
    carol.read_until("archived-one</body>")
    enable(carol, 1)
    results, _ = query(carol, fields={"with": "bob@localhost"})
    assert results
    say(bob, carol.jid, "unconfirmed")  # type: ignore[attr-defined]
    carol.read_until("unconfirmed</body>")
    mark = server.log.mark()
    carol.close()
    server.log.wait_for(rf"routed again the \d+ stanza\(s\) of {re.escape(carol.jid)}$",
                        60, mark)  # type: ignore[attr-defined]
    say(bob, "carol@localhost", "marker")  # stored offline after whatever was routed again
    sync(bob)
    fresh = login(server, ca_file, "carol@localhost")
    fresh.send("<presence/>")
    text = fresh.read_until("marker</body>")
    assert "urn:xmpp:mam:2" not in text, text
    assert text.count("unconfirmed</body>") == 1, text
    fresh.close()
    bob.close()


def test_room_output_passes_the_recipients_blocking_and_forged_id_filters(server, ca_file):
    """What a room sends goes through its recipient's inbound rules like
    any stanza for the user: an occupant Alice blocked (XEP-0191 §3.3)
    reaches her neither in the room nor privately, and a private message
    carrying a stanza-id in Alice's name (XEP-0359, forged) reaches her
    without it."""
    import uuid

    muc = "http://jabber.org/protocol/muc"
    room = f"room-{uuid.uuid4().hex[:8]}@conference.{DOMAIN}"
    carol = login(server, ca_file, "carol@localhost")
    carol.send(f"<presence to='{room}/Troll'><x xmlns='{muc}'/></presence>")
    carol.read_until("</subject>|<subject/>")
    carol.send(f"<iq type='set' id='cfg' to='{room}'><query xmlns='{muc}#owner'>"
               "<x xmlns='jabber:x:data' type='submit'/></query></iq>")
    carol.read_until(r"id=['\"]cfg['\"]")
    bob = login(server, ca_file, "bob@localhost")
    bob.send(f"<presence to='{room}/Nice'><x xmlns='{muc}'/></presence>")
    bob.read_until("</subject>|<subject/>")
    alice = login(server, ca_file, "alice@localhost")
    alice.send(f"<presence to='{room}/A'><x xmlns='{muc}'/></presence>")
    alice.read_until("</subject>|<subject/>")
    alice.send(f"<iq type='set' id='blk'><block xmlns='urn:xmpp:blocking'>"
               f"<item jid='{room}/Troll'/></block></iq>")
    alice.read_until(r"id=['\"]blk['\"]")
    carol.send(f"<message to='{room}' type='groupchat' id='t1'><body>troll-group</body></message>"
               f"<message to='{room}/A' type='chat' id='t2'><body>troll-pm</body></message>")
    sync(carol)
    bob.send(f"<message to='{room}/A' type='chat' id='t3'><stanza-id xmlns='urn:xmpp:sid:0' "
             "by='alice@localhost' id='forged'/><body>nice-pm</body></message>"
             f"<message to='{room}' type='groupchat' id='t4'><body>marker</body></message>")
    text = alice.read_until("marker</body>")
    assert "nice-pm</body>" in text, text
    assert "troll-group" not in text and "troll-pm" not in text, text
    assert "forged" not in text, text
    for client in (alice, bob, carol):
        client.close()


def test_late_resume_answer_ends_the_session_instead_of_losing_it():
    """The holder's answer to a cross-shard resumption arrives after the
    requester gave up: the holder already let the session go (no
    session/closed; its unacknowledged stanzas travel in the answer). It
    is ended where the answer lands: contacts and rooms hear it leave, and
    the unacknowledged message is routed again, not dropped."""
    import contextlib
    import json
    import xml.etree.ElementTree as ET

    import trio

    from mlink.jid import JID
    from mlink.modules.stream_management import Manager, SmState
    from mlink.router.sessions import SessionInfo

    closed: list[str] = []
    rerouted: list[str] = []

    class Router:
        def batch(self) -> contextlib.AbstractContextManager[None]:
            return contextlib.nullcontext()

        async def reroute(self, stanza: ET.Element) -> None:
            rerouted.append(stanza.findtext("{jabber:client}body") or "")

        def expect_session(self, full: JID) -> None:
            pass

        def session_arrived(self, full: JID) -> list[ET.Element]:
            # What its old shard passed on meanwhile.
            return [ET.fromstring("<message xmlns='jabber:client' type='chat'>"
                                  "<body>passed on</body></message>")]

    class Module:
        router = Router()
        log = __import__("logging").getLogger("test")

        async def fire(self, event: str, payload: SessionInfo) -> None:
            closed.append(f"{event} {payload.jid}")

        def shared(self, name: str, factory: Any) -> Any:
            return factory()

    info = SessionInfo(JID("alice", DOMAIN, "phone"))
    state = SmState(None, info, None, "rid", 60)  # type: ignore[arg-type]
    state.queue.append((ET.fromstring("<message xmlns='jabber:client' to='alice@localhost/phone'"
                                      " type='chat'><body>unconfirmed</body></message>"), 0.0))
    manager = Manager(Module())  # type: ignore[arg-type]
    late = {"op": "result", "req": 7, "session": state.snapshot()}
    trio.run(manager.bus_message, 1, json.dumps(late).encode())
    assert closed == ["session/closed alice@localhost/phone"]
    assert rerouted == ["unconfirmed", "passed on"]


# Small enough for a quick test, above offline delivery's 512 KiB batches.
SMALL_OUTPUT = 1024 * 1024


@pytest.fixture(scope="module")
def small_output(tmp_path_factory: pytest.TempPathFactory,
                 cert_files: tuple[Path, Path]) -> Iterator[MlinkProcess]:
    setup = tmp_path_factory.mktemp("small") / "s"

    def edit(text: str) -> str:
        return re.sub(r'output-bytes="\d+"', f'output-bytes="{SMALL_OUTPUT}"',
                      with_sm_options(text))

    with start_mlink(setup, DOMAIN, cert_files, users=USERS, edit_config=edit) as proc:
        yield proc


def test_held_session_is_bounded_in_bytes(small_output, ca_file):
    """A held session keeps at most four output bounds of stanzas in bytes,
    not only max-unacked of them (up to 256 MiB of large stanzas): past
    it, the session ends and what it kept goes to offline storage."""
    server = small_output
    dave = login(server, ca_file, "dave@localhost")
    bob = login(server, ca_file, "bob@localhost")
    dave.send("<presence/>")
    enable(dave)
    sync(dave)
    mark = server.log.mark()
    dave.close()
    server.log.wait_for(rf"session {re.escape(dave.jid)} held", 30,  # type: ignore[attr-defined]
                        mark)
    pad = "x" * 100_000
    n = 4 * SMALL_OUTPUT // 100_000 + 5  # past the bound, well under max-unacked
    bob.send("".join(f"<message to='{dave.jid}' type='chat' id='H{k}'>"  # type: ignore[attr-defined]
                     f"<body>H{k} {pad}</body></message>" for k in range(n)))
    server.log.wait_for(rf"held session {re.escape(dave.jid)} ends: over",  # type: ignore[attr-defined]
                        30, mark)
    server.log.wait_for(rf"routed again the \d+ stanza\(s\) of {re.escape(dave.jid)}$",  # type: ignore[attr-defined]
                        60, mark)
    sync(bob)
    again = login(server, ca_file, "dave@localhost")
    again.send("<presence/>")
    # In storage order: what arrived after the session ended went there
    # while the kept ones were still being routed again.
    text = ""
    for _ in range(n):
        if len(set(re.findall(r">(H\d+) x+</body>", text))) == n:
            break
        text += again.read_until(r"x</body>", timeout=30)
    text += sync(again)
    got = re.findall(r">(H\d+) x+</body>", text)
    assert sorted(got) == sorted(f"H{k}" for k in range(n))
    again.close()
    bob.close()


def test_sm_counts_what_was_written_not_an_oversized_stanza():
    """A stanza larger than the output bound is never written (dropped, or
    a result replaced by a resource-constraint error): stream management
    must count what the client gets, or its h never catches up (acks off
    by one for the rest of the stream, XEP-0198 §4) and the dropped stanza
    is sent again, and dropped again, on resume."""
    import collections
    import xml.etree.ElementTree as ET
    from types import SimpleNamespace

    from mlink.jid import JID
    from mlink.router.sessions import SessionInfo
    from mlink.stream.framing import TCPFraming
    from mlink.transport.client import ClientConnection
    from mlink.util.outbuffer import OutputBuffer

    counted: list[ET.Element] = []

    class Tap:
        def sent(self, stanza: ET.Element) -> None:
            counted.append(stanza)

    conn = object.__new__(ClientConnection)
    conn.filters, conn.tap, conn._held, conn._closing = [], Tap(), False, False  # type: ignore[assignment]
    conn.ended, conn._orphans, conn._sending = False, [], False
    conn.xmpp = SimpleNamespace(framing=TCPFraming())  # type: ignore[assignment]
    conn.out = OutputBuffer(1000)
    conn.transport = object()  # type: ignore[assignment]
    conn.peer, conn.info = "test", SessionInfo(JID("dave", DOMAIN, "r"))
    conn.server = SimpleNamespace(  # type: ignore[assignment]
        counters=SimpleNamespace(stanzas_out=collections.Counter()))
    big = "y" * 5000
    assert conn.deliver(ET.fromstring(f"<message xmlns='jabber:client' to='dave@localhost/r'>"
                                      f"<body>{big}</body></message>"))
    assert counted == []
    assert conn.deliver(ET.fromstring(f"<iq xmlns='jabber:client' type='result' id='r1' "
                                      f"to='dave@localhost/r'><q xmlns='urn:x'>{big}</q></iq>"))
    assert [(s.get("type"), s.get("id")) for s in counted] == [("error", "r1")]


def test_fanout_to_stream_managed_sessions_parses_the_frame_once(monkeypatch):
    """A FANOUT frame for many sessions whose modules watch their output
    (stream management, client state indication: they need a tree) is
    parsed once for all of them, the copies sharing its children, not
    once per recipient (8x the CPU of the byte path for a big room)."""
    import xml.etree.ElementTree as ET

    import trio

    import mlink.shard.cluster as cluster_module
    from mlink.jid import JID
    from mlink.router.sessions import SessionInfo, SessionTable
    from mlink.shard.cluster import Cluster
    from mlink.xml.serialize import WireStanza, serialize

    parses = 0
    real_parse = cluster_module.parse_stanza

    def counting_parse(data: bytes) -> ET.Element:
        nonlocal parses
        parses += 1
        return real_parse(data)

    monkeypatch.setattr(cluster_module, "parse_stanza", counting_parse)

    class Managed:
        wants_tree = True

        def __init__(self) -> None:
            self.info = SessionInfo(JID("", "", ""))
            self.got: list[ET.Element] = []

        def deliver(self, stanza: ET.Element, keep: bool = True) -> bool:
            self.got.append(stanza)
            return True

        def deliver_wire(self, stanza: WireStanza, keep: bool = True) -> bool:
            nonlocal parses
            parses += 1  # what ClientConnection does for such a stream
            return self.deliver(stanza.element(), keep)

    class Server:
        sessions = SessionTable()

    conns = [Managed() for _ in range(5)]
    for n, conn in enumerate(conns):
        Server.sessions.bind(conn, JID(f"u{n}", DOMAIN, ""), "r")  # type: ignore[arg-type]
    cluster = object.__new__(Cluster)
    cluster.server = Server()  # type: ignore[assignment]
    message = ET.fromstring("<message xmlns='jabber:client' from='room@conference.localhost/C' "
                            "type='groupchat'><body>to all</body></message>")
    payload = serialize(message)

    async def receive() -> None:
        done = cluster._receive_fanout(payload, [f"u{n}@localhost/r" for n in range(5)])
        if done is not None:
            await done

    trio.run(receive)
    assert [len(c.got) for c in conns] == [1] * 5
    assert [c.got[0].get("to") for c in conns] == [f"u{n}@localhost/r" for n in range(5)]
    assert parses == 1


def test_a_dropped_room_leaves_no_per_room_state_in_the_service():
    """The service's per-room counters (history appends since the last
    trim) and noted unreachable occupants go with the room: they grew with
    every room that ever kept history."""
    import xml.etree.ElementTree as ET

    import trio

    from mlink.jid import JID
    from mlink.modules.muc.room import HistoryEntry, Room
    from mlink.modules.muc.service import MucService

    class Store:
        def archive(self, name: str) -> Store:
            return self

        def map(self, name: str) -> Store:
            return self

        async def append(self, *args: object, **kwargs: object) -> None:
            pass

        async def set(self, *args: object) -> None:
            pass

        async def delete_all(self, *args: object) -> int:
            return 0

    class Module:
        router = None
        store = Store()
        options = None

    service = MucService(Module(), {})  # type: ignore[arg-type]
    room = Room(JID("r", f"conference.{DOMAIN}", ""))
    service.rooms[room.jid] = room

    async def main() -> None:
        entry = HistoryEntry(0.0, ET.Element("{jabber:client}message"), 0)
        await service._keep_history(str(room.jid), entry)
        service._unreached[(room.jid, JID("a", DOMAIN, "r"))] = (0.0, [])
        await service._drop(room, destroyed=False)

    trio.run(main)
    assert not service._appended and not service._unreached


def test_imported_offline_messages_lose_the_old_archive_ids(tmp_path: Path):
    """An offline message exported by a server with an archive (Prosody's
    mod_mam) carries a stanza-id in the user's name that mlink's archive
    does not know: imported as is, it reaches the client (offline delivery
    does not pass the archive's filter) and a catch-up from it fails with
    item-not-found. It is removed on import; other ids stay."""
    from mlink.admin import xep0227

    source = tmp_path / "in.xml"
    source.write_text(
        "<server-data xmlns='urn:xmpp:pie:0'><host jid='localhost'>"
        "<user name='zed' password='zed-pw'><offline-messages>"
        "<message xmlns='jabber:client' from='bob@localhost/x' to='zed@localhost' type='chat'>"
        "<body>kept</body><stanza-id xmlns='urn:xmpp:sid:0' by='zed@localhost' id='old'/>"
        "<stanza-id xmlns='urn:xmpp:sid:0' by='room@conference.localhost' id='r1'/>"
        "</message></offline-messages></user></host></server-data>")
    plan = xep0227.read_plan(source, frozenset({DOMAIN}))
    (stored,) = plan.users["zed@localhost"].offline
    assert b"kept" in stored and b"id='old'" not in stored and b"r1" in stored, stored


def test_resume_with_a_backlog_larger_than_the_output_bound(small_output, ca_file):
    """250 messages of 6 KB (1.5 MB, past a 1 MiB output bound; under the
    3 MiB a session may take to another shard) arrive while the session is
    held: the resumed stream gets <resumed/> and then every one of them,
    once (all queued at once, they ended the new stream with
    policy-violation before <resumed/> was written)."""
    from tests.test_stream_management import resume

    server = small_output
    n, pad = 250, "x" * 6000
    carol = login(server, ca_file, "carol@localhost")
    bob = login(server, ca_file, "bob@localhost")
    carol.send("<presence/>")
    previd, _ = enable(carol)
    sync(carol)
    mark = server.log.mark()
    carol.close()
    server.log.wait_for(rf"session {re.escape(carol.jid)} held", 30,  # type: ignore[attr-defined]
                        mark)
    for first in range(0, n, 50):
        bob.send("".join(f"<message to='{carol.jid}' type='chat' id='L{k}'>"  # type: ignore[attr-defined]
                         f"<body>L{k} {pad}</body></message>" for k in range(first, first + 50)))
    sync(bob)
    again, answer = resume(server, ca_file, "carol@localhost", previd, 0)
    assert "<resumed" in answer, answer
    text = answer + again.read_until(rf">L{n - 1} x+</body>", timeout=60)
    got = re.findall(r">(L\d+) x+</body>", text)
    assert len(got) == n and set(got) == {f"L{k}" for k in range(n)}
    again.close()
    bob.close()


@pytest.fixture(scope="module")
def three(tmp_path_factory: pytest.TempPathFactory,
          cert_files: tuple[Path, Path]) -> Iterator[MlinkProcess]:
    setup = tmp_path_factory.mktemp("cross3") / "s"
    with start_mlink(setup, DOMAIN, cert_files, users=USERS, shards=3,
                     edit_config=with_sm_options) as proc:
        yield proc


def test_chats_from_a_third_shard_reach_a_session_resumed_elsewhere(three, ca_file):
    """Bob, on a third shard, keeps writing to Alice's full JID while her
    session moves between the two other shards: every message reaches her
    resumed stream (a SESSION_DOWN before the new shard's SESSION_UP sent
    those in between to offline storage, which a resumed session never
    reads)."""
    from tests.placement import TIMEOUT, Placement

    place = Placement(three.log, three.c2s_port, ca_file, USERS)
    try:
        bob = place.login_on(2, "bob@localhost")
        alice = place.login_on(0, "alice@localhost")
        previd, _ = enable(alice)
        client, moves, previous = alice, 0, 0
        for attempt in range(20):
            if moves >= 3:
                break
            mark = three.log.mark()
            client.close()
            three.log.wait_for(rf"session {re.escape(alice.jid)} held", TIMEOUT, mark)
            new = RawClient(three.c2s_port, ca_file)
            new.authenticate(DOMAIN, "alice@localhost", USERS["alice@localhost"])
            new.send(f"<resume xmlns='urn:xmpp:sm:3' previd='{previd}' h='0'/>")
            bob.send("".join(f"<message to='{alice.jid}' type='chat' id='c{attempt}-{n}'>"
                             f"<body>c{attempt}-{n}</body></message>" for n in range(60)))
            answer = new.read_until(r"<resumed[^>]*/>|</failed>")
            assert "<resumed" in answer, answer
            place.clients.append(new)
            landed = int(three.log.wait_for(
                rf"shard-(\d+) .*resumed {re.escape(alice.jid)}$", TIMEOUT, mark)[1])
            if landed != previous:
                moves, previous = moves + 1, landed
            sync(bob)
            got = answer + new.read_until(rf">c{attempt}-59</body>", timeout=20)
            missing = [n for n in range(60) if f">c{attempt}-{n}</body>" not in got]
            assert not missing, (attempt, landed, missing)
            client = new
        assert moves >= 1
    finally:
        place.close_all()
