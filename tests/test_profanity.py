"""Profanity, a terminal client from Debian, changes its password in band
(`/changepassword`, XEP-0077) against a slapd whose password policy has a
quality rule (issue 13, item 5): a weak password is refused with the
directory's reason, a good one is taken, and only it logs in afterwards.

Profanity runs in a tmux session (it needs a terminal); the test types its
commands and reads the screen. tools/setup --test installs both.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.ldap_fixtures import Slapd, private_slapd
from tests.serverproc import MlinkProcess, start_mlink

DOMAIN = "example.com"
USER, OLD_PW = "paula@example.com", "Paula-Old-Passw0rd"
NEW_PW = "Paula-New-Passw0rd"
POLICY_DN = "cn=default,ou=Policies,dc=example,dc=com"
# A screen line appears within this (Profanity and the server both start).
SCREEN_TIMEOUT = 30.0


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory,
           cert_files: tuple[Path, Path]) -> Iterator[MlinkProcess]:
    work = tmp_path_factory.mktemp("profanity")
    with private_slapd(work / "slapd", ppolicy=True) as slapd:
        yield from _mlink(work, slapd, cert_files)


def _mlink(work: Path, s: Slapd, cert_files: tuple[Path, Path]) -> Iterator[MlinkProcess]:
    directory = (
        '<directory backend="ldap">'
        f'<ldap base="{s.base_dn}" bind-dn="{s.bind_dn}" bind-password="{s.bind_password}" '
        f'password-policy="{POLICY_DN}" timeout="5"><server>{s.url}</server></ldap></directory>')
    with start_mlink(work / "mlink", DOMAIN, cert_files, users={USER: OLD_PW},
                     ldap=directory) as proc:
        yield proc


class Profanity:
    """One Profanity in a private tmux server (its own socket and HOME)."""

    def __init__(self, home: Path) -> None:
        for tool in ("profanity", "tmux"):
            assert shutil.which(tool), f"{tool} is not installed (tools/setup --test installs it)"
        self.socket = f"mlink-test-{uuid.uuid4().hex[:8]}"
        home.mkdir(parents=True, exist_ok=True)
        self._tmux("new-session", "-d", "-s", "p", "-x", "200", "-y", "50",
                   f"HOME={home} profanity")
        self.wait_for(r"Profanity")

    def _tmux(self, *args: str) -> str:
        return subprocess.run(["tmux", "-L", self.socket, *args], capture_output=True,
                              text=True, timeout=30, check=True).stdout

    def type(self, text: str) -> None:
        self._tmux("send-keys", "-t", "p", "-l", text)
        self._tmux("send-keys", "-t", "p", "Enter")

    def screen(self) -> str:
        return self._tmux("capture-pane", "-p", "-t", "p")

    def wait_for(self, pattern: str, after: int = 0) -> int:
        """Until `pattern` shows on a screen line numbered `after` or later
        (polled: a terminal has no other way to say it drew something);
        the number of that line."""
        deadline = time.monotonic() + SCREEN_TIMEOUT
        while time.monotonic() < deadline:
            lines = self.screen().splitlines()
            for number, line in enumerate(lines[after:], after):
                if re.search(pattern, line):
                    return number + 1
            time.sleep(0.1)  # poll interval, not a synchronisation
        raise AssertionError(f"{pattern!r} not on Profanity's screen:\n{self.screen()}")

    def connect(self, port: int, password: str, after: int) -> None:
        self.type(f"/connect {USER} server 127.0.0.1 port {port} tls trust")
        self.wait_for(r"password", after)
        self.type(password)

    def close(self) -> None:
        subprocess.run(["tmux", "-L", self.socket, "kill-server"], capture_output=True,
                       timeout=30)


def test_changepassword_under_the_directory_quality_rule(server: MlinkProcess,
                                                         tmp_path: Path) -> None:
    prof = Profanity(tmp_path / "home")
    try:
        prof.connect(server.c2s_port, OLD_PW, 0)
        line = prof.wait_for(rf"{re.escape(USER)}/\S+ logged in successfully")
        prof.type("/changepassword")
        prof.wait_for(r"Enter password", line)
        prof.type("short")
        prof.wait_for(r"Confirm password", line)
        prof.type("short")
        line = prof.wait_for(r"Password fails quality checking policy", line)
        prof.type("/changepassword")
        prof.wait_for(r"Enter password", line)
        prof.type(NEW_PW)
        prof.wait_for(r"Confirm password", line)
        prof.type(NEW_PW)
        line = prof.wait_for(r"Password successfully changed", line)
        prof.type("/disconnect")
        line = prof.wait_for(r"logged out successfully", line)
        prof.connect(server.c2s_port, OLD_PW, line)
        line = prof.wait_for(r"Login failed", line)
        prof.connect(server.c2s_port, NEW_PW, line)
        prof.wait_for(rf"{re.escape(USER)}/\S+ logged in successfully", line)
    finally:
        prof.close()
