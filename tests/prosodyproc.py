"""Run Debian's Prosody (0.12) as a private child process, for the XEP-0227
migration tests and for regenerating tests/data/xep0227/ (see
tests/data/xep0227/make_exports.py).

Prosody runs in the foreground on a free port, on plain TCP (PLAIN allowed
unencrypted: these are loopback tests of data, not of TLS), with its
`internal` file storage in a temp directory. `prosody-migrator` moves that
storage to and from its `xep0227` storage, which writes and reads one
XEP-0227 file per user (`<data_path>/<user>@<host>.xml`).
"""

from __future__ import annotations

import base64
import contextlib
import re
import shutil
import socket
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tests.rawclient import READ_TIMEOUT, RawClient, header
from tests.serverproc import LogReader, free_ports

# How long Prosody may take to listen, and to stop.
PROSODY_TIMEOUT = 30.0
# The stores Prosody 0.12's xep0227 driver handles (offline messages are not
# among them: `offline-archive` fails with unsupported-datastore there).
MIGRATED_STORES = ("accounts", "roster", "vcard", "private")

CONFIG_TEMPLATE = """\
-- Written by tests/prosodyproc.py: a private Prosody for migration tests.
run_as_root = true
pidfile = "{data}/prosody.pid"
data_path = "{data}"
certificates = "{data}"
log = {{ info = "*console" }}
modules_enabled = {{
\t"roster"; "saslauth"; "disco"; "private"; "vcard"; "offline"; "ping"; "posix";
}}
modules_disabled = {{ "s2s"; "tls"; }}
c2s_ports = {{ {port} }}
c2s_direct_tls_ports = {{ }}
s2s_ports = {{ }}
interfaces = {{ "127.0.0.1" }}
c2s_require_encryption = false
allow_unencrypted_plain_auth = true
authentication = "internal_hashed"
{password_hash}
storage = "internal"
statistics = nil

VirtualHost "{domain}"
"""

MIGRATOR_TEMPLATE = """\
-- Written by tests/prosodyproc.py: {direction}.
local stores = {{ {stores} }}
internal {{
\ttype = "internal";
\tpath = "{data}";
\thosts = {{ ["{domain}"] = stores; }};
}}
xep0227 {{
\ttype = "xep0227";
\thosts = {{ ["{domain}"] = stores; }};
}}
"""


def available() -> bool:
    """Whether Prosody and its migrator are installed."""
    return all(shutil.which(tool) for tool in ("prosody", "prosodyctl", "prosody-migrator"))


def version() -> str:
    out = subprocess.run(["dpkg-query", "-W", "-f", "${Version}", "prosody"],
                         capture_output=True, text=True, check=False)
    return out.stdout.strip() or "?"


@dataclass
class ProsodySetup:
    """A Prosody configuration and data directory in `root`."""

    root: Path
    domain: str
    port: int
    password_hash: str | None = None  # None: Prosody's default (SHA-1)

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def config(self) -> Path:
        return self.root / "prosody.cfg.lua"

    def write(self) -> None:
        self.data.mkdir(parents=True, exist_ok=True)
        option = f'password_hash = "{self.password_hash}"' if self.password_hash else ""
        self.config.write_text(CONFIG_TEMPLATE.format(
            data=self.data, port=self.port, domain=self.domain, password_hash=option))

    def register(self, user: str, password: str) -> None:
        """`prosodyctl register`, as an administrator would."""
        subprocess.run(["prosodyctl", "--config", str(self.config), "register", user,
                        self.domain, password], check=True, capture_output=True, text=True,
                       timeout=PROSODY_TIMEOUT)

    def migrate(self, to_xep0227: bool, xep0227_dir: Path) -> None:
        """`prosody-migrator` between the internal storage and one XEP-0227
        file per user in `xep0227_dir` (the xep0227 driver uses Prosody's
        data path, so the migrator runs with that directory as its data
        path: `--config` sets it through the migrator's own file)."""
        xep0227_dir.mkdir(parents=True, exist_ok=True)
        direction = "internal -> xep0227" if to_xep0227 else "xep0227 -> internal"
        migrator = self.root / "migrator.cfg.lua"
        migrator.write_text(MIGRATOR_TEMPLATE.format(
            direction=direction, data=self.data, domain=self.domain,
            stores="; ".join(f'"{s}"' for s in MIGRATED_STORES)))
        source, target = ("internal", "xep0227") if to_xep0227 else ("xep0227", "internal")
        # The xep0227 driver reads and writes under prosody.paths.data, which
        # the migrator takes from CFG_DATADIR, set to /var/lib/prosody on its
        # first lines (its configuration file cannot change it): run a copy
        # with that line pointing at `xep0227_dir`, changing nothing else.
        script = Path(shutil.which("prosody-migrator") or "prosody-migrator").read_text()
        script, count = re.subn(r"(?m)^CFG_DATADIR=.*$",
                                lambda _: f"CFG_DATADIR='{xep0227_dir}';", script)
        assert count == 1, "prosody-migrator no longer sets CFG_DATADIR on one line"
        interpreter = script.splitlines()[0].removeprefix("#!").split()
        copy = self.root / "prosody-migrator"
        copy.write_text(script)
        proc = subprocess.run(
            [*interpreter, str(copy), "--root", f"--config={migrator}", source, target],
            capture_output=True, text=True, timeout=PROSODY_TIMEOUT, check=False,
            cwd=self.root)
        if proc.returncode != 0 or "Error" in proc.stdout:
            raise AssertionError(f"prosody-migrator failed:\n{proc.stdout}\n{proc.stderr}")


