"""XEP-0114 external components against a real server: the handshake (right,
wrong secret, unknown name, second connection), stanzas both ways between a
user and a raw-socket component, the server's disco#items, the checks on
what a component sends, a component that is not connected, and slixmpp's
ComponentXMPP as a real component library."""

from __future__ import annotations

import hashlib
import os
import re
import select
import signal
import ssl
import time
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

import pytest

from mlink.stream import component as xep0114
from tests.componentclient import RawComponent
from tests.placement import Placement
from tests.rawclient import (
    CLIENT_NS,
    READ_TIMEOUT,
    RawClient,
    expect_stream_error,
    read_stanza,
    read_stanza_text,
    stanza_error_of,
)
from tests.serverproc import DOMAIN, MlinkProcess, free_ports, mlink, start_mlink
from tests.test_muc_shards import RESTART_TIMEOUT, shard_pids

PUSH, SECRET = "push.localhost", "push-secret-0123456789"
IDLE = "idle.localhost"  # configured, never connected
USERS = {f"{u}@{DOMAIN}": f"{u}-pw" for u in ("alice", "bob")}
ALICE = "alice@localhost"
COMPONENTS = (f'<components port="0"><component name="{PUSH}" secret="{SECRET}"/>'
              f'<component name="{IDLE}" secret="idle-secret-0123456789"/></components>')


def with_components(text: str, components: str = COMPONENTS) -> str:
    return text.replace("</mlink>", components + "\n</mlink>")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory,
           cert_files: tuple[Path, Path]) -> Iterator[MlinkProcess]:
    setup = tmp_path_factory.mktemp("component") / "s"
    with start_mlink(setup, DOMAIN, cert_files, users=USERS, edit_config=with_components,
                     shards=1) as proc:
        yield proc


def component_port(server: MlinkProcess) -> int:
    return int(server.wait_for_log(r"listening for components \(XEP-0114\) on \S+ port (\d+)")[1])


def connect(server: MlinkProcess, domain: str = PUSH, secret: str = SECRET) -> RawComponent:
    component = RawComponent(component_port(server))
    answer = component.handshake(domain, secret)
    assert re.search(r"<handshake\s*/>", answer), answer
    return component


def user(server: MlinkProcess, ca_file: Path, jid: str = ALICE) -> RawClient:
    client = RawClient(server.c2s_port, ca_file)
    client.jid = client.login(DOMAIN, jid, USERS[jid],  # type: ignore[attr-defined]
                              resource="r-" + uuid.uuid4().hex[:8])
    return client


# -- the handshake ---------------------------------------------------------------


def test_handshake_then_stanzas_both_ways(server, ca_file):
    component = connect(server)
    alice = user(server, ca_file)
    try:
        alice.send(f"<message to='{PUSH}' id='m1' type='chat'><body>hi</body></message>")
        text = component.read_until(r"</message>")
        (message,) = [e for e in ET.fromstring(
            f"<r xmlns='{xep0114.COMPONENT_NS}'>{text}</r>")]
        assert message.tag == f"{{{xep0114.COMPONENT_NS}}}message", text
        assert message.get("from") == alice.jid and message.get("to") == PUSH, text
        # Back: from a JID at the component, to the user's full JID.
        component.send(f"<message from='bot@{PUSH}/x' to='{alice.jid}' id='m2'>"
                       "<body>hello back</body></message>")
        reply = read_stanza(alice, "message", "m2")
        assert reply.get("from") == f"bot@{PUSH}/x"
        assert reply.findtext(f"{{{CLIENT_NS}}}body") == "hello back"
        # An iq from the component to the server is answered to the component.
        component.send(f"<iq type='get' id='p1' from='{PUSH}' to='{DOMAIN}'>"
                       "<ping xmlns='urn:xmpp:ping'/></iq>")
        answer = component.read_until(r"<iq[^>]*id='p1'[^>]*(/>|>.*?</iq>)")
        assert "type='result'" in answer and f"to='{PUSH}'" in answer, answer
    finally:
        component.close()
        alice.close()


def test_wrong_secret_is_not_authorized(server):
    component = RawComponent(component_port(server))
    answer = component.handshake(PUSH, "not-the-secret-at-all")
    assert "<not-authorized" in answer and "<handshake/>" not in answer, answer
    component2 = RawComponent(component_port(server))
    component2.open_stream(PUSH)
    component2.send("<handshake>" + "0" * 40 + "</handshake>")
    expect_stream_error(component2, "not-authorized")
    component.close()
    component2.close()


