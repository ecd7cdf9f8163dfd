"""`mlink room list|show|create|destroy` on the embedded directory of a
running server: the server follows what the command writes."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.serverproc import DOMAIN, MlinkProcess, mlink, start_mlink
from tests.test_im_services import ALICE, BOB, USERS, Client
from tests.test_muc import (
    DISCO_INFO,
    MUC_USER,
    codes,
    is_presence_from,
    item,
    join,
)

SERVICE = f"conference.{DOMAIN}"
# The embedded feed sees a file write within its interval.
WAIT = 15.0


@pytest.fixture(scope="module")
def served(tmp_path_factory, cert_files) -> Iterator[MlinkProcess]:
    setup = tmp_path_factory.mktemp("muc-cli")
    users = {ALICE: USERS[ALICE], BOB: USERS[BOB]}
    with start_mlink(setup, DOMAIN, cert_files, users=users) as server:
        yield server


def room_cli(server: MlinkProcess, *args: str, check: bool = True):  # type: ignore[no-untyped-def]
    return mlink("room", *args, "--config", str(server.config), check=check)


def test_create_list_show_destroy(served, ca_file: Path):
    room = f"cli-room@{SERVICE}"
    out = room_cli(served, "create", room, "--owner", ALICE, "--name", "Board",
                   "--members-only").stdout
    assert out.strip() == f"created {room}"
    listed = room_cli(served, "list").stdout.splitlines()
    assert f"{room}  Board  (members-only)" in listed
    shown = room_cli(served, "show", room).stdout.splitlines()
    assert "name: Board" in shown and f"owners: {ALICE}" in shown
    again = room_cli(served, "create", room, "--owner", ALICE, check=False)
    assert again.returncode == 1 and again.stderr.strip() == f"mlink: room {room} exists"
    # The running server has it: the owner enters without creating it.
    alice = Client(served, ca_file, ALICE)
    deadline = time.monotonic() + WAIT
    while True:
        info = alice.iq("get", f"<query xmlns='{DISCO_INFO}'/>", room)
        if info.get("type") == "result" or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert info.get("type") == "result"
    mine = join(alice, room, "Alice")
    assert 201 not in codes(mine) and item(mine).get("affiliation") == "owner"
    out = room_cli(served, "destroy", room).stdout
    assert out.strip() == f"destroyed {room}"
    gone = alice.expect(is_presence_from(f"{room}/Alice", "unavailable"), timeout=WAIT)
    assert gone.find(f"{{{MUC_USER}}}x/{{{MUC_USER}}}destroy") is not None
    alice.raw.close()
    missing = room_cli(served, "destroy", room, check=False)
    assert missing.returncode == 1
    assert missing.stderr.strip() == f"mlink: no persistent room {room}"


@pytest.mark.parametrize("args,error", [
    (("show", "not a jid@"), "invalid room JID"),
    (("show", f"room@elsewhere.{DOMAIN}"), "is not a chat service of this server"),
    (("show", f"nobody@{SERVICE}"), "no persistent room"),
    (("create", f"r@{SERVICE}", "--owner", ALICE, "--member-group", "cn=none,dc=example,dc=com"),
     "no directory group"),
])
def test_errors_are_one_line_and_exit_1(served, args, error):
    result = room_cli(served, *args, check=False)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and error in lines[0], result.stderr
