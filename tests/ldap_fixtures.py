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
- `sample_entries()`, `embedded_directory(path, entries)`: the same sample
  data in an embedded directory file.
- `private_slapd(workdir, *ldifs, samples=True)`: a context manager for a
  slapd of one's own (e.g. with thousands of entries slapadd-ed at start),
  stopped at exit.

A `Slapd` also drives the OpenLDAP command-line tools as the rootdn, for
setting up data and for checking what the directory really holds:
`.ldapadd(text)`, `.ldapmodify(text)`, `.ldapdelete(*dns, recursive=False)`
and `.search(base, filter="(objectClass=*)", attrs=(), scope="sub")`, which
returns `mlink.directory.ldif.Entry` objects parsed from `ldapsearch -LLL`
(binary values as bytes). Sample data: conf/users.ldif (profile attributes,
alice's jpegPhoto) and conf/groups.ldif (cn=sales: alice, bob;
cn=engineering: bob, carol; groupOfNames with a description).
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from mlink.config_model import DirectoryConfig, EmbeddedConfig, LDAPConfig
from mlink.directory import ldif
from mlink.directory.embedded import EmbeddedDirectory, base_entries

REPO = Path(__file__).resolve().parent.parent
SLAPD_RUN = REPO / "tools" / "slapd-run"

BASE_DN = "dc=example,dc=com"
BIND_DN = "cn=mlink,dc=example,dc=com"
BIND_PASSWORD = "mlink-service-secret"
ROOT_DN = "cn=admin,dc=example,dc=com"
ROOT_PASSWORD = "admin-secret"
# The OpenLDAP client tools are slow to fail on a dead server by default.
TOOL_TIMEOUT = 60
# Sample users of conf/users.ldif: carol has no authPassword.
SAMPLE_USERS = {
    "alice@example.com": "alice-secret",
    "bob@example.com": "bob-secret",
    "carol@example.com": "carol-secret",
}


def sample_entries() -> list[ldif.Entry]:
    """The slapd sample data (conf/: base, users, groups) as entries of an
    embedded directory file with base dc=example,dc=com."""
    entries = base_entries(BASE_DN, "example.com")
    entries.append(ldif.Entry(f"ou=Groups,{BASE_DN}",
                              {"objectClass": ["top", "organizationalUnit"], "ou": ["Groups"]}))
    for name in ("users.ldif", "groups.ldif"):
        entries += ldif.parse((REPO / "conf" / name).read_text())
    return entries


def embedded_directory(path: Path, entries: list[ldif.Entry]) -> EmbeddedDirectory:
    """An embedded directory (base dc=example,dc=com) whose file holds `entries`."""
    path.write_text(ldif.dumps(entries))
    return EmbeddedDirectory(EmbeddedConfig(file=path, base_dn=BASE_DN))


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

    # --- the OpenLDAP tools, as the rootdn --------------------------------

    def run_as(self, dn: str, password: str, name: str, *args: str,
               stdin: str | None = None) -> str:
        """An OpenLDAP tool bound as `dn` (a user changing their own
        password, say), not as the rootdn."""
        return self._tool(name, *args, stdin=stdin, bind=(dn, password))

    def _tool(self, name: str, *args: str, stdin: str | None = None,
              bind: tuple[str, str] | None = None) -> str:
        program = shutil.which(name)
        if program is None:
            raise RuntimeError(f"{name} not found: install ldap-utils")
        dn, password = bind or (self.root_dn, self.root_password)
        proc = subprocess.run(
            [program, "-x", "-H", self.url, "-D", dn, "-w", password, *args],
            input=stdin, capture_output=True, text=True, timeout=TOOL_TIMEOUT,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"{name} {' '.join(args)} failed ({proc.returncode}): "
                               f"{proc.stderr.strip()}")
        return proc.stdout

    def ldapadd(self, text: str) -> None:
        """Add the entries of an LDIF text (one ldapadd run for all of them)."""
        self._tool("ldapadd", stdin=text)

    def ldapmodify(self, text: str) -> None:
        """Apply an LDIF change text (changetype: modify, ...)."""
        self._tool("ldapmodify", stdin=text)

    def ldapdelete(self, *dns: str, recursive: bool = False) -> None:
        self._tool("ldapdelete", *(["-r"] if recursive else []), *dns)

    def search(
        self, base: str, filter: str = "(objectClass=*)", attrs: tuple[str, ...] = (),
        scope: str = "sub",
    ) -> list[ldif.Entry]:
        """What `ldapsearch -LLL` shows, parsed; [] when `base` does not exist."""
        try:
            out = self._tool("ldapsearch", "-LLL", "-o", "ldif-wrap=no", "-b", base,
                             "-s", scope, filter, *attrs)
        except RuntimeError as exc:
            if "(32)" in str(exc):  # noSuchObject
                return []
            raise
        return ldif.parse(out)


@contextlib.contextmanager
def private_slapd(
    workdir: Path, *ldifs: Path, samples: bool = True, size_limit: int | None = None,
    ppolicy: bool = False, open_acl: bool = False, open_config_acl: bool = False,
) -> Iterator[Slapd]:
    """A slapd of the caller's own, in `workdir` (which must not exist or be
    empty), with conf/base.ldif, the samples unless `samples` is False, and
    `ldifs` loaded by slapadd before it starts (fast for bulk data).
    `size_limit` limits every search, the service account's too, to that
    many entries except through paged results."""
    args = ["--dir", str(workdir), "--port", "0"]
    if size_limit is not None:
        args += ["--size-limit", str(size_limit)]
    if not samples:
        args.append("--no-users")
    if ppolicy:
        args.append("--ppolicy")
    if open_acl:
        args.append("--open-acl")
    if open_config_acl:
        args.append("--open-config-acl")
    for path in ldifs:
        args += ["--ldif", str(path)]
    url, pid = _parse(run_slapd_tool(*args))
    server = Slapd(workdir, url, pid)
    try:
        yield server
    finally:
        run_slapd_tool("--stop", str(workdir))


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