def test_unknown_name_is_host_unknown(server):
    component = RawComponent(component_port(server))
    text = component.open_stream("nobody.localhost")
    text += component.wait_closed()
    assert "<host-unknown" in text and text.rstrip().endswith("</stream:stream>"), text
    component.close()


def test_served_domain_is_not_a_component(server):
    component = RawComponent(component_port(server))
    text = component.open_stream(DOMAIN) + component.wait_closed()
    assert "<host-unknown" in text, text
    component.close()


def test_second_connection_is_a_conflict_and_the_first_keeps_serving(server, ca_file):
    first = connect(server)
    second = RawComponent(component_port(server))
    try:
        answer = second.handshake(PUSH, SECRET)
        answer += second.wait_closed() if not second.eof else ""
        assert "<conflict" in answer, answer
        alice = user(server, ca_file)
        alice.send(f"<message to='{PUSH}' id='c1'><body>still there?</body></message>")
        assert "still there?" in first.read_until("</message>")
        alice.close()
    finally:
        first.close()
        second.close()


def test_domain_free_again_after_disconnect(server):
    first = connect(server)
    first.send("</stream:stream>")
    first.wait_closed()
    first.close()
    second = connect(server)  # no conflict: the first left
    second.close()


def test_disco_items_lists_the_component(server, ca_file):
    alice = user(server, ca_file)
    alice.send(f"<iq type='get' id='d1' to='{DOMAIN}'>"
               "<query xmlns='http://jabber.org/protocol/disco#items'/></iq>")
    reply = read_stanza(alice, "iq", "d1")
    items = {i.get("jid") for i in reply.iter("{http://jabber.org/protocol/disco#items}item")}
    assert {PUSH, IDLE} <= items, ET.tostring(reply)
    alice.close()


# -- what a component may send -----------------------------------------------------


def test_stanza_before_handshake_is_not_authorized(server):
    component = RawComponent(component_port(server))
    component.open_stream(PUSH)
    component.send(f"<message from='{PUSH}' to='{ALICE}'><body>x</body></message>")
    expect_stream_error(component, "not-authorized")
    component.close()


def test_foreign_from_is_invalid_from(server, ca_file):
    component = connect(server)
    component.send(f"<message from='{ALICE}' to='bob@{DOMAIN}'><body>spoof</body></message>")
    expect_stream_error(component, "invalid-from")
    component.close()


def test_client_namespace_is_invalid_namespace(server):
    component = connect(server)
    component.send(f"<message xmlns='jabber:client' from='{PUSH}' to='{ALICE}'/>")
    expect_stream_error(component, "invalid-namespace")
    component.close()


def test_missing_to_is_a_stanza_error_and_the_stream_goes_on(server):
    component = connect(server)
    component.send(f"<iq type='get' id='nt' from='{PUSH}'><ping xmlns='urn:xmpp:ping'/></iq>")
    text = component.read_until(r"</iq>")
    assert "type='error'" in text and "bad-request" in text, text
    component.send(f"<iq type='get' id='ok' from='{PUSH}' to='{DOMAIN}'>"
                   "<ping xmlns='urn:xmpp:ping'/></iq>")
    assert "type='result'" in component.read_until(r"id='ok'[^>]*/?>")
    component.close()


def test_oversized_stanza_is_policy_violation(server):
    component = connect(server)
    component.send(f"<message from='{PUSH}' to='{ALICE}'><body>")
    component.send("x" * (300 * 1024))  # past the 256 KiB stanza limit
    expect_stream_error(component, "policy-violation")
    component.close()


def test_doctype_is_refused(server):
    component = RawComponent(component_port(server))
    component.send("<?xml version='1.0'?><!DOCTYPE x [<!ENTITY a 'b'>]>")
    text = component.wait_closed()
    assert "<restricted-xml" in text, text
    component.close()


# -- not connected ------------------------------------------------------------------


def test_stanzas_to_a_component_not_connected_are_refused(server, ca_file):
    alice = user(server, ca_file)
    alice.send(f"<message to='{IDLE}' id='u1' type='chat'><body>anyone?</body></message>")
    assert stanza_error_of(read_stanza(alice, "message", "u1")) == \
        ("cancel", "service-unavailable")
    alice.send(f"<iq to='x@{IDLE}' id='u2' type='get'><query xmlns='jabber:iq:version'/></iq>")
    error, text = read_stanza_text(alice, "iq", "u2")
    assert stanza_error_of(error)[1] == "service-unavailable", text
    alice.close()


