"""Leavers do not stay online (issue 13, item 6): `mlink user delete` ends
the user's sessions on every shard, with a stream error saying why, and the
CLI says plainly when the user to delete, or to add, does or does not
exist."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.placement import TIMEOUT, Placement
from tests.rawclient import RawClient
from tests.serverproc import DOMAIN, MlinkProcess, mlink, start_mlink

USERS = {f"leaver@{DOMAIN}": "leaver-pw", f"stayer@{DOMAIN}": "stayer-pw"}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory,
           cert_files: tuple[Path, Path]) -> Iterator[MlinkProcess]:
    setup = tmp_path_factory.mktemp("lifecycle") / "s"
    with start_mlink(setup, DOMAIN, cert_files, users=USERS, shards=2) as proc:
        yield proc


def login_on(server: MlinkProcess, ca_file: Path, shard: int, jid: str) -> RawClient:
    return Placement(server.log, server.c2s_port, ca_file, USERS).login_on(shard, jid)


def test_deleting_a_user_ends_their_sessions_on_every_shard(server, ca_file):
    leaver = f"leaver@{DOMAIN}"
    on_zero = login_on(server, ca_file, 0, leaver)
    on_one = login_on(server, ca_file, 1, leaver)
    stayer = login_on(server, ca_file, 1, f"stayer@{DOMAIN}")
    out = mlink("user", "delete", leaver, "--config", str(server.config)).stdout
    assert f"deleted {leaver}" in out
    for client in (on_zero, on_one):
        text = client.read_until(r"</stream:stream>", TIMEOUT)
        assert "<not-authorized" in text and "your account was deleted" in text
    # Others are not touched.
    stayer.send(f"<iq type='get' id='p' to='{DOMAIN}'><ping xmlns='urn:xmpp:ping'/></iq>")
    assert "type='result'" in stayer.read_until("id='p'")
    # And the account is gone: the password no longer works.
    again = RawClient(server.c2s_port, ca_file)
    again.starttls(DOMAIN)
    assert "<not-authorized" in again.auth_plain(leaver, USERS[leaver])


def test_the_cli_says_what_is_wrong_with_a_user_in_one_line(server):
    missing = mlink("user", "delete", f"nobody@{DOMAIN}", "--config", str(server.config),
                    check=False)
    assert missing.returncode != 0
    assert missing.stderr.strip() == f"mlink: no such user: nobody@{DOMAIN}"
    exists = mlink("user", "add", f"stayer@{DOMAIN}", "--password", "x",
                   "--config", str(server.config), check=False)
    assert exists.returncode != 0
    assert exists.stderr.strip() == f"mlink: stayer@{DOMAIN} already exists"


def test_in_band_password_change_on_the_embedded_directory(server, ca_file):
    jid = f"stayer@{DOMAIN}"
    client = RawClient(server.c2s_port, ca_file)
    client.login(DOMAIN, jid, USERS[jid], resource="pw")
    client.send(f"<iq type='get' id='g' to='{DOMAIN}'><query xmlns='jabber:iq:register'/></iq>")
    info = client.read_until(r"id='g'.*?</iq>")
    assert "<registered" in info and "<username>stayer</username>" in info
    client.send(f"<iq type='set' id='s' to='{DOMAIN}'><query xmlns='jabber:iq:register'>"
                "<username>stayer</username><password>new-stayer-pw</password></query></iq>")
    assert "type='result'" in client.read_until("id='s'")
    client.close()
    fresh = RawClient(server.c2s_port, ca_file)
    fresh.starttls(DOMAIN)
    assert "<success" in fresh.auth_plain(jid, "new-stayer-pw")
    old = RawClient(server.c2s_port, ca_file)
    old.starttls(DOMAIN)
    assert "<not-authorized" in old.auth_plain(jid, USERS[jid])
    USERS[jid] = "new-stayer-pw"
