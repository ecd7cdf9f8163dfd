"""XEP-0357 push notifications against a real server, to a test app server
that is a raw-socket XEP-0114 component: a publish when the user's
stream-managed session is detached (TCP cut, resumption on) and a contact
writes, none while the session is active, none after disable, one for an
offline user, a burst summarised in one push, bad enable requests refused,
and a registration dropped after a persistent error from the app server."""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import pytest
import trio

from mlink.config import load_config
from mlink.jid import JID
from mlink.modules.wakeups import DETACHED, Wakeups
from mlink.server import Server
from tests.componentclient import RawComponent
from tests.placement import Placement
from tests.rawclient import RawClient, read_stanza, stanza_error_of
from tests.serverproc import DOMAIN, MlinkProcess, free_ports, mlink, start_mlink
from tests.test_component import component_port, connect
from tests.test_stream_management import enable

PUSH, SECRET = "push.localhost", "push-secret-0123456789"
PUSH_NS = "urn:xmpp:push:0"
USERS = {f"{u}@{DOMAIN}": f"{u}-pw" for u in ("alice", "bob", "carol", "dave")}
ALICE, BOB, CAROL, DAVE = USERS
FORM = ("<x xmlns='jabber:x:data' type='submit'><field var='FORM_TYPE'>"
        "<value>http://jabber.org/protocol/pubsub#publish-options</value></field>"
        "<field var='secret'><value>s3cr3t</value></field></x>")


def configure(text: str, options: str = "<include-body>true</include-body>"
              "<include-sender>true</include-sender><min-interval>0</min-interval>") -> str:
    components = (f'<components port="0"><component name="{PUSH}" secret="{SECRET}"/>'
                  "</components>")
    modules = f"<modules><module name='push'>{options}</module></modules>"
    return text.replace("</mlink>", components + modules + "\n</mlink>")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory,
           cert_files: tuple[Path, Path]) -> Iterator[MlinkProcess]:
    setup = tmp_path_factory.mktemp("push") / "s"
    with start_mlink(setup, DOMAIN, cert_files, users=USERS, edit_config=configure,
                     shards=1) as proc:
        yield proc


@pytest.fixture
def app(server: MlinkProcess) -> Iterator[RawComponent]:
    component = connect(server)
    yield component
    component.close()


def login(server: MlinkProcess, ca_file: Path, user: str) -> RawClient:
    client = RawClient(server.c2s_port, ca_file)
    client.jid = client.login(DOMAIN, user, USERS[user])  # type: ignore[attr-defined]
    return client


def register(client: RawClient, node: str, form: str = FORM, stanza_id: str = "en") -> ET.Element:
    client.send(f"<iq type='set' id='{stanza_id}'><enable xmlns='{PUSH_NS}' jid='{PUSH}' "
                f"node='{node}'>{form}</enable></iq>")
    return read_stanza(client, "iq", stanza_id)


def next_publish(app: RawComponent) -> ET.Element:
    text = app.read_until(r"</iq>")
    iqs = [e for e in ET.fromstring(f"<r xmlns='jabber:component:accept'>{text}</r>")
           if e.tag.endswith("}iq")]
    return iqs[0]


def summary(iq: ET.Element, where: str = "notification") -> dict[str, str]:
    """The fields of the notification's summary form (or of publish-options)."""
    parent = next(e for e in iq.iter() if e.tag.endswith("}" + where))
    fields = parent.iter("{jabber:x:data}field")
    return {f.get("var", ""): f.findtext("{jabber:x:data}value") or "" for f in fields}


def send(sender: RawClient, to: str, body: str, stanza_id: str) -> None:
    sender.send(f"<message to='{to}' type='chat' id='{stanza_id}'><body>{body}</body></message>")


def test_feature_on_the_account(server, ca_file):
    alice = login(server, ca_file, ALICE)
    alice.send(f"<iq type='get' id='di' to='{ALICE}'>"
               "<query xmlns='http://jabber.org/protocol/disco#info'/></iq>")
    reply = read_stanza(alice, "iq", "di")
    features = {f.get("var") for f in reply.iter("{http://jabber.org/protocol/disco#info}feature")}
    assert PUSH_NS in features
    alice.close()


