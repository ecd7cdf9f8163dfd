"""<profiles> and <rosters> in the configuration file: parsing, strictness
(file:line errors) and writing them back."""

from __future__ import annotations

from pathlib import Path

import pytest

from mlink.config import ConfigError, load_config, render_config
from mlink.config_model import (
    DEFAULT_GROUP_REFRESH_SECONDS,
    DEFAULT_MAX_PHOTO_BYTES,
    DEFAULT_PROFILE_CACHE_SECONDS,
    ProfileFieldConfig,
    RosterGroupConfig,
)

HEAD = """\
<mlink>
  <domain>example.com</domain>
  <listen type="c2s" port="0"/>
  <tls required="false"/>
"""

FULL = HEAD + """\
  <profiles cache-seconds="60" max-photo-bytes="196608">
    <field name="display_name" policy="directory"/>
    <field name="mobile" policy="update" attribute="mobile"/>
    <field name="org_name" policy="static" value="Example &amp; Co"/>
    <field name="nickname" policy="local"/>
  </profiles>
  <rosters refresh-seconds="2.5" static-attribute="mlinkRosterItem">
    <group dn="cn=sales,ou=Groups,dc=example,dc=com"/>
    <group filter="(objectClass=groupOfNames)" base="ou=Groups,dc=example,dc=com"
           name-attribute="description"/>
    <group dn="cn=eng,ou=Groups,dc=example,dc=com" name="Engineering"/>
  </rosters>
</mlink>
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "mlink.xml"
    path.write_text(text, encoding="utf-8")
    return path


def test_full_example(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, FULL))
    assert cfg.profiles.cache_seconds == 60
    assert cfg.profiles.max_photo_bytes == 196608
    assert cfg.profiles.fields == (
        ProfileFieldConfig("display_name", "directory"),
        ProfileFieldConfig("mobile", "update", attribute="mobile"),
        ProfileFieldConfig("org_name", "static", value="Example & Co"),
        ProfileFieldConfig("nickname", "local"),
    )
    assert cfg.rosters.refresh_seconds == 2.5
    assert cfg.rosters.static_attribute == "mlinkRosterItem"
    assert cfg.rosters.groups == (
        RosterGroupConfig(dn="cn=sales,ou=Groups,dc=example,dc=com"),
        RosterGroupConfig(filter="(objectClass=groupOfNames)",
                          base="ou=Groups,dc=example,dc=com", name_attribute="description"),
        RosterGroupConfig(dn="cn=eng,ou=Groups,dc=example,dc=com", name="Engineering"),
    )


def test_defaults_when_absent(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, HEAD + "</mlink>\n"))
    assert cfg.profiles.fields == ()
    assert cfg.profiles.cache_seconds == DEFAULT_PROFILE_CACHE_SECONDS
    assert cfg.profiles.max_photo_bytes == DEFAULT_MAX_PHOTO_BYTES
    assert cfg.rosters.groups == ()
    assert cfg.rosters.refresh_seconds == DEFAULT_GROUP_REFRESH_SECONDS
    assert cfg.rosters.static_attribute is None


def test_render_round_trip(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, FULL))
    again = tmp_path / "again.xml"
    again.write_text(render_config(cfg, tmp_path))
    assert load_config(again).profiles == cfg.profiles
    assert load_config(again).rosters == cfg.rosters
    # Unset: commented examples only, which load back to the defaults.
    plain = load_config(write(tmp_path, HEAD + "</mlink>\n"))
    text = render_config(plain, tmp_path)
    assert "<profiles" in text and "<rosters" in text
    again.write_text(text)
    assert load_config(again).profiles == plain.profiles
    assert load_config(again).rosters == plain.rosters


def test_photo_limit_follows_stanza_limit(tmp_path: Path) -> None:
    small = HEAD + '  <limits stanza-bytes="40000"/>\n</mlink>\n'
    assert load_config(write(tmp_path, small)).profiles.max_photo_bytes == 30000


BAD = [
    # (body, line of the error, words in the message)
    ('<profiles colour="red"/>', 5, "unknown attribute 'colour'"),
    ("<profiles><photo/></profiles>", 5, "unknown element <photo>"),
    ('<profiles cache-seconds="-1"/>', 5, "positive number"),
    ('<profiles max-photo-bytes="1000000"/>', 5, "cannot fit in a stanza"),
    ("<profiles/><profiles/>", 5, "<profiles> given twice"),
    ('<profiles>\n<field policy="local"/></profiles>', 6, "needs a 'name'"),
    ('<profiles>\n<field name="Display Name" policy="local"/></profiles>', 6,
     "not a profile field name"),
    ('<profiles>\n<field name="mobile"/></profiles>', 6, "needs a 'policy'"),
    ('<profiles>\n<field name="mobile" policy="write"/></profiles>', 6, "unknown policy 'write'"),
    ('<profiles>\n<field name="org_name" policy="static"/></profiles>', 6, "needs a 'value'"),
    ('<profiles>\n<field name="org_name" policy="static" value="X" attribute="o"/></profiles>',
     6, "'attribute' does not apply"),
    ('<profiles>\n<field name="mobile" policy="update" value="X"/></profiles>', 6,
     "'value' applies only"),
    ('<profiles>\n<field name="nickname" policy="local" attribute="cn"/></profiles>', 6,
     "never sent to the directory"),
    ('<profiles>\n<field name="mobile" policy="update" attribute="mob ile"/></profiles>', 6,
     "not an LDAP attribute name"),
    ('<profiles>\n<field name="mobile" policy="local"/>\n<field name="mobile" policy="update"/>'
     "</profiles>", 7, "given twice (first at line 6)"),
    ('<profiles>\n<field name="mobile" policy="local" hint="x"/></profiles>', 6,
     "unknown attribute 'hint'"),
    ('<rosters refresh="5"/>', 5, "unknown attribute 'refresh'"),
    ('<rosters refresh-seconds="0"/>', 5, "positive number"),
    ('<rosters static-attribute="roster item"/>', 5, "not an LDAP attribute name"),
    ("<rosters>\n<group/></rosters>", 6, "needs either 'dn'"),
    ('<rosters>\n<group dn="cn=a,dc=x" filter="(cn=a)"/></rosters>', 6, "not both"),
    ('<rosters>\n<group dn="sales"/></rosters>', 6, "is not a DN"),
    ('<rosters>\n<group filter="cn=a"/></rosters>', 6, "not an LDAP filter"),
    ('<rosters>\n<group filter="(&amp;(cn=a)"/></rosters>', 6, "not an LDAP filter"),
    ('<rosters>\n<group dn="cn=a,dc=x" base="dc=x"/></rosters>', 6, "'base' applies to"),
    ('<rosters>\n<group filter="(cn=a)" base="groups"/></rosters>', 6, "is not a DN"),
    ('<rosters>\n<group dn="cn=a,dc=x" name="A" name-attribute="cn"/></rosters>', 6,
     "not both"),
    ('<rosters>\n<group dn="cn=a,dc=x" name=""/></rosters>', 6, "is empty"),
    ('<rosters>\n<group dn="cn=a,dc=x"/>\n<group dn="CN=a, dc=x"/></rosters>', 7,
     "given twice (first at line 6)"),
    ('<rosters>\n<member dn="cn=a,dc=x"/></rosters>', 6, "unknown element <member>"),
]


@pytest.mark.parametrize(("body", "line", "words"), BAD)
def test_errors_name_file_and_line(tmp_path: Path, body: str, line: int, words: str) -> None:
    path = write(tmp_path, HEAD + body + "\n</mlink>\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{path}:{line}: "), message
    assert words in message, message
