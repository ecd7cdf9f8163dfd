"""What an administrator deploys (issue 18): the systemd unit, and the log
file that logrotate moves away."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

from tests.rawclient import RawClient
from tests.serverproc import ALICE, ALICE_PW, DOMAIN, REPO, free_ports, mlink

UNIT = REPO / "conf" / "mlink.service"
LOG_WAIT = 30.0
# Logins tried until both shards have taken one.
PLACEMENT_TRIES = 40


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze here")
def test_systemd_unit_verifies(tmp_path: Path) -> None:
    """`systemd-analyze verify` accepts the unit (with ExecStart pointed at
    this checkout's command, which must exist for the check), and the unit
    has what the issue asks: a dedicated user, reload by SIGHUP, limits and
    hardening."""
    text = UNIT.read_text()
    for line in ("User=mlink", "ExecReload=/bin/kill -HUP $MAINPID", "NoNewPrivileges=yes",
                 "ProtectSystem=strict", "LimitNOFILE=65536"):
        assert line in text.splitlines(), line
    command = shutil.which("mlink") or str(Path(sys.executable).with_name("mlink"))
    if not Path(command).exists():
        command = str(tmp_path / "mlink")
        Path(command).write_text(f"#!/bin/sh\nexec {sys.executable} -m mlink.admin.cli \"$@\"\n")
        os.chmod(command, 0o755)
    unit = tmp_path / "mlink.service"
    unit.write_text(text.replace("/usr/bin/mlink", command))
    proc = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "mlink.service" not in proc.stderr, proc.stderr


def wait_in_file(path: Path, pattern: str, timeout: float = LOG_WAIT) -> str:
    """The file's text once `pattern` matches it (polled; a log file has no
    other way to say it was written)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = path.read_text() if path.exists() else ""
        if re.search(pattern, text):
            return text
        time.sleep(0.05)  # poll interval, not a synchronisation
    raise AssertionError(f"{pattern!r} not in {path} within {timeout} s:\n"
                         + (path.read_text() if path.exists() else "(no file)"))


def test_log_file_is_reopened_on_sigusr1(tmp_path: Path) -> None:
    """With <log file>, nothing goes to stderr; after logrotate renames the
    file, SIGUSR1 to the supervisor makes it and its shards write to a new
    file at the old path."""
    c2s, tls, ws = free_ports(3)
    setup = tmp_path / "s"
    mlink("init", str(setup), "--domain", DOMAIN, "--address", "127.0.0.1", "--c2s-port",
          str(c2s), "--tls-port", str(tls), "--ws-port", str(ws))
    config = setup / "mlink.xml"
    config.write_text(re.sub(r'<log level="(\w+)"/>', r'<log level="\1" file="mlink.log"/>',
                             config.read_text(), count=1))
    mlink("user", "add", ALICE, "--password", ALICE_PW, "--config", str(config))
    log_path = setup / "mlink.log"
    proc = subprocess.Popen([sys.executable, "-m", "mlink.admin.cli", "serve", "--config",
                             str(config), "--shards", "2"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        wait_in_file(log_path, r"all 2 shard\(s\) ready")
        log_path.rename(setup / "mlink.log.1")
        proc.send_signal(signal.SIGUSR1)
        wait_in_file(log_path, r"received SIGUSR1; log file reopened")
        # Both shards reopened too: logins land on both (the kernel spreads
        # connections), and each shard's line is in the new file.
        seen: set[str] = set()
        for _ in range(PLACEMENT_TRIES):
            client = RawClient(c2s, setup / "cert.pem")
            try:
                full = client.login(DOMAIN, "alice", ALICE_PW)
            finally:
                client.close()
            text = wait_in_file(log_path, rf"shard-\d .*bound {re.escape(full)}")
            seen.update(re.findall(rf"(shard-\d) .*bound {re.escape(full)}", text))
            if seen == {"shard-0", "shard-1"}:
                break
        assert seen == {"shard-0", "shard-1"}, seen
        assert "received SIGUSR1" not in (setup / "mlink.log.1").read_text()
        assert "Traceback" not in text
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    assert proc.stderr is not None and proc.stderr.read() == ""


def test_the_package_ships_conf_and_builds_without_warnings(tmp_path: Path) -> None:
    """Issue 18: the schema, ACL, samples and unit that the docs tell
    administrators to load are in the installed package (mlink/conf), and
    building it prints no deprecation warnings (the SPDX license)."""
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", str(REPO), "--no-deps",
                           "-w", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "warning" not in (proc.stdout + proc.stderr).lower(), proc.stdout + proc.stderr
    (wheel,) = tmp_path.glob("mlink-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        metadata = archive.read(next(n for n in names if n.endswith(".dist-info/METADATA")))
    for shipped in ("mlink-schema.ldif", "mlink.schema", "mlink-acl.ldif", "mlink.service"):
        assert f"mlink/conf/{shipped}" in names, shipped
    assert b"License-Expression: MIT" in metadata
