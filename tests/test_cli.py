"""The `mlink` command line as scripts and newcomers use it."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes

from mlink import __version__
from tests.rawclient import RawClient
from tests.serverproc import REPO, LogReader, MlinkProcess, mlink


def one_line_failure(proc: subprocess.CompletedProcess[str]) -> str:
    """The single stderr line of a failed command (exit 1), without 'mlink: '."""
    assert proc.returncode == 1, (proc.returncode, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mlink: "), proc.stderr
    assert "Traceback" not in proc.stderr
    return lines[0][len("mlink: "):]


def test_init_creates_a_setup_that_check_accepts(tmp_path):
    out = mlink("init", str(tmp_path / "s"), "--domain", "chat.example.org")
    assert "mlink.xml" in out.stdout
    for name in ("mlink.xml", "directory.ldif", "cert.pem", "key.pem"):
        assert (tmp_path / "s" / name).exists()
    check = mlink("check", "--config", str(tmp_path / "s" / "mlink.xml"))
    assert "valid" in check.stdout


def test_init_refuses_to_overwrite(tmp_path):
    mlink("init", str(tmp_path / "s"))
    before = (tmp_path / "s" / "mlink.xml").read_bytes()
    again = mlink("init", str(tmp_path / "s"), check=False)
    assert again.returncode != 0
    assert again.stderr.strip().count("\n") == 0 and again.stderr.startswith("mlink: ")
    assert (tmp_path / "s" / "mlink.xml").read_bytes() == before


def test_bad_configuration_is_one_line_with_file_and_line(tmp_path):
    config = tmp_path / "mlink.xml"
    config.write_text("<mlink>\n  <domain>localhost</domain>\n  <listen type='c2s' port='99999'/>\n</mlink>\n")
    for command in (["check"], ["serve"], ["user", "list"]):
        proc = mlink(*command, "--config", str(config), check=False)
        assert proc.returncode != 0
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1, proc.stderr
        assert f"{config}:3:" in lines[0]


def test_user_commands_and_their_failures(tmp_path):
    mlink("init", str(tmp_path / "s"))
    cfg = str(tmp_path / "s" / "mlink.xml")
    mlink("user", "add", "Alice@localhost", "--password", "pw1", "--config", cfg)
    assert mlink("user", "list", "--config", cfg).stdout.split() == ["alice@localhost"]
    dup = mlink("user", "add", "alice@localhost", "--password", "x", "--config", cfg, check=False)
    assert dup.returncode != 0
    other = mlink("user", "add", "bob@elsewhere.org", "--password", "x", "--config", cfg, check=False)
    assert other.returncode != 0 and "elsewhere.org" in other.stderr
    missing = mlink("user", "delete", "nobody@localhost", "--config", cfg, check=False)
    assert missing.returncode != 0
    pwfile = tmp_path / "pw"
    pwfile.write_text("from-a-file\n")
    mlink("user", "passwd", "alice@localhost", "--password-file", str(pwfile), "--config", cfg)
    mlink("user", "delete", "alice@localhost", "--config", cfg)
    assert mlink("user", "list", "--config", cfg).stdout.split() == []
    # The directory file never holds a clear password.
    assert "from-a-file" not in (tmp_path / "s" / "directory.ldif").read_text()
    assert "pw1" not in (tmp_path / "s" / "directory.ldif").read_text()


def test_user_import_provisions_hundreds_in_one_process(tmp_path):
    mlink("init", str(tmp_path / "s"))
    cfg = str(tmp_path / "s" / "mlink.xml")
    # 400: each password costs an Argon2id hash and two PBKDF2 derivations.
    lines = [f"user{i}@localhost password{i}" for i in range(400)]
    (tmp_path / "users.txt").write_text("# provisioning\n" + "\n".join(lines) + "\n")
    out = mlink("user", "import", str(tmp_path / "users.txt"), "--config", cfg)
    assert "400" in out.stdout
    listed = mlink("user", "list", "--config", cfg).stdout.split()
    assert len(listed) == 400 and "user399@localhost" in listed
    bad = tmp_path / "bad.txt"
    bad.write_text("ok@localhost pw\nno-password-here@localhost\n")
    proc = mlink("user", "import", str(bad), "--config", cfg, check=False)
    assert proc.returncode != 0 and f"{bad}:2:" in proc.stderr


def test_serve_without_arguments_creates_the_standalone_default(tmp_path):
    """A newcomer in an empty directory: `mlink serve`, then `mlink user add`."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    # The default ports (5222/5223) must be free for this test.
    proc = subprocess.Popen([sys.executable, "-m", "mlink.admin.cli", "serve"], cwd=tmp_path,
                            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env)
    log = LogReader(proc.stderr)
    try:
        # Said before it is done, then what to do next (issue 18).
        log.wait_for(r"no configuration found .* creating a standalone setup for localhost")
        log.wait_for(r"add a user: +mlink user add alice@localhost")
        fingerprint = log.wait_for(r"certificate: +SHA-256 ([0-9A-F:]{95})").group(1)
        log.wait_for(r"listening for c2s .* port 5222")
        log.wait_for(r"listening for tls .* port 5223")
        assert (tmp_path / "mlink-data" / "mlink.xml").exists()
        mlink("user", "add", "newcomer@localhost", "--password", "pw", cwd=tmp_path)
        cert = x509.load_pem_x509_certificate(
            (tmp_path / "mlink-data" / "cert.pem").read_bytes())
        assert cert.fingerprint(hashes.SHA256()).hex(":").upper() == fingerprint
        client = RawClient(5222, tmp_path / "mlink-data" / "cert.pem")
        try:
            assert client.login("localhost", "newcomer", "pw").startswith("newcomer@localhost/")
        finally:
            client.close()
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0


