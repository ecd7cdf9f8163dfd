"""The `mlink` command line as scripts and newcomers use it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

from tests.rawclient import RawClient
from tests.serverproc import REPO, LogReader, mlink


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


def test_user_import_provisions_thousands_in_one_process(tmp_path):
    mlink("init", str(tmp_path / "s"))
    cfg = str(tmp_path / "s" / "mlink.xml")
    lines = [f"user{i}@localhost password{i}" for i in range(2000)]
    (tmp_path / "users.txt").write_text("# provisioning\n" + "\n".join(lines) + "\n")
    out = mlink("user", "import", str(tmp_path / "users.txt"), "--config", cfg)
    assert "2000" in out.stdout
    listed = mlink("user", "list", "--config", cfg).stdout.split()
    assert len(listed) == 2000 and "user1999@localhost" in listed
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
        log.wait_for(r"listening for c2s .* port 5222")
        log.wait_for(r"listening for tls .* port 5223")
        assert (tmp_path / "mlink-data" / "mlink.xml").exists()
        mlink("user", "add", "newcomer@localhost", "--password", "pw", cwd=tmp_path)
        client = RawClient(5222, tmp_path / "mlink-data" / "cert.pem")
        try:
            assert client.login("localhost", "newcomer", "pw").startswith("newcomer@localhost/")
        finally:
            client.close()
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0
