"""Run the real `mlink` command line as a subprocess for integration tests."""

from __future__ import annotations

import contextlib
import os
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

REPO = Path(__file__).resolve().parent.parent
# The domain and accounts of the `embedded_server` fixture (conftest.py).
DOMAIN = "localhost"
ALICE, ALICE_PW = "alice@localhost", "alice-secret"
BOB, BOB_PW = "bob@localhost", "bob-secret"
# How long the server may take to open its listeners.
STARTUP_TIMEOUT = 30.0


def mlink(*args: str, cwd: Path | None = None, check: bool = True,
          input_text: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run `mlink ARGS` (this checkout's code) and capture its output."""
    proc = subprocess.run(
        [sys.executable, "-m", "mlink.admin.cli", *args],
        capture_output=True, text=True, timeout=120, cwd=cwd, input=input_text,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"mlink {' '.join(args)} exited {proc.returncode}:\n{proc.stderr}")
    return proc


class LogReader:
    """Collects a process's stderr lines in a thread, so tests can wait for
    a line without polling or racing the pipe's buffer."""

    def __init__(self, stream: IO[str]) -> None:
        self.lines: list[str] = []
        self.done = False
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._run, args=(stream,), daemon=True)
        self._thread.start()

    def _run(self, stream: IO[str]) -> None:
        for line in stream:
            with self._cond:
                self.lines.append(line)
                self._cond.notify_all()
        with self._cond:
            self.done = True
            self._cond.notify_all()

    def mark(self) -> int:
        """A position to pass as `since`: lines logged from now on."""
        with self._cond:
            return len(self.lines)

    def wait_for(self, pattern: str, timeout: float = STARTUP_TIMEOUT,
                 since: int = 0) -> re.Match[str]:
        """The first match of `pattern` in a line logged after `since`,
        waiting up to `timeout` for it."""
        regex = re.compile(pattern)
        seen = since
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for line in self.lines[seen:]:
                    if m := regex.search(line):
                        return m
                seen = len(self.lines)
                remaining = deadline - time.monotonic()
                if self.done or remaining <= 0:
                    raise AssertionError(f"no log line matching {pattern!r}:\n{self.text()}")
                self._cond.wait(remaining)

    def find(self, pattern: str, since: int = 0) -> re.Match[str] | None:
        """The first match of `pattern` in a line logged after `since`, now."""
        regex = re.compile(pattern)
        with self._cond:
            for line in self.lines[since:]:
                if m := regex.search(line):
                    return m
        return None

    def text(self) -> str:
        return "".join(self.lines)

    def join(self) -> None:
        self._thread.join(STARTUP_TIMEOUT)


@dataclass
class MlinkProcess:
    proc: subprocess.Popen[str]
    config: Path
    domain: str
    c2s_port: int
    tls_port: int
    log: LogReader
    # The plain WebSocket port, when the configuration has that listener.
    ws_port: int | None = None

    def wait_for_log(self, pattern: str, since: int = 0,
                     timeout: float = STARTUP_TIMEOUT) -> re.Match[str]:
        return self.log.wait_for(pattern, timeout, since)


# MLINK_TEST_SHARDS=N runs every test server as N shard processes (on free
# fixed ports), so the whole suite can check that sharding changes nothing.
TEST_SHARDS = int(os.environ.get("MLINK_TEST_SHARDS", "1"))


def free_ports(count: int) -> list[int]:
    """Ports free right now, each with the next one free too (`mlink init`
    puts the secure WebSocket listener on the port after the plain one).

    Picked below the kernel's ephemeral range, so that the tests' own
    outgoing connections cannot take one before the server binds it."""
    low, high = _EPHEMERAL_FLOOR - _PORT_SPAN, _EPHEMERAL_FLOOR - 2
    ports: list[int] = []
    for _ in range(_PORT_TRIES):
        port = random.randrange(low, high)
        if any(abs(port - p) < 2 for p in ports):
            continue
        try:
            for candidate in (port, port + 1):
                with socket.socket() as s:
                    s.bind(("0.0.0.0", candidate))
        except OSError:
            continue
        ports.append(port)
        if len(ports) == count:
            return ports
    raise AssertionError("no free ports below the ephemeral range")


def _ephemeral_floor() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


_EPHEMERAL_FLOOR = _ephemeral_floor()
# How many ports below the ephemeral range to draw from, and how many draws.
_PORT_SPAN = 12000
_PORT_TRIES = 1000


def serve(config: Path, domain: str, shards: int | None = None) -> MlinkProcess:
    """`mlink serve` with `shards` shard processes (default TEST_SHARDS; a
    configuration with a port-0 listener can only run one shard)."""
    if shards is None:
        shards = TEST_SHARDS if 'port="0"' not in config.read_text() else 1
    args = ["--shards", str(shards)] if shards > 1 else []
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlink.admin.cli", "serve", "--config", str(config), *args],
        stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert proc.stderr is not None
    log = LogReader(proc.stderr)
    try:
        c2s = int(log.wait_for(r"listening for c2s .* port (\d+)").group(1))
        tls = int(log.wait_for(r"listening for tls .* port (\d+)").group(1))
        ws = None
        if '<listen type="websocket"' in config.read_text():
            ws = int(log.wait_for(r"listening for websocket .* port (\d+)").group(1))
        if shards > 1:
            log.wait_for(rf"all {shards} shard\(s\) ready")
    except AssertionError:
        proc.kill()
        raise
    return MlinkProcess(proc, config, domain, c2s, tls, log, ws)


def stop(server: MlinkProcess) -> int:
    server.proc.send_signal(signal.SIGTERM)
    try:
        server.proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        server.proc.kill()
        raise
    server.log.join()
    return server.proc.returncode


@contextlib.contextmanager
def start_mlink(setup: Path, domain: str, cert_files: tuple[Path, Path],
                users: dict[str, str] | None = None,
                ldap: str | None = None,
                edit_config: Callable[[str], str] | None = None,
                shards: int | None = None) -> Iterator[MlinkProcess]:
    """`mlink init` a setup on free ports, add users, serve; stop on exit.

    `ldap` replaces the `<directory>` element; `edit_config` then rewrites
    the configuration text as it likes. `shards` (default TEST_SHARDS) above
    one needs fixed ports, which are then picked free."""
    cert, key = cert_files
    wanted = TEST_SHARDS if shards is None else shards
    ports = [str(p) for p in free_ports(3)] if wanted > 1 else ["0", "0", "0"]
    mlink("init", str(setup), "--domain", domain, "--c2s-port", ports[0], "--tls-port",
          ports[1], "--ws-port", ports[2], "--tls-cert", str(cert), "--tls-key", str(key))
    config = setup / "mlink.xml"
    if ldap is not None or edit_config is not None:
        text = config.read_text()
        if ldap is not None:
            text = re.sub(r"<directory backend=\"embedded\">.*?</directory>", ldap, text,
                          count=1, flags=re.S)
        if edit_config is not None:
            text = edit_config(text)
        config.write_text(text)
    if users:
        # One `mlink user import`, not one process per user.
        listing = setup / "users.txt"
        listing.write_text("".join(f"{jid} {pw}\n" for jid, pw in users.items()))
        mlink("user", "import", str(listing), "--config", str(config))
        listing.unlink()
    server = serve(config, domain, shards)
    try:
        yield server
    finally:
        if server.proc.poll() is None:
            code = stop(server)
            assert code == 0, f"mlink serve exited {code}:\n" + server.log.text()