# -- slixmpp's component library ------------------------------------------------------


def test_slixmpp_component_connects_and_answers(server, ca_file):
    import asyncio

    from slixmpp.componentxmpp import ComponentXMPP

    port = component_port(server)
    received: list[str] = []

    async def run() -> None:
        component = ComponentXMPP(PUSH, SECRET, "127.0.0.1", port)
        ready = asyncio.Event()
        got = asyncio.Event()
        component.add_event_handler("session_start", lambda _: ready.set())

        def on_message(msg: object) -> None:
            received.append(str(msg["body"]))  # type: ignore[index]
            msg.reply(f"echo {msg['body']}").send()  # type: ignore[attr-defined]
            got.set()

        component.add_event_handler("message", on_message)
        component.connect()
        await asyncio.wait_for(ready.wait(), 10)
        loop = asyncio.get_running_loop()
        alice = await loop.run_in_executor(None, user, server, ca_file)
        alice.send(f"<message to='{PUSH}' id='s1' type='chat'><body>ping</body></message>")
        await asyncio.wait_for(got.wait(), 10)
        text = await loop.run_in_executor(None, alice.read_until, "echo ping")
        assert f"from='{PUSH}'" in text or f"from=\"{PUSH}\"" in text, text
        alice.close()
        component.disconnect()

    asyncio.run(run())
    assert received == ["ping"]


# -- two shards ------------------------------------------------------------------------


def known_on(server: MlinkProcess, shard: int, held_by: int, since: int) -> None:
    """Wait until `shard` has learned (over the bus) that the component is on
    `held_by`. Until then `shard` rightly answers its users' stanzas to the
    component with service-unavailable: "all shards ready" does not mean the
    shards have met on the bus yet, nor that a component's arrival has
    reached the others."""
    server.wait_for_log(rf"shard-{shard} .*component {re.escape(PUSH)} is on shard {held_by}$",
                        since=since, timeout=RESTART_TIMEOUT)


def disconnect(server: MlinkProcess, component: RawComponent, held_by: int, since: int) -> None:
    """End the component's stream and wait until both shards have let the
    name go, so that the next connection, on either shard, is not refused.
    The other shard must have learned of the component first (`known_on`),
    or it has nothing to let go."""
    component.send("</stream:stream>")
    component.wait_closed()
    component.close()
    server.wait_for_log(rf"shard-{held_by} .*component {re.escape(PUSH)} disconnected",
                        since=since)
    server.wait_for_log(rf"shard-{1 - held_by} .*component {re.escape(PUSH)} left shard "
                        rf"{held_by}$", since=since)


@pytest.fixture(scope="module")
def sharded(tmp_path_factory: pytest.TempPathFactory,
            cert_files: tuple[Path, Path]) -> Iterator[MlinkProcess]:
    setup = tmp_path_factory.mktemp("component-shards") / "s"
    (port,) = free_ports(1)
    components = (f'<components port="{port}"><component name="{PUSH}" '
                  f'secret="{SECRET}"/></components>')
    with start_mlink(setup, DOMAIN, cert_files, users=USERS, shards=2,
                     edit_config=lambda text: with_components(text, components)) as proc:
        yield proc


def test_two_shards_route_to_the_shard_holding_the_component(sharded, ca_file):
    mark = sharded.log.mark()
    component = connect(sharded)
    held_by = int(sharded.wait_for_log(
        rf"shard-(\d+) .*component {re.escape(PUSH)} connected", since=mark)[1])
    known_on(sharded, 1 - held_by, held_by, mark)
    place = Placement(sharded.log, sharded.c2s_port, ca_file, USERS)
    try:
        alice = place.login_on(1 - held_by, ALICE)
        alice.send(f"<message to='{PUSH}' id='x1' type='chat'><body>across</body></message>")
        text = component.read_until("across</body>")
        assert f"from='{alice.jid}'" in text, text  # type: ignore[attr-defined]
        component.send(f"<message from='{PUSH}' to='{alice.jid}' id='x2'>"  # type: ignore[attr-defined]
                       "<body>and back</body></message>")
        assert read_stanza(alice, "message", "x2").findtext(f"{{{CLIENT_NS}}}body") == "and back"
        # Gone: the other shard's stanzas are refused, not lost.
        disconnect(sharded, component, held_by, mark)
        alice.send(f"<message to='{PUSH}' id='x3' type='chat'><body>hello?</body></message>")
        assert stanza_error_of(read_stanza(alice, "message", "x3"))[1] == "service-unavailable"
    finally:
        component.close()
        place.close_all()


