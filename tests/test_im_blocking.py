"""XEP-0191 blocking command over real sockets: the list, its pushes, and
the filters in both directions."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Callable

from mlink.store import RosterItem
from tests import test_im_services as base
from tests.rawclient import CLIENT_NS, stanza_error_of
from tests.test_im_services import (
    ALICE,
    BOB,
    CAROL,
    DAVE,
    ERIN,
    FRANK,
    Client,
    body_of,
    is_message_with,
    put_roster_item,
)

# The shared server with six accounts, and its logged-in clients.
im_server = base.im_server
clients = base.clients

BLOCKING = "urn:xmpp:blocking"
BLOCKED_ERROR = "{urn:xmpp:blocking:errors}blocked"


def blocklist(client: Client) -> list[str]:
    reply = client.iq("get", f"<blocklist xmlns='{BLOCKING}'/>")
    assert reply.get("type") == "result", ET.tostring(reply)
    items = reply.findall(f"{{{BLOCKING}}}blocklist/{{{BLOCKING}}}item")
    return [item.get("jid", "") for item in items]


def command(client: Client, verb: str, *jids: str) -> ET.Element:
    items = "".join(f"<item jid='{jid}'/>" for jid in jids)
    return client.iq("set", f"<{verb} xmlns='{BLOCKING}'>{items}</{verb}>")


def is_push(verb: str) -> Callable[[ET.Element], bool]:
    return lambda s: s.get("type") == "set" and s.find(f"{{{BLOCKING}}}{verb}") is not None


def test_block_and_unblock_with_pushes(clients):
    watcher, other = clients(ALICE), clients(ALICE)
    assert blocklist(watcher) == []
    reply = command(other, "block", CAROL, DAVE)
    assert reply.get("type") == "result", ET.tostring(reply)
    # The session that asked for the list is told; the one that did not
    # ask is not (XEP-0191 §3.3), beyond its own result.
    push = watcher.expect(is_push("block"), "block push")
    pushed = {i.get("jid") for i in push.iter(f"{{{BLOCKING}}}item")}
    assert pushed == {CAROL, DAVE}
    assert push.get("to") == watcher.jid
    watcher.send(f"<iq type='result' id='{push.get('id')}'/>")
    assert other.sync() == []
    assert blocklist(other) == sorted([CAROL, DAVE])
    # Unblock one, then everything (an unblock without items).
    assert command(other, "unblock", DAVE).get("type") == "result"
    assert watcher.expect(is_push("unblock"), "unblock push") is not None
    assert blocklist(watcher) == [CAROL]
    assert command(other, "unblock").get("type") == "result"
    push = watcher.expect(is_push("unblock"), "unblock-all push")
    assert push.find(f"{{{BLOCKING}}}unblock/{{{BLOCKING}}}item") is None
    assert blocklist(watcher) == []


def test_bad_block_commands(clients):
    alice = clients(ALICE)
    assert stanza_error_of(command(alice, "block")) == ("modify", "bad-request")
    assert stanza_error_of(command(alice, "block", "@bad@")) == ("modify", "jid-malformed")
    # Nobody else may read a user's blocklist.
    bob = clients(BOB)
    stranger = bob.iq("get", f"<blocklist xmlns='{BLOCKING}'/>", ALICE)
    assert stanza_error_of(stranger) == ("cancel", "service-unavailable")
    assert blocklist(alice) == []


def test_blocked_contact_cannot_reach_the_user_and_back(clients):
    bob, carol = clients(BOB), clients(CAROL)
    assert command(bob, "block", CAROL).get("type") == "result"
    try:
        # Inbound: carol's message vanishes, her iq gets service-unavailable.
        carol.message(bob.jid, "hello from carol")
        iq = carol.iq("get", "<query xmlns='jabber:iq:version'/>", bob.jid)
        assert stanza_error_of(iq) == ("cancel", "service-unavailable")
        assert carol.sync() == []  # no error for the message: silently dropped
        assert [body_of(s) for s in bob.sync()] == []
        # Outbound: bob's message to carol is refused with the blocked error.
        message_id = bob.message(f"{CAROL}/anything", "hello from bob")
        error = bob.reply(message_id)
        assert stanza_error_of(error) == ("modify", "not-acceptable")
        assert error.find(f"{{{CLIENT_NS}}}error/{BLOCKED_ERROR}") is not None
        assert carol.sync() == []
        # Someone else still gets through to bob.
        dave = clients(DAVE)
        dave.message(bob.jid, "hello from dave")
        assert body_of(bob.expect(is_message_with("hello from dave"))) == "hello from dave"
    finally:
        assert command(bob, "unblock", CAROL).get("type") == "result"
    carol.message(bob.jid, "carol again")
    assert bob.expect(is_message_with("carol again")) is not None


def test_blocking_a_full_jid_blocks_only_that_resource(clients):
    bob = clients(BOB)
    carol_home, carol_work = clients(CAROL, "home"), clients(CAROL, "work")
    assert command(bob, "block", carol_home.jid).get("type") == "result"
    try:
        carol_home.message(bob.jid, "from home")
        carol_work.message(bob.jid, "from work")
        assert bob.expect(is_message_with("from work")) is not None
        carol_home.sync()
        assert [body_of(s) for s in bob.sync()] == []
    finally:
        assert command(bob, "unblock", carol_home.jid).get("type") == "result"


def is_presence_from(jid: str, kind: str | None = None) -> Callable[[ET.Element], bool]:
    return lambda s: (s.tag == f"{{{CLIENT_NS}}}presence" and s.get("from") == jid
                      and s.get("type") == kind)


def test_blocking_hides_presence_and_unblocking_restores_it(im_server, clients):
    # Mutual subscriptions, written while both are offline (so no roster
    # cache holds an older copy), as a subscription handshake leaves them.
    put_roster_item(im_server, ERIN, RosterItem(FRANK, subscription="both"))
    put_roster_item(im_server, FRANK, RosterItem(ERIN, subscription="both"))
    erin = clients(ERIN)
    erin.send("<presence/>")
    frank = clients(FRANK)
    frank.send("<presence/>")
    assert erin.expect(is_presence_from(frank.jid)) is not None
    assert frank.expect(is_presence_from(erin.jid)) is not None
    # §3.3: blocking tells frank that erin went offline ...
    assert command(erin, "block", FRANK).get("type") == "result"
    assert frank.expect(is_presence_from(erin.jid, "unavailable")) is not None
    # ... and her presence changes no longer reach him, nor his her.
    erin.send("<presence><show>away</show></presence>")
    frank.send("<presence><show>dnd</show></presence>")
    erin.sync()
    assert [s for s in frank.sync() if s.get("from") == erin.jid] == []
    assert [s for s in erin.sync() if s.get("from") == frank.jid] == []
    # §3.4: unblocking sends her presence again, and probes his.
    assert command(erin, "unblock", FRANK).get("type") == "result"
    shown = frank.expect(is_presence_from(erin.jid), "erin's presence")
    assert shown.findtext(f"{{{CLIENT_NS}}}show") == "away"
    probed = erin.expect(is_presence_from(frank.jid), "frank's presence")
    assert probed.findtext(f"{{{CLIENT_NS}}}show") == "dnd"


def test_a_blocklist_from_before_a_restart_filters_the_first_stanzas(tmp_path, cert_files,
                                                                       ca_file):
    """The server learns at start who blocks anyone (so the others' stanzas
    skip the blocklist read): a list written by the previous run must
    filter from the very first stanza of the next, in both directions."""
    from tests.serverproc import DOMAIN, serve, start_mlink, stop
    from tests.test_im_services import USERS

    with start_mlink(tmp_path, DOMAIN, cert_files, users=USERS) as first:
        bob = Client(first, ca_file, BOB)
        assert command(bob, "block", CAROL).get("type") == "result"
        bob.close()
        assert stop(first) == 0
    second = serve(first.config, DOMAIN)
    try:
        bob, carol = Client(second, ca_file, BOB), Client(second, ca_file, CAROL)
        bob.send("<presence/>")
        carol.message(bob.jid, "first words from carol")
        error = bob.reply(bob.message(carol.jid, "first words from bob"))
        assert stanza_error_of(error) == ("modify", "not-acceptable")
        assert carol.sync() == []
        assert [body_of(s) for s in bob.sync() if s.tag == f"{{{CLIENT_NS}}}message"] == []
        dave = Client(second, ca_file, DAVE)
        dave.message(bob.jid, "dave gets through")
        assert bob.expect(is_message_with("dave gets through")) is not None
    finally:
        assert stop(second) == 0, second.log.text()


async def test_a_peer_shard_coming_up_makes_the_blockers_be_read_again():
    """Invalidations a peer shard sent while the bus to it was down are
    lost: when it comes up, nobody counts as 'blocks nobody' (nor keeps a
    cached list) until the store was read again. A read that was under way
    when the peer came up is not used."""
    import logging
    from types import SimpleNamespace

    import trio

    from mlink.jid import parse_jid
    from mlink.modules.blocking import Blocklists

    class Data:
        def __init__(self) -> None:
            self.rows: dict[str, set[str]] = {}
            self.release = trio.Event()

        async def blocking_users(self) -> set[str]:
            found = {u for u, jids in self.rows.items() if jids}
            await self.release.wait()
            return found

        async def blocklist(self, user: str) -> set[str]:
            return set(self.rows.get(user, ()))

    data = Data()
    module = SimpleNamespace(
        data=data, log=logging.getLogger("test"),
        config=SimpleNamespace(caches=SimpleNamespace(blocklists=100)),
        router=SimpleNamespace(online=lambda jid: True),
        user_cache=lambda name, invalidate: (lambda user: None))
    lists = Blocklists(module)  # type: ignore[arg-type]
    bob, eve = parse_jid(BOB), parse_jid("eve@" + BOB.split("@")[1])
    async with trio.open_nursery() as nursery:
        nursery.start_soon(lists.keep_blockers)
        data.release.set()
        await trio.testing.wait_all_tasks_blocked()
        assert lists.blocks_nobody(bob) and not await lists.blocks(bob, eve)
        # Bob blocks eve on a shard whose bus is down: no announcement.
        data.rows[BOB] = {str(eve)}
        data.release = trio.Event()
        lists.peer_up()  # the bus comes up; a read starts
        assert not lists.blocks_nobody(bob)
        assert await lists.blocks(bob, eve)  # asked of the store meanwhile
        data.release.set()
        await trio.testing.wait_all_tasks_blocked()
        assert not lists.blocks_nobody(bob) and await lists.blocks(bob, eve)
        assert lists.blocks_nobody(parse_jid(CAROL))
        nursery.cancel_scope.cancel()
