"""`mlink serve --shards N`: the supervisor, shard restarts, `mlink status`,
graceful stop. Real processes, real sockets."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.rawclient import RawClient
from tests.serverproc import ALICE_PW, BOB_PW, DOMAIN, REPO, LogReader, free_ports, mlink

# Shards ready, restarted, stopped: well within this on a loaded machine.
TIMEOUT = 30.0


class Served:
    def __init__(self, proc: subprocess.Popen[str], log: LogReader, config: Path,
                 c2s: int) -> None:
        self.proc, self.log, self.config, self.c2s = proc, log, config, c2s

    def status(self) -> str:
        return mlink("status", "--config", str(self.config)).stdout

    def shard_rows(self) -> dict[int, dict[str, str]]:
        """`mlink status` rows: index -> pid, state, restarts, sessions."""
        rows = {}
        # index pid state uptime restarts conns sessions [stalls longest]
        for m in re.finditer(r"^\s+(\d+)\s+(\S+)\s+(\S+)\s+\S+\s+(\d+)\s+(\S+)\s+(\S+)"
                             r"(?:\s+\S+\s+\S+)?$",
                             self.status(), re.M):
            rows[int(m[1])] = {"pid": m[2], "state": m[3], "restarts": m[4],
                               "sessions": m[6]}
        return rows


@pytest.fixture
def setup(tmp_path: Path, cert_files: tuple[Path, Path]) -> tuple[Path, list[int]]:
    cert, key = cert_files
    ports = free_ports(3)
    mlink("init", str(tmp_path / "s"), "--domain", DOMAIN, "--c2s-port", str(ports[0]),
          "--tls-port", str(ports[1]), "--ws-port", str(ports[2]),
          "--tls-cert", str(cert), "--tls-key", str(key))
    config = tmp_path / "s" / "mlink.xml"
    for user, pw in (("alice", ALICE_PW), ("bob", BOB_PW)):
        mlink("user", "add", f"{user}@{DOMAIN}", "--password", pw, "--config", str(config))
    return config, ports


def serve(config: Path, *args: str) -> tuple[subprocess.Popen[str], LogReader]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlink.admin.cli", "serve", "--config", str(config), *args],
        stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert proc.stderr is not None
    return proc, LogReader(proc.stderr)


@pytest.fixture
def two_shards(setup: tuple[Path, list[int]]) -> Iterator[Served]:
    config, ports = setup
    proc, log = serve(config, "--shards", "2")
    try:
        log.wait_for(r"all 2 shard\(s\) ready", TIMEOUT)
        yield Served(proc, log, config, ports[0])
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.join()


def login(served: Served, ca_file: Path, user: str, pw: str) -> tuple[RawClient, int]:
    """Log in; the shard that took the connection, from its log line."""
    mark = served.log.mark()
    client = RawClient(served.c2s, ca_file)
    jid = client.login(DOMAIN, user, pw)
    assert jid.startswith(f"{user}@{DOMAIN}/")
    m = served.log.wait_for(rf"shard-(\d+) .*authenticated {user}@{DOMAIN}", TIMEOUT, mark)
    return client, int(m[1])


def test_two_shards_serve_restart_after_sigkill_and_stop_cleanly(two_shards, ca_file):
    served = two_shards
    rows = served.shard_rows()
    assert sorted(rows) == [0, 1]
    assert all(r["state"] == "ready" and r["restarts"] == "0" for r in rows.values())
    pids = {i: int(r["pid"]) for i, r in rows.items()}
    assert len(set(pids.values())) == 2 and served.proc.pid not in pids.values()
    # Each shard logs its own listeners on the shared ports.
    for i in (0, 1):
        served.log.wait_for(rf"shard-{i} .*listening for c2s .* port {served.c2s}", TIMEOUT)

    client, shard = login(served, ca_file, "alice", ALICE_PW)
    rows = served.shard_rows()
    assert rows[shard]["sessions"] == "1" and rows[1 - shard]["sessions"] == "0"
    assert "0->1:" in served.status() and "1->0:" in served.status()

    # SIGKILL the shard that holds alice: the supervisor restarts it.
    mark = served.log.mark()
    os.kill(pids[shard], signal.SIGKILL)
    served.log.wait_for(rf"shard {shard} \(pid {pids[shard]}\) exited with signal SIGKILL",
                        TIMEOUT, mark)
    served.log.wait_for(rf"restarting shard {shard} in [\d.]+ s \(restart #1\)", TIMEOUT, mark)
    served.log.wait_for(rf"shard {shard} ready", TIMEOUT, mark)
    client.wait_closed()
    client.close()
    rows = served.shard_rows()
    assert rows[shard]["restarts"] == "1" and rows[1 - shard]["restarts"] == "0"
    assert int(rows[shard]["pid"]) != pids[shard] and rows[shard]["state"] == "ready"
    assert int(rows[1 - shard]["pid"]) == pids[1 - shard]

    # Logins work again; keep two clients connected for the stop.
    clients = [login(served, ca_file, user, pw)[0]
               for user, pw in (("alice", ALICE_PW), ("bob", BOB_PW))]

    # SIGTERM: every stream ends with system-shutdown, the server exits 0.
    mark = served.log.mark()
    served.proc.send_signal(signal.SIGTERM)
    for c in clients:
        assert "system-shutdown" in c.wait_closed()
        c.close()
    assert served.proc.wait(timeout=TIMEOUT) == 0
    served.log.join()
    for i in (0, 1):
        served.log.wait_for(rf"shard {i} \(pid \d+\) exited with status 0", 0, mark)
    served.log.wait_for(r"mlink.shard.supervisor: stopped", 0, mark)
    assert not (served.config.parent / "mlink.control").exists()
    gone = mlink("status", "--config", str(served.config), check=False)
    assert gone.returncode == 1 and "no server is running" in gone.stderr


def test_one_shard_runs_the_same_supervised_path(setup, ca_file):
    config, ports = setup
    proc, log = serve(config, "--shards", "1")
    try:
        log.wait_for(r"all 1 shard\(s\) ready", TIMEOUT)
        served = Served(proc, log, config, ports[0])
        assert list(served.shard_rows()) == [0]
        client, shard = login(served, ca_file, "bob", BOB_PW)
        assert shard == 0
        client.close()
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=TIMEOUT) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.join()


@pytest.mark.parametrize("reuseport", [False, True], ids=["plain", "so_reuseport"])
def test_a_port_in_use_stops_the_server_with_status_1(setup, reuseport):
    """Another program on the c2s port: one line, exit 1, no shard started.
    With SO_REUSEPORT the kernel would let the shards share the port with
    it and split the clients; the supervisor's probe refuses that too."""
    config, ports = setup
    blocker = socket.socket()
    if reuseport:
        blocker.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    blocker.bind(("0.0.0.0", ports[0]))
    blocker.listen(1)
    try:
        proc, log = serve(config, "--shards", "2")
        assert proc.wait(timeout=TIMEOUT) == 1
        log.join()
        assert log.text().strip() == f"mlink: [Errno 98] port {ports[0]} on 0.0.0.0 is in use " \
            "(c2s listener)"
    finally:
        blocker.close()


