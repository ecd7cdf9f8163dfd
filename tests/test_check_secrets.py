"""`mlink check` catches readable secrets (issue 13, item 3): SCRAM secrets
(authPassword) let anyone who reads them log in, so an ACL that shows them
to anonymous clients is refused with one clear line; the shipped ACL
(conf/mlink-acl.ldif, the tests' slapd) passes."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.ldap_fixtures import Slapd, private_slapd
from tests.serverproc import mlink


def ldap_config(tmp: Path, slapd: Slapd) -> Path:
    mlink("init", str(tmp), "--domain", "example.com", "--c2s-port", "0", "--tls-port", "0",
          "--ws-port", "0")
    config = tmp / "mlink.xml"
    directory = (
        '<directory backend="ldap">'
        f'<ldap base="{slapd.base_dn}" bind-dn="{slapd.bind_dn}" '
        f'bind-password="{slapd.bind_password}" timeout="5">'
        f"<server>{slapd.url}</server></ldap></directory>"
    )
    text = re.sub(r'<directory backend="embedded">.*?</directory>', directory,
                  config.read_text(), count=1, flags=re.S)
    config.write_text(text)
    return config


def test_check_passes_with_the_shipped_acl(slapd: Slapd, tmp_path: Path) -> None:
    result = mlink("check", "--config", str(ldap_config(tmp_path / "ok", slapd)))
    assert "directory answers" in result.stdout


def test_check_fails_when_anonymous_can_read_secrets(tmp_path: Path) -> None:
    with private_slapd(tmp_path / "slapd", open_acl=True) as open_slapd:
        config = ldap_config(tmp_path / "open", open_slapd)
        result = mlink("check", "--config", str(config), check=False)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "anonymous clients can read authPassword" in lines[0], lines


def test_fast_hashes_warned_and_new_passwords_hashed_by_the_directory(tmp_path: Path) -> None:
    """Issue 13, item 9: the sample users' {SSHA} hashes are reported; a
    password set through mlink reaches slapd through RFC 3062 and is stored
    with the directory's own slow scheme ({ARGON2}, tools/slapd-run's
    olcPasswordHash), which a real bind then verifies."""
    with private_slapd(tmp_path / "slapd") as own:
        config = ldap_config(tmp_path / "hashes", own)
        before = mlink("check", "--config", str(config))
        assert "warning: 3 userPassword values are fast to crack (3 {SSHA})" in before.stdout
        mlink("user", "passwd", "alice@example.com", "--password", "Alice-new-Passw0rd",
              "--config", str(config))
        after = mlink("check", "--config", str(config))
        assert "warning: 2 userPassword values are fast to crack (2 {SSHA})" in after.stdout
        alice = "mail=alice@example.com,ou=People,dc=example,dc=com"
        (entry,) = own.search(alice, attrs=("userPassword",), scope="base")
        (stored,) = entry.get("userPassword")
        text = stored.decode() if isinstance(stored, bytes) else stored
        assert text.startswith("{ARGON2}$argon2"), text[:20]
        assert alice in own.run_as(alice, "Alice-new-Passw0rd", "ldapwhoami")
        with pytest.raises(RuntimeError, match="Invalid credentials"):
            own.run_as(alice, "alice-secret", "ldapwhoami")


def test_check_is_quiet_on_a_fresh_embedded_setup(tmp_path: Path) -> None:
    mlink("init", str(tmp_path / "e"), "--domain", "example.com", "--c2s-port", "0",
          "--tls-port", "0", "--ws-port", "0")
    config = tmp_path / "e" / "mlink.xml"
    mlink("user", "add", "zoe@example.com", "--password", "zoe-pw", "--config", str(config))
    result = mlink("check", "--config", str(config))
    assert "warning" not in result.stdout and "directory answers" in result.stdout
