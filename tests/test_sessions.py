"""Sessions over real sockets: resource conflicts, routing between
resources, keepalives, the closing handshake, the auth timeout, accounts
changed while the server runs, and shutdown."""

from __future__ import annotations

import re
import time
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.rawclient import (
    BIND_NS,
    CLIENT_NS,
    QUICK,
    RawClient,
    expect_stream_error,
    parse_stanzas,
    ping,
    read_stanza,
    resource,
    sasl_failure,
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
    stop,
)

# -- helpers ----------------------------------------------------------------------


def assert_pong(client: RawClient) -> None:
    reply = ping(client, DOMAIN)
    assert len(reply) == 0, ET.tostring(reply)


def login(server: MlinkProcess, ca_file: Path, user: str = ALICE, password: str = ALICE_PW,
          res: str | None = None) -> tuple[RawClient, str]:
    client = RawClient(server.c2s_port, ca_file)
    jid = client.login(DOMAIN, user, password, resource=res or resource())
    return client, jid


def authenticate(server: MlinkProcess, ca_file: Path, user: str, password: str
                 ) -> tuple[RawClient, str]:
    """STARTTLS and PLAIN; the client and the SASL outcome."""
    client = RawClient(server.c2s_port, ca_file)
    client.starttls(DOMAIN)
    return client, client.auth_plain(user, password)


def message(client: RawClient, to: str, body: str) -> None:
    client.send(f"<message to='{to}' type='chat' id='{uuid.uuid4().hex[:8]}'>"
                f"<body>{body}</body></message>")


def auth_timeout(seconds: str) -> Callable[[str], str]:
    """A configuration edit (for `start_mlink`) setting the auth timeout."""
    def edit(text: str) -> str:
        edited = re.sub(r'auth-timeout="[^"]*"', f'auth-timeout="{seconds}"', text)
        assert edited != text, text
        return edited

    return edit


# -- resources ----------------------------------------------------------------------


def test_same_resource_conflict_kicks_the_old_session(embedded_server, ca_file):
    res = resource()
    first, jid1 = login(embedded_server, ca_file, res=res)
    assert jid1 == f"{ALICE}/{res}"
    second, jid2 = login(embedded_server, ca_file, res=res)
    assert jid2 == jid1
    expect_stream_error(first, "conflict")
    assert_pong(second)
    # Stanzas for the full JID now reach the new session.
    bob, _ = login(embedded_server, ca_file, BOB, BOB_PW)
    token = uuid.uuid4().hex
    message(bob, jid2, token)
    assert token in second.read_until(token)


def test_bind_without_resource_generates_one(embedded_server, ca_file):
    client = RawClient(embedded_server.c2s_port, ca_file)
    client.authenticate(DOMAIN, ALICE, ALICE_PW)
    client.send(f"<iq type='set' id='gen'><bind xmlns='{BIND_NS}'/></iq>")
    reply = read_stanza(client, "iq", "gen")
    assert reply.get("type") == "result", ET.tostring(reply)
    jid = reply.findtext(f"{{{BIND_NS}}}bind/{{{BIND_NS}}}jid")
    assert jid is not None and jid.startswith(ALICE + "/"), jid
    assert len(jid) > len(ALICE + "/")
    assert_pong(client)


def test_bind_with_empty_resource_element_generates_one(embedded_server, ca_file):
    client = RawClient(embedded_server.c2s_port, ca_file)
    client.authenticate(DOMAIN, ALICE, ALICE_PW)
    client.send(f"<iq type='set' id='gen2'><bind xmlns='{BIND_NS}'><resource/></bind></iq>")
    reply = read_stanza(client, "iq", "gen2")
    jid = reply.findtext(f"{{{BIND_NS}}}bind/{{{BIND_NS}}}jid") or ""
    assert re.fullmatch(re.escape(ALICE) + r"/.+", jid), ET.tostring(reply)


