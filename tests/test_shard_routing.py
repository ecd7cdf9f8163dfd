"""Two shards serve clients exactly as one process would (issue 4, item 5):
every test places the parties on different shard processes and asserts
what the clients receive."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.rawclient import RawClient, expect_stream_error, ping, read_stanza_text
from tests.serverproc import DOMAIN, LogReader, start_mlink

# Shards start, clients land: well within this on a loaded machine.
TIMEOUT = 30.0
# SO_REUSEPORT spreads connections by a hash: a client reaches a given shard
# within a few tries; this bounds the loop.
PLACEMENT_TRIES = 40
USERS = {"alice": "alice-pw", "bob": "bob-pw", "carol": "carol-pw"}


class Cluster:
    def __init__(self, proc: subprocess.Popen[str], log: LogReader, config: Path,
                 port: int, ca_file: Path) -> None:
        self.proc, self.log, self.config, self.port, self.ca_file = \
            proc, log, config, port, ca_file
        self.clients: list[RawClient] = []

    def login_on(self, shard: int, user: str, resource: str | None = None,
                 presence: str | None = "<presence/>") -> RawClient:
        """A session of `user` bound on shard `shard` (and available unless
        `presence` is None)."""
        resource = resource or "r-" + uuid.uuid4().hex[:8]
        for _ in range(PLACEMENT_TRIES):
            mark = self.log.mark()
            client = RawClient(self.port, self.ca_file)
            jid = client.login(DOMAIN, user, USERS[user], resource=resource)
            m = self.log.wait_for(rf"shard-(\d+) mlink\.transport\.client: \S+: bound {jid}$", TIMEOUT, mark)
            if int(m[1]) == shard:
                self.clients.append(client)
                if presence is not None:
                    client.send(presence)
                    client.read_until(rf"<presence[^>]*from='{jid}'")  # its own echo
                client.jid = jid  # type: ignore[attr-defined]
                return client
            client.send("</stream:stream>")
            client.wait_closed()
            client.close()
        raise AssertionError(f"no login of {user} landed on shard {shard}")

    def close_all(self) -> None:
        for client in self.clients:
            client.close()
        self.clients.clear()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, cert_files, ca_file) -> Iterator[Cluster]:
    setup = tmp_path_factory.mktemp("shards") / "s"
    users = {f"{user}@{DOMAIN}": pw for user, pw in USERS.items()}
    with start_mlink(setup, DOMAIN, cert_files, users=users, shards=2) as server:
        yield Cluster(server.proc, server.log, server.config, server.c2s_port, ca_file)


@pytest.fixture
def two(cluster: Cluster) -> Iterator[Cluster]:
    yield cluster
    cluster.close_all()


def test_messages_cross_shards_to_full_and_bare_jids(two):
    alice = two.login_on(0, "alice")
    bob = two.login_on(1, "bob")
    alice.send(f"<message to='bob@{DOMAIN}' type='chat'><body>to-bare</body></message>")
    assert f"from='{alice.jid}'" in bob.read_until("to-bare")
    bob.send(f"<message to='{alice.jid}' type='chat'><body>to-full</body></message>")
    assert f"from='{bob.jid}'" in alice.read_until("to-full")


def test_iq_to_a_full_jid_on_another_shard(two):
    alice = two.login_on(0, "alice")
    bob = two.login_on(1, "bob")
    alice.send(f"<iq type='get' id='x1' to='{bob.jid}'><query xmlns='jabber:iq:version'/></iq>")
    got = bob.read_until("id='x1'")
    assert "type='get'" in got and f"from='{alice.jid}'" in got
    bob.send(f"<iq type='result' id='x1' to='{alice.jid}'/>")
    assert "type='result'" in alice.read_until("id='x1'")


def test_bare_jid_routing_by_priority_across_shards(two):
    high = two.login_on(0, "bob", presence="<presence><priority>5</priority></presence>")
    low = two.login_on(1, "bob", presence="<presence><priority>1</priority></presence>")
    alice = two.login_on(1, "alice")
    token = uuid.uuid4().hex
    alice.send(f"<message to='bob@{DOMAIN}' type='chat'><body>{token}</body></message>")
    assert token in high.read_until(token)
    # Everything for `low` sent before the ping's answer has arrived by then.
    low.send(f"<iq type='get' id='sync' to='{DOMAIN}'><ping xmlns='urn:xmpp:ping'/></iq>")
    _, text = read_stanza_text(low, "iq", "sync")
    assert token not in text
    # A tie: both get it, whatever their shard.
    low.send("<presence><priority>5</priority></presence>")
    high.read_until(rf"from='{low.jid}'")  # the update reached the other shard
    token = uuid.uuid4().hex
    alice.send(f"<message to='bob@{DOMAIN}' type='chat'><body>{token}</body></message>")
    assert token in high.read_until(token)
    assert token in low.read_until(token)


def test_subscription_presence_and_unavailable_across_shards(two):
    alice = two.login_on(0, "alice")
    carol = two.login_on(1, "carol")
    for client in (alice, carol):
        client.send("<iq type='get' id='roster'><query xmlns='jabber:iq:roster'/></iq>")
        client.read_until("id='roster'")
    alice.send(f"<presence to='carol@{DOMAIN}' type='subscribe'/>")
    assert "ask='subscribe'" in alice.read_until("ask='subscribe'")  # roster push
    assert f"from='alice@{DOMAIN}'" in carol.read_until("type='subscribe'")
    carol.send(f"<presence to='alice@{DOMAIN}' type='subscribed'/>")
    assert "subscription='from'" in carol.read_until("subscription='from'")
    # The roster push, and the approver's presence, reach the new
    # subscriber on the other shard (in whichever order).
    alice.read_until(rf"(?=.*subscription='to')(?=.*<presence[^>]*from='{carol.jid}')")
    carol.send("<presence><show>away</show></presence>")
    assert "<show>away</show>" in alice.read_until("<show>away</show>")
    carol.send("</stream:stream>")
    got = alice.read_until(rf"from='{carol.jid}'[^>]*type='unavailable'|"
                           rf"type='unavailable'[^>]*from='{carol.jid}'")
    assert "unavailable" in got


def test_resource_conflict_across_shards(two):
    first = two.login_on(0, "alice", resource="same")
    second = two.login_on(1, "alice", resource="same", presence=None)
    expect_stream_error(first, "conflict")
    assert ping(second, DOMAIN).get("type") == "result"


def test_offline_storage_when_no_session_anywhere(two):
    alice = two.login_on(0, "alice")
    token = uuid.uuid4().hex
    alice.send(f"<message to='carol@{DOMAIN}' type='chat'><body>{token}</body></message>")
    ping(alice, DOMAIN)  # stored before the ping is answered
    carol = two.login_on(1, "carol", presence=None)
    carol.send("<presence/>")
    assert "urn:xmpp:delay" in carol.read_until(token)


def test_carbons_across_shards(two):
    laptop = two.login_on(0, "alice")
    phone = two.login_on(1, "alice")
    for client in (laptop, phone):
        client.send("<iq type='set' id='cb'><enable xmlns='urn:xmpp:carbons:2'/></iq>")
        client.read_until("id='cb'")
    bob = two.login_on(1, "bob")
    # Received copy: bob writes to the laptop (shard 0); the phone (shard 1)
    # gets a copy, sent from bob's shard.
    token = uuid.uuid4().hex
    bob.send(f"<message to='{laptop.jid}' type='chat'><body>{token}</body></message>")
    assert token in laptop.read_until(token)
    got = phone.read_until(token)
    assert "<received xmlns='urn:xmpp:carbons:2'>" in got and f"to='{laptop.jid}'" in got
    # Sent copy: the phone writes to bob; the laptop on shard 0 sees it.
    token = uuid.uuid4().hex
    phone.send(f"<message to='bob@{DOMAIN}' type='chat'><body>{token}</body></message>")
    assert token in bob.read_until(token)
    got = laptop.read_until(token)
    assert "<sent xmlns='urn:xmpp:carbons:2'>" in got and f"from='{phone.jid}'" in got


def test_roster_push_reaches_the_other_shard(two):
    one = two.login_on(0, "carol")
    other = two.login_on(1, "carol")
    for client in (one, other):
        client.send("<iq type='get' id='ros'><query xmlns='jabber:iq:roster'/></iq>")
        client.read_until("id='ros'")
    name = uuid.uuid4().hex[:8]
    one.send(f"<iq type='set' id='set1'><query xmlns='jabber:iq:roster'>"
             f"<item jid='dave@{DOMAIN}' name='{name}'/></query></iq>")
    one.read_until("id='set1'")
    pushed = other.read_until(name)
    assert "type='set'" in pushed and f"jid='dave@{DOMAIN}'" in pushed


def test_acknowledged_message_survives_a_shard_kill(two):
    """A message the server stored (its sender's next ping is answered after
    the commit) is delivered after the storing shard was SIGKILLed."""
    alice = two.login_on(1, "alice")
    token = uuid.uuid4().hex
    alice.send(f"<message to='carol@{DOMAIN}' type='chat'><body>{token}</body></message>")
    ping(alice, DOMAIN)
    pid = _shard_pid(two, 1)
    mark = two.log.mark()
    os.kill(pid, signal.SIGKILL)
    two.log.wait_for(r"shard 1 ready", TIMEOUT, mark)
    carol = two.login_on(0, "carol", presence=None)
    carol.send("<presence/>")
    assert "urn:xmpp:delay" in carol.read_until(token)


def _shard_pid(two: Cluster, shard: int) -> int:
    """The current pid of a shard (the latest 'ready' line names it)."""
    pids = [int(m) for m in
            re.findall(rf"shard {shard} ready \(pid (\d+)\)", two.log.text())]
    assert pids, two.log.text()
    return pids[-1]


def test_dead_shard_sessions_go_unavailable_and_can_log_in_again(two):
    """Runs last in this module: it kills a shard (the supervisor restarts it)."""
    alice = two.login_on(0, "alice")
    bob = two.login_on(1, "bob")
    # alice subscribes to bob, bob approves: bob's presence now reaches her.
    alice.send(f"<presence to='bob@{DOMAIN}' type='subscribe'/>")
    bob.read_until(f"from='alice@{DOMAIN}'[^>]*type='subscribe'|type='subscribe'[^>]*"
                   f"from='alice@{DOMAIN}'")
    bob.send(f"<presence to='alice@{DOMAIN}' type='subscribed'/>")
    alice.read_until(rf"<presence[^>]*from='{bob.jid}'")
    pid = _shard_pid(two, 1)
    mark = two.log.mark()
    os.kill(pid, signal.SIGKILL)
    try:
        got = alice.read_until(rf"type='unavailable'[^>]*from='{bob.jid}'|"
                               rf"from='{bob.jid}'[^>]*type='unavailable'", TIMEOUT)
    except AssertionError as exc:
        problems = [ln for ln in two.log.text().splitlines()
                    if "bound" not in ln and "authenticated" not in ln]
        raise AssertionError(f"{exc}\nserver log:\n" + "\n".join(problems[-60:])) from None
    assert "unavailable" in got
    two.log.wait_for(r"shard 1 ready", TIMEOUT, mark)
    again = two.login_on(1, "bob", resource=bob.jid.split("/")[1])
    assert ping(again, DOMAIN).get("type") == "result"


def test_stanza_bytes_are_the_same_across_shards_as_on_one(two):
    """A stanza that crosses the bus is written from the frame's bytes with
    its `to` spliced in (issue 14): byte for byte what a session on the
    sender's own shard receives, for namespaced children, prefixed
    attributes, escaped text and attribute values."""
    alice = two.login_on(0, "alice")
    local = two.login_on(0, "bob")
    remote = two.login_on(1, "bob")
    token = uuid.uuid4().hex
    payload = (
        "<body>1 &lt; 2 &amp; 3 &gt; 2 \"q\" 'a' &#x1F600; \u00e9</body>"
        "<x xmlns='urn:x' xmlns:p='urn:p' p:attr='v&gt;&lt;&quot;&apos;'><p:y>t</p:y>"
        "<z xmlns=''/>tail</x><thread>" + token + "</thread>")
    for target in (local, remote):
        alice.send(f"<message to='{target.jid}' type='chat' id='m&amp;1'>{payload}</message>")
    message = re.compile(r"<message\b(?:(?!<message\b).)*?" + token + "</thread>.*?</message>",
                         re.S)
    # The whole message, and nothing read with it (a presence may come in
    # the same read).
    got_local = message.search(local.read_until(message.pattern)).group(0)  # type: ignore[union-attr]
    got_remote = message.search(remote.read_until(message.pattern)).group(0)  # type: ignore[union-attr]
    # Each copy has its recipient's own archive id (XEP-0359): left out.
    stanza_id = re.compile(r"<stanza-id xmlns='urn:xmpp:sid:0'[^>]*/>")
    local_bytes = stanza_id.sub("", got_local)
    remote_bytes = stanza_id.sub("", got_remote)
    # Only the place of `to` among the attributes may differ (the bus
    # carries it beside the stanza and splices it in last).
    assert f" to='{local.jid}'" in local_bytes and f" to='{remote.jid}'" in remote_bytes
    assert remote_bytes.replace(f" to='{remote.jid}'", "") == \
        local_bytes.replace(f" to='{local.jid}'", "")
    assert "='v&gt;&lt;&quot;&apos;'" in remote_bytes