def test_push_when_the_session_is_detached_and_none_while_active(server, ca_file, app):
    alice, bob = login(server, ca_file, ALICE), login(server, ca_file, BOB)
    alice.send("<presence/>")
    enable(alice)
    assert register(alice, "node-a").get("type") == "result"
    # Active: the message is delivered, no push. The ping after it shows
    # the app server got nothing (its stanzas are written in order).
    send(bob, alice.jid, "active one", "a1")  # type: ignore[attr-defined]
    alice.read_until("active one")
    app.send(f"<iq type='get' id='sync1' from='{PUSH}' to='{DOMAIN}'>"
             "<ping xmlns='urn:xmpp:ping'/></iq>")
    before = app.read_until(r"id='sync1'")
    assert "<publish" not in before, before
    # Cut TCP: the session is held for resumption.
    mark = server.log.mark()
    alice.sock.close()
    server.wait_for_log(rf"session {re.escape(alice.jid)} held", since=mark)  # type: ignore[attr-defined]
    send(bob, ALICE, "while away", "a2")
    # First a push for what alice never acknowledged ("active one" may not
    # have reached the phone), then one for the new message.
    text = app.read_until("while away")
    iqs = [e for e in ET.fromstring(f"<r xmlns='jabber:component:accept'>{text}</r>")
           if e.tag.endswith("}iq")]
    assert [summary(i)["last-message-body"] for i in iqs] == ["active one", "while away"]
    iq = iqs[-1]
    assert iq.get("type") == "set" and iq.get("from") == ALICE and iq.get("to") == PUSH
    publish = iq.find("{http://jabber.org/protocol/pubsub}pubsub/"
                      "{http://jabber.org/protocol/pubsub}publish")
    assert publish is not None and publish.get("node") == "node-a"
    fields = summary(iq)
    assert fields["FORM_TYPE"] == "urn:xmpp:push:summary"
    assert fields["message-count"] == "1"
    assert fields["last-message-sender"] == BOB
    assert fields["last-message-body"] == "while away"
    assert summary(iq, "publish-options")["secret"] == "s3cr3t"  # as stored
    app.send(f"<iq type='result' id='{iq.get('id')}' from='{PUSH}' to='{ALICE}'/>")
    bob.close()


def test_push_for_an_offline_user_and_none_after_disable(server, ca_file, app):
    carol = login(server, ca_file, CAROL)
    assert register(carol, "node-c").get("type") == "result"
    carol.send("</stream:stream>")
    carol.wait_closed()
    bob = login(server, ca_file, BOB)
    send(bob, CAROL, "offline note", "c1")
    iq = next_publish(app)
    assert iq.get("from") == CAROL and summary(iq)["last-message-body"] == "offline note"
    carol = login(server, ca_file, CAROL)
    carol.send(f"<iq type='set' id='dis'><disable xmlns='{PUSH_NS}' jid='{PUSH}'/></iq>")
    assert read_stanza(carol, "iq", "dis").get("type") == "result"
    carol.send("</stream:stream>")
    carol.wait_closed()
    send(bob, CAROL, "no push for this", "c2")
    app.send(f"<iq type='get' id='sync2' from='{PUSH}' to='{DOMAIN}'>"
             "<ping xmlns='urn:xmpp:ping'/></iq>")
    assert "<publish" not in app.read_until(r"id='sync2'")
    bob.close()


def publishes(app: RawComponent, count: int) -> list[ET.Element]:
    """The next `count` publishes the app server receives."""
    found: list[ET.Element] = []
    text = ""
    while len(found) < count:
        text += app.read_until(r"</iq>")
        found = [e for e in ET.fromstring(f"<r xmlns='jabber:component:accept'>{text}</r>")
                 if e.tag.endswith("}iq")]
    return found


def node_of(iq: ET.Element) -> str:
    publish = iq.find(".//{http://jabber.org/protocol/pubsub}publish")
    assert publish is not None
    return publish.get("node", "")


def test_persistent_error_removes_that_registration_only(server, ca_file, app):
    dave = login(server, ca_file, DAVE)
    assert register(dave, "node-d", form="").get("type") == "result"
    assert register(dave, "node-e", form="", stanza_id="en2").get("type") == "result"
    dave.send("</stream:stream>")
    dave.wait_closed()
    bob = login(server, ca_file, BOB)
    send(bob, DAVE, "first", "d1")
    first = {node_of(iq): iq for iq in publishes(app, 2)}
    assert set(first) == {"node-d", "node-e"}
    assert first["node-d"].find(".//{http://jabber.org/protocol/pubsub}publish-options") is None
    # A temporary error keeps the registration, a persistent one removes it.
    failing = first["node-d"].get("id")
    mark = server.log.mark()
    app.send(f"<iq type='error' id='{failing}' from='{PUSH}' to='{DAVE}'>"
             "<error type='wait'><resource-constraint "
             "xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/></error></iq>")
    # The app server's stanzas are handled in order: once its ping is
    # answered, the error before it has been.
    app.send(f"<iq type='get' id='after-wait' from='{PUSH}' to='{DOMAIN}'>"
             "<ping xmlns='urn:xmpp:ping'/></iq>")
    app.read_until(r"id='after-wait'")
    send(bob, DAVE, "between", "d-wait")
    assert {node_of(iq) for iq in publishes(app, 2)} == {"node-d", "node-e"}
    app.send(f"<iq type='error' id='{failing}' from='{PUSH}' to='{DAVE}'>"
             "<error type='cancel'><item-not-found "
             "xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/></error></iq>")
    server.wait_for_log(rf"registration {PUSH} of {DAVE} removed", since=mark)
    send(bob, DAVE, "second", "d2")
    (only,) = publishes(app, 1)
    assert node_of(only) == "node-e"
    app.send(f"<iq type='get' id='sync3' from='{PUSH}' to='{DOMAIN}'>"
             "<ping xmlns='urn:xmpp:ping'/></iq>")
    assert "<publish" not in app.read_until(r"id='sync3'")
    bob.close()


