"""XEP-0352 client state indication against a real server: while a client
is inactive, presence updates (the newest per contact) and chat states wait;
a message with a body, or `<active/>`, brings them, in order; a connection
lost meanwhile hands them to stream management for the resumed stream.

"Nothing arrived" is shown without waiting: stream management's `<a/>` is
not a stanza, so the server writes it in order after anything it let
through; whatever comes before it was sent, whatever does not was held."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.placement import TIMEOUT
from tests.rawclient import RawClient
from tests.serverproc import MlinkProcess, start_mlink
from tests.test_stream_management import SM, enable, login, read_more, resume

DOMAIN = "localhost"
CSI = "urn:xmpp:csi:0"
USERS = {f"{name}@{DOMAIN}": f"{name}-pw" for name in ("alice", "bob", "carol", "dave")}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory,
           cert_files: tuple[Path, Path]) -> Iterator[MlinkProcess]:
    setup = tmp_path_factory.mktemp("csi") / "s"
    with start_mlink(setup, DOMAIN, cert_files, users=USERS) as proc:
        yield proc


def sync(sender: RawClient) -> None:
    """Once the server answered `sender`'s ping, everything it sent before
    has been routed (a client's stanzas are handled in order)."""
    sender.send(f"<iq type='get' id='sync' to='{DOMAIN}'><ping xmlns='urn:xmpp:ping'/></iq>")
    sender.read_until(r"id=['\"]sync['\"]")


def so_far(client: RawClient) -> str:
    """What the server wrote to `client` up to an ack it asks for now."""
    client.send(f"<r xmlns='{SM}'/>")
    return client.read_until(r"<a xmlns=['\"]urn:xmpp:sm:3['\"][^>]*/>")


def status(bob: RawClient, to: str, text: str) -> None:
    bob.send(f"<presence to='{to}'><status>{text}</status></presence>")


def test_inactive_holds_presence_and_chat_states_until_a_message(server, ca_file):
    alice, bob = login(server, ca_file, "alice@localhost"), login(server, ca_file, "bob@localhost")
    features_client = RawClient(server.c2s_port, ca_file)
    features = features_client.authenticate(DOMAIN, "carol@localhost", USERS["carol@localhost"])
    assert re.search(rf"<csi xmlns=['\"]{CSI}['\"]", features), features
    features_client.close()
    enable(alice)
    alice.send(f"<inactive xmlns='{CSI}'/>")
    to = alice.jid  # type: ignore[attr-defined]
    for n in range(3):
        status(bob, to, f"s{n}")
    bob.send(f"<message to='{to}' type='chat'><composing "
             "xmlns='http://jabber.org/protocol/chatstates'/></message>")
    sync(bob)
    held = so_far(alice)
    assert "<presence" not in held and "composing" not in held, held
    # Something to read: the newest presence, the chat state, then the message.
    bob.send(f"<message to='{to}' type='chat' id='m1'><body>wake</body></message>")
    text = alice.read_until("wake</body>")
    assert ">s0<" not in text and ">s1<" not in text, text
    assert text.index(">s2<") < text.index("composing") < text.index(">wake<"), text
    # Still inactive: the next update waits again; <active/> brings it.
    status(bob, to, "s3")
    sync(bob)
    assert ">s3<" not in so_far(alice)
    alice.send(f"<inactive xmlns='{CSI}'/><active xmlns='{CSI}'/>")
    assert ">s3<" in alice.read_until("s3</status>")
    # Active: a presence comes at once.
    status(bob, to, "s4")
    sync(bob)
    assert ">s4<" in read_more(alice, so_far(alice), r"s4</status>")
    alice.close()
    bob.close()


def test_iq_and_subscription_requests_are_not_held(server, ca_file):
    alice, bob = login(server, ca_file, "alice@localhost"), login(server, ca_file, "bob@localhost")
    enable(alice)
    alice.send(f"<inactive xmlns='{CSI}'/>")
    to = alice.jid  # type: ignore[attr-defined]
    status(bob, to, "away-status")
    bob.send(f"<iq type='get' id='v1' to='{to}'><query xmlns='jabber:iq:version'/></iq>")
    text = alice.read_until(r"id=['\"]v1['\"]")
    assert text.index("away-status") < text.index("jabber:iq:version"), text
    alice.close()
    bob.close()


def test_held_stanzas_survive_a_cut_into_the_resumed_stream(server, ca_file):
    dave, bob = login(server, ca_file, "dave@localhost"), login(server, ca_file, "bob@localhost")
    previd, _ = enable(dave)
    dave.send(f"<inactive xmlns='{CSI}'/>")
    status(bob, dave.jid, "while-inactive")  # type: ignore[attr-defined]
    sync(bob)
    assert "while-inactive" not in so_far(dave)
    mark = server.log.mark()
    dave.close()
    server.log.wait_for(rf"session {re.escape(dave.jid)} held", TIMEOUT, mark)  # type: ignore[attr-defined]
    again, answer = resume(server, ca_file, "dave@localhost", previd, 0)
    assert "<resumed" in answer, answer
    assert "while-inactive" in read_more(again, answer, "while-inactive</status>")
    again.close()
    bob.close()