@contextlib.contextmanager
def running(setup: ProsodySetup) -> Iterator[LogReader]:
    """Prosody in the foreground until the block ends (then SIGTERM)."""
    proc = subprocess.Popen(["prosody", "--config", str(setup.config), "-F"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    log = LogReader(proc.stdout)
    try:
        wait_listening(setup.port, log)
        yield log
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=PROSODY_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.join()


def wait_listening(port: int, log: LogReader) -> None:
    """Until Prosody logs that it is up, then check the port answers."""
    log.wait_for(r"Activated service 'c2s' on \[127\.0\.0\.1\]:\d+", PROSODY_TIMEOUT)
    socket.create_connection(("127.0.0.1", port), timeout=READ_TIMEOUT).close()


def new_setup(root: Path, domain: str, password_hash: str | None = None) -> ProsodySetup:
    (port,) = free_ports(1)
    setup = ProsodySetup(root, domain, port, password_hash)
    setup.write()
    return setup


class PlainClient:
    """A plain-TCP login (PLAIN, bind) on a RawClient, to Prosody or
    ejabberd configured to allow it (loopback tests of data, not TLS)."""

    def __init__(self, port: int, domain: str, user: str, password: str,
                 resource: str = "mig") -> None:
        self.raw = RawClient(port)
        self.raw.send(header(domain))
        self.raw.read_until(r"</stream:features>")
        token = base64.b64encode(f"\0{user}\0{password}".encode()).decode()
        self.raw.send("<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='PLAIN'>"
                      f"{token}</auth>")
        answer = self.raw.read_until(r"</failure>|<success[^>]*(/>|</success>)")
        self.ok = "<success" in answer
        if not self.ok:
            return
        self.raw.send(header(domain))
        self.raw.read_until(r"</stream:features>")
        self.raw.send("<iq type='set' id='bind'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'>"
                      f"<resource>{resource}</resource></bind></iq>")
        self.raw.read_until(r"id='bind'.*?</iq>|id=\"bind\".*?</iq>")

    def iq(self, stanza_id: str, body: str) -> str:
        """Send an iq (whose `id` attribute is `stanza_id`) and read until its reply."""
        self.raw.send(body)
        return self.raw.read_until(rf"<iq[^>]*id=['\"]{re.escape(stanza_id)}['\"][^>]*"
                                   r"(/>|>.*?</iq>)")

    def close(self) -> None:
        self.raw.send("</stream:stream>")
        self.raw.wait_closed()
        self.raw.close()


def login_ok(setup: ProsodySetup, user: str, password: str) -> bool:
    """Whether Prosody accepts `user`'s PLAIN login with `password`."""
    client = PlainClient(setup.port, setup.domain, user, password)
    try:
        return client.ok
    finally:
        client.raw.close()