# Tries before a second connection lands on the other shard (SO_REUSEPORT
# spreads connections by a hash of the client's port).
PLACEMENT_TRIES = 40


def test_two_shards_refuse_a_second_connection_on_the_other_shard(sharded):
    mark = sharded.log.mark()
    first = connect(sharded)
    held_by = int(sharded.wait_for_log(
        rf"shard-(\d+) .*component {re.escape(PUSH)} connected", since=mark)[1])
    # Else a second connection on the other shard would rightly be taken.
    known_on(sharded, 1 - held_by, held_by, mark)
    try:
        for _ in range(PLACEMENT_TRIES):
            mark = sharded.log.mark()
            second = RawComponent(component_port(sharded))
            answer = second.handshake(PUSH, SECRET)
            second.close()
            assert "<conflict" in answer, answer
            shard = int(sharded.wait_for_log(
                rf"shard-(\d+) .*component {re.escape(PUSH)} refused", since=mark)[1])
            if shard != held_by:
                break
        else:
            raise AssertionError("no second connection reached the other shard")
    finally:
        disconnect(sharded, first, held_by, mark)


def test_two_shards_survive_the_death_of_either_shard(sharded, ca_file):
    """A restarted shard learns where the component is from the others; a
    dead shard's component is refused (never sent into the void) until it
    connects again."""
    mark = sharded.log.mark()
    component = connect(sharded)
    held_by = int(sharded.wait_for_log(
        rf"shard-(\d+) .*component {re.escape(PUSH)} connected", since=mark)[1])
    other = 1 - held_by
    # The other shard's line about the component, before it dies: only a
    # line after this one can come from its successor.
    known_on(sharded, other, held_by, mark)
    place = Placement(sharded.log, sharded.c2s_port, ca_file, USERS)
    try:
        # The other shard dies and comes back: it is told where the component is.
        pid = shard_pids(sharded)[other]  # `mlink status`: seconds on a loaded machine
        mark = sharded.log.mark()
        os.kill(pid, signal.SIGKILL)
        sharded.wait_for_log(rf"shard {other} ready", since=mark, timeout=RESTART_TIMEOUT)
        known_on(sharded, other, held_by, mark)
        alice = place.login_on(other, ALICE)
        alice.send(f"<message to='{PUSH}' id='k1' type='chat'><body>after restart</body>"
                   "</message>")
        assert "after restart" in component.read_until("after restart</body>")
        # The component's shard dies: the other refuses, and says why.
        pid = shard_pids(sharded)[held_by]
        mark = sharded.log.mark()
        os.kill(pid, signal.SIGKILL)
        sharded.wait_for_log(rf"shard-{other} .*component {re.escape(PUSH)} was on shard "
                             rf"{held_by}, which is gone", since=mark, timeout=RESTART_TIMEOUT)
        alice.send(f"<message to='{PUSH}' id='k2' type='chat'><body>void?</body></message>")
        assert stanza_error_of(read_stanza(alice, "message", "k2"))[1] == "service-unavailable"
        sharded.wait_for_log(rf"shard {held_by} ready", since=mark, timeout=RESTART_TIMEOUT)
        component.close()
        # Connected again (on either shard): reachable again.
        mark = sharded.log.mark()
        component = connect(sharded)
        now_on = int(sharded.wait_for_log(
            rf"shard-(\d+) .*component {re.escape(PUSH)} connected", since=mark)[1])
        if now_on != other:
            known_on(sharded, other, now_on, mark)
        alice.send(f"<message to='{PUSH}' id='k3' type='chat'><body>back</body></message>")
        assert "back" in component.read_until("back</body>")
    finally:
        component.close()
        place.close_all()


# Messages sent at a component in the moment it connects on another shard.
RACING = 20


