"""RFC 6121 §3 and §4 over real sockets: subscriptions with the roster
pushes on both sides, pre-approval, cancellation, presence broadcast,
probes, unavailable (also when a connection just drops), directed
presence, bare-JID routing by priority, and slixmpp as a real client."""

from __future__ import annotations

import asyncio
import ssl
import uuid
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import slixmpp

from tests.rawclient import CLIENT_NS
from tests.serverproc import DOMAIN, MlinkProcess
from tests.test_im_roster import (
    POOL_PASSWORD,
    Accounts,
    Match,
    XClient,
    befriend,
    error_condition,
    expect_push,
    im_server,  # noqa: F401 (the module-scoped server fixture)
    is_presence,
    is_push,
    roster_items,
    tag,
)

# A slixmpp exchange on loopback takes well under a second; this bounds it.
SLIX_TIMEOUT = 20.0


@pytest.fixture(scope="module")
def accounts(im_server: MlinkProcess, ca_file: Path) -> Accounts:  # noqa: F811
    return Accounts(im_server, ca_file, "p")


def pair(accounts: Accounts) -> tuple[XClient, XClient]:
    """Two fresh users, logged in, interested and available."""
    alice, bob = accounts.login(accounts.fresh()), accounts.login(accounts.fresh())
    alice.available()
    bob.available()
    return alice, bob


def is_message(body: str) -> Match:
    def match(s: ET.Element) -> bool:
        return tag(s) == "message" and s.findtext(f"{{{CLIENT_NS}}}body") == body
    return match


def chat(sender: XClient, to: str, body: str) -> None:
    sender.send(f"<message to='{to}' type='chat'><body>{body}</body></message>")


# -- subscriptions (§3) --------------------------------------------------------------------


def test_subscription_handshake_both_ways(accounts):
    alice, bob = pair(accounts)
    befriend(alice, bob)
    assert roster_items(alice.roster())[bob.bare].get("subscription") == "both"
    assert roster_items(bob.roster())[alice.bare].get("subscription") == "both"
    # A repeated request is answered by bob's side of the server (§3.1.3)
    # and changes nothing: alice's side ignores a `subscribed` it did not
    # ask for (A.3.3), and bob is not asked again.
    alice.presence(bob.bare, "subscribe")
    alice.sync()
    bob.sync()
    alice.assert_none(is_push(bob.bare), "a roster push for no change")
    alice.assert_none(is_presence(bob.bare, "subscribed"), "an unrequested subscribed")
    bob.assert_none(is_presence(alice.bare, "subscribe"), "request already granted")


def test_request_stamped_with_bare_jids_and_full_jid_target(accounts):
    """§3.1.2: from the user's bare JID; a full JID target means the bare."""
    alice, bob = pair(accounts)
    alice.send(f"<presence to='{bob.jid}' type='subscribe' id='s1'/>")
    request = bob.expect(is_presence(alice.bare, "subscribe"), "request")
    assert request.get("to") == bob.bare and request.get("id") == "s1"
    expect_push(alice, bob.bare, "none", ask=True)


def test_pre_approval(accounts):
    """§3.4: bob approves before alice asks; her request is then granted
    without reaching bob's clients."""
    alice, bob = pair(accounts)
    bob.presence(alice.bare, "subscribed")
    expect_push(bob, alice.bare, "none", approved=True)
    alice.sync()
    alice.assert_none(is_presence(bob.bare, "subscribed"), "subscribed before a request")
    alice.presence(bob.bare, "subscribe")
    expect_push(alice, bob.bare, "none", ask=True)
    expect_push(alice, bob.bare, "to")
    alice.expect(is_presence(bob.bare, "subscribed"), "automatic approval")
    alice.expect(is_presence(bob.jid, None), "bob's presence")
    expect_push(bob, alice.bare, "from")
    bob.sync()
    bob.assert_none(is_presence(alice.bare, "subscribe"), "a pre-approved request")


def test_pre_approval_cancelled_by_unsubscribed(accounts):
    alice, bob = pair(accounts)
    bob.presence(alice.bare, "subscribed")
    expect_push(bob, alice.bare, "none", approved=True)
    bob.presence(alice.bare, "unsubscribed")
    expect_push(bob, alice.bare, "none")
    alice.presence(bob.bare, "subscribe")
    bob.expect(is_presence(alice.bare, "subscribe"), "request, no longer pre-approved")
    alice.sync()
    alice.assert_none(is_presence(bob.bare, "unsubscribed"), "cancelled pre-approval sent on")


