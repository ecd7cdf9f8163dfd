"""The base IM services over real sockets: service discovery and entity
capabilities (XEP-0030, XEP-0115), software version (XEP-0092), last
activity (XEP-0012) and private XML storage (XEP-0049).

Also home of the helpers the other `test_im_*` files share: a client that
keeps every stanza it reads, and a server with six accounts."""

from __future__ import annotations

import base64
import hashlib
import re
import time
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import trio

from mlink.config import load_config
from mlink.store import DEFAULT_FILENAME, RosterItem, Store
from tests.rawclient import (
    CLIENT_NS,
    READ_TIMEOUT,
    RawClient,
    resource,
    stanza_error_of,
)
from tests.serverproc import DOMAIN, MlinkProcess, start_mlink

USERS = {
    "alice@localhost": "alice-secret",
    "bob@localhost": "bob-secret",
    "carol@localhost": "carol-secret",
    "dave@localhost": "dave-secret",
    "erin@localhost": "erin-secret",
    "frank@localhost": "frank-secret",
}
ALICE, BOB, CAROL, DAVE, ERIN, FRANK = USERS
DISCO_INFO = "http://jabber.org/protocol/disco#info"
DISCO_ITEMS = "http://jabber.org/protocol/disco#items"
STREAM_NS = "http://etherx.jabber.org/streams"


# -- shared helpers ---------------------------------------------------------------


class Client:
    """A logged-in RawClient that parses what arrives into stanzas and keeps
    those a test has not asked for yet, so replies that arrive together
    (a result and a push) are all seen."""

    def __init__(self, server: MlinkProcess, ca_file: Path, user: str,
                 res: str | None = None) -> None:
        self.raw = RawClient(server.c2s_port, ca_file)
        self.jid = self.raw.login(DOMAIN, user, USERS[user], resource=res or resource())
        self.bare = user
        self.pending: list[ET.Element] = []
        self._parser = ET.XMLPullParser(events=("start", "end"))
        self._parser.feed(f"<root xmlns='{CLIENT_NS}' xmlns:stream='{STREAM_NS}'>")
        self._depth = 0

    def send(self, data: str) -> None:
        self.raw.send(data)

    def _pump(self, timeout: float) -> None:
        text = self.raw.read_until(r".", timeout)
        if not text:
            raise AssertionError(f"{self.jid}: connection closed")
        self._parser.feed(text)
        for kind, elem in self._parser.read_events():
            if kind == "start":
                self._depth += 1
            else:
                self._depth -= 1
                if self._depth == 1:
                    self.pending.append(elem)

    def expect(self, match: Callable[[ET.Element], bool], what: str = "stanza",
               timeout: float = READ_TIMEOUT) -> ET.Element:
        """The first stanza (received so far or later) that `match`es."""
        deadline = time.monotonic() + timeout
        while True:
            for i, stanza in enumerate(self.pending):
                if match(stanza):
                    return self.pending.pop(i)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                got = [ET.tostring(s).decode() for s in self.pending]
                raise AssertionError(f"{self.jid}: no {what} arrived; got {got}")
            self._pump(remaining)

    def reply(self, stanza_id: str) -> ET.Element:
        return self.expect(lambda s: s.get("id") == stanza_id, f"reply {stanza_id}")

    def iq(self, kind: str, payload: str, to: str | None = None) -> ET.Element:
        """Send an iq and return its reply."""
        stanza_id = "iq-" + uuid.uuid4().hex[:10]
        to_attr = f" to='{to}'" if to else ""
        self.send(f"<iq type='{kind}' id='{stanza_id}'{to_attr}>{payload}</iq>")
        return self.reply(stanza_id)

    def sync(self) -> list[ET.Element]:
        """Ping the server and wait for the answer; returns (and forgets)
        every other stanza that arrived first. The server handles a
        client's stanzas in order, so whatever an earlier stanza caused
        to be queued for this client has arrived by then."""
        result = self.iq("get", "<ping xmlns='urn:xmpp:ping'/>", DOMAIN)
        assert result.get("type") == "result", ET.tostring(result)
        before, self.pending = self.pending, []
        return before

    def message(self, to: str, body: str, kind: str = "chat", extra: str = "") -> str:
        stanza_id = "m-" + uuid.uuid4().hex[:10]
        self.send(f"<message to='{to}' type='{kind}' id='{stanza_id}'>"
                  f"<body>{body}</body>{extra}</message>")
        return stanza_id

    def close(self) -> None:
        self.send("</stream:stream>")
        self.raw.wait_closed()
        self.raw.close()