def test_two_shards_a_stanza_racing_the_components_arrival_is_delivered_or_bounced(
        sharded, ca_file):
    """Stanzas sent from both shards while the component's handshake is in
    flight: each is delivered, or bounced with service-unavailable (the
    component not connected yet, or its shard's news not arrived yet), never
    lost. The outcome is checked, whatever the timing was."""
    place = Placement(sharded.log, sharded.c2s_port, ca_file, USERS)
    alices = [place.login_on(0, ALICE), place.login_on(1, ALICE)]
    mark = sharded.log.mark()
    component = RawComponent(component_port(sharded))
    try:
        component.open_stream(PUSH)
        digest = hashlib.sha1((component.stream_id + SECRET).encode()).hexdigest()
        ids = {f"r{n}" for n in range(RACING)}
        for n in range(RACING):
            if n == RACING // 2:  # half before the handshake, half after
                component.send(f"<handshake>{digest}</handshake>")
            alices[n % 2].send(f"<message to='{PUSH}' id='r{n}' type='chat'>"
                               f"<body>race {n}</body></message>")
        delivered, bounced, handshake = _outcomes(component, alices, ids)
        assert re.search(r"<handshake\s*/>", handshake), handshake
        assert delivered | bounced == ids and not delivered & bounced, (delivered, bounced)
        held_by = int(sharded.wait_for_log(
            rf"shard-(\d+) .*component {re.escape(PUSH)} connected", since=mark)[1])
        known_on(sharded, 1 - held_by, held_by, mark)
        disconnect(sharded, component, held_by, mark)
    finally:
        component.close()
        place.close_all()


def _outcomes(component: RawComponent, alices: list[RawClient],
              ids: set[str]) -> tuple[set[str], set[str], str]:
    """The ids that reached the component, those bounced to a sender with
    service-unavailable, and what the component read: from whichever socket
    has data until every id has one outcome (or READ_TIMEOUT: then some
    was lost)."""
    texts: dict[RawClient, str] = {c: "" for c in (component, *alices)}
    delivered: set[str] = set()
    bounced: set[str] = set()
    deadline = time.monotonic() + READ_TIMEOUT
    message = re.compile(r"<message\b[^>]*\bid='(r\d+)'[^>]*>.*?</message>", re.S)
    while delivered | bounced != ids:
        remaining = deadline - time.monotonic()
        assert remaining > 0, f"lost: {ids - delivered - bounced}; got {list(texts.values())}"
        ready = [c for c in alices if c.sock.pending()] or [  # type: ignore[attr-defined]
            c for c in texts if c.sock in select.select([c.sock for c in texts], [], [],
                                                        remaining)[0]]
        for client in ready:
            try:
                chunk = client.sock.recv(65536)
            except ssl.SSLWantReadError:
                continue  # part of a TLS record: the rest follows
            assert chunk, "the server closed a connection"
            texts[client] += chunk.decode()
        delivered = set(message.findall(texts[component]))
        for client in alices:
            for m in message.finditer(texts[client]):
                stanza = ET.fromstring(m[0].replace("<message ", f"<message xmlns='{CLIENT_NS}' ", 1))
                assert stanza_error_of(stanza)[1] == "service-unavailable", m[0]
                bounced.add(m[1])
    return delivered, bounced, texts[component]


# -- limits and faults -------------------------------------------------------------------

# The stanza rate of the limits test server, and its burst.
RATE, BURST = 5, 5
# Stanzas the component sends at once there: BURST free, the rest at RATE.
SENT = 15


@pytest.fixture(scope="module")
def limited(tmp_path_factory: pytest.TempPathFactory,
            cert_files: tuple[Path, Path]) -> Iterator[MlinkProcess]:
    setup = tmp_path_factory.mktemp("component-limits") / "s"

    def edit(text: str) -> str:
        text = with_components(text)
        return re.sub(r'auth-timeout="[^"]*"', 'auth-timeout="1" exempt-loopback="false" '
                      f'stanza-rate="{RATE}" stanza-burst="{BURST}"', text)

    with start_mlink(setup, DOMAIN, cert_files, users=USERS, edit_config=edit,
                     shards=1) as proc:
        yield proc


def test_handshake_timeout_ends_the_stream(limited):
    component = RawComponent(component_port(limited))
    component.open_stream(PUSH)  # and then nothing
    expect_stream_error(component, "connection-timeout")
    component.close()


def test_component_over_the_stanza_rate_is_paused_not_dropped(limited):
    component = connect(limited)
    started = time.monotonic()
    component.send("".join(f"<iq type='get' id='r{n}' from='{PUSH}' to='{DOMAIN}'>"
                           "<ping xmlns='urn:xmpp:ping'/></iq>" for n in range(SENT)))
    text = component.read_until(rf"id='r{SENT - 1}'", timeout=30)
    elapsed = time.monotonic() - started
    assert all(f"id='r{n}'" in text for n in range(SENT)), text
    # The bucket refills at RATE per second: the stanzas past the burst
    # cannot all have been read sooner (a bound, not a sleep).
    assert elapsed >= (SENT - BURST - 1) / RATE, elapsed
    assert limited.log.find(r"component push\.localhost is over the stanza rate")
    component.close()


