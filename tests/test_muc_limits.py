"""The multi-user chat service's configurable limits, as users meet them:
occupants per room, rooms per user, message size, history size, idle
temporary rooms, and who may create rooms."""

from __future__ import annotations

import signal
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.rawclient import stanza_error_of
from tests.serverproc import DOMAIN, MlinkProcess, mlink, start_mlink
from tests.test_im_services import ALICE, BOB, CAROL, DAVE, USERS, Client, body_of
from tests.test_muc import (
    MUC_USER,
    SERVICE,
    codes,
    gets_groupchat,
    groupchat,
    is_presence_from,
    join,
    join_error,
    open_room,
)

OPTIONS = {"max-occupants": "2", "max-rooms-per-user": "2", "max-message-bytes": "512",
           "max-history": "2"}
# An idle room is destroyed within a fraction of its limit after it.
IDLE_WAIT = 10.0


def with_options(text: str, given: dict[str, str] = OPTIONS) -> str:
    options = "".join(f"<{k}>{v}</{k}>" for k, v in given.items())
    return text.replace("</mlink>", f'<modules><module name="muc">{options}</module>'
                                     "</modules>\n</mlink>")


@pytest.fixture(scope="module")
def limited(tmp_path_factory, cert_files) -> Iterator[MlinkProcess]:
    setup = tmp_path_factory.mktemp("muc-limits")
    with start_mlink(setup, DOMAIN, cert_files, users=USERS, edit_config=with_options) as s:
        yield s


@pytest.fixture
def clients(limited: MlinkProcess, ca_file: Path) -> Iterator[Callable[[str], Client]]:
    made: list[Client] = []

    def make(user: str) -> Client:
        client = Client(limited, ca_file, user)
        made.append(client)
        return client

    yield make
    for client in made:
        client.raw.close()


def test_room_admits_at_most_max_occupants_but_its_owner(clients):
    alice, bob, carol = clients(ALICE), clients(BOB), clients(CAROL)
    room = open_room(alice, "Alice")
    join(bob, room, "Bob")
    assert join_error(carol, room, "Carol") == ("wait", "service-unavailable")
    # The owner comes back in whatever the count (a second session).
    again = clients(ALICE)
    join(again, room, "Alice2")


def test_rooms_per_user(clients):
    dave = clients(DAVE)
    first = open_room(dave, "D")
    open_room(dave, "D")
    third = f"room-{uuid.uuid4().hex[:8]}@{SERVICE}"
    assert join_error(dave, third, "D") == ("cancel", "not-allowed")
    # Destroying one frees a place.
    reply = dave.iq("set", "<query xmlns='http://jabber.org/protocol/muc#owner'>"
                           "<destroy/></query>", first)
    assert reply.get("type") == "result"
    created = join(dave, third, "D")
    assert 201 in codes(created)


def test_message_size_and_history_size(clients):
    alice, bob = clients(ALICE), clients(BOB)
    room = open_room(alice, "Alice")
    alice.send(f"<message to='{room}' type='groupchat' id='big'><body>{'x' * 600}</body>"
               "</message>")
    assert stanza_error_of(alice.reply("big"))[1] == "policy-violation"
    for n in range(4):
        groupchat(alice, room, f"h{n}")
    gets_groupchat(alice, room, "Alice", "h3")
    join(bob, room, "Bob")
    history = [body_of(s) for s in bob.pending if body_of(s)]
    assert history == ["h2", "h3"]


def test_idle_temporary_room_is_destroyed(tmp_path, cert_files, ca_file):
    idle = {"idle-temporary": "1"}
    with start_mlink(tmp_path, DOMAIN, cert_files, users={ALICE: USERS[ALICE]},
                     edit_config=lambda text: with_options(text, idle)) as server:
        alice = Client(server, ca_file, ALICE)
        room = open_room(alice, "Alice")
        gone = alice.expect(is_presence_from(f"{room}/Alice", "unavailable"), "idle destroy",
                            timeout=IDLE_WAIT)
        assert gone.find(f"{{{MUC_USER}}}x/{{{MUC_USER}}}destroy") is not None
        alice.raw.close()


def test_occupants_hear_332_when_the_server_stops(tmp_path, cert_files, ca_file):
    with start_mlink(tmp_path, DOMAIN, cert_files, users={ALICE: USERS[ALICE]}) as server:
        alice = Client(server, ca_file, ALICE)
        room = open_room(alice, "Alice")
        server.proc.send_signal(signal.SIGTERM)
        text = alice.raw.read_until(r"</stream:stream>|system-shutdown", IDLE_WAIT)
        assert f"from='{room}/Alice'" in text or f'from="{room}/Alice"' in text, text
        assert "code='332'" in text or 'code="332"' in text, text
        assert text.index("332") < text.index("system-shutdown"), text
        alice.raw.close()
        server.proc.wait(timeout=30)


def test_idle_empty_persistent_room_is_removed_from_the_directory(tmp_path, cert_files,
                                                                  ca_file):
    idle = {"idle-persistent": "1"}
    with start_mlink(tmp_path, DOMAIN, cert_files, users={ALICE: USERS[ALICE]},
                     edit_config=lambda text: with_options(text, idle)) as server:
        alice = Client(server, ca_file, ALICE)
        room = open_room(alice, "Alice", **{"muc#roomconfig_persistentroom": "1"})
        shown = mlink("room", "show", room, "--config", str(server.config), check=False)
        assert shown.returncode == 0, shown.stderr
        alice.send(f"<presence to='{room}/Alice' type='unavailable'/>")
        alice.expect(is_presence_from(f"{room}/Alice", "unavailable"))
        deadline = time.monotonic() + IDLE_WAIT
        while True:
            shown = mlink("room", "show", room, "--config", str(server.config), check=False)
            if shown.returncode == 1 or time.monotonic() > deadline:
                break
        assert shown.returncode == 1 and "no persistent room" in shown.stderr
        alice.raw.close()