@pytest.mark.parametrize("payload", [
    f"<enable xmlns='{PUSH_NS}' node='n'/>",
    f"<enable xmlns='{PUSH_NS}' jid='{PUSH}'/>",
    f"<enable xmlns='{PUSH_NS}' jid='@@bad' node='n'/>",
    f"<disable xmlns='{PUSH_NS}'/>",
    f"<frobnicate xmlns='{PUSH_NS}' jid='{PUSH}' node='n'/>",
])
def test_bad_requests_are_refused(server, ca_file, payload):
    alice = login(server, ca_file, ALICE)
    alice.send(f"<iq type='set' id='bad'>{payload}</iq>")
    assert stanza_error_of(read_stanza(alice, "iq", "bad"))[1] == "bad-request"
    alice.close()


def test_oversized_form_and_too_many_registrations_are_refused(server, ca_file):
    alice = login(server, ca_file, ALICE)
    big = ("<x xmlns='jabber:x:data' type='submit'><field var='secret'><value>"
           + "x" * 5000 + "</value></field></x>")
    assert stanza_error_of(register(alice, "big", big, "big"))[1] == "not-acceptable"
    for n in range(10):
        register(alice, f"many-{n}", "", f"m{n}")
    assert stanza_error_of(register(alice, "one-too-many", "", "m10"))[1] == \
        "resource-constraint"
    alice.send(f"<iq type='set' id='clr'><disable xmlns='{PUSH_NS}' jid='{PUSH}'/></iq>")
    assert read_stanza(alice, "iq", "clr").get("type") == "result"
    alice.close()


def test_component_port_is_known(server):
    assert component_port(server) > 0


def test_push_when_the_client_is_inactive(server, ca_file, app):
    alice, bob = login(server, ca_file, ALICE), login(server, ca_file, BOB)
    alice.send("<presence/>")
    alice.send(f"<iq type='set' id='clr'><disable xmlns='{PUSH_NS}' jid='{PUSH}'/></iq>")
    assert read_stanza(alice, "iq", "clr").get("type") == "result"
    assert register(alice, "node-i", "", "eni").get("type") == "result"
    alice.send("<inactive xmlns='urn:xmpp:csi:0'/>")
    # The inactive state is set once the server answered a later stanza.
    alice.send(f"<iq type='get' id='s' to='{DOMAIN}'><ping xmlns='urn:xmpp:ping'/></iq>")
    alice.read_until(r"id='s'")
    send(bob, alice.jid, "in the background", "i1")  # type: ignore[attr-defined]
    alice.read_until("in the background")  # delivered (a body), and pushed
    iq = next_publish(app)
    assert summary(iq)["last-message-body"] == "in the background"
    alice.send(f"<iq type='set' id='dis'><disable xmlns='{PUSH_NS}' jid='{PUSH}' "
               "node='node-i'/></iq>")
    assert read_stanza(alice, "iq", "dis").get("type") == "result"
    alice.close()
    bob.close()


# -- defaults: privacy and rate ---------------------------------------------------------

# The interval of the rate test: long enough for two messages sent back to
# back to fall inside it on a loaded machine.
INTERVAL = 3


@pytest.fixture(scope="module")
def default_server(tmp_path_factory: pytest.TempPathFactory,
                   cert_files: tuple[Path, Path]) -> Iterator[MlinkProcess]:
    setup = tmp_path_factory.mktemp("push-defaults") / "s"
    with start_mlink(setup, DOMAIN, cert_files, users=USERS, shards=1,
                     edit_config=lambda t: configure(
                         t, f"<min-interval>{INTERVAL}</min-interval>")) as proc:
        yield proc


