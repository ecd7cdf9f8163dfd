"""RFC 6121 §2 over real sockets: roster get, set, remove, pushes, versions.

Also the stanza-level client the presence tests share (`XClient`): it
parses what the server sends into stanzas and waits, bounded, for the one
a test expects, keeping the others for later assertions. Absence is
checked after a later stanza on the same path has arrived, never by
waiting for time to pass.
"""

from __future__ import annotations

import itertools
import re
import socket
import ssl
import time
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.rawclient import CLIENT_NS, READ_TIMEOUT, STANZAS_NS, RawClient, resource
from tests.serverproc import DOMAIN, MlinkProcess, mlink, start_mlink

ROSTER_NS = "jabber:iq:roster"
STREAM_HEADER = ("<stream:stream xmlns='jabber:client' "
                 "xmlns:stream='http://etherx.jabber.org/streams'>")
POOL_SIZE = 120
POOL_PASSWORD = "pool-secret"
USERS = {f"{name}@{DOMAIN}": f"{name}-secret" for name in ("alice", "bob", "carol")}

Match = Callable[[ET.Element], bool]


# -- a stanza-level client ----------------------------------------------------------------


class XClient:
    """A logged-in RawClient whose input is parsed into stanzas."""

    def __init__(self, raw: RawClient, jid: str) -> None:
        self.raw = raw
        self.jid = jid
        self.bare = jid.partition("/")[0]
        self.backlog: list[ET.Element] = []
        self._parser = ET.XMLPullParser(events=("start", "end"))
        self._parser.feed(STREAM_HEADER)
        self._depth = 0
        self.closed = False

    def send(self, data: str) -> None:
        self.raw.send(data)

    def _read_more(self, deadline: float) -> None:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError
        self.raw.sock.settimeout(remaining)
        try:
            chunk = self.raw.sock.recv(65536)
        except (ConnectionResetError, ssl.SSLError, OSError) as exc:
            if isinstance(exc, TimeoutError | socket.timeout):
                raise TimeoutError from None
            chunk = b""
        if not chunk:
            self.closed = True
            return
        self._parser.feed(chunk)
        for event, elem in self._parser.read_events():
            if event == "start":
                self._depth += 1
            else:
                self._depth -= 1
                if self._depth == 1:
                    self.backlog.append(elem)

    def expect(self, match: Match, what: str = "a stanza",
               timeout: float = READ_TIMEOUT) -> ET.Element:
        """The first stanza (received or arriving) that `match`es."""
        deadline = time.monotonic() + timeout
        while True:
            for i, stanza in enumerate(self.backlog):
                if match(stanza):
                    return self.backlog.pop(i)
            if self.closed:
                raise AssertionError(f"{self.jid}: stream closed before {what}: {self.dump()}")
            try:
                self._read_more(deadline)
            except TimeoutError:
                raise AssertionError(f"{self.jid}: timed out waiting for {what}: "
                                     f"{self.dump()}") from None

    def assert_none(self, match: Match, what: str) -> None:
        """Nothing received so far matches (call once a later stanza on the
        same path has arrived)."""
        found = [s for s in self.backlog if match(s)]
        assert not found, f"{self.jid}: unexpected {what}: {[ET.tostring(s) for s in found]}"

    def dump(self) -> list[bytes]:
        return [ET.tostring(s) for s in self.backlog]

    def iq(self, payload: str, type_: str = "get", to: str | None = None) -> ET.Element:
        """Send an iq and return its answer."""
        sid = "iq-" + uuid.uuid4().hex[:10]
        dest = f" to='{to}'" if to else ""
        self.send(f"<iq type='{type_}' id='{sid}'{dest}>{payload}</iq>")
        return self.expect(lambda s: tag(s) == "iq" and s.get("id") == sid, f"iq {sid}")

    def sync(self) -> None:
        """A round trip to the server: whatever it queued for us before
        handling this has arrived when it returns."""
        reply = self.iq("<ping xmlns='urn:xmpp:ping'/>", to=DOMAIN)
        assert reply.get("type") == "result", ET.tostring(reply)

    def roster(self, ver: str | None = None) -> ET.Element:
        attr = f" ver='{ver}'" if ver is not None else ""
        reply = self.iq(f"<query xmlns='{ROSTER_NS}'{attr}/>")
        assert reply.get("type") == "result", ET.tostring(reply)
        return reply

    def roster_set(self, item: str) -> ET.Element:
        return self.iq(f"<query xmlns='{ROSTER_NS}'>{item}</query>", "set")

    def available(self, payload: str = "") -> None:
        """Send broadcast presence and wait for its echo (RFC 6121 §4.2.2)."""
        self.send(f"<presence>{payload}</presence>")
        self.expect(is_presence(self.jid, None, to=self.jid), "own presence echo")

    def presence(self, to: str, type_: str) -> None:
        self.send(f"<presence to='{to}' type='{type_}'/>")

    def close(self) -> None:
        """End the stream properly."""
        self.send("</stream:stream>")
        self.raw.wait_closed()
        self.raw.close()

    def drop(self) -> None:
        """Vanish without closing the stream (a dead network)."""
        self.raw.sock.shutdown(socket.SHUT_RDWR)
        self.raw.close()


