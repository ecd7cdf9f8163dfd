"""Where features meet: stream management, client state indication, the
archive, carbons, multi-user chat and shards, against a real server. Each
test asserts what a user sees (a message arrives exactly once, an occupant
stays in its room, the archive holds one copy)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.rawclient import RawClient
from tests.serverproc import MlinkProcess, start_mlink
from tests.test_mam import sync
from tests.test_stream_management import DOMAIN, USERS, enable, login, with_sm_options

CARBONS = "urn:xmpp:carbons:2"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory,
           cert_files: tuple[Path, Path]) -> Iterator[MlinkProcess]:
    setup = tmp_path_factory.mktemp("cross") / "s"
    with start_mlink(setup, DOMAIN, cert_files, users=USERS,
                     edit_config=with_sm_options) as proc:
        yield proc


# Room for every message of the long test below in the unacknowledged queue
# and in offline storage: each routed-again message is then a store write.
OFFLINE_LIMIT = 3000
MANY = 3200


@pytest.fixture(scope="module")
def roomy(tmp_path_factory: pytest.TempPathFactory,
          cert_files: tuple[Path, Path]) -> Iterator[MlinkProcess]:
    setup = tmp_path_factory.mktemp("roomy") / "s"

    def edit(text: str) -> str:
        text = with_sm_options(text).replace(
            "</resume-timeout>", f"</resume-timeout><max-unacked>{MANY + 100}</max-unacked>", 1)
        return re.sub(r'offline-limit="\d+"', f'offline-limit="{OFFLINE_LIMIT}"', text)

    with start_mlink(setup, DOMAIN, cert_files, users=USERS, edit_config=edit) as proc:
        yield proc


def close_cleanly(server: MlinkProcess, client: RawClient) -> None:
    """End `client`'s stream with its closing tag; return once the server
    routed again the stanzas it never confirmed."""
    mark = server.log.mark()
    client.send("</stream:stream>")
    server.log.wait_for(r"routed again the \d+ stanza\(s\) of "
                        rf"{re.escape(client.jid)}$", 60, mark)  # type: ignore[attr-defined]
    client.close()


def test_unacked_message_routed_again_is_not_carbon_copied_twice(server, ca_file):
    """A message routed again after its session ended (never confirmed) was
    carbon-copied when first delivered: the other resources do not get a
    second <received/> carbon of it."""
    a = login(server, ca_file, "alice@localhost", "A")
    b = login(server, ca_file, "alice@localhost", "B")
    c = login(server, ca_file, "alice@localhost", "C")
    bob = login(server, ca_file, "bob@localhost")
    for client, priority in ((a, 5), (b, 5), (c, 0)):
        client.send(f"<presence><priority>{priority}</priority></presence>")
        sync(client)
    c.send(f"<iq type='set' id='carbons'><enable xmlns='{CARBONS}'/></iq>")
    c.read_until(r"id=['\"]carbons['\"]")
    enable(a)
    bob.send("<message to='alice@localhost' type='chat' id='once'><body>only-once</body>"
             "</message>")
    a.read_until("only-once</body>")
    b.read_until("only-once</body>")
    seen = c.read_until("only-once</body>")
    close_cleanly(server, a)
    seen += sync(c)
    assert seen.count("only-once</body>") == 1, seen
    for client in (b, c, bob):
        client.close()


def test_many_unacked_stanzas_all_routed_again_at_a_clean_close(roomy, ca_file):
    """Thousands of messages the client never confirmed, then a clean close:
    every one goes to offline storage or back to its sender, none vanishes
    (routing them takes longer than the connection's 2 s close grace)."""
    server = roomy
    n, limit = MANY, OFFLINE_LIMIT
    dave = login(server, ca_file, "dave@localhost")
    bob = login(server, ca_file, "bob@localhost")
    dave.send("<presence/>")
    enable(dave)
    sync(dave)
    bob.send("".join(f"<message to='{dave.jid}' type='chat' id='o{k}'><body>o{k}</body>"
                     "</message>" for k in range(n)))
    dave.read_until(rf">o{n - 1}</body>", timeout=60)
    close_cleanly(server, dave)
    bounced = bob.read_until(rf"id=['\"]o{n - 1}['\"][^>]*type=['\"]error|"
                             rf"type=['\"]error['\"][^>]*id=['\"]o{n - 1}['\"]", timeout=30)
    bounced += sync(bob)
    errors = re.findall(r"<message[^>]*type=['\"]error['\"][^>]*>", bounced)
    again = login(server, ca_file, "dave@localhost")
    again.send("<presence/>")
    stored = again.read_until(rf">o{limit - 1}</body>", timeout=30)
    stored += sync(again)
    offline = re.findall(r">(o\d+)</body>", stored)
    assert len(offline) == len(set(offline)) == limit, offline
    assert len(errors) == n - limit, len(errors)
    for client in (again, bob):
        client.close()
