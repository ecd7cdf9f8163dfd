"""Logins placed on a chosen shard, for tests that put the parties of a
scenario on different shard processes.

SO_REUSEPORT spreads connections by a hash, so a client reaches a given
shard within a few tries; the shard that bound a session is read from the
server's log line ("shard-N ... bound JID").
"""

from __future__ import annotations

import re
import uuid
from pathlib import Path

from tests.rawclient import RawClient
from tests.serverproc import DOMAIN, LogReader

# Shards start, clients land: well within this on a loaded machine.
TIMEOUT = 30.0
# Tries before giving up on landing on the wanted shard.
PLACEMENT_TRIES = 40


class Placement:
    def __init__(self, log: LogReader, port: int, ca_file: Path,
                 passwords: dict[str, str], config: Path | None = None) -> None:
        self.log, self.port, self.ca_file, self.config = log, port, ca_file, config
        self.passwords = passwords  # bare JID -> password
        self.clients: list[RawClient] = []

    def login_on(self, shard: int, jid: str) -> RawClient:
        """A session of `jid` bound on `shard` (its full JID in `.jid`), no
        presence sent yet."""
        for _ in range(PLACEMENT_TRIES):
            mark = self.log.mark()
            client = RawClient(self.port, self.ca_file)
            full = client.login(DOMAIN, jid, self.passwords[jid],
                                resource="r-" + uuid.uuid4().hex[:8])
            m = self.log.wait_for(rf"shard-(\d+) .*bound {re.escape(full)}$", TIMEOUT, mark)
            if int(m[1]) == shard:
                client.jid = full  # type: ignore[attr-defined]
                self.clients.append(client)
                return client
            client.close()
        raise AssertionError(f"no login of {jid} landed on shard {shard}")

    def close_all(self) -> None:
        for client in self.clients:
            client.close()
        self.clients.clear()