def body_of(stanza: ET.Element) -> str | None:
    return stanza.findtext(f"{{{CLIENT_NS}}}body")


def is_message_with(body: str) -> Callable[[ET.Element], bool]:
    return lambda s: s.tag == f"{{{CLIENT_NS}}}message" and body_of(s) == body


def store_path(server: MlinkProcess) -> Path:
    return load_config(server.config).data_dir / DEFAULT_FILENAME


def put_roster_item(server: MlinkProcess, user: str, item: RosterItem) -> None:
    """Write a roster item straight into the server's store (which several
    processes may share), as a subscription handshake would leave it."""

    async def run() -> None:
        async with await Store.open(store_path(server)) as store:
            await store.roster_put(user, item)

    trio.run(run)


@pytest.fixture(scope="module")
def im_server(tmp_path_factory: pytest.TempPathFactory,
              cert_files: tuple[Path, Path]) -> Iterator[MlinkProcess]:
    setup = tmp_path_factory.mktemp("mlink-im")
    with start_mlink(setup, DOMAIN, cert_files, users=USERS) as server:
        yield server


@pytest.fixture
def clients(im_server: MlinkProcess, ca_file: Path) -> Iterator[Callable[..., Client]]:
    """`clients(user)` logs in; every client is closed after the test."""
    made: list[Client] = []

    def make(user: str, res: str | None = None) -> Client:
        client = Client(im_server, ca_file, user, res)
        made.append(client)
        return client

    yield make
    for client in made:
        client.raw.close()


# -- disco and caps ---------------------------------------------------------------


def features_of(query: ET.Element) -> list[str]:
    return [f.get("var", "") for f in query.findall(f"{{{DISCO_INFO}}}feature")]


def identities_of(query: ET.Element) -> list[tuple[str, str, str]]:
    return [(i.get("category", ""), i.get("type", ""), i.get("name", ""))
            for i in query.findall(f"{{{DISCO_INFO}}}identity")]


def caps_hash(query: ET.Element) -> str:
    """XEP-0115 §5.1, computed independently of the server's code."""
    s = "".join(f"{c}/{t}//{n}<" for c, t, n in sorted(identities_of(query)))
    s += "".join(f"{v}<" for v in sorted(features_of(query)))
    return base64.b64encode(hashlib.sha1(s.encode()).digest()).decode()


def test_server_disco_info_lists_identity_and_features(clients):
    alice = clients(ALICE)
    reply = alice.iq("get", f"<query xmlns='{DISCO_INFO}'/>", DOMAIN)
    assert reply.get("type") == "result", ET.tostring(reply)
    query = reply.find(f"{{{DISCO_INFO}}}query")
    assert query is not None
    assert identities_of(query) == [("server", "im", "mlink")]
    features = features_of(query)
    assert features == sorted(features)
    for var in (DISCO_INFO, DISCO_ITEMS, "msgoffline", "urn:xmpp:blocking", "urn:xmpp:carbons:2",
                "jabber:iq:version", "jabber:iq:last", "jabber:iq:private", "urn:xmpp:ping"):
        assert var in features, features


def test_server_disco_items_list_the_chat_service(clients):
    alice = clients(ALICE)
    reply = alice.iq("get", f"<query xmlns='{DISCO_ITEMS}'/>", DOMAIN)
    assert reply.get("type") == "result", ET.tostring(reply)
    query = reply.find(f"{{{DISCO_ITEMS}}}query")
    assert query is not None
    assert [i.get("jid") for i in query] == [f"conference.{DOMAIN}"]