def test_defaults_leave_out_sender_and_body_and_group_a_burst(default_server, ca_file):
    app = connect(default_server)
    carol = login(default_server, ca_file, CAROL)
    assert register(carol, "node-r", "").get("type") == "result"
    carol.send("</stream:stream>")
    carol.wait_closed()
    bob = login(default_server, ca_file, BOB)
    send(bob, CAROL, "one", "r1")
    first = next_publish(app)
    assert summary(first) == {"FORM_TYPE": "urn:xmpp:push:summary", "message-count": "1"}
    # Two more at once: one push, at the end of the interval, counting both.
    send(bob, CAROL, "two", "r2")
    send(bob, CAROL, "three", "r3")
    text = app.read_until(r"</iq>", timeout=INTERVAL + 10)
    assert text.count("<iq") == 1, text
    second = ET.fromstring(f"<r xmlns='jabber:component:accept'>{text}</r>")[0]
    assert summary(second)["message-count"] == "2"
    assert "two" not in text and "three" not in text and BOB not in text, text
    bob.close()
    app.close()


# -- two shards ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sharded(tmp_path_factory: pytest.TempPathFactory,
            cert_files: tuple[Path, Path]) -> Iterator[MlinkProcess]:
    setup = tmp_path_factory.mktemp("push-shards") / "s"
    (port,) = free_ports(1)

    def edit(text: str) -> str:
        return configure(text).replace('<components port="0">', f'<components port="{port}">')

    with start_mlink(setup, DOMAIN, cert_files, users=USERS, shards=2, edit_config=edit) as proc:
        yield proc


def test_two_shards_push_from_the_shard_holding_the_detached_session(sharded, ca_file):
    """alice's held session is on one shard, bob writes from the other: the
    shard that holds the session pushes, whichever shard the app server is on."""
    app = connect(sharded)
    place = Placement(sharded.log, sharded.c2s_port, ca_file, USERS)
    try:
        alice = place.login_on(0, ALICE)
        alice.send("<presence/>")
        enable(alice)
        assert register(alice, "node-s").get("type") == "result"
        mark = sharded.log.mark()
        alice.sock.close()
        sharded.wait_for_log(rf"shard-0 .*session {re.escape(alice.jid)} held",  # type: ignore[attr-defined]
                             since=mark)
        bob = place.login_on(1, BOB)
        send(bob, alice.jid, "across shards", "s1")  # type: ignore[attr-defined]
        text = app.read_until("across shards")
        assert f"to='{PUSH}'" in text and f"from='{ALICE}'" in text, text
        # The log line may reach the test's log reader after the stanza
        # reached the app server: waited for, not looked up once.
        sharded.wait_for_log(rf"shard-0 .*push to {re.escape(PUSH)} for {re.escape(ALICE)}",
                             since=mark)
    finally:
        app.close()
        place.close_all()


# -- in process: what reaches the push module, and what it costs ---------------------


class Spy:
    """The server's routing and background tasks, observed: the publishes
    the push module sends (no app server is connected, so they are only
    counted here) and the push tasks it starts, with an event per end."""

    def __init__(self, server: Server) -> None:
        self.publishes: list[ET.Element] = []
        self.tasks = 0
        self.tasks_done = 0
        self.changed = trio.Event()
        route, spawn = server.router.route, server.spawn_background

        async def spied_route(stanza: ET.Element, rerouted: bool = False) -> None:
            if stanza.get("to") == PUSH and stanza.find(".//{urn:xmpp:push:0}notification") \
                    is not None:
                self.publishes.append(stanza)
                self.poke()
                return
            await route(stanza, rerouted)

        def spied_spawn(name: str, task: Callable[[], Awaitable[None]]) -> None:
            if name != "push":
                spawn(name, task)
                return
            self.tasks += 1

            async def counted() -> None:
                try:
                    await task()
                finally:
                    self.tasks_done += 1
                    self.poke()

            spawn(name, counted)

        server.router.route = spied_route  # type: ignore[method-assign]
        server.spawn_background = spied_spawn  # type: ignore[method-assign]

    def poke(self) -> None:
        self.changed.set()
        self.changed = trio.Event()

    async def until(self, check: Callable[[], bool]) -> None:
        with trio.fail_after(10):
            while not check():
                await self.changed.wait()

    def bodies(self) -> list[str]:
        return [summary(iq).get("last-message-body", "") for iq in self.publishes]


