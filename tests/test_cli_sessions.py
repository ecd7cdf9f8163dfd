"""`mlink session list|kick` against a running two-shard server (issue 17,
item 4): an administrator sees who is connected and ends a session; the
client sees the stream end with the reason."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.rawclient import RawClient
from tests.serverproc import ALICE, ALICE_PW, BOB, BOB_PW, DOMAIN, MlinkProcess, mlink, start_mlink


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory,
           cert_files: tuple[Path, Path]) -> Iterator[MlinkProcess]:
    with start_mlink(tmp_path_factory.mktemp("sessions"), DOMAIN, cert_files,
                     users={ALICE: ALICE_PW, BOB: BOB_PW}, shards=2) as proc:
        yield proc


def test_list_and_kick(server: MlinkProcess, ca_file: Path) -> None:
    cfg = ("--config", str(server.config))
    clients = {}
    try:
        for name, (jid, pw) in {"phone": (ALICE, ALICE_PW), "laptop": (ALICE, ALICE_PW),
                                "desk": (BOB, BOB_PW)}.items():
            client = RawClient(server.c2s_port, ca_file)
            clients[name] = client
            full = client.login(DOMAIN, jid.split("@")[0], pw, resource=name)
            assert full == f"{jid}/{name}"
        listing = mlink("session", "list", *cfg).stdout.splitlines()
        assert [line.split()[0] for line in listing] == [
            f"{ALICE}/laptop", f"{ALICE}/phone", f"{BOB}/desk"]
        assert all(re.fullmatch(r"\S+  shard [01]  127\.0\.0\.1:\d+", line) for line in listing)
        only = mlink("session", "list", "--user", ALICE, *cfg).stdout.splitlines()
        assert [line.split()[0] for line in only] == [f"{ALICE}/laptop", f"{ALICE}/phone"]

        kicked = mlink("session", "kick", f"{ALICE}/phone", "--reason", "maintenance", *cfg)
        assert kicked.stdout.strip() == f"ended {ALICE}/phone"
        end = clients["phone"].read_until(r"</stream:stream>")
        assert "<policy-violation" in end and ">maintenance</text>" in end
        left = mlink("session", "list", *cfg).stdout.splitlines()
        assert [line.split()[0] for line in left] == [f"{ALICE}/laptop", f"{BOB}/desk"]

        nobody = mlink("session", "kick", f"nobody@{DOMAIN}", *cfg, check=False)
        assert nobody.returncode == 1
        assert nobody.stderr.strip() == f"mlink: no session of nobody@{DOMAIN} on the running server"
    finally:
        for client in clients.values():
            client.close()


def test_session_commands_without_a_server(tmp_path: Path) -> None:
    mlink("init", str(tmp_path / "s"), "--c2s-port", "0", "--tls-port", "0", "--ws-port", "0")
    proc = mlink("session", "list", "--config", str(tmp_path / "s" / "mlink.xml"), check=False)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "no server is running" in lines[0], proc.stderr