def test_caps_in_stream_features_match_disco(im_server, ca_file, clients):
    raw = RawClient(im_server.c2s_port, ca_file)
    try:
        features = raw.starttls(DOMAIN)
    finally:
        raw.close()
    match = re.search(r"<c xmlns='http://jabber.org/protocol/caps' hash='sha-1' "
                      r"node='([^']+)' ver='([^']+)'/>", features)
    assert match, features
    node, ver = match.groups()
    alice = clients(ALICE)
    plain = alice.iq("get", f"<query xmlns='{DISCO_INFO}'/>", DOMAIN)
    query = plain.find(f"{{{DISCO_INFO}}}query")
    assert query is not None and caps_hash(query) == ver
    # XEP-0115 §6.2: the node#ver query answers the same, naming the node.
    reply = alice.iq("get", f"<query xmlns='{DISCO_INFO}' node='{node}#{ver}'/>", DOMAIN)
    assert reply.get("type") == "result", ET.tostring(reply)
    answer = reply.find(f"{{{DISCO_INFO}}}query")
    assert answer is not None and answer.get("node") == f"{node}#{ver}"
    assert caps_hash(answer) == ver
    wrong = alice.iq("get", f"<query xmlns='{DISCO_INFO}' node='{node}#bogus'/>", DOMAIN)
    assert stanza_error_of(wrong) == ("cancel", "item-not-found")


def test_account_disco_for_owner_and_strangers(im_server, clients):
    alice, carol = clients(ALICE), clients(CAROL)
    own = alice.iq("get", f"<query xmlns='{DISCO_INFO}'/>")
    assert own.get("type") == "result", ET.tostring(own)
    query = own.find(f"{{{DISCO_INFO}}}query")
    assert query is not None
    # XEP-0163 §4: accounts are PEP services too.
    assert identities_of(query) == [("account", "registered", ""), ("pubsub", "pep", "")]
    features = features_of(query)
    assert "jabber:iq:private" in features and "msgoffline" not in features
    assert "http://jabber.org/protocol/pubsub#publish" in features
    # Someone not allowed to see frank's presence learns nothing. (Frank
    # stays offline: the roster is then read from the store, where this
    # test puts his roster item.)
    stranger = carol.iq("get", f"<query xmlns='{DISCO_INFO}'/>", FRANK)
    assert stanza_error_of(stranger) == ("cancel", "service-unavailable")
    # A contact with a subscription sees the account, not its private parts.
    put_roster_item(im_server, FRANK, RosterItem(DAVE, subscription="from"))
    dave = clients(DAVE)
    contact = dave.iq("get", f"<query xmlns='{DISCO_INFO}'/>", FRANK)
    assert contact.get("type") == "result", ET.tostring(contact)
    query = contact.find(f"{{{DISCO_INFO}}}query")
    assert query is not None
    assert identities_of(query) == [("account", "registered", ""), ("pubsub", "pep", "")]
    assert "jabber:iq:private" not in features_of(query)
    items = dave.iq("get", f"<query xmlns='{DISCO_ITEMS}'/>", FRANK)
    assert items.get("type") == "result", ET.tostring(items)


def test_disco_of_missing_account_is_service_unavailable(clients):
    alice = clients(ALICE)
    reply = alice.iq("get", f"<query xmlns='{DISCO_INFO}'/>", "nobody@localhost")
    assert stanza_error_of(reply) == ("cancel", "service-unavailable")


# -- version --------------------------------------------------------------------------


def test_software_version(clients):
    from mlink import __version__

    alice = clients(ALICE)
    reply = alice.iq("get", "<query xmlns='jabber:iq:version'/>", DOMAIN)
    assert reply.get("type") == "result", ET.tostring(reply)
    assert reply.get("from") == DOMAIN
    assert reply.findtext("{jabber:iq:version}query/{jabber:iq:version}name") == "mlink"
    assert reply.findtext("{jabber:iq:version}query/{jabber:iq:version}version") == __version__
    assert reply.find("{jabber:iq:version}query/{jabber:iq:version}os") is None