def tag(stanza: ET.Element) -> str:
    return stanza.tag.rpartition("}")[2]


def is_presence(sender: str, type_: str | None, to: str | None = None) -> Match:
    def match(s: ET.Element) -> bool:
        return (tag(s) == "presence" and s.get("from") == sender and s.get("type") == type_
                and (to is None or s.get("to") == to))
    return match


def is_push(contact: str) -> Match:
    def match(s: ET.Element) -> bool:
        return (tag(s) == "iq" and s.get("type") == "set"
                and s.find(f"{{{ROSTER_NS}}}query/{{{ROSTER_NS}}}item[@jid='{contact}']")
                is not None)
    return match


def push_item(client: XClient, contact: str) -> tuple[ET.Element, str]:
    """Wait for a roster push about `contact`: its item and version."""
    iq = client.expect(is_push(contact), f"roster push for {contact}")
    assert iq.get("from") in (None, client.bare), ET.tostring(iq)
    query = iq[0]
    (item,) = list(query)
    return item, query.get("ver", "")


def expect_push(client: XClient, contact: str, subscription: str, ask: bool = False,
                approved: bool = False) -> ET.Element:
    item, _ = push_item(client, contact)
    assert item.get("subscription") == subscription, ET.tostring(item)
    assert (item.get("ask") == "subscribe") == ask, ET.tostring(item)
    assert (item.get("approved") == "true") == approved, ET.tostring(item)
    return item


def error_condition(stanza: ET.Element) -> str:
    assert stanza.get("type") == "error", ET.tostring(stanza)
    error = stanza.find(f"{{{CLIENT_NS}}}error")
    assert error is not None, ET.tostring(stanza)
    names = [c.tag.rpartition("}")[2] for c in error
             if c.tag.startswith(f"{{{STANZAS_NS}}}") and not c.tag.endswith("}text")]
    assert len(names) == 1, ET.tostring(stanza)
    return names[0]


def roster_items(reply: ET.Element) -> dict[str, ET.Element]:
    query = reply.find(f"{{{ROSTER_NS}}}query")
    assert query is not None, ET.tostring(reply)
    return {item.get("jid", ""): item for item in query}


def befriend(alice: XClient, bob: XClient) -> None:
    """The whole RFC 6121 §3.1 handshake both ways, asserting each step;
    both clients are available and interested, and end up `both`."""
    a, b = alice.bare, bob.bare
    alice.presence(b, "subscribe")
    expect_push(alice, b, "none", ask=True)
    bob.expect(is_presence(a, "subscribe", to=b), "alice's request")
    bob.presence(a, "subscribed")
    expect_push(bob, a, "from")
    expect_push(alice, b, "to")
    alice.expect(is_presence(b, "subscribed", to=a), "bob's approval")
    alice.expect(is_presence(bob.jid, None), "bob's presence once approved")  # §3.1.5
    bob.presence(a, "subscribe")
    expect_push(bob, a, "from", ask=True)
    alice.expect(is_presence(b, "subscribe", to=a), "bob's request")
    alice.presence(b, "subscribed")
    expect_push(alice, b, "both")
    expect_push(bob, a, "both")
    bob.expect(is_presence(a, "subscribed", to=b), "alice's approval")
    bob.expect(is_presence(alice.jid, None), "alice's presence once approved")


