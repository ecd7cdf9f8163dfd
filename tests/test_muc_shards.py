"""Multi-user chat across two shard processes: a room lives on the shard
`owner(room JID)` names, its occupants on either, and a message to several
occupants on the other shard crosses the bus once."""

from __future__ import annotations

import os
import re
import signal
import uuid
import xml.etree.ElementTree as ET
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.placement import Placement
from tests.rawclient import CLIENT_NS, RawClient
from tests.serverproc import DOMAIN, MlinkProcess, mlink, start_mlink
from tests.test_im_services import Client
from tests.test_muc import (
    DISCO_INFO,
    MUC,
    SERVICE,
    codes,
    configure,
    gets_groupchat,
    groupchat,
    instant,
    item,
    join,
)

USERS = {f"{u}@{DOMAIN}": f"{u}-pw" for u in ("alice", "bob", "carol")}
ALICE, BOB, CAROL = USERS
SHARDS = 2
# Tries to see a quiet bus for the frame count (a shard's periodic room
# listing may cross at the same moment).
FRAME_COUNT_TRIES = 3
# A killed shard is restarted and has read its rooms well within this.
RESTART_TIMEOUT = 30.0


class PlacedClient(Client):
    """A `Client` around a session already placed on a chosen shard."""

    def __init__(self, raw: RawClient, bare: str) -> None:  # noqa: D107
        self.raw = raw
        self.jid = raw.jid  # type: ignore[attr-defined]
        self.bare = bare
        self.pending = []
        self._parser = ET.XMLPullParser(events=("start", "end"))
        self._parser.feed(f"<root xmlns='{CLIENT_NS}' "
                          "xmlns:stream='http://etherx.jabber.org/streams'>")
        self._depth = 0


def room_on(shard: int) -> str:
    """A new room JID that shard `shard` owns (CRC-32, as the cluster)."""
    while True:
        room = f"room-{uuid.uuid4().hex[:8]}@{SERVICE}"
        if zlib.crc32(room.encode()) % SHARDS == shard:
            return room


@pytest.fixture(scope="module")
def served(tmp_path_factory, cert_files) -> Iterator[MlinkProcess]:
    setup = tmp_path_factory.mktemp("muc-shards") / "s"
    with start_mlink(setup, DOMAIN, cert_files, users=USERS, shards=SHARDS) as server:
        yield server


@pytest.fixture
def place(served: MlinkProcess, ca_file: Path) -> Iterator[Placement]:
    placement = Placement(served.log, served.c2s_port, ca_file, USERS)
    yield placement
    placement.close_all()


def on(place: Placement, shard: int, user: str) -> PlacedClient:
    return PlacedClient(place.login_on(shard, user), user)


def frames_out(served: MlinkProcess, link: str) -> int:
    status = mlink("status", "--config", str(served.config)).stdout
    found = re.search(rf"^\s*{link}: (\d+)/\d+ out", status, re.M)
    assert found, status
    return int(found[1])


def test_room_on_one_shard_occupants_on_both(served, place):
    room = room_on(0)
    alice = on(place, 1, ALICE)  # the owner, on the other shard than the room
    bob = on(place, 1, BOB)
    carol = on(place, 0, CAROL)
    created = join(alice, room, "Alice")
    assert 201 in codes(created)
    instant(alice, room)
    join(bob, room, "Bob")
    join(carol, room, "Carol")
    alice.sync()
    bob.sync()
    groupchat(carol, room, "from shard 0")
    for client in (alice, bob, carol):
        gets_groupchat(client, room, "Carol", "from shard 0")
    groupchat(bob, room, "from shard 1")
    for client in (alice, bob, carol):
        gets_groupchat(client, room, "Bob", "from shard 1")
    # A private message from shard 0 to an occupant on shard 1.
    carol.send(f"<message to='{room}/Alice' type='chat'><body>pm</body></message>")
    pm = alice.expect(lambda s: s.findtext(f"{{{CLIENT_NS}}}body") == "pm")
    assert pm.get("from") == f"{room}/Carol"


def test_fan_out_crosses_the_bus_once_per_shard(served, place):
    room = room_on(0)
    owner = on(place, 0, CAROL)
    join(owner, room, "Carol")
    instant(owner, room)
    far = [on(place, 1, ALICE), on(place, 1, BOB)]
    for n, client in enumerate(far):
        join(client, room, f"far{n}")
    owner.sync()
    for client in far:
        client.sync()
    counts = []
    for attempt in range(FRAME_COUNT_TRIES):
        before = frames_out(served, "0->1")
        body = f"fan-out {attempt}"
        groupchat(owner, room, body)
        for client in far:
            gets_groupchat(client, room, "Carol", body)
        gets_groupchat(owner, room, "Carol", body)
        counts.append(frames_out(served, "0->1") - before)
        if counts[-1] == 1:
            break
    # Two occupants on shard 1, one frame (the message once, two recipients).
    assert 1 in counts, counts


def test_join_from_other_shard_sees_self_presence_and_subject(served, place):
    room = room_on(1)
    alice = on(place, 0, ALICE)
    alice.send(f"<presence to='{room}/A'><x xmlns='{MUC}'/></presence>")
    own = alice.expect(lambda s: s.get("from") == f"{room}/A" and 110 in codes(s))
    assert {110, 201} <= codes(own)


def shard_pids(served: MlinkProcess) -> dict[int, int]:
    status = mlink("status", "--config", str(served.config)).stdout
    return {int(m[1]): int(m[2]) for m in re.finditer(r"^\s+(\d+)\s+(\d+)\s+ready", status,
                                                       re.M)}


def test_a_restarted_shard_brings_its_persistent_rooms_back(served, place):
    room = room_on(1)
    alice = on(place, 0, ALICE)  # stays connected: her shard lives on
    created = join(alice, room, "Alice")
    assert 201 in codes(created)
    reply = configure(alice, room, **{"muc#roomconfig_persistentroom": "1",
                                      "muc#roomconfig_roomname": "Survivor"})
    assert reply.get("type") == "result", ET.tostring(reply)
    groupchat(alice, room, "before the crash")
    gets_groupchat(alice, room, "Alice", "before the crash")
    pid = shard_pids(served)[1]
    mark = served.log.mark()
    os.kill(pid, signal.SIGKILL)
    served.log.wait_for(r"shard 1 ready", RESTART_TIMEOUT, mark)
    served.log.wait_for(rf"shard-1 .*room {re.escape(room)} loaded from the directory",
                        RESTART_TIMEOUT, mark)
    # Alice enters again: the room is there (no 201), as configured, with its history.
    alice.send(f"<presence to='{room}/Alice' type='unavailable'/>")  # her client's view
    again = join(alice, room, "Alice")
    assert 201 not in codes(again)
    assert item(again).get("affiliation") == "owner"
    bodies = [s.findtext(f"{{{CLIENT_NS}}}body") for s in alice.sync()
              if s.findtext(f"{{{CLIENT_NS}}}body")]
    assert bodies == ["before the crash"]
    info = alice.iq("get", f"<query xmlns='{DISCO_INFO}'/>", room)
    identity = info.find(f"{{{DISCO_INFO}}}query/{{{DISCO_INFO}}}identity")
    assert identity is not None and identity.get("name") == "Survivor"
