"""The abuse limits of `<limits>` (docs/security.md), each reached over real
sockets against `mlink serve`: the error a client sees, and the server
serving others meanwhile. The limits are set small through `edit_config`,
and loopback is not exempt (`exempt-loopback="false"`), so that the tests'
own connections count; distinct addresses are other loopback addresses
(127.0.0.2 and up).

No test sleeps to synchronise: outcomes are polled with bounded deadlines,
and where a time limit is under test the other side's state is checked
after the limit has visibly acted (a stalled stream was cut; an idle one,
idle for as long, is not).
"""

from __future__ import annotations

import base64
import re
import resource
import time
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from mlink.transport.limits import (
    AUTH_DELAY_BASE,
    AuthThrottle,
    ConnectionLimiter,
    ConnectionSlot,
    PenaltyTable,
    TokenBucket,
    address_key,
)
from tests.rawclient import (
    BIND_NS,
    CLIENT_NS,
    QUICK,
    READ_TIMEOUT,
    RawClient,
    expect_stream_error,
    header,
    ping,
    read_stanza,
    sasl_failure,
    stanza_error_of,
    stream_error,
)
from tests.rawclient import (
    resource as new_resource,
)
from tests.serverproc import (
    ALICE,
    ALICE_PW,
    BOB,
    BOB_PW,
    DOMAIN,
    MlinkProcess,
    mlink,
    start_mlink,
)

SASL_NS = "urn:ietf:params:xml:ns:xmpp-sasl"
ROSTER_NS = "jabber:iq:roster"
PRIVATE_NS = "jabber:iq:private"
STREAM_NS = "http://etherx.jabber.org/streams"
STANZAS_NS = "urn:ietf:params:xml:ns:xmpp-stanzas"
# The small limits the servers below run with.
CONNECTIONS = 4
UNAUTHENTICATED = 2
RESOURCES = 2
RATE, BURST = 20, 5
READ_TIMEOUT_SECONDS = 1
ROSTER_ITEMS = 3
PRIVATE_BYTES = 600
FREE_FAILURES = 2
# Messages sent in one flood: well past the burst, so most are delayed.
FLOOD = 60
# How long a test waits for the server to notice a closed connection.
NOTICE = 10.0
# How long a probe waits for a refusal before it speaks (a refusal is sent
# at accept; waiting less only makes the probe speak into a closed stream,
# which it also recognises).
REFUSAL_WAIT = 2.0


def with_limits(**attrs: str) -> Callable[[str], str]:
    """An edit_config adding attributes to `<limits>`."""
    extra = " ".join(f'{name}="{value}"' for name, value in attrs.items())
    return lambda text: text.replace("<limits ", f"<limits {extra} ", 1)


def start(tmp_path_factory: pytest.TempPathFactory, cert_files: tuple[Path, Path],
          **attrs: str) -> Iterator[MlinkProcess]:
    setup = tmp_path_factory.mktemp("limits")
    with start_mlink(setup, DOMAIN, cert_files, users={ALICE: ALICE_PW, BOB: BOB_PW},
                     edit_config=with_limits(**{"exempt-loopback": "false", **attrs}),
                     shards=1) as server:
        yield server


@pytest.fixture(scope="module")
def conn_server(tmp_path_factory, cert_files) -> Iterator[MlinkProcess]:
    """Connections per address and unauthenticated connections per address."""
    yield from start(tmp_path_factory, cert_files, **{
        "connections-per-address": str(CONNECTIONS),
        "unauthenticated-per-address": str(UNAUTHENTICATED)})


@pytest.fixture(scope="module")
def session_server(tmp_path_factory, cert_files) -> Iterator[MlinkProcess]:
    """Per-session and per-account limits."""
    yield from start(tmp_path_factory, cert_files, **{
        "max-resources": str(RESOURCES), "stanza-rate": str(RATE),
        "stanza-burst": str(BURST), "read-timeout": str(READ_TIMEOUT_SECONDS),
        "roster-items": str(ROSTER_ITEMS), "private-bytes": str(PRIVATE_BYTES)})