# -- the server and its accounts ---------------------------------------------------------


class Accounts:
    """Hands out accounts no other test has touched, so tests that leave
    rosters behind do not disturb each other."""

    def __init__(self, server: MlinkProcess, ca_file: Path, prefix: str) -> None:
        self.server = server
        self.ca_file = ca_file
        self._names = (f"{prefix}{i:03d}@{DOMAIN}" for i in itertools.count())

    def fresh(self) -> str:
        return next(self._names)

    def login(self, user: str, res: str | None = None, roster: bool = True) -> XClient:
        """Log `user` in; with `roster`, fetch the roster (an interested
        resource, RFC 6121 §2.2)."""
        raw = RawClient(self.server.c2s_port, self.ca_file)
        password = USERS.get(user, POOL_PASSWORD)
        jid = raw.login(DOMAIN, user, password, resource=res or resource())
        client = XClient(raw, jid)
        if roster:
            client.roster()
        return client


@pytest.fixture(scope="module")
def im_server(tmp_path_factory: pytest.TempPathFactory,
              cert_files: tuple[Path, Path]) -> Iterator[MlinkProcess]:
    """alice, bob, carol, and a pool of fresh accounts (`Accounts`)."""
    setup = tmp_path_factory.mktemp("im")
    with start_mlink(setup, DOMAIN, cert_files, users=USERS) as server:
        pool = setup / "pool.txt"
        pool.write_text("".join(f"{p}{i:03d}@{DOMAIN} {POOL_PASSWORD}\n"
                                for p in ("r", "p") for i in range(POOL_SIZE)))
        mlink("user", "import", str(pool), "--config", str(server.config))
        yield server


@pytest.fixture(scope="module")
def accounts(im_server: MlinkProcess, ca_file: Path) -> Accounts:
    return Accounts(im_server, ca_file, "r")


# -- roster get and versioning (§2.2, §2.6) ------------------------------------------------


def test_roster_get_set_push_and_versions(accounts):
    user, contact = accounts.fresh(), accounts.fresh()
    client = accounts.login(user)
    reply = client.roster()
    assert roster_items(reply) == {}
    first_ver = reply[0].get("ver")
    assert first_ver == "0"

    result = client.roster_set(f"<item jid='{contact}' name='Friend'><group>Work</group>"
                               "<group>Chess</group></item>")
    assert result.get("type") == "result" and len(result) == 0, ET.tostring(result)
    item, ver = push_item(client, contact)
    assert ver and ver != first_ver
    assert item.get("name") == "Friend" and item.get("subscription") == "none"
    assert sorted(g.text or "" for g in item) == ["Chess", "Work"]

    # §2.6.3: the current version gets an empty result...
    up_to_date = client.roster(ver)
    assert len(up_to_date) == 0, ET.tostring(up_to_date)
    # ... an older one the whole roster with the current version.
    full = client.roster(first_ver)
    assert full[0].get("ver") == ver
    assert list(roster_items(full)) == [contact]

    # An update keeps the item; a remove pushes subscription='remove'.
    client.roster_set(f"<item jid='{contact}' name='Renamed'/>")
    item, ver2 = push_item(client, contact)
    assert item.get("name") == "Renamed" and len(item) == 0 and int(ver2) > int(ver)
    client.roster_set(f"<item jid='{contact}' subscription='remove'/>")
    item, ver3 = push_item(client, contact)
    assert item.get("subscription") == "remove" and int(ver3) > int(ver2)
    assert roster_items(client.roster()) == {}


def test_pushes_reach_every_interested_resource_only(accounts):
    user, contact = accounts.fresh(), accounts.fresh()
    first = accounts.login(user)
    second = accounts.login(user)
    bystander = accounts.login(user, roster=False)  # never asked for the roster
    assert first.roster_set(f"<item jid='{contact}'/>").get("type") == "result"
    assert push_item(first, contact)[1] == push_item(second, contact)[1]
    bystander.sync()
    bystander.assert_none(is_push(contact), "roster push to a resource that is not interested")