def test_several_shards_need_fixed_ports(tmp_path):
    mlink("init", str(tmp_path / "s"), "--c2s-port", "0", "--tls-port", "0", "--ws-port", "0")
    proc = mlink("serve", "--shards", "2", "--config", str(tmp_path / "s" / "mlink.xml"),
                 check=False)
    assert proc.returncode == 1
    assert proc.stderr.count("\n") == 1 and "fixed listener ports" in proc.stderr


def test_a_shard_whose_supervisor_is_gone_stops_cleanly(setup, tmp_path):
    """The control channel closing is the shard's signal that its
    supervisor died: it must stop rather than hold the ports unsupervised."""
    config, _ = setup
    ours, theirs = socket.socketpair()
    bus_dir = tmp_path / "bus"
    bus_dir.mkdir()
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlink.shard.worker", "--index", "0", "--shards", "1",
         "--bus-dir", str(bus_dir), "--config", str(config),
         "--control-fd", str(theirs.fileno())],
        pass_fds=(theirs.fileno(),), stderr=subprocess.PIPE, stdout=subprocess.DEVNULL,
        text=True, env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    theirs.close()
    assert proc.stderr is not None
    log = LogReader(proc.stderr)
    try:
        ours.settimeout(TIMEOUT)
        assert b'"op":"ready"' in ours.recv(4096)
        ours.close()
        assert proc.wait(timeout=TIMEOUT) == 0
        log.join()
        assert "supervisor gone; stopping" in log.text()
        assert not list(bus_dir.iterdir())  # its bus socket removed
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
