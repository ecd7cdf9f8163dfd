"""The two servers `bench/compare` runs: mlink and Prosody, each set up in a
temp dir with the same users, the same certificate and the same TLS
policy (STARTTLS offered, not required, so the generator picks TLS or
plain TCP per scenario), each run in the foreground as our child process."""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from . import proc

BENCH = Path(__file__).resolve().parent.parent
ROOT = BENCH.parent
PROSODY_TEMPLATE = BENCH / "prosody" / "prosody.cfg.lua"
ITERATIONS = 4096  # PBKDF2 iterations for SCRAM on both servers


def _wait_port(port: int, pid_alive, timeout: float = 20.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not pid_alive():
            raise RuntimeError(f"server exited before listening on {port}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on port {port} after {timeout} s")


# Set by `use_revision`: run mlink from an exported git revision, not the
# work tree (which other work may be changing while a benchmark runs).
MLINK_ENV: dict[str, str] = {}
MLINK_REV = ""


def use_revision(rev: str, workdir: Path) -> str:
    """Export `rev`'s mlink/ into `workdir` and run every mlink command
    from it; returns the resolved commit."""
    global MLINK_REV
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", rev],
                            check=True, capture_output=True, text=True).stdout.strip()
    dest = workdir / "mlink-src"
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", commit, "mlink"],
                             check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    MLINK_ENV["PYTHONPATH"] = str(dest)
    MLINK_REV = commit
    return commit


def mlink_command() -> list[str]:
    """How to run this tree's mlink. A git worktree has no `.venv` of its
    own: then the interpreter running the bench runs `mlink.admin.cli`,
    and `mlink_env()` puts this tree first on PYTHONPATH, so the server
    (and the shards it starts with the same interpreter and environment)
    import this tree's code, not the checkout the venv was installed from."""
    script = ROOT / ".venv" / "bin" / "mlink"
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", "mlink.admin.cli"]


def mlink_env() -> dict[str, str]:
    """Environment overrides for every mlink command: this tree's code
    first on PYTHONPATH, unless `use_revision` chose an exported one."""
    return {"PYTHONPATH": str(ROOT), **MLINK_ENV}


def _run(cmd: list[str]) -> None:
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **mlink_env()})
    if done.returncode:
        raise RuntimeError(f"{' '.join(cmd[:3])} failed: {done.stderr.strip()[-500:]}")


class Server:
    name = "?"
    port = 0
    domain = "bench.local"

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.popen: subprocess.Popen[bytes] | None = None
        self.log = workdir / f"{self.name}.out"

    def command(self) -> list[str]:
        raise NotImplementedError

    def env(self) -> dict[str, str]:
        return {}

    def start(self) -> None:
        assert self.popen is None
        with open(self.log, "ab") as out:
            self.popen = subprocess.Popen(
                self.command(), stdout=out, stderr=subprocess.STDOUT, cwd=self.workdir,
                start_new_session=True, env={**os.environ, **self.env()},
            )
        _wait_port(self.port, lambda: self.popen is not None and self.popen.poll() is None)

    def stop(self) -> None:
        if self.popen is None:
            return
        p, self.popen = self.popen, None
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        # Nothing of ours may keep the port (shards, a stuck child).
        for pid in proc.pids_on_port(self.port):
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass

    def restart(self) -> None:
        self.stop()
        self.start()

    def procs(self) -> proc.ServerProcs:
        assert self.popen is not None
        return proc.ServerProcs([self.popen.pid], self.port)