def test_denied_request(accounts):
    alice, bob = pair(accounts)
    alice.presence(bob.bare, "subscribe")
    expect_push(alice, bob.bare, "none", ask=True)
    bob.expect(is_presence(alice.bare, "subscribe"), "request")
    bob.presence(alice.bare, "unsubscribed")
    expect_push(alice, bob.bare, "none")
    alice.expect(is_presence(bob.bare, "unsubscribed"), "denial")
    # The request is answered: it is not delivered again at the next login.
    again = accounts.login(bob.bare)
    again.available()
    bob.sync()
    again.assert_none(is_presence(alice.bare, "subscribe"), "answered request")


def test_unsubscribe_then_unsubscribed(accounts):
    alice, bob = pair(accounts)
    befriend(alice, bob)
    # Alice stops following bob (§3.3): both sides drop one direction, and
    # bob's presence is withdrawn from alice.
    alice.presence(bob.bare, "unsubscribe")
    expect_push(alice, bob.bare, "from")
    expect_push(bob, alice.bare, "to")
    bob.expect(is_presence(alice.bare, "unsubscribe"), "unsubscribe")
    alice.expect(is_presence(bob.jid, "unavailable"), "bob's unavailable")
    # Alice revokes bob's subscription (§3.2): nothing is left, and bob
    # gets alice's unavailable.
    alice.presence(bob.bare, "unsubscribed")
    expect_push(alice, bob.bare, "none")
    expect_push(bob, alice.bare, "none")
    bob.expect(is_presence(alice.bare, "unsubscribed"), "unsubscribed")
    bob.expect(is_presence(alice.jid, "unavailable"), "alice's unavailable")
    # Presence no longer flows either way.
    alice.available("<show>away</show>")
    bob.available("<show>dnd</show>")
    alice.sync()
    bob.sync()
    alice.assert_none(is_presence(bob.jid, None), "presence without a subscription")
    bob.assert_none(is_presence(alice.jid, None), "presence without a subscription")


def test_request_to_offline_user_delivered_at_next_initial_presence(accounts):
    alice = accounts.login(accounts.fresh())
    alice.available()
    bob_bare = accounts.fresh()
    alice.send(f"<presence to='{bob_bare}' type='subscribe'><status>hi</status></presence>")
    expect_push(alice, bob_bare, "none", ask=True)
    bob = accounts.login(bob_bare)
    assert roster_items(bob.roster()) == {}  # a pending request is not a roster item
    bob.sync()
    bob.assert_none(is_presence(alice.bare, "subscribe"), "request before presence")
    bob.available()
    request = bob.expect(is_presence(alice.bare, "subscribe"), "stored request")
    assert request.findtext(f"{{{CLIENT_NS}}}status") == "hi"
    bob.presence(alice.bare, "subscribed")
    expect_push(alice, bob_bare, "to")
    alice.expect(is_presence(bob.jid, None), "bob's presence")


def test_request_to_missing_account_is_refused(accounts):
    """§3.1.3: no such account: `unsubscribed`, not an error."""
    alice = accounts.login(accounts.fresh())
    alice.available()
    nobody = f"nobody-{uuid.uuid4().hex[:8]}@{DOMAIN}"
    alice.presence(nobody, "subscribe")
    expect_push(alice, nobody, "none", ask=True)
    expect_push(alice, nobody, "none")
    alice.expect(is_presence(nobody, "unsubscribed"), "refusal")


def test_subscription_to_self_is_ignored(accounts):
    alice = accounts.login(accounts.fresh())
    alice.available()
    alice.presence(alice.bare, "subscribe")
    alice.sync()
    alice.assert_none(is_push(alice.bare), "a roster item for oneself")


# -- presence (§4) -------------------------------------------------------------------------