@pytest.fixture(scope="module")
def auth_server(tmp_path_factory, cert_files) -> Iterator[MlinkProcess]:
    """Authentication delays: few free failures, short delays."""
    yield from start(tmp_path_factory, cert_files, **{
        "auth-free-failures": str(FREE_FAILURES), "auth-max-delay": "2"})


# -- helpers -------------------------------------------------------------------------


class Client:
    """A logged-in RawClient that parses what arrives into stanzas."""

    def __init__(self, server: MlinkProcess, ca_file: Path, user: str = ALICE,
                 password: str = ALICE_PW, res: str | None = None,
                 source: str | None = None) -> None:
        self.raw = RawClient(server.c2s_port, ca_file, source=source)
        self.jid = self.raw.login(DOMAIN, user, password, resource=res or new_resource())
        self.pending: list[ET.Element] = []
        self._parser = ET.XMLPullParser(events=("start", "end"))
        self._parser.feed(f"<root xmlns='{CLIENT_NS}' xmlns:stream='{STREAM_NS}'>")
        self._depth = 0

    def send(self, data: str) -> None:
        self.raw.send(data)

    def expect(self, match: Callable[[ET.Element], bool], what: str = "stanza",
               timeout: float = READ_TIMEOUT) -> ET.Element:
        deadline = time.monotonic() + timeout
        while True:
            for i, stanza in enumerate(self.pending):
                if match(stanza):
                    return self.pending.pop(i)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"{self.jid}: no {what} arrived")
            text = self.raw.read_until(r".", remaining)
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

    def iq(self, kind: str, payload: str, to: str | None = None) -> ET.Element:
        stanza_id = "iq-" + uuid.uuid4().hex[:10]
        to_attr = f" to='{to}'" if to else ""
        self.send(f"<iq type='{kind}' id='{stanza_id}'{to_attr}>{payload}</iq>")
        return self.expect(lambda s: s.get("id") == stanza_id, f"reply {stanza_id}")

    def ping(self) -> None:
        reply = self.iq("get", "<ping xmlns='urn:xmpp:ping'/>", DOMAIN)
        assert reply.get("type") == "result", ET.tostring(reply)

    def close(self) -> None:
        self.send("</stream:stream>")
        self.raw.wait_closed()
        self.raw.close()


def error_text(stanza: ET.Element) -> str:
    text = stanza.find(f"{{{CLIENT_NS}}}error/{{{STANZAS_NS}}}text")
    return "" if text is None else text.text or ""


def poll(check: Callable[[], bool], what: str, timeout: float = NOTICE) -> None:
    """Try `check` until it holds, within `timeout` (each try is a real
    exchange with the server, not a sleep)."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")


def refused(server: MlinkProcess, source: str | None = None) -> bool:
    """Whether a new connection is refused at accept. A refused connection
    hears from the server first (its header and a `policy-violation` stream
    error, then the close), so the probe waits a moment for that before
    speaking; an admitted one answers the probe's header with features."""
    client = RawClient(server.c2s_port, source=source)
    try:
        client.sock.settimeout(REFUSAL_WAIT)
        try:
            first = client.sock.recv(65536)
        except TimeoutError:
            first = None
        except ConnectionResetError:
            return True
        client.sock.settimeout(READ_TIMEOUT)
        if first == b"":
            return True  # closed at once
        if first is not None:
            client.buffer = first
            text = client.read_until(r"</stream:stream>", QUICK)
            assert stream_error(text) == "policy-violation", text
            assert "too many connections" in text, text
            return True
        client.send(header(DOMAIN))
        text = client.read_until(r"</stream:features>|</stream:stream>", QUICK)
        return "</stream:features>" not in text
    finally:
        client.close()