@pytest.fixture
def in_process(tmp_path: Path, cert_files: tuple[Path, Path]) -> Server:
    cert, key = cert_files
    setup = tmp_path / "s"
    mlink("init", str(setup), "--domain", DOMAIN, "--c2s-port", "0", "--tls-port", "0",
          "--ws-port", "0", "--tls-cert", str(cert), "--tls-key", str(key))
    config = setup / "mlink.xml"
    config.write_text(configure(config.read_text()))
    listing = setup / "users.txt"
    listing.write_text("".join(f"{jid} {pw}\n" for jid, pw in USERS.items()))
    mlink("user", "import", str(listing), "--config", str(config))
    return Server(load_config(config))


def chat(to: str, body: str) -> ET.Element:
    return ET.fromstring(f"<message xmlns='jabber:client' from='{BOB}/phone' to='{to}' "
                         f"type='chat'><body>{body}</body></message>")


async def enable_push(server: Server, user: str, node: str) -> None:
    await server.router.route(ET.fromstring(
        f"<iq xmlns='jabber:client' type='set' id='en' from='{user}/phone' to='{user}'>"
        f"<enable xmlns='{PUSH_NS}' jid='{PUSH}' node='{node}'/></iq>"))


async def test_a_message_routed_again_is_pushed_unless_wakeups_reported_it(in_process):
    """A message never written to a session without stream management (or
    sent to a full JID whose session ended meanwhile) is routed again to
    offline storage: the phone must be woken for it. One that waited in a
    held session was pushed then, and is not pushed twice."""
    server = in_process
    spy = Spy(server)
    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve)
        await enable_push(server, CAROL, "node-x")
        await server.router.reroute(chat(f"{CAROL}/gone", "never written"))
        await spy.until(lambda: len(spy.publishes) == 1)
        assert spy.bodies() == ["never written"]
        held = chat(f"{CAROL}/held", "held then dropped")
        server.shared_service("wakeups", Wakeups).notify(JID("carol", DOMAIN, "held"), held,
                                                         DETACHED)
        await spy.until(lambda: len(spy.publishes) == 2)
        await server.router.reroute(held)  # its held session ended: offline, no new push
        await server.router.route(chat(CAROL, "after"))
        await spy.until(lambda: len(spy.publishes) == 3)
        assert spy.bodies() == ["never written", "held then dropped", "after"]
        nursery.cancel_scope.cancel()


async def test_users_without_registrations_cost_no_task_once_known(in_process):
    server = in_process
    spy = Spy(server)
    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve)
        await server.router.route(chat(DAVE, "first"))
        await spy.until(lambda: spy.tasks_done == 1)  # read the store: none
        for n in range(5):
            await server.router.route(chat(DAVE, f"more {n}"))
        await server.router.reroute(chat(f"{DAVE}/gone", "again"))
        assert spy.tasks == 1 and spy.publishes == []
        # A registration makes the next message pushed (the cache is dropped).
        await enable_push(server, DAVE, "node-y")
        await server.router.route(chat(DAVE, "now pushed"))
        await spy.until(lambda: len(spy.publishes) == 1)
        assert spy.bodies() == ["now pushed"] and spy.tasks == 2
        await server.router.route(ET.fromstring(
            f"<iq xmlns='jabber:client' type='set' id='dis' from='{DAVE}/phone' to='{DAVE}'>"
            f"<disable xmlns='{PUSH_NS}' jid='{PUSH}'/></iq>"))
        await server.router.route(chat(DAVE, "not pushed"))
        await spy.until(lambda: spy.tasks_done == spy.tasks == 3)
        assert spy.bodies() == ["now pushed"]
        nursery.cancel_scope.cancel()


def test_requests_with_a_push_like_id_are_answered(server, ca_file):
    """Only results and errors with our ids are the app server's answers: a
    get or set to the account whose id merely starts the same way is served."""
    alice, bob = login(server, ca_file, ALICE), login(server, ca_file, BOB)
    bob.send(f"<iq type='get' id='push~abc' to='{ALICE}'>"
             "<query xmlns='http://jabber.org/protocol/disco#info'/></iq>")
    # Answered as any disco#info from a stranger is (no reply at all before).
    assert read_stanza(bob, "iq", "push~abc").get("type") in ("result", "error")
    alice.send(f"<iq type='get' id='push~own' to='{ALICE}'>"
               "<query xmlns='http://jabber.org/protocol/disco#info'/></iq>")
    assert read_stanza(alice, "iq", "push~own").get("type") == "result"
    bob.send(f"<iq type='set' id='push~def' to='{ALICE}'><frob xmlns='urn:example'/></iq>")
    assert stanza_error_of(read_stanza(bob, "iq", "push~def"))[1] == "service-unavailable"
    alice.close()
    bob.close()