def test_broadcast_probe_and_unavailable_on_close(accounts):
    alice, bob = pair(accounts)
    befriend(alice, bob)
    bob.available("<show>away</show><status>lunch</status>")
    update = alice.expect(is_presence(bob.jid, None), "bob's update")  # §4.4.2
    assert update.findtext(f"{{{CLIENT_NS}}}status") == "lunch"
    # A second resource of alice: probes answered with bob's last presence
    # (§4.3.2), her first resource and bob hear of it, and it hears of her
    # first resource.
    second = accounts.login(alice.bare)
    second.available("<priority>3</priority>")
    probed = second.expect(is_presence(bob.jid, None), "probe answer")
    assert probed.get("to") == second.jid
    assert probed.findtext(f"{{{CLIENT_NS}}}status") == "lunch"
    second.expect(is_presence(alice.jid, None), "alice's other resource")
    alice.expect(is_presence(second.jid, None), "own new resource")
    bob.expect(is_presence(second.jid, None), "alice's new resource")
    # A closed stream ends in unavailable to contacts and own resources.
    second.close()
    bob.expect(is_presence(second.jid, "unavailable"), "unavailable on close")
    alice.expect(is_presence(second.jid, "unavailable"), "own resource gone")
    # So does an explicit unavailable.
    alice.send("<presence type='unavailable'><status>bye</status></presence>")
    gone = bob.expect(is_presence(alice.jid, "unavailable"), "explicit unavailable")
    assert gone.findtext(f"{{{CLIENT_NS}}}status") == "bye"


def test_unavailable_when_connection_drops(accounts):
    alice, bob = pair(accounts)
    befriend(alice, bob)
    alice.drop()
    bob.expect(is_presence(alice.jid, "unavailable"), "unavailable after a dropped socket")


def test_probe_of_offline_contact_is_answered_unavailable(accounts):
    alice, bob = pair(accounts)
    befriend(alice, bob)
    bob.close()
    alice.expect(is_presence(bob.jid, "unavailable"), "bob leaves")
    again = accounts.login(alice.bare)
    again.available()
    answer = again.expect(is_presence(bob.bare, "unavailable"), "probe answer for offline bob")
    assert answer.get("to") == again.jid


def test_probe_from_client_answered_only_for_subscribers(accounts):
    alice, bob = pair(accounts)
    carol = accounts.login(accounts.fresh())
    befriend(alice, bob)
    alice.presence(bob.bare, "probe")
    assert alice.expect(is_presence(bob.jid, None), "probe answer").get("to") == alice.jid
    carol.presence(bob.bare, "probe")
    carol.sync()
    carol.assert_none(lambda s: tag(s) == "presence", "presence of a non-contact")


def test_directed_presence_and_its_unavailable(accounts):
    alice, carol = pair(accounts)
    alice.send(f"<presence to='{carol.bare}'><show>chat</show></presence>")
    carol.expect(is_presence(alice.jid, None), "directed presence")
    # Not a contact: broadcasts do not reach carol (§4.6) ...
    alice.available("<show>away</show>")
    carol.sync()
    carol.assert_none(is_presence(alice.jid, None), "broadcast to a directed recipient")
    # ... but the end of the session does (§4.6.3).
    alice.close()
    carol.expect(is_presence(alice.jid, "unavailable"), "unavailable after directed presence")


def test_directed_presence_while_unavailable_also_gets_unavailable(accounts):
    alice = accounts.login(accounts.fresh())  # never sends broadcast presence
    carol = accounts.login(accounts.fresh())
    carol.available()
    alice.send(f"<presence to='{carol.jid}'/>")
    carol.expect(is_presence(alice.jid, None), "directed presence")
    alice.drop()
    carol.expect(is_presence(alice.jid, "unavailable"), "unavailable after directed presence")


@pytest.mark.parametrize(("payload", "condition"), [
    ("<priority>high</priority>", "bad-request"),
    ("<priority>128</priority>", "bad-request"),
])
def test_bad_priority(accounts, payload, condition):
    alice = accounts.login(accounts.fresh())
    alice.send(f"<presence id='bad'>{payload}</presence>")
    reply = alice.expect(lambda s: tag(s) == "presence" and s.get("id") == "bad", "error")
    assert error_condition(reply) == condition


def test_unknown_presence_type_is_bad_request(accounts):
    alice = accounts.login(accounts.fresh())
    alice.send("<presence id='odd' type='visible'/>")
    reply = alice.expect(lambda s: tag(s) == "presence" and s.get("id") == "odd", "error")
    assert error_condition(reply) == "bad-request"


# -- bare-JID messages by priority (§8.5.2.1.1) --------------------------------------------