@pytest.fixture(scope="module")
def small_output(tmp_path_factory: pytest.TempPathFactory,
                 cert_files: tuple[Path, Path]) -> Iterator[MlinkProcess]:
    setup = tmp_path_factory.mktemp("component-output") / "s"

    def edit(text: str) -> str:
        return re.sub(r'output-bytes="\d+"', 'output-bytes="65536"', with_components(text))

    with start_mlink(setup, DOMAIN, cert_files, users=USERS, edit_config=edit,
                     shards=1) as proc:
        yield proc


def drain(client: RawClient, until: str | None = None, timeout: float = 30) -> str:
    """Everything `client` receives until the server closes (or `until`
    appears); a short message, not the megabytes read, when it does not."""
    deadline = time.monotonic() + timeout
    data = client.buffer
    client.buffer = b""
    while until is None or until.encode() not in data:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise AssertionError(f"no end after {len(data)} bytes; last: {data[-300:]!r}")
        client.sock.settimeout(remaining)
        try:
            chunk = client.sock.recv(65536)
        except TimeoutError:
            continue
        except ConnectionResetError:
            chunk = b""
        if not chunk:
            break
        data += chunk
    return data.decode("utf-8", "replace")


# Messages sent to a component that stops reading, and their body size:
# far more than the kernel's buffers and the 64 KiB output bound hold.
FLOOD, BODY = 400, 4000


def test_component_that_stops_reading_loses_no_message(small_output, ca_file):
    """Every message to a component that stopped reading was either written
    to it whole or answered to its sender with an error: none vanishes."""
    component = RawComponent(component_port(small_output), receive_buffer=4096)
    answer = component.handshake(PUSH, SECRET)
    assert "<handshake/>" in answer, answer
    alice = user(small_output, ca_file)
    body = "x" * BODY
    alice.send("".join(f"<message to='{PUSH}' id='f{n}' type='chat'><body>{body}</body>"
                       "</message>" for n in range(FLOOD)))
    alice.send(f"<iq type='get' id='done' to='{DOMAIN}'><ping xmlns='urn:xmpp:ping'/></iq>")
    # The server ends the component (policy-violation) and cuts it; what it
    # did not write is bounced before the cut.
    written = drain(component, timeout=30)
    assert "<policy-violation" in written, written[-500:]
    delivered = set(re.findall(r"<message [^>]*id='(f\d+)'[^>]*>.*?</message>", written, re.S))
    text = drain(alice, until="id='done'", timeout=30)
    bounced = set(re.findall(r"<message [^>]*id='(f\d+)'[^>]*type='error'|"
                             r"<message [^>]*type='error'[^>]*id='(f\d+)'", text))
    bounced_ids = {a or b for a, b in bounced}
    assert "service-unavailable" in text
    assert delivered | bounced_ids == {f"f{n}" for n in range(FLOOD)}, (
        len(delivered), len(bounced_ids))
    assert bounced_ids and delivered  # both paths were taken
    component.close()
    alice.close()


# -- reload ----------------------------------------------------------------------------

NEW_SECRET = "rotated-secret-0123456789"


def test_reload_rotates_the_secret_for_new_connections_and_names_need_a_restart(
        tmp_path: Path, cert_files: tuple[Path, Path]) -> None:
    with start_mlink(tmp_path / "s", DOMAIN, cert_files, users=USERS,
                     edit_config=with_components, shards=1) as server:
        before = connect(server)
        text = server.config.read_text().replace(SECRET, NEW_SECRET).replace(
            IDLE, "other.localhost")
        server.config.write_text(text)
        done = mlink("reload", "--config", str(server.config))
        assert "component port and names (<components>) changed: needs a restart" in \
            done.stdout, done.stdout
        # The connection made before stays; a new one needs the new secret.
        before.send(f"<iq type='get' id='still' from='{PUSH}' to='{DOMAIN}'>"
                    "<ping xmlns='urn:xmpp:ping'/></iq>")
        assert "type='result'" in before.read_until(r"id='still'[^>]*/?>")
        before.send("</stream:stream>")
        before.wait_closed()
        before.close()
        old = RawComponent(component_port(server))
        assert "<not-authorized" in old.handshake(PUSH, SECRET)
        old.close()
        connect(server, PUSH, NEW_SECRET).close()
        # A name added by the reload is not served before a restart.
        other = RawComponent(component_port(server))
        assert "<host-unknown" in other.open_stream("other.localhost") + other.wait_closed()
        other.close()