# -- what an administrator meets (issue 18) ---------------------------------------------


def test_version() -> None:
    out = mlink("--version")
    assert out.stdout.strip() == f"mlink {__version__}"


def test_user_command_failures_say_what_is_wrong(tmp_path: Path) -> None:
    mlink("init", str(tmp_path / "s"), "--c2s-port", "0", "--tls-port", "0", "--ws-port", "0")
    cfg = str(tmp_path / "s" / "mlink.xml")
    mlink("user", "add", "alice@localhost", "--password", "pw", "--config", cfg)
    run = lambda *a: mlink(*a, "--config", cfg, check=False)  # noqa: E731
    assert one_line_failure(run("user", "add", "alice@localhost", "--password", "x")) == \
        "alice@localhost already exists"
    assert one_line_failure(run("user", "passwd", "zed@localhost", "--password", "x")) == \
        "no such user: zed@localhost"
    assert one_line_failure(run("user", "delete", "zed@localhost")) == \
        "no such user: zed@localhost"
    assert one_line_failure(run("user", "add", "a b@localhost", "--password", "x")) == \
        "invalid JID 'a b@localhost': bad localpart: ' ' (U+0020) is not allowed: spaces"


def test_password_from_standard_input(tmp_path: Path) -> None:
    """`--password-file -` reads a line of standard input, and so does a
    command given no password at all when standard input is not a terminal."""
    mlink("init", str(tmp_path / "s"), "--c2s-port", "0", "--tls-port", "0", "--ws-port", "0")
    cfg = str(tmp_path / "s" / "mlink.xml")
    mlink("user", "add", "ann@localhost", "--password-file", "-", "--config", cfg,
          input_text="ann-secret\n")
    mlink("user", "add", "ben@localhost", "--config", cfg, input_text="ben-secret\n")
    empty = mlink("user", "add", "cid@localhost", "--config", cfg, input_text="", check=False)
    assert one_line_failure(empty) == "the password is empty"
    assert mlink("user", "list", "--config", cfg).stdout.split() == \
        ["ann@localhost", "ben@localhost"]

    async def logins() -> None:
        from mlink.config import load_config
        from mlink.directory import open_directory

        directory = open_directory(load_config(Path(cfg)).directory)
        try:
            assert await directory.check_password("ann@localhost", "ann-secret")
            assert await directory.check_password("ben@localhost", "ben-secret")
        finally:
            await directory.aclose()

    import trio

    trio.run(logins)