def unauthenticated(server: MlinkProcess, ca_file: Path, source: str | None = None) -> RawClient:
    """A connection past STARTTLS, not authenticated."""
    client = RawClient(server.c2s_port, ca_file, source=source)
    assert "<mechanisms" in client.starttls(DOMAIN)
    return client


def plain(user: str, password: str) -> str:
    return base64.b64encode(f"\0{user}\0{password}".encode()).decode()


# -- unit: the counting --------------------------------------------------------------


def test_token_bucket_allows_a_burst_then_the_rate():
    bucket = TokenBucket(rate=10.0, burst=3, now=0.0)
    assert [bucket.take() for _ in range(3)] == [True, True, True]
    assert not bucket.take()
    assert bucket.wait(0.0) == pytest.approx(0.1)  # one stanza owed at 10/s
    assert bucket.wait(0.1) == 0.0
    assert bucket.tokens <= bucket.burst


def test_penalty_table_forgets_and_stays_bounded():
    table = PenaltyTable(forget=10.0, max_entries=3)
    for _ in range(4):
        table.add("a", 0.0)
    assert table.score("a", 0.0) == 4.0
    assert table.score("a", 20.0) == 2.0  # one forgotten per 10 s
    for key in "bcde":
        table.add(key, 1.0)
    assert len(table) == 3 and table.score("a", 1.0) == 0.0  # the oldest evicted


def test_auth_delays_increase_then_stop_at_the_maximum():
    throttle = AuthThrottle(free_failures=2, max_delay=3.0, forget=60.0)
    delays = []
    for _ in range(6):
        delays.append(throttle.delay("192.0.2.1", "a@x", 0.0))
        throttle.failed("192.0.2.1", "a@x", 0.0)
    assert delays == [0, 0, AUTH_DELAY_BASE, 2 * AUTH_DELAY_BASE, 4 * AUTH_DELAY_BASE, 3.0]
    # The account is penalised from another address too...
    assert throttle.delay("192.0.2.2", "a@x", 0.0) == 3.0
    # ...until its owner succeeds; the address stays penalised.
    throttle.succeeded("a@x")
    assert throttle.delay("192.0.2.2", "a@x", 0.0) == 0
    assert throttle.delay("192.0.2.1", "b@x", 0.0) == 3.0


def test_connection_limiter_counts_per_address_and_ipv6_prefix():
    limiter = ConnectionLimiter(per_address=2, unauthenticated=1, loopback_exempt=True)
    first = limiter.admit("2001:db8::1")
    assert isinstance(first, ConnectionSlot)
    assert isinstance(limiter.admit("2001:db8::2"), str)  # same /64, unauthenticated
    first.authenticated()
    second = limiter.admit("2001:db8::2")
    assert isinstance(second, ConnectionSlot)
    assert isinstance(limiter.admit("2001:db8::3"), str)  # two connections
    assert isinstance(limiter.admit("2001:db8:1::1"), ConnectionSlot)  # another /64
    first.release()
    second.release()
    second.release()  # released once only
    assert limiter.connections.get(address_key("2001:db8::9"), 0) == 0
    assert limiter.admit("127.0.0.1").exempt  # type: ignore[union-attr]
    assert address_key("::ffff:192.0.2.7") == "192.0.2.7"


# -- connections per address ---------------------------------------------------------


def test_unauthenticated_connections_per_address(conn_server, ca_file):
    """The third unauthenticated connection from one address is refused at
    accept with a stream error; a session logged in before keeps working,
    other addresses still connect, and the address may connect again once
    its idle connections are gone."""
    served = Client(conn_server, ca_file, source="127.0.0.2")
    idle = [unauthenticated(conn_server, ca_file) for _ in range(UNAUTHENTICATED)]
    assert refused(conn_server)
    served.ping()
    other = Client(conn_server, ca_file, source="127.0.0.3")
    other.ping()
    for client in idle:
        client.close()
    poll(lambda: not refused(conn_server), "the address admitted again")
    Client(conn_server, ca_file).close()
    served.close()
    other.close()


