"""`mlink check` catches readable secrets (issue 13, item 3): SCRAM secrets
(authPassword) let anyone who reads them log in, so an ACL that shows them
to anonymous clients is refused with one clear line; the shipped ACL
(conf/mlink-acl.ldif, the tests' slapd) passes."""

from __future__ import annotations

import re
from pathlib import Path

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