def test_two_resources_full_and_bare_jid_routing(embedded_server, ca_file):
    r2, jid2 = login(embedded_server, ca_file, res="r2-" + uuid.uuid4().hex[:6])
    r3, jid3 = login(embedded_server, ca_file, res="r3-" + uuid.uuid4().hex[:6])
    # RFC 6121 §8.5.2: bare-JID messages go to available resources only.
    for client, jid in ((r2, jid2), (r3, jid3)):
        client.send("<presence/>")
        client.read_until(rf"<presence[^>]*from='{re.escape(jid)}'")
    bob, bob_jid = login(embedded_server, ca_file, BOB, BOB_PW)
    to_r2, to_bare = "full-" + uuid.uuid4().hex, "bare-" + uuid.uuid4().hex
    message(bob, jid2, to_r2)
    message(bob, ALICE, to_bare)
    # Bob's stanzas are routed in order, so r3 would see to_r2 before to_bare.
    # The archive's stanza-id (XEP-0359) may follow the body.
    text2 = r2.read_until(rf"{to_bare}</body>.*?</message>")
    text3 = r3.read_until(rf"{to_bare}</body>.*?</message>")
    messages2 = [s for s in parse_stanzas(text2) if s.tag == f"{{{CLIENT_NS}}}message"]
    messages3 = [s for s in parse_stanzas(text3) if s.tag == f"{{{CLIENT_NS}}}message"]
    assert [s.findtext(f"{{{CLIENT_NS}}}body") for s in messages2] == [to_r2, to_bare], text2
    assert [s.findtext(f"{{{CLIENT_NS}}}body") for s in messages3] == [to_bare], text3
    for stanza in messages2 + messages3:
        assert stanza.get("from") == bob_jid, ET.tostring(stanza)
    assert messages2[0].get("to") == jid2


def test_message_to_offline_resource_of_online_user_goes_to_a_session(embedded_server, ca_file):
    """RFC 6121 §8.5.3.2.1: a message to an unknown resource of an online
    user is handled as if sent to the bare JID (chat: to a resource)."""
    alice, _ = login(embedded_server, ca_file)
    alice.send("<presence/>")  # only available resources get bare-JID messages
    alice.read_until(r"<presence\b")  # RFC 6121 §4.2.2: echoed to its sender
    bob, _ = login(embedded_server, ca_file, BOB, BOB_PW)
    token = uuid.uuid4().hex
    message(bob, f"{ALICE}/no-such-resource-{token[:6]}", token)
    assert token in alice.read_until(token)


# -- stream behaviour -----------------------------------------------------------------


def test_legacy_session_iq_gets_empty_result(embedded_server, ca_file):
    client, _ = login(embedded_server, ca_file)
    client.send("<iq type='set' id='sess'><session xmlns='urn:ietf:params:xml:ns:xmpp-session'/>"
                "</iq>")
    reply = read_stanza(client, "iq", "sess")
    assert reply.get("type") == "result", ET.tostring(reply)
    assert len(reply) == 0, ET.tostring(reply)
    assert_pong(client)


def test_whitespace_keepalives_do_not_break_the_stream(embedded_server, ca_file):
    client, _ = login(embedded_server, ca_file)
    for _ in range(20):
        client.send(" ")
    client.send("\n\t \r\n")
    assert_pong(client)
    client.send(" ")
    assert_pong(client)


def test_closing_handshake(embedded_server, ca_file):
    client, _ = login(embedded_server, ca_file)
    client.send("</stream:stream>")
    text = client.wait_closed(QUICK)
    assert text.strip() == "</stream:stream>", text
    assert client.eof


def test_closing_handshake_before_auth(embedded_server, ca_file):
    client = RawClient(embedded_server.c2s_port, ca_file)
    client.starttls(DOMAIN)
    client.send("</stream:stream>")
    text = client.wait_closed(QUICK)
    assert text.strip() == "</stream:stream>", text