def test_connections_per_address(conn_server, ca_file):
    """Authenticated sessions count towards the connections per address."""
    sessions = [Client(conn_server, ca_file, source="127.0.0.4") for _ in range(CONNECTIONS)]
    assert refused(conn_server, source="127.0.0.4")
    for client in sessions:
        client.ping()
    Client(conn_server, ca_file, source="127.0.0.5").close()
    sessions.pop().close()
    poll(lambda: not refused(conn_server, source="127.0.0.4"), "a place freed")
    for client in sessions:
        client.close()


def test_refusals_are_logged_once_per_interval(conn_server, ca_file):
    mark = conn_server.log.mark()
    idle = [unauthenticated(conn_server, ca_file, source="127.0.0.6")
            for _ in range(UNAUTHENTICATED)]
    for _ in range(5):
        assert refused(conn_server, source="127.0.0.6")
    lines = [line for line in conn_server.log.lines[mark:] if "refused" in line
             and "connection(s)" in line]
    assert len(lines) <= 1, lines
    for client in idle:
        client.close()
    # `mlink status` counts them.
    status = mlink("status", "--config", str(conn_server.config)).stdout
    match = re.search(r"shard 0 limits: (\d+) connection\(s\) refused", status)
    assert match and int(match.group(1)) >= 5, status


# -- resources per account ----------------------------------------------------------


def bind(client: RawClient, res: str) -> ET.Element:
    client.send(f"<iq type='set' id='bind-{res}'><bind xmlns='{BIND_NS}'>"
                f"<resource>{res}</resource></bind></iq>")
    return read_stanza(client, "iq", f"bind-{res}")


def test_resources_per_account(session_server, ca_file):
    """RFC 6120 §7.6.2.1: one more resource than allowed is refused with
    `resource-constraint`; replacing a resource is always allowed."""
    held = [Client(session_server, ca_file, res=f"dev{i}") for i in range(RESOURCES)]
    extra = RawClient(session_server.c2s_port, ca_file)
    extra.authenticate(DOMAIN, ALICE, ALICE_PW)
    reply = bind(extra, "one-too-many")
    assert stanza_error_of(reply) == ("wait", "resource-constraint")
    assert f"at most {RESOURCES}" in ET.tostring(reply).decode()
    # The same stream may bind a resource that replaces one of its own.
    assert bind(extra, "dev0").get("type") == "result"
    held[1].ping()
    bob = Client(session_server, ca_file, BOB, BOB_PW)
    bob.ping()
    extra.close()
    for client in (held[1], bob):
        client.close()


# -- stanza rate ------------------------------------------------------------------------


def test_stanza_rate_delays_but_delivers_everything_in_order(session_server, ca_file):
    """A flood well past the burst: every message arrives, in order, while
    the server reads the sender slowly (logged) and serves others."""
    mark = session_server.log.mark()
    alice = Client(session_server, ca_file)
    bob = Client(session_server, ca_file, BOB, BOB_PW)
    bob.ping()
    alice.send("".join(f"<message to='{bob.jid}' type='chat' id='f{n}'><body>flood {n}</body>"
                       "</message>" for n in range(FLOOD)))
    session_server.wait_for_log(r"over the stanza rate; reading paused", since=mark)
    # Served meanwhile: bob's own stanzas are answered during the flood.
    bob.ping()
    # Taken in arrival order: the order the server read and routed them in.
    got = [bob.expect(lambda s: s.tag == f"{{{CLIENT_NS}}}message", f"message {n}")
           .findtext(f"{{{CLIENT_NS}}}body") for n in range(FLOOD)]
    assert got == [f"flood {n}" for n in range(FLOOD)]
    alice.ping()
    alice.close()
    bob.close()


# -- read timeout -------------------------------------------------------------------------


