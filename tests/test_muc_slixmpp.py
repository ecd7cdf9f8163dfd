"""Multi-user chat with a real client library: slixmpp's xep_0045 (and
xep_0249 for direct invitations) against `mlink serve`."""

from __future__ import annotations

import asyncio
import ssl
import uuid
from pathlib import Path

import slixmpp

from tests import test_im_services as base
from tests.serverproc import MlinkProcess
from tests.test_im_services import ALICE, BOB, USERS

im_server = base.im_server
# The whole conversation, on loopback, takes well under a second.
SCENARIO_TIMEOUT = 30.0
SERVICE = "conference.localhost"


async def connect(server: MlinkProcess, ca_file: Path, jid: str) -> slixmpp.ClientXMPP:
    client = slixmpp.ClientXMPP(jid + "/sx-" + uuid.uuid4().hex[:6], USERS[jid])
    for plugin in ("xep_0030", "xep_0045", "xep_0249", "xep_0004"):
        client.register_plugin(plugin)
    client.ssl_context = ssl.create_default_context(cafile=str(ca_file))
    started = asyncio.get_running_loop().create_future()
    client.add_event_handler("session_start", lambda _e: started.done()
                             or started.set_result(None))
    client.connect(host="127.0.0.1", port=server.c2s_port)
    await started
    client.send_presence()
    return client


def test_slixmpp_room_life(im_server, ca_file):
    room = slixmpp.JID(f"sx-{uuid.uuid4().hex[:8]}@{SERVICE}")

    async def scenario() -> None:
        alice = await connect(im_server, ca_file, ALICE)
        bob = await connect(im_server, ca_file, BOB)
        try:
            amuc, bmuc = alice.plugin["xep_0045"], bob.plugin["xep_0045"]
            own, _subject, _occupants, _history = await amuc.join_muc_wait(room, "Alice",
                                                                          timeout=10)
            assert "201" in {str(c) for c in own["muc"]["status_codes"]}
            # The owner's configuration round trip, as clients do it.
            form = await amuc.get_room_config(room)
            form.set_values({"muc#roomconfig_roomname": "Slix room"})
            await amuc.set_room_config(room, form)
            info = await alice.plugin["xep_0030"].get_info(jid=room)
            identities = info["disco_info"]["identities"]
            assert ("conference", "text", None, "Slix room") in identities, identities
            # Three messages, and their reflection to alice (the room has
            # them all) before bob joins: his join is another connection,
            # which could otherwise overtake them.
            echoed: asyncio.Future = asyncio.get_running_loop().create_future()

            def on_echo(msg: slixmpp.Message) -> None:
                if msg["body"] == "early 2" and not echoed.done():
                    echoed.set_result(msg)

            alice.add_event_handler("groupchat_message", on_echo)
            for n in range(3):
                alice.send_message(mto=room, mbody=f"early {n}", mtype="groupchat")
            await asyncio.wait_for(echoed, 10)
            # Bob joins with one message of history.
            _own, subject, occupants, history = await bmuc.join_muc_wait(
                room, "Bob", maxstanzas=1, timeout=10)
            assert [m["body"] for m in history] == ["early 2"]
            assert "Alice" in {p["muc"]["nick"] for p in occupants}
            # Bob talks; Alice hears it from Bob's room JID.
            heard: asyncio.Future = asyncio.get_running_loop().create_future()

            def on_groupchat(msg: slixmpp.Message) -> None:
                if msg["body"] == "hello from bob" and not heard.done():
                    heard.set_result(msg)

            alice.add_event_handler("groupchat_message", on_groupchat)
            bob.send_message(mto=room, mbody="hello from bob", mtype="groupchat")
            msg = await asyncio.wait_for(heard, 10)
            assert msg["from"] == slixmpp.JID(f"{room}/Bob")
            # A direct invitation (XEP-0249) reaches Bob untouched.
            invited: asyncio.Future = asyncio.get_running_loop().create_future()
            bob.add_event_handler("groupchat_direct_invite",
                                  lambda m: invited.done() or invited.set_result(m))
            alice.plugin["xep_0249"].send_invitation(slixmpp.JID(BOB), room, reason="come")
            invite = await asyncio.wait_for(invited, 10)
            assert invite["groupchat_invite"]["jid"] == room
            # Alice kicks Bob: Bob sees his own removal with 307.
            kicked: asyncio.Future = asyncio.get_running_loop().create_future()

            def on_presence(pres: slixmpp.Presence) -> None:
                if pres["type"] == "unavailable" and pres["from"] == slixmpp.JID(
                        f"{room}/Bob") and not kicked.done():
                    kicked.set_result(pres)

            bob.add_event_handler("groupchat_presence", on_presence)
            await amuc.set_role(room, "Bob", "none", reason="bye")
            gone = await asyncio.wait_for(kicked, 10)
            assert {"307", "110"} <= {str(c) for c in gone["muc"]["status_codes"]}
        finally:
            alice.disconnect()
            bob.disconnect()

    asyncio.run(asyncio.wait_for(scenario(), SCENARIO_TIMEOUT))