def login_with_priority(accounts: Accounts, user: str, priority: int) -> XClient:
    client = accounts.login(user, roster=False)
    client.available(f"<priority>{priority}</priority>")
    return client


@pytest.mark.parametrize(("priorities", "receivers"), [
    ((5, 1), (0,)),
    ((5, 5), (0, 1)),
    ((-1, 0), (1,)),
])
def test_bare_jid_messages_go_to_the_highest_priority(accounts, priorities, receivers):
    user = accounts.fresh()
    resources = [login_with_priority(accounts, user, p) for p in priorities]
    sender = accounts.login(accounts.fresh(), roster=False)
    body = "bare-" + uuid.uuid4().hex
    chat(sender, user, body)
    for i, client in enumerate(resources):
        if i in receivers:
            client.expect(is_message(body), f"message for priority {priorities[i]}")
        else:
            # Sent after, on the same path: had the first come, it would be here.
            marker = "marker-" + uuid.uuid4().hex
            chat(sender, client.jid, marker)
            client.expect(is_message(marker), "marker")
            client.assert_none(is_message(body), f"message at priority {priorities[i]}")


def test_negative_priority_never_gets_bare_messages(accounts):
    user = accounts.fresh()
    only = login_with_priority(accounts, user, -5)
    sender = accounts.login(accounts.fresh(), roster=False)
    body = "bare-" + uuid.uuid4().hex
    chat(sender, user, body)
    marker = "marker-" + uuid.uuid4().hex
    chat(sender, only.jid, marker)
    only.expect(is_message(marker), "marker")
    only.assert_none(is_message(body), "bare message at negative priority")


# -- slixmpp, a real client ----------------------------------------------------------------


def test_slixmpp_subscribe_presence_and_chat(accounts, im_server, ca_file):  # noqa: F811
    """Two slixmpp clients: one asks, the other (auto-authorising, as
    slixmpp does by default) approves and subscribes back; each sees the
    other online, and a chat message goes through."""
    a, b = accounts.fresh(), accounts.fresh()

    async def run() -> dict[str, object]:
        seen: dict[str, object] = {}
        ctx = ssl.create_default_context(cafile=str(ca_file))
        clients = {}
        sessions: dict[str, asyncio.Future[None]] = {}
        loop = asyncio.get_running_loop()
        both_online = loop.create_future()
        got_message = loop.create_future()
        for jid in (a, b):
            client = slixmpp.ClientXMPP(jid, POOL_PASSWORD)
            client.ssl_context = ctx
            clients[jid] = client
            sessions[jid] = loop.create_future()

            async def on_start(_event: object, client: slixmpp.ClientXMPP = client,
                               jid: str = jid) -> None:
                await client.get_roster()
                client.send_presence()
                sessions[jid].done() or sessions[jid].set_result(None)

            client.add_event_handler("session_start", on_start)
        online: set[str] = set()

        def on_available(presence: slixmpp.Presence) -> None:
            online.add(f"{presence['to'].bare}<-{presence['from'].bare}")
            if {f"{a}<-{b}", f"{b}<-{a}"} <= online and not both_online.done():
                both_online.set_result(None)

        def on_message(msg: slixmpp.Message) -> None:
            if msg["type"] == "chat" and not got_message.done():
                got_message.set_result(msg["body"])

        for client in clients.values():
            client.add_event_handler("got_online", on_available)
        clients[b].add_event_handler("message", on_message)
        for client in clients.values():
            client.connect(host="127.0.0.1", port=im_server.c2s_port)
        try:
            await asyncio.wait_for(asyncio.gather(*sessions.values()), SLIX_TIMEOUT)
            clients[a].send_presence_subscription(pto=b)
            await asyncio.wait_for(both_online, SLIX_TIMEOUT)
            seen["a_sub"] = clients[a].client_roster[b]["subscription"]
            seen["b_sub"] = clients[b].client_roster[a]["subscription"]
            clients[a].send_message(mto=b, mbody="hello over mlink", mtype="chat")
            seen["body"] = await asyncio.wait_for(got_message, SLIX_TIMEOUT)
        finally:
            for client in clients.values():
                client.disconnect()
        return seen

    seen = asyncio.run(run())
    assert seen == {"a_sub": "both", "b_sub": "both", "body": "hello over mlink"}