def test_stalled_partial_stanza_ends_the_stream_idle_session_stays(session_server, ca_file):
    idle = Client(session_server, ca_file, BOB, BOB_PW)
    idle.send(" ")  # a whitespace keepalive is not a stanza started
    stalled = Client(session_server, ca_file)
    stalled.send(f"<message to='{BOB}'><body>never fini")
    expect_stream_error(stalled.raw, "connection-timeout", timeout=NOTICE)
    # The idle session has been idle at least as long: still served.
    idle.ping()
    idle.close()


def test_stalled_start_tag_counts_too(session_server, ca_file):
    stalled = Client(session_server, ca_file)
    stalled.send(f"<message to='{BOB}' type='ch")
    expect_stream_error(stalled.raw, "connection-timeout", timeout=NOTICE)


def test_stalled_partial_element_before_authentication(session_server, ca_file):
    client = RawClient(session_server.c2s_port, ca_file)
    client.starttls(DOMAIN)
    client.send(f"<auth xmlns='{SASL_NS}' mechanism='PLAIN'>{plain(ALICE, '')[:6]}")
    expect_stream_error(client, "connection-timeout", timeout=NOTICE)


def test_slow_but_steady_stanza_is_not_cut_while_bytes_complete_it(session_server, ca_file):
    """A stanza sent in pieces, each answered before the next is sent, and
    finished before the timeout: delivered."""
    bob = Client(session_server, ca_file, BOB, BOB_PW)
    alice = Client(session_server, ca_file)
    alice.send(f"<message to='{bob.jid}' id='slow'>")
    alice.send("<body>in pieces</body>")
    alice.send("</message>")
    assert bob.expect(lambda s: s.get("id") == "slow").findtext(
        f"{{{CLIENT_NS}}}body") == "in pieces"
    alice.close()
    bob.close()


# -- roster and private storage quotas -----------------------------------------------


def roster_set(client: Client, jid: str, name: str = "") -> ET.Element:
    named = f" name='{name}'" if name else ""
    return client.iq("set", f"<query xmlns='{ROSTER_NS}'><item jid='{jid}'{named}/></query>")


def test_roster_items_per_user(session_server, ca_file):
    client = Client(session_server, ca_file, BOB, BOB_PW)
    contacts = [f"c{i}-{uuid.uuid4().hex[:6]}@example.net" for i in range(ROSTER_ITEMS + 1)]
    for jid in contacts[:ROSTER_ITEMS]:
        assert roster_set(client, jid).get("type") == "result"
    refused_set = roster_set(client, contacts[-1])
    assert stanza_error_of(refused_set) == ("cancel", "not-allowed")
    assert f"at most {ROSTER_ITEMS}" in error_text(refused_set)
    # A subscription request would add an item too: refused the same way.
    stranger = f"s-{uuid.uuid4().hex[:6]}@example.net"
    client.send(f"<presence to='{stranger}' type='subscribe'/>")
    bounced = client.expect(lambda s: s.tag == f"{{{CLIENT_NS}}}presence"
                            and s.get("type") == "error", "the subscribe bounced")
    assert stanza_error_of(bounced) == ("cancel", "not-allowed")
    assert f"at most {ROSTER_ITEMS}" in error_text(bounced)
    # Changing an item already there is not adding one.
    assert roster_set(client, contacts[0], "renamed").get("type") == "result"
    removed = client.iq("set", f"<query xmlns='{ROSTER_NS}'><item jid='{contacts[0]}' "
                               "subscription='remove'/></query>")
    assert removed.get("type") == "result"
    assert roster_set(client, contacts[-1]).get("type") == "result"
    client.close()


def private_set(client: Client, name: str, size: int) -> ET.Element:
    payload = "x" * size
    return client.iq("set", f"<query xmlns='{PRIVATE_NS}'><{name} xmlns='urn:test:{name}'>"
                            f"{payload}</{name}></query>")