def test_roster_set_client_may_not_set_subscription_state(accounts):
    """§2.1.2: `subscription` (other than remove), `ask` and `approved` in a
    roster set are the server's; they are ignored."""
    user, contact = accounts.fresh(), accounts.fresh()
    client = accounts.login(user)
    client.roster_set(f"<item jid='{contact}' subscription='both' ask='subscribe' "
                      "approved='true'/>")
    expect_push(client, contact, "none")


def test_roster_versions_survive_relogin(accounts):
    user, contact = accounts.fresh(), accounts.fresh()
    client = accounts.login(user)
    client.roster_set(f"<item jid='{contact}'/>")
    _, ver = push_item(client, contact)
    client.close()
    again = accounts.login(user, roster=False)
    assert len(again.roster(ver)) == 0
    assert list(roster_items(again.roster("stale"))) == [contact]


@pytest.mark.parametrize(("query", "condition"), [
    ("<item jid='{c}'/><item jid='{c2}'/>", "bad-request"),
    ("", "bad-request"),
    ("<item/>", "bad-request"),
    ("<item jid='{self}'/>", "not-allowed"),
    ("<item jid='a@b@c'/>", "jid-malformed"),
    ("<item jid='{c}'><group>G</group><group>G</group></item>", "bad-request"),
    ("<item jid='{c}'><group/></item>", "not-acceptable"),
    ("<item jid='{c}'><group>" + "g" * 1024 + "</group></item>", "not-acceptable"),
    ("<item jid='{c}' name='" + "n" * 1024 + "'/>", "not-acceptable"),
    ("<item jid='{c}' subscription='remove'/>", "item-not-found"),
])
def test_roster_set_errors(accounts, query, condition):
    """§2.3.3, §2.5.3."""
    user = accounts.fresh()
    client = accounts.login(user)
    body = query.format(c=accounts.fresh(), c2=accounts.fresh(), self=user)
    reply = client.roster_set(body)
    assert error_condition(reply) == condition, ET.tostring(reply)
    # Nothing changed.
    assert roster_items(client.roster()) == {}


def test_another_accounts_roster_is_forbidden(accounts):
    user, other = accounts.fresh(), accounts.fresh()
    client = accounts.login(user)
    reply = client.iq(f"<query xmlns='{ROSTER_NS}'/>", to=other)
    assert error_condition(reply) == "forbidden"
    reply = client.iq(f"<query xmlns='{ROSTER_NS}'><item jid='{user}'/></query>", "set",
                      to=other)
    assert error_condition(reply) == "forbidden"


def test_stream_features_offer_roster_versioning_and_pre_approval(im_server, ca_file):
    raw = RawClient(im_server.c2s_port, ca_file)
    features = raw.authenticate(DOMAIN, "alice@localhost", USERS["alice@localhost"])
    assert re.search(r"<ver xmlns='urn:xmpp:features:rosterver'\s*/>", features), features
    assert re.search(r"<sub xmlns='urn:xmpp:features:pre-approval'\s*/>", features), features
    raw.close()


# -- remove cancels subscriptions (§2.5.2) ---------------------------------------------------


def test_remove_cancels_both_subscriptions(accounts):
    a, b = accounts.fresh(), accounts.fresh()
    alice, bob = accounts.login(a), accounts.login(b)
    alice.available()
    bob.available()
    befriend(alice, bob)
    alice.roster_set(f"<item jid='{b}' subscription='remove'/>")
    item, _ = push_item(alice, b)
    assert item.get("subscription") == "remove"
    # Bob loses both directions, hears both cancellations and that alice
    # is gone; alice hears that bob is gone.
    expect_push(bob, a, "to")
    expect_push(bob, a, "none")
    bob.expect(is_presence(a, "unsubscribe"), "unsubscribe")
    bob.expect(is_presence(a, "unsubscribed"), "unsubscribed")
    bob.expect(is_presence(alice.jid, "unavailable"), "alice's unavailable")
    alice.expect(is_presence(bob.jid, "unavailable"), "bob's unavailable")
    assert roster_items(alice.roster()) == {}
    assert roster_items(bob.roster())[a].get("subscription") == "none"