def test_ping_server(embedded_server, ca_file):
    client, jid = login(embedded_server, ca_file)
    client.send(f"<iq type='get' id='p1' to='{DOMAIN}'><ping xmlns='urn:xmpp:ping'/></iq>")
    reply = read_stanza(client, "iq", "p1")
    assert reply.get("type") == "result" and reply.get("id") == "p1"
    assert reply.get("from") in (None, DOMAIN)
    assert reply.get("to") in (None, jid)
    # A ping without `to` is for the account, which the server answers too.
    client.send("<iq type='get' id='p2'><ping xmlns='urn:xmpp:ping'/></iq>")
    assert read_stanza(client, "iq", "p2").get("type") == "result"


# -- auth timeout -----------------------------------------------------------------------


def test_auth_timeout_closes_idle_unauthenticated_connections(tmp_path, cert_files, ca_file):
    with start_mlink(tmp_path / "s", DOMAIN, cert_files, users={ALICE: ALICE_PW},
                     edit_config=auth_timeout("1")) as server:
        silent = RawClient(server.c2s_port, ca_file)  # sends nothing at all
        opened = RawClient(server.c2s_port, ca_file)
        opened.starttls(DOMAIN)  # idles after TLS, before SASL
        started = time.monotonic()
        text = expect_stream_error(opened, "connection-timeout")
        assert "<stream:stream" not in text  # the post-TLS header was sent earlier
        text = expect_stream_error(silent, "connection-timeout")
        assert text.index("<stream:stream") < text.index("<stream:error>"), text
        assert time.monotonic() - started < 4.0
        # An authenticated, bound session is not subject to it.
        client, _ = login(server, ca_file)
        # Nothing arrives for longer than the auth timeout: the wait times out
        # (RawClient reports that as AssertionError, or the socket's TimeoutError).
        with pytest.raises((AssertionError, TimeoutError)):
            client.read_until("</stream:stream>", timeout=1.5)
        assert not client.eof
        assert_pong(client)


# -- accounts changed while running ----------------------------------------------------------


def test_user_add_passwd_delete_while_running(embedded_server, ca_file):
    config = str(embedded_server.config)
    carol = f"carol-{uuid.uuid4().hex[:6]}@localhost"
    client, outcome = authenticate(embedded_server, ca_file, carol, "x")
    assert sasl_failure(outcome) == "not-authorized", outcome

    mlink("user", "add", carol, "--password", "x", "--config", config)
    client, jid = login(embedded_server, ca_file, carol, "x")
    assert jid.startswith(carol + "/")
    assert_pong(client)

    mlink("user", "passwd", carol, "--password", "y", "--config", config)
    _, outcome = authenticate(embedded_server, ca_file, carol, "x")
    assert sasl_failure(outcome) == "not-authorized", outcome
    fresh, _ = login(embedded_server, ca_file, carol, "y")
    assert_pong(fresh)

    mlink("user", "delete", carol, "--config", config)
    _, outcome = authenticate(embedded_server, ca_file, carol, "y")
    assert sasl_failure(outcome) == "not-authorized", outcome
    # Others are unaffected.
    other, _ = login(embedded_server, ca_file, BOB, BOB_PW)
    assert_pong(other)


# -- shutdown ------------------------------------------------------------------------------


def test_sigterm_sends_system_shutdown_and_exits_zero(tmp_path, cert_files, ca_file):
    with start_mlink(tmp_path / "s", DOMAIN, cert_files, users={ALICE: ALICE_PW}) as server:
        client, _ = login(server, ca_file)
        assert_pong(client)
        unauthenticated = RawClient(server.c2s_port, ca_file)
        unauthenticated.starttls(DOMAIN)
        code = stop(server)
        assert code == 0, server.log.text()
        expect_stream_error(client, "system-shutdown")
        expect_stream_error(unauthenticated, "system-shutdown")
