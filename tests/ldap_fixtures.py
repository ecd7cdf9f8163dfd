"""pytest plugin: a private slapd for the tests (see tools/slapd-run).

Register with `pytest_plugins = ["tests.ldap_fixtures"]` in tests/conftest.py
(or `pytest -p tests.ldap_fixtures`).

Fixtures:
- `slapd` (session): a running slapd loaded with conf/base.ldif and
  conf/users.ldif; `.url`, `.base_dn`, `.bind_dn`, `.bind_password`,
  `.users_dn`, `.dir`, `.pid`, and `.stop()` / `.start()` to stop it and
  start it again on the same port with the same data. A test that stops it
  must start it again (use `slapd.stopped()` as a context manager).
- `ldap_config`: a `DirectoryConfig` (backend "ldap") for it, short timeout.
- `run_slapd_tool(*args)`: run tools/slapd-run, returning its stdout.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from mlink.config_model import DirectoryConfig, LDAPConfig

REPO = Path(__file__).resolve().parent.parent
SLAPD_RUN = REPO / "tools" / "slapd-run"

BASE_DN = "dc=example,dc=com"
BIND_DN = "cn=mlink,dc=example,dc=com"
BIND_PASSWORD = "mlink-service-secret"
ROOT_DN = "cn=admin,dc=example,dc=com"
ROOT_PASSWORD = "admin-secret"
# Sample users of conf/users.ldif: carol has no authPassword.
SAMPLE_USERS = {
    "alice@example.com": "alice-secret",
    "bob@example.com": "bob-secret",
    "carol@example.com": "carol-secret",
}


def run_slapd_tool(*args: str) -> str:
    proc = subprocess.run(
        [sys.executable, str(SLAPD_RUN), *args], capture_output=True, text=True, timeout=60
    )
    if proc.returncode != 0:
        raise RuntimeError(f"tools/slapd-run {' '.join(args)} failed:\n{proc.stderr}")
    return proc.stdout


def _parse(output: str) -> tuple[str, int]:
    lines = output.splitlines()
    url = lines[0].strip()
    pid = next(int(x.split(":", 1)[1]) for x in lines if x.startswith("pid:"))
    return url, pid


@dataclass
class Slapd:
    dir: Path
    url: str
    pid: int
    base_dn: str = BASE_DN
    bind_dn: str = BIND_DN
    bind_password: str = BIND_PASSWORD
    root_dn: str = ROOT_DN
    root_password: str = ROOT_PASSWORD
    users: dict[str, str] = field(default_factory=lambda: dict(SAMPLE_USERS))
    running: bool = True

    @property
    def users_dn(self) -> str:
        return f"ou=People,{self.base_dn}"

    def stop(self) -> None:
        run_slapd_tool("--stop", str(self.dir))
        self.running = False

    def start(self) -> None:
        url, self.pid = _parse(run_slapd_tool("--start", str(self.dir)))
        assert url == self.url
        self.running = True

    @contextlib.contextmanager
    def stopped(self) -> Iterator[None]:
        self.stop()
        try:
            yield
        finally:
            self.start()


@pytest.fixture(scope="session")
def slapd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Slapd]:
    workdir = tmp_path_factory.mktemp("slapd") / "run"
    url, pid = _parse(run_slapd_tool("--dir", str(workdir), "--port", "0"))
    server = Slapd(workdir, url, pid)
    try:
        yield server
    finally:
        run_slapd_tool("--stop", str(workdir))


@pytest.fixture
def ldap_config(slapd: Slapd) -> DirectoryConfig:
    if not slapd.running:  # a previous test failed half-way
        slapd.start()
    return DirectoryConfig(
        backend="ldap",
        ldap=LDAPConfig(
            servers=[slapd.url],
            base_dn=slapd.base_dn,
            bind_dn=slapd.bind_dn,
            bind_password=slapd.bind_password,
            pool_size=4,
            timeout=2.0,
        ),
    )
