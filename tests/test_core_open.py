"""The core is open (issue 11): a module from outside mlink/ — configured by
import path — adds a replicated per-session field, a stream feature, a SASL
mechanism and its credential source, without any edit under mlink/; a
module's crash costs one stanza; one task's wait holds back no other
task's cross-shard traffic. Run on two shards, parties placed on chosen
shards, asserting what clients receive."""

from __future__ import annotations

import base64
import time
import uuid
from collections.abc import Iterator

import pytest

from tests.placement import TIMEOUT, Placement
from tests.rawclient import RawClient, ping, read_stanza, read_stanza_text, stanza_error_of
from tests.serverproc import DOMAIN, mlink, start_mlink

PROBE_NS = "urn:mlink:test:probe"
SASL_NS = "urn:ietf:params:xml:ns:xmpp-sasl"
# Replication of a session field is asynchronous: poll for it, this often.
REPLICATION_POLLS = 50
USERS = {"alice": "alice-pw", "bob": "bob-pw", "carol": "carol-pw"}


def with_probe_module(text: str) -> str:
    return text.replace(
        "</mlink>",
        "  <modules><module name='tests.modules_for_tests.probe'/></modules>\n</mlink>")


class Shards(Placement):
    def login_on(self, shard: int, user: str) -> RawClient:  # type: ignore[override]
        return super().login_on(shard, f"{user}@{DOMAIN}")


@pytest.fixture(scope="module")
def server(tmp_path_factory, cert_files, ca_file) -> Iterator[Shards]:
    setup = tmp_path_factory.mktemp("open") / "s"
    users = {f"{user}@{DOMAIN}": pw for user, pw in USERS.items()}
    with start_mlink(setup, DOMAIN, cert_files, users=users, shards=2,
                     edit_config=with_probe_module) as proc:
        yield Shards(proc.log, proc.c2s_port, ca_file, users, proc.config)


@pytest.fixture
def shards(server: Shards) -> Iterator[Shards]:
    yield server
    server.close_all()


def test_a_module_field_replicates_to_the_other_shard(shards):
    alice = shards.login_on(0, "alice")
    carol = shards.login_on(1, "carol")
    alice.send(f"<iq type='set' id='t1'><tag xmlns='{PROBE_NS}' value='blue'/></iq>")
    assert read_stanza(alice, "iq", "t1").get("type") == "result"
    # Carol's shard holds a replica of alice's session: it sees the field.
    for attempt in range(REPLICATION_POLLS):
        carol.send(f"<iq type='get' id='p{attempt}'><peek xmlns='{PROBE_NS}' "
                   f"jid='{alice.jid}'/></iq>")
        _, text = read_stanza_text(carol, "iq", f"p{attempt}")
        if "value='blue'" in text:
            break
    else:
        raise AssertionError(f"alice's field never reached shard 1: {text}")


def test_a_module_stream_feature_and_sasl_mechanism(shards):
    client = RawClient(shards.port, shards.ca_file)
    shards.clients.append(client)
    features = client.starttls(DOMAIN)
    assert "<mechanism>X-MLINK-TOKEN</mechanism>" in features
    token = base64.b64encode(b"alice\0token-for-wrong").decode()
    client.send(f"<auth xmlns='{SASL_NS}' mechanism='X-MLINK-TOKEN'>{token}</auth>")
    assert "<not-authorized/>" in client.read_until("</failure>")
    token = base64.b64encode(b"alice\0token-for-alice").decode()
    client.send(f"<auth xmlns='{SASL_NS}' mechanism='X-MLINK-TOKEN'>{token}</auth>")
    assert "<success" in client.read_until("<success")
    features = client.open(DOMAIN)
    assert f"<probe xmlns='{PROBE_NS}'" in features and "urn:ietf:params:xml:ns:xmpp-bind" in features


def test_a_crashing_handler_costs_one_stanza_not_the_stream(shards):
    alice = shards.login_on(0, "alice")
    alice.send(f"<iq type='set' id='c1'><crash xmlns='{PROBE_NS}'/></iq>")
    reply = read_stanza(alice, "iq", "c1")
    assert reply.get("type") == "error"
    assert stanza_error_of(reply)[1] == "internal-server-error"
    assert ping(alice, DOMAIN).get("type") == "result"  # the stream goes on


def test_a_waiting_handler_holds_back_no_other_cross_shard_message(shards):
    """Issue 11: batching belonged to the process, so a handler awaiting
    (here: until released) kept every other task's stanzas for other shards
    in the pending batch."""
    alice = shards.login_on(0, "alice")
    bob = shards.login_on(0, "bob")
    carol = shards.login_on(1, "carol")
    mark = shards.log.mark()
    alice.send(f"<iq type='set' id='h1'><hold xmlns='{PROBE_NS}'/></iq>")
    shards.log.wait_for(r"holding h1", TIMEOUT, mark)
    token = uuid.uuid4().hex
    bob.send(f"<message to='{carol.jid}' type='chat'><body>{token}</body></message>")
    assert token in carol.read_until(token)
    bob.send(f"<iq type='set' id='r1'><release xmlns='{PROBE_NS}'/></iq>")
    assert read_stanza(bob, "iq", "r1").get("type") == "result"
    assert read_stanza(alice, "iq", "h1").get("type") == "result"


def test_a_blocked_loop_is_logged_with_its_cause_and_counted(shards):
    """Issue 12: a stall over 100 ms is counted for the shard in `mlink
    status`, with what caused it, and logged (at most once per interval)."""
    alice = shards.login_on(0, "alice")
    alice.send(f"<iq type='set' id='b1'><block xmlns='{PROBE_NS}' seconds='1.5'/></iq>")
    assert read_stanza(alice, "iq", "b1").get("type") == "result"
    deadline = time.monotonic() + TIMEOUT
    while True:  # the stall is recorded at the loop's next heartbeat
        status = mlink("status", "--config", str(shards.config)).stdout
        row = next(line for line in status.splitlines() if line.split()[:1] == ["0"])
        if row.split()[7] != "-" and int(row.split()[7]) >= 1 and "block_the_loop" in status:
            break
        assert time.monotonic() < deadline, status
    shards.log.wait_for(r"shard-0 .*event loop stalled \d+ ms", TIMEOUT)


def test_status_shows_the_bounded_caches(shards):
    shards.login_on(0, "alice")
    status = mlink("status", "--config", str(shards.config)).stdout
    caches = [line for line in status.splitlines() if "caches:" in line]
    assert len(caches) == 2, status  # one line per shard
    assert all("jids " in line and "/16384" in line for line in caches), caches
