"""XEP-0160 offline messages over real sockets: stored durably across a
server restart, delivered in order with XEP-0203 delay stamps at the next
initial presence, bounded per user."""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from tests.rawclient import CLIENT_NS, stanza_error_of
from tests.serverproc import DOMAIN, serve, start_mlink, stop
from tests.test_im_services import ALICE, BOB, CAROL, USERS, Client, body_of, is_message_with

DELAY = "{urn:xmpp:delay}delay"
# The limit the bounded server is configured with.
SMALL_LIMIT = 2


def is_message(stanza: ET.Element) -> bool:
    return stanza.tag == f"{{{CLIENT_NS}}}message"


def test_offline_messages_survive_a_restart(tmp_path: Path, cert_files, ca_file):
    with start_mlink(tmp_path, DOMAIN, cert_files, users=USERS) as first:
        # Bob blocks carol, then leaves: her messages must not wait for him.
        bob = Client(first, ca_file, BOB)
        reply = bob.iq("set", f"<block xmlns='urn:xmpp:blocking'><item jid='{CAROL}'/></block>")
        assert reply.get("type") == "result", ET.tostring(reply)
        bob.close()
        alice, carol = Client(first, ca_file, ALICE), Client(first, ca_file, CAROL)
        for n in range(3):
            alice.message(BOB, f"offline {n}")
        alice.message(BOB, "a headline is not kept", kind="headline")
        carol.message(BOB, "from a blocked sender")
        # Stored, not bounced: no error came back to either sender.
        assert alice.sync() == [] and carol.sync() == []
        assert stop(first) == 0
    second = serve(first.config, DOMAIN)
    try:
        bob = Client(second, ca_file, BOB)
        bob.send("<presence/>")
        got = [bob.expect(is_message, f"offline message {n}") for n in range(3)]
        assert [body_of(m) for m in got] == ["offline 0", "offline 1", "offline 2"]
        for message in got:
            assert message.get("from", "").startswith(ALICE + "/")
            delay = message.find(DELAY)
            assert delay is not None, ET.tostring(message)
            assert delay.get("from") == DOMAIN
            assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", delay.get("stamp", ""))
        assert [body_of(s) for s in bob.sync() if is_message(s)] == []
        bob.close()
        # Delivered once: the next session finds nothing waiting.
        again = Client(second, ca_file, BOB)
        again.send("<presence/>")
        assert [body_of(s) for s in again.sync() if is_message(s)] == []
    finally:
        assert stop(second) == 0, second.log.text()


@pytest.fixture(scope="module")
def small_server(tmp_path_factory: pytest.TempPathFactory, cert_files):
    def limit(text: str) -> str:
        edited = re.sub(r'offline-limit="\d+"', f'offline-limit="{SMALL_LIMIT}"', text)
        assert edited != text, text
        return edited

    setup = tmp_path_factory.mktemp("mlink-offline")
    with start_mlink(setup, DOMAIN, cert_files, users=USERS, edit_config=limit) as server:
        yield server


def test_past_the_limit_senders_get_service_unavailable(small_server, ca_file):
    alice = Client(small_server, ca_file, ALICE)
    kept = [alice.message(CAROL, f"kept {n}") for n in range(SMALL_LIMIT)]
    refused = alice.message(CAROL, "one too many")
    error = alice.reply(refused)
    assert stanza_error_of(error) == ("cancel", "service-unavailable")
    assert all(s.get("id") not in kept for s in alice.sync())


def test_no_storage_for_missing_accounts_or_groupchat(small_server, ca_file):
    alice = Client(small_server, ca_file, ALICE)
    missing = alice.message("nobody@localhost", "anyone there?")
    assert stanza_error_of(alice.reply(missing)) == ("cancel", "service-unavailable")
    groupchat = alice.message(BOB, "not a room", kind="groupchat")
    assert stanza_error_of(alice.reply(groupchat)) == ("cancel", "service-unavailable")
    # A message marked no-store (XEP-0334) is bounced rather than kept.
    hinted = alice.message(BOB, "do not keep", extra="<no-store xmlns='urn:xmpp:hints'/>")
    assert stanza_error_of(alice.reply(hinted)) == ("cancel", "service-unavailable")


def test_messages_wait_for_initial_presence(small_server, ca_file):
    """A session that has not sent initial presence gets nothing stored;
    the presence brings it."""
    bob = Client(small_server, ca_file, BOB)
    alice = Client(small_server, ca_file, ALICE)
    alice.message(BOB, "waiting for you")
    assert alice.sync() == []
    assert [s for s in bob.sync() if is_message(s)] == []
    bob.send("<presence/>")
    assert bob.expect(is_message_with("waiting for you")) is not None
