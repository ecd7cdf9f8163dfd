"""XEP-0280 message carbons over real sockets, with raw clients and with
slixmpp's xep_0280 plugin."""

from __future__ import annotations

import asyncio
import ssl
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path

import slixmpp

from tests import test_im_services as base
from tests.rawclient import CLIENT_NS
from tests.slixclient import LOGIN_TIMEOUT
from tests.test_im_services import (
    ALICE,
    BOB,
    USERS,
    Client,
    body_of,
    is_message_with,
)

# The shared server with six accounts, and its logged-in clients.
im_server = base.im_server
clients = base.clients

CARBONS = "urn:xmpp:carbons:2"
FORWARD = "urn:xmpp:forward:0"


def enable(client: Client, verb: str = "enable") -> None:
    reply = client.iq("set", f"<{verb} xmlns='{CARBONS}'/>")
    assert reply.get("type") == "result", ET.tostring(reply)


def carbon(direction: str, body: str) -> Callable[[ET.Element], bool]:
    path = f"{{{CARBONS}}}{direction}/{{{FORWARD}}}forwarded/{{{CLIENT_NS}}}message"

    def match(stanza: ET.Element) -> bool:
        inner = stanza.find(path)
        return inner is not None and body_of(inner) == body

    return match


def test_received_and_sent_carbons(clients):
    phone, laptop = clients(BOB), clients(BOB)
    alice = clients(ALICE)
    enable(laptop)
    # A chat to the phone: the laptop gets a <received/> copy.
    alice.message(phone.jid, "to the phone")
    assert phone.expect(is_message_with("to the phone")) is not None
    copy = laptop.expect(carbon("received", "to the phone"), "received carbon")
    assert copy.get("from") == BOB and copy.get("to") == laptop.jid
    inner = copy.find(f"{{{CARBONS}}}received/{{{FORWARD}}}forwarded/{{{CLIENT_NS}}}message")
    assert inner is not None
    assert inner.get("from") == alice.jid and inner.get("to") == phone.jid
    # The phone answers: the laptop gets a <sent/> copy.
    phone.message(alice.jid, "from the phone")
    assert alice.expect(is_message_with("from the phone")) is not None
    copy = laptop.expect(carbon("sent", "from the phone"), "sent carbon")
    inner = copy.find(f"{{{CARBONS}}}sent/{{{FORWARD}}}forwarded/{{{CLIENT_NS}}}message")
    assert inner is not None and inner.get("from") == phone.jid
    # The phone did not enable carbons: it gets no copies of the laptop's.
    laptop.message(alice.jid, "from the laptop")
    assert alice.expect(is_message_with("from the laptop")) is not None
    # No copy of any kind (presence from another shard may still arrive).
    seen = phone.sync()
    assert not [s for s in seen if s.tag == f"{{{CLIENT_NS}}}message"], \
        [ET.tostring(s) for s in seen]


def test_private_no_copy_and_disabled_are_not_copied(clients):
    phone, laptop = clients(BOB), clients(BOB)
    alice = clients(ALICE)
    enable(laptop)
    alice.message(phone.jid, "private", extra=f"<private xmlns='{CARBONS}'/>")
    alice.message(phone.jid, "no copy", extra="<no-copy xmlns='urn:xmpp:hints'/>")
    alice.message(phone.jid, "headline", kind="headline")
    alice.message(phone.jid, "copied")
    assert laptop.expect(carbon("received", "copied")) is not None
    alice.sync()
    assert laptop.sync() == []
    enable(laptop, "disable")
    alice.message(phone.jid, "after disable")
    assert phone.expect(is_message_with("after disable")) is not None
    alice.sync()
    assert laptop.sync() == []


def test_slixmpp_carbons(im_server, ca_file: Path, clients):
    """slixmpp enables carbons with its xep_0280 plugin and sees a received
    and a sent carbon of its other session's chat."""
    phone, alice = clients(BOB), clients(ALICE)
    token = uuid.uuid4().hex[:8]

    async def run() -> tuple[str, str]:
        xmpp = slixmpp.ClientXMPP(f"{BOB}/slix-{token}", USERS[BOB])
        xmpp.register_plugin("xep_0280")
        xmpp.ssl_context = ssl.create_default_context(cafile=str(ca_file))
        received: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        sent: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        async def on_start(_event: object) -> None:
            await xmpp.plugin["xep_0280"].enable(timeout=LOGIN_TIMEOUT)
            ready.set_result(None)

        xmpp.add_event_handler("session_start", on_start)
        xmpp.add_event_handler(
            "carbon_received",
            lambda msg: received.done() or received.set_result(str(msg["carbon_received"]["body"])))
        xmpp.add_event_handler(
            "carbon_sent",
            lambda msg: sent.done() or sent.set_result(str(msg["carbon_sent"]["body"])))
        xmpp.connect(host="127.0.0.1", port=im_server.c2s_port)
        try:
            await asyncio.wait_for(ready, LOGIN_TIMEOUT)
            await asyncio.to_thread(alice.message, phone.jid, f"in {token}")
            got_in = await asyncio.wait_for(received, LOGIN_TIMEOUT)
            await asyncio.to_thread(phone.message, alice.jid, f"out {token}")
            got_out = await asyncio.wait_for(sent, LOGIN_TIMEOUT)
        finally:
            xmpp.disconnect()
        return got_in, got_out

    assert asyncio.run(run()) == (f"in {token}", f"out {token}")