class Mlink(Server):
    """mlink with the embedded directory (what `mlink init` makes)."""

    def __init__(self, workdir: Path, port: int, shards: int | None = None) -> None:
        self.name = "mlink" if shards is None else f"mlink --shards {shards}"
        self.port = port
        self.shards = shards
        super().__init__(workdir)
        self.log = workdir / "mlink.out"
        # Every variant (default, --shards N) serves the same setup.
        # Not "mlink/": a directory of that name in the cwd shadows the package.
        self.dir = workdir / "mlink-setup"
        self.config = self.dir / "mlink.xml"

    def mlink(self) -> list[str]:
        return mlink_command()

    def env(self) -> dict[str, str]:
        return mlink_env()

    def setup(self, users: list[tuple[str, str]], cert: tuple[Path, Path] | None) -> None:
        cmd = [*self.mlink(), "init", str(self.dir), "--domain", self.domain,
               "--c2s-port", str(self.port), "--tls-port", str(self.port + 1),
               "--ws-port", str(self.port + 2)]
        if cert:
            cmd += ["--tls-cert", str(cert[0]), "--tls-key", str(cert[1])]
        _run(cmd)
        text = self.config.read_text()
        # TLS offered, not required (the generator chooses); logs at warning.
        text = re.sub(r'required="true"', 'required="false"', text)
        text = re.sub(r'<log level="\w+"/>', '<log level="warning"/>', text)
        text = text.replace('address="0.0.0.0"', 'address="127.0.0.1"')
        # Like for like with bench/prosody: no message archive there (Prosody
        # ships mod_mam off), so none here; RESULTS.md gives the archive's
        # own cost (issue 16).
        text = text.replace("</mlink>", '<modules><module name="mam" enabled="false"/>'
                                         "</modules>\n</mlink>")
        self.config.write_text(text)
        lst = self.workdir / "users.txt"
        lst.write_text("".join(f"{u}@{self.domain} {p}\n" for u, p in users))
        _run([*self.mlink(), "user", "import", str(lst), "--config", str(self.config)])

    def scram_entries(self, users: list[tuple[str, str]]) -> dict[str, str]:
        """The generator's SCRAM cache for these users, from the salts in the
        embedded directory (so no timed login pays the client's PBKDF2)."""
        import base64

        from .xmpp import ScramCache

        passwords = dict(users)
        text = (self.dir / "directory.ldif").read_text().replace("\n ", "")
        cache = ScramCache()
        for block in text.split("\n\n"):
            uid = re.search(r"^uid: (.+)$", block, re.M)
            sec = re.search(r"^authPassword: SCRAM-SHA-256\$(\d+):([^$]+)\$", block, re.M)
            if uid and sec and uid.group(1) in passwords:
                cache.salted("sha256", passwords[uid.group(1)].encode(),
                             base64.b64decode(sec.group(2)), int(sec.group(1)))
        return cache.entries

    def cert(self) -> tuple[Path, Path]:
        return self.dir / "cert.pem", self.dir / "key.pem"

    def command(self) -> list[str]:
        cmd = [*self.mlink(), "serve", "--config", str(self.config)]
        if self.shards is not None:
            cmd += ["--shards", str(self.shards)]
        return cmd

    def version(self) -> str:
        if MLINK_REV:
            return f"mlink {MLINK_REV}"
        out = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True)
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "mlink"],
                               capture_output=True, text=True).stdout.strip()
        return f"mlink {out.stdout.strip()}{' (+ uncommitted changes)' if dirty else ''}"


def supports_shards() -> bool:
    out = subprocess.run([*mlink_command(), "serve", "--help"],
                         capture_output=True, text=True, env={**os.environ, **mlink_env()})
    return "--shards" in out.stdout


def _prosody_escape(s: str) -> str:
    """Prosody's datamanager file-name encoding: non-alphanumerics as %xx."""
    return re.sub(r"\W", lambda m: f"%{ord(m.group(0)):02x}", s)


def ensure_prosody() -> None:
    """Install Debian's prosody when it is missing (the system service is
    stopped: we run our own instance in the foreground)."""
    if shutil.which("prosody"):
        return
    print("installing prosody (apt-get)...", file=sys.stderr)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
    subprocess.run(["apt-get", "install", "-y", "-qq", "prosody"], check=True, env=env)
    subprocess.run(["service", "prosody", "stop"], capture_output=True)


class Prosody(Server):
    name = "prosody"

    def __init__(self, workdir: Path, port: int) -> None:
        self.port = port
        super().__init__(workdir)
        self.data = workdir / "prosody-data"
        self.config = workdir / "prosody.cfg.lua"

    def setup(self, users: list[tuple[str, str]], cert: tuple[Path, Path]) -> None:
        self.data.mkdir(parents=True, exist_ok=True)
        text = PROSODY_TEMPLATE.read_text()
        for key, value in {"DATA": str(self.data), "C2S_PORT": str(self.port),
                           "DOMAIN": self.domain, "CERT": str(cert[0]),
                           "KEY": str(cert[1])}.items():
            text = text.replace(f"@{key}@", value)
        self.config.write_text(text)
        # Accounts written in bulk, as mod_auth_internal_hashed stores them
        # (password_hash = "SHA-256"): salt, iterations, hex keys.
        from .xmpp import ScramCache

        accounts = self.data / _prosody_escape(self.domain) / "accounts"
        accounts.mkdir(parents=True, exist_ok=True)
        cache = ScramCache()
        for user, password in users:
            salt = secrets.token_hex(16)
            salted = cache.salted("sha256", password.encode(), salt.encode(), ITERATIONS)
            stored_key = hashlib.sha256(hmac.digest(salted, b"Client Key", "sha256")).digest()
            server_key = hmac.digest(salted, b"Server Key", "sha256")
            (accounts / f"{_prosody_escape(user)}.dat").write_text(
                "return {\n"
                f'\t["iteration_count"] = {ITERATIONS};\n'
                f'\t["salt"] = "{salt}";\n'
                f'\t["stored_key"] = "{stored_key.hex()}";\n'
                f'\t["server_key"] = "{server_key.hex()}";\n'
                "};\n")
        self.scram = cache.entries

    def scram_entries(self, users: list[tuple[str, str]]) -> dict[str, str]:
        return self.scram

    def command(self) -> list[str]:
        return ["prosody", "--config", str(self.config), "-F"]

    def version(self) -> str:
        out = subprocess.run(["dpkg-query", "-W", "-f", "${Version}", "prosody"],
                             capture_output=True, text=True)
        return f"Prosody {out.stdout.strip() or '?'}"