def test_a_reader_that_leaves_early_is_no_traceback(tmp_path: Path) -> None:
    """`mlink user list | head -1`: stdout's reader is gone before the
    command writes; it ends quietly with the shell's SIGPIPE status."""
    mlink("init", str(tmp_path / "s"), "--c2s-port", "0", "--tls-port", "0", "--ws-port", "0")
    cfg = str(tmp_path / "s" / "mlink.xml")
    mlink("user", "add", "alice@localhost", "--password", "pw", "--config", cfg)
    proc = subprocess.Popen([sys.executable, "-m", "mlink.admin.cli", "user", "list",
                             "--config", cfg], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()  # before the interpreter has even started
    errors = proc.stderr.read()
    assert proc.wait(timeout=60) == 141
    assert errors == ""


def unreachable_ldap(config: Path) -> None:
    """Point `config` at an LDAP server that is not there."""
    config.write_text(re.sub(
        r'<directory backend="embedded">.*?</directory>',
        '<directory backend="ldap"><ldap base="dc=example,dc=com" timeout="2">'
        "<server>ldap://127.0.0.1:1</server></ldap></directory>",
        config.read_text(), count=1, flags=re.S))


def test_unreachable_directory_is_one_line(tmp_path: Path) -> None:
    mlink("init", str(tmp_path / "s"), "--c2s-port", "0", "--tls-port", "0", "--ws-port", "0")
    config = tmp_path / "s" / "mlink.xml"
    unreachable_ldap(config)
    failure = one_line_failure(mlink("user", "list", "--config", str(config), check=False))
    assert "ldap://127.0.0.1:1" in failure


def test_serve_warns_when_the_directory_does_not_answer(tmp_path: Path) -> None:
    mlink("init", str(tmp_path / "s"), "--c2s-port", "0", "--tls-port", "0", "--ws-port", "0")
    config = tmp_path / "s" / "mlink.xml"
    unreachable_ldap(config)
    proc = subprocess.Popen([sys.executable, "-m", "mlink.admin.cli", "serve", "--config",
                             str(config)], stderr=subprocess.PIPE, stdout=subprocess.DEVNULL,
                            text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    log = LogReader(proc.stderr)  # type: ignore[arg-type]
    try:
        log.wait_for(r"WARNING .*the directory does not answer .*ldap://127.0.0.1:1.*"
                     r"serving anyway")
        log.wait_for(r"all \d+ shard\(s\) ready")
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0


def test_second_serve_on_the_same_configuration(embedded_server: MlinkProcess) -> None:
    proc = mlink("serve", "--config", str(embedded_server.config), check=False)
    failure = one_line_failure(proc)
    pid = re.search(r"already running \(pid (\d+)\)", failure)
    assert pid and int(pid.group(1)) == embedded_server.proc.pid, failure


def test_configuration_from_the_environment(tmp_path: Path) -> None:
    mlink("init", str(tmp_path / "s"), "--c2s-port", "0", "--tls-port", "0", "--ws-port", "0")
    cfg = tmp_path / "s" / "mlink.xml"
    mlink("user", "add", "eve@localhost", "--password", "pw", "--config", str(cfg))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    proc = subprocess.run([sys.executable, "-m", "mlink.admin.cli", "user", "list"],
                          capture_output=True, text=True, cwd=elsewhere, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(REPO), "MLINK_CONFIG": str(cfg)})
    assert proc.returncode == 0 and proc.stdout.split() == ["eve@localhost"], proc.stderr
    bare = subprocess.run([sys.executable, "-m", "mlink.admin.cli", "user", "list"],
                          capture_output=True, text=True, cwd=elsewhere, timeout=60,
                          env={k: v for k, v in {**os.environ, "PYTHONPATH": str(REPO)}.items()
                               if k != "MLINK_CONFIG"})
    if not Path("/etc/mlink/mlink.xml").exists():
        assert "no configuration" in one_line_failure(bare)
    assert not (elsewhere / "mlink-data").exists()  # only serve creates a setup


def test_init_is_private_whatever_the_umask_and_binds_the_address(tmp_path: Path) -> None:
    proc = subprocess.run(
        ["sh", "-c", f"umask 000 && exec {sys.executable} -m mlink.admin.cli init "
                     f"{tmp_path / 's'} --address 127.0.0.1 --c2s-port 0 --tls-port 0 "
                     "--ws-port 0"],
        capture_output=True, text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr
    setup = tmp_path / "s"
    assert setup.stat().st_mode & 0o777 == 0o700
    for name in ("key.pem", "directory.ldif"):
        assert (setup / name).stat().st_mode & 0o077 == 0, name
    assert "add a user:" in proc.stdout and "SHA-256" in proc.stdout
    text = (setup / "mlink.xml").read_text()
    listens = re.findall(r"<listen [^>]*>", text)
    assert listens and all('address="127.0.0.1"' in line for line in listens), listens


@pytest.mark.parametrize("bad", ["not an address!", "a/b"])
def test_init_refuses_a_bad_address(tmp_path: Path, bad: str) -> None:
    proc = mlink("init", str(tmp_path / "s"), "--address", bad, check=False)
    assert "--address" in one_line_failure(proc)
    assert not (tmp_path / "s" / "mlink.xml").exists()


def test_status_names_the_version(embedded_server: MlinkProcess) -> None:
    out = mlink("status", "--config", str(embedded_server.config))
    assert out.stdout.startswith(f"mlink {__version__}, supervisor pid "), out.stdout