def test_private_storage_bytes_per_user(session_server, ca_file):
    client = Client(session_server, ca_file)
    assert private_set(client, "first", 300).get("type") == "result"
    full = private_set(client, "second", 300)
    assert stanza_error_of(full) == ("cancel", "not-allowed")
    assert f"at most {PRIVATE_BYTES} bytes" in error_text(full)
    # Replacing what is stored counts the new size, not both.
    assert private_set(client, "first", 350).get("type") == "result"
    got = client.iq("get", f"<query xmlns='{PRIVATE_NS}'><second xmlns='urn:test:second'/>"
                           "</query>")
    assert got.get("type") == "result"
    second = got.find(f"{{{PRIVATE_NS}}}query/{{urn:test:second}}second")
    assert second is not None and not (second.text or "")  # the refused set stored nothing
    client.close()


# -- authentication delays -----------------------------------------------------------------


def delays_logged(server: MlinkProcess, account: str, since: int) -> list[float]:
    pattern = re.compile(rf"authentication for {re.escape(account)} delayed ([0-9.]+) s")
    return [float(m.group(1)) for line in server.log.lines[since:]
            if (m := pattern.search(line))]


def fail_once(server: MlinkProcess, ca_file: Path, account: str, source: str) -> None:
    client = unauthenticated(server, ca_file, source=source)
    assert sasl_failure(client.auth_plain(account, "wrong")) == "not-authorized"
    client.close()


def test_failures_per_account_delay_later_attempts_increasingly(auth_server, ca_file):
    """Failures on one account delay further attempts on it, from any
    address, more with each failure; the right password still works, and
    then the account is clean again."""
    mark = auth_server.log.mark()
    for n in range(FREE_FAILURES + 3):
        fail_once(auth_server, ca_file, ALICE, f"127.0.1.{n + 1}")  # a new address each
    delays = delays_logged(auth_server, ALICE, mark)
    assert len(delays) == 3 and delays == sorted(delays) and delays[0] < delays[-1], delays
    client = unauthenticated(auth_server, ca_file, source="127.0.1.99")
    assert "<success" in client.auth_plain(ALICE, ALICE_PW)
    client.close()
    mark = auth_server.log.mark()
    fail_once(auth_server, ca_file, ALICE, "127.0.1.98")
    assert delays_logged(auth_server, ALICE, mark) == []


def test_failures_per_address_delay_attempts_on_other_accounts(auth_server, ca_file):
    mark = auth_server.log.mark()
    for n in range(FREE_FAILURES + 1):
        fail_once(auth_server, ca_file, f"nobody{n}@{DOMAIN}", "127.0.2.1")
    fresh = f"fresh-{uuid.uuid4().hex[:6]}@{DOMAIN}"
    fail_once(auth_server, ca_file, fresh, "127.0.2.1")
    assert delays_logged(auth_server, fresh, mark), "the address was not penalised"
    # Another address, meanwhile, is served without delay.
    client = Client(auth_server, ca_file, BOB, BOB_PW, source="127.0.2.2")
    ping(client.raw, DOMAIN)
    assert delays_logged(auth_server, BOB, mark) == []
    client.close()


# -- file descriptors ---------------------------------------------------------------------


def test_serve_raises_the_descriptor_soft_limit(tmp_path, cert_files):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard <= 256:
        pytest.skip("needs a finite hard limit above 256")
    lowered = 256
    resource.setrlimit(resource.RLIMIT_NOFILE, (lowered, hard))
    try:
        with start_mlink(tmp_path / "s", DOMAIN, cert_files, shards=1) as server:
            m = server.wait_for_log(r"file descriptors: soft limit raised from (\d+) to (\d+)")
            assert (int(m.group(1)), int(m.group(2))) == (lowered, hard)
            limits = Path(f"/proc/{server.proc.pid}/limits").read_text()
            row = next(line for line in limits.splitlines() if line.startswith("Max open files"))
            assert row.split()[3:5] == [str(hard), str(hard)], row
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
