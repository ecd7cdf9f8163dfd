"""50 slixmpp clients over 2 shards (issue 4, "done when"): every user gets
every message and presence it should, wherever its session landed; the
placement is printed (run with -s to see it)."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import ssl
import subprocess
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import slixmpp

from tests.serverproc import DOMAIN, REPO, LogReader, free_ports, mlink

USERS = 50
NEIGHBOURS = 1  # subscribed both ways with the next and previous user in a ring
MESSAGES_TO = 10  # each user writes to the next ten users
# Everything is local; this bounds a hung run, it is not a measurement.
RUN_TIMEOUT = 120.0
START_TIMEOUT = 30.0


def jid(i: int) -> str:
    return f"u{i:02d}@{DOMAIN}"


class Member(slixmpp.ClientXMPP):
    def __init__(self, i: int, ca_file: Path, progress: asyncio.Event) -> None:
        super().__init__(f"{jid(i)}/ring", f"pw{i}")
        self.index = i
        self.ssl_context = ssl.create_default_context(cafile=str(ca_file))
        self.started = asyncio.Event()
        self.seen_available: set[str] = set()
        self.received: list[str] = []
        self.progress = progress  # set whenever any member learns something
        self.add_event_handler("session_start", self.on_start)
        self.add_event_handler("presence_available", self.on_available)
        self.add_event_handler("message", self.on_message)

    async def on_start(self, _event: object) -> None:
        await self.get_roster()
        self.send_presence()
        self.started.set()

    def on_available(self, presence: slixmpp.Presence) -> None:
        self.seen_available.add(presence["from"].bare)
        self.progress.set()

    def on_message(self, message: slixmpp.Message) -> None:
        if message["type"] in ("chat", "normal") and message["body"]:
            self.received.append(message["body"])
            self.progress.set()


def test_fifty_slixmpp_users_over_two_shards(tmp_path, cert_files, ca_file):
    cert, key = cert_files
    c2s, tls, ws = free_ports(3)
    setup = tmp_path / "s"
    mlink("init", str(setup), "--domain", DOMAIN, "--c2s-port", str(c2s), "--tls-port",
          str(tls), "--ws-port", str(ws), "--tls-cert", str(cert), "--tls-key", str(key))
    config = setup / "mlink.xml"
    (tmp_path / "users.txt").write_text("".join(f"{jid(i)} pw{i}\n" for i in range(USERS)))
    mlink("user", "import", str(tmp_path / "users.txt"), "--config", str(config))
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlink.admin.cli", "serve", "--config", str(config),
         "--shards", "2"],
        stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    log = LogReader(proc.stderr)  # type: ignore[arg-type]
    try:
        log.wait_for(r"all 2 shard\(s\) ready", START_TIMEOUT)
        members = asyncio.run(asyncio.wait_for(_run(c2s, ca_file), RUN_TIMEOUT))
        placement = {m[2]: int(m[1]) for m in
                     re.finditer(r"shard-(\d+) mlink\.transport\.client: \S+: bound (u\d\d@\S+)/ring$",
                                 log.text(), re.M)}
        placement = {j.split("/")[0]: s for j, s in placement.items()}
        print("\nshard placement:", dict(sorted(placement.items())))
        print("sessions per shard:", dict(Counter(placement.values())))
        assert len(placement) == USERS and set(placement.values()) == {0, 1}
        for m in members:
            i = m.index
            neighbours = {jid((i + d) % USERS) for d in (-NEIGHBOURS, NEIGHBOURS)}
            assert neighbours <= m.seen_available, (jid(i), m.seen_available)
            expected = {f"from {(i - d) % USERS} to {i}" for d in range(1, MESSAGES_TO + 1)}
            assert set(m.received) == expected, (jid(i), sorted(m.received))
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=START_TIMEOUT) == 0, log.text()[-3000:]
        log.join()


async def _until(progress: asyncio.Event, done: Callable[[], bool]) -> None:
    """Wait, without polling, until `done()` holds (re-checked on progress)."""
    while True:
        progress.clear()
        if done():
            return
        await progress.wait()


async def _run(port: int, ca_file: Path) -> list[Member]:
    progress = asyncio.Event()
    members = [Member(i, ca_file, progress) for i in range(USERS)]
    for m in members:
        m.connect(host="127.0.0.1", port=port)
    await asyncio.gather(*(m.started.wait() for m in members))
    # A ring of mutual subscriptions: slixmpp approves and subscribes back
    # by itself (auto_authorize, auto_subscribe).
    for m in members:
        m.send_presence_subscription(jid((m.index + 1) % USERS))
    await _until(progress, lambda: all(
        {jid((m.index + d) % USERS) for d in (-1, 1)} <= m.seen_available for m in members))
    for m in members:
        for d in range(1, MESSAGES_TO + 1):
            to = (m.index + d) % USERS
            m.send_message(mto=jid(to), mbody=f"from {m.index} to {to}", mtype="chat")
    await _until(progress, lambda: all(len(m.received) >= MESSAGES_TO for m in members))
    for m in members:
        m.disconnect()
    await asyncio.gather(*(m.disconnected for m in members))
    return members
