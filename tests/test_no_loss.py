"""Nothing the server accepted is lost (issue 12, findings 1 and 2), over
real TLS with raw clients:

1. a backlog of offline messages larger than a session's output bound used
   to be queued at once, the session cut for "not reading", and every row
   deleted anyway — a stranger could wipe anyone's offline queue;
2. a session cut for not reading stayed in the session table, and what
   arrived for it meanwhile vanished (neither bounced nor stored).
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.rawclient import RawClient
from tests.serverproc import DOMAIN, MlinkProcess, start_mlink

ERIN, CAROL, MALLORY = f"erin@{DOMAIN}", f"carol@{DOMAIN}", f"mallory@{DOMAIN}"
USERS = {ERIN: "erin-pw", CAROL: "carol-pw", MALLORY: "mallory-pw"}
# Mallory's backlog: well past the 4 MiB output bound plus what kernel
# buffers on loopback absorb, each message under the 256 KiB stanza limit.
LARGE_MESSAGES = 30
LARGE_BODY = 230_000
SMALL_MESSAGES = 5
# After the cut, messages that must all reach offline storage.
LATER_MESSAGES = 20
# Reading 7 MB through TLS in Python, on a loaded machine.
BULK_TIMEOUT = 120.0


@pytest.fixture
def server(tmp_path: Path, cert_files: tuple[Path, Path]) -> Iterator[MlinkProcess]:
    with start_mlink(tmp_path, DOMAIN, cert_files, users=USERS) as proc:
        yield proc


def login(server: MlinkProcess, ca_file: Path, user: str) -> RawClient:
    client = RawClient(server.c2s_port, ca_file)
    client.login(DOMAIN, user, USERS[user], resource="r-" + uuid.uuid4().hex[:8])
    return client


def send_message(client: RawClient, to: str, body: str) -> None:
    client.send(f"<message to='{to}' type='chat'><body>{body}</body></message>")


def round_trip(client: RawClient) -> None:
    """Everything the client sent before has been handled by the server."""
    marker = uuid.uuid4().hex[:8]
    client.send(f"<iq type='get' id='{marker}' to='{DOMAIN}'><ping xmlns='urn:xmpp:ping'/></iq>")
    client.read_until(f"id='{marker}'")


def test_a_large_offline_backlog_is_delivered_not_wiped(server, ca_file):
    carol, mallory = login(server, ca_file, CAROL), login(server, ca_file, MALLORY)
    small = [f"small-{n}-{uuid.uuid4().hex}" for n in range(SMALL_MESSAGES)]
    for token in small:
        send_message(carol, ERIN, token)
    round_trip(carol)
    filler = "x" * LARGE_BODY
    large = [f"large-{n}-{uuid.uuid4().hex}" for n in range(LARGE_MESSAGES)]
    for token in large:
        send_message(mallory, ERIN, token + filler)
        round_trip(mallory)  # stored, not bounced
    erin = login(server, ca_file, ERIN)
    erin.send("<presence/>")
    got = erin.read_until(large[-1], BULK_TIMEOUT)
    for token in small + large:
        assert token in got, f"{token} missing"
    assert "policy-violation" not in got and not erin.eof
    erin.close()
    # Delivered and written: nothing left for the next login.
    again = login(server, ca_file, ERIN)
    again.send("<presence/>")
    round_trip(again)
    marker = uuid.uuid4().hex
    send_message(carol, ERIN, marker)
    try:
        text = again.read_until(marker)
    except AssertionError:
        print(server.log.text()[-4000:])
        raise
    assert not any(t in text for t in small)


def test_messages_for_a_session_cut_for_not_reading_reach_offline_storage(server, ca_file):
    erin = login(server, ca_file, ERIN)
    erin.send("<presence/>")
    erin.read_until("<presence")  # its own echo; from now on erin reads nothing
    carol = login(server, ca_file, CAROL)
    mark = server.log.mark()
    filler = "y" * LARGE_BODY
    while server.log.find(r"is not reading; closing", mark) is None:
        send_message(carol, ERIN, "flood" + filler)
        round_trip(carol)
    later = [f"later-{n}-{uuid.uuid4().hex}" for n in range(LATER_MESSAGES)]
    for token in later:
        send_message(carol, ERIN, token)
    round_trip(carol)
    erin.close()
    back = login(server, ca_file, ERIN)
    back.send("<presence/>")
    got = back.read_until(later[-1], BULK_TIMEOUT)
    missing = [t for t in later if t not in got]
    assert missing == [], f"{len(missing)} of {LATER_MESSAGES} later messages lost"


# A small output bound, and a roster larger than it.
SMALL_OUTPUT = 65536
BIG_ROSTER_ITEMS = 80
LONG_NAME = "n" * 1000


def small_output(text: str) -> str:
    edited = re.sub(r'output-bytes="\d+"', f'output-bytes="{SMALL_OUTPUT}"', text)
    assert edited != text
    return edited


def test_a_result_larger_than_the_output_bound_is_refused_not_fatal(
        tmp_path: Path, cert_files: tuple[Path, Path], ca_file: Path) -> None:
    """Issue 12, finding 3: a roster over the output bound used to end its
    owner's stream on every fetch, so the account could never fetch it."""
    with start_mlink(tmp_path, DOMAIN, cert_files, users=USERS,
                     edit_config=small_output) as server:
        erin = login(server, ca_file, ERIN)
        for n in range(BIG_ROSTER_ITEMS):
            erin.send(f"<iq type='set' id='s{n}'><query xmlns='jabber:iq:roster'>"
                      f"<item jid='contact{n}@example.org' name='{LONG_NAME}'/></query></iq>")
            erin.read_until(f"id='s{n}'")
        erin.send("<iq type='get' id='big'><query xmlns='jabber:iq:roster'/></iq>")
        reply = erin.read_until(r"id='big'.*?</iq>")
        assert "type='error'" in reply and "resource-constraint" in reply, reply[:500]
        round_trip(erin)  # the stream goes on
        assert not erin.eof