# -- last activity --------------------------------------------------------------------


def test_server_uptime(clients):
    alice = clients(ALICE)
    reply = alice.iq("get", "<query xmlns='jabber:iq:last'/>", DOMAIN)
    assert reply.get("type") == "result", ET.tostring(reply)
    query = reply.find("{jabber:iq:last}query")
    assert query is not None and int(query.get("seconds", "-1")) >= 0


def test_last_activity_needs_a_subscription(im_server, clients):
    status = "gone fishing " + uuid.uuid4().hex[:6]
    erin = clients(ERIN)
    # Erin's session ends with an unavailable presence carrying a status.
    erin.send(f"<presence type='unavailable'><status>{status}</status></presence>")
    erin.sync()
    erin.close()
    carol = clients(CAROL)
    # The session end is recorded when the server sees the close, which
    # `close` waited for; carol's query comes after it.
    denied = carol.iq("get", "<query xmlns='jabber:iq:last'/>", ERIN)
    assert stanza_error_of(denied) == ("auth", "forbidden")
    put_roster_item(im_server, ERIN, RosterItem(CAROL, subscription="both"))
    allowed = carol.iq("get", "<query xmlns='jabber:iq:last'/>", ERIN)
    assert allowed.get("type") == "result", ET.tostring(allowed)
    query = allowed.find("{jabber:iq:last}query")
    assert query is not None
    assert 0 <= int(query.get("seconds", "-1")) < 60
    assert query.text == status


def test_last_activity_query_to_a_full_jid_needs_a_subscription(clients):
    alice, carol = clients(ALICE), clients(CAROL)
    reply = carol.iq("get", "<query xmlns='jabber:iq:last'/>", alice.jid)
    assert stanza_error_of(reply) == ("auth", "forbidden")
    # Nothing reached alice.
    assert alice.sync() == []


# -- private storage -------------------------------------------------------------------


def test_private_storage_round_trip(clients):
    alice = clients(ALICE)
    ns = "storage:test:" + uuid.uuid4().hex[:8]
    empty = alice.iq("get", f"<query xmlns='jabber:iq:private'><data xmlns='{ns}'/></query>")
    assert empty.get("type") == "result", ET.tostring(empty)
    stored = empty.find(f"{{jabber:iq:private}}query/{{{ns}}}data")
    assert stored is not None and len(stored) == 0
    saved = alice.iq("set", f"<query xmlns='jabber:iq:private'><data xmlns='{ns}'>"
                     "<conference jid='room@muc' autojoin='true'>x &amp; y</conference>"
                     "</data></query>")
    assert saved.get("type") == "result", ET.tostring(saved)
    # Another session (after a fresh login) reads it back, namespace intact.
    again = clients(ALICE)
    reply = again.iq("get", f"<query xmlns='jabber:iq:private'><data xmlns='{ns}'/></query>")
    conference = reply.find(f"{{jabber:iq:private}}query/{{{ns}}}data/{{{ns}}}conference")
    assert conference is not None, ET.tostring(reply)
    assert conference.get("jid") == "room@muc" and conference.text == "x & y"


def test_private_storage_refuses_reserved_namespaces_and_other_users(clients):
    alice, bob = clients(ALICE), clients(BOB)
    reserved = alice.iq("set", "<query xmlns='jabber:iq:private'>"
                        "<query xmlns='jabber:iq:roster'/></query>")
    assert stanza_error_of(reserved) == ("modify", "not-acceptable")
    empty = alice.iq("get", "<query xmlns='jabber:iq:private'/>")
    assert stanza_error_of(empty) == ("modify", "not-acceptable")
    other = bob.iq("get", "<query xmlns='jabber:iq:private'><data xmlns='x:y'/></query>", ALICE)
    assert stanza_error_of(other) == ("auth", "forbidden")
